"""Provider keys, device credentials, the registry and the verification chain."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastroute import identity
from fastroute.errors import (
    AuthError,
    BadSignature,
    CredentialExpired,
    CredentialRevoked,
    ErrorCode,
    InvalidArgument,
    KeyMismatch,
    PolicyError,
    ProtocolError,
    UnknownProvider,
    WrongType,
)
from fastroute.identity import (
    CREDENTIAL_DOMAIN,
    ProviderKey,
    Registry,
    issue_credential,
    parse_credential,
    verify_credential,
)

NOW = 1_700_000_000
STATIC = bytes(range(32))
OTHER_STATIC = bytes(range(1, 33))


@pytest.fixture(scope="module")
def key() -> ProviderKey:
    return ProviderKey.generate()


@pytest.fixture
def registry(tmp_path, key):
    reg = Registry(tmp_path / "registry.db")
    reg.add_provider("third.example", key.public_key, now=NOW)
    yield reg
    reg.close()


def cred(key: ProviderKey, address: str = "bob@third.example", device: str = "phone",
         static: bytes = STATIC, **kw) -> bytes:
    kw.setdefault("now", NOW)
    return issue_credential(key, "third.example", address, device, static, **kw)


def forge(key: ProviderKey, fields: list) -> bytes:
    """Sign an arbitrary body, bypassing issue_credential's checks."""
    body = msgpack.packb(fields)
    return msgpack.packb([body, key.sign(CREDENTIAL_DOMAIN + body)])


# -- keys ----------------------------------------------------------------------

def test_key_round_trips(key):
    assert ProviderKey.from_raw(key.to_raw()).public_key == key.public_key
    assert ProviderKey.from_pem(key.to_pem()).public_key == key.public_key
    assert len(key.public_key) == 32
    assert identity.parse_public_key(key.public_pem()) == key.public_key
    assert identity.parse_public_key(key.public_key.hex()) == key.public_key
    assert identity.parse_public_key(key.public_key) == key.public_key


def test_fingerprint_format(key):
    fp = key.fingerprint()
    groups = fp.split(":")
    assert len(groups) == 8 and all(len(g) == 4 for g in groups)
    assert fp == identity.fingerprint(key.public_key) != ProviderKey.generate().fingerprint()
    assert key.to_raw().hex() not in repr(key)


def test_key_file_is_private_and_loads(tmp_path, key):
    path = tmp_path / "provider.pem"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ProviderKey.load(path).public_key == key.public_key
    pub = tmp_path / "provider.pub.pem"
    pub.write_bytes(key.public_pem())
    assert identity.parse_public_key(str(pub)) == key.public_key  # the CLI passes a path
    os.chmod(path, 0o644)
    with pytest.raises(InvalidArgument):
        ProviderKey.load(path)


def test_bad_keys_are_typed_errors():
    with pytest.raises(InvalidArgument):
        ProviderKey.from_raw(b"short")
    with pytest.raises(WrongType):
        ProviderKey.from_raw("not bytes")
    with pytest.raises(InvalidArgument):
        ProviderKey.from_pem(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidArgument):
        identity.parse_public_key(b"\x01" * 31)
    with pytest.raises(InvalidArgument):
        identity.parse_public_key("zz" * 32)


# -- issuing and parsing -----------------------------------------------------------

def test_issue_and_parse(key):
    data = cred(key, ttl_s=60)
    c, body, sig = parse_credential(data)
    assert c == identity.Credential("third.example", "bob@third.example", "phone",
                                    STATIC, NOW, NOW + 60)
    assert len(sig) == 64
    assert msgpack.unpackb(data) == [body, sig]


