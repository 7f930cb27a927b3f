"""Image-level injection-recovery: events rendered into simulated images, recovered by the whole chain.

:func:`~.inject.efficiency` injects events into extracted light-curve SERIES;
it cannot see what the images do to an event (blends, the flux an event adds
to its neighbours' trails, flags set by classification, the WCS and timing
errors of the chain). Here, for each cell of a grid (``tE, u0, rho``, source
magnitude range, event kind), the simulator renders finite-source events of
exactly those parameters into the images of a small dataset (all events of a
cell have the same ``tE, u0, rho``; the kind fixes ``t0``: ``short`` = inside
an exposure, 20-80 % into it, ``long`` = uniform over the night, gaps
included), :func:`pydriftn.pipeline.run_pipeline` runs the full chain on it
(catalogue, astrometry, sky, extraction, normalisation, classification,
store) and :func:`~.search.search_store` searches the store. The pipeline's
catalogue IDs are mapped to the simulator's stars by the nearest position
(within ``match_radius_arcsec``); an event is

* **detected** if its star has an above-threshold, unvetoed candidate whose
  fitted ``t0`` lies inside the event (``|dt0| <= max(1 s, tE max(1, rho))``,
  the criterion of :func:`~.inject.efficiency`), and
* **found** if in addition ``|dt0| <= 0.5 s`` and ``tE`` is within 30 % (the
  issue's criterion).

The series-level efficiency of the SAME cells is measured on the store of the
same run with :func:`~.inject.efficiency` (stars of the cell's magnitude
range, the simulated event stars left out; ``t0_mode`` ``exposures`` for
short cells, ``night`` for long ones), so the two can be compared cell by
cell. Intervals are Wilson score intervals (``confidence``, default 68.3 %).

Outputs (``out_dir``): ``efficiency_image.csv`` (one row per cell and level,
``level`` = ``image`` or ``series``), ``injections_image.parquet`` (one row
per simulated event: truth, catalogue match, candidate, fit, outcome),
``injections_series.parquet`` (the series-level injections),
``efficiency_image.png`` (the two levels side by side) and, per cell and
repeat, ``cells/<key>/rep<k>/cell.json`` (parameters; a repeat whose file
exists with the same parameters is not run again), ``.../run`` (the pipeline
output), ``.../search`` and ``.../sim`` (truth tables; the simulated images
are removed after the run unless ``keep_images``).

Why a simulated dataset per cell rather than images with events pasted in:
the simulator renders events exactly (finite source, time-varying position,
seeing and jitter on a fine time grid), and its truth tables say where each
event is, so nothing of the chain is bypassed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .series import SECONDS_PER_DAY, EventSearchError

__all__ = ["ImageCell", "DEFAULT_CELLS", "ImageEfficiencyResult", "image_level_efficiency", "wilson_interval",
           "plot_image_efficiency", "peak_observed", "magnified_half_span_s"]

log = logging.getLogger(__name__)

#: t0 / tE accuracy of a "found" event (the issue's criterion).
T0_TOLERANCE_S = 0.5
TE_TOLERANCE_FRAC = 0.3


@dataclass(frozen=True)
class ImageCell:
    """One grid cell: every simulated event has these parameters.

    Attributes
    ----------
    te_s, u0, rho : float
        Einstein time (s), impact parameter, source radius (Einstein units).
    r_min, r_max : float
        True r range of the event stars (the series-level injections use
        catalogue stars with ``mag_r`` in the same range).
    kind : {"short", "long"}
        ``short``: t0 inside an exposure; ``long``: t0 uniform over the night.
    """

    te_s: float
    u0: float
    rho: float
    r_min: float = 16.0
    r_max: float = 18.5
    kind: str = "short"

    @property
    def key(self) -> str:
        """Folder name of the cell."""
        return (f"te{self.te_s:g}_u0{self.u0:g}_rho{self.rho:g}_r{self.r_min:g}-{self.r_max:g}_{self.kind}"
                .replace(".", "p"))

    @property
    def label(self) -> str:
        """Short label for plots."""
        return f"tE={self.te_s:g}s u0={self.u0:g} rho={self.rho:g} {self.kind}"

    def to_dict(self) -> dict:
        return dict(te_s=float(self.te_s), u0=float(self.u0), rho=float(self.rho), r_min=float(self.r_min),
                    r_max=float(self.r_max), kind=str(self.kind))


#: Default subset of the efficiency grid (``te_s, u0, rho, mags`` of ``pydriftn efficiency``): the short
#: events (tE 1, 3, 10 s; u0 0.1, 0.5; rho 0.01), one long event (tE 30 s, t0 anywhere in the night) and
#: one large source (rho 1), all on stars of r 16-18.5. Ordered so that ``max_cells`` keeps the most
#: informative ones first.
DEFAULT_CELLS = (
    ImageCell(10.0, 0.1, 0.01),
    ImageCell(3.0, 0.1, 0.01),
    ImageCell(1.0, 0.1, 0.01),
    ImageCell(10.0, 0.5, 0.01),
    ImageCell(3.0, 0.5, 0.01),
    ImageCell(1.0, 0.5, 0.01),
    ImageCell(30.0, 0.1, 0.01, kind="long"),
    ImageCell(10.0, 0.1, 1.0),
)


@dataclass
class ImageEfficiencyResult:
    """Output of :func:`image_level_efficiency`.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per cell and ``level`` (``image``, ``series``): cell
        parameters, ``n_injected, n_searchable, n_detected, n_found,
        efficiency`` (= found / injected), ``efficiency_lo, efficiency_hi``,
        ``detection_efficiency, detection_lo, detection_hi``, ``confidence``,
        ``median_dt0_s, median_abs_dt0_s, median_te_ratio`` (of the detected
        ones), ``n_found_searchable, efficiency_searchable`` (+ ``_lo, _hi``:
        of the events on stars with samples the search uses),
        ``n_peak_observed, n_found_peak_observed, efficiency_peak_observed``
        (+ ``_lo, _hi``: of the events whose peak the star's searchable
        samples recorded, :func:`peak_observed`; image level only).
    injections : pandas.DataFrame
        One row per simulated event (image level).
    series_injections : pandas.DataFrame
        One row per series-level injection (from :func:`~.inject.efficiency`).
    files : list of Path
    """

    table: pd.DataFrame
    injections: pd.DataFrame
    series_injections: pd.DataFrame = field(default_factory=pd.DataFrame)
    files: list = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """The comparison table as text (image level beside series level)."""
        lines = ["image-level vs series-level injection-recovery: efficiency [68 % Wilson interval] / injections",
                 "  found = unvetoed candidate above threshold, t0 within 0.5 s and tE within 30 %; detected = the "
                 "same with t0 only inside the event; 'of searchable' = of the events on stars with samples the "
                 "search uses (not all flagged, e.g. BLENDED); 'of peak-observed' = of the events whose peak the "
                 "star's searchable samples recorded (peak_observed: not a short event in a gap between exposures "
                 "or while the star was off the CCD or flagged)"]
        cols = (("found", "efficiency", "efficiency_lo", "efficiency_hi", "n_injected"),
                ("found of searchable", "efficiency_searchable", "efficiency_searchable_lo",
                 "efficiency_searchable_hi", "n_searchable"),
                ("found of peak-observed", "efficiency_peak_observed", "efficiency_peak_observed_lo",
                 "efficiency_peak_observed_hi", "n_peak_observed"),
                ("detected", "detection_efficiency", "detection_lo", "detection_hi", "n_injected"))
        t = self.table

        def fmt(r, a, lo, hi, n):
            if r is None or a not in r.index or not np.isfinite(r[a]):
                return f"{'-':>20}"
            return f"{r[a]:4.2f} [{r[lo]:.2f},{r[hi]:.2f}] /{int(r[n]):<3d}".rjust(20)

        hdr = f"  {'cell':<34}" + "".join(f" {lev + ' ' + c[0]:>20}" for c in cols for lev in ("image", "series"))
        lines.append(hdr + f" {'img |dt0|':>9} {'img tE':>7} {'ser tE':>7}")
        for key, g in t.groupby("cell", sort=False):
            im = g[g["level"] == "image"]
            se = g[g["level"] == "series"]
            i0 = im.iloc[0] if len(im) else None
            s0 = se.iloc[0] if len(se) else None
            row = f"  {g['label'].iloc[0]:<34}"
            for c in cols:
                row += " " + fmt(i0, *c[1:]) + " " + fmt(s0, *c[1:])
            row += (f" {i0['median_abs_dt0_s']:9.3f} {i0['median_te_ratio']:7.3f}" if i0 is not None else " " * 18)
            row += f" {s0['median_te_ratio']:7.3f}" if s0 is not None else ""
            lines.append(row)
        inj = self.injections
        if len(inj) and "found" in inj.columns:
            tot = []
            for name, sel in (("all events", np.ones(len(inj), bool)),
                              ("of searchable", inj["searchable"].astype(bool).to_numpy()
                               if "searchable" in inj.columns else None),
                              ("of peak-observed", inj["peak_observed"].astype(bool).to_numpy()
                               if "peak_observed" in inj.columns and inj["peak_observed"].notna().all() else None)):
                if sel is None:
                    continue
                k, n = int(inj.loc[sel, "found"].sum()), int(sel.sum())
                lo, hi = wilson_interval(k, n)
                tot.append(f"{name} {k}/{n} = {k / n if n else np.nan:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append("  image level, all cells, found: " + "; ".join(tot))
        for f in self.files:
            lines.append(f"  wrote {f}")
        return lines


# ------------------------------------------------------------------ statistics
def wilson_interval(k, n, confidence: float = 0.6827):
    """Wilson score interval of a binomial proportion ``k / n``.

    Returns
    -------
    (lo, hi) : floats (NaN for ``n == 0``); always contains ``k / n``.
    """
    from scipy.stats import norm

    k = float(k)
    n = float(n)
    if n <= 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + 0.5 * confidence))
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p))


def _summarise(g: pd.DataFrame, confidence: float) -> dict:
    """Counts, efficiencies with intervals and median fit errors of one cell's injections."""
    n = int(len(g))
    nd = int(g["detected"].sum())
    nf = int(g["found"].sum())
    d = g[g["detected"]]
    lo, hi = wilson_interval(nf, n, confidence)
    dlo, dhi = wilson_interval(nd, n, confidence)
    out = dict(n_injected=n, n_detected=nd, n_found=nf, efficiency=nf / n if n else np.nan, efficiency_lo=lo,
               efficiency_hi=hi, detection_efficiency=nd / n if n else np.nan, detection_lo=dlo, detection_hi=dhi,
               confidence=float(confidence),
               median_dt0_s=float(d["dt0_s"].median()) if nd else np.nan,
               median_abs_dt0_s=float(d["dt0_s"].abs().median()) if nd else np.nan,
               median_te_ratio=float(d["te_ratio"].median()) if nd else np.nan)
    if "searchable" in g.columns:
        sg = g[g["searchable"].astype(bool)]
        ns, nfs = int(len(sg)), int(sg["found"].sum())
        slo, shi = wilson_interval(nfs, ns, confidence)
        out.update(n_searchable=ns, n_found_searchable=nfs, efficiency_searchable=nfs / ns if ns else np.nan,
                   efficiency_searchable_lo=slo, efficiency_searchable_hi=shi)
    if "peak_observed" in g.columns and g["peak_observed"].notna().all():
        og = g[g["peak_observed"].astype(bool)]
        no, nfo = int(len(og)), int(og["found"].sum())
        olo, ohi = wilson_interval(nfo, no, confidence)
        out.update(n_peak_observed=no, n_found_peak_observed=nfo,
                   efficiency_peak_observed=nfo / no if no else np.nan, efficiency_peak_observed_lo=olo,
                   efficiency_peak_observed_hi=ohi)
    return out


