"""Pinning the BLAS thread count of a process.

Each downpour process uses the cores it is meant to use and no more (default one
BLAS thread), so W workers and S servers on one machine do not oversubscribe it,
and a measurement says how many threads it had. The thread count is set through
the environment before NumPy loads its BLAS; if NumPy is already loaded, the
OpenBLAS it loaded is told directly.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
        "openblas_set_num_threads64_", "openblas_set_num_threads")
_GET = tuple(s.replace("set_", "get_") for s in _SET)


def _loaded_openblas() -> list[ctypes.CDLL]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:                      # not Linux: the environment variables must do
        return []
    return [ctypes.CDLL(p) for p in sorted(paths)]


def pin_blas_threads(n: int) -> None:
    """Use `n` BLAS threads in this process and in the processes it starts."""
    for var in ENV_VARS:
        os.environ[var] = str(n)
    if "numpy" in sys.modules:
        for lib in _loaded_openblas():
            for name in _SET:
                if hasattr(lib, name):
                    getattr(lib, name)(ctypes.c_int(n))
                    break


def blas_threads() -> int | None:
    """The thread count the loaded OpenBLAS reports, or None if it cannot be asked."""
    for lib in _loaded_openblas():
        for name in _GET:
            if hasattr(lib, name):
                return int(getattr(lib, name)())
    return None
