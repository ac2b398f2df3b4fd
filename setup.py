"""Build the compiled routing core; everything else lives in pyproject.toml.

Switches (environment variables):

* ``FASTROUTE_NO_EXTENSIONS=1``: build nothing; ``fastroute.Router`` is then
  the pure-Python model (slow, for platforms without a C compiler).
* ``FASTROUTE_DEBUG=1``: compile with assertions, bounds checks and -O0 -g,
  and write Cython's annotated HTML next to the sources.
"""

import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_EXT = os.environ.get("FASTROUTE_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("FASTROUTE_DEBUG", "") not in ("", "0")

MISSING_COMPILER = """
fastroute: could not compile the routing core ({err}).
Install a C compiler and the Python headers, for example
    Debian/Ubuntu: apt-get install gcc python3-dev
    Fedora/RHEL:   dnf install gcc python3-devel
    macOS:         xcode-select --install
or set FASTROUTE_NO_EXTENSIONS=1 to install the (much slower) pure-Python model.
"""


class checked_build_ext(build_ext):
    """Fail loudly, with what to install, when the C toolchain is missing."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # setuptools raises several unrelated types
            sys.stderr.write(MISSING_COMPILER.format(err=err))
            raise SystemExit(1)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            sys.stderr.write(MISSING_COMPILER.format(err=err))
            raise SystemExit(1)


def extensions():
    if NO_EXT:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    if DEBUG:
        cflags = ["-O0", "-g3", "-UNDEBUG"]
        directives = {"boundscheck": True, "wraparound": True}
    else:
        cflags = ["-O3"] if sysconfig.get_platform().startswith(("linux", "macos")) else []
        directives = {"boundscheck": False, "wraparound": False}
    directives.update(language_level=3, embedsignature=True)
    # dlopen: the store's writer reaches the SQLite the sqlite3 module uses
    # (ext/fastroute/_sqlfast.pxi, _walvfs.pxi); glibc before 2.34 keeps it in libdl
    libraries = ["dl"] if sys.platform.startswith("linux") else []
    ext = Extension("fastroute._core", ["ext/fastroute/_core.pyx"],
                    extra_compile_args=cflags, libraries=libraries)
    return cythonize([ext], include_path=["ext"], compiler_directives=directives,
                     annotate=DEBUG)


setup(ext_modules=extensions(), cmdclass={"build_ext": checked_build_ext})