def _outcome(dt0_s, te_ratio, te_s, rho, above, vetoes):
    """(detected, found) arrays from the fit errors and the candidate's status."""
    dt0 = np.abs(np.asarray(dt0_s, float))
    inside = dt0 <= np.maximum(1.0, np.asarray(te_s, float) * np.maximum(1.0, np.asarray(rho, float)))
    det = np.asarray(above, bool) & (np.asarray(vetoes) == 0) & inside
    acc = (dt0 <= T0_TOLERANCE_S) & (np.abs(np.asarray(te_ratio, float) - 1.0) <= TE_TOLERANCE_FRAC)
    return det, det & np.nan_to_num(acc, nan=0).astype(bool)


# ------------------------------------------------------------------- matching
def _unit_vectors(ra, dec):
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.c_[np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)]


def _nearest(ra1, dec1, ra2, dec2):
    """Index in set 2 of the nearest point to each of set 1, and the separation (arcsec)."""
    from scipy.spatial import cKDTree

    if len(ra2) == 0:
        return np.full(len(ra1), -1), np.full(len(ra1), np.inf)
    d, j = cKDTree(_unit_vectors(ra2, dec2)).query(_unit_vectors(ra1, dec1))
    return j, np.degrees(2 * np.arcsin(np.clip(d / 2, 0, 1))) * 3600.0


