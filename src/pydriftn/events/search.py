"""The event search: scan, calibrate, fit, veto; one candidate table out.

Steps (all stars of a CCD-night at once, see :mod:`.series` and :mod:`.scan`):

1. Build dense series blocks per (night, ccd); samples with vetoing flags are
   excluded (``bad_flag_mask``).
2. Boxcar matched-filter scan over a grid of widths (1 sample to 8 exposures):
   the detection statistic of a star-night is its best Delta-chi2 against the
   flat model.
3. The null distribution of that statistic from time-scrambled copies of every
   star-night (seeded), pooled per night (or per block / over everything),
   combined with that of as many Gaussian realisations of the star-nights'
   error bars (the stricter of the two; :class:`~.scan.CombinedNull`):
   false-alarm probability per star-night of every candidate, and the
   threshold for the target false-alarm rate.
4. Star-nights above a looser pre-threshold are fitted with the finite-source
   point-lens and FRED flare models (true sample times) convolved with the
   PSF's line-spread function along the drift of each exposure's seeing
   (``lsf_fwhm_px`` column, else the ``psf_fwhm_px`` option; see :mod:`.fit`)
   within each exposure's shutter window; parameters, Jacobian errors,
   Delta-chi2 vs flat.
5. Vetoes (bitmask, see ``VETO_BITS``): samples excluded for flags of added
   light (cosmic ray, satellite, blend) in (or next to) the candidate window,
   unless the star's excursion stays above the threshold without every sample
   within 2 PSF FWHM of them (see ``_statistic_clear_of_artefacts``); common
   mode (the same grid window, i.e. the same exposure and samples,
   brightens/dims in more than ``common_mode_fraction`` of the CCD's stars); a
   neighbour within ``neighbour_radius_arcsec`` varying in the same window with
   a larger excursion in absolute flux (the light came from it), or a brighter
   one blinded in the window by saturation or a satellite (see
   ``_neighbour_flux_ratio``), or a much brighter catalogued star nearby whose
   series is not measured (saturated, see ``_unmeasured_stars``); a flash (from
   the classification stage) at the same place and time (or reported on the
   candidate's star) whose light curve is consistent with that flash, unless a
   microlensing fit with a resolved core explains it better (see
   ``_flash_veto``); an excursion that recurs at the same samples (the same
   detector pixels) in the star's other exposures of the night (see
   ``_repeats_each_exposure``); an excursion an instantaneous flash of the
   PSF's width explains as well as the event models (``unresolved_in_time``,
   see ``_unresolved_in_time``); an excursion that a level error of the star in
   the window's exposures, within the block's measured level scatter, explains
   to within the detection threshold (``exposure_level``, see
   ``_exposure_level``); an excursion peaking on the last sample of a trail
   before it leaves the CCD (``ccd_edge``, see ``_peak_at_ccd_edge``).

The result is a :class:`SearchResult` with the candidate table, the per
star-night statistics, the null distributions and thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from .fit import DEFAULT_PSF_FWHM_PX, SMEAR_SUPERSAMPLE, _moffat_alpha, fit_flare, fit_flash, fit_microlensing
from .scan import (DEFAULT_WIDTHS, CombinedNull, NullDistribution, _prepared, gaussian_null_block, scan_block,
                   scramble_block, window_statistic)
from .series import COLUMN_PER_KERNEL_FWHM, SECONDS_PER_DAY, EventSearchError, build_blocks, check_columns, flag_mask
from ..models import microlensing_magnification_curve

__all__ = [
    "VETO_FLAGGED",
    "VETO_COMMON_MODE",
    "VETO_NEIGHBOUR",
    "VETO_FLASH",
    "VETO_REPEATS",
    "VETO_UNRESOLVED",
    "VETO_LEVEL",
    "VETO_EDGE",
    "VETO_BITS",
    "veto_names",
    "SearchResult",
    "search",
    "calibrate_null",
    "search_store",
]

log = logging.getLogger(__name__)

VETO_FLAGGED = 1
VETO_COMMON_MODE = 2
VETO_NEIGHBOUR = 4
VETO_FLASH = 8
VETO_REPEATS = 16
VETO_UNRESOLVED = 32
VETO_LEVEL = 64
VETO_EDGE = 128
VETO_BITS = {VETO_FLAGGED: "flagged_samples", VETO_COMMON_MODE: "common_mode",
             VETO_NEIGHBOUR: "bright_neighbour", VETO_FLASH: "flash", VETO_REPEATS: "repeats_each_exposure",
             VETO_UNRESOLVED: "unresolved_in_time", VETO_LEVEL: "exposure_level", VETO_EDGE: "ccd_edge"}
#: Sample flags of a trail's samples beyond the CCD (see ``_peak_at_ccd_edge``).
_OFF_CCD_FLAGS = flag_mask(("OFF_IMAGE",))

MAG_COLUMNS = ("r", "mag_r", "g", "mag_g", "vr", "mag", "i", "z")
#: The fits use the star's samples within max(3 x window duration, this) seconds of the candidate window:
#: the neighbouring exposures (48 s cadence) on either side, so a long event's baseline is constrained.
FIT_PAD_S = 100.0
#: Default FWHM (pixels = samples) of a flash whose table gives no ``width_px`` (1.1" at 0.27"/px).
DEFAULT_FLASH_FWHM_PX = 4.0
#: FWHM range of the flash profile in the flash veto, as factors of the exposure's PSF FWHM (from the store's
#: ``lsf_fwhm_px``, measured on hundreds of trails): an instantaneous flash is exactly the PSF's line-spread
#: function along the drift, so it cannot be broader than the PSF (+5 %: the LSF-to-PSF conversion assumes a
#: Moffat profile); narrower is allowed (a PSF closer to a Gaussian than the Moffat model).
FLASH_FWHM_RANGE = (0.8, 1.05)
#: the same range around the flash's own measured width where the store has no ``lsf_fwhm_px`` (that width is
#: a noisy measurement, and an event's breadth widens it).
FLASH_OWN_FWHM_RANGE = (0.8, 1.25)
#: FWHM range of the free-width profile the flash profile is compared with.
FREE_FWHM_RANGE = (0.5, 4.0)
#: Longest candidate window (samples) tested for ``unresolved_in_time``: an instantaneous flash's best boxcar
#: spans ~1 FWHM (3-5 samples); the grid of flash instants grows with the window.
UNRESOLVED_MAX_WINDOW = 12
#: Default target false-alarm probability per star-night. The threshold comes from the night's own nulls
#: (:func:`calibrate_null`), whose far tail rests on a few tens of thousands of star-nights per CCD-night: measured
#: on 100000 event-free synthetic star-nights (``benchmarks/bench_events.py --fp-nights 50``) the false-positive
#: rate was 1.06, 1.39, 2.0, 2.4 and 1.3 times targets of 1e-2, 1e-3, 1e-4, 5e-5 and 3e-5. 3e-5 keeps it below
#: 1e-4 per star-night (measured 4e-5).
DEFAULT_FALSE_ALARM_RATE = 3e-5


#: Sample flags of light that is not the star's: excluded samples with these at a candidate's peak veto it.
_ARTEFACT_FLAGS = flag_mask(("COSMIC_RAY", "SATELLITE", "BLENDED"))
#: Flags of kept samples whose pixels held light the star's profile does not explain (rejected as outliers of
#: the profile fit: a flash's or a cosmic ray's wing beside the rejected pixels): treated as artefact samples.
#: On the image-level injections 3 of 7 false positives and 3 of 426 found events had them in their window.
_SUSPECT_FLAGS = flag_mask(("OUTLIER_PIXELS",))


def _artefact_samples(block, i, sl=slice(None)):
    """Samples of star row ``i`` (within ``sl``) holding light that is not the star's: excluded for an
    artefact flag, or kept with a suspect one."""
    f = block.flags[i, sl]
    return block.present[i, sl] & (((~block.valid[i, sl]) & ((f & _ARTEFACT_FLAGS) != 0))
                                   | ((f & _SUSPECT_FLAGS) != 0))


def veto_names(bits: int) -> str:
    """``"common_mode|flash"`` etc. for a veto bitmask ('' if none)."""
    return "|".join(name for bit, name in VETO_BITS.items() if int(bits) & bit)


@dataclass
class SearchResult:
    """Output of :func:`search`.

    Attributes
    ----------
    candidates : pandas.DataFrame
        One row per star-night above the pre-threshold (see :func:`search`).
    star_nights : pandas.DataFrame
        ``star_id, night, ccd, n_samples, statistic, width, start, sign,
        false_alarm_prob`` for every star-night searched.
    null : dict
        Pool key -> :class:`~.scan.CombinedNull` (or the given null).
    thresholds : dict
        Pool key -> detection threshold at ``false_alarm_rate``.
    false_alarm_rate : float
        Target false-alarm probability per star-night.
    """

    candidates: pd.DataFrame
    star_nights: pd.DataFrame
    null: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE
    files: list = field(default_factory=list)

    @property
    def detections(self) -> pd.DataFrame:
        """Candidates above threshold and not vetoed."""
        c = self.candidates
        if c.empty:
            return c
        return c[c["above_threshold"] & (c["vetoes"] == 0)]

    def summary_lines(self) -> list[str]:
        """Human-readable summary (the CLI prints it)."""
        lines = [f"event search: {len(self.star_nights)} star-nights, target false-alarm rate "
                 f"{self.false_alarm_rate:g} per star-night"]
        for key, thr in self.thresholds.items():
            nd = self.null[key]
            extra = " (extrapolated tail)" if nd.extrapolated(self.false_alarm_rate) else ""
            lines.append(f"  pool {key}: {nd.n} scrambled star-nights, threshold delta-chi2 = {thr:.1f}{extra}")
        c = self.candidates
        n_above = int(c["above_threshold"].sum()) if len(c) else 0
        lines.append(f"  candidates above pre-threshold: {len(c)}; above threshold: {n_above}; "
                     f"not vetoed: {len(self.detections)}")
        if len(c):
            for bit, name in VETO_BITS.items():
                n = int(((c["vetoes"] & bit) != 0).sum())
                if n:
                    lines.append(f"    vetoed {name}: {n}")
        for f in self.files:
            lines.append(f"  wrote {f}")
        return lines


def _pool_key(block, null_pool):
    if null_pool == "night":
        return f"night={block.night}"
    if null_pool == "block":
        return f"night={block.night} ccd={block.ccd}"
    if null_pool == "all":
        return "all"
    raise EventSearchError(f"search: null_pool must be 'night', 'block' or 'all', got {null_pool!r}")


def _scrambled(block, i, rows, *, n_scrambles, seed, widths, sign, n_workers):
    """Scrambled statistics of ``rows`` of block number ``i`` (seeded by ``(seed, i)``)."""
    return scramble_block(block, n_scrambles, seed=[int(seed), int(i)], widths=widths, sign=sign,
                          n_workers=n_workers, rows=rows)


def _null_members(scr, exclude_sigma):
    """Rows whose scrambled statistics represent the noise population of the block.

    A star-night with a real event, strong variability or many unflagged
    outliers has scrambled maxima far above the other stars' (the big samples
    stay big whatever their order); pooled, they would dominate the tail and
    raise the threshold for every star. Such star-nights (median scrambled
    statistic more than ``exclude_sigma`` robust standard deviations above the
    median over the block's stars) are left out of the pool; they are still
    searched (``in_null`` False in the star-night table).
    """
    med = np.median(scr, axis=1)
    centre = np.median(med)
    mad = 1.4826 * np.median(np.abs(med - centre))
    if not np.isfinite(mad) or mad <= 0:
        mad = max(float(np.std(med)), 1e-12)
    return med <= centre + exclude_sigma * mad


def calibrate_null(blocks, *, n_scrambles=20, seed=0, widths=DEFAULT_WIDTHS, sign="positive",
                   null_pool="night", n_workers=1, null_exclude_sigma=10.0) -> dict:
    """Null distributions of the detection statistic from time-scrambled series.

    Returns
    -------
    dict
        Pool key -> :class:`~.scan.CombinedNull` (scrambled star-nights
        excluded by :func:`_null_members` left out; Gaussian realisations of
        every star-night).
    """
    pooled: dict = {}
    for i, b in enumerate(blocks):
        rows = np.flatnonzero(b.valid.any(axis=1))
        scr = _scrambled(b, i, rows, n_scrambles=n_scrambles, seed=seed, widths=widths, sign=sign,
                         n_workers=n_workers)
        keep = _null_members(scr, null_exclude_sigma)
        pooled.setdefault(_pool_key(b, null_pool), []).append(
            _null_entry(b, i, rows, scr, keep, n_scrambles=n_scrambles, seed=seed, widths=widths, sign=sign))
    return _combined_nulls(pooled)


def _null_entry(block, i, rows, scr, keep, *, n_scrambles, seed, widths, sign):
    """One block's contribution to its pool: the kept scrambled statistics and as many Gaussian realisations
    of ``rows`` (seeded by ``(seed, i, 1)``)."""
    gauss = gaussian_null_block(block, n_scrambles, seed=[int(seed), int(i), 1], widths=widths, sign=sign, rows=rows)
    return scr[keep].ravel(), gauss.ravel()


def _combined_nulls(pooled) -> dict:
    """Pool key -> :class:`~.scan.CombinedNull` of the pooled (scrambled, Gaussian) statistics."""
    return {k: CombinedNull(NullDistribution(np.concatenate([a for a, _ in v])),
                            NullDistribution(np.concatenate([b for _, b in v]))) for k, v in pooled.items()}


def _star_table(stars, lc):
    """Per-star ra/dec/mags from ``stars`` or from per-star columns of ``lc``."""
    if stars is not None:
        check_columns(stars, ("star_id",), "star table")
        return stars.drop_duplicates("star_id").set_index("star_id")
    cols = [c for c in ("ra", "dec", *MAG_COLUMNS) if c in lc.columns]
    if not cols:
        return None
    return lc.groupby("star_id")[cols].first()


def _mag_column(star_tab, mag_column):
    if star_tab is None:
        return None
    if mag_column is not None:
        if mag_column not in star_tab.columns:
            raise EventSearchError(f"star table: no magnitude column {mag_column!r} (got {list(star_tab.columns)})")
        return mag_column
    for c in MAG_COLUMNS:
        if c in star_tab.columns:
            return c
    return None


def _flash_arrays(flashes) -> dict:
    """Columns of a flash table as float arrays: ``ra, dec, t`` (instant, NaN if unknown), ``lo, hi``
    (the instant, or the exposure window ``mjd_start .. mjd_end`` when the instant is unknown), ``star``
    (``on_star_id``, NaN if none), ``fwhm`` (``width_px``, NaN if unknown) and ``cross`` (``cross_offset_px``:
    the flash's distance from that star's trail centre line, NaN if unknown). A flash whose light also reaches
    other trails (``near_star_ids``, ``near_t_mjd``, ``near_cross_offset_px`` of the classification) gives one
    more row per such trail: on that star, at the instant it passed the flash, with that offset.

    Rows with a ``class`` other than ``flash`` (a whole classification table) are ignored.
    """
    keys = ("ra", "dec", "t", "lo", "hi", "star", "fwhm", "cross")
    if flashes is None or len(flashes) == 0:
        return {k: np.zeros(0) for k in keys}
    f = flashes
    if "class" in f.columns:
        f = f[f["class"].astype(str) == "flash"]
    tcol = "mjd" if "mjd" in f.columns else ("t_mjd" if "t_mjd" in f.columns else None)
    has_window = {"mjd_start", "mjd_end"} <= set(f.columns)
    if tcol is None and not has_window:
        raise EventSearchError(f"flash table: no time column; expected 'mjd' or 't_mjd' (instant) and/or "
                               f"'mjd_start', 'mjd_end' (exposure window) (got {list(f.columns)})")
    check_columns(f, ("ra", "dec"), "flash table")

    def col(name):
        if name not in f.columns:
            return np.full(len(f), np.nan)
        return pd.to_numeric(f[name], errors="coerce").to_numpy(float)

    t = col(tcol) if tcol else np.full(len(f), np.nan)
    lo = np.where(np.isfinite(t), t, col("mjd_start"))
    hi = np.where(np.isfinite(t), t, col("mjd_end"))
    out = {"ra": col("ra"), "dec": col("dec"), "t": t, "lo": lo, "hi": hi, "star": col("on_star_id"),
           "fwhm": col("width_px"), "cross": col("cross_offset_px")}
    # the other trails the flash's light reaches (classification's near_star_ids ...): one more row each, on
    # that star at the instant it passed the flash
    if {"near_star_ids", "near_t_mjd", "near_cross_offset_px"} <= set(f.columns):
        extra = {k: [] for k in out}
        for r, (ids, ts, xs) in enumerate(zip(f["near_star_ids"], f["near_t_mjd"], f["near_cross_offset_px"])):
            if not isinstance(ids, str) or not ids:
                continue
            for sid, tn, xn in zip(ids.split(";"), str(ts).split(";"), str(xs).split(";")):
                vals = dict(ra=out["ra"][r], dec=out["dec"][r], t=float(tn), lo=float(tn), hi=float(tn),
                            star=float(sid), fwhm=out["fwhm"][r], cross=float(xn))
                for k in out:
                    extra[k].append(vals[k])
        if extra["ra"]:
            out = {k: np.concatenate([out[k], np.asarray(extra[k], float)]) for k in out}
    keep = np.isfinite(out["lo"]) & np.isfinite(out["hi"])
    if not keep.all():
        log.debug("flash table: %d rows without an instant or exposure window ignored", int((~keep).sum()))
    return {k: v[keep] for k, v in out.items()}


def _sep_arcsec(ra1, dec1, ra2, dec2):
    """Angular separation (haversine), degrees in, arcsec out."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    a = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(a, 0, 1)))) * 3600.0


def search(lc: pd.DataFrame, stars: pd.DataFrame | None = None, flashes: pd.DataFrame | None = None, *,
           widths=DEFAULT_WIDTHS, sign: str = "positive", bad_flag_mask: int | None = None,
           rescale_errors: bool = True, n_scrambles: int = 20,
           false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
           pre_false_alarm_rate: float = 1e-3, null=None, null_pool: str = "night", seed: int = 0,
           fit: bool = True, fit_blend: bool = False, supersample: int = SMEAR_SUPERSAMPLE, max_fits: int = 2000,
           psf_smear: bool = True, psf_fwhm_px: float = DEFAULT_PSF_FWHM_PX,
           psf_column_per_fwhm: float = COLUMN_PER_KERNEL_FWHM,
           only_star_ids=None, common_mode_fraction: float = 0.1, common_mode_dchi2: float = 9.0,
           common_mode_min_stars: int = 3, neighbour_radius_arcsec: float = 10.0, neighbour_dchi2: float = 9.0,
           flash_radius_arcsec: float = 2.0, flash_window_s: float = 1.0, flash_max_width: int = 2,
           flash_margin_dchi2: float = 9.0, flash_margin_frac: float = 0.002, flash_ml_margin_dchi2: float = 4.0,
           flash_fwhm_px: float = DEFAULT_FLASH_FWHM_PX, mag_column: str | None = None,
           null_exclude_sigma: float = 10.0, n_workers: int = 1, blocks=None) -> SearchResult:
    """Search light curves for microlensing events and flares.

    Parameters
    ----------
    lc : pandas.DataFrame
        Long light-curve table: ``star_id, expnum, sample, mjd, norm_flux,
        norm_flux_err`` and optionally ``night, ccd, flags`` (and per-star
        ``ra, dec, r, ...`` if ``stars`` is not given).
    stars : pandas.DataFrame, optional
        ``star_id, ra, dec`` and magnitudes (``r``, ``g``, ...): copied to the
        candidates and used by the neighbour veto.
    flashes : pandas.DataFrame, optional
        Flashes found on the images (the pipeline's ``flashes.parquet``):
        ``ra, dec`` and ``mjd`` or ``t_mjd`` (instant, may be NaN) and/or
        ``mjd_start, mjd_end`` (exposure window); optionally ``on_star_id``
        (the star whose trail the flash lies on), ``width_px`` (FWHM) and
        ``class`` (only ``flash`` rows are used).
    widths : sequence of int
        Boxcar widths (samples) of the scan.
    sign : {"positive", "negative", "both"}
        Excursions searched (``"both"`` also finds dips, e.g. to see
        common-mode dimming).
    bad_flag_mask : int, optional
        Flag bits that exclude a sample (default
        :func:`~.series.default_bad_flag_mask`).
    rescale_errors : bool
        Robust per-star-night error rescaling (see :func:`~.series.build_blocks`).
    n_scrambles : int
        Scrambled copies per star-night for the null distribution.
    false_alarm_rate : float
        Target false-alarm probability per star-night (threshold).
    pre_false_alarm_rate : float
        Star-nights with a false-alarm probability below this are fitted and
        reported (with ``above_threshold`` False if above the threshold).
    null : NullDistribution, CombinedNull or dict, optional
        Pre-computed null distribution(s) (skip the scrambling; used by the
        injection-recovery runs).
    null_pool : {"night", "block", "all"}
        How scrambled statistics are pooled.
    seed : int
        Seed of the scrambling.
    fit : bool
        Fit the candidates (else only scan statistics).
    fit_blend : bool
        Fit the source flux fraction of the microlensing model.
    supersample : int
        Model grid steps per sample (odd) of the PSF-smeared models (or sub-steps of the
        average over the sample exposure without smearing).
    psf_smear : bool
        Fit the models convolved with the PSF's line-spread function along the
        drift (:mod:`.fit`); False: only averaged over each sample's exposure.
    psf_fwhm_px : float
        Seeing FWHM (px = samples) of exposures whose ``lsf_fwhm_px`` column is
        absent or NaN (old stores, synthetic series); default
        :data:`~.fit.DEFAULT_PSF_FWHM_PX` (1.0" at 0.27"/px).
    psf_column_per_fwhm : float
        The ``lsf_fwhm_px`` column divided by this is the FWHM of the PSF whose
        line-spread function the fits convolve with (default
        :data:`~.series.COLUMN_PER_KERNEL_FWHM`: the column is the cross-track
        trail profile's FWHM, 1.109 x the PSF's, and the kernel of optimally
        extracted samples along the drift is 1.052 x the PSF's; see
        :mod:`.series`).
    max_fits : int
        At most this many candidates are fitted (most significant first).
    only_star_ids : array_like, optional
        Report candidates of these stars only (all stars are still scanned,
        which the common-mode and neighbour vetoes need).
    common_mode_fraction, common_mode_dchi2, common_mode_min_stars
        Common-mode veto: more than this fraction (and at least this number) of
        the other stars of the CCD with data in the candidate's window show an
        excursion of the same sign with Delta-chi2 above ``common_mode_dchi2``.
    neighbour_radius_arcsec, neighbour_dchi2
        Bright-neighbour veto: a star within this radius with an excursion
        (either sign: a de-blending split moves light between the two) above
        ``neighbour_dchi2`` in the same window, at least as large in absolute
        flux as the candidate's (column ``neighbour_flux_ratio``: the largest
        neighbour / candidate ratio), or a brighter one blinded there (its
        samples in the window excluded as saturated or crossed by a satellite,
        while it has data in most of the night: ratio inf), or a catalogued
        star >= ``UNMEASURED_NEIGHBOUR_DMAG`` brighter within
        ``UNMEASURED_NEIGHBOUR_RADIUS_ARCSEC`` whose series is not measured
        (not in the store, or mostly excluded: saturated; ratio inf).
    flash_radius_arcsec, flash_window_s
        Flash veto, matching: a flash within this radius of the star's
        position (or reported on the star: ``on_star_id``) whose instant lies
        within the candidate window ± ``max(flash_window_s, 2 samples)``; a
        flash without an instant (``t_mjd`` NaN: not on a catalogued trail,
        e.g. at a trail's start in the unstored shutter-ramp samples) matches
        over its exposure window (``mjd_start .. mjd_end``).
    flash_max_width, flash_margin_dchi2, flash_margin_frac, flash_fwhm_px, flash_ml_margin_dchi2
        Flash veto, test (see ``_flash_veto``): a matched flash vetoes a
        candidate whose best boxcar is at most ``flash_max_width`` samples, or
        whose light curve is explained by the flash's profile (line-spread
        function of FWHM ``width_px`` of the flash row, else ``flash_fwhm_px``)
        as well as by a broader one, to within ``max(flash_margin_dchi2,
        flash_margin_frac * delta_chi2_flash)``, unless the PSF-smeared
        microlensing fit explains it better than the flash's profile by at
        least ``flash_ml_margin_dchi2``.
    mag_column : str, optional
        Magnitude used for "brighter" (default: the first of r, g, vr, mag, i, z).
    null_exclude_sigma : float
        Star-nights whose scrambles are outliers among the block's stars (real
        events, strong variables, outlier-ridden series; see
        ``_null_members``) are left out of the pooled null; they are still
        searched (column ``in_null`` of ``star_nights``).
    n_workers : int
        Threads for the scrambling.
    blocks : list of SeriesBlock, optional
        Pre-built series blocks (then ``lc`` may be None and ``bad_flag_mask``,
        ``rescale_errors`` are those the blocks were built with); used by the
        injection-recovery runs to avoid rebuilding them.

    Returns
    -------
    SearchResult
        ``candidates`` columns: ``star_id, night, ccd, ra, dec, <mags>,
        statistic`` (best boxcar Delta-chi2; the false-alarm probability and
        the threshold refer to it), ``scramble_p`` (fraction of the
        star-night's own scrambles reaching its statistic: small for a
        temporally coherent signal, ~1 for a single-sample spike, which
        timing alone cannot tell from an outlier), ``false_alarm_prob, above_threshold, threshold, sign,
        width_samples, window_start_mjd, window_end_mjd, n_fit, model,
        delta_chi2, delta_chi2_microlensing, delta_chi2_flare, t0_mjd,
        t0_err_s, te_s, te_err_s, u0, u0_err, rho, rho_err, fs, fs_err,
        peak_magnification, delta_chi2_finite_source`` (chi2 of the
        point-source fit minus the finite-source fit's: ``rho`` is 0, a
        point source, with ``rho_err`` NaN, unless it exceeds
        :data:`~.fit.FINITE_SOURCE_MIN_DCHI2`), ``neighbour_flux_ratio``
        (see ``neighbour_dchi2``), ``flare_t0_mjd, flare_t0_err_s, flare_amplitude,
        flare_amplitude_err, rise_s, rise_err_s, decay_s, decay_err_s, n_flashes,
        delta_chi2_flash, delta_chi2_flash_free_width`` (best flash profile
        with the flash's width and with a free width, if a flash matched),
        ``statistic_clear_of_artefacts`` (where artefact-flagged samples are
        in or next to the window: the statistic without their reach),
        ``vetoes, veto_reasons``.
    """
    if blocks is None:
        blocks = build_blocks(lc, bad_flag_mask=bad_flag_mask, rescale_errors=rescale_errors)
    if not blocks:
        raise EventSearchError("light-curve table: no rows to search")
    star_tab = _star_table(stars, lc) if (stars is not None or lc is not None) else None
    mcol = _mag_column(star_tab, mag_column)
    fl = _flash_arrays(flashes)
    only = None if only_star_ids is None else np.asarray(list(only_star_ids))

    # pass 1: scan, scrambles, standardisation (and the pooled null if not given)
    scans, pooled = [], {}
    for i, block in enumerate(blocks):
        sc = scan_block(block, widths=widths, sign=sign)
        has = block.valid.any(axis=1)
        rows_mask = has if (null is None or only is None) else has & np.isin(block.star_id, only)
        rows = np.flatnonzero(rows_mask)
        scr_p = np.full(block.n_stars, np.nan)
        in_null = np.zeros(block.n_stars, bool)
        if len(rows):
            scr = _scrambled(block, i, rows, n_scrambles=n_scrambles, seed=seed, widths=widths, sign=sign,
                             n_workers=n_workers)
            # own-scramble p-value: is the time ordering itself significant? (~1 for 1-sample spikes)
            scr_p[rows] = ((scr >= sc.statistic[rows, None]).sum(axis=1) + 1.0) / (n_scrambles + 1.0)
            keep = _null_members(scr, null_exclude_sigma)
            in_null[rows[keep]] = True
            if null is None:
                pooled.setdefault(_pool_key(block, null_pool), []).append(
                    _null_entry(block, i, rows, scr, keep, n_scrambles=n_scrambles, seed=seed, widths=widths,
                                sign=sign))
        scans.append((block, sc, scr_p, in_null))
    if null is None:
        null = _combined_nulls(pooled)

    # pass 2: false-alarm probabilities, candidates, vetoes, fits
    thresholds = {}
    sn_rows, cand_rows = [], []
    for block, sc, scr_p, in_null in scans:
        key = _pool_key(block, null_pool) if isinstance(null, dict) else "all"
        nd = null[key] if isinstance(null, dict) else null
        thr = nd.threshold(false_alarm_rate)
        pre = min(nd.threshold(pre_false_alarm_rate), thr)
        thresholds[key] = thr
        z = sc.statistic
        fap = nd.false_alarm_probability(z)
        n_valid = block.valid.sum(axis=1)
        sn_rows.append(pd.DataFrame({
            "star_id": block.star_id, "night": block.night, "ccd": block.ccd, "n_samples": n_valid,
            "statistic": sc.statistic, "scramble_p": scr_p, "width": sc.width,
            "start": sc.start, "sign": sc.sign, "false_alarm_prob": fap, "in_null": in_null,
        }))
        sel = (z >= pre) & (n_valid > 0)
        if only is not None:
            sel &= np.isin(block.star_id, only)
        idx = np.flatnonzero(sel)
        idx = idx[np.argsort(-z[idx])]
        cand_rows.extend(_block_candidates(
            block, sc, scr_p, idx, fap, thr, star_tab, mcol, fl, fit=fit, fit_blend=fit_blend,
            supersample=supersample, max_fits=max_fits - len(cand_rows),
            psf=(psf_smear, psf_fwhm_px, psf_column_per_fwhm),
            common_mode=(common_mode_fraction, common_mode_dchi2, common_mode_min_stars),
            neighbour=(neighbour_radius_arcsec, neighbour_dchi2), flash=(flash_radius_arcsec, flash_window_s),
            flash_test=(flash_max_width, flash_margin_dchi2, flash_margin_frac, flash_fwhm_px,
                        flash_ml_margin_dchi2, psf_column_per_fwhm), widths=widths))
    star_nights = pd.concat(sn_rows, ignore_index=True)
    cands = pd.DataFrame(cand_rows)
    if cands.empty:
        cands = pd.DataFrame(columns=["star_id", "night", "ccd", "statistic", "false_alarm_prob",
                                      "above_threshold", "vetoes", "veto_reasons", "model"])
    else:
        cands = cands.sort_values("statistic", ascending=False, ignore_index=True)
    nulls = null if isinstance(null, dict) else {"all": null}
    log.info("event search: %d star-nights, %d candidates, %d above threshold", len(star_nights), len(cands),
             int(cands["above_threshold"].sum()) if len(cands) else 0)
    return SearchResult(candidates=cands, star_nights=star_nights, null=nulls, thresholds=thresholds,
                        false_alarm_rate=false_alarm_rate)


def _block_candidates(block, sc, scr_p, idx, fap, thr, star_tab, mcol, fl, *, fit, fit_blend, supersample, max_fits,
                      common_mode, neighbour, flash, flash_test, psf=(True, DEFAULT_PSF_FWHM_PX, COLUMN_PER_KERNEL_FWHM),
                      widths=DEFAULT_WIDTHS):
    rows = []
    if len(idx) == 0:
        return rows
    if len(idx) > max(max_fits, 0):
        log.warning("night=%s ccd=%s: %d candidates above the pre-threshold, fitting the %d most significant",
                    block.night, block.ccd, len(idx), max(max_fits, 0))
        idx = idx[: max(max_fits, 0)]
    sample_s = block.sample_duration_s()
    cm_frac, cm_dchi2, cm_min = common_mode
    nb_radius, nb_dchi2 = neighbour
    fl_radius, fl_window = flash
    window_cache = {}
    # star columns copied to the candidates: position and magnitudes (not a catalogue's ccd, flags, ...)
    copy_cols = [] if star_tab is None else [c for c in star_tab.columns
                                             if c in ("ra", "dec", mcol, *MAG_COLUMNS)]
    have_pos = star_tab is not None and {"ra", "dec"} <= set(star_tab.columns)
    if have_pos:
        pos = star_tab.reindex(block.star_id)
        ra_all, dec_all = pos["ra"].to_numpy(float), pos["dec"].to_numpy(float)
        mag_all = pos[mcol].to_numpy(float) if mcol else np.full(block.n_stars, np.nan)
        unmeasured = _unmeasured_stars(block, star_tab, mcol)
    for i in idx:
        j0, width, sg = int(sc.start[i]), int(sc.width[i]), int(sc.sign[i])
        sid = block.star_id[i]
        row = {"star_id": sid, "night": block.night, "ccd": block.ccd}
        if star_tab is not None and sid in star_tab.index:
            for c in copy_cols:
                row[c] = star_tab.at[sid, c]
        win_idx = np.arange(j0, j0 + width)
        wm = block.mjd[i, win_idx]
        wm = wm[np.isfinite(wm)]
        if wm.size == 0:  # the star has no sample there: use the other stars' times
            g = np.nanmedian(block.mjd[:, win_idx], axis=0)
            wm = g[np.isfinite(g)]
        t_lo, t_hi = float(wm.min()), float(wm.max())
        row.update({
            "statistic": float(sc.statistic[i]), "false_alarm_prob": float(fap[i]),
            "above_threshold": bool(sc.statistic[i] >= thr), "threshold": thr, "scramble_p": float(scr_p[i]),
            "sign": sg,
            "width_samples": width, "window_start_mjd": t_lo, "window_end_mjd": t_hi,
            "window_amplitude": float(sc.amplitude[i]),
        })
        # ---- vetoes
        vet = 0
        lo_k, hi_k = max(j0 - 1, 0), min(j0 + width + 1, block.n_grid)
        # samples at the peak excluded for something that adds light (a cosmic ray, a satellite, a blend): its
        # wings may be in the neighbouring samples; samples only lost (masked or saturated pixels, no data)
        # do not veto: the event's other samples stand on their own
        # (or kept with pixels rejected as outliers of the profile: the same light, partly removed)
        if np.any(_artefact_samples(block, i, slice(lo_k, hi_k))):
            clear = _statistic_clear_of_artefacts(block, i, j0, width, sg, widths, psf[1], psf[2])
            row["statistic_clear_of_artefacts"] = clear
            if not clear >= thr:
                vet |= VETO_FLAGGED
        if _peak_at_ccd_edge(block, i, j0, width, sg):
            vet |= VETO_EDGE
        d_all, s_all, has = _window(block, window_cache, j0, width)
        exc = has & (d_all >= cm_dchi2) & (np.sign(s_all) == sg)
        exc_other = exc.copy()
        exc_other[i] = False
        n_other = int(has.sum()) - int(has[i])
        n_exc = int(exc_other.sum())
        row["common_mode_fraction"] = n_exc / n_other if n_other > 0 else 0.0
        if n_other > 0 and n_exc >= cm_min and n_exc > cm_frac * n_other:
            vet |= VETO_COMMON_MODE
        if _repeats_each_exposure(block, i, j0, width, sg, float(sc.statistic[i]), window_cache, cm_dchi2):
            vet |= VETO_REPEATS
        if have_pos and np.isfinite(ra_all[i]):
            if _unmeasured_bright_neighbour(ra_all[i], dec_all[i], mag_all[i], sid, unmeasured):
                ratio = float("inf")  # (its light cannot be cleared: no flux ratio to measure)
            else:
                ratio = _neighbour_flux_ratio(block, i, j0, width, sg, ra_all, dec_all, mag_all, nb_radius,
                                              has & (d_all >= nb_dchi2))
            row["neighbour_flux_ratio"] = ratio
            if ratio >= 1.0:
                vet |= VETO_NEIGHBOUR
        # flashes at this time on the star (on_star_id) or within fl_radius of it (its t = 0 position)
        fl_pad = max(fl_window, 2.0 * sample_s) / SECONDS_PER_DAY
        fmatch = np.zeros(len(fl["ra"]), bool)
        if len(fmatch):
            f_lo, f_hi = _unstored_extension(block, i, j0, width, t_lo, t_hi, sample_s)
            fmatch = (fl["hi"] >= f_lo - fl_pad) & (fl["lo"] <= f_hi + fl_pad)
            on_star = fl["star"] == float(sid) if np.issubdtype(np.asarray(sid).dtype, np.number) \
                else np.zeros(len(fmatch), bool)
            near_fl = np.zeros(len(fmatch), bool)
            if have_pos and np.isfinite(ra_all[i]):
                near_fl = _sep_arcsec(ra_all[i], dec_all[i], fl["ra"], fl["dec"]) <= fl_radius
            fmatch &= on_star | near_fl
        row["n_flashes"] = int(fmatch.sum())
        # ---- fits
        if fit and not (vet & VETO_COMMON_MODE):
            row.update(_fit_one(block, i, t_lo, t_hi, sc.amplitude[i] * sg, sample_s, supersample, fit_blend, psf))
        else:
            row["model"] = "none"
        if fmatch.any():
            is_flash, d_flash, d_free = _flash_veto(block, i, row, t_lo, t_hi, width, sample_s, fl,
                                                    np.flatnonzero(fmatch), fl_pad, flash_test,
                                                    fit_done=row["model"] != "none")
            row["delta_chi2_flash"] = d_flash
            row["delta_chi2_flash_free_width"] = d_free
            if is_flash:
                vet |= VETO_FLASH
        elif row["model"] != "none":
            _w, _m, _f, default_fwhm, ml_margin, column_per_fwhm = flash_test
            unresolved, d_flash = _unresolved_in_time(block, i, row, t_lo, t_hi, sample_s, default_fwhm,
                                                      column_per_fwhm, ml_margin)
            row["delta_chi2_flash"] = d_flash
            if unresolved:
                vet |= VETO_UNRESOLVED
        if row["model"] != "none":
            margin, level_sys = _exposure_level(block, i, j0, width, row)
            row["delta_chi2_over_level"] = margin
            row["delta_chi2_level_sys"] = level_sys
            if margin < thr and level_sys < thr:
                vet |= VETO_LEVEL
        row["vetoes"] = vet
        row["veto_reasons"] = veto_names(vet)
        rows.append(row)
    return rows


#: Samples within this many PSF FWHM (along the drift) of a sample excluded for added light (cosmic ray,
#: satellite, blend) are left out of :func:`_statistic_clear_of_artefacts`: a Moffat beta = 3 line-spread
#: function is down to 1.6 % of its peak at 2 FWHM.
ARTEFACT_CLEARANCE_FWHM = 2.0


def _statistic_clear_of_artefacts(block, i, j0, width, sign, widths, default_fwhm,
                                  column_per_fwhm=COLUMN_PER_KERNEL_FWHM) -> float:
    """Best boxcar Delta-chi2 of star row ``i`` near its candidate window without the artefacts' reach.

    A sample excluded for light that is not the star's (``_ARTEFACT_FLAGS``:
    a cosmic ray, a satellite trail, a blend), or kept with pixels rejected as
    outliers of the star's profile (``_SUSPECT_FLAGS``), may leave that light in the
    samples beside it (the masked pixels miss its PSF wings), and those can
    make a candidate. Here every sample within ``ARTEFACT_CLEARANCE_FWHM``
    PSF FWHM (the exposure's, ``default_fwhm`` if unknown) of such an
    excluded sample in the same exposure is dropped too (another exposure,
    28 s away, cannot hold its light), and the scan's statistic (the same
    correlated-sample correction, :func:`~.scan.variance_inflation`) is
    maximised over the boxcars of ``widths`` that lie within one window
    width of the candidate window (``[j0 - width, j0 + 2 width)``), with the
    flat level re-fitted on the remaining samples. What is left cannot be
    the artefact's light: the search keeps a candidate whose statistic so
    computed still reaches the threshold (an event lasting beyond the
    artefact), and vetoes the others (``flagged_samples``).
    """
    from .scan import variance_inflation

    n = block.n_grid
    k = block.samples_per_exposure
    art = np.flatnonzero(_artefact_samples(block, i))
    w = block.row_weights(i).astype(float)
    if art.size:
        fw = block.exposure_fwhm_px(default_fwhm, column_per_fwhm)[art // k]
        reach = np.ceil(ARTEFACT_CLEARANCE_FWHM * fw).astype(int)
        e0 = (art // k) * k  # the light stays in the artefact's exposure
        drop = np.zeros(n + 1, int)
        np.add.at(drop, np.maximum(art - reach, e0), 1)
        np.add.at(drop, np.minimum(art + reach + 1, np.minimum(e0 + k, n)), -1)
        w[np.cumsum(drop)[:n] > 0] = 0.0
    wt = w.sum()
    if wt <= 0:
        return 0.0
    y = np.where(w > 0, block.y[i], 0.0)
    ybar = float(np.sum(w * y) / wt)
    cs = np.r_[0.0, np.cumsum(w * (y - ybar))]
    cw = np.r_[0.0, np.cumsum(w)]
    lo, hi = max(int(j0) - int(width), 0), min(int(j0) + 2 * int(width), n)
    infl = variance_inflation(block, [int(L) for L in widths])
    best = 0.0
    for L in widths:
        L = int(L)
        if L > hi - lo:
            continue
        a = np.arange(lo, hi - L + 1)
        sw = cs[a + L] - cs[a]
        ww = cw[a + L] - cw[a]
        den = ww * (1.0 - ww / wt)
        ok = (den > 0) & (np.sign(sw) == sign)
        if ok.any():
            best = max(best, float(np.max(sw[ok] ** 2 / den[ok])) / infl.get(L, 1.0))
    return best


def _peak_at_ccd_edge(block, i, start, width, sign) -> bool:
    """Is the candidate's extreme sample the last one of the star's trail before it leaves the CCD?

    A trail running off the CCD has its samples beyond the edge flagged
    ``OFF_IMAGE``. An excursion rising to the last sample before them (or
    falling from the first after them) has its peak beyond the data: the
    light may come from a source off the CCD (a flash whose PSF wing reaches
    in: the classification cannot see it there) and an event's peak, and so
    its t0, is not observed. Such candidates are vetoed (``ccd_edge``): one
    false positive of the image-level injections was a flash just off the
    CCD on a trail's last samples.
    """
    k = block.samples_per_exposure
    lo, hi = int(start), int(start) + int(width)
    idx = np.arange(lo, hi)
    ok = block.valid[i, idx]
    if not ok.any():
        return False
    y = np.where(ok, sign * (block.y[i, idx] - block.ybar[i]), -np.inf)
    p = int(idx[int(np.argmax(y))])
    e0 = (p // k) * k
    for q in (p - 1, p + 1):
        if e0 <= q < min(e0 + k, block.n_grid) and block.present[i, q] \
                and (int(block.flags[i, q]) & _OFF_CCD_FLAGS):
            return True
    return False


#: A catalogued star at least this many magnitudes brighter than a candidate's star, within
#: :data:`UNMEASURED_NEIGHBOUR_RADIUS_ARCSEC` of it, whose own series the store does not hold or holds mostly
#: excluded (saturated: its halo, bleed and non-linearity are not modelled), vetoes the candidate as
#: ``bright_neighbour``: its light cannot be cleared. On the image-level runs two false positives were r = 19.2
#: and 19.7 stars 4-5" from saturated r = 14-14.7 stars, whose excursions were 1-3 % of the neighbour's flux.
UNMEASURED_NEIGHBOUR_DMAG = 2.5
UNMEASURED_NEIGHBOUR_RADIUS_ARCSEC = 6.0


def _unmeasured_stars(block, star_tab, mcol):
    """``(ra, dec, mag, star_id)`` of the catalogue stars of the block's CCD (or of no CCD) with a magnitude
    whose series the block does not hold or holds with valid samples in less than half of its samples."""
    if not mcol or mcol not in star_tab.columns:
        return None
    tab = star_tab
    if "ccd" in tab.columns:
        ccd = tab["ccd"].astype(object)
        tab = tab[ccd.isna().to_numpy() | (ccd.astype(str) == str(block.ccd)).to_numpy()]
    mag = tab[mcol].to_numpy(float)
    ids = tab.index.to_numpy()
    where = pd.Index(block.star_id).get_indexer(ids)
    measured = np.zeros(len(ids), bool)
    k = where >= 0
    measured[k] = _measured_most_of_night(block, where[k])
    keep = np.isfinite(mag) & ~measured
    return (tab["ra"].to_numpy(float)[keep], tab["dec"].to_numpy(float)[keep], mag[keep], ids[keep])


def _measured_most_of_night(block, rows):
    """Have the block's stars ``rows`` valid samples in at least half of their samples (and some samples)?"""
    n_present = block.present[rows].sum(axis=1)
    return (n_present > 0) & (block.valid[rows].sum(axis=1) >= 0.5 * n_present)


def _unmeasured_bright_neighbour(ra, dec, mag, star_id, unmeasured) -> bool:
    """Is an unmeasured star (:func:`_unmeasured_stars`) at least :data:`UNMEASURED_NEIGHBOUR_DMAG` brighter
    within :data:`UNMEASURED_NEIGHBOUR_RADIUS_ARCSEC` of the candidate's star?"""
    if unmeasured is None or not (np.isfinite(ra) and np.isfinite(dec) and np.isfinite(mag)):
        return False
    u_ra, u_dec, u_mag, u_id = unmeasured
    bright = (u_mag <= mag - UNMEASURED_NEIGHBOUR_DMAG) & (u_id != star_id)
    if not bright.any():
        return False
    return bool((_sep_arcsec(ra, dec, u_ra[bright], u_dec[bright]) <= UNMEASURED_NEIGHBOUR_RADIUS_ARCSEC).any())


#: Flags of a neighbour's excluded samples that mean light was added at that moment (the neighbour saturated,
#: a satellite crossed it): a neighbour blinded by them in a candidate's window may be the candidate's source.
_BLINDING_FLAGS = flag_mask(("SATURATED", "SATELLITE"))


def _neighbour_flux_ratio(block, i, start, width, sign, ra, dec, mag, radius_arcsec, significant):
    """Largest ratio of a neighbour's flux excursion to the candidate's in the candidate's window.

    A star within ``radius_arcsec`` whose series has a ``significant``
    excursion in the same grid window (same exposure and samples) shares
    light with the candidate: the excursion's source is the star with the
    larger excursion in absolute flux, since each star's aperture takes up
    only a fraction (< 1) of the other's light. Flux excursions are the
    window's weighted mean of ``norm_flux - level`` times the star's
    catalogue flux (``10**(-0.4 mag)``). A ratio >= 1 means the light came
    from the neighbour (a bright variable, an event on it); a genuine event
    on the candidate gives its neighbours a fraction of its light and
    ratios < 1.

    The neighbour's excursion counts whatever its sign: when a de-blending
    split errs, light moves from one star to the other, and the pair's
    excursions are equal and opposite (on the image-level injections an
    r = 22 star 8" from an r = 16 event star rose by 28x its flux while the
    event star's series fell by 100x it). And a brighter neighbour that has
    data in most of the night but none in the window (its samples there
    excluded as saturated, or crossed by a satellite: light added at that
    moment) cannot be measured, so it cannot be cleared: ratio inf (an r =
    21 star 7" from a magnified r = 16 event star crossed by a satellite was
    a false positive). 0 without such a neighbour; NaN (no veto) without
    magnitudes, unless a brighter neighbour varies or is blinded (inf: vetoed).
    """
    sep = _sep_arcsec(ra[i], dec[i], ra, dec)
    near_all = (sep <= radius_arcsec) & (np.arange(block.n_stars) != i)
    if not near_all.any():
        return 0.0
    brighter = near_all & np.isfinite(mag) & (mag < mag[i]) if np.isfinite(mag[i]) else near_all
    b = np.flatnonzero(brighter)  # (a few rows: the checks below are on them only)
    lo, hi = max(int(start) - 1, 0), min(int(start) + int(width) + 1, block.n_grid)
    blind = block.present[b, lo:hi].any(axis=1) & ~block.valid[b, lo:hi].any(axis=1) \
        & ((block.flags[b, lo:hi] & _BLINDING_FLAGS) != 0).any(axis=1)
    if np.any(blind & _measured_most_of_night(block, b)):
        return float("inf")
    near = near_all & significant
    if not near.any():
        return 0.0
    yc, w, _, _ = _prepared(block)
    sl = slice(int(start), int(start) + int(width))
    rows = np.flatnonzero(near)
    idx = np.append(rows, i)
    ww = w[idx, sl].sum(axis=1, dtype=np.float64)
    mean = np.divide(yc[idx, sl].sum(axis=1, dtype=np.float64), ww, out=np.zeros(len(idx)), where=ww > 0)
    if not np.isfinite(mag[i]) or sign * mean[-1] <= 0:
        return float("inf") if np.any(mag[rows] < mag[i]) else float("nan")
    with np.errstate(all="ignore"):
        ratio = np.abs(mean[:-1] * 10.0 ** (-0.4 * (mag[rows] - mag[i]))) / abs(mean[-1])
    ratio = ratio[np.isfinite(ratio)]
    return float(ratio.max()) if ratio.size else float("nan")


def _window(block, cache, start, width):
    """:func:`~.scan.window_statistic` of a grid window, computed once per block (``cache``: a dict)."""
    key = (int(start), int(width))
    if key not in cache:
        cache[key] = window_statistic(block, *key)
    return cache[key]


def _repeats_each_exposure(block, i, j0, width, sign, dchi2, window_cache, min_dchi2, min_fraction=0.25,
                           min_exposures=1):
    """Does the candidate's excursion recur at the same samples of the star's other exposures?

    Sample ``k`` of a star's trail sees the sky at the same offset from the
    star (the drift times ``t_k``) in every exposure, and, where the pointing
    repeats, the same detector pixels: an excursion tied to a static
    neighbour (an uncatalogued or merged star whose trail enters or leaves
    the star's, a bright neighbour's imperfectly modelled wing) or to the
    detector (a bad column, a CCD edge) comes back at the same samples each
    time, while an event happens once. The window is vetoed when the same
    window of at least ``max(min_exposures, half)`` of the star's other
    exposures (with data) shows an excursion of the same sign with
    Delta-chi2 >= ``max(min_dchi2, min_fraction * dchi2)``; with one or two
    other exposures, one of them is enough (a night of three exposures, as
    at the start of a run or between clouds: requiring two made the veto
    blind there, and an r = 22 star next to a bright one, whose first
    samples were lifted by 20x its flux in two of its three exposures and
    had no data in the third, was an image-level false positive). A window running
    from one exposure into the next is tested on its part in the exposure
    holding more of it (with that part's own Delta-chi2): the boxcar of a
    step at the end of an exposure often takes in the next one's first
    samples. Windows longer than an exposure are not tested (a long event
    brightens the neighbouring exposures at the same samples too).
    """
    k = block.samples_per_exposure
    e0, off = divmod(int(j0), k)
    width = int(width)
    if width > k:
        return False
    if off + width > k:
        before, after = k - off, off + width - k
        if after > before:
            e0, off, width = e0 + 1, 0, after
        else:
            width = before
        d_own, s_own, has_own = _window(block, window_cache, e0 * k + off, width)
        if not has_own[i] or np.sign(s_own[i]) != sign:
            return False
        dchi2 = float(d_own[i])
    n_exp = block.n_grid // k
    n_with, n_rep = 0, 0
    for e in range(n_exp):
        if e == e0:
            continue
        d_all, s_all, has = _window(block, window_cache, e * k + off, width)
        if not has[i]:
            continue
        n_with += 1
        n_rep += bool(d_all[i] >= max(min_dchi2, min_fraction * dchi2) and np.sign(s_all[i]) == sign)
    return n_with >= min_exposures and n_rep >= max(min_exposures, 0.5 * n_with)


def _exposure_means(block):
    """Weighted mean, its error and weight of every star-exposure of the block (cached on it).

    Returns ``(mean, err, weight)``, arrays ``(S, E)``; errors as the fits use
    them (``err * err_scale``), the error of a mean times the boxcar variance
    factor of an exposure's samples (:func:`~.scan.variance_inflation`:
    adjacent samples are correlated); NaN/0 without valid samples.
    """
    cached = getattr(block, "_exposure_means", None)
    if cached is not None:
        return cached
    from .scan import variance_inflation

    k = block.samples_per_exposure
    n_s, n_g = block.y.shape
    w = block.weights.reshape(n_s, n_g // k, k)
    y = np.where(block.valid, block.y, 0.0).reshape(w.shape)
    W = w.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(W > 0, (w * y).sum(axis=2) / W, np.nan)
        err = np.where(W > 0, np.sqrt(variance_inflation(block, [k])[k] / W), np.nan)
    block._exposure_means = (mean, err, W)
    return block._exposure_means


def exposure_level_scatter(block, min_fraction=1.0 / 3.0) -> float:
    """Relative scatter of the stars' exposure levels beyond their noise (cached on the block).

    The extraction sets a star's level in each exposure from its own trail and
    its neighbours' (a de-blended pair's split, a merged or uncatalogued
    neighbour, all depending on the seeing): an error of that level shifts
    every sample of the exposure alike. ``sigma_L`` is the value for which the
    median over the block's star-exposures (with at least ``min_fraction`` of
    the samples valid) of ``(m_se - ybar_s)^2 / (err_se^2 (1 - W_se / W_s) +
    (sigma_L ybar_s)^2 (1 - 1 / n_s))`` is the median of a chi-square with one
    degree of freedom (0.455); 0 when the noise alone reaches it. Robust:
    the rare star-exposures with an event do not move it.
    """
    cached = getattr(block, "_level_scatter", None)
    if cached is not None:
        return cached
    mean, err, W = _exposure_means(block)
    k = block.samples_per_exposure
    n_valid = block.valid.reshape(block.n_stars, -1, k).sum(axis=2)
    ok = (n_valid >= max(2, min_fraction * k)) & np.isfinite(mean) & (block.ybar[:, None] > 0)
    n_e = ok.sum(axis=1)
    ok &= (n_e >= 2)[:, None]
    sigma = 0.0
    if ok.sum() >= 20:
        Wt = np.where(ok, W, 0.0).sum(axis=1)
        ybar = np.where(Wt > 0, np.where(ok, W * np.nan_to_num(mean), 0.0).sum(axis=1) / np.where(Wt > 0, Wt, 1), 0)
        si, ei = np.nonzero(ok)
        d2 = (mean[si, ei] - ybar[si]) ** 2
        v_stat = err[si, ei] ** 2 * np.clip(1.0 - W[si, ei] / Wt[si], 0.0, 1.0)
        v_lvl = ybar[si] ** 2 * (1.0 - 1.0 / n_e[si])

        def med(sig):
            return float(np.median(d2 / (v_stat + sig * sig * v_lvl)))

        if med(0.0) > _CHI2_1_MEDIAN:
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if med(mid) > _CHI2_1_MEDIAN else (lo, mid)
            sigma = hi
    block._level_scatter = sigma
    return sigma


#: Median of a chi-square distribution with one degree of freedom.
_CHI2_1_MEDIAN = 0.454936


def _exposure_level(block, i, j0, width, row):
    """Could a level error of the window's exposures be the candidate? ``(margin, level_dchi2_sys)``.

    Such level errors (see :func:`exposure_level_scatter`) are not in the
    null distributions (the scrambles and the Gaussian realisations have
    none), so a long candidate that is one passes the threshold. The
    alternative model gives each exposure the window touches, and the one
    before and after it (the boxcar may cover only the part of an offset that
    stands out), a free level, the other exposures a common one (least
    squares, errors as the fits use them). ``margin`` is
    ``max(Delta-chi2_microlensing, Delta-chi2_flare)`` minus that model's
    Delta-chi2 against the flat one: what the event's shape within the
    exposures adds. ``level_dchi2_sys`` is the significance of the largest
    offset of one of the window's exposures from the star's other exposures
    when both also have the block's level scatter ``sigma_L``:
    ``max_e (m_e - b_e)^2 / (err_e^2 + err_b^2 + 2 (sigma_L b_e)^2)``, ``b_e``
    the weighted mean level of the other exposures. The search
    vetoes the candidate when both are below the detection threshold: it is
    not detected by its shape, and its level offset is within what the
    extraction's level errors make. An event whose light curve is flat over
    an exposure (a finite source of rho ~ 1 and tE ~ 10 s crossing for ~20
    s) is kept by the second condition: its offset (A - 1 ~ 1) is far beyond
    the level scatter (~1 %).
    """
    k = block.samples_per_exposure
    n_exp = block.n_grid // k
    e0 = max(int(j0) // k - 1, 0)
    e1 = min((int(j0) + int(width) - 1) // k + 1, n_exp - 1)
    mean, err, W = _exposure_means(block)
    m, s, w = mean[i], err[i], W[i]
    has = w > 0
    inside = np.zeros(n_exp, bool)
    inside[e0:e1 + 1] = True
    wt = block.row_weights(i)
    yv = np.where(block.valid[i], block.y[i], 0.0)
    chi_flat = float(np.sum(wt * (yv - block.ybar[i]) ** 2))
    out = has & ~inside
    base = float(np.sum(w[out] * m[out]) / np.sum(w[out])) if out.any() else block.ybar[i]
    fit = np.repeat(np.where(out, base, np.nan_to_num(m)), k)  # free levels inside, the common one outside
    chi_level = float(np.sum(wt * (yv - fit) ** 2))
    fits = [row.get(c, np.nan) for c in ("delta_chi2_microlensing", "delta_chi2_flare")]
    fits = [float(v) for v in fits if v is not None and np.isfinite(v)]
    best = max(fits) if fits else float(row.get("statistic", 0.0))
    # each of the window's exposures against the weighted mean of all the star's other exposures
    sig_rel = exposure_level_scatter(block)
    level_sys = 0.0
    for ex in np.flatnonzero(inside & has):
        others = has.copy()
        others[ex] = False
        if not others.any():
            continue
        w_o = w[others].sum()
        b = float(np.sum(w[others] * m[others]) / w_o)
        var = s[ex] ** 2 * (1.0 + w[ex] / w_o) + 2.0 * (sig_rel * b) ** 2  # err_b^2 = err_e^2 W_e / W_others
        level_sys = max(level_sys, float((m[ex] - b) ** 2 / var))
    return best - (chi_flat - chi_level), level_sys


def _unstored_extension(block, i, j0, width, t_lo, t_hi, sample_s):
    """The candidate window extended over the samples of its exposure that are not in the store.

    A window starting at the star's first stored sample of an exposure also
    covers, for flash matching, the unstored samples before it (shutter ramp,
    off-CCD): a flash there lights the first stored samples with its PSF wing
    only. Likewise at the end. Returns ``(lo, hi)`` in mjd.
    """
    k = block.samples_per_exposure
    e0, e1 = j0 // k, (j0 + width - 1) // k
    lo, hi = t_lo, t_hi
    row = block.present[i]
    first = np.flatnonzero(row[e0 * k:(e0 + 1) * k])
    if first.size and j0 <= e0 * k + first[0]:
        lo = t_lo - (first[0] + 0.5) * sample_s / SECONDS_PER_DAY
    last = np.flatnonzero(row[e1 * k:(e1 + 1) * k])
    if last.size and j0 + width - 1 >= e1 * k + last[-1]:
        hi = t_hi + (k - last[-1] + 0.5) * sample_s / SECONDS_PER_DAY
    return lo, hi


def _flash_veto(block, i, row, t_lo, t_hi, width, sample_s, fl, fidx, fl_pad, flash_test, fit_done):
    """Is the candidate explained by one of the matched flashes ``fidx``?

    A flash lasts ~1 ms: in the series it is the PSF's line-spread function
    along the drift, a few samples wide (see :func:`~.fit.fit_flash`); a
    microlensing event lasting longer than the seeing crossing (~2 s) is that
    profile convolved with its light curve, i.e. broader. The test is a
    likelihood ratio within the same profile family (so that neither side is
    favoured by what the event models leave out, e.g. the PSF smoothing): the
    best flash profile with its FWHM within ``FLASH_FWHM_RANGE`` of the
    exposure's PSF FWHM (the store's ``lsf_fwhm_px`` / ``column_per_fwhm``;
    without that column, within ``FLASH_OWN_FWHM_RANGE`` of the flash's
    measured FWHM ``width_px``, else ``default_fwhm``) against the
    best with a free FWHM (``FREE_FWHM_RANGE``). The veto applies when the
    free width does not improve Delta-chi2 by ``max(margin_dchi2, margin_frac
    * delta_chi2_flash)``, or when the candidate's best boxcar spans at most
    ``max_width`` samples (a single-sample spike). Without a fit
    (``fit=False``) a matched flash always vetoes.

    A microlensing event shorter than the seeing crossing is itself nearly
    PSF-shaped in the series, and the classification stage reports it as a
    flash on the star's trail; what tells it from an instantaneous flash is
    its wings (``A - 1 ~ 1/u`` out to ``|t - t0| ~ tE``), which make it
    broader than the PSF. So the veto is lifted when the PSF-smeared
    microlensing fit (``delta_chi2_microlensing``, same samples) beats the
    flash profile by at least ``ml_margin_dchi2``. The flash profile is
    fitted on a fine grid (0.02 samples in t0, 15 widths) so that the
    comparison is fair at high S/N, and its width is tied to the PSF measured
    on all trails of the exposure rather than to the candidate flash's own
    width (which the event's breadth inflates: with it, events of tE = 1 s
    could not be told from flashes). Measured on the image-level injections
    (``bench_efficiency_image.py``, 76 simulated flashes on star trails, 71
    events of tE = 1 s): the microlensing fit beats a flash by at most 2.5
    for the flashes (by hundreds for most: a flash is narrower than any
    smeared event) and by >= 4 for about 70 % of the tE = 1 s events.

    Returns
    -------
    (bool, float, float)
        Veto, the Delta-chi2 (vs flat) of the best flash-width profile and of
        the best free-width profile (NaN if not fitted).
    """
    max_width, margin_dchi2, margin_frac, default_fwhm, ml_margin_dchi2, column_per_fwhm = flash_test
    if not fit_done:
        return True, np.nan, np.nan
    t_ref, t_s, yy, ee, _dur, gidx = _fit_data(block, i, t_lo, t_hi, sample_s)
    psf_fwhm = _psf_fwhm(block, gidx, column_per_fwhm)
    span = 10.0 * sample_s
    best, best_free = -np.inf, -np.inf
    for j in fidx:
        a = max((fl["lo"][j] - fl_pad - t_ref) * SECONDS_PER_DAY, t_s.min() - span)
        b = min((fl["hi"][j] + fl_pad - t_ref) * SECONDS_PER_DAY, t_s.max() + span)
        if b < a:
            continue
        if np.isfinite(psf_fwhm):
            fwhm, rng = psf_fwhm, FLASH_FWHM_RANGE
        else:
            fwhm = fl["fwhm"][j] if np.isfinite(fl["fwhm"][j]) and fl["fwhm"][j] > 0 else default_fwhm
            rng = FLASH_OWN_FWHM_RANGE
        rng = (rng[0], rng[1] * _off_axis_broadening(fl, j, row.get("star_id"), fwhm))
        r = fit_flash(t_s, yy, ee, t_lo=a, t_hi=b, fwhm_samples=fwhm, sample_s=sample_s,
                      fwhm_range=rng, n_fwhm=15, t_step_samples=0.02)
        rf = fit_flash(t_s, yy, ee, t_lo=a, t_hi=b, fwhm_samples=fwhm, sample_s=sample_s,
                       fwhm_range=FREE_FWHM_RANGE, n_fwhm=22)
        if r.success and r.delta_chi2 > best:
            best, best_free = r.delta_chi2, max(rf.delta_chi2, r.delta_chi2)
    if not np.isfinite(best):
        return width <= max_width, np.nan, np.nan
    if width <= max_width:
        return True, float(best), float(best_free)
    flash_shaped = best_free - best < max(margin_dchi2, margin_frac * max(best, 0.0))
    d_ml = row.get("delta_chi2_microlensing", np.nan)
    ml_better = bool(np.isfinite(d_ml) and d_ml - best >= ml_margin_dchi2
                     and magnification_fwhm_s(row) >= ML_MIN_CORE_SAMPLES * sample_s)
    return bool(flash_shaped and not ml_better), float(best), float(best_free)


#: The microlensing fit lifts the flash veto only if its magnification's FWHM (``A - 1``, unsmeared) is at
#: least this many samples: a point-source fit with ``u0 -> 0`` is a cusp ``A ~ tE / |t - t0|`` of no width,
#: an instant with wings, and fits a flash whose wing is broader than the model's line-spread function (an
#: image-level false positive: a bright flash on an r = 22.5 trail, fitted with u0 = 3e-7, A = 4e6, beat the
#: flash profile by 5.6). Events of tE = 1 s found on the image-level injections have fitted FWHM >= 0.15 s
#: (0.28 samples).
ML_MIN_CORE_SAMPLES = 0.1


def magnification_fwhm_s(row) -> float:
    """Full width at half maximum (s) of ``A - 1`` of a candidate's microlensing fit (``te_s, u0, rho``);
    NaN without a fit."""
    te, u0, rho = (float(row.get(c, np.nan)) for c in ("te_s", "u0", "rho"))
    if not (np.isfinite(te) and np.isfinite(u0) and te > 0):
        return np.nan
    rho = rho if np.isfinite(rho) else 0.0
    # geometric grid in |t|: resolves cusps of u0 -> 0 and broad events alike
    t = te * np.concatenate(([0.0], np.geomspace(1e-9, 10.0 + 10.0 * (abs(u0) + rho), 4000)))
    excess = microlensing_magnification_curve(t, 0.0, te, abs(u0), rho) - 1.0
    peak = float(np.nanmax(excess))
    if not np.isfinite(peak) or peak <= 0:
        return 0.0
    k = int(np.flatnonzero(excess >= 0.5 * peak).max())
    if k + 1 >= t.size:
        return 2.0 * float(t[k])
    def half(x):
        return float(microlensing_magnification_curve(x, 0.0, te, abs(u0), rho)) - 1.0 - 0.5 * peak

    return 2.0 * float(brentq(half, t[k], t[k + 1], xtol=1e-12 * te, rtol=1e-10))


def _off_axis_broadening(fl, j, star_id, fwhm_px) -> float:
    """Widest along-trail profile of flash ``j`` on the trail of ``star_id``, relative to the PSF's.

    A flash off the trail's centre line by ``d`` (``cross_offset_px``) reaches
    the trail's samples through its PSF's wing: along the trail, the PSF at
    cross offset ``d`` is a Moffat of the same index with ``alpha^2 + d^2``
    for ``alpha^2`` (``(1 + (x^2 + d^2)/alpha^2)^-beta`` is proportional to
    ``(1 + x^2/(alpha^2 + d^2))^-beta``), so the flash's profile in the
    series is up to ``sqrt(1 + d^2/alpha^2)`` times broader than a flash on
    the centre line (less where the extraction's aperture takes in the whole
    cross-section). A flash 0.75" off a 1" FWHM trail is 1.26x broader: held to
    the PSF's width it fitted worse than a short microlensing event, whose
    smearing the fit is free to stretch, and the flash veto was lifted (the
    image-level false positives of r = 20-22 stars with bright flashes on
    their trails). 1 where unknown (the flash not on this star's trail).
    """
    d = fl["cross"][j]
    try:
        same = star_id is not None and float(fl["star"][j]) == float(star_id)
    except (TypeError, ValueError):
        same = False
    if not (same and np.isfinite(d) and fwhm_px > 0):
        return 1.0
    return float(np.sqrt(1.0 + (d / _moffat_alpha(fwhm_px)) ** 2))


def _psf_fwhm(block, gidx, column_per_fwhm):
    """PSF FWHM (px) of the exposures of grid columns ``gidx``: the store's ``lsf_fwhm_px`` /
    ``column_per_fwhm`` (median), NaN without that column."""
    fw = block.exposure_fwhm_px(np.nan, column_per_fwhm)[np.asarray(gidx) // block.samples_per_exposure]
    fw = fw[np.isfinite(fw)]
    return float(np.median(fw)) if fw.size else np.nan


def _unresolved_in_time(block, i, row, t_lo, t_hi, sample_s, default_fwhm, column_per_fwhm, margin_dchi2):
    """Is the candidate as well explained by an instantaneous flash as by the event models?

    An event shorter than the seeing crossing (~2 s) is, in the series, the
    PSF's line-spread function along the drift, whatever made it: a flash the
    classification did not report (faint, on a bright trail), a cosmic-ray or
    a microlensing event too short to resolve. The microlensing and flare fits
    (PSF-smeared) must beat the flash profile with the exposure's PSF width
    (``FLASH_FWHM_RANGE``; :func:`_flash_veto`), its instant anywhere in the
    candidate window +- 2 samples, by ``margin_dchi2``; events of the
    searched durations (>= 2 s above magnification 1.1) beat it by tens to
    thousands. Candidates whose window spans more than ``UNRESOLVED_MAX_WINDOW``
    samples are not tested (a flash's best boxcar is a few samples wide).
    Returns ``(veto, delta_chi2 of the flash)``.
    """
    if (t_hi - t_lo) * SECONDS_PER_DAY > UNRESOLVED_MAX_WINDOW * sample_s:
        return False, np.nan
    t_ref, t_s, yy, ee, _dur, gidx = _fit_data(block, i, t_lo, t_hi, sample_s)
    fwhm = _psf_fwhm(block, gidx, column_per_fwhm)
    if not np.isfinite(fwhm):
        fwhm = float(default_fwhm)
    pad = 2.0 * sample_s
    a = (t_lo - t_ref) * SECONDS_PER_DAY - pad
    b = (t_hi - t_ref) * SECONDS_PER_DAY + pad
    r = fit_flash(t_s, yy, ee, t_lo=a, t_hi=b, fwhm_samples=fwhm, sample_s=sample_s, fwhm_range=FLASH_FWHM_RANGE,
                  n_fwhm=15, t_step_samples=0.02)
    if not r.success:
        return False, np.nan
    best_event = np.nanmax([row.get("delta_chi2_microlensing", np.nan), row.get("delta_chi2_flare", np.nan),
                            -np.inf])
    return bool(best_event - r.delta_chi2 < margin_dchi2), float(r.delta_chi2)


def _fit_data(block, i, t_lo, t_hi, sample_s):
    """Samples fitted for a candidate window: ``t_ref`` (mjd), ``t_s`` (s from ``t_ref``), ``y``, ``err``,
    window duration (s), grid columns."""
    mjd, y, err, _flags, _valid, gidx = block.star_series(i)
    dur_s = (t_hi - t_lo) * SECONDS_PER_DAY + sample_s
    pad = max(3.0 * dur_s, FIT_PAD_S) / SECONDS_PER_DAY
    m = (mjd >= t_lo - pad) & (mjd <= t_hi + pad)
    if m.sum() < 8:
        m = np.ones_like(mjd, bool)
    t_ref = 0.5 * (t_lo + t_hi)
    return t_ref, (mjd[m] - t_ref) * SECONDS_PER_DAY, y[m], err[m], dur_s, gidx[m]


def _psf_inputs(block, i, gidx, t_ref, sample_s, psf):
    """``fwhm_px`` (per sample) and shutter ``window`` (s from ``t_ref``) for the smeared fits, or Nones."""
    smear, default_fwhm, column_per_fwhm = psf
    if not smear:
        return None, None
    fw = block.exposure_fwhm_px(default_fwhm, column_per_fwhm)[np.asarray(gidx) // block.samples_per_exposure]
    lo, hi = block.sample_windows(i, gidx, sample_s)
    return fw, ((lo - t_ref) * SECONDS_PER_DAY, (hi - t_ref) * SECONDS_PER_DAY)


def _fit_one(block, i, t_lo, t_hi, amp, sample_s, supersample, fit_blend,
             psf=(True, DEFAULT_PSF_FWHM_PX, COLUMN_PER_KERNEL_FWHM)):
    t_ref, t_s, yy, ee, dur_s, gidx = _fit_data(block, i, t_lo, t_hi, sample_s)
    out = {"n_fit": int(len(yy))}
    fw, window = _psf_inputs(block, i, gidx, t_ref, sample_s, psf)
    kw = dict(t_guess=0.0, duration_guess=dur_s, excess_guess=max(float(amp), 1e-4), sample_s=sample_s,
              supersample=supersample, fwhm_px=fw, window=window)
    ml = fit_microlensing(t_s, yy, ee, fit_blend=fit_blend, **kw)
    fr = fit_flare(t_s, yy, ee, **kw)
    out["delta_chi2_microlensing"] = ml.delta_chi2 if ml.params else np.nan
    out["delta_chi2_flare"] = fr.delta_chi2 if fr.params else np.nan
    if ml.params:
        p, e = ml.params, ml.errors
        out.update({"t0_mjd": t_ref + p["t0_s"] / SECONDS_PER_DAY, "t0_err_s": e["t0_s"], "te_s": p["te_s"],
                    "te_err_s": e["te_s"], "u0": p["u0"], "u0_err": e["u0"], "rho": p["rho"], "rho_err": e["rho"],
                    "fs": p["fs"], "fs_err": e["fs"], "base": p["base"], "peak_magnification": p["peak_magnification"],
                    "delta_chi2_finite_source": p["delta_chi2_finite_source"]})
    if fr.params:
        p, e = fr.params, fr.errors
        out.update({"flare_t0_mjd": t_ref + p["t0_s"] / SECONDS_PER_DAY, "flare_t0_err_s": e["t0_s"],
                    "flare_amplitude": p["amplitude"], "flare_amplitude_err": e["amplitude"], "rise_s": p["rise_s"],
                    "rise_err_s": e["rise_s"], "decay_s": p["decay_s"], "decay_err_s": e["decay_s"],
                    "flare_base": p["base"]})
    dml = out["delta_chi2_microlensing"]
    dfl = out["delta_chi2_flare"]
    if np.isnan(dml) and np.isnan(dfl):
        out["model"] = "none"
        out["delta_chi2"] = np.nan
    elif np.isnan(dfl) or (not np.isnan(dml) and dml >= dfl):
        out["model"] = "microlensing"
        out["delta_chi2"] = dml
    else:
        out["model"] = "flare"
        out["delta_chi2"] = dfl
    return out


# ------------------------------------------------------------------------ store
def _store_glob(store) -> tuple[Path, str]:
    """Folder and glob of the light-curve Parquet files of a run (same layout as ``pydriftn.pipeline``)."""
    out = Path(store)
    for root in (out / "store" / "lightcurves", out / "lightcurves"):
        if root.is_dir():
            return root, str(root / "**" / "*.parquet")
    if out.name == "lightcurves" and out.is_dir():
        return out, str(out / "**" / "*.parquet")
    return out / "store" / "lightcurves", str(out / "store" / "lightcurves" / "**" / "*.parquet")


def _read_store(store, nights=None) -> pd.DataFrame:
    """The ``lightcurves`` table of a run's Parquet store (hive-partitioned by night/expnum), via DuckDB."""
    import duckdb

    root, pattern = _store_glob(store)
    if not root.is_dir() or not any(root.rglob("*.parquet")):
        raise EventSearchError(f"{store}: no light-curve store found (expected Parquet files matching {pattern})")
    sql = ("SELECT * FROM read_parquet('" + pattern.replace("'", "''")
           + "', hive_partitioning = true, union_by_name = true)")
    params = []
    if nights:
        sql += " WHERE CAST(night AS VARCHAR) IN (" + ", ".join("?" for _ in nights) + ")"
        params = [str(n) for n in nights]
    con = duckdb.connect()
    try:
        df = con.execute(sql, params).fetchdf()
    except duckdb.Error as exc:
        raise EventSearchError(f"{store}: cannot read the light-curve store {pattern}: {exc}") from None
    finally:
        con.close()
    if df.empty:
        raise EventSearchError(f"{store}: the light-curve store has no rows" + (f" for nights {nights}" if nights else ""))
    for c in ("night", "ccd"):
        if c in df.columns:
            df[c] = df[c].astype(str)
    if "expnum" in df.columns:
        df["expnum"] = pd.to_numeric(df["expnum"])
    return df


def _optional_table(paths):
    for p in paths:
        p = Path(p)
        if p.is_file():
            return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    return None


_CATALOGUE_FILES = ("catalogue/master_catalogue.parquet", "catalogue.parquet", "master_catalogue.parquet",
                    "catalogue/master_catalogue.csv", "catalogue.csv")
_FLASH_FILES = ("flashes.parquet", "classify/flashes.parquet")


def store_roots(store):
    """Folders where a run's tables sit, given its output folder or its ``store/`` folder."""
    store = Path(store)
    roots = [store]
    if store.name in ("store", "lightcurves"):
        roots.append(store.parent)
    if store.name == "lightcurves" and store.parent.name == "store":
        roots.append(store.parent.parent)
    return roots


def store_catalogue(store):
    """The run's catalogue (``catalogue/master_catalogue.parquet`` as ``pydriftn run`` writes it), or None."""
    return _optional_table([r / n for r in store_roots(store) for n in _CATALOGUE_FILES])


def save_png(fig, path):
    """Write a matplotlib Figure as PNG atomically; return the path."""
    import io as _io

    from ..io import write_bytes_atomic

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return write_bytes_atomic(buf.getvalue(), path)


def _run_dir(roots):
    """The ``pydriftn run`` output folder among ``roots`` (holding ``NIGHT/units``), for drift-image cutouts."""
    for r in roots:
        if any(p.is_dir() for p in Path(r).glob("*/units")):
            return Path(r)
    return None


def search_store(store, nights=None, out_dir=None, *, stars=None, flashes=None, plots: int = 50,
                 efficiency_dir=None, **kwargs) -> SearchResult:
    """Run :func:`search` on a run's light-curve store and write the report.

    Parameters
    ----------
    store : path
        Output folder of ``pydriftn run`` (or its ``store/`` folder).
    nights : list of str, optional
        Restrict to these nights.
    out_dir : path, optional
        Report folder (default ``STORE/search``): ``candidates.parquet``,
        ``candidates.csv``, ``star_nights.parquet`` and the report
        (``report.pdf``, ``report.html`` and a PNG per candidate page; see
        :func:`~.report.write_report`), with pages for at most ``plots``
        candidates above threshold (``plots=0``: no report). A
        ``blend_fraction`` column (light of unresolved neighbours relative to
        the star's, from the store) is added to the candidates when the store
        has it.
    efficiency_dir : path, optional
        ``pydriftn efficiency`` output to show in the report.
    stars, flashes : pandas.DataFrame, optional
        Default: the run's catalogue (``STORE/catalogue/master_catalogue.parquet``
        as ``pydriftn run`` writes it, else ``STORE/catalogue.parquet``,
        ``STORE/master_catalogue.parquet`` or ``STORE/catalogue.csv``) and flashes
        (``STORE/flashes.parquet``, else ``STORE/classify/flashes.parquet``)
        if present. ``STORE`` may also be the run's ``store/`` folder (the
        tables are then looked up in its parent too).
    **kwargs
        Passed to :func:`search`.
    """
    store = Path(store)
    lc = _read_store(store, nights)
    roots = store_roots(store)
    if stars is None:
        stars = store_catalogue(store)
        if stars is None:
            log.warning("%s: no catalogue found: candidates get no ra/dec/magnitudes, the neighbour veto is off",
                        store)
    if flashes is None:
        flashes = _optional_table([r / n for r in roots for n in _FLASH_FILES])
        if flashes is None:
            log.warning("%s: no flashes.parquet found: the flash veto is off", store)
    res = search(lc, stars=stars, flashes=flashes, **kwargs)
    if "blend_fraction" in lc.columns and not res.candidates.empty:
        keys = [k for k in ("night", "ccd", "star_id") if k in lc.columns and k in res.candidates.columns]
        blend = lc.groupby(keys)["blend_fraction"].max()
        res.candidates["blend_fraction"] = blend.reindex(pd.MultiIndex.from_frame(res.candidates[keys])
                                                         if len(keys) > 1 else res.candidates[keys[0]]).to_numpy()
    out = Path(out_dir) if out_dir is not None else store / "search"
    out.mkdir(parents=True, exist_ok=True)
    from ..io import write_table_atomic

    files = []
    for name, table in (("candidates.parquet", res.candidates), ("candidates.csv", res.candidates),
                        ("star_nights.parquet", res.star_nights)):
        files.append(write_table_atomic(table, out / name))
    if plots:
        from .report import write_report

        files.extend(write_report(res, lc, out, run_dir=_run_dir(roots), efficiency_dir=efficiency_dir,
                                  max_candidates=plots))
    res.files = files
    return res