@pytest.mark.parametrize("provider, address, device, static, exc", [
    ("third.example", "bob@other.example", "phone", STATIC, InvalidArgument),
    ("Third", "bob@Third", "phone", STATIC, InvalidArgument),
    ("-third", "bob@-third", "phone", STATIC, InvalidArgument),
    ("third.example", "bob", "phone", STATIC, InvalidArgument),
    ("third.example", "b ob@third.example", "phone", STATIC, InvalidArgument),
    ("third.example", "x" * 65 + "@third.example", "phone", STATIC, InvalidArgument),
    ("third.example", "bob@third.example", "", STATIC, InvalidArgument),
    ("third.example", "bob@third.example", "p" * 65, STATIC, InvalidArgument),
    ("third.example", "bob@third.example", "ph/one", STATIC, InvalidArgument),
    ("third.example", "bob@third.example", "phone", STATIC[:31], InvalidArgument),
    ("third.example", "bob@third.example", "phone", "x" * 32, WrongType),
    ("third.example", "bob@third.example", 7, STATIC, WrongType),
    (b"third", "bob@third", "phone", STATIC, WrongType),
])
def test_issue_validates(key, provider, address, device, static, exc):
    with pytest.raises(exc):
        issue_credential(key, provider, address, device, static, now=NOW)


def test_issue_validates_times(key):
    with pytest.raises(InvalidArgument):
        cred(key, ttl_s=0)
    with pytest.raises(WrongType):
        cred(key, ttl_s=True)
    with pytest.raises(WrongType):
        issue_credential(object(), "third.example", "bob@third.example", "p", STATIC)


GOOD = [1, "third.example", "bob@third.example", "phone", STATIC, NOW, NOW + 10]


@pytest.mark.parametrize("index, value, code", [
    (0, 2, ErrorCode.BAD_FIELD),
    (0, True, ErrorCode.BAD_FIELD),
    (1, "UPPER", ErrorCode.BAD_FIELD),
    (1, b"third.example", ErrorCode.BAD_FIELD),
    (2, "bob", ErrorCode.BAD_FIELD),
    (3, "", ErrorCode.BAD_FIELD),
    (4, STATIC[:31], ErrorCode.BAD_FIELD),
    (4, STATIC.hex(), ErrorCode.BAD_FIELD),
    (5, float(NOW), ErrorCode.BAD_FIELD),
    (5, -1, ErrorCode.BAD_FIELD),
    (6, NOW, ErrorCode.BAD_FIELD),  # empty validity interval
    (6, None, ErrorCode.BAD_FIELD),
])
def test_parse_rejects_bad_fields(key, index, value, code):
    fields = list(GOOD)
    fields[index] = value
    with pytest.raises(ProtocolError) as info:
        parse_credential(forge(key, fields))
    assert info.value.code == code


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",
    msgpack.packb([b"x"]),
    msgpack.packb([b"x", b"s" * 64, b"extra"]),
    msgpack.packb({"body": b"x"}),
    msgpack.packb([msgpack.packb(GOOD[:6]), b"s" * 64]),         # body arity
    msgpack.packb([msgpack.packb(GOOD + [0]), b"s" * 64]),
    msgpack.packb([msgpack.packb(GOOD) + b"\x00", b"s" * 64]),   # trailing byte in body
    msgpack.packb([msgpack.packb(GOOD), b"s" * 64]) + b"\x00",
    msgpack.packb([msgpack.packb(GOOD), msgpack.ExtType(1, b"s")]),
    msgpack.packb([msgpack.packb(GOOD), b"s" * 64])[:-1],
    b"\x92\xc5\x10\x00" + b"\x00" * 4096,                          # too long
])
def test_parse_rejects_malformed(data):
    with pytest.raises(ProtocolError):
        parse_credential(data)


def test_parse_rejects_short_signature(key):
    body = msgpack.packb(GOOD)
    with pytest.raises(ProtocolError) as info:
        parse_credential(msgpack.packb([body, key.sign(CREDENTIAL_DOMAIN + body)[:63]]))
    assert info.value.code == ErrorCode.BAD_FIELD


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_credentials_only_raise_protocol_errors(data):
    try:
        parse_credential(data)
    except ProtocolError:
        pass


