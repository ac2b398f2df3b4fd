"""The README works as written: its quick start runs line by line against a real relay.

The shell block runs under ``bash -e`` in an empty directory with a
``fastroute`` and a ``python3`` on ``PATH`` that are this test's interpreter
(the README's install step is what ``.ci/run`` does); the only change is the
port, 7474 becoming a free one so that tests never collide.  Every other
``fastroute`` command line in the README must parse with today's CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

from cliutil import ENV
from fastroute.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def free_pair() -> int:
    """A port p with p + 1 free too (the admin listener's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no free port pair")


def test_the_quick_start_runs_as_written(tmp_path):
    (sh,) = blocks("sh")
    (py,) = [b for b in blocks("python") if "asyncio.run(main())" in b]
    port = free_pair()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, cmd in (("fastroute", f"{sys.executable} -m fastroute.cli"),
                      ("python3", sys.executable)):
        (bindir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        (bindir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "quickstart.py").write_text(py.replace("7474", str(port)))
    script = sh.replace("fastroute serve --data-dir data &",
                        f"fastroute serve --data-dir data --listen 127.0.0.1:{port} &")
    assert script != sh
    env = dict(ENV, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, text=True,
                          capture_output=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "bob got b'<ciphertext>' from alice@home" in out
    for body in ("<c1>", "<c2>", "<c3>"):
        assert f"alice got b'{body}'" in out
    assert "alice downloaded b'<encrypted file>'" in out
    assert "revoked device phone of bob@acme" in out
    assert "confirmed by the running relay" in out
    assert f"admin listener (read only): http://127.0.0.1:{port + 1}/metrics" in out
    assert "shutting down" in out
    assert stat.S_IMODE(os.stat(work / "home.key").st_mode) == 0o600


def test_every_fastroute_command_in_the_readme_parses():
    parser = build_parser()
    text = "\n".join(blocks("sh"))
    # and the indented code blocks
    block: list[str] = []
    for line in README.splitlines() + [""]:
        if line.startswith("    "):
            block.append(line[4:])
        elif block:
            text += "\n" + "\n".join(block)
            block = []
    lines = text.replace("\\\n", " ").splitlines()
    seen = 0
    for line in lines:
        line = line.split("#", 1)[0].strip().rstrip("&").strip()
        m = re.match(r"^(?:\.venv/bin/)?fastroute (.*)$", line)
        if not m or "NAME" in line or "ADDRESS" in line or "[" in line:
            continue  # the synopsis lines have placeholders
        args = shlex.split(m.group(1))
        parsed = parser.parse_args(args)
        assert parsed.command, line
        seen += 1
    assert seen >= 12


def test_the_readme_names_the_extra_replay_needs():
    lt = README[README.index("## Load testing"):README.index("## Embedding")]
    assert "pip install '.[replay]'" in lt
    assert (ROOT / "tests" / "data" / "CollegeMsg.txt").is_file()  # the path it uses


def test_a_script_in_the_clone_root_is_told_it_imports_the_source_tree(tmp_path):
    """A source tree without its compiled core: the error names the cause."""
    clone = tmp_path / "clone"
    (clone / "fastroute").mkdir(parents=True)
    for path in (ROOT / "fastroute").rglob("*.py"):
        dest = clone / "fastroute" / path.relative_to(ROOT / "fastroute")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())
    (clone / "setup.py").write_text("")
    (clone / "script.py").write_text("import fastroute.relay\n")
    # the dependencies, but not an editable install's import hook (-S: no site, no .pth)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # and the script's directory on sys.path, as for a user (ENV's PYTHONSAFEPATH removes it)
    env = {k: v for k, v in ENV.items() if k not in ("FASTROUTE_NO_EXTENSIONS", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = os.pathsep.join(sorted(deps))
    proc = subprocess.run([sys.executable, "-S", "script.py"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "imported from the source tree" in proc.stderr
    assert "FASTROUTE_NO_EXTENSIONS" not in proc.stderr
