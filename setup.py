# setuptools takes cffi_modules and ext_modules only through setup();
# everything else is in pyproject.toml.
#
# netplex_native._core  the C core, built with cffi from csrc/netplex_core.h
# netplex_native._fast  the uncontended operations without cffi's call
#                       overhead; it calls the core through _core's function
#                       pointers (csrc/fast.c says why)
from setuptools import Extension, setup

setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    ext_modules=[Extension("netplex_native._fast", ["csrc/fast.c"], include_dirs=["csrc"],
                           depends=["csrc/netplex_core.h"], extra_compile_args=["-O2", "-Wall"])],
)