def truth_to_catalogue(truth_stars: pd.DataFrame, catalogue: pd.DataFrame, radius_arcsec: float = 0.5) -> pd.Series:
    """Simulator ``star_id`` -> pipeline catalogue ``star_id`` (nearest within the radius, one-to-one).

    Each catalogue star is given its nearest true star; when several catalogue
    stars share one, the nearest is kept (as in ``benchmarks/bench_endtoend.py``).
    """
    j, sep = _nearest(catalogue["ra"], catalogue["dec"], truth_stars["ra"], truth_stars["dec"])
    df = pd.DataFrame({"cat_id": catalogue["star_id"].to_numpy(),
                       "sim_id": truth_stars["star_id"].to_numpy()[np.maximum(j, 0)], "sep": sep})
    df = df[df["sep"] <= radius_arcsec].sort_values("sep").drop_duplicates("sim_id", keep="first")
    return pd.Series(df["cat_id"].to_numpy(), index=df["sim_id"].to_numpy())


def calibrated_stars(catalogue: pd.DataFrame, truth_stars: pd.DataFrame, radius_arcsec: float = 0.5) -> pd.DataFrame:
    """``star_id, ra, dec, r`` of the run's catalogue with ``r`` on the simulator's scale.

    The catalogue's ``mag_r`` is instrumental; ``r`` = ``mag_r`` + the median
    of (true r - ``mag_r``) over the stars matched to the truth (what a user
    does with a photometric reference). The series-level injections choose
    their stars by this ``r``; the search uses it to rank neighbours.
    """
    cmap = truth_to_catalogue(truth_stars, catalogue, radius_arcsec)
    true_r = pd.Series(truth_stars.set_index("star_id")["r"].reindex(cmap.index).to_numpy(float),
                       index=cmap.to_numpy())
    mag = catalogue["mag_r"].to_numpy(float)
    dr = true_r.reindex(catalogue["star_id"]).to_numpy(float) - mag
    zp = float(np.nanmedian(dr)) if np.isfinite(dr).any() else 0.0
    return catalogue[["star_id", "ra", "dec"]].assign(r=mag + zp)


def magnified_half_span_s(te_s, u0, rho, level: float = 1.1, peak_fraction: float | None = None) -> np.ndarray:
    """Half the time (s) for which a point-lens event is magnified by at least ``level`` (0 if never).

    With ``peak_fraction`` the level is ``1 + peak_fraction (A_peak - 1)``
    instead (0.5: half the time above half the peak excess, the light curve's
    half-maximum). From the finite-source magnification curve on a grid of
    1/20000 of the span searched, ``|t - t0| <= tE (rho + 20)`` (``A(u = 20)
    - 1 ~ 1e-5``).
    """
    from ..models import microlensing_magnification_curve

    te, u0, rho = (np.atleast_1d(np.asarray(v, float)) for v in (te_s, u0, rho))
    te, u0, rho = np.broadcast_arrays(te, u0, rho)
    out = np.zeros(te.shape)
    x = np.linspace(0.0, 1.0, 20001)
    for k in range(te.size):
        t_max = te.flat[k] * (rho.flat[k] + 20.0)
        a = microlensing_magnification_curve(x * t_max, 0.0, te.flat[k], u0.flat[k], rho.flat[k])
        lev = level if peak_fraction is None else 1.0 + peak_fraction * (float(np.max(a)) - 1.0)
        above = np.flatnonzero(a >= lev)
        out.flat[k] = x[above[-1]] * t_max if above.size else 0.0
    return out


