"""Light-curve tables to dense per-(night, CCD) series blocks.

The light-curve store is a long table (one row per star × exposure × sample).
The search needs, for every star of a CCD-night, its samples in time order
across the exposures of the night. Because sample ``k`` of every star on a CCD
refers to the same instant (see docs/DESIGN.md), the natural container is a
dense ``(n_stars, n_exposures * samples_per_exposure)`` grid per (night, ccd):
column ``e * K + k`` is sample ``k`` of the ``e``-th exposure of the night
(exposures ordered by time). Missing or flag-vetoed samples get zero weight.
The true ``mjd`` of every sample is kept, so models are evaluated at the real
times (the 28 s gaps between exposures are respected); the grid index is only
used by the matched-filter scan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import PydriftnError

__all__ = [
    "EventSearchError",
    "SeriesBlock",
    "build_blocks",
    "default_bad_flag_mask",
    "with_modified_rows",
    "REQUIRED_COLUMNS",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("star_id", "expnum", "sample", "mjd", "norm_flux", "norm_flux_err")
SECONDS_PER_DAY = 86400.0


class EventSearchError(PydriftnError, ValueError):
    """A light-curve, star, flash or parameter table cannot be used by the event search.

    The message names the table and the column, and what was expected.
    """


def default_bad_flag_mask() -> int:
    """Vetoing flag bits: ``COSMIC_RAY | SATELLITE | DEBLENDED | MASKED_PIXELS`` of
    :mod:`pydriftn.flags` if that module defines them, else every bit (``~0``:
    any nonzero flag excludes the sample)."""
    try:
        from .. import flags as _flags  # noqa: PLC0415  (module written by another stage)
    except ImportError:
        return ~0
    mask = 0
    for name in ("COSMIC_RAY", "SATELLITE", "DEBLENDED", "MASKED_PIXELS"):
        mask |= int(getattr(_flags, name, 0))
    return mask if mask else ~0


def check_columns(df: pd.DataFrame, required, table: str) -> None:
    """Raise :class:`EventSearchError` naming the missing columns of ``table``."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise EventSearchError(
            f"{table}: missing column(s) {missing}; expected at least {list(required)} "
            f"(got {list(df.columns)})"
        )


@dataclass
class SeriesBlock:
    """All star series of one (night, ccd), on a dense sample grid.

    Attributes
    ----------
    night, ccd
        Group keys (``None`` if the table has no such column).
    star_id : ndarray (S,)
        Star identifiers, row order of the 2-D arrays.
    expnum : ndarray (E,)
        Exposure numbers in time order.
    samples_per_exposure : int
        ``K``; column ``e * K + k`` is sample ``k`` of exposure ``expnum[e]``.
    mjd : ndarray (S, N)
        True time of each sample (NaN where absent).
    y, err : ndarray (S, N)
        ``norm_flux`` and ``norm_flux_err`` (0 / inf where absent).
    present : ndarray (S, N) bool
        The sample is in the table.
    flags : ndarray (S, N) int64
        The flag bitmask (0 where absent).
    valid : ndarray (S, N) bool
        Present, finite, positive error and no vetoing flag: used by the search.
    err_scale : ndarray (S,)
        Robust per-star-night error rescaling factor (1 if not rescaled).
    ybar : ndarray (S,)
        Weighted mean of the valid samples (the flat-model fit).
    """

    night: object
    ccd: object
    star_id: np.ndarray
    expnum: np.ndarray
    samples_per_exposure: int
    mjd: np.ndarray
    y: np.ndarray
    err: np.ndarray
    present: np.ndarray
    flags: np.ndarray
    valid: np.ndarray
    err_scale: np.ndarray = field(default=None)
    ybar: np.ndarray = field(default=None)
    rescale_errors: bool = True

    @property
    def n_stars(self) -> int:
        return len(self.star_id)

    @property
    def n_grid(self) -> int:
        return self.y.shape[1]

    @property
    def weights(self) -> np.ndarray:
        """Inverse variances with the rescaled errors; 0 for invalid samples."""
        w = np.zeros_like(self.y)
        e = self.err * self.err_scale[:, None]
        np.divide(1.0, e * e, out=w, where=self.valid)
        return w

    @property
    def grid_mjd(self) -> np.ndarray:
        """Median time of every grid column over the stars (NaN if no star has it)."""
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmedian(self.mjd, axis=0)

    def sample_duration_s(self) -> float:
        """Typical time between consecutive samples of an exposure (seconds)."""
        d = np.diff(self.mjd, axis=1) * SECONDS_PER_DAY
        d = d[np.isfinite(d) & (d > 0)]
        if d.size == 0:
            return 0.54
        return float(np.median(d))

    def star_series(self, i: int, include_invalid: bool = False):
        """Time-ordered samples of star row ``i``: (mjd, y, err*scale, flags, valid, grid index)."""
        sel = self.present[i] if include_invalid else self.valid[i]
        idx = np.flatnonzero(sel)
        return (
            self.mjd[i, idx],
            self.y[i, idx],
            self.err[i, idx] * self.err_scale[i],
            self.flags[i, idx],
            self.valid[i, idx],
            idx,
        )