# -- verification chain ------------------------------------------------------------

def test_verify_good(registry, key):
    c = verify_credential(registry, cred(key), STATIC, NOW + 5)
    assert (c.address, c.device) == ("bob@third.example", "phone")
    assert verify_credential(registry.trust(), cred(key), STATIC, NOW + 5) == c


def test_unknown_provider(registry):
    stranger = ProviderKey.generate()
    data = issue_credential(stranger, "nobody.example", "eve@nobody.example", "p", STATIC,
                            now=NOW)
    with pytest.raises(UnknownProvider):
        verify_credential(registry, data, STATIC, NOW)


def test_signature_by_another_key(registry):
    with pytest.raises(BadSignature):
        verify_credential(registry, cred(ProviderKey.generate()), STATIC, NOW)


def test_tampered_body(registry, key):
    body, sig = msgpack.unpackb(cred(key))
    tampered = body.replace(b"phone", b"phonf")
    assert tampered != body
    with pytest.raises(BadSignature):
        verify_credential(registry, msgpack.packb([tampered, sig]), STATIC, NOW)


def test_signature_without_domain_prefix(registry, key):
    body = msgpack.packb(GOOD)
    with pytest.raises(BadSignature):
        verify_credential(registry, msgpack.packb([body, key.sign(body)]), STATIC, NOW)


def test_static_key_mismatch(registry, key):
    with pytest.raises(KeyMismatch):
        verify_credential(registry, cred(key), OTHER_STATIC, NOW)


def test_expired_and_future(registry, key):
    data = cred(key, ttl_s=100)
    verify_credential(registry, data, STATIC, NOW + 99)
    with pytest.raises(CredentialExpired):
        verify_credential(registry, data, STATIC, NOW + 100)
    verify_credential(registry, data, STATIC, NOW - identity.MAX_SKEW_S)
    with pytest.raises(InvalidArgument):
        verify_credential(registry, data, STATIC, NOW - identity.MAX_SKEW_S - 1)


def test_address_of_another_provider(tmp_path, registry, key):
    # A provider signing for another provider's users: the signature is
    # genuine, the claim is not.
    data = forge(key, [1, "third.example", "alice@home.example", "phone", STATIC,
                       NOW, NOW + 10])
    with pytest.raises(AuthError) as info:
        verify_credential(registry, data, STATIC, NOW)
    assert type(info.value) is AuthError and info.value.code == ErrorCode.AUTH_FAILED


def test_revoked_device(registry, key):
    registry.revoke_device("bob@third.example", "phone", now=NOW)
    with pytest.raises(CredentialRevoked):
        verify_credential(registry, cred(key), STATIC, NOW)
    # other devices of the same user are unaffected
    verify_credential(registry, cred(key, device="laptop"), STATIC, NOW)
    assert registry.is_revoked("bob@third.example", "phone")
    assert not registry.is_revoked("bob@third.example", "laptop")


def test_revoked_provider(registry, key):
    registry.revoke_provider("third.example", now=NOW)
    with pytest.raises(CredentialRevoked):
        verify_credential(registry, cred(key), STATIC, NOW)
    assert registry.is_revoked("bob@third.example", "laptop")
    assert registry.get_provider("third.example").revoked_at == NOW
    # enrolling the same key again does not lift the revocation: it is refused
    with pytest.raises(PolicyError, match="restore"):
        registry.add_provider("third.example", key.public_key)
    assert registry.get_provider("third.example").revoked
    # restore lifts it: the provider's credentials verify again
    assert registry.restore_provider("third.example") is True
    assert registry.restore_provider("third.example") is False
    verify_credential(registry, cred(key), STATIC, NOW)
    assert not registry.is_revoked("bob@third.example", "laptop")


