"""The one compiler setting for pydriftn's compiled kernels (numba).

A few inner loops of the per-CCD stages (trail pixel lists, template
evaluation, strip cutting, per-trail sums) build several million-entry
temporaries when written as numpy expressions; written as one loop each they
run several times faster, which is what lets a 60-CCD exposure be processed
faster than DECam takes it. Every kernel is compiled with :func:`jit`:

* ``cache=True``: compiled once per installation (in ``__pycache__`` beside
  the module, or numba's user cache when that is read-only), so pipeline
  workers and later runs load it instead of compiling again;
* ``nogil=True``: a dask worker's other threads keep running;
* ``error_model="numpy"``: a float division by zero gives inf/nan as in
  numpy (numba's default raises ZeroDivisionError, which turned a blank
  exposure into a failed unit instead of a reported skip);
* no ``fastmath`` and no ``parallel``: results follow IEEE arithmetic as the
  numpy versions did, and the pipeline parallelises over (exposure, CCD)
  units, one thread per worker.

Kernels keep the numpy semantics of the code they replace (tests compare
them with it); their module docstrings say which loop they replace and the
speed-up measured.
"""

from __future__ import annotations

import numba

__all__ = ["jit"]


def jit(*args, **kwargs):
    """``numba.njit`` with pydriftn's settings (``cache=True, nogil=True, error_model="numpy"``); bare or with a signature."""
    opts = dict(cache=True, nogil=True, error_model="numpy")
    opts.update(kwargs)
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return numba.njit(**opts)(args[0])
    return numba.njit(*args, **opts)
