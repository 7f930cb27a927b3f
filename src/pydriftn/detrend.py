"""Removal of the common tracking/atmosphere pattern from per-sample series.

Along-track tracking jitter and transparency changes multiply every star of a
CCD by the same function of time (sample ``k`` of every star is the same
instant). Two estimators of that pattern are provided:

``ensemble`` (default)
    Each reference star's series is divided by its own level (median over the
    full-illumination samples); the pattern is the iteratively clipped,
    inverse-variance weighted mean of these relative series at each sample
    (the clipping starts from their per-sample median, so that a few bright
    varying references cannot capture it).
    References are bright, unsaturated, unflagged, isolated stars; the weights
    include each star's excess (intrinsic) variance, so variable or noisy
    references are down-weighted, and references whose scatter is far above
    their noise are dropped. A reference star is normalised by the pattern
    computed *without* itself (leave-one-out, obtained in O(1) per star from
    the weighted sums), so its own variability cannot leak into the pattern
    that divides it. The pattern's uncertainty is propagated.

``best_star`` (the original pydriftn 0.1.4 method, kept for comparison)
    Each star is divided by the single reference whose relative series
    correlates best with its own; references with cosmic-ray-flagged samples
    are skipped.

Invariant (a bug of the original that must be impossible here): every star
that is not flagged gets a finite, positive level, so its normalised series
has median ≈ 1 — never NaN, zero or negative. Stars with fewer than
``min_valid`` usable samples are kept and flagged FEW_VALID_SAMPLES; stars
whose level is not positive (too faint) are kept and flagged NOT_NORMALISED;
their normalised series are NaN.

Also provides the output-table builders (wide CSV in the original layout,
long table for Parquet, per-star summary).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pydriftn.extract import flagbits as fb

__all__ = [
    "DetrendResult",
    "normalise",
    "common_pattern",
    "best_star_normalise",
    "long_table",
    "long_columns",
    "wide_table",
    "star_table",
    "extract_table_filename",
    "LONG_COLUMNS",
]

log = logging.getLogger(__name__)

#: Columns of the long-format table.
LONG_COLUMNS = ["star_id", "expnum", "ccd", "sample", "mjd", "t_s", "flux", "flux_err", "norm_flux",
                "norm_flux_err", "n_masked", "flags"]

_MAD = 1.4826
#: Sample flags that keep a sample out of the reference ensemble.
ENSEMBLE_EXCLUDE = fb.NO_DATA | fb.MASKED_PIXELS | fb.SATURATED | fb.COSMIC_RAY | fb.OUTLIER_PIXELS | fb.OFF_IMAGE
#: Sample flags that make a sample unusable altogether.
UNUSABLE = fb.NO_DATA


def extract_table_filename(expnum) -> str:
    """File name of the wide extraction table (``driftextract-exp_{EXPNUM}.csv``)."""
    return f"driftextract-exp_{expnum}.csv"


@dataclass
class DetrendResult:
    """Normalised series (arrays ``(S, K)``) and the common pattern.

    Attributes
    ----------
    norm_flux, norm_flux_err : ndarray
        Series divided by the common pattern and by the star's level (median ≈ 1).
    pattern, pattern_err : ndarray (K,)
        The common multiplicative pattern (median 1 over the full-illumination
        samples) from all references, and its uncertainty.
    level : ndarray (S,)
        Star level (e-/s): median over valid full-illumination samples of
        ``flux / pattern``; NaN for flagged stars.
    star_flags : ndarray (S,) of int32
    flags : ndarray (S, K) of int32
        Sample flags (input flags, plus star-level flags broadcast).
    is_reference : ndarray (S,) of bool
    weight : ndarray (S,)
        Mean ensemble weight of each reference (0 for others).
    reference_id : ndarray (S,)
        ``best_star``: index of the reference used for each star (-1 if none).
    scatter, expected, noise_ratio : ndarray (S,)
        Robust scatter of the normalised series about its median over valid
        full-illumination samples, its expected value (median ``norm_flux_err``)
        and their ratio.
    n_valid : ndarray (S,)
    method : str
    """

    norm_flux: np.ndarray
    norm_flux_err: np.ndarray
    pattern: np.ndarray
    pattern_err: np.ndarray
    level: np.ndarray
    star_flags: np.ndarray
    flags: np.ndarray
    is_reference: np.ndarray
    weight: np.ndarray
    reference_id: np.ndarray
    scatter: np.ndarray
    expected: np.ndarray
    noise_ratio: np.ndarray
    n_valid: np.ndarray
    method: str
    extras: dict = field(default_factory=dict)


def _nanmedian_cols(a, m):
    """Median of each column over mask ``m`` (NaN when empty)."""
    return _nanmedian_rows(np.asarray(a).T, np.asarray(m).T)


def _nanmedian_rows(a, m):
    """Median of each row over mask ``m`` (NaN when empty), vectorised.

    The same values as ``np.nanmedian(np.where(m, a, nan), axis=1)``, by one
    sort of the rows (NaN sort last) instead of numpy's masked-array path for
    short rows, which is several times slower.
    """
    x = np.where(m, a, np.nan).astype(np.float64, copy=False)
    if x.ndim != 2:
        raise ValueError(f"_nanmedian_rows: expected a 2-d array, got shape {x.shape}")
    x.sort(axis=1)
    n = x.shape[1] - np.count_nonzero(np.isnan(x), axis=1)
    rows = np.arange(x.shape[0])
    if x.shape[1] == 0:
        return np.full(x.shape[0], np.nan)
    lo = x[rows, np.maximum((n - 1) // 2, 0)]
    hi = x[rows, np.maximum(n // 2, 0)]
    with np.errstate(all="ignore"):
        med = 0.5 * (lo + hi)
        med = np.where(lo == hi, lo, med)  # exact for equal halves (and infinities)
    return np.where(n > 0, med, np.nan)


def _robust_std_rows(a, m):
    med = _nanmedian_rows(a, m)
    return _MAD * _nanmedian_rows(np.abs(a - med[:, None]), m)


def common_pattern(rel, rel_err, use, *, clip_sigma=4.0, n_iter=4, max_noise_ratio=3.0, max_clipped_fraction=0.5):
    """Clipped, inverse-variance weighted mean of relative series, with leave-one-out.

    Parameters
    ----------
    rel : ndarray (R, K)
        Reference series divided by their levels.
    rel_err : ndarray (R, K)
        Their uncertainties.
    use : ndarray of bool (R, K)
        Samples allowed in the ensemble.
    clip_sigma : float
        Per-sample clipping threshold.
    n_iter : int
        Clipping / excess-variance iterations.
    max_noise_ratio : float
        References whose robust residual scatter exceeds this many times their
        noise are dropped (variables).
    max_clipped_fraction : float
        References with more than this fraction of their samples clipped are
        dropped (variables whose light curve crosses the pattern).

    Returns
    -------
    dict with ``pattern (K,)``, ``pattern_err (K,)``, ``loo (R, K)``,
    ``loo_err (R, K)``, ``weight (R, K)`` (final weights, 0 = unused),
    ``kept (R,)``, ``excess (R,)``.
    """
    R, K = rel.shape
    rel = np.where(use, rel, 0.0)
    var = np.where(use, rel_err**2, np.inf)
    excess = np.zeros(R)
    kept = use.any(axis=1)
    clipped = np.zeros((R, K), bool)
    pattern = np.ones(K)
    for it in range(n_iter + 1):
        ok = use & kept[:, None] & ~clipped
        w = np.where(ok, 1.0 / (var + excess[:, None]), 0.0)
        sw = w.sum(axis=0)
        if it == 0:
            # start from the per-sample median, not the weighted mean: one bright reference with an event (its
            # relative series a ramp 2 -> 0.6 over the exposure, errors 0.3 %) outweighs the others, pulls the
            # mean onto itself, and the clipping then rejects every other reference instead of it
            pattern = _nanmedian_cols(rel, ok)
        else:
            pattern = np.where(sw > 0, (w * rel).sum(axis=0) / np.where(sw > 0, sw, 1.0), np.nan)
        if it == n_iter:
            break
        resid = rel - pattern[None, :]
        tot = var + excess[:, None] + np.where(sw > 0, 1.0 / np.where(sw > 0, sw, 1.0), 0.0)[None, :]
        clipped = use & (np.abs(resid) > clip_sigma * np.sqrt(tot))
        # excess variance per reference from its robust residual scatter
        good = use & ~clipped
        rs = _robust_std_rows(resid, good)
        noise = np.sqrt(_nanmedian_rows(var, good))
        excess = np.nan_to_num(np.maximum(rs**2 - noise**2, 0.0))
        ratio = rs / np.where(noise > 0, noise, np.inf)
        # a reference disagreeing with the ensemble in most of its samples varies: its few unclipped samples
        # (where its light curve crosses the pattern) would show no excess scatter and keep their full weight
        n_use = use.sum(axis=1)
        frac_clipped = np.where(n_use > 0, clipped.sum(axis=1) / np.maximum(n_use, 1), 0.0)
        kept = use.any(axis=1) & ~(ratio > max_noise_ratio) & ~(frac_clipped > max_clipped_fraction)
        if kept.sum() < 2:  # never drop below two references
            kept = use.any(axis=1)
    ok = use & kept[:, None] & ~clipped
    w = np.where(ok, 1.0 / (var + excess[:, None]), 0.0)
    sw = w.sum(axis=0)
    swr = (w * rel).sum(axis=0)
    n_k = ok.sum(axis=0)
    chi2 = np.where(n_k > 1, (w * (rel - pattern[None, :]) ** 2).sum(axis=0) / np.maximum(n_k - 1, 1), 1.0)
    scale = np.sqrt(np.maximum(chi2, 1.0))
    pattern_err = np.where(sw > 0, scale / np.sqrt(np.where(sw > 0, sw, 1.0)), np.nan)
    sw_loo = sw[None, :] - w
    loo = np.where(sw_loo > 0, (swr[None, :] - w * rel) / np.where(sw_loo > 0, sw_loo, 1.0), np.nan)
    loo_err = np.where(sw_loo > 0, scale[None, :] / np.sqrt(np.where(sw_loo > 0, sw_loo, 1.0)), np.nan)
    return {"pattern": pattern, "pattern_err": pattern_err, "loo": loo, "loo_err": loo_err, "weight": w,
            "kept": kept, "excess": excess, "n_used": n_k}


def _valid_masks(flux, err, flags, ramp):
    valid = np.isfinite(flux) & np.isfinite(err) & (err > 0) & ((flags & UNUSABLE) == 0)
    flat = valid & ~ramp[None, :]
    return valid, flat


def _select_references(flux, err, flags, star_flags, flat, n_ref_max, ref_snr_min, min_clean_fraction,
                       exclude_flags=ENSEMBLE_EXCLUDE):
    clean = flat & ((flags & exclude_flags) == 0)
    n_flat = max(int(flat.any(axis=0).sum()), 1)
    with np.errstate(all="ignore"):
        snr = _nanmedian_rows(flux / err, flat)
    frac_clean = clean.sum(axis=1) / n_flat
    sat = ((flags & fb.SATURATED) != 0).any(axis=1)
    cand = (star_flags == 0) & ~sat & (snr >= ref_snr_min) & (frac_clean >= min_clean_fraction)
    order = np.argsort(-np.where(cand, snr, -np.inf))
    order = order[cand[order]][: int(n_ref_max)]
    return order, clean, snr


def normalise(ext, *, method="ensemble", n_ref_max=150, ref_snr_min=20.0, min_clean_fraction=0.8,
              min_valid=None, clip_sigma=4.0, n_iter=4, max_noise_ratio=3.0, exclude_flags=None,
              corr_samples=None):
    """Divide every star's series by the common pattern and by its own level.

    Parameters
    ----------
    ext : pydriftn.extract.ExtractionResult
        Extracted series (``flux``, ``flux_err_sample``, ``flags``, ``ramp``,
        ``star_flags``).
    method : {'ensemble', 'best_star'}
    n_ref_max : int
        Most references used (the brightest passing the cuts).
    ref_snr_min : float
        Minimum median per-sample S/N of a reference.
    min_clean_fraction : float
        Minimum fraction of full-illumination samples without masked pixels,
        cosmic rays or outliers for a reference.
    min_valid : int, optional
        Minimum valid full-illumination samples for a star to be normalised;
        default half of the full-illumination samples (at least 3).
    clip_sigma, n_iter, max_noise_ratio :
        See :func:`common_pattern`.
    corr_samples : array of bool (K,), optional
        ``best_star`` only: samples on which the correlations are computed
        (default all full-illumination samples). Choosing the best of many
        references on the same samples it then normalises partly fits the
        target's own noise; an out-of-sample choice measures the method fairly.
    exclude_flags : int, optional
        Sample flags excluded from the ensemble (default masked, saturated,
        cosmic ray, outlier, off image, no data; de-blended samples are used,
        their extra noise is in their weights).

    Returns
    -------
    DetrendResult
    """
    if method not in ("ensemble", "best_star"):
        raise ValueError(f"method: expected 'ensemble' or 'best_star', got {method!r}")
    flux = np.asarray(ext.flux, dtype=np.float64)
    err = np.asarray(ext.flux_err_sample if ext.flux_err_sample is not None else ext.flux_err, dtype=np.float64)
    flags = np.asarray(ext.flags, dtype=np.int32).copy()
    ramp = np.asarray(ext.ramp, dtype=bool)
    S, K = flux.shape
    star_flags = np.asarray(ext.star_flags, dtype=np.int32).copy()
    valid, flat = _valid_masks(flux, err, flags, ramp)
    n_flat_samples = int((~ramp).sum())
    if min_valid is None:
        min_valid = max(3, n_flat_samples // 2)
    n_valid = flat.sum(axis=1)
    few = n_valid < int(min_valid)
    star_flags |= np.where(few, fb.FEW_VALID_SAMPLES, 0).astype(np.int32)
    level0 = _nanmedian_rows(flux, flat)
    nonpos = ~few & ~(level0 > 0)
    star_flags |= np.where(nonpos, fb.NOT_NORMALISED, 0).astype(np.int32)
    usable = ~few & ~nonpos
    excl = ENSEMBLE_EXCLUDE if exclude_flags is None else int(exclude_flags)
    refs, clean, snr = _select_references(flux, err, flags, np.where(usable, star_flags & ~fb.BAD_SKY, 1), flat,
                                          n_ref_max, ref_snr_min, min_clean_fraction, excl)
    if len(refs) < 3:
        log.warning("normalise: only %d reference stars pass the cuts (S/N >= %.0f); relaxing to the %d "
                    "brightest usable stars", len(refs), ref_snr_min, min(5, int(usable.sum())))
        refs, clean, snr = _select_references(flux, err, flags, np.where(usable, 0, 1), flat, min(5, n_ref_max),
                                              0.0, 0.0, excl)
    is_ref = np.zeros(S, bool)
    is_ref[refs] = True
    weight = np.zeros(S)
    ref_id = np.full(S, -1, dtype=np.int64)
    pattern = np.ones(K)
    pattern_err = np.zeros(K)
    extras = {}

    # per-star pattern (LOO for references) and its error
    pat_s = np.ones((S, K))
    pat_err_s = np.zeros((S, K))
    if method == "ensemble" and len(refs) >= 2:
        lvl = level0[refs]
        lvl_pattern = np.ones(K)
        for _ in range(2):  # levels relative to the pattern, then the pattern again
            rel = flux[refs] / lvl[:, None]
            rel_err = err[refs] / lvl[:, None]
            use = clean[refs] | (valid[refs] & ramp[None, :] & ((flags[refs] & excl) == 0))
            cp = common_pattern(rel, rel_err, use, clip_sigma=clip_sigma, n_iter=n_iter,
                                max_noise_ratio=max_noise_ratio)
            lvl_pattern = cp["pattern"]
            norm = np.nanmedian(lvl_pattern[~ramp]) if np.isfinite(lvl_pattern[~ramp]).any() else 1.0
            lvl = _nanmedian_rows(flux[refs] / np.where(lvl_pattern > 0, lvl_pattern / norm, np.nan)[None, :],
                                  flat[refs])
            lvl = np.where(lvl > 0, lvl, level0[refs])
        norm = np.nanmedian(cp["pattern"][~ramp])
        pattern = cp["pattern"] / norm
        pattern_err = cp["pattern_err"] / norm
        pat_s[:] = pattern[None, :]
        pat_err_s[:] = pattern_err[None, :]
        pat_s[refs] = cp["loo"] / norm
        pat_err_s[refs] = cp["loo_err"] / norm
        weight[refs] = cp["weight"].mean(axis=1)
        is_ref[refs] = cp["kept"]
        extras.update(n_used=cp["n_used"], excess=cp["excess"])
    elif method == "best_star" and len(refs) >= 2:
        sel = flat if corr_samples is None else flat & np.asarray(corr_samples, bool)[None, :]
        pat_s, pat_err_s, ref_id = _best_star_pattern(flux, err, flags, sel, level0, refs)
        pattern = np.nanmedian(pat_s, axis=0)
        pattern_err = np.nanmedian(pat_err_s, axis=0)
        is_ref[:] = False
        is_ref[np.unique(ref_id[ref_id >= 0])] = True
    else:
        log.warning("normalise: fewer than 2 reference stars; series normalised by their levels only")
        star_flags |= np.where(usable, 0, 0).astype(np.int32)

    good_pat = np.isfinite(pat_s) & (pat_s > 0)
    with np.errstate(all="ignore"):
        detr = np.where(good_pat, flux / np.where(good_pat, pat_s, 1.0), np.nan)
    level = _nanmedian_rows(detr, flat & good_pat)
    # a usable star must end with a positive finite level; otherwise flag it
    bad_level = usable & ~(level > 0)
    star_flags |= np.where(bad_level, fb.NOT_NORMALISED, 0).astype(np.int32)
    usable &= ~bad_level
    level = np.where(usable, level, np.nan)
    with np.errstate(all="ignore"):
        norm_flux = detr / level[:, None]
        a = err / (np.where(good_pat, pat_s, np.nan) * level[:, None])
        b = norm_flux * pat_err_s / np.where(good_pat, pat_s, np.nan)
        norm_err = np.sqrt(a * a + b * b)
    keep = usable[:, None] & valid & good_pat
    norm_flux = np.where(keep, norm_flux, np.nan)
    norm_err = np.where(keep, norm_err, np.nan)
    flags |= star_flags[:, None] & (fb.FEW_VALID_SAMPLES | fb.NOT_NORMALISED | fb.BAD_SKY)

    m = flat & keep
    med = _nanmedian_rows(norm_flux, m)
    scatter = _MAD * _nanmedian_rows(np.abs(norm_flux - med[:, None]), m)
    expected = _nanmedian_rows(norm_err, m)
    with np.errstate(all="ignore"):
        ratio = scatter / expected
    log.info("normalise[%s]: %d stars, %d references, %d flagged (few samples %d, not normalised %d)",
             method, S, int(is_ref.sum()), int((~usable).sum()), int(few.sum()),
             int(((star_flags & fb.NOT_NORMALISED) != 0).sum()))
    return DetrendResult(
        norm_flux=norm_flux,
        norm_flux_err=norm_err,
        pattern=pattern,
        pattern_err=pattern_err,
        level=level,
        star_flags=star_flags,
        flags=flags,
        is_reference=is_ref,
        weight=weight,
        reference_id=ref_id,
        scatter=scatter,
        expected=expected,
        noise_ratio=ratio,
        n_valid=n_valid,
        method=method,
        extras=extras,
    )


def best_star_normalise(ext, **kwargs):
    """The original pydriftn method: :func:`normalise` with ``method='best_star'``."""
    return normalise(ext, method="best_star", **kwargs)


def _best_star_pattern(flux, err, flags, flat, level0, refs):
    """Original method: divide by the best-correlated reference (CR-affected refs skipped)."""
    S, K = flux.shape
    cr = ((flags[refs] & fb.COSMIC_RAY) != 0).any(axis=1)
    cand = refs[~cr] if (~cr).sum() >= 2 else refs
    with np.errstate(all="ignore"):
        rel = flux / level0[:, None]
    z = np.where(flat, rel, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # stars without valid samples: NaN rows
        mu = np.nanmean(z, axis=1, keepdims=True)
        sd = np.nanstd(z, axis=1, keepdims=True)
    zz = np.where(flat, (rel - mu) / np.where(sd > 0, sd, np.inf), 0.0)
    zz = np.nan_to_num(zz)
    zc = zz[cand]
    n = np.maximum((flat[:, None, :] & flat[cand][None, :, :]).sum(axis=2), 1)
    corr = (zz @ zc.T) / n
    self_mask = cand[None, :] == np.arange(S)[:, None]
    corr = np.where(self_mask, -np.inf, corr)
    best = cand[np.argmax(corr, axis=1)]
    rel_ref = rel[best]
    rel_ref_err = err[best] / level0[best][:, None]
    pat = np.where(rel_ref > 0, rel_ref, np.nan)
    return pat, rel_ref_err, best


# --------------------------------------------------------------------------- tables
def _sample_selection(ext, full_trail):
    return np.ones(ext.n_samples, bool) if full_trail else ~np.asarray(ext.ramp, bool)


def long_table(ext, det, expnum, ccd, *, full_trail=False):
    """Long-format table (one row per star and sample) for Parquet.

    Columns :data:`LONG_COLUMNS`: ``flux``/``flux_err`` in e-/s (sky
    subtracted), ``norm_flux``/``norm_flux_err`` relative (median 1), ``mjd``
    UTC at mid-sample, ``t_s`` seconds since shutter open, ``flags`` sample
    flags (:mod:`pydriftn.extract.flagbits`). ``full_trail=False`` leaves out
    the shutter-ramp samples.
    """
    return pd.DataFrame(long_columns(ext, det, expnum, ccd, full_trail=full_trail))


def long_columns(ext, det, expnum, ccd, *, full_trail=False):
    """The columns of :func:`long_table` as a dict of arrays (in :data:`LONG_COLUMNS` order).

    For callers that add columns of their own before making one table (each
    column added to a DataFrame afterwards costs a block copy).
    """
    sel = _sample_selection(ext, full_trail)
    S = ext.n_stars
    ks = ext.sample[sel]
    n = len(ks)
    flags = (det.flags if det is not None else ext.flags)[:, sel]
    cols = {
        "star_id": np.repeat(ext.star_id, n),
        "expnum": np.full(S * n, expnum),
        "ccd": np.full(S * n, ccd, dtype=object),
        "sample": np.tile(ks, S).astype(np.int32),
        "mjd": np.tile(ext.mjd[sel], S),
        "t_s": np.tile(ext.t_s[sel], S),
        "flux": ext.flux[:, sel].reshape(-1),
        "flux_err": ext.flux_err[:, sel].reshape(-1),
        "norm_flux": (det.norm_flux[:, sel] if det is not None else np.full((S, n), np.nan)).reshape(-1),
        "norm_flux_err": (det.norm_flux_err[:, sel] if det is not None else np.full((S, n), np.nan)).reshape(-1),
        "n_masked": ext.n_masked[:, sel].reshape(-1).astype(np.int16),
        "flags": flags.reshape(-1).astype(np.int32),
    }
    return {c: cols[c] for c in LONG_COLUMNS}


_ID_COLUMNS = ["star_id", "x_start", "y_start", "x_end", "y_end"]


def star_table(ext, det, expnum=None, ccd=None):
    """Per-star summary: IDs, trail, sky, level, scatter vs expected noise, flags."""
    t = ext.trails
    # every column gathered first, then one DataFrame (adding ~60 columns one by one costs ~10 ms)
    cols = {c: t[c].to_numpy() for c in _ID_COLUMNS if c in t.columns}
    if expnum is not None:
        cols = {**dict(list(cols.items())[:1]), "expnum": expnum, **dict(list(cols.items())[1:])}
    if ccd is not None:
        pos = 2 if expnum is not None else 1
        items = list(cols.items())
        cols = {**dict(items[:pos]), "ccd": ccd, **dict(items[pos:])}
    for c in t.columns:
        if c not in cols and c not in ("flags",):
            cols[c] = t[c].to_numpy()
    cols["sky_adu"] = ext.sky_adu
    cols["sky_err_adu"] = ext.sky_err_adu
    cols["delta_cross_px"] = ext.delta_px if ext.delta_px is not None else np.nan
    cols["n_neighbours"] = ext.n_neighbours if ext.n_neighbours is not None else 0
    cols["profile_reference"] = ext.profile_ref if ext.profile_ref is not None else False
    if det is not None:
        cols["level_e_s"] = det.level
        cols["n_valid"] = det.n_valid
        cols["is_reference"] = det.is_reference
        cols["scatter"] = det.scatter
        cols["expected_noise"] = det.expected
        cols["noise_ratio"] = det.noise_ratio
        cols["star_flags"] = det.star_flags
        cols["flags_any"] = np.bitwise_or.reduce(det.flags, axis=1)
    else:
        cols["star_flags"] = ext.star_flags
    cols["method"] = ext.method + ("" if det is None else "+" + det.method)
    return pd.DataFrame(cols, index=pd.RangeIndex(len(t)))


def wide_table(ext, det, expnum=None, ccd=None, *, value="norm_flux", full_trail=False):
    """Wide table in the original's layout: ID columns then ``extraction_0..N``.

    Parameters
    ----------
    value : {'norm_flux', 'flux'}
        What the ``extraction_i`` columns hold (normalised series by default).
    full_trail : bool
        Include the shutter-ramp samples. ``extraction_0`` is sample
        ``first_sample`` (a column of the table).
    """
    sel = _sample_selection(ext, full_trail)
    if value == "norm_flux":
        if det is None:
            raise ValueError("wide_table: value='norm_flux' needs a DetrendResult")
        vals = det.norm_flux[:, sel]
    elif value == "flux":
        vals = ext.flux[:, sel]
    else:
        raise ValueError(f"wide_table: value must be 'norm_flux' or 'flux', got {value!r}")
    ids = star_table(ext, det, expnum, ccd)
    ids["first_sample"] = int(ext.sample[sel][0]) if sel.any() else -1
    ids["first_mjd"] = float(ext.mjd[sel][0]) if sel.any() else np.nan
    ids["sample_dt_s"] = ext.dt_s
    cols = pd.DataFrame(vals, columns=[f"extraction_{i}" for i in range(vals.shape[1])])
    return pd.concat([ids.reset_index(drop=True), cols], axis=1)
