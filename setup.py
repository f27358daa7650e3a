"""Build the C extensions from Cython sources: ``unixsrv._core`` (the server:
listener, poll loop, connections) and ``unixsrv._loadgen`` (the load generator
of ``unixsrv bench``).  Both compile against the same declarations
(``src/unixsrv/includes/*.pxd``) and platform headers (``src/unixsrv/*.h``).

Environment switches (for development only):

* ``UNIXSRV_SANITIZE=address`` builds with AddressSanitizer (run the tests with
  ``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
  PYTHONMALLOC=malloc``; README "Memory checks" says why libstdc++ too).
* ``UNIXSRV_DEBUG=1`` builds without optimisation, for gdb and valgrind.

Any other build (the release wheels, ``pip install .``) strips the extensions:
the ``-g`` that CPython's own compiler flags add makes ``_core`` about 2.7 MB
of debug information around 0.2 MB of code.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-std=c11", "-Wall", "-Wno-unused-function"]
extra_link_args = []
debug = bool(os.environ.get("UNIXSRV_DEBUG"))
if debug:
    extra_compile_args += ["-O0", "-g3"]
sanitize = os.environ.get("UNIXSRV_SANITIZE")
if sanitize:
    flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    extra_compile_args += flags
    extra_link_args += flags
if not (debug or sanitize):
    # Strip at link time: GNU ld's -s drops the symbol table and debug
    # sections (ld(1)); Apple's ld ignores -s, and takes -S (no debug
    # information) and -x (no local symbols) instead (ld64(1)).
    extra_link_args += ["-Wl,-S,-x"] if sys.platform == "darwin" else ["-s"]

define_macros = []
if sys.platform.startswith("linux"):
    # accept4, pipe2, renameat2 and SO_PEERCRED live behind _GNU_SOURCE.
    define_macros.append(("_GNU_SOURCE", "1"))

extensions = [
    Extension(
        name,
        sources=[f"src/unixsrv/{name.rsplit('.', 1)[1]}.pyx"],
        include_dirs=["src/unixsrv"],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
    for name in ("unixsrv._core", "unixsrv._loadgen")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            # Import does not re-enable the GIL on a free-threaded CPython:
            # every structure shared between threads is confined to one
            # thread or guarded (the audit is docs/free-threading.md).
            "freethreading_compatible": True,
        },
    ),
)