def peak_observed(star_id, t0_mjd, lc: pd.DataFrame, bad_flag_mask=None, te_s=None, u0=None, rho=None
                  ) -> np.ndarray:
    """Did the star's usable samples record the event's peak? One bool per event.

    With the event parameters (``te_s, u0, rho``): True when the star has a
    searchable sample (finite ``norm_flux``, no bit of ``bad_flag_mask``)
    within the half-maximum of the event as its samples see it, +- half a
    sample: the half width of the time the event's excess ``A - 1`` is at
    least half its peak value (:func:`magnified_half_span_s` with
    ``peak_fraction=0.5``: 0.15 s for tE = 1 s, u0 = 0.1; 4.6 s for tE = 30
    s, u0 = 0.1; the disk crossing, 10 s, for tE = 10 s, rho = 1) and the
    half width of the kernel that smears the samples along the drift
    (~1.2 s: the store's ``lsf_fwhm_px`` median x
    ``KERNEL_PER_PSF_FWHM / LSF_PER_PSF_FWHM`` samples, see :mod:`.series`;
    :data:`~.fit.DEFAULT_PSF_FWHM_PX` x ``KERNEL_PER_PSF_FWHM`` without that
    column) in quadrature; or when the star's searchable samples bracket
    ``t0`` while the event is magnified by >= 1.1 (samples on both sides
    within :func:`magnified_half_span_s`: a long event peaking in the gap
    between two exposures is seen rising and falling, and its ``t0`` follows
    from the symmetry). Without the parameters: when ``t0`` lies within
    the span of the star's searchable samples of one exposure, +- half a
    sample. False for an event whose peak fell in a gap between exposures
    (unless its half-maximum reaches the samples), while the star's trail
    was off the CCD (dithered away) or flagged (e.g. ``BLENDED``), or on a
    star not in the catalogue (``star_id`` NA). An event whose peak the
    telescope never recorded cannot be found with its ``t0`` to 0.5 s; this
    gives the efficiency a denominator of events the data could show.

    Parameters
    ----------
    star_id : array_like
        Catalogue star of each event (NA if none).
    t0_mjd : array_like
        True peak time of each event.
    lc : pandas.DataFrame
        The run's light-curve store (``star_id, expnum, mjd, norm_flux`` and optionally ``flags``).
    bad_flag_mask : int, optional
        Flag bits that exclude a sample (default :func:`~.series.default_bad_flag_mask`, as the search).
    te_s, u0, rho : array_like, optional
        Event parameters (all three, or none).
    """
    from .series import default_bad_flag_mask

    sid = pd.array(star_id, dtype="Int64")
    t0 = np.asarray(t0_mjd, float)
    out = np.zeros(len(t0), bool)
    want = set(int(v) for v in sid[~pd.isna(sid)])
    if not want or lc is None or len(lc) == 0:
        return out
    mask = int(default_bad_flag_mask() if bad_flag_mask is None else bad_flag_mask)
    d = lc[lc["star_id"].isin(want)]
    ok = np.isfinite(d["norm_flux"].to_numpy(float))
    if "flags" in d.columns:
        ok &= (d["flags"].to_numpy().astype(np.int64) & mask) == 0
    d = d.loc[ok, ["star_id", "expnum", "mjd"]].sort_values(["star_id", "expnum", "mjd"])
    if d.empty:
        return out
    step = np.diff(d["mjd"].to_numpy(float))
    same = (np.diff(d["star_id"].to_numpy()) == 0) & (np.diff(d["expnum"].to_numpy()) == 0) & (step > 0)
    half = 0.5 * float(np.median(step[same])) if same.any() else 0.0
    if te_s is not None and u0 is not None and rho is not None:
        from .fit import DEFAULT_PSF_FWHM_PX
        from .series import KERNEL_PER_PSF_FWHM, LSF_PER_PSF_FWHM

        col = pd.to_numeric(lc["lsf_fwhm_px"], errors="coerce").to_numpy(float) if "lsf_fwhm_px" in lc else []
        col = np.asarray(col)[np.isfinite(col) & (np.asarray(col) > 0)] if len(col) else np.zeros(0)
        kernel_px = (float(np.median(col)) * KERNEL_PER_PSF_FWHM / LSF_PER_PSF_FWHM if col.size
                     else DEFAULT_PSF_FWHM_PX * KERNEL_PER_PSF_FWHM)
        h_event = magnified_half_span_s(te_s, u0, rho, peak_fraction=0.5) / SECONDS_PER_DAY
        reach = np.hypot(h_event, 0.5 * kernel_px * 2.0 * half) + half  # 2 half = one sample = one pixel
        reach = reach * np.ones(len(t0))
        bracket = magnified_half_span_s(te_s, u0, rho, level=1.1) / SECONDS_PER_DAY * np.ones(len(t0))
        times = {k: g.to_numpy(float) for k, g in d.groupby("star_id")["mjd"]}
        for k in range(len(t0)):
            if not pd.isna(sid[k]) and int(sid[k]) in times:
                dt = times[int(sid[k])] - t0[k]
                out[k] = bool(np.any(np.abs(dt) <= reach[k])
                              or (np.any((dt < 0) & (dt >= -bracket[k])) and np.any((dt > 0) & (dt <= bracket[k]))))
        return out
    span = d.groupby(["star_id", "expnum"])["mjd"].agg(["min", "max"]).reset_index()
    for k in range(len(t0)):
        if pd.isna(sid[k]):
            continue
        r = span[span["star_id"] == int(sid[k])]
        out[k] = bool(((r["min"].to_numpy() - half <= t0[k]) & (t0[k] <= r["max"].to_numpy() + half)).any())
    return out


