# The cffi extension (netplex_native._core) is declared here because setuptools
# only takes cffi_modules through setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
