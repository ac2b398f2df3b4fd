"""The command line as a user meets it: subprocesses in temporary directories.

Each test asserts exit statuses and messages; ``cliutil.fr`` also asserts that
no output ever holds a traceback.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from cliutil import ENV, Served, fr
from fastroute.identity import Registry, parse_credential
from fastroute.noise import KeyPair

README = Path(__file__).resolve().parents[1] / "README.md"


def init(tmp_path, name: str = "data") -> str:
    data = str(tmp_path / name)
    out = fr("init", "--data-dir", data, cwd=tmp_path, ok=True).stdout
    assert "initialised relay data directory" in out and "server key fingerprint" in out
    return data


def test_enrol_issue_revoke_round_trip(tmp_path):
    data = init(tmp_path)
    key = str(tmp_path / "acme.key")
    out = fr("provider", "add", "acme", "--generate", "--key-out", key, "--data-dir", data,
             cwd=tmp_path, ok=True).stdout
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    assert "enrolled provider acme" in out
    assert "no relay is running" in out
    cred_path = str(tmp_path / "bob.cred")
    dev_key = str(tmp_path / "bob.key")
    fr("credential", "issue", "--provider-key", key, "--address", "bob@acme",
       "--device", "phone", "--device-key-out", dev_key, "--ttl", "600", "--out", cred_path,
       cwd=tmp_path, ok=True)
    cred, _, _ = parse_credential(open(cred_path, "rb").read())
    assert (cred.provider, cred.address, cred.device) == ("acme", "bob@acme", "phone")
    assert cred.expires_at - cred.issued_at == 600
    assert cred.static_pub == KeyPair.from_private(open(dev_key, "rb").read()).public
    assert "acme\tactive" in fr("provider", "list", "--data-dir", data, cwd=tmp_path,
                                ok=True).stdout
    # the device never connected: revoking it needs --unseen (a typo is not a revocation)
    err = fr("device", "revoke", "bob@acme", "phone", "--data-dir", data, cwd=tmp_path,
             ok=False).stderr
    assert "never connected" in err and "[301 UNKNOWN_DEVICE]" in err
    fr("device", "revoke", "bob@acme", "phone", "--unseen", "--data-dir", data, cwd=tmp_path,
       ok=True)
    assert "already revoked" in fr("device", "revoke", "bob@acme", "phone", "--data-dir", data,
                                   cwd=tmp_path, ok=True).stdout
    fr("provider", "revoke", "acme", "--data-dir", data, cwd=tmp_path, ok=True)
    with Registry(os.path.join(data, "registry.db")) as reg:
        assert reg.is_revoked("bob@acme", "phone")
        assert reg.get_provider("acme").revoked
    assert "acme\trevoked" in fr("provider", "list", "--data-dir", data, cwd=tmp_path,
                                 ok=True).stdout


def test_admin_verbs_never_act_on_a_directory_that_is_not_a_relay_data_dir(tmp_path):
    # an empty working directory: no ./fastroute-data, and none is created
    for args in (["device", "revoke", "bob@acme", "phone"], ["provider", "list"],
                 ["provider", "revoke", "acme"], ["provider", "add", "acme", "--generate",
                                                   "--key-out", "acme.key"]):
        p = fr(*args, cwd=tmp_path, ok=False)
        assert p.returncode == 2
        assert "no relay data directory at 'fastroute-data'" in p.stderr
        assert "[110 INVALID_ARGUMENT]" in p.stderr
        assert "revoked" not in p.stdout
        assert os.listdir(tmp_path) == [], args  # no data dir, no key file
    # an existing directory that is not a relay's
    (tmp_path / "elsewhere").mkdir()
    p = fr("provider", "list", "--data-dir", "elsewhere", cwd=tmp_path, ok=False)
    assert "is not a relay data directory" in p.stderr
    assert os.listdir(tmp_path / "elsewhere") == []


def test_the_data_dir_comes_from_the_flag_the_environment_or_the_config(tmp_path):
    data = init(tmp_path, "relay-data")
    fr("provider", "add", "acme", "--generate", "--key-out", "acme.key", "--data-dir", data,
       cwd=tmp_path, ok=True)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(ENV, FASTROUTE_DATA_DIR=data)
    assert "acme\tactive" in fr("provider", "list", cwd=work, env=env, ok=True).stdout
    (work / "fastroute.toml").write_text(f'[relay]\ndata_dir = "{data}"\n')
    assert "acme\tactive" in fr("provider", "list", cwd=work, ok=True).stdout
    # the flag beats both
    p = fr("provider", "list", "--data-dir", "nowhere", cwd=work, env=env, ok=False)
    assert "'nowhere' (from --data-dir)" in p.stderr


def test_unknown_providers_and_devices_are_refused_clearly(tmp_path):
    data = init(tmp_path)
    p = fr("provider", "revoke", "nobody", "--data-dir", data, cwd=tmp_path, ok=False)
    assert p.stderr.strip() == "fastroute: provider 'nobody' is not enrolled [201 UNKNOWN_PROVIDER]"
    p = fr("device", "revoke", "bob@nobody", "phone", "--data-dir", data, cwd=tmp_path,
           ok=False)
    assert "provider 'nobody' is not enrolled [201 UNKNOWN_PROVIDER]" in p.stderr
    for verb in ("restore", "rotate"):
        extra = ["--generate", "--key-out", "new.key"] if verb == "rotate" else []
        p = fr("provider", verb, "nobody", *extra, "--data-dir", data, cwd=tmp_path, ok=False)
        assert "[201 UNKNOWN_PROVIDER]" in p.stderr
    assert not (tmp_path / "new.key").exists()


def test_provider_lifecycle_rotation_and_restore(tmp_path):
    data = init(tmp_path)
    # quotas given as whole numbers, as a user types them
    fr("provider", "add", "acme", "--generate", "--key-out", "acme.key", "--max-msgs-per-s",
       "2", "--max-bytes-per-s", "1000.0", "--data-dir", data, cwd=tmp_path, ok=True)
    with Registry(os.path.join(data, "registry.db")) as reg:
        rec = reg.get_provider("acme")
        assert (rec.msgs_per_s, rec.bytes_per_s) == (2, 1000)
    p = fr("provider", "add", "beta", "--generate", "--key-out", "beta.key",
           "--max-msgs-per-s", "2.5", "--data-dir", data, cwd=tmp_path, ok=False)
    assert "whole number" in p.stderr and not (tmp_path / "beta.key").exists()
    fr("provider", "revoke", "acme", "--data-dir", data, cwd=tmp_path, ok=True)
    # adding a revoked provider is refused, before any key file is written
    p = fr("provider", "add", "acme", "--generate", "--key-out", "acme2.key", "--data-dir",
           data, cwd=tmp_path, ok=False)
    assert "provider 'acme' is revoked" in p.stderr and "provider restore acme" in p.stderr
    assert "[403 POLICY]" in p.stderr and "enrolled" not in p.stdout
    assert not (tmp_path / "acme2.key").exists()
    p = fr("provider", "add", "acme", "--key-file", "acme.key", "--data-dir", data,
           cwd=tmp_path, ok=False)
    assert "is revoked" in p.stderr
    # un-revoke
    assert "restored provider acme" in fr("provider", "restore", "acme", "--data-dir", data,
                                          cwd=tmp_path, ok=True).stdout
    assert "acme\tactive" in fr("provider", "list", "--data-dir", data, cwd=tmp_path,
                                ok=True).stdout
    assert "not revoked" in fr("provider", "restore", "acme", "--data-dir", data,
                               cwd=tmp_path, ok=True).stdout
    # rotation: a new key, written only once the rotation is valid
    old_fp = fr("provider", "list", "--data-dir", data, cwd=tmp_path).stdout.split()[2]
    p = fr("provider", "rotate", "acme", "--key-file", "acme.key", "--data-dir", data,
           cwd=tmp_path, ok=False)
    assert "already has that key" in p.stderr
    out = fr("provider", "rotate", "acme", "--generate", "--key-out", "acme-2.key",
             "--data-dir", data, cwd=tmp_path, ok=True).stdout
    new_fp = fr("provider", "list", "--data-dir", data, cwd=tmp_path).stdout.split()[2]
    assert new_fp != old_fp and f"{old_fp} -> {new_fp}" in out
    # the old key no longer matches: enrolling with it is refused with the way out
    p = fr("provider", "add", "acme", "--key-file", "acme.key", "--data-dir", data,
           cwd=tmp_path, ok=False)
    assert "another key" in p.stderr and "provider rotate acme" in p.stderr


def test_the_readme_configuration_file_is_accepted(tmp_path):
    text = README.read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "fastroute.toml").write_text(block.replace('data_dir = "fastroute-data"',
                                                           'data_dir = "d"'))
    out = fr("init", cwd=tmp_path, ok=True).stdout
    assert "initialised relay data directory d" in out


def test_ordinary_mistakes_are_messages_not_tracebacks(tmp_path):
    # the configuration file is missing
    p = fr("serve", "--config", "missing.toml", cwd=tmp_path, ok=False)
    assert "cannot read the configuration file 'missing.toml'" in p.stderr
    # the data directory's path runs through a file
    (tmp_path / "afile").write_text("")
    p = fr("serve", "--data-dir", "afile/data", "--listen", "127.0.0.1:0", cwd=tmp_path,
           ok=False)
    assert "a part of the path is a file [510 START_FAILED]" in p.stderr
    p = fr("serve", "--data-dir", "afile", "--listen", "127.0.0.1:0", cwd=tmp_path, ok=False)
    assert "is a file, not a directory" in p.stderr
    # a data directory that cannot be created (not even by root)
    p = fr("serve", "--data-dir", "/proc/fastroute-data", "--listen", "127.0.0.1:0",
           cwd=tmp_path, ok=False)
    assert "cannot create the data directory '/proc/fastroute-data'" in p.stderr
    # the port is in use: refused before a data directory or key is created
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = fr("serve", "--data-dir", "fresh", "--listen", f"127.0.0.1:{port}",
               cwd=tmp_path, ok=False)
    assert f"cannot listen on 127.0.0.1:{port}" in p.stderr
    assert "[510 START_FAILED]" in p.stderr
    assert not (tmp_path / "fresh").exists()
    # a provider key file that does not exist
    p = fr("credential", "issue", "--provider-key", "nope.key", "--address", "a@b",
           "--device", "d", "--device-key-out", "d.key", "--out", "d.cred", cwd=tmp_path,
           ok=False)
    assert "No such file or directory: nope.key" in p.stderr


def test_version_verb_level_verbose_and_defaults_in_help(tmp_path):
    from fastroute import __version__

    assert fr("--version", cwd=tmp_path, ok=True).stdout.strip() == f"fastroute {__version__}"
    # -v after the verb is accepted (it used to be "unrecognized arguments")
    p = fr("serve", "-v", "--config", "missing.toml", cwd=tmp_path, ok=False)
    assert "cannot read the configuration file" in p.stderr
    assert "unrecognized" not in p.stderr
    p = fr("provider", "list", "-vv", "--data-dir", "nowhere", cwd=tmp_path, ok=False)
    assert "no relay data directory" in p.stderr
    assert "(default: 2592000)" in fr("credential", "issue", "--help", cwd=tmp_path,
                                      ok=True).stdout
    assert "(default: 127.0.0.1:7474)" in fr("replay", "--help", cwd=tmp_path, ok=True).stdout


def test_a_second_relay_on_the_same_data_dir_is_refused(tmp_path):
    first = Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0")
    try:
        p = fr("serve", "--data-dir", "d", "--listen", "127.0.0.1:0", cwd=tmp_path, ok=False)
        assert f"another relay (pid {first.proc.pid}) is running on the data directory" \
            in p.stderr
        assert "[510 START_FAILED]" in p.stderr
        # the first one is untouched
        with urllib.request.urlopen(first.admin + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        out = first.stop()
    assert "shutting down" in out
    # the lock goes with the process: the next start works
    Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0").stop()


def test_status_tells_whether_a_relay_listens_and_where(tmp_path):
    fr("init", "--data-dir", "d", cwd=tmp_path, ok=True)
    p = fr("status", "--data-dir", "d", "--wait", "0.3", cwd=tmp_path, ok=False)
    assert p.returncode == 1 and "no relay is running" in p.stdout
    relay = Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0")
    try:
        out = fr("status", "--data-dir", "d", cwd=tmp_path, ok=True).stdout
        assert f"relay running (pid {relay.proc.pid}), listening on 127.0.0.1:{relay.port}" \
            in out
    finally:
        relay.stop()
    assert fr("status", "--data-dir", "d", cwd=tmp_path, ok=False).returncode == 1


@pytest.mark.parametrize("verb", ["revoke", "restore"])
def test_changes_are_confirmed_by_the_running_relay(tmp_path, verb):
    relay = Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0")
    try:
        fr("provider", "add", "acme", "--generate", "--key-out", "acme.key", "--data-dir", "d",
           cwd=tmp_path, ok=True)
        if verb == "restore":
            fr("provider", "revoke", "acme", "--data-dir", "d", cwd=tmp_path, ok=True)
        out = fr("provider", verb, "acme", "--data-dir", "d", cwd=tmp_path, ok=True).stdout
        assert f"confirmed by the running relay (pid {relay.proc.pid})" in out
    finally:
        relay.stop()


def test_a_relay_that_does_not_apply_the_change_is_not_claimed_to(tmp_path):
    """A stopped (SIGSTOP) relay cannot confirm: the CLI says so and exits 3."""
    import signal

    relay = Served(tmp_path, "--data-dir", "d", "--listen", "127.0.0.1:0")
    try:
        relay.proc.send_signal(signal.SIGSTOP)
        p = fr("provider", "add", "acme", "--generate", "--key-out", "acme.key", "--data-dir",
               "d", cwd=tmp_path, timeout=60)
        assert p.returncode == 3
        assert "enrolled provider acme" in p.stdout and "confirmed" not in p.stdout
        assert "did not confirm the change within 10 s" in p.stderr
    finally:
        relay.proc.send_signal(signal.SIGCONT)
        relay.stop()