def test_rotated_provider_key(registry, key):
    new = ProviderKey.generate()
    with pytest.raises(InvalidArgument, match="already has"):
        registry.rotate_provider_key("third.example", key.public_key)
    with pytest.raises(UnknownProvider):
        registry.rotate_provider_key("nobody.example", new.public_key)
    registry.rotate_provider_key("third.example", new.public_key)
    # the old key's credentials stop verifying, the new key's verify
    with pytest.raises(BadSignature):
        verify_credential(registry, cred(key), STATIC, NOW)
    verify_credential(registry, cred(new), STATIC, NOW)


def test_chain_order_checks_provider_before_signature(registry, key):
    # Revoked provider + bad signature: the cheap registry check answers first.
    registry.revoke_provider("third.example")
    with pytest.raises(CredentialRevoked):
        verify_credential(registry, cred(ProviderKey.generate()), STATIC, NOW)


def test_check_live_follows_revocations(registry, key):
    c = verify_credential(registry, cred(key, ttl_s=100), STATIC, NOW)
    registry.trust().check_live(c, NOW)
    with pytest.raises(CredentialExpired):
        registry.trust().check_live(c, NOW + 100)
    registry.revoke_device(c.address, c.device)
    with pytest.raises(CredentialRevoked):
        registry.trust().check_live(c, NOW)


def test_revoked_since_names_exactly_what_check_live_may_now_refuse(registry, key):
    # the relay rechecks live links after a registry change by this diff: a
    # device revoked since is named, a provider revoked or removed since is
    # named, anything else (an enrolment, a quota, a restore) names nothing
    other = ProviderKey.generate()
    registry.add_provider("other.example", other.public_key)
    t0 = registry.trust()
    assert t0.revoked_since(t0) == (frozenset(), frozenset())
    registry.revoke_device("ann@third.example", "phone")
    registry.add_provider("fourth.example", ProviderKey.generate().public_key)
    t1 = registry.trust()
    assert t1.revoked_since(t0) == (frozenset({("ann@third.example", "phone")}), frozenset())
    registry.revoke_provider("other.example")
    t2 = registry.trust()
    assert t2.revoked_since(t1) == (frozenset(), frozenset({"other.example"}))
    assert t2.revoked_since(t0) == (frozenset({("ann@third.example", "phone")}),
                                   frozenset({"other.example"}))
    registry.restore_provider("other.example")
    t3 = registry.trust()
    assert t3.revoked_since(t2) == (frozenset(), frozenset())
    registry.remove_provider("fourth.example")
    assert registry.trust().revoked_since(t3) == (frozenset(), frozenset({"fourth.example"}))
    # every credential the diff leaves out still passes where it passed
    c = verify_credential(registry, cred(key, ttl_s=100), STATIC, NOW)
    t3.check_live(c, NOW)


def test_same_policies_tells_a_device_revocation_from_a_policy_change(registry, key):
    # the relay re-applies quotas, header policies and quarantines to every
    # bucket and live link only when one of them changed
    t0 = registry.trust()
    registry.revoke_device("ann@third.example", "phone")
    t1 = registry.trust()
    assert t1.same_policies(t0)
    registry.add_provider("third.example", key.public_key, msgs_per_s=5)  # a quota
    t2 = registry.trust()
    assert not t2.same_policies(t1)
    registry.add_provider("third.example", key.public_key, withhold=["ts_ms"])
    t3 = registry.trust()
    assert not t3.same_policies(t2)
    registry.quarantine("spam@third.example", "reported")
    t4 = registry.trust()
    assert not t4.same_policies(t3)
    registry.revoke_provider("third.example")
    assert not registry.trust().same_policies(t4)


def test_verify_argument_types(registry, key):
    with pytest.raises(WrongType):
        verify_credential(registry, cred(key), STATIC[:31], NOW)
    with pytest.raises(WrongType):
        verify_credential({}, cred(key), STATIC, NOW)


# -- registry ----------------------------------------------------------------------

