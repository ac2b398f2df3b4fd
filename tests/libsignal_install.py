"""Install the official libsignal for tests/test_libsignal.py, once per version.

The npm package ``@signalapp/libsignal-client`` (prebuilt native library for
linux-x64 and others inside the package) goes into a cache directory of its
own, keyed by version, outside the repository: ``$FASTROUTE_LIBSIGNAL_DIR``
or ``/tmp/fastroute-libsignal-<version>``.  Only the npm registry is used.
``.ci/run`` calls ``python tests/libsignal_install.py`` before the tests; the
test calls :func:`ensure` itself, so a plain ``pytest`` works too.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys

#: the version the test is written against (its API: processPreKeyBundle with
#: a local address, KEM prekeys in every bundle)
VERSION = "0.103.0"
PACKAGE = "@signalapp/libsignal-client"


def cache_dir() -> str:
    """Where the package is (or will be) installed."""
    return os.environ.get("FASTROUTE_LIBSIGNAL_DIR") or f"/tmp/fastroute-libsignal-{VERSION}"


def ensure() -> str:
    """Install the package if missing; return its ``node_modules`` parent directory.

    Raises RuntimeError with npm's output if node or npm is missing or the
    install fails.
    """
    root = cache_dir()
    marker = os.path.join(root, "node_modules", *PACKAGE.split("/"), "package.json")
    if os.path.exists(marker):
        return root
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed for the libsignal test (install Node.js >= 18)")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs install once
        if not os.path.exists(marker):
            res = subprocess.run(
                ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", root,
                 f"{PACKAGE}@{VERSION}"], capture_output=True, text=True, timeout=600)
            if res.returncode != 0 or not os.path.exists(marker):
                raise RuntimeError(f"npm install {PACKAGE}@{VERSION} failed:\n"
                                   f"{res.stdout}\n{res.stderr}")
    return root


if __name__ == "__main__":
    print(ensure())
    sys.exit(0)
