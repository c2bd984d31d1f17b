# setuptools takes cffi_modules and ext_modules only through setup();
# everything else is in pyproject.toml.
#
# netplex_native._core  the C core, built with cffi from csrc/netplex_core.h
# netplex_native._fast  the uncontended operations without cffi's call
#                       overhead; it calls the core through _core's function
#                       pointers (csrc/fast/fast.h says why); one file per
#                       layer, everything but PyInit__fast hidden; and the
#                       container channel's reads (container_channel.c); and
#                       the controller's read of a hot call (controller_calls.c)
from setuptools import Extension, setup

FAST = ["binder.c", "public_functions.c", "handles.c", "container_channel.c", "controller_calls.c", "module.c"]

setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    ext_modules=[Extension("netplex_native._fast", [f"csrc/fast/{f}" for f in FAST],
                           include_dirs=["csrc"], depends=["csrc/netplex_core.h", "csrc/fast/fast.h", "csrc/yield_backoff.h"],
                           extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"])],
)
