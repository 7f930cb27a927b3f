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

Night normalisation. The store's ``norm_flux`` has median 1 within each
exposure (the detrending divides every star-exposure by its own level), which
removes any brightening that lasts longer than an exposure. When the table
also has ``level_e_s`` (the star's flux level in that exposure, e-/s) the
series of star ``s`` in exposure ``e`` is put back on one scale over the
night::

    y = norm_flux * R[s, e] / c[e],   R[s, e] = level[s, e] / median_e level[s, e]

where ``c[e]`` is the median of ``R[s, e]`` over the good stars of the CCD in
that exposure (transparency and other changes common to all stars); the
errors are scaled by the same factor. Without ``level_e_s`` the per-exposure
normalisation is used as is.

Seeing. The optional ``lsf_fwhm_px`` column is the FWHM, in pixels (= samples
along the trail), of the exposure's line-spread function on that CCD: the
extraction's measured cross-track trail profile, i.e. the PSF integrated along
the trail, which is also the kernel that smears a series along the drift. It
is kept per exposure (:attr:`SeriesBlock.lsf_fwhm_px`, median over the block's
stars, NaN where absent); the fits convolve their models with a line-spread
function of that width (see :mod:`.fit`), falling back to a default where it
is NaN. :mod:`.fit` parametrises the kernel by the FWHM of a Moffat beta = 3
PSF, whose line-spread function is :data:`LSF_PER_PSF_FWHM` = 1.109 times
wider (the simulated 1.0" seeing, 3.7-3.8 px, gives 4.2-4.3 px in the store),
so :meth:`SeriesBlock.exposure_fwhm_px` divides the column by
``column_per_psf_fwhm``: the kernel then has the measured FWHM, and only the
shape of its wings is assumed.

The kernel along the drift is not quite the line-spread function, though: a
sample is the optimally weighted sum across the trail, and the cross-track
weights of a sky-limited star (its profile over the sky variance) favour the
core, where the PSF is narrower along the drift than its full integral. For
a Moffat beta = 3 PSF the kernel ``K(x) = int PSF(x, y) LSF(y) dy`` has a FWHM
of :data:`KERNEL_PER_PSF_FWHM` = 1.052 PSF FWHM, against 1.109 for the
line-spread function (bright stars, whose weights are flatter, lie between
the two). The default ``column_per_psf_fwhm`` is therefore
:data:`COLUMN_PER_KERNEL_FWHM` = ``LSF_PER_PSF_FWHM^2 / KERNEL_PER_PSF_FWHM``
(1.168): with it the fits' kernel, the line-spread function of the PSF the
conversion gives, has the FWHM of ``K``. Measured on the simulated flashes
on star trails of the image-level runs, a flash's free-width fit came out
0.94 times the width the plain line-spread function gave (0.955 predicted);
with that too wide kernel the fits of short events came out too short
(tE 0.85-0.95 of the truth at tE = 1-3 s) and events of tE = 1 s could not
be told from flashes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..errors import PydriftnError

__all__ = [
    "COLUMN_PER_KERNEL_FWHM",
    "KERNEL_PER_PSF_FWHM",
    "LSF_PER_PSF_FWHM",
    "EventSearchError",
    "SeriesBlock",
    "build_blocks",
    "default_bad_flag_mask",
    "flag_mask",
    "night_factors",
    "with_modified_rows",
    "REQUIRED_COLUMNS",
]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("star_id", "expnum", "sample", "mjd", "norm_flux", "norm_flux_err")
SECONDS_PER_DAY = 86400.0
#: FWHM of the line-spread function (the Moffat beta = 3 PSF integrated along one axis) over the PSF's FWHM:
#: ``sqrt(2^(2/5) - 1) / sqrt(2^(1/3) - 1)``. The store's ``lsf_fwhm_px`` is the former (module docstring).
LSF_PER_PSF_FWHM = float(np.sqrt(2.0 ** 0.4 - 1.0) / np.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
#: FWHM of the series' smoothing kernel along the drift, ``K(x) = int PSF(x, y) LSF(y) dy`` (optimal
#: extraction of a sky-limited star), over the FWHM of the Moffat beta = 3 PSF (numerical integral; module
#: docstring).
KERNEL_PER_PSF_FWHM = 1.05249
#: The store's ``lsf_fwhm_px`` over the FWHM of the PSF parameter whose line-spread function (what the fits
#: convolve with) has the FWHM of the kernel ``K``: ``LSF_PER_PSF_FWHM^2 / KERNEL_PER_PSF_FWHM``.
COLUMN_PER_KERNEL_FWHM = LSF_PER_PSF_FWHM ** 2 / KERNEL_PER_PSF_FWHM


class EventSearchError(PydriftnError, ValueError):
    """A light-curve, star, flash or parameter table cannot be used by the event search.

    The message names the table and the column, and what was expected.
    """


def default_bad_flag_mask() -> int:
    """Vetoing flag bits: ``COSMIC_RAY | SATELLITE | BLENDED | MASKED_PIXELS`` of
    :mod:`pydriftn.flags` if that module defines them, else every bit (``~0``:
    any nonzero flag excludes the sample).

    ``DEBLENDED`` samples (flux separated from a neighbour by a joint fit) are
    searched: their errors are honest (scatter/expected ~0.96 end to end).
    ``BLENDED`` marks every sample of a star too close to a neighbour to be
    de-blended: its series carries the neighbour's variations (leakage up to
    100x the star's own flux), so it is not searched.
    """
    return flag_mask(("COSMIC_RAY", "SATELLITE", "BLENDED", "MASKED_PIXELS"))


def flag_mask(names) -> int:
    """OR of the :mod:`pydriftn.flags` bits ``names`` (every bit, ``~0``, if the registry has none of them)."""
    try:
        from .. import flags as _flags  # noqa: PLC0415  (module written by another stage)
    except ImportError:
        return ~0
    mask = 0
    for name in names:
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
        ``norm_flux`` and ``norm_flux_err`` (0 / inf where absent), on the
        night scale if the table has ``level_e_s`` (module docstring).
    present : ndarray (S, N) bool
        The sample is in the table.
    flags : ndarray (S, N) int64
        The flag bitmask (0 where absent).
    valid : ndarray (S, N) bool
        Present, finite, positive error and no vetoing flag: used by the search.
    err_scale : ndarray (S,)
        Robust per-star-night error rescaling factor (1 if not rescaled; see
        :func:`build_blocks`).
    diff_ratio : float
        The block's median ratio of the difference-based to the
        residual-based scatter (adjacent-sample correlation; 1 if unknown).
    typical_scale : float
        Median error scale of the star-nights with at least
        :data:`MIN_SCALE_SAMPLES` valid samples (1 if unknown): the smallest
        scale given to a star-night with fewer.
    ybar : ndarray (S,)
        Weighted mean of the valid samples (the flat-model fit).
    lsf_fwhm_px : ndarray (E,)
        Seeing FWHM of each exposure (px = samples along the trail; median of
        the ``lsf_fwhm_px`` column over the block's rows), NaN if unknown.
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
    diff_ratio: float = 1.0
    lsf_fwhm_px: np.ndarray = field(default=None)
    typical_scale: float = 1.0

    @property
    def n_stars(self) -> int:
        return len(self.star_id)

    @property
    def n_grid(self) -> int:
        return self.y.shape[1]

    @property
    def weights(self) -> np.ndarray:
        """Inverse variances with the rescaled errors; 0 for invalid samples."""
        return self.row_weights(slice(None))

    def row_weights(self, rows) -> np.ndarray:
        """:attr:`weights` of star rows ``rows`` only (an index or a slice)."""
        w = np.zeros_like(self.y[rows])
        e = self.err[rows] * np.expand_dims(self.err_scale[rows], -1)
        np.divide(1.0, e * e, out=w, where=self.valid[rows])
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

    def exposure_fwhm_px(self, default: float, column_per_psf_fwhm: float = COLUMN_PER_KERNEL_FWHM) -> np.ndarray:
        """PSF FWHM (px) of every exposure: the ``lsf_fwhm_px`` column / ``column_per_psf_fwhm`` (module
        docstring), ``default`` (a PSF FWHM) where unknown (NaN, non-positive or no column)."""
        fw = self.lsf_fwhm_px if self.lsf_fwhm_px is not None else np.full(len(self.expnum), np.nan)
        fw = np.asarray(fw, float) / float(column_per_psf_fwhm)
        return np.where(np.isfinite(fw) & (fw > 0), fw, float(default))

    def sample_windows(self, i: int, idx, sample_s: float):
        """Shutter open and close time (mjd) of the exposures of star row ``i``'s grid columns ``idx``.

        Sample ``k`` of an exposure covers ``[k, k + 1] * sample_s`` after the
        shutter opened (docs/DESIGN.md), so the opening is ``mjd - (k + 1/2)
        sample_s`` (median over the star's samples of that exposure) and the
        closing :meth:`exposure_samples` ``* sample_s`` later.
        """
        idx = np.asarray(idx, dtype=np.int64)
        k = self.samples_per_exposure
        n_exp = self.exposure_samples()
        e = idx // k
        row = self.mjd[i]
        col = np.arange(row.size)
        open_all = row - (col % k + 0.5) * sample_s / SECONDS_PER_DAY
        lo = np.full(idx.size, np.nan)
        for ee in np.unique(e):
            seg = open_all[ee * k:(ee + 1) * k]
            seg = seg[np.isfinite(seg)]
            lo[e == ee] = np.median(seg) if seg.size else np.nan
        return lo, lo + n_exp * sample_s / SECONDS_PER_DAY

    def exposure_samples(self) -> int:
        """Samples of a whole exposure, shutter open to close: ``max k + 1 + min k`` over the block's present
        samples (the pipeline leaves out as many shutter-ramp samples at the end as at the start; a table
        with every sample gives ``samples_per_exposure``). Cached on the block."""
        cached = getattr(self, "_exposure_samples", None)
        if cached is None:
            cols = np.flatnonzero(self.present.any(axis=0)) % self.samples_per_exposure
            cached = int(cols.max() + 1 + cols.min()) if cols.size else self.samples_per_exposure
            self._exposure_samples = cached
        return cached

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


#: The error scale of a star-night is the scatter of its residuals about the flat mean, but at most this
#: many times its sample-to-sample scatter (see :func:`build_blocks`).
MAX_SLOW_SCALE = 2.0


def _diff_scale(y, err, valid, k, min_pairs: int = 10):
    """1.4826 × MAD of the normalised differences of consecutive samples of an exposure, per row.

    ``(y[j+1] - y[j]) / sqrt(err[j]^2 + err[j+1]^2)`` for valid neighbours
    inside one exposure (``k`` samples per exposure): insensitive to anything
    slower than a sample (a long event, a variable star, a level change
    between exposures), unlike the residuals about the flat mean. NaN for rows
    with fewer than ``min_pairs`` pairs.
    """
    import warnings

    n = y.shape[1]
    same = (np.arange(n - 1) % k) != k - 1
    ok = valid[:, :-1] & valid[:, 1:] & same[None, :]
    with np.errstate(all="ignore"):
        d = np.where(ok, (y[:, 1:] - y[:, :-1]) / np.sqrt(err[:, 1:] ** 2 + err[:, :-1] ** 2), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(d, axis=1)
        s = 1.4826 * np.nanmedian(np.abs(d - med[:, None]), axis=1)
    s[(ok.sum(axis=1) < min_pairs) | ~(s > 0)] = np.nan
    return s


#: A star-night needs at least this many valid samples for its own error scale to be trusted below the
#: block's typical one: the 1.4826 MAD of n residuals has a relative error ~1.1 / sqrt(n), and a scale
#: measured too small from a handful of samples multiplies the star's statistic by 1 / scale^2 (a star with 3
#: valid samples of 111 got 0.26, and its Gaussian null realisations, scaled the same way, reached
#: Delta-chi2 1350 and raised the night's threshold from 40 to 7300). With fewer samples the scale is at
#: least the typical one (:attr:`SeriesBlock.typical_scale`).
MIN_SCALE_SAMPLES = 20


def _typical_scale(scale, valid):
    """Median scale of the rows with at least :data:`MIN_SCALE_SAMPLES` valid samples (1 with fewer than 5)."""
    good = (valid.sum(axis=1) >= MIN_SCALE_SAMPLES) & np.isfinite(scale) & (scale > 0)
    return float(np.median(scale[good])) if good.sum() >= 5 else 1.0


def _error_scale(y, err, valid, ybar, k, diff_ratio=None, typical=None):
    """Per-row error scale and the block's ``diff_ratio`` (see :func:`build_blocks`).

    Rows with fewer than :data:`MIN_SCALE_SAMPLES` valid samples get at least
    ``typical`` (default: :func:`_typical_scale` of these rows).
    """
    s_res = _robust_scale(y, err, valid, ybar)
    s_diff = _diff_scale(y, err, valid, k)
    if diff_ratio is None:
        both = np.isfinite(s_diff) & valid.any(axis=1)
        diff_ratio = float(np.median(s_diff[both] / s_res[both])) if both.sum() >= 5 else 1.0
        diff_ratio = float(np.clip(diff_ratio, 0.5, 1.5)) if np.isfinite(diff_ratio) else 1.0
    scale = np.where(np.isfinite(s_diff), np.minimum(s_res, MAX_SLOW_SCALE * s_diff / diff_ratio), s_res)
    few = valid.sum(axis=1) < MIN_SCALE_SAMPLES
    if few.any():
        if typical is None:
            typical = _typical_scale(scale, valid)
        scale = np.where(few, np.maximum(scale, typical), scale)
    return scale, diff_ratio


def _weighted_mean(y, err, valid, scale):
    w = np.zeros_like(y)
    e = err * scale[:, None]
    np.divide(1.0, e * e, out=w, where=valid)
    wt = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (w * np.where(valid, y, 0.0)).sum(axis=1) / wt
    m[~np.isfinite(m)] = 1.0
    return m


def _weighted_median(x, w):
    """Weighted median of the finite ``x`` (weights ``w`` > 0); NaN if none."""
    ok = np.isfinite(x) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return np.nan
    x, w = x[ok], w[ok]
    o = np.argsort(x)
    cw = np.cumsum(w[o])
    return float(x[o][np.searchsorted(cw, 0.5 * cw[-1])])


def night_factors(level, level_err, good, *, min_stars: int = 3, floor: float = 0.002, n_iter: int = 10):
    """Per star-exposure factors ``R[s, e] / c[e]`` that put ``norm_flux`` on one scale over the night.

    The common per-exposure factor ``c[e]`` (transparency, anything common to
    the CCD's stars) comes from the two-way model ``log level[s, e] = a[s] +
    log c[e]`` over the good star-exposures: ``a[s]`` is the star's mean over
    its exposures, ``log c[e]`` the weighted median over stars (weights
    ``1 / (level_err^2 + floor^2)``, so that bright stars dominate but no
    handful of them alone), iterated. (The plain median over stars of
    ``level / median-level`` is degenerate with few exposures: each star's
    median exposure has a ratio of exactly 1, a point mass that pins the median
    to 1.) Then ``R[s, e] / c[e] = (level / c) / median_e(level / c)``: the
    median over the night, so a long event in some exposures does not move the
    star's baseline much.

    Parameters
    ----------
    level : ndarray (S, E)
        ``level_e_s`` per star-exposure (NaN where absent).
    level_err : ndarray (S, E)
        Relative 1-sigma uncertainty of each level (NaN where unknown).
    good : ndarray (S, E) bool
        Star-exposures with enough valid samples to define ``c[e]``.
    min_stars : int
        Exposures with fewer good stars get ``c[e] = 1``.
    floor : float
        Relative systematic floor added to ``level_err`` in the weights.
    n_iter : int
        Iterations of the two-way fit.

    Returns
    -------
    factor : ndarray (S, E)
        NaN where the star has no positive finite level in that exposure (such
        samples cannot be placed on the night scale).
    c : ndarray (E,)
        The common factors (median 1 over the exposures).
    """
    import warnings

    lev = np.where(np.isfinite(level) & (level > 0), level, np.nan)
    n_s, n_e = lev.shape
    logl = np.log(lev)
    multi = (np.isfinite(lev).sum(axis=1) >= 2)[:, None]
    use = good & multi & np.isfinite(logl)
    sig = np.where(np.isfinite(level_err) & (level_err >= 0), level_err, np.inf)
    wt = np.where(use, 1.0 / (sig * sig + floor * floor), 0.0)
    n_ref = use.sum(axis=0)
    fit_e = n_ref >= min_stars
    logc = np.zeros(n_e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n_iter if fit_e.any() else 0):
            a = np.nanmean(np.where(use, logl - logc[None, :], np.nan), axis=1)
            new = np.array([_weighted_median(logl[:, e] - a, wt[:, e]) if fit_e[e] else 0.0 for e in range(n_e)])
            new = np.where(np.isfinite(new), new, 0.0)
            new[fit_e] -= np.median(new[fit_e])
            done = np.max(np.abs(new - logc)) < 1e-7
            logc = new
            if done:
                break
        c = np.exp(logc)
        corr = lev / c[None, :]
        factor = corr / np.nanmedian(corr, axis=1)[:, None]
    return factor, c


def build_blocks(lc: pd.DataFrame, *, bad_flag_mask: int | None = None, rescale_errors: bool = True,
                 table: str = "light-curve table") -> list[SeriesBlock]:
    """Split a long light-curve table into dense per-(night, ccd) :class:`SeriesBlock` s.

    Parameters
    ----------
    lc : pandas.DataFrame
        Columns ``star_id, expnum, sample, mjd, norm_flux, norm_flux_err`` and
        optionally ``night``, ``ccd`` (group keys), ``flags`` (int bitmask) and
        ``level_e_s`` (the star's level in the exposure: night normalisation,
        see the module docstring).
    bad_flag_mask : int, optional
        Samples with ``flags & bad_flag_mask != 0`` are excluded (default:
        :func:`default_bad_flag_mask`).
    rescale_errors : bool
        Multiply each star-night's errors by its robust normalised scatter, so
        that the detection statistic has the same null distribution for every
        star even if the pipeline errors are mis-estimated; the fits use the
        same rescaled errors. The scatter is 1.4826 × MAD of the normalised
        residuals about the flat mean (it includes the level changes between
        exposures that the pipeline gets wrong for some stars, e.g. de-blended
        faint ones), but at most :data:`MAX_SLOW_SCALE` times the
        sample-to-sample scatter: 1.4826 × MAD of the normalised differences of
        consecutive samples of an exposure, divided by the block's median ratio
        of the two (adjacent samples of the pipeline are positively correlated:
        ratio ~0.83; 1 for white noise). Without the cap a long event, which
        makes most residuals about the flat mean large, would inflate its own
        errors ~10-fold and lose ~100x in Delta-chi2. A star-night with fewer
        than :data:`MIN_SCALE_SAMPLES` valid samples gets at least the block's
        typical scale (its own is too noisy to shrink its errors by).
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


#: A star-exposure whose mean level is below this fraction of the star's median exposure level, by more than
#: LOST_SIGMA of its error, is excluded from the search (``_lost_exposures``).
LOST_FRACTION = 0.3
LOST_SIGMA = 5.0


def _lost_exposures(y, err, valid, k) -> np.ndarray:
    """Star-exposures (S, E) in which the star lost most of its flux: an extraction failure, not the sky.

    Microlensing and flares only brighten a star, and no common variable
    star fades by 70 % within 48 s and recovers; a de-blended star whose
    split with a neighbour failed in one exposure (all the light given to
    the neighbour, e.g. next to a bright flash) does, and the search then saw
    its other exposures as a long brightening (an image-level false positive
    of a de-blended r = 20.8 star: exposure levels 0.91, 1.02, -0.16). Such
    an exposure (mean below :data:`LOST_FRACTION` of the star's median
    exposure mean, by more than :data:`LOST_SIGMA` of its error) is left out.
    """
    n_s = y.shape[0]
    n_e = y.shape[1] // k
    w = np.where(valid, 1.0 / np.where(valid, err, 1.0) ** 2, 0.0).reshape(n_s, n_e, k)
    wt = w.sum(axis=2)
    with np.errstate(all="ignore"):
        m = (w * np.where(valid, y, 0.0).reshape(n_s, n_e, k)).sum(axis=2) / wt
        e = 1.0 / np.sqrt(wt)
    ok = wt > 0
    if n_e < 2 or not ok.any():
        return np.zeros((n_s, n_e), bool)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.where(ok, m, np.nan), axis=1)
    med = np.where(np.isfinite(med), med, 0.0)[:, None]
    return ok & (ok.sum(axis=1) >= 2)[:, None] & (med > 0) & (m < LOST_FRACTION * med) \
        & ((med - m) > LOST_SIGMA * e)


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
    psf_fwhm = np.full(len(expnums), np.nan)
    if "lsf_fwhm_px" in df.columns:
        fw = pd.to_numeric(df["lsf_fwhm_px"], errors="coerce").to_numpy(float)
        ok = np.isfinite(fw) & (fw > 0)
        if ok.any():
            med = pd.Series(fw[ok]).groupby(e_codes[ok]).median()
            psf_fwhm[med.index.to_numpy()] = med.to_numpy()
    if "level_e_s" in df.columns:
        n_e = len(expnums)
        level = np.full((n_s, n_e), np.nan)
        level[star_codes, e_codes] = df["level_e_s"].to_numpy(float)
        v3 = valid.reshape(n_s, n_e, k)
        n_v = v3.sum(axis=2)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med_err = np.nanmedian(np.where(v3, err.reshape(n_s, n_e, k), np.nan), axis=2)
            level_err = 1.2533 * med_err / np.sqrt(np.maximum(n_v, 1))  # error of a median of n_v samples
        factor, c = night_factors(level, level_err, n_v >= max(3, k // 3))
        log.debug("block night=%s ccd=%s: common per-exposure factors %s", night, ccd, np.round(c, 4))
        f = np.repeat(factor, k, axis=1)  # (S, E*K), column e*K + k
        with np.errstate(invalid="ignore"):
            y = y * f
            err = err * f
        ok = np.isfinite(f)
        n_lost = int((valid & ~ok).sum())
        if n_lost:
            log.debug("block night=%s ccd=%s: %d samples without a usable level_e_s excluded", night, ccd, n_lost)
        valid &= ok
        err[~np.isfinite(err)] = np.inf
    y[~np.isfinite(y)] = 0.0
    lost = _lost_exposures(y, err, valid, k)
    if lost.any():
        log.debug("block night=%s ccd=%s: %d star-exposures that lost most of the star's flux excluded",
                  night, ccd, int(lost.sum()))
        valid &= ~np.repeat(lost, k, axis=1)
    scale = np.ones(n_s)
    ybar = _weighted_mean(y, err, valid, scale)
    diff_ratio, typical = 1.0, 1.0
    if rescale_errors:
        scale, diff_ratio = _error_scale(y, err, valid, ybar, k)
        typical = _typical_scale(scale, valid)
        ybar = _weighted_mean(y, err, valid, scale)
    n_bad = int((present & ~valid).sum())
    log.debug("block night=%s ccd=%s: %d stars x %d exposures x %d samples, %d samples excluded",
              night, ccd, n_s, len(expnums), k, n_bad)
    return SeriesBlock(night=night, ccd=ccd, star_id=np.asarray(star_ids), expnum=expnums,
                       samples_per_exposure=k, mjd=mjd, y=y, err=err, present=present, flags=flags,
                       valid=valid, err_scale=scale, ybar=ybar, rescale_errors=rescale_errors,
                       diff_ratio=diff_ratio, lsf_fwhm_px=psf_fwhm, typical_scale=typical)


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
        s1, _ = _error_scale(y[rows], err[rows], sub_valid, yb, block.samples_per_exposure, block.diff_ratio,
                             typical=block.typical_scale)
        yb = _weighted_mean(y[rows], err[rows], sub_valid, s1)
    scale[rows] = s1
    ybar[rows] = yb
    return replace(block, y=y, err=err, err_scale=scale, ybar=ybar)