def match_events(events: pd.DataFrame, truth_stars: pd.DataFrame, catalogue: pd.DataFrame, search_result,
                 radius_arcsec: float = 0.5, lc: pd.DataFrame | None = None, bad_flag_mask=None) -> pd.DataFrame:
    """Per simulated event: catalogue match, the star's candidate (if any), fit errors, detected / found.

    Parameters
    ----------
    events : pandas.DataFrame
        Simulator truth ``star_id, ccd, t0_mjd, te_s, u0, rho, kind``.
    truth_stars : pandas.DataFrame
        Simulator truth ``star_id, ra, dec, r``.
    catalogue : pandas.DataFrame
        The run's catalogue (``star_id, ra, dec``).
    search_result : SearchResult
        Of :func:`~.search.search_store` on the run.
    lc : pandas.DataFrame, optional
        The run's light-curve store: adds the column ``peak_observed``
        (:func:`peak_observed`, with ``bad_flag_mask`` and the events' parameters).
    """
    cmap = truth_to_catalogue(truth_stars, catalogue, radius_arcsec)
    ev = events.reset_index(drop=True).copy()
    ev = ev.rename(columns={"star_id": "sim_id"})
    ev["r"] = truth_stars.set_index("star_id")["r"].reindex(ev["sim_id"]).to_numpy(float)
    ev["star_id"] = ev["sim_id"].map(cmap).astype("Int64")
    ev["in_catalogue"] = ev["star_id"].notna()
    sn = search_result.star_nights
    nsamp = sn.groupby("star_id")["n_samples"].sum().to_dict() if len(sn) else {}
    stat = sn.groupby("star_id")["statistic"].max().to_dict() if len(sn) else {}
    sid = [None if pd.isna(v) else int(v) for v in ev["star_id"]]
    ev["n_samples"] = np.array([nsamp.get(v, 0) for v in sid], int)
    ev["searchable"] = ev["n_samples"] > 0
    ev["statistic"] = np.array([stat.get(v, np.nan) for v in sid], float)
    cols = dict(candidate=False, above_threshold=False, vetoes=0, veto_reasons="", t0_fit_mjd=np.nan,
                te_fit_s=np.nan, u0_fit=np.nan, rho_fit=np.nan, cand_statistic=np.nan)
    for k, v in cols.items():
        ev[k] = v
    cand = search_result.candidates
    if len(cand):
        for i, row in ev.iterrows():
            if pd.isna(row["star_id"]):
                continue
            c = cand[cand["star_id"] == int(row["star_id"])]
            if c.empty:
                continue
            t0 = c["t0_mjd"].to_numpy(float)
            t0 = np.where(np.isfinite(t0), t0, 0.5 * (c["window_start_mjd"].to_numpy(float)
                                                      + c["window_end_mjd"].to_numpy(float)))
            k = int(np.argmin(np.abs(t0 - row["t0_mjd"])))  # the star-night of the event
            cr = c.iloc[k]
            ev.loc[i, ["candidate", "above_threshold", "vetoes", "veto_reasons", "t0_fit_mjd", "te_fit_s",
                       "u0_fit", "rho_fit", "cand_statistic"]] = [
                True, bool(cr["above_threshold"]), int(cr["vetoes"]), str(cr.get("veto_reasons", "")), t0[k],
                float(cr.get("te_s", np.nan)), float(cr.get("u0", np.nan)), float(cr.get("rho", np.nan)),
                float(cr["statistic"])]
    ev["dt0_s"] = (ev["t0_fit_mjd"] - ev["t0_mjd"]) * SECONDS_PER_DAY
    ev["te_ratio"] = ev["te_fit_s"] / ev["te_s"]
    ev["detected"], ev["found"] = _outcome(ev["dt0_s"], ev["te_ratio"], ev["te_s"], ev["rho"],
                                           ev["above_threshold"], ev["vetoes"])
    if lc is not None:
        ev["peak_observed"] = peak_observed(ev["star_id"], ev["t0_mjd"], lc, bad_flag_mask, ev["te_s"], ev["u0"],
                                            ev["rho"])
    return ev


# ------------------------------------------------------------------ one cell
def _searchable_stars(lc: pd.DataFrame, bad_flag_mask=None) -> set:
    """Stars with at least one sample the search uses (finite ``norm_flux``, no bad flag)."""
    from .series import default_bad_flag_mask

    mask = int(default_bad_flag_mask() if bad_flag_mask is None else bad_flag_mask)
    ok = np.isfinite(lc["norm_flux"].to_numpy(float))
    if "flags" in lc.columns:
        ok &= (lc["flags"].to_numpy().astype(np.int64) & mask) == 0
    return set(lc.loc[ok, "star_id"].unique())


def _cached_peak_observed(inj: pd.DataFrame, run_dir: Path, search_kwargs) -> np.ndarray:
    """``peak_observed`` of a cached cell's injections from its run's store (NaN if the store is gone)."""
    from .search import _read_store

    try:
        lc = _read_store(run_dir)
    except EventSearchError:
        return np.full(len(inj), np.nan)
    return peak_observed(inj["star_id"], inj["t0_mjd"], lc, (search_kwargs or {}).get("bad_flag_mask"),
                         inj["te_s"], inj["u0"], inj["rho"])


