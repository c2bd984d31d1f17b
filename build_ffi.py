"""Build script of the cffi extension ``netplex_native._core`` (API mode, out-of-line).

It builds ``ffibuilder`` and nothing else.  ``csrc/netplex_core.h`` is the single list of
declarations: its text (minus preprocessor lines other than integer ``#define``s) is the
cdef, and the real header is ``#include``d by the generated C, so the compiler checks that
declarations and definitions agree.
"""

import glob
import os
import platform
import re
import shutil
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
HEADER = os.path.join(CSRC, "netplex_core.h")

_INT_DEFINE = re.compile(r"^\s*#\s*define\s+[A-Za-z_]\w*\s+-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*$")


def _require_toolchain():
    include = sysconfig.get_paths().get("include") or ""
    compiler = shutil.which(os.environ.get("CC", "cc").split()[0]) or shutil.which("gcc")
    if not compiler or not os.path.exists(os.path.join(include, "Python.h")):
        raise SystemExit(
            "netplex_native needs a C compiler and the Python headers: "
            "e.g. apt-get install gcc python3-dev"
            f" (compiler: {compiler or 'not found'}; Python.h in {include!r}: "
            f"{'found' if include and os.path.exists(os.path.join(include, 'Python.h')) else 'missing'})"
        )


def _cdef_text(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith("#") and not _INT_DEFINE.match(line):
                continue
            out.append(line)
    return "".join(out)


_require_toolchain()

ffibuilder = FFI()
ffibuilder.cdef(_cdef_text(HEADER))
ffibuilder.set_source(
    "netplex_native._core",
    '#include "netplex_core.h"',
    # csrc/fast/ (not globbed here) is the separate accelerator module (setup.py)
    sources=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(CSRC, "*.c"))),
    include_dirs=[os.path.relpath(CSRC, HERE)],
    depends=[os.path.relpath(p, HERE) for p in glob.glob(os.path.join(CSRC, "*.h"))],
    # -mcx16: the 16-byte CAS of a mutex's fast path (csrc/mutex_fast.h, F6)
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"]
    + (["-mcx16"] if platform.machine() in ("x86_64", "AMD64") else []),
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
