"""Injection of microlensing events into light-curve tables, and detection efficiency.

:func:`inject_microlensing` adds the finite-source point-lens signal of
chosen stars to their ``norm_flux``: for a model flux ratio
``F(t) = fs A(t) + 1 - fs`` as the samples see it and the star-night's
baseline ``b`` (median ``norm_flux``),

    y' = y + b (F - 1) + N(0, sigma^2 q (F - 1)),   sigma' = sigma sqrt(1 + q (F - 1)),

i.e. the existing noise realisation is kept and the extra photon noise of the
extra source flux is added, ``q`` (``source_noise_fraction``) being the part
of the baseline variance that is the source's own photon noise (1 = source
dominated, bright stars; 0 = background dominated). This is the "multiply the
star by the model" injection with the noise scaled as sqrt of the source flux.

PSF smearing. A sample of an extracted series is one pixel strip of the trail,
so a real event reaches the series convolved with the PSF's line-spread
function along the drift (see :mod:`.fit`). Injected events are smeared the
same way (``psf_smear``, default on), with the exposure's seeing FWHM from the
``lsf_fwhm_px`` column where present and finite (divided by
``psf_column_per_fwhm``, as in the search: see :mod:`.series`), else
``psf_fwhm_px`` (:data:`~.fit.DEFAULT_PSF_FWHM_PX`), and only light from
inside each exposure's shutter window (from the ``sample`` index: sample ``k``
is ``(k + 1/2)`` samples after the opening; see
``SeriesBlock.sample_windows``): the injected series are what the pipeline
would extract from such an event, and the search's fits use the same model (on
a coarser grid: the injections use ``supersample`` =
:data:`INJECT_SUPERSAMPLE`). Samples further than :data:`SMEAR_SPAN_TE` tE
(times ``max(1, rho)``) plus :data:`SMEAR_SPAN_S` from ``t0`` are only
averaged over their exposure (the magnification is smooth there and the
smearing does nothing). ``psf_smear=False`` gives the old, unsmeared injection
(averaged over each sample's exposure).

:func:`efficiency` injects events on a grid of ``tE, u0, rho, mag`` into the
real (or synthetic) series of stars of the right magnitude, at random times,
in batches small enough (``max_fraction`` of a CCD's stars at once, random
times) not to trigger the common-mode veto, runs the full search with the
null distribution calibrated once on the un-injected data, and counts an
injection as detected if its star-night has an unvetoed candidate above the
threshold whose fitted ``t0`` is within ``max(1 s, tE max(1, rho))`` of the
truth (inside the event). The table also gives the fractions with ``t0``
within 0.5 s and ``tE`` within 30 %: for ``rho >> 1`` events longer than an
exposure the plateau edges can fall in the gaps and ``t0``/``tE`` are poorly
constrained even when the detection is certain.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..models import microlensing_magnification_curve
from .fit import DEFAULT_PSF_FWHM_PX, Smear
from .scan import DEFAULT_WIDTHS
from .search import DEFAULT_FALSE_ALARM_RATE, _star_table, calibrate_null, search
from .series import COLUMN_PER_KERNEL_FWHM, SECONDS_PER_DAY, EventSearchError, build_blocks, check_columns, \
    with_modified_rows

__all__ = ["inject_microlensing", "efficiency", "EfficiencyResult", "plot_efficiency", "run_efficiency"]

log = logging.getLogger(__name__)

#: Model grid steps per sample of the injected (smeared) events.
INJECT_SUPERSAMPLE = 9
#: Samples within ``SMEAR_SPAN_TE * tE * max(1, rho) + SMEAR_SPAN_S`` of ``t0`` are PSF-smeared.
SMEAR_SPAN_TE = 5.0
SMEAR_SPAN_S = 10.0


def _sample_seconds(lc) -> float:
    """Typical spacing of consecutive samples within an exposure (s)."""
    sub = lc[["star_id", "expnum", "sample", "mjd"]].head(200_000).sort_values(["star_id", "expnum", "sample"])
    d = sub.groupby(["star_id", "expnum"])["mjd"].diff().to_numpy() * SECONDS_PER_DAY
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if d.size else 0.54


def inject_microlensing(lc_table: pd.DataFrame, params, seed=0, *, source_noise_fraction: float = 1.0,
                        supersample: int | None = None, sample_s: float | None = None, psf_smear: bool = True,
                        psf_fwhm_px: float = DEFAULT_PSF_FWHM_PX,
                        psf_column_per_fwhm: float = COLUMN_PER_KERNEL_FWHM) -> pd.DataFrame:
    """Copy of ``lc_table`` with point-lens events added to chosen stars.

    Parameters
    ----------
    lc_table : pandas.DataFrame
        Light-curve table (``star_id, mjd, norm_flux, norm_flux_err`` at least).
    params : pandas.DataFrame or dict or list of dict
        One row per event: ``star_id, t0_mjd, te_s, u0, rho`` and optionally
        ``fs`` (source flux fraction, default 1) and ``night`` (restrict to
        that night, else every night of the star).
    seed : int
        Seed of the extra photon noise.
    source_noise_fraction : float
        ``q`` in the module docstring (0..1).
    supersample : int, optional
        Model grid steps per sample (default :data:`INJECT_SUPERSAMPLE` smeared, 3 unsmeared).
    sample_s : float, optional
        Sample exposure (s); inferred from the table if not given.
    psf_smear : bool
        Convolve the events with the PSF's line-spread function along the
        drift (module docstring); False: only average over each sample's exposure.
    psf_fwhm_px : float
        PSF FWHM (px) where the table has no finite ``lsf_fwhm_px``.
    psf_column_per_fwhm : float
        The ``lsf_fwhm_px`` column over the PSF's FWHM (see :mod:`.series`).

    Returns
    -------
    pandas.DataFrame
        Same rows and columns, ``norm_flux`` and ``norm_flux_err`` modified.

    Raises
    ------
    EventSearchError
        If a required column is missing.
    """
    check_columns(lc_table, ("star_id", "mjd", "norm_flux", "norm_flux_err"), "light-curve table")
    p = pd.DataFrame([params] if isinstance(params, dict) else params).copy()
    check_columns(p, ("star_id", "t0_mjd", "te_s", "u0", "rho"), "injection parameter table")
    p["fs"] = p["fs"].fillna(1.0) if "fs" in p.columns else 1.0
    keys = ["star_id"] + (["night"] if "night" in p.columns and "night" in lc_table.columns else [])
    out = lc_table.copy()
    if len(p) == 0:
        return out
    rows = out[keys + ["mjd", "norm_flux", "norm_flux_err"]].reset_index(drop=True)
    rows["_row"] = np.arange(len(rows))  # positions (the index may be anything)
    m = rows.merge(p[keys + ["t0_mjd", "te_s", "u0", "rho", "fs"]], on=keys, how="inner")
    if m.empty:
        log.warning("inject_microlensing: none of the %d stars is in the table", len(p))
        return out
    if sample_s is None:
        sample_s = _sample_seconds(lc_table)
    t = (m["mjd"].to_numpy() - m["t0_mjd"].to_numpy()) * SECONDS_PER_DAY
    if not psf_smear:
        te, u0, rho = (m[c].to_numpy(float)[:, None] for c in ("te_s", "u0", "rho"))
        f = _event_flux(t, te, u0, rho, m["fs"].to_numpy(float), sample_s, supersample or 3)
    else:
        fw, lo, hi = _table_psf_columns(lc_table, psf_fwhm_px, sample_s, psf_column_per_fwhm)
        r_ = m["_row"].to_numpy()
        f = np.empty(len(m))
        ev_id = m.groupby(keys + ["t0_mjd", "te_s", "u0", "rho"], sort=False).ngroup().to_numpy()
        for g in np.unique(ev_id):
            sel = np.flatnonzero(ev_id == g)
            e0 = m.iloc[sel[0]]
            rr = r_[sel]
            win = None if lo is None else ((lo[rr] - e0["t0_mjd"]) * SECONDS_PER_DAY,
                                           (hi[rr] - e0["t0_mjd"]) * SECONDS_PER_DAY)
            f[sel] = _event_flux(t[sel], float(e0["te_s"]), float(e0["u0"]), float(e0["rho"]), float(e0["fs"]),
                                 sample_s, supersample or INJECT_SUPERSAMPLE, fwhm_px=fw[rr], window=win)
    gkeys = keys + (["night"] if "night" in lc_table.columns and "night" not in keys else [])
    if "night" in gkeys and "night" not in m.columns:
        m["night"] = lc_table["night"].to_numpy()[m["_row"].to_numpy()]
    base = m.groupby(gkeys + ["t0_mjd"])["norm_flux"].transform("median").to_numpy()
    sig = m["norm_flux_err"].to_numpy(float)
    q = float(np.clip(source_noise_fraction, 0.0, 1.0))
    extra_var = np.clip(sig * sig * q * (f - 1.0), 0.0, None)
    rng = np.random.default_rng(seed)
    y = m["norm_flux"].to_numpy(float) + base * (f - 1.0) + rng.standard_normal(len(m)) * np.sqrt(extra_var)
    # several events on one star-night add up (signal and extra variance)
    idx = m["_row"].to_numpy()
    dy = y - m["norm_flux"].to_numpy(float)
    dvar = extra_var
    uniq, inv = np.unique(idx, return_inverse=True)
    dy_sum = np.bincount(inv, weights=dy)
    dv_sum = np.bincount(inv, weights=dvar)
    cy = out.columns.get_loc("norm_flux")
    ce = out.columns.get_loc("norm_flux_err")
    out.iloc[uniq, cy] = out.iloc[uniq, cy].to_numpy(float) + dy_sum
    old = out.iloc[uniq, ce].to_numpy(float)
    out.iloc[uniq, ce] = np.sqrt(old * old + dv_sum)
    return out


def _table_psf_columns(lc, default_fwhm, sample_s, column_per_fwhm=COLUMN_PER_KERNEL_FWHM):
    """Per row of ``lc``: PSF FWHM (px; ``default_fwhm`` where unknown) and the shutter window (mjd) of
    its exposure (``None, None`` without ``sample`` and ``expnum`` columns)."""
    if "lsf_fwhm_px" in lc.columns:
        fw = pd.to_numeric(lc["lsf_fwhm_px"], errors="coerce").to_numpy(float) / float(column_per_fwhm)
        fw = np.where(np.isfinite(fw) & (fw > 0), fw, float(default_fwhm))
    else:
        fw = np.full(len(lc), float(default_fwhm))
    if not {"sample", "expnum"} <= set(lc.columns):
        return fw, None, None
    k = lc["sample"].to_numpy(float)
    opening = lc["mjd"].to_numpy(float) - (k + 0.5) * sample_s / SECONDS_PER_DAY
    keys = [c for c in ("night", "ccd") if c in lc.columns] + ["star_id", "expnum"]
    lo = pd.Series(opening).groupby([lc[c].to_numpy() for c in keys]).transform("median").to_numpy()
    # whole exposure: as many unstored shutter-ramp samples at the end as at the start (see SeriesBlock)
    n_k = int(np.nanmax(k)) + 1 + int(np.nanmin(k)) if len(k) else 1
    return fw, lo, lo + n_k * sample_s / SECONDS_PER_DAY


def _event_flux(t_s, te, u0, rho, fs, sample_s, supersample, fwhm_px=None, window=None):
    """``fs A + 1 - fs`` as sampled; ``t_s`` relative to t0.

    Without ``fwhm_px``: averaged over each sample's exposure (``t_s`` of any
    shape, parameters broadcast). With ``fwhm_px`` (per sample or scalar; one
    event, ``t_s`` 1-D) and optionally ``window`` (shutter open/close of each
    sample's exposure, s from t0): PSF-smeared (:class:`~.fit.Smear`) within
    :data:`SMEAR_SPAN_TE` tE of t0, averaged over the sample beyond.
    """
    n = max(int(supersample), 1)
    off = ((np.arange(n) + 0.5) / n - 0.5) * sample_s
    if fwhm_px is None:
        a = microlensing_magnification_curve(t_s[..., None] + off, 0.0, te, u0, rho).mean(axis=-1)
        return fs * a + 1.0 - fs
    t_s = np.asarray(t_s, float)
    a = microlensing_magnification_curve(t_s[:, None] + off[None, :], 0.0, te, u0, rho).mean(axis=-1)
    near = np.abs(t_s) <= SMEAR_SPAN_TE * te * max(1.0, rho) + SMEAR_SPAN_S
    if near.any():
        fw = np.broadcast_to(np.asarray(fwhm_px, float), t_s.shape)[near]
        win = None if window is None else tuple(np.broadcast_to(np.asarray(w, float), t_s.shape)[near]
                                                for w in window)
        sm = Smear(t_s[near], sample_s, fw, supersample, win)
        a[near] = sm(microlensing_magnification_curve, 0.0, te, u0, rho)
    return fs * a + 1.0 - fs


def _inject_blocks(blocks, params, rng, *, source_noise_fraction, supersample, sample_s, psf_smear=True,
                   psf_fwhm_px=DEFAULT_PSF_FWHM_PX, psf_column_per_fwhm=COLUMN_PER_KERNEL_FWHM):
    """Blocks with the events of ``params`` added (same recipe as :func:`inject_microlensing`)."""
    q = float(np.clip(source_noise_fraction, 0.0, 1.0))
    out = []
    for b in blocks:
        sel = np.ones(len(params), bool)
        if "night" in params.columns and b.night is not None:
            sel &= (params["night"].astype(str) == str(b.night)).to_numpy()
        if "ccd" in params.columns and b.ccd is not None:
            sel &= (params["ccd"].astype(str) == str(b.ccd)).to_numpy()
        p = params[sel]
        p = p[np.isin(p["star_id"].to_numpy(), b.star_id)]
        if p.empty:
            out.append(b)
            continue
        row_of = {sid: i for i, sid in enumerate(b.star_id)}
        rows = np.array([row_of[s] for s in p["star_id"]])
        y = b.y[rows].copy()
        err = b.err[rows].copy()
        for k, ev in enumerate(p.itertuples(index=False)):
            pres = b.present[rows[k]]
            t = (b.mjd[rows[k], pres] - ev.t0_mjd) * SECONDS_PER_DAY
            fs = getattr(ev, "fs", 1.0)
            fs = 1.0 if fs is None or not np.isfinite(fs) else float(fs)
            if psf_smear:
                gidx = np.flatnonzero(pres)
                fw = b.exposure_fwhm_px(psf_fwhm_px, psf_column_per_fwhm)[gidx // b.samples_per_exposure]
                lo, hi = b.sample_windows(rows[k], gidx, sample_s)
                win = ((lo - ev.t0_mjd) * SECONDS_PER_DAY, (hi - ev.t0_mjd) * SECONDS_PER_DAY)
                f = _event_flux(t, ev.te_s, ev.u0, ev.rho, fs, sample_s, supersample or INJECT_SUPERSAMPLE,
                                fwhm_px=fw, window=win)
            else:
                f = _event_flux(t, ev.te_s, ev.u0, ev.rho, fs, sample_s, supersample or 3)
            base = np.median(y[k, pres])
            sig = err[k, pres]
            extra = np.clip(sig * sig * q * (f - 1.0), 0.0, None)
            y[k, pres] += base * (f - 1.0) + rng.standard_normal(pres.sum()) * np.sqrt(extra)
            err[k, pres] = np.sqrt(sig * sig + extra)
        out.append(with_modified_rows(b, rows, y, err))
    return out


@dataclass
class EfficiencyResult:
    """Output of :func:`efficiency`.

    Attributes
    ----------
    table : pandas.DataFrame
        Per grid cell: ``te_s, u0, rho, mag, n_injected, n_detected,
        efficiency, efficiency_err, frac_t0_within_0p5s,
        frac_te_within_30pct, median_abs_dt0_s, median_te_ratio``.
    injections : pandas.DataFrame
        Per injection: truth, detection, fitted ``t0``/``tE``.
    thresholds : dict
        Detection thresholds used.
    """

    table: pd.DataFrame
    injections: pd.DataFrame
    thresholds: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        t = self.table
        lines = [f"efficiency: {int(t['n_injected'].sum())} injections in {len(t)} cells, "
                 f"overall {t['n_detected'].sum() / max(t['n_injected'].sum(), 1):.3f}"]
        for key, thr in self.thresholds.items():
            lines.append(f"  threshold ({key}): delta-chi2 = {thr:.1f}")
        by = t.groupby("te_s")[["n_detected", "n_injected"]].sum()
        for te, r in by.iterrows():
            lines.append(f"  tE = {te:g} s: {r['n_detected'] / max(r['n_injected'], 1):.3f}")
        for f in self.files:
            lines.append(f"  wrote {f}")
        return lines


def _star_nights(lc, star_tab, mag_column):
    keys = ["star_id"] + (["night"] if "night" in lc.columns else [])
    blk = keys + (["ccd"] if "ccd" in lc.columns else [])
    sn = lc.groupby(blk, sort=False)["mjd"].agg(["min", "max"]).reset_index()
    if star_tab is not None and mag_column in star_tab.columns:
        sn["mag"] = star_tab[mag_column].reindex(sn["star_id"]).to_numpy(float)
    else:
        sn["mag"] = np.nan
    return sn


def efficiency(lc: pd.DataFrame, stars: pd.DataFrame | None = None, *, te_s=(1.0, 3.0, 10.0, 30.0),
               u0=(0.1, 0.5), rho=(0.01, 1.0), mags=None, n_per_cell: int = 20, seed: int = 0, null=None,
               mag_column: str = "r", mag_tolerance: float = 0.5, max_fraction: float = 0.05,
               t0_mode: str = "exposures", source_noise_fraction: float = 1.0, return_result: bool = False,
               **search_kwargs):
    """Injection-recovery detection efficiency on a grid of ``tE, u0, rho, mag``.

    Parameters
    ----------
    lc : pandas.DataFrame
        Light-curve table to inject into (real store or synthetic).
    stars : pandas.DataFrame, optional
        ``star_id`` and ``mag_column`` (and ``ra, dec`` for the vetoes).
    te_s, u0, rho : sequences
        Grid of event parameters.
    mags : sequence, optional
        Magnitude grid: injections go into stars within ``mag_tolerance`` of
        each value. ``None``: any star (``mag`` is NaN in the table).
    n_per_cell : int
        Injections per grid cell.
    seed : int
    null : dict or NullDistribution, optional
        Pre-computed null distribution; otherwise calibrated once on ``lc``.
    max_fraction : float
        At most this fraction of a CCD-night's stars is injected per search run.
    t0_mode : {"exposures", "night"}
        ``"exposures"``: ``t0`` uniform over the observed samples (inside
        exposures), the efficiency of events that happen while observing;
        ``"night"``: uniform from the first to the last sample (includes the
        gaps: the duty cycle enters the efficiency).
    source_noise_fraction : float
        See :func:`inject_microlensing`.
    return_result : bool
        Return an :class:`EfficiencyResult` instead of the table.
    **search_kwargs
        Passed to :func:`search` (e.g. ``false_alarm_rate``, ``widths``).

    Returns
    -------
    pandas.DataFrame or EfficiencyResult
    """
    if t0_mode not in ("exposures", "night"):
        raise EventSearchError(f"efficiency: t0_mode must be 'exposures' or 'night', got {t0_mode!r}")
    rng = np.random.default_rng(seed)
    star_tab = _star_table(stars, lc)
    calib_keys = ("n_scrambles", "widths", "sign", "null_pool", "n_workers", "bad_flag_mask", "rescale_errors")
    ck = {k: search_kwargs[k] for k in calib_keys if k in search_kwargs}
    blocks = build_blocks(lc, bad_flag_mask=ck.get("bad_flag_mask"), rescale_errors=ck.get("rescale_errors", True))
    if null is None:
        null = calibrate_null(blocks, n_scrambles=ck.get("n_scrambles", 20), seed=seed,
                              widths=ck.get("widths", DEFAULT_WIDTHS), sign=ck.get("sign", "positive"),
                              null_pool=ck.get("null_pool", "night"), n_workers=ck.get("n_workers", 1))
    sn = _star_nights(lc, star_tab, mag_column)
    mag_grid = [np.nan] if mags is None else list(mags)
    obs_times = None
    if t0_mode == "exposures":
        kk = ["star_id"] + (["night"] if "night" in lc.columns else [])
        obs_times = lc.groupby(kk)["mjd"].apply(np.asarray)
    sample_s = _sample_seconds(lc)

    inj = []
    for te, u, r, mg in itertools.product(te_s, u0, rho, mag_grid):
        elig = sn if np.isnan(mg) else sn[np.abs(sn["mag"] - mg) <= mag_tolerance]
        if elig.empty:
            log.warning("efficiency: no star within %.2f mag of %.2f; cell skipped", mag_tolerance, mg)
            continue
        pick = elig.iloc[rng.integers(0, len(elig), n_per_cell)]
        for _, s in pick.iterrows():
            if t0_mode == "exposures":
                key = (s["star_id"], s["night"]) if "night" in s.index else s["star_id"]
                tt = obs_times.loc[key]
                t0 = float(tt[rng.integers(0, len(tt))]) + rng.uniform(-0.5, 0.5) * sample_s / SECONDS_PER_DAY
            else:
                t0 = float(rng.uniform(s["min"], s["max"]))
            d = {"star_id": s["star_id"], "t0_mjd": t0, "te_s": te, "u0": u, "rho": r, "mag": mg,
                 "star_mag": s["mag"]}
            for k in ("night", "ccd"):
                if k in s.index:
                    d[k] = s[k]
            inj.append(d)
    inj = pd.DataFrame(inj)
    if inj.empty:
        raise EventSearchError("efficiency: no injection possible (no star matches the magnitude grid)")
    inj = inj.sample(frac=1.0, random_state=int(rng.integers(2**31))).reset_index(drop=True)

    # batches: each star-night at most once, at most max_fraction of a block's stars
    blk = [k for k in ("night", "ccd") if k in inj.columns]
    n_block = sn.groupby(blk).size() if blk else pd.Series({(): len(sn)})
    inj["batch"] = -1
    counters: dict = {}
    used: dict = {}
    for i, row in inj.iterrows():
        bkey = tuple(row[k] for k in blk)
        cap = max(1, int(max_fraction * (n_block.loc[bkey if len(bkey) > 1 else bkey[0]] if blk else len(sn))))
        b = 0
        snk = (row["star_id"],) + bkey
        while counters.get((b, bkey), 0) >= cap or snk in used.get(b, set()):
            b += 1
        counters[(b, bkey)] = counters.get((b, bkey), 0) + 1
        used.setdefault(b, set()).add(snk)
        inj.at[i, "batch"] = b

    skw = dict(search_kwargs)
    skw.pop("n_scrambles", None)
    results = []
    thresholds = {}
    skw.pop("bad_flag_mask", None)
    skw.pop("rescale_errors", None)
    stars_tab = stars if stars is not None else (star_tab.reset_index() if star_tab is not None else None)
    for b, grp in inj.groupby("batch"):
        blocks_b = _inject_blocks(blocks, grp, np.random.default_rng([int(seed), int(b)]),
                                  source_noise_fraction=source_noise_fraction, supersample=None, sample_s=sample_s,
                                  psf_smear=search_kwargs.get("psf_smear", True),
                                  psf_fwhm_px=search_kwargs.get("psf_fwhm_px", DEFAULT_PSF_FWHM_PX),
                                  psf_column_per_fwhm=search_kwargs.get("psf_column_per_fwhm", COLUMN_PER_KERNEL_FWHM))
        res = search(None, stars=stars_tab, null=null, only_star_ids=grp["star_id"].unique(), blocks=blocks_b,
                     **skw)
        thresholds.update(res.thresholds)
        results.append(_match(grp, res.candidates))
        log.info("efficiency batch %d: %d injections", b, len(grp))
    injections = pd.concat(results, ignore_index=True)
    table = _aggregate(injections)
    if return_result:
        return EfficiencyResult(table=table, injections=injections, thresholds=thresholds)
    return table


def _match(grp, cands):
    g = grp.copy()
    g["detected"] = False
    g["above_threshold"] = False
    g["vetoes"] = 0
    g["statistic"] = np.nan
    g["t0_fit_mjd"] = np.nan
    g["te_fit_s"] = np.nan
    if cands.empty:
        return g
    keys = ["star_id"] + (["night"] if "night" in g.columns and "night" in cands.columns else [])
    c = cands.drop_duplicates(keys).set_index(keys)
    for i, row in g.iterrows():
        k = tuple(row[x] for x in keys) if len(keys) > 1 else row["star_id"]
        if k not in c.index:
            continue
        cr = c.loc[k]
        t0f = cr.get("t0_mjd", np.nan)
        if not np.isfinite(t0f):
            t0f = 0.5 * (cr["window_start_mjd"] + cr["window_end_mjd"])
        g.at[i, "statistic"] = cr["statistic"]
        g.at[i, "above_threshold"] = bool(cr["above_threshold"])
        g.at[i, "vetoes"] = int(cr["vetoes"])
        g.at[i, "t0_fit_mjd"] = t0f
        g.at[i, "te_fit_s"] = cr.get("te_s", np.nan)
        # within the event: half-duration ~ tE for a point source, ~ rho tE for a large source
        close = abs(t0f - row["t0_mjd"]) * SECONDS_PER_DAY <= max(1.0, row["te_s"] * max(1.0, row["rho"]))
        g.at[i, "detected"] = bool(cr["above_threshold"]) and int(cr["vetoes"]) == 0 and close
    g["dt0_s"] = (g["t0_fit_mjd"] - g["t0_mjd"]) * SECONDS_PER_DAY
    g["te_ratio"] = g["te_fit_s"] / g["te_s"]
    return g


def _aggregate(inj):
    rows = []
    for (te, u, r, mg), g in inj.groupby(["te_s", "u0", "rho", "mag"], dropna=False):
        n = len(g)
        k = int(g["detected"].sum())
        p = k / n
        d = g[g["detected"]]
        rows.append({
            "te_s": te, "u0": u, "rho": r, "mag": mg, "n_injected": n, "n_detected": k, "efficiency": p,
            "efficiency_err": float(np.sqrt(max(p * (1 - p), 1.0 / n) / n)),
            "frac_t0_within_0p5s": float((d["dt0_s"].abs() <= 0.5).sum() / n),
            "frac_te_within_30pct": float(((d["te_ratio"] - 1).abs() <= 0.3).sum() / n),
            "median_abs_dt0_s": float(d["dt0_s"].abs().median()) if k else np.nan,
            "median_te_ratio": float(d["te_ratio"].median()) if k else np.nan,
        })
    return pd.DataFrame(rows)


def plot_efficiency(table: pd.DataFrame, ax=None, *, u0=None, rho=None):
    """Efficiency versus tE, one curve per magnitude (averaged over u0/rho unless selected).

    Returns
    -------
    matplotlib.axes.Axes
    """
    import matplotlib.pyplot as plt

    t = table
    if u0 is not None:
        t = t[np.isclose(t["u0"], u0)]
    if rho is not None:
        t = t[np.isclose(t["rho"], rho)]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for mg, g in t.groupby("mag", dropna=False):
        s = g.groupby("te_s")[["n_detected", "n_injected"]].sum()
        eff = s["n_detected"] / s["n_injected"]
        err = np.sqrt(np.maximum(eff * (1 - eff), 1.0 / s["n_injected"]) / s["n_injected"])
        label = "all stars" if pd.isna(mg) else f"mag {mg:g}"
        ax.errorbar(s.index, eff, yerr=err, marker="o", capsize=2, label=label)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("tE (s)")
    ax.set_ylabel("detection efficiency")
    sel = []
    if u0 is not None:
        sel.append(f"u0={u0:g}")
    if rho is not None:
        sel.append(f"rho={rho:g}")
    ax.set_title("injection-recovery" + (" (" + ", ".join(sel) + ")" if sel else ""))
    ax.legend()
    return ax


def run_efficiency(out_dir, store=None, seed: int = 0, *, n_per_cell: int = 10, n_stars: int = 300,
                   n_exposures: int = 20, **kwargs) -> EfficiencyResult:
    """The ``pydriftn efficiency`` command: efficiency table and plot in ``out_dir``.

    Injects into a store's light curves if ``store`` is given, else into a
    synthetic CCD-night (``n_stars`` stars, ``n_exposures`` exposures, r = 15-20.5,
    noise from :func:`~.synthetic.noise_per_sample`). ``kwargs`` go to
    :func:`efficiency` (grid, ``false_alarm_rate``, ...).
    """
    from .search import _read_store, save_png, store_catalogue
    from .synthetic import simulate_lightcurves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if store is not None:
        lc = _read_store(store)
        stars = store_catalogue(store)
    else:
        lc, stars = simulate_lightcurves(n_stars, n_exposures,
                                         mags=np.random.default_rng(seed).uniform(15, 20.5, n_stars), seed=seed)
    kw = dict(te_s=(0.3, 1.0, 3.0, 10.0, 30.0, 100.0), u0=(0.1, 0.5), rho=(0.01, 1.0), mags=(16.0, 18.0, 20.0),
              n_per_cell=n_per_cell, seed=seed, false_alarm_rate=DEFAULT_FALSE_ALARM_RATE)
    kw.update(kwargs)
    res = efficiency(lc, stars, return_result=True, **kw)
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    from ..io import write_table_atomic

    files = [write_table_atomic(res.table, out / "efficiency.csv"),
             write_table_atomic(res.injections, out / "injections.parquet")]
    fig = Figure(figsize=(6, 4))
    plot_efficiency(res.table, ax=fig.add_subplot())
    files.append(save_png(fig, out / "efficiency.png"))
    res.files = files
    return res
