"""Benchmark of the event search on one full-size CCD-night (synthetic light curves).

2000 stars x 100 exposures x 37 samples (7.4 M samples), r = 15-20 with the
noise model of :func:`pydriftn.events.noise_per_sample` (S/N ~ 50 per 0.54 s
sample at r = 17). Prints:

* search time (scan + 20 scrambles + fits), target <= 60 s on 2 cores;
* false positives on this event-free CCD-night at the default threshold (FAP
  3e-5 per star-night; target: a false-positive rate <= 1e-4) and the
  calibration of the reported false-alarm probabilities;
* injection-recovery efficiency on a grid of tE, u0, rho, mag (t0 uniform
  over the observed samples, and over the whole night for one cell row).

The injected events are seen through the PSF as in real series (convolved with
the Moffat beta = 3 line-spread function along the drift, FWHM
:data:`pydriftn.events.fit.DEFAULT_PSF_FWHM_PX` = 3.7 px since synthetic
series have no ``lsf_fwhm_px``), and the fits use the same smeared models;
``--no-smear`` injects and fits without the PSF (the behaviour before issue #8).

Run: ``python benchmarks/bench_events.py [--quick]`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from pydriftn.events import build_blocks, efficiency, scan_block, search, simulate_lightcurves
from pydriftn.events.series import _error_scale, _weighted_mean
from pydriftn.events.search import DEFAULT_FALSE_ALARM_RATE as FAR


def _fresh_noise_block(template, rng):
    """A new event-free Gaussian realisation of a block (same stars, errors and times), built in numpy."""
    from dataclasses import replace

    y = 1.0 + rng.standard_normal(template.y.shape) * template.err
    one = np.ones(template.n_stars)
    ybar = _weighted_mean(y, template.err, template.valid, one)
    scale, _ = _error_scale(y, template.err, template.valid, ybar, template.samples_per_exposure, template.diff_ratio)
    ybar = _weighted_mean(y, template.err, template.valid, scale)
    return replace(template, y=y, err_scale=scale, ybar=ybar)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stars", type=int, default=2000)
    ap.add_argument("--exposures", type=int, default=100)
    ap.add_argument("--scrambles", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="threads for the scrambles")
    ap.add_argument("--per-cell", type=int, default=10)
    ap.add_argument("--fp-nights", type=int, default=25,
                    help="extra event-free CCD-night realisations scanned for the false-positive rate")
    ap.add_argument("--quick", action="store_true", help="500 stars x 20 exposures, small grid")
    ap.add_argument("--no-smear", action="store_true", help="inject and fit events without the PSF smearing")
    args = ap.parse_args(argv)
    if args.quick:
        args.stars, args.exposures, args.per_cell, args.fp_nights = 500, 20, 5, 5

    psf = dict(psf_smear=not args.no_smear)
    print("events injected and fitted " + ("WITHOUT the PSF smearing" if args.no_smear else
          "through the PSF (Moffat beta = 3 line-spread function along the drift, FWHM 3.7 px)"))
    t = time.perf_counter()
    rng = np.random.default_rng(2026)
    lc, stars = simulate_lightcurves(args.stars, args.exposures, mags=rng.uniform(15, 20, args.stars), seed=1)
    t_sim = time.perf_counter() - t
    print(f"synthetic CCD-night: {args.stars} stars x {args.exposures} exposures x 37 samples = {len(lc):,} samples "
          f"({t_sim:.1f} s to simulate)")

    t, c = time.perf_counter(), time.process_time()
    res = search(lc, stars, n_scrambles=args.scrambles, false_alarm_rate=FAR, n_workers=args.workers, seed=0, **psf)
    t_search, c_search = time.perf_counter() - t, time.process_time() - c
    print(f"search time: {t_search:.1f} s wall, {c_search:.1f} s CPU, {args.workers} worker thread(s), "
          f"{args.scrambles} scrambles; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores   "
          "(target <= 60 s per CCD-night on 2 cores)")
    for line in res.summary_lines():
        print("  " + line)

    sn = res.star_nights
    n = len(sn)
    print("false positives on event-free data (no events injected):")
    print(f"  detections at the default threshold (FAP {FAR:g}): {len(res.detections)} of {n} star-nights "
          f"(expected {FAR * n:.2f}; target rate <= 1e-4)")
    for p in (1e-1, 1e-2, 1e-3):
        k = int((sn['false_alarm_prob'] <= p).sum())
        print(f"  star-nights with reported FAP <= {p:g}: {k} ({k / n:.2e}, expected {p:g})")

    if args.fp_nights:
        t = time.perf_counter()
        template = build_blocks(lc)[0]
        nd = res.null["night=n1"]
        frng = np.random.default_rng(77)
        stats = np.concatenate([scan_block(_fresh_noise_block(template, frng)).statistic
                                for _ in range(args.fp_nights)])
        print(f"  {args.fp_nights} more event-free realisations ({stats.size} star-nights, scan only, "
              f"{time.perf_counter() - t:.0f} s), thresholds from the scrambles of the first:")
        for far in (1e-2, 1e-3, 1e-4, 5e-5, 3e-5):
            k = int((stats >= nd.threshold(far)).sum())
            print(f"    false-alarm rate {far:g}: threshold {nd.threshold(far):.1f}, false positives {k} "
                  f"(rate {k / stats.size:.2e}, expected {far * stats.size:.1f})")

    t = time.perf_counter()
    grid = dict(te_s=(0.3, 1.0, 3.0, 10.0, 30.0, 100.0), u0=(0.1, 0.5, 1.0, 2.0), rho=(0.01, 1.0, 5.0),
                mags=(16.0, 18.0, 19.5))
    if args.quick:
        grid = dict(te_s=(1.0, 10.0), u0=(0.1, 0.5), rho=(0.01, 1.0), mags=(16.0, 19.0))
    eff = efficiency(lc, stars, n_per_cell=args.per_cell, seed=3, null=res.null, false_alarm_rate=FAR,
                     return_result=True, **grid, **psf)
    t_eff = time.perf_counter() - t
    tab = eff.table
    print(f"efficiency ({int(tab['n_injected'].sum())} injections, t0 inside exposures, FAR {FAR:g}; {t_eff:.0f} s):")
    with pd.option_context("display.width", 160):
        for by in (["mag", "te_s"], ["u0", "te_s"], ["rho", "te_s"]):
            piv = tab.groupby(by)[["n_detected", "n_injected"]].sum()
            piv["eff"] = piv["n_detected"] / piv["n_injected"]
            print(f"  efficiency by {by[0]} (rows) and tE in s (columns), other parameters pooled:")
            print("    " + piv["eff"].unstack("te_s").round(2).to_string().replace("\n", "\n    "))
    strong = tab[(tab["u0"] == 0.1)]
    d = strong["n_detected"].sum()
    print(f"  u0 = 0.1 cells: efficiency {d / strong['n_injected'].sum():.3f}; of the detected, "
          f"t0 within 0.5 s: {strong['frac_t0_within_0p5s'].mul(strong['n_injected']).sum() / max(d, 1):.3f}, "
          f"tE within 30 %: {strong['frac_te_within_30pct'].mul(strong['n_injected']).sum() / max(d, 1):.3f}")
    # the brief's reference case: peak A >= 1.5, duration above A = 1.1 >= 2 s, S/N ~ 50 (r ~ 17)
    ref = efficiency(lc, stars, te_s=(2.0, 5.0), u0=(0.3,), rho=(0.1, 0.6), mags=(17.0,), n_per_cell=args.per_cell,
                     seed=4, null=res.null, false_alarm_rate=FAR, return_result=True, **psf)
    inj = ref.injections
    ok = inj["detected"] & (inj["dt0_s"].abs() <= 0.5) & ((inj["te_ratio"] - 1).abs() <= 0.3)
    print(f"  reference events (A_peak >= 1.5, >= 2 s above A = 1.1, r = 17 / S/N ~ 50): found {inj['detected'].mean():.3f}, "
          f"found with t0 within 0.5 s and tE within 30 %: {ok.mean():.3f}   (target >= 0.9)")
    night = efficiency(lc, stars, te_s=(1.0, 10.0), u0=(0.1,), rho=(0.01,), mags=(17.0,), n_per_cell=args.per_cell,
                       seed=5, null=res.null, false_alarm_rate=FAR, t0_mode="night", **psf)
    print("  t0 uniform over the night (gaps included, duty cycle 37*0.54/(20+28) s ~ 0.42): "
          + ", ".join(f"tE={r.te_s:g} s: {r.efficiency:.2f}" for r in night.itertuples()))


if __name__ == "__main__":
    main()
