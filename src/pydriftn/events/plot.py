"""Plot of a candidate's light curve with its best-fit models (matplotlib imported lazily).

With ``level_e_s`` in the table the series is drawn on the night scale the search and the fits use
(see :mod:`.series`), else as ``norm_flux``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .fit import DEFAULT_PSF_FWHM_PX, flare_model, microlensing_model
from .series import COLUMN_PER_KERNEL_FWHM, SECONDS_PER_DAY, build_blocks, default_bad_flag_mask

__all__ = ["plot_candidate"]


def plot_candidate(lc: pd.DataFrame, candidate, ax=None, *, bad_flag_mask: int | None = None,
                   window_s: float | None = None):
    """Plot the star-night light curve around a candidate, with the fitted models.

    Parameters
    ----------
    lc : pandas.DataFrame
        Light-curve table containing the candidate's star.
    candidate : pandas.Series or dict
        A row of :attr:`SearchResult.candidates`.
    ax : matplotlib.axes.Axes, optional
    bad_flag_mask : int, optional
        Samples with these flags are drawn as crosses (excluded from the search).
    window_s : float, optional
        Half-width of the plotted time range around the window (default
        ``max(3 x window duration, 60 s)``).

    Returns
    -------
    matplotlib.axes.Axes
    """
    import matplotlib.pyplot as plt

    c = dict(candidate)
    if bad_flag_mask is None:
        bad_flag_mask = default_bad_flag_mask()
    sel = lc["star_id"] == c["star_id"]
    for k in ("night", "ccd"):
        if k in lc.columns and k in c and pd.notna(c[k]):
            sel &= lc[k] == c[k]
    d = lc.loc[sel].sort_values("mjd")
    ylabel = "norm_flux"
    if "level_e_s" in lc.columns and len(d):
        d = _night_scaled(lc, d, c, bad_flag_mask)
        ylabel = "flux / night level"
    t_lo, t_hi = float(c["window_start_mjd"]), float(c["window_end_mjd"])
    t_ref = 0.5 * (t_lo + t_hi)
    dur = (t_hi - t_lo) * SECONDS_PER_DAY
    half = window_s if window_s is not None else max(3.0 * dur, 60.0)
    t = (d["mjd"].to_numpy() - t_ref) * SECONDS_PER_DAY
    m = np.abs(t) <= half + dur / 2
    t, d = t[m], d.loc[m]
    flags = d["flags"].to_numpy() if "flags" in d.columns else np.zeros(len(d), int)
    bad = (flags & int(bad_flag_mask)) != 0
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    ax.errorbar(t[~bad], d["norm_flux"].to_numpy()[~bad], yerr=d["norm_flux_err"].to_numpy()[~bad], fmt=".",
                ms=3, color="k", alpha=0.7, lw=0.5, label="samples")
    if bad.any():
        ax.plot(t[bad], d["norm_flux"].to_numpy()[bad], "x", color="tab:red", label="flagged (excluded)")
    ax.axvspan((t_lo - t_ref) * SECONDS_PER_DAY, (t_hi - t_ref) * SECONDS_PER_DAY, color="tab:orange", alpha=0.15,
               label="matched-filter window")
    # models on a fine grid, only within exposures (NaN across the gaps)
    tf = np.linspace(t.min(), t.max(), 4000) if len(t) else np.array([])
    step = float(np.median(np.diff(t))) if len(t) > 1 else 0.54  # sample duration (s)
    jump = np.diff(t) > 5 * step  # gaps between exposures
    gap = np.interp(tf, t, np.r_[jump, False].astype(float)) > 0.5 if len(t) > 1 else np.zeros_like(tf, bool)
    # sample-time curves break after each gap (NaN offset on the first sample of an exposure)
    ts = np.where(np.r_[False, jump], np.nan, 0.0) if len(t) else np.zeros(0)
    # the fitted models as the samples see them (smeared by the line-spread function along the drift, at the
    # sample times, as fitted), and thin: the intrinsic light curves
    fw = np.full(len(t), DEFAULT_PSF_FWHM_PX)
    if "lsf_fwhm_px" in d.columns:
        col = pd.to_numeric(d["lsf_fwhm_px"], errors="coerce").to_numpy(float) / COLUMN_PER_KERNEL_FWHM
        fw = np.where(np.isfinite(col) & (col > 0), col, fw)
    if pd.notna(c.get("te_s", np.nan)):
        t0 = (c["t0_mjd"] - t_ref) * SECONDS_PER_DAY
        p = (t0, c["te_s"], c["u0"], c["rho"], c.get("fs", 1.0), c.get("base", 1.0))
        if len(t):
            ax.plot(t + ts, microlensing_model(t, *p, sample_s=step, fwhm_px=fw), color="tab:blue",
                    label=f"microlensing dchi2={c.get('delta_chi2_microlensing', np.nan):.0f}")
        y = microlensing_model(tf, *p)
        y[gap] = np.nan
        ax.plot(tf, y, color="tab:blue", lw=0.6, alpha=0.5, label="microlensing, intrinsic")
    if pd.notna(c.get("rise_s", np.nan)):
        t0 = (c["flare_t0_mjd"] - t_ref) * SECONDS_PER_DAY
        p = (t0, c["flare_amplitude"], c["rise_s"], c["decay_s"], c.get("flare_base", 1.0))
        if len(t):
            ax.plot(t + ts, flare_model(t, *p, sample_s=step, fwhm_px=fw), color="tab:green", ls="--",
                    label=f"flare dchi2={c.get('delta_chi2_flare', np.nan):.0f}")
    ax.set_xlabel(f"seconds from MJD {t_ref:.6f}")
    ax.set_ylabel(ylabel)
    veto = c.get("veto_reasons", "") or "none"
    ax.set_title(f"star {c['star_id']} night {c.get('night', '')} ccd {c.get('ccd', '')}: {c.get('model', '')}, "
                 f"stat={c['statistic']:.1f}, FAP={c['false_alarm_prob']:.2g}, vetoes: {veto}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return ax


def _night_scaled(lc, d, c, bad_flag_mask):
    """``d`` (the star's rows) with ``norm_flux``/``norm_flux_err`` on the night scale of its (night, ccd) block."""
    sub = lc
    for k in ("night", "ccd"):
        if k in lc.columns and k in c and pd.notna(c[k]):
            sub = sub[sub[k] == c[k]]
    blocks = build_blocks(sub, bad_flag_mask=bad_flag_mask, rescale_errors=False)
    d = d.copy()
    for b in blocks:
        hit = np.flatnonzero(b.star_id == c["star_id"])
        if not hit.size:
            continue
        i = int(hit[0])
        e_index = pd.Series(np.arange(len(b.expnum)), index=b.expnum)
        col = e_index.reindex(d["expnum"].to_numpy()).to_numpy() * b.samples_per_exposure + d["sample"].to_numpy()
        ok = np.isfinite(col)
        col = np.where(ok, col, 0).astype(np.int64)
        d["norm_flux"] = np.where(ok & b.present[i, col], b.y[i, col], np.nan)
        d["norm_flux_err"] = np.where(ok & b.present[i, col], b.err[i, col], np.nan)
        break
    return d
