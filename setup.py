"""Build the one compiled extension, tunrelay._fastpath.

Build-time switches come from the environment, never from editing sources:
  TUNRELAY_DEBUG=1     -O0 -g, assertions on (no NDEBUG)
  TUNRELAY_ANNOTATE=1  write Cython's HTML annotation next to the .pyx
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("TUNRELAY_DEBUG") == "1"
extra_compile_args = ["-O0", "-g"] if debug else ["-O2"]
define_macros = [] if debug else [("NDEBUG", "1")]

extension = Extension(
    "tunrelay._fastpath",
    sources=["tunrelay/_fastpath.pyx"],
    include_dirs=["tunrelay/includes"],
    # The aead framing calls OpenSSL's EVP AEAD ciphers from the nogil loops;
    # the io "uring" engine is liburing (Debian liburing-dev).  Both are
    # required: without either header the build fails (no silent build
    # without an engine; scripts/install-system-deps installs them).
    libraries=["crypto", "uring"],
    extra_compile_args=extra_compile_args + ["-Wall", "-Wno-unused-function"],
    define_macros=define_macros,
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
        annotate=os.environ.get("TUNRELAY_ANNOTATE") == "1",
    ),
)
