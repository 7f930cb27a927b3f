"""Atomic writers: a product file is either complete or absent.

Each writer writes to a temporary file in the destination directory (named
``.<name>.<random>.tmp``, so an interrupted run's leftovers match the
``.*.tmp*`` pattern cleaned by :mod:`pydriftn.pipeline`), flushes and
``fsync``s it, then ``os.replace``s it onto the destination (atomic on POSIX
within one filesystem) and ``fsync``s the directory. On any error the
temporary file is removed and the destination is untouched. Input files are
never opened for writing by pydriftn; these writers are for outputs only.

``fsync=False`` keeps the write atomic (complete or absent after a killed
process) but leaves durability against a power loss to a later
:func:`fsync_paths` over a batch of files, which costs one flush instead of
two per file: a pipeline unit writes its products that way and its
``done.json`` record only after they are flushed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_table_atomic", "write_fits_atomic", "fsync_paths"]

log = logging.getLogger(__name__)

_TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_paths(paths) -> None:
    """Flush files (written with ``fsync=False``) and their directories to disk."""
    dirs = []
    for p in paths:
        p = Path(p)
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if p.parent not in dirs:
            dirs.append(p.parent)
    for d in dirs:
        _fsync_dir(d)


@contextmanager
def atomic_path(path, *, overwrite=True, fsync=True):
    """Context manager yielding a temporary path that replaces ``path`` on success.

    Write the complete file to the yielded path inside the ``with`` block; on
    normal exit it is fsynced and moved onto ``path``; on an exception it is
    deleted and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its directory is created if needed.
    overwrite : bool
        If False and ``path`` exists, raise FileExistsError.
    fsync : bool
        Flush the file and its directory (else see :func:`fsync_paths`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists and overwrite=False")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    log.debug("wrote %s", path)


def write_bytes_atomic(data: bytes, path, *, overwrite=True, fsync=True) -> Path:
    """Write ``data`` (bytes) to ``path`` atomically; returns the path (``fsync``: see :func:`atomic_path`)."""
    if isinstance(data, str):
        raise TypeError(f"{path}: write_bytes_atomic needs bytes, got str (encode it first)")
    with atomic_path(path, overwrite=overwrite, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_table_atomic(df, path, *, overwrite=True, index=False, fsync=True, **kwargs) -> Path:
    """Write a DataFrame to ``.csv`` or ``.parquet`` (``.pq``) atomically.

    Parameters
    ----------
    df : pandas.DataFrame
    path : str or os.PathLike
        The suffix chooses the format.
    overwrite : bool
    index : bool
        Write the index (default False).
    fsync : bool
        See :func:`atomic_path`.
    **kwargs
        Passed to ``DataFrame.to_csv`` / ``to_parquet``.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    fmt = _TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown table format {path.suffix!r}; expected one of {sorted(_TABLE_FORMATS)}"
        )
    if fmt == "parquet" and "use_dictionary" not in kwargs:
        kwargs["use_dictionary"] = _dictionary_columns(df)
    with atomic_path(path, overwrite=overwrite, fsync=fsync) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=index, **kwargs)
        else:
            df.to_parquet(tmp, index=index, **kwargs)
    return path


def _dictionary_columns(df):
    """Parquet dictionary encoding for every column but the floating-point ones (pyarrow's default: all).

    Keys, flags, counts and strings repeat and gain from a dictionary; measured
    floats are nearly all distinct, so their dictionary pages are wasted work
    (the light-curve store of a full-size unit: written ~3x faster and ~15 %
    smaller without them). Only the encoding differs: values and types are
    the same. ``True`` (all columns) where a column name is not a string.
    """
    import numpy as np

    names = list(df.columns)
    if not all(isinstance(c, str) for c in names):
        return True
    return [c for c, dt in zip(names, df.dtypes) if not (isinstance(dt, np.dtype) and dt.kind == "f")]


def write_fits_atomic(hdul, path, *, overwrite=True, checksum=False, output_verify="exception") -> Path:
    """Write an ``HDUList`` (or a single HDU) to ``path`` atomically.

    ``.fz`` destinations are written as given: pass ``CompImageHDU`` extensions
    to compress them.
    """
    from astropy.io import fits

    if isinstance(hdul, fits.hdu.base._BaseHDU):
        hdul = fits.HDUList([hdul] if isinstance(hdul, fits.PrimaryHDU) else [fits.PrimaryHDU(), hdul])
    with atomic_path(path, overwrite=overwrite) as tmp:
        hdul.writeto(tmp, overwrite=True, checksum=checksum, output_verify=output_verify)
    return Path(path)