def _cell_seed(seed: int, cell: ImageCell) -> int:
    """Seed of a cell: depends on the cell and the base seed only (not on the other cells)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(cell.key.encode())]).generate_state(1)[0]
               & 0x7FFFFFFF)


#: Event stars of a simulated CCD are at least this far apart (twice the search's default
#: ``neighbour_radius_arcsec``): ten events per small CCD otherwise put event stars side by side, and an event
#: on one star vetoes the simultaneous event on the fainter neighbour (the light came from it, as far as the
#: data can tell) -- a loss no real sky, where events never coincide, would produce.
EVENT_MIN_SEPARATION_ARCSEC = 20.0


def _sim_overrides(cell: ImageCell, *, events_per_ccd, n_exposures, sim_overrides) -> dict:
    ov = dict(events_per_ccd=int(events_per_ccd), event_kind=cell.kind, event_r_range=(cell.r_min, cell.r_max),
              u0_range=(cell.u0, cell.u0), rho_range=(cell.rho, cell.rho),
              event_min_separation_arcsec=EVENT_MIN_SEPARATION_ARCSEC)
    ov["short_te_range_s" if cell.kind == "short" else "long_te_range_s"] = (cell.te_s, cell.te_s)
    if n_exposures is not None:
        ov["n_exposures"] = int(n_exposures)
    ov.update(sim_overrides or {})
    return ov


def _run_cell(cell: ImageCell, cdir: Path, *, seed, preset, sim_overrides, workers, pipeline_options,
              search_kwargs, n_series, radius_arcsec, keep_images):
    """Simulate, run the chain, search, match; series-level efficiency on the same store."""
    from ..config import config_from_dict
    from ..pipeline import run_pipeline
    from ..simulate import simulate_dataset

    sim_dir, run_dir = cdir / "sim", cdir / "run"
    if sim_dir.exists():  # an interrupted cell: start it again from the simulation
        shutil.rmtree(sim_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    ds = simulate_dataset(sim_dir, preset=preset, seed=seed, n_workers=1, **sim_overrides)
    events = ds.read_truth("events")
    truth_stars = ds.read_truth("stars")
    if events.empty:
        raise EventSearchError(f"{sim_dir}: the simulator placed no event for cell {cell.key} (no star with r in "
                               f"[{cell.r_min}, {cell.r_max}] well inside a CCD); raise n_stars_per_ccd")
    cfg = {"drifts_dirs": [str(p) for p in sorted(sim_dir.glob("night_*")) if p.is_dir()],
           "output_dir": str(run_dir), "g_image": str(ds.pointed_images["g"]),
           "r_image": str(ds.pointed_images["r"]), "gaia": str(ds.gaia_reference),
           "workers": workers, "classify": {"save_cutouts": False}}
    cfg.update(pipeline_options or {})
    res = run_pipeline(config_from_dict(cfg), progress=False)
    bad = [u for u in res.units if u.status not in ("done", "resumed")]
    if bad:
        log.warning("cell %s: %d of %d units not done (%s)", cell.key, len(bad), len(res.units),
                    "; ".join(f"{u.key}: {u.status} {u.reason}" for u in bad[:3]))
    out = _search_cell(cell, cdir, events, truth_stars, seed=seed, search_kwargs=search_kwargs, n_series=n_series,
                       radius_arcsec=radius_arcsec)
    if not keep_images:
        shutil.rmtree(sim_dir / "pointed", ignore_errors=True)
        for p in sim_dir.glob("night_*"):
            shutil.rmtree(p, ignore_errors=True)
    return dict(out, n_units=len(res.units), n_units_failed=len(bad))


def _search_cell(cell: ImageCell, cdir: Path, events, truth_stars, *, seed, search_kwargs, n_series, radius_arcsec):
    """Search the store of a cell's pipeline run (``cdir/run``), match the events; series-level efficiency."""
    from ..io import write_table_atomic
    from .inject import efficiency
    from .search import _read_store, search_store

    run_dir = cdir / "run"
    cat = pd.read_parquet(run_dir / "catalogue" / "master_catalogue.parquet")
    stars = calibrated_stars(cat, truth_stars, radius_arcsec)
    skw = dict(search_kwargs or {})
    sres = search_store(run_dir, out_dir=cdir / "search", plots=0, stars=stars, **skw)
    lc = _read_store(run_dir)
    inj = match_events(events, truth_stars, cat, sres, radius_arcsec, lc=lc, bad_flag_mask=skw.get("bad_flag_mask"))
    inj.insert(0, "cell", cell.key)

    # series level on the same store: the simulated event stars left out
    ev_cat = set(inj["star_id"].dropna().astype(int))
    lc = lc[~lc["star_id"].isin(ev_cat)]
    flashes = pd.read_parquet(run_dir / "flashes.parquet") if (run_dir / "flashes.parquet").is_file() else None
    series_inj = pd.DataFrame()
    if n_series > 0:
        mid, half = 0.5 * (cell.r_min + cell.r_max), 0.5 * (cell.r_max - cell.r_min)
        try:
            er = efficiency(lc, stars[~stars["star_id"].isin(ev_cat)], te_s=(cell.te_s,), u0=(cell.u0,),
                            rho=(cell.rho,), mags=(mid,), mag_tolerance=half, n_per_cell=int(n_series), seed=seed,
                            t0_mode="exposures" if cell.kind == "short" else "night", flashes=flashes,
                            return_result=True, **skw)
            series_inj = er.injections.copy()
            series_inj["dt0_s"] = series_inj["dt0_s"].astype(float)
            _, found = _outcome(series_inj["dt0_s"], series_inj["te_ratio"], series_inj["te_s"],
                                series_inj["rho"], series_inj["above_threshold"], series_inj["vetoes"])
            series_inj["detected"] = series_inj["detected"].astype(bool)
            series_inj["found"] = found & series_inj["detected"].to_numpy()
            series_inj["searchable"] = series_inj["star_id"].isin(_searchable_stars(lc, skw.get("bad_flag_mask")))
            series_inj.insert(0, "cell", cell.key)
        except EventSearchError as exc:
            log.warning("cell %s: series-level efficiency not measured: %s", cell.key, exc)
    write_table_atomic(inj, cdir / "injections.parquet")
    if len(series_inj):
        write_table_atomic(series_inj, cdir / "series_injections.parquet")
    else:
        (cdir / "series_injections.parquet").unlink(missing_ok=True)
    thr = {str(k): float(v) for k, v in sres.thresholds.items()}
    return dict(thresholds=thr, n_events=int(len(inj)), n_series=int(len(series_inj)))