def test_add_provider_rules(registry, key):
    with pytest.raises(InvalidArgument):
        registry.add_provider("third.example", ProviderKey.generate().public_key)
    rec = registry.add_provider("third.example", key.public_key, msgs_per_s=50, max_body=1000)
    assert (rec.msgs_per_s, rec.bytes_per_s, rec.max_body) == (50, None, 1000)
    assert registry.trust().quota("third.example") == {
        "msgs_per_s": 50, "bytes_per_s": None, "max_body": 1000,
        "provider_msgs_per_s": None, "provider_bytes_per_s": None, "provider_ops_per_s": None}
    with pytest.raises(InvalidArgument):
        registry.add_provider("Bad Name", key.public_key)
    with pytest.raises(InvalidArgument):
        registry.add_provider("x.example", b"\x00" * 31)
    with pytest.raises(InvalidArgument):
        registry.add_provider("x.example", key.public_key, msgs_per_s=0)
    with pytest.raises(UnknownProvider):
        registry.get_provider("nobody")
    with pytest.raises(UnknownProvider):
        registry.revoke_provider("nobody")


def test_registry_persists_across_reopen(tmp_path, key):
    path = tmp_path / "r.db"
    with Registry(path) as reg:
        reg.add_provider("b.example", key.public_key, now=NOW)
        reg.add_provider("a.example", ProviderKey.generate().public_key, now=NOW)
        reg.revoke_device("u@b.example", "d1", now=NOW)
        reg.revoke_provider("a.example", now=NOW + 1)
    with Registry(path) as reg:
        assert [p.name for p in reg.list_providers()] == ["a.example", "b.example"]
        assert reg.get_provider("b.example").public_key == key.public_key
        assert reg.get_provider("a.example").revoked_at == NOW + 1
        assert reg.is_revoked("u@b.example", "d1")
        assert not reg.is_revoked("u@b.example", "d2")


def test_version_changes_on_own_and_other_connections_writes(tmp_path, key):
    path = tmp_path / "r.db"
    relay, cli = Registry(path), Registry(path)
    try:
        v0 = relay.version()
        assert relay.version() == v0  # stable while nothing changes
        relay.add_provider("p.example", key.public_key)
        v1 = relay.version()
        assert v1 != v0
        snapshot = relay.trust()
        assert relay.trust() is snapshot  # cached while the version holds
        cli.revoke_device("u@p.example", "d")
        assert relay.version() != v1
        assert relay.trust() is not snapshot
        assert relay.trust().is_revoked("u@p.example", "d")
    finally:
        relay.close()
        cli.close()


def test_version_changes_when_another_process_writes(tmp_path, key):
    path = tmp_path / "r.db"
    with Registry(path) as relay:
        relay.add_provider("p.example", key.public_key)
        before = relay.version()
        trust = relay.trust()
        script = textwrap.dedent(f"""
            from fastroute.identity import Registry
            with Registry({str(path)!r}) as reg:
                reg.revoke_provider("p.example")
        """)
        # the child only needs identity.py, never the compiled core
        env = dict(os.environ, FASTROUTE_NO_EXTENSIONS="1")
        subprocess.run([sys.executable, "-c", script], check=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       timeout=60)
        assert relay.version() != before
        assert not trust.is_revoked("u@p.example", "d")  # snapshots are immutable
        assert relay.trust().is_revoked("u@p.example", "d")


def test_consent_is_durable_and_not_a_trust_change(tmp_path):
    path = tmp_path / "reg.db"
    with Registry(path) as reg:
        v = reg.version()
        reg.set_consent("alice@home", "acme", True)
        reg.set_consent("alice@home", "*", True)
        reg.set_consent("bob@acme", "home", True)
        reg.set_consent("bob@acme", "home", False)
        assert reg.version() == v  # relays need not reload trust for it
        with pytest.raises(InvalidArgument):
            reg.set_consent("not-an-address", "acme", True)
    with Registry(path) as reg:
        assert reg.consents() == {"alice@home": frozenset({"acme", "*"})}