def _robust_scale(y, err, valid, ybar):
    """1.4826 × MAD of the normalised residuals per row (1 where undefined).

    Rows without missing samples use the fast ``np.median``; the others
    ``np.nanmedian``.
    """
    r = np.where(valid, (y - ybar[:, None]) / np.where(valid, err, 1.0), np.nan)
    s = np.ones(len(r))
    full = valid.all(axis=1)
    if full.any():
        rf = r[full]
        med = np.median(rf, axis=1)
        s[full] = 1.4826 * np.median(np.abs(rf - med[:, None]), axis=1)
    part = ~full & valid.any(axis=1)
    if part.any():
        import warnings

        rp = r[part]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(rp, axis=1)
            s[part] = 1.4826 * np.nanmedian(np.abs(rp - med[:, None]), axis=1)
    s[~np.isfinite(s) | (s <= 0)] = 1.0
    return s


def _weighted_mean(y, err, valid, scale):
    w = np.zeros_like(y)
    e = err * scale[:, None]
    np.divide(1.0, e * e, out=w, where=valid)
    wt = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (w * np.where(valid, y, 0.0)).sum(axis=1) / wt
    m[~np.isfinite(m)] = 1.0
    return m


def build_blocks(lc: pd.DataFrame, *, bad_flag_mask: int | None = None, rescale_errors: bool = True,
                 table: str = "light-curve table") -> list[SeriesBlock]:
    """Split a long light-curve table into dense per-(night, ccd) :class:`SeriesBlock` s.

    Parameters
    ----------
    lc : pandas.DataFrame
        Columns ``star_id, expnum, sample, mjd, norm_flux, norm_flux_err`` and
        optionally ``night``, ``ccd`` (group keys) and ``flags`` (int bitmask).
    bad_flag_mask : int, optional
        Samples with ``flags & bad_flag_mask != 0`` are excluded (default:
        :func:`default_bad_flag_mask`).
    rescale_errors : bool
        Multiply each star-night's errors by the robust scatter of its
        normalised residuals (1.4826 × MAD), so that the detection statistic has
        the same null distribution for every star even if the pipeline errors are
        mis-estimated. The fits use the same rescaled errors.
    table : str
        Name of the table in error messages.

    Returns
    -------
    list of SeriesBlock

    Raises
    ------
    EventSearchError
        If a required column is missing or ``sample`` is negative.
    """
    check_columns(lc, REQUIRED_COLUMNS, table)
    if bad_flag_mask is None:
        bad_flag_mask = default_bad_flag_mask()
    if len(lc) == 0:
        return []
    keys = [k for k in ("night", "ccd") if k in lc.columns]
    groups = lc.groupby(keys, sort=True, dropna=False) if keys else [((), lc)]
    blocks = []
    for key, df in groups:
        key = key if isinstance(key, tuple) else (key,)
        kd = dict(zip(keys, key))
        blocks.append(_one_block(df, kd.get("night"), kd.get("ccd"), bad_flag_mask, rescale_errors, table))
    return blocks


