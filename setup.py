"""Build the one C extension, ``unixsrv._core``, from Cython sources.

Environment switches (for development only):

* ``UNIXSRV_SANITIZE=address`` builds with AddressSanitizer (run the tests with
  ``LD_PRELOAD=$(gcc -print-file-name=libasan.so) PYTHONMALLOC=malloc``).
* ``UNIXSRV_DEBUG=1`` builds without optimisation, for gdb and valgrind.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

extra_compile_args = ["-std=c11", "-Wall", "-Wno-unused-function"]
extra_link_args = []
if os.environ.get("UNIXSRV_DEBUG"):
    extra_compile_args += ["-O0", "-g3"]
sanitize = os.environ.get("UNIXSRV_SANITIZE")
if sanitize:
    flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    extra_compile_args += flags
    extra_link_args += flags

define_macros = []
if sys.platform.startswith("linux"):
    # accept4, pipe2, renameat2 and SO_PEERCRED live behind _GNU_SOURCE.
    define_macros.append(("_GNU_SOURCE", "1"))

extensions = [
    Extension(
        "unixsrv._core",
        sources=["src/unixsrv/_core.pyx"],
        include_dirs=["src/unixsrv"],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
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
        },
    ),
)
