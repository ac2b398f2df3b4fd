"""docs/PROTOCOL.md's worked example: current, and right by an independent reading.

1. Re-running ``tools/protocol_example.py`` reproduces the generated section
   of the doc byte for byte (the doc cannot rot silently).
2. The hex blocks *as printed in the doc* are then checked without trusting
   the generator: keys re-derived and the credential parsed and verified with
   plain ``cryptography``/``msgpack``; the handshake and both transport
   frames reproduced and decrypted by the independent ``noiseprotocol``
   package, once as the relay and once as the device, with the example's
   static and ephemeral keys injected; and our own ``HandshakeState`` fed
   the doc's bytes as a responder.

Everything is a few milliseconds: no sockets, no relay.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import warnings

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fastroute import wire
from fastroute.identity import ProviderRecord, Trust, verify_credential
from fastroute.noise import HandshakeState, KeyPair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "PROTOCOL.md")
TOOL = os.path.join(ROOT, "tools", "protocol_example.py")

# The protocol constants, spelled out here rather than imported, so that a
# change in the code that the doc does not follow fails this test.
PROTOCOL_NAME = "Noise_XX_25519_ChaChaPoly_SHA256"
PROLOGUE = b"fastroute/1"
CRED_DOMAIN = b"fastroute/cred/1\x00"


def _load_tool():
    spec = importlib.util.spec_from_file_location("_fastroute_protocol_example", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def example(tool):
    return tool.build()


@pytest.fixture(scope="module")
def doc() -> str:
    with open(DOC, encoding="utf-8") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def hexes(doc) -> dict[str, bytes]:
    """Every ```hex <name> block and named input key of the doc, decoded."""
    out: dict[str, bytes] = {}
    for name, value in re.findall(r"^\| [^|]+ \| `([a-z0-9-]+)` \| `([0-9a-f]+)` \|$", doc, re.M):
        assert name not in out, f"duplicate input {name}"
        out[name] = bytes.fromhex(value)
    for name, body in re.findall(r"^```hex ([a-z0-9-]+)\n(.*?)^```$", doc, re.M | re.S):
        assert name not in out, f"duplicate hex block {name}"
        out[name] = bytes.fromhex("".join(body.split()))
    return out


def _unframe(data: bytes) -> bytes:
    """Strip and check the 2-byte big-endian length prefix."""
    assert int.from_bytes(data[:2], "big") == len(data) - 2
    return data[2:]


# -- 1. the doc is what the generator produces -------------------------------------

def test_generated_section_is_current(tool, example, doc):
    start = doc.index(tool.BEGIN)
    stop = doc.index(tool.END) + len(tool.END)
    assert doc[start:stop] == example.markdown, (
        "docs/PROTOCOL.md is stale: run python tools/protocol_example.py --write")


def test_generation_is_deterministic(tool, example):
    assert tool.build().markdown == example.markdown


def test_doc_hex_blocks_are_the_generated_values(example, hexes):
    assert hexes == example.values


# -- 2. independent checks of the doc's bytes ---------------------------------------

def _x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def test_public_keys_match_private_keys(hexes):
    for role in ("device-static", "device-ephemeral", "relay-static", "relay-ephemeral"):
        assert _x25519_public(hexes[f"{role}-private"]) == hexes[f"{role}-public"], role
    seed = Ed25519PrivateKey.from_private_bytes(hexes["provider-seed"])
    assert seed.public_key().public_bytes_raw() == hexes["provider-public"]


def test_credential_by_hand(tool, hexes):
    cred = hexes["credential"]
    body, sig = msgpack.unpackb(cred, raw=False)
    assert body == hexes["credential-body"] and sig == hexes["credential-sig"]
    assert hexes["credential-signed"] == CRED_DOMAIN + body
    Ed25519PublicKey.from_public_bytes(hexes["provider-public"]).verify(sig, CRED_DOMAIN + body)
    fields = msgpack.unpackb(body, raw=False)
    assert fields == [1, tool.PROVIDER, tool.ADDRESS, tool.DEVICE,
                      hexes["device-static-public"], tool.ISSUED_AT,
                      tool.ISSUED_AT + tool.TTL_S]
    # and the relay's own verifier accepts it at the example's time
    trust = Trust([ProviderRecord(tool.PROVIDER, hexes["provider-public"], 0, None,
                                  None, None, None)])
    now = tool.SERVER_TIME_MS // 1000
    got = verify_credential(trust, cred, hexes["device-static-public"], now)
    assert (got.address, got.device) == (tool.ADDRESS, tool.DEVICE)


def test_hello_payloads(hexes):
    server_hello = msgpack.unpackb(hexes["server-hello"], raw=False)
    assert set(server_hello) == {"v", "t"} and server_hello["v"] == 1
    assert wire.decode_server_hello(hexes["server-hello"]) == server_hello
    client_hello = msgpack.unpackb(hexes["client-hello"], raw=False)
    assert client_hello == {"v": 1, "cred": hexes["credential"]}
    assert wire.decode_client_hello(hexes["client-hello"]) == client_hello


def test_frame_plaintexts(tool, hexes):
    mid = tool.MSG_ID
    client_ops = msgpack.unpackb(hexes["client-frame-plaintext"], raw=False)
    assert client_ops == [[1, mid, tool.RECIPIENT, tool.BODY, 0]]
    assert wire.decode_client_frame(hexes["client-frame-plaintext"]) == \
        [(1, mid, tool.RECIPIENT, tool.BODY, 0)]
    server_ops = msgpack.unpackb(hexes["server-frame-plaintext"], raw=False)
    assert server_ops == [[16, tool.ADDRESS, tool.DEVICE, tool.WELCOME_TIME_MS], [17, mid, 0]]
    assert wire.decode_server_frame(hexes["server-frame-plaintext"]) == \
        [(16, tool.ADDRESS, tool.DEVICE, tool.WELCOME_TIME_MS), (17, mid, 0)]


def _noiseprotocol(initiator: bool, static: bytes, ephemeral: bytes):
    conn_mod = pytest.importorskip("noise.connection")  # test-only dependency
    conn = conn_mod.NoiseConnection.from_name(PROTOCOL_NAME.encode())
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(conn_mod.Keypair.STATIC, static)
    # Injecting the ephemeral is what makes the bytes reproducible; the
    # library warns that this is for testing only, which is the case here.
    conn.set_keypair_from_private_bytes(conn_mod.Keypair.EPHEMERAL, ephemeral)
    conn.set_prologue(PROLOGUE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


def test_noiseprotocol_as_the_relay(hexes):
    relay = _noiseprotocol(False, hexes["relay-static-private"], hexes["relay-ephemeral-private"])
    assert bytes(relay.read_message(_unframe(hexes["msg1"]))) == b""
    assert bytes(relay.write_message(hexes["server-hello"])) == _unframe(hexes["msg2"])
    assert bytes(relay.read_message(_unframe(hexes["msg3"]))) == hexes["client-hello"]
    assert relay.handshake_finished
    assert bytes(relay.get_handshake_hash()) == hexes["handshake-hash"]
    assert bytes(relay.decrypt(_unframe(hexes["client-frame"]))) == \
        hexes["client-frame-plaintext"]
    assert bytes(relay.encrypt(hexes["server-frame-plaintext"])) == \
        _unframe(hexes["server-frame"])


def test_noiseprotocol_as_the_device(hexes):
    device = _noiseprotocol(True, hexes["device-static-private"],
                            hexes["device-ephemeral-private"])
    assert bytes(device.write_message(b"")) == _unframe(hexes["msg1"])
    assert bytes(device.read_message(_unframe(hexes["msg2"]))) == hexes["server-hello"]
    assert bytes(device.write_message(hexes["client-hello"])) == _unframe(hexes["msg3"])
    assert device.handshake_finished
    assert bytes(device.encrypt(hexes["client-frame-plaintext"])) == \
        _unframe(hexes["client-frame"])
    assert bytes(device.decrypt(_unframe(hexes["server-frame"]))) == \
        hexes["server-frame-plaintext"]


def test_our_responder_reads_the_doc(hexes):
    relay = HandshakeState(False, KeyPair.from_private(hexes["relay-static-private"]),
                           PROLOGUE)
    assert relay.read_message(_unframe(hexes["msg1"])) == b""
    # a fresh ephemeral: msg2 differs from the doc's, so play the device too
    device = HandshakeState(True, KeyPair.from_private(hexes["device-static-private"]),
                            PROLOGUE, ephemeral=KeyPair.from_private(
                                hexes["device-ephemeral-private"]))
    assert device.write_message(b"") == _unframe(hexes["msg1"])
    # with the doc's ephemeral injected, our relay reproduces the doc exactly
    relay = HandshakeState(False, KeyPair.from_private(hexes["relay-static-private"]),
                           PROLOGUE, ephemeral=KeyPair.from_private(
                               hexes["relay-ephemeral-private"]))
    relay.read_message(_unframe(hexes["msg1"]))
    assert relay.write_message(hexes["server-hello"]) == _unframe(hexes["msg2"])
    assert relay.read_message(_unframe(hexes["msg3"])) == hexes["client-hello"]
    assert relay.remote_static == hexes["device-static-public"]
    assert relay.handshake_hash == hexes["handshake-hash"]
    send, recv = relay.split()
    assert recv.decrypt(_unframe(hexes["client-frame"])) == hexes["client-frame-plaintext"]
    assert send.encrypt(hexes["server-frame-plaintext"]) == _unframe(hexes["server-frame"])


def test_documented_sizes(hexes):
    # section 4.2: msg1 = 2 + 32; msg2 = 2 + 96 + hello; msg3 = 2 + 64 + hello
    assert len(hexes["msg1"]) == 34
    assert len(hexes["msg2"]) == 2 + 96 + len(hexes["server-hello"]) == 113
    assert len(hexes["msg3"]) == 2 + 64 + len(hexes["client-hello"])
    assert len(hexes["client-frame"]) == 2 + len(hexes["client-frame-plaintext"]) + 16


def test_doc_constants_match_the_code(doc):
    from fastroute import identity, noise

    assert noise.PROTOCOL_NAME == PROTOCOL_NAME.encode() and noise.PROLOGUE == PROLOGUE
    assert identity.CREDENTIAL_DOMAIN == CRED_DOMAIN
    assert PROLOGUE.hex(" ") in doc and CRED_DOMAIN.hex(" ") in doc
    for value in (wire.MAX_BODY, wire.MAX_PLAINTEXT, wire.MAX_OPS_PER_FRAME,
                  wire.MAX_REASON_LEN, wire.MAX_HELLO_LEN, identity.MAX_CREDENTIAL_LEN):
        assert str(value) in doc, value
    for op in wire.Op:
        assert f"| {int(op)} | {op.name} |" in doc, op


def test_every_error_code_is_documented(doc):
    from fastroute.errors import ErrorCode

    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in doc, code