# ------------------------------------------------------------------- driver
def image_level_efficiency(out_dir, *, cells=None, events_per_ccd: int = 10, preset: str = "small",
                           n_exposures: int | None = None, seed: int = 0, workers: int | None = None,
                           max_cells: int | None = None, repeats: int = 1, ccds=None,
                           n_stars_per_ccd: int | None = 500, sim_overrides: dict | None = None,
                           pipeline_options: dict | None = None, search_kwargs: dict | None = None,
                           n_series: int = 40, match_radius_arcsec: float = 0.5, confidence: float = 0.6827,
                           keep_images: bool = False, resume: bool = True, research: bool = False,
                           plot: bool = True
                           ) -> ImageEfficiencyResult:
    """Image-level injection-recovery efficiency on a subset of the efficiency grid.

    Parameters
    ----------
    out_dir : path
        Output folder (created).
    cells : sequence of ImageCell or dict, optional
        Grid cells (default :data:`DEFAULT_CELLS`); dicts are ``ImageCell(**d)``.
    events_per_ccd : int
        Events simulated per CCD (one dataset per cell): ``len(ccds) *
        events_per_ccd`` events per cell if the CCDs have enough stars of the
        cell's magnitude range well inside them (else fewer, logged).
    preset : {"tiny", "small", "full"}
        Simulator preset.
    n_exposures : int, optional
        Drift exposures of the night (default: the preset's).
    seed : int
        Base seed; each cell's seed depends on it and the cell only.
    workers : int, optional
        Pipeline workers (``workers`` of the run configuration; None = all cores).
    max_cells : int, optional
        Run only the first ``max_cells`` cells.
    repeats : int
        Datasets per cell (independent seeds; ``cells/<key>/rep<k>``): the
        events per cell are ``repeats * len(ccds) * events_per_ccd``.
    ccds : sequence of str or None
        CCDs simulated (None: the preset's, S4 and N4 for ``small``).
    n_stars_per_ccd : int or None
        Star density (None: the preset's, 300 for ``small``); the default 500
        gives ~25 hosts of r 16-18.5 well inside a small CCD, but more stars
        also mean more blends (stars whose samples are all flagged BLENDED
        are not searched: ``n_searchable``).
    sim_overrides : dict, optional
        Further :class:`~pydriftn.simulate.SimulationConfig` fields.
    pipeline_options : dict, optional
        Further run-configuration keys (e.g. ``executor``).
    search_kwargs : dict, optional
        Passed to :func:`~.search.search_store` and :func:`~.inject.efficiency`
        (e.g. ``false_alarm_rate``; default the search's own, 3e-5).
    n_series : int
        Series-level injections per cell (0: skip the series level).
    match_radius_arcsec : float
        Catalogue-to-truth match radius.
    confidence : float
        Confidence of the Wilson intervals.
    keep_images : bool
        Keep the simulated FITS images of each cell (truth tables are kept).
    resume : bool
        Skip repeats whose ``cell.json`` holds the same parameters (the
        parameters, not the code: use ``resume=False`` or a fresh ``out_dir``
        after changing the pipeline or the search).
    research : bool
        Search the cached pipeline runs of resumed repeats again (and redo
        their series-level injections): after a change to the search only,
        without simulating and running the pipeline again.
    plot : bool
        Write ``efficiency_image.png``.

    Returns
    -------
    ImageEfficiencyResult

    Raises
    ------
    EventSearchError
        Bad cell specification, or a cell where no event could be placed.
    """
    from .. import __version__
    from ..io import write_bytes_atomic, write_table_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cl = list(DEFAULT_CELLS if cells is None else cells)
    try:
        cl = [c if isinstance(c, ImageCell) else ImageCell(**c) for c in cl]
    except TypeError as exc:
        raise EventSearchError(f"image_level_efficiency: bad cell specification ({exc}); expected keys te_s, u0, "
                               "rho, r_min, r_max, kind") from None
    for c in cl:
        if c.kind not in ("short", "long") or not (c.te_s > 0 and c.u0 >= 0 and c.rho > 0 and c.r_min <= c.r_max):
            raise EventSearchError(f"image_level_efficiency: cell {c}: expected kind 'short' or 'long', te_s > 0, "
                                   "u0 >= 0, rho > 0, r_min <= r_max")
    if max_cells is not None:
        cl = cl[: int(max_cells)]
    so = dict(sim_overrides or {})
    if ccds is not None:
        so.setdefault("ccds", tuple(ccds))
    if n_stars_per_ccd is not None:
        so.setdefault("n_stars_per_ccd", int(n_stars_per_ccd))

    inj_all, ser_all, order = [], [], []
    for i, cell in enumerate(cl):
        order.append(cell)
        for rep in range(int(repeats)):
            rdir = out / "cells" / cell.key / f"rep{rep}"
            cseed = _cell_seed(seed + rep, cell)
            ov = _sim_overrides(cell, events_per_ccd=events_per_ccd, n_exposures=n_exposures, sim_overrides=so)
            params = dict(cell=cell.to_dict(), repeat=rep, seed=cseed, preset=preset,
                          sim_overrides={k: list(v) if isinstance(v, tuple) else v for k, v in ov.items()},
                          search_kwargs=search_kwargs or {}, n_series=int(n_series),
                          match_radius_arcsec=float(match_radius_arcsec))
            params = json.loads(json.dumps(params, default=str))
            meta_path = rdir / "cell.json"
            done = False
            if resume and meta_path.is_file():
                try:
                    done = (json.loads(meta_path.read_text()).get("params") == params
                            and (rdir / "injections.parquet").is_file())
                except ValueError:
                    done = False
            if done and research:
                log.info("cell %d/%d %s rep %d: searching the cached run again", i + 1, len(cl), cell.key, rep)
                meta = json.loads(meta_path.read_text())
                truth = rdir / "sim" / "truth"
                r = _search_cell(cell, rdir, pd.read_parquet(truth / "events.parquet"),
                                 pd.read_parquet(truth / "stars.parquet"), seed=cseed, search_kwargs=search_kwargs,
                                 n_series=n_series, radius_arcsec=match_radius_arcsec)
                meta.update(r, pydriftn_version=__version__)
                write_bytes_atomic(json.dumps(meta, indent=1, default=float).encode(), meta_path)
            elif done:
                log.info("cell %s rep %d: resumed from %s", cell.key, rep, meta_path)
            else:
                log.info("cell %d/%d %s rep %d: simulating and running the pipeline", i + 1, len(cl), cell.key, rep)
                rdir.mkdir(parents=True, exist_ok=True)
                meta_path.unlink(missing_ok=True)
                for name in ("injections.parquet", "series_injections.parquet"):
                    (rdir / name).unlink(missing_ok=True)
                r = _run_cell(cell, rdir, seed=cseed, preset=preset, sim_overrides=ov, workers=workers,
                              pipeline_options=pipeline_options, search_kwargs=search_kwargs, n_series=n_series,
                              radius_arcsec=match_radius_arcsec, keep_images=keep_images)
                meta = dict(params=params, pydriftn_version=__version__, **r)
                write_bytes_atomic(json.dumps(meta, indent=1, default=float).encode(), meta_path)
            inj = pd.read_parquet(rdir / "injections.parquet")
            if "peak_observed" not in inj.columns:  # a cell cached before the column existed
                inj["peak_observed"] = _cached_peak_observed(inj, rdir / "run", search_kwargs)
            inj_all.append(inj.assign(repeat=rep))
            if (rdir / "series_injections.parquet").is_file():
                ser_all.append(pd.read_parquet(rdir / "series_injections.parquet").assign(repeat=rep))
    injections = pd.concat(inj_all, ignore_index=True) if inj_all else pd.DataFrame()
    series = pd.concat(ser_all, ignore_index=True) if ser_all else pd.DataFrame()
    rows = []
    for cell in order:
        base = dict(cell=cell.key, label=cell.label, **cell.to_dict())
        for level, t in (("image", injections), ("series", series)):
            g = t[t["cell"] == cell.key] if len(t) else t
            if len(g):
                rows.append(dict(base, level=level, **_summarise(g, confidence)))
    table = pd.DataFrame(rows)
    injections = pd.concat(inj_all, ignore_index=True) if inj_all else pd.DataFrame()
    files = [write_table_atomic(table, out / "efficiency_image.csv"),
             write_table_atomic(injections, out / "injections_image.parquet")]
    if len(series):
        files.append(write_table_atomic(series, out / "injections_series.parquet"))
    if plot and len(table):
        from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

        from .search import save_png

        fig = Figure(figsize=(max(6.0, 1.1 * len(cl) + 2), 5.5))
        plot_image_efficiency(table, ax=fig.add_subplot())
        files.append(save_png(fig, out / "efficiency_image.png"))
    return ImageEfficiencyResult(table=table, injections=injections, series_injections=series, files=files)


