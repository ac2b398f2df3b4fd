"""The command line: enrolment, credentials and revocation against a real registry file."""

from __future__ import annotations

import os

import pytest

from fastroute.cli import main
from fastroute.identity import Registry, parse_credential
from fastroute.noise import KeyPair


def test_enrol_issue_revoke_round_trip(tmp_path, capsys):
    data = str(tmp_path / "data")
    key = str(tmp_path / "acme.key")
    assert main(["provider", "add", "acme", "--generate", "--key-out", key,
                 "--data-dir", data]) == 0
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    out = capsys.readouterr().out
    assert "enrolled provider acme" in out
    cred_path = str(tmp_path / "bob.cred")
    dev_key = str(tmp_path / "bob.key")
    assert main(["credential", "issue", "--provider-key", key, "--address", "bob@acme",
                 "--device", "phone", "--device-key-out", dev_key, "--ttl", "600",
                 "--out", cred_path]) == 0
    cred, _, _ = parse_credential(open(cred_path, "rb").read())
    assert (cred.provider, cred.address, cred.device) == ("acme", "bob@acme", "phone")
    assert cred.expires_at - cred.issued_at == 600
    # the credential binds the device key that was written next to it
    assert cred.static_pub == KeyPair.from_private(open(dev_key, "rb").read()).public
    assert main(["provider", "list", "--data-dir", data]) == 0
    assert "acme\tactive" in capsys.readouterr().out
    assert main(["device", "revoke", "bob@acme", "phone", "--data-dir", data]) == 0
    assert main(["provider", "revoke", "acme", "--data-dir", data]) == 0
    with Registry(os.path.join(data, "registry.db")) as reg:
        assert reg.is_revoked("bob@acme", "phone")
        assert reg.get_provider("acme").revoked
    assert main(["provider", "list", "--data-dir", data]) == 0
    assert "acme\trevoked" in capsys.readouterr().out


def test_errors_are_reported_with_their_code(tmp_path, capsys):
    data = str(tmp_path / "data")
    # revoking a provider that was never enrolled: a typed error, exit 2
    assert main(["provider", "revoke", "nobody", "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert "error 201" in err
    with pytest.raises(SystemExit):
        main(["provider", "add", "acme", "--data-dir", data])  # no key given