def _one_block(df, night, ccd, bad_flag_mask, rescale_errors, table) -> SeriesBlock:
    sample = df["sample"].to_numpy()
    if np.any(sample < 0):
        raise EventSearchError(f"{table}: column 'sample' has negative values; expected 0-based sample index")
    sample = sample.astype(np.int64)
    star_codes, star_ids = pd.factorize(df["star_id"], sort=True)
    exp_time = df.groupby("expnum")["mjd"].median().sort_values()
    expnums = exp_time.index.to_numpy()
    exp_index = pd.Series(np.arange(len(expnums)), index=expnums)
    e_codes = exp_index.reindex(df["expnum"].to_numpy()).to_numpy()
    k = int(sample.max()) + 1
    n_s, n_g = len(star_ids), len(expnums) * k
    pos = e_codes * k + sample

    mjd = np.full((n_s, n_g), np.nan)
    y = np.zeros((n_s, n_g))
    err = np.full((n_s, n_g), np.inf)
    present = np.zeros((n_s, n_g), bool)
    flags = np.zeros((n_s, n_g), np.int64)
    mjd[star_codes, pos] = df["mjd"].to_numpy(float)
    yy = df["norm_flux"].to_numpy(float)
    ee = df["norm_flux_err"].to_numpy(float)
    y[star_codes, pos] = yy
    err[star_codes, pos] = ee
    present[star_codes, pos] = True
    if "flags" in df.columns:
        flags[star_codes, pos] = df["flags"].fillna(0).to_numpy().astype(np.int64)
    valid = present & np.isfinite(y) & np.isfinite(err) & (err > 0) & ((flags & int(bad_flag_mask)) == 0)
    y[~np.isfinite(y)] = 0.0
    scale = np.ones(n_s)
    ybar = _weighted_mean(y, err, valid, scale)
    if rescale_errors:
        scale = _robust_scale(y, err, valid, ybar)
        ybar = _weighted_mean(y, err, valid, scale)
    n_bad = int((present & ~valid).sum())
    log.debug("block night=%s ccd=%s: %d stars x %d exposures x %d samples, %d samples excluded",
              night, ccd, n_s, len(expnums), k, n_bad)
    return SeriesBlock(night=night, ccd=ccd, star_id=np.asarray(star_ids), expnum=expnums,
                       samples_per_exposure=k, mjd=mjd, y=y, err=err, present=present, flags=flags,
                       valid=valid, err_scale=scale, ybar=ybar, rescale_errors=rescale_errors)


def with_modified_rows(block: SeriesBlock, rows, y_rows, err_rows) -> SeriesBlock:
    """Copy of ``block`` where star rows ``rows`` get new ``y`` and ``err`` (mean and error scale redone).

    Only ``y``, ``err``, ``ybar`` and ``err_scale`` are copied; the other
    arrays are shared with ``block`` (read-only by convention).
    """
    rows = np.asarray(rows, dtype=np.int64)
    y = block.y.copy()
    err = block.err.copy()
    y[rows] = y_rows
    err[rows] = err_rows
    scale = block.err_scale.copy()
    ybar = block.ybar.copy()
    sub_valid = block.valid[rows]
    s1 = np.ones(len(rows))
    yb = _weighted_mean(y[rows], err[rows], sub_valid, s1)
    if block.rescale_errors:
        s1 = _robust_scale(y[rows], err[rows], sub_valid, yb)
        yb = _weighted_mean(y[rows], err[rows], sub_valid, s1)
    scale[rows] = s1
    ybar[rows] = yb
    return replace(block, y=y, err=err, err_scale=scale, ybar=ybar)