def plot_image_efficiency(table: pd.DataFrame, ax):
    """Efficiency per cell: image level beside series level; found (filled), detected (open), found of the
    searchable events (diamonds).

    Parameters
    ----------
    table : pandas.DataFrame
        ``efficiency_image.csv``.
    ax : matplotlib.axes.Axes

    Returns
    -------
    matplotlib.axes.Axes
    """
    cells = list(dict.fromkeys(table["cell"]))
    labels = table.drop_duplicates("cell").set_index("cell")["label"]
    x0 = np.arange(len(cells))
    style = {"image": ("C0", -0.15), "series": ("C1", 0.15)}
    for level, (colour, dx) in style.items():
        t = table[table["level"] == level].set_index("cell").reindex(cells)
        if t["n_injected"].isna().all():
            continue
        for what, lo, hi, fill, ddx, name in (("efficiency", "efficiency_lo", "efficiency_hi", colour, 0.0,
                                               "found (t0 0.5 s, tE 30 %)"),
                                              ("detection_efficiency", "detection_lo", "detection_hi", "none",
                                               0.06, "detected"),
                                              ("efficiency_searchable", "efficiency_searchable_lo",
                                               "efficiency_searchable_hi", "white", -0.06, "found of searchable")):
            if what not in t.columns:
                continue
            y = t[what].to_numpy(float)
            err = np.vstack([y - t[lo].to_numpy(float), t[hi].to_numpy(float) - y])
            ax.errorbar(x0 + dx + ddx, y, yerr=err, fmt="D" if what == "efficiency_searchable" else "o",
                        color=colour, mfc=fill, capsize=2, ms=4, label=f"{level}: {name}")
    ax.set_xticks(x0)
    ax.set_xticklabels([labels[c].replace(" ", "\n", 3) for c in cells], fontsize=7)
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("efficiency")
    ax.set_title("injection-recovery: image level (full chain) vs series level")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return ax
