"""Benchmark of pydriftn.classify on simulated drift exposures (full-size CCDs by default).

Prints, with the targets beside them:

* flashes: fraction of injected flashes with S/N >= 10 recovered as ``flash``
  (also those on star trails) and false flashes per 10 CCD-exposures;
* satellites: fraction found, fraction of streak pixels masked, catalogued
  trails crossed by a streak that are still reported as star trails;
* cosmic rays: fraction classified as ``cosmic_ray`` (all, and those whose
  mean deposit per pixel is >= 5 sigma of the sky), star trails misclassified;
* all of it with the dq mask read and without it;
* time per CCD: CPU time of the calling process (``time.process_time``;
  the budget is CPU on one core, and wall time on a shared machine measures
  the other jobs too) and wall time, with the median wall time split by stage.
  These are single runs per CCD-exposure, each unit's first call (cold
  caches, first calls of compiled kernels): the speed figure is ``--timing K``.

Every missed flash, false flash and unexplained detection on a catalogued
trail (with its along/across-track position on that trail, the star's counts
and saturation) is listed, so that repeat offenders are visible.

Usage::

    python benchmarks/bench_classify.py [--preset full] [--exposures 5] [--seed 11] [--out bench_output/classify]
    python benchmarks/bench_classify.py --timing 3 [--max-units 4]   # CPU time only: min of 3 runs per unit
    python benchmarks/bench_classify.py --timing 3 --worker-malloc   # ... with the pipeline workers' allocator
    python benchmarks/bench_classify.py [--timing 3] --precomputed-sky  # sky from the astrometry's background

``--timing K`` skips the accuracy figures and prints, per CCD-exposure (dq
mask read and not), the smallest CPU time of K runs (the least disturbed by
other jobs on a shared machine) and their median.

``--worker-malloc`` sets up this process's allocator as the pipeline sets up
its worker processes (``pydriftn.pipeline.run._worker_init``: image-sized
arrays served from the heap and reused, no page faults and zeroing for each
new one), i.e. measures the classification as it runs inside the pipeline;
by default the process keeps glibc's defaults (as a stand-alone call would).

``--precomputed-sky`` passes the astrometry's background estimate
(:func:`pydriftn.astrometry.detect.estimate_background`, computed before the
clock starts) as ``classify_exposure_ccd(..., sky=(sky_subtracted, None))``:
the classification's own sky estimate and subtraction are skipped. Its time
is what the pipeline runs only where the pipeline passes that background.

The S/N of an injected flash is computed from the truth: counts over the
noise of an optimal PSF fit on the local background (sky + read noise + the
star light under it, from the fitted trail model), ``S/N = counts /
sqrt(4 pi sigma_psf^2 * var_e)``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def load_units(data_dir):
    """Yield (expnum, ccd, image_path) for every drift exposure x CCD of a dataset."""
    from pydriftn.simulate import load_dataset

    ds = load_dataset(data_dir)
    for expnum in ds.expnums:
        for ccd in ds.config.ccds:
            yield ds, expnum, ccd, ds.drift_images[expnum]


def astrometry_sky(img):
    """The sky-subtracted image and noise the astrometry's background estimate gives (for ``sky=``).

    :func:`pydriftn.astrometry.detect.estimate_background` on the image with
    the dq-flagged and saturated pixels left out, per amplifier, as the
    astrometry stage computes it; the noise is left to the classification.
    """
    from pydriftn.astrometry.detect import estimate_background

    data = img.data
    bad = data >= float(min(img.info.saturation))
    if img.mask is not None:
        bad |= np.asarray(img.mask) != 0
    sub = estimate_background(data, bad, amp_boundary=data.shape[1] // 2)[0]
    return np.ascontiguousarray(sub, dtype=np.float32), None


def classify_unit(ds, expnum, ccd, path, with_mask, trails_all, precomputed_sky=False, **knobs):
    from pydriftn.classify import classify_exposure_ccd
    from pydriftn.geometry import trail_geometry
    from pydriftn.io import read_ccd

    img = read_ccd(path, ccd, mask=True if with_mask else None)
    info = img.info
    geo = trail_geometry(img.wcs, info.exptime, ds.config.drift_rate_arcsec_s)
    tr = trails_all[(trails_all.expnum == expnum) & (trails_all.ccd == ccd)]
    if precomputed_sky:
        knobs = dict(knobs, sky=astrometry_sky(img))  # (computed before the clock starts: the pipeline has it)
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = classify_exposure_ccd(img.data, img.mask, tr, geo, fwhm_px=info.fwhm_px, gain=float(np.mean(info.gain)),
                                read_noise=float(np.mean(info.read_noise)), wcs=img.wcs, mjd_obs=info.mjd,
                                exptime=info.exptime, saturation_adu=float(min(info.saturation)), **knobs)
    dt = time.perf_counter() - t0
    res.meta["cpu_s"] = time.process_time() - c0
    return res, dt, info, geo


def _nearest(tab, x, y):
    if len(tab) == 0:
        return np.inf, None
    d = np.hypot(tab["x"].to_numpy() - x, tab["y"].to_numpy() - y)
    k = int(np.argmin(d))
    return float(d[k]), tab.index[k]


def evaluate(data_dir, with_mask, max_units=None, verbose=False, **knobs):
    from pydriftn.simulate import load_dataset

    ds = load_dataset(data_dir)
    T = {k: ds.read_truth(k) for k in ("trails", "flashes", "satellites", "cosmic_rays", "events")}
    ev_stars = set(T["events"].star_id)
    stats = dict(units=0, fl_n=0, fl_ok=0, fl_on_n=0, fl_on_ok=0, fl_false=0, fl_t_err=[], sat_n=0, sat_ok=0, sat_false=0,
                 sat_mask_frac=[], sat_cross_n=0, sat_cross_ok=0, cr_n=0, cr_ok=0, cr_bright_n=0, cr_bright_ok=0,
                 tr_n=0, tr_bad=0, times=[], counts={}, missed=[], false=[], fl_event=0, tr_bad_list=[])
    for k, (ds_, expnum, ccd, path) in enumerate(load_units(data_dir)):
        if max_units is not None and k >= max_units:
            break
        res, dt, info, geo = classify_unit(ds_, expnum, ccd, path, with_mask, T["trails"], **knobs)
        stats["units"] += 1
        stats["times"].append(dt)
        stats.setdefault("cpu_times", []).append(res.meta["cpu_s"])
        stats.setdefault("stage_times", []).append(res.meta.get("timings", {}))
        for c, v in res.counts.items():
            stats["counts"][c] = stats["counts"].get(c, 0) + v
        tab = res.table
        gain = float(np.mean(info.gain))
        sig_e = res.sky_sigma * gain
        sigma_psf = info.fwhm_px / 2.3548200450309493
        fl = tab[tab["class"] == "flash"]
        crs = tab[tab["class"] == "cosmic_ray"]
        sats = tab[(tab["class"] == "satellite") & tab["subclass"].isin(["hough", "segment", "dqmask"])]
        sel = lambda df: df[(df.expnum == expnum) & (df.ccd == ccd)]
        tf, tc, ts, tt = sel(T["flashes"]), sel(T["cosmic_rays"]), sel(T["satellites"]), sel(T["trails"])
        used_fl = set()
        for _, f in tf.iterrows():
            xi, yi = int(round(f.x)), int(round(f.y))
            ny, nx = res.streak_mask.shape
            if not (0 <= xi < nx and 0 <= yi < ny):
                continue
            if res.streak_mask[yi, xi]:
                continue  # under a satellite streak: masked by design
            star_e = max(float(res.model[yi, xi]), 0.0) * gain
            var_e = sig_e**2 + star_e
            snr = f.counts_e / math.sqrt(4 * math.pi * sigma_psf**2 * var_e)
            if snr < 10:
                continue
            d, idx = _nearest(fl, f.x, f.y)
            ok = d < 2.0
            on = f.get("host_star_id", -1) >= 0
            stats["fl_n"] += 1
            stats["fl_ok"] += ok
            if on:
                stats["fl_on_n"] += 1
                stats["fl_on_ok"] += ok
                if ok and np.isfinite(fl.loc[idx, "t_s"]):
                    stats["fl_t_err"].append(float(fl.loc[idx, "t_s"] - f.t_s))
            if ok:
                used_fl.add(idx)
            else:
                d2, i2 = _nearest(tab, f.x, f.y)
                stats["missed"].append(dict(expnum=expnum, ccd=ccd, x=f.x, y=f.y, snr=snr, on=on,
                                            got=None if i2 is None or d2 > 3 else tab.loc[i2, "class"]))
        # false flashes: not near any truth flash (any S/N), not on the trail of a star with a
        # microlensing event (a short event's peak is an unresolved brightening: a real flash on that star)
        ev_tr = tt[tt.star_id.isin(ev_stars)]
        for idx, r in fl.iterrows():
            if len(tf) and np.min(np.hypot(tf.x - r.x, tf.y - r.y)) < 3.0:
                continue
            if len(ev_tr):
                Le = np.hypot(ev_tr.x_end - ev_tr.x_start, ev_tr.y_end - ev_tr.y_start).to_numpy()
                uxe = (ev_tr.x_end - ev_tr.x_start).to_numpy() / Le
                uye = (ev_tr.y_end - ev_tr.y_start).to_numpy() / Le
                dxe = r.x - ev_tr.x_start.to_numpy()
                dye = r.y - ev_tr.y_start.to_numpy()
                se = dxe * uxe + dye * uye
                ce = dye * uxe - dxe * uye
                if np.any((np.abs(ce) < 2 * info.fwhm_px) & (se > -2 * info.fwhm_px) & (se < Le + 2 * info.fwhm_px)):
                    stats["fl_event"] += 1
                    continue
            stats["fl_false"] += 1
            stats["false"].append(dict(expnum=expnum, ccd=ccd, x=r.x, y=r.y, psf_snr=r.psf_snr,
                                       sharp=r.sharp_ratio, trail_ratio=r.trail_ratio, on_star=r.on_star_id))
        # streaks masked (hough, segment, dqmask) that lie on no simulated satellite: their pixels are masked,
        # and the stars on them lose the exposure
        for _, m in sats.iterrows():
            th = math.radians(m.theta_deg)
            on_true = False
            for _, s in ts.iterrows():
                xm, ym = 0.5 * (s.x0 + s.x1), 0.5 * (s.y0 + s.y1)
                ang_t = math.degrees(math.atan2(s.y1 - s.y0, s.x1 - s.x0)) % 180.0
                ang_m = math.degrees(math.atan2(m.y1 - m.y0, m.x1 - m.x0)) % 180.0
                if abs((ang_m - ang_t + 90) % 180 - 90) < 2.0 and \
                        abs(xm * math.cos(th) + ym * math.sin(th) - m.rho_px) < 10.0:
                    on_true = True
            stats["sat_false"] += not on_true
        # satellites
        for _, s in ts.iterrows():
            stats["sat_n"] += 1
            ang_t = math.degrees(math.atan2(s.y1 - s.y0, s.x1 - s.x0)) % 180.0
            ok = False
            for _, m in sats.iterrows():
                ang_m = math.degrees(math.atan2(m.y1 - m.y0, m.x1 - m.x0)) % 180.0
                dang = abs((ang_m - ang_t + 90) % 180 - 90)
                th = math.radians(m.theta_deg)
                xm, ym = 0.5 * (s.x0 + s.x1), 0.5 * (s.y0 + s.y1)
                dist = abs(xm * math.cos(th) + ym * math.sin(th) - m.rho_px)
                if dang < 1.0 and dist < 3.0:
                    ok = True
            stats["sat_ok"] += ok
            # mask coverage of the streak core (|d| <= FWHM)
            ny, nx = res.streak_mask.shape
            L = math.hypot(s.x1 - s.x0, s.y1 - s.y0)
            ux, uy = (s.x1 - s.x0) / L, (s.y1 - s.y0) / L
            a = np.arange(0, L, 1.0)
            cc = np.arange(-info.fwhm_px, info.fwhm_px + 0.1, 0.5)
            A, C = np.meshgrid(a, cc)
            X = np.rint(s.x0 + A * ux - C * uy).astype(int)
            Y = np.rint(s.y0 + A * uy + C * ux).astype(int)
            okp = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
            stats["sat_mask_frac"].append(float(res.streak_mask[Y[okp], X[okp]].mean()))
            # catalogued trails crossed by the streak, not saturated: still star trails?
            st_rows = tab[(tab["class"] == "star_trail") & (tab["subclass"] == "catalogued")]
            for _, trl in tt.iterrows():
                if trl.saturated:
                    continue
                # crossing test: endpoints on opposite sides of the line and within the segment
                d0 = (trl.x_start - s.x0) * (-uy) + (trl.y_start - s.y0) * ux
                d1 = (trl.x_end - s.x0) * (-uy) + (trl.y_end - s.y0) * ux
                if d0 * d1 < 0:
                    stats["sat_cross_n"] += 1
                    stats["sat_cross_ok"] += bool((st_rows["star_id"] == trl.star_id).any())
        # cosmic rays
        crt = crs
        for _, c in tc.iterrows():
            stats["cr_n"] += 1
            tol = 3.0 + (0.5 * math.sqrt(c.npix) * 2 if c.kind == "track" else 0.0) + (10.0 if c.kind == "track" else 0)
            d, _ = _nearest(crt, c.x, c.y)
            ok = d < tol
            xi, yi = int(round(c.x)), int(round(c.y))
            under = res.streak_mask[min(max(yi, 0), ny - 1), min(max(xi, 0), nx - 1)]
            stats["cr_ok"] += ok or under
            bright = c.counts_e / c.npix >= 5 * sig_e
            if bright:
                stats["cr_bright_n"] += 1
                stats["cr_bright_ok"] += ok or under
        # star trails misclassified: a non-star detection on a catalogued trail, not explained by truth
        nonstar = tab[tab["class"].isin(["flash", "cosmic_ray", "other_trail"])]
        for _, trl in tt.iterrows():
            stats["tr_n"] += 1
            if len(nonstar) == 0:
                continue
            L = math.hypot(trl.x_end - trl.x_start, trl.y_end - trl.y_start)
            ux, uy = (trl.x_end - trl.x_start) / L, (trl.y_end - trl.y_start) / L
            dx = nonstar.x.to_numpy() - trl.x_start
            dy = nonstar.y.to_numpy() - trl.y_start
            s_ = dx * ux + dy * uy
            c_ = dy * ux - dx * uy
            on = (np.abs(c_) < info.fwhm_px) & (s_ > -info.fwhm_px) & (s_ < L + info.fwhm_px)
            bad = False
            for j in np.flatnonzero(on):
                x, y = nonstar.x.iloc[j], nonstar.y.iloc[j]
                expl = (len(tf) and np.min(np.hypot(tf.x - x, tf.y - y)) < 3) or \
                       (len(tc) and np.min(np.hypot(tc.x - x, tc.y - y)) < 12)
                if not expl and not (trl.star_id in ev_stars):
                    bad = True
                    stats["tr_bad_list"].append(dict(expnum=expnum, ccd=ccd, star_id=trl.star_id,
                                                     cls=nonstar["class"].iloc[j], x=round(x, 1), y=round(y, 1),
                                                     s=round(float(s_[j]), 1), c=round(float(c_[j]), 1),
                                                     counts_e=round(trl.counts_e), sat=bool(trl.saturated),
                                                     peak_adu=round(trl.peak_adu)))
            stats["tr_bad"] += bad
        if verbose:
            print(f"  exp {expnum} {ccd}: {res.counts}  {dt:.3f} s", flush=True)
    return stats


def timing(data_dir, repeat, max_units=None, **knobs):
    """Smallest CPU time of ``repeat`` runs of classify_exposure_ccd per unit (with and without the dq mask)."""
    from pydriftn.simulate import load_dataset

    ds = load_dataset(data_dir)
    trails = ds.read_truth("trails")
    best = []
    for k, (ds_, expnum, ccd, path) in enumerate(load_units(data_dir)):
        if max_units is not None and k >= max_units:
            break
        for with_mask in (True, False):
            cpu = []
            for _ in range(repeat):
                res, _, _, _ = classify_unit(ds_, expnum, ccd, path, with_mask, trails, **knobs)
                cpu.append(res.meta["cpu_s"])
            best.append(min(cpu))
            print(f"  exp {expnum} {ccd} mask={with_mask}: CPU min {min(cpu):.3f} s of {repeat} "
                  f"({', '.join(f'{c:.3f}' for c in cpu)}); streaks {res.meta.get('n_streaks', 0)}", flush=True)
    b = np.array(best)
    print(f"CPU time per CCD (min of {repeat} runs each, {len(b)} CCD-exposures): median {np.median(b):.3f} s, "
          f"mean {b.mean():.3f} s, max {b.max():.3f} s   (target <= 0.3 s)")


def report(stats, label):
    f = lambda a, b: (100.0 * a / b) if b else float("nan")
    n10 = stats["units"] / 10.0
    te = np.array(stats["fl_t_err"])
    print(f"--- {label}: {stats['units']} CCD-exposures")
    print(f"flashes S/N>=10 recovered        : {stats['fl_ok']}/{stats['fl_n']} = {f(stats['fl_ok'], stats['fl_n']):.1f} %"
          f"   (target >= 95 %)")
    print(f"  of which on star trails        : {stats['fl_on_ok']}/{stats['fl_on_n']} = "
          f"{f(stats['fl_on_ok'], stats['fl_on_n']):.1f} %; timing error rms "
          f"{(np.sqrt(np.mean(te**2)) if len(te) else float('nan')):.3f} s (n={len(te)})")
    print(f"false flashes per 10 CCD-exp     : {stats['fl_false'] / n10 if n10 else float('nan'):.2f}"
          f"   (target <= 1); flashes on stars with a microlensing event (real brightenings): "
          f"{stats['fl_event']}")
    print(f"satellites found                 : {stats['sat_ok']}/{stats['sat_n']} = {f(stats['sat_ok'], stats['sat_n']):.1f} %"
          f"   (target >= 99 %)")
    if stats["sat_mask_frac"]:
        print(f"  streak core pixels masked      : min {100 * min(stats['sat_mask_frac']):.2f} %, "
              f"mean {100 * np.mean(stats['sat_mask_frac']):.2f} %")
    print(f"  crossed trails kept as stars   : {stats['sat_cross_ok']}/{stats['sat_cross_n']}   (target: all)")
    print(f"false streaks masked             : {stats['sat_false']} in {stats['units']} CCD-exposures "
          f"(lines on no simulated satellite)")
    print(f"cosmic rays classified           : {stats['cr_ok']}/{stats['cr_n']} = {f(stats['cr_ok'], stats['cr_n']):.1f} %"
          f"   (target >= 99 %)")
    print(f"  mean deposit >= 5 sigma/pixel  : {stats['cr_bright_ok']}/{stats['cr_bright_n']} = "
          f"{f(stats['cr_bright_ok'], stats['cr_bright_n']):.1f} %")
    print(f"star trails misclassified        : {stats['tr_bad']}/{stats['tr_n']} = {f(stats['tr_bad'], stats['tr_n']):.3f} %"
          f"   (target <= 0.1 %)")
    c = np.array(stats["cpu_times"])
    # (single cold runs, first-call overheads included: not the speed figure; that is --timing K)
    print(f"CPU per CCD, single cold runs    : median {np.median(c):.3f} s, max {c.max():.3f} s   "
          f"(incl. first-call overheads; speed: --timing 3, target <= 0.3 s)")
    t = np.array(stats["times"])
    print(f"wall per CCD, single cold runs   : median {np.median(t):.3f} s, max {t.max():.3f} s")
    if stats.get("stage_times"):
        stg = pd.DataFrame(stats["stage_times"]).median()
        print("  median per stage (s)           : " + ", ".join(f"{k} {v:.3f}" for k, v in stg.items()))
    print(f"counts: {stats['counts']}")
    if stats["missed"]:
        print("missed flashes:")
        print(pd.DataFrame(stats["missed"]).to_string())
    if stats["false"]:
        print("false flashes:")
        print(pd.DataFrame(stats["false"]).round(3).to_string())
    if stats["tr_bad_list"]:
        print("unexplained detections on catalogued trails (s, c: along/across the trail from its start, px):")
        print(pd.DataFrame(stats["tr_bad_list"]).to_string())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--exposures", type=int, default=5)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--satellite-prob", type=float, default=0.5)
    ap.add_argument("--out", default="bench_output/classify")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--timing", type=int, default=0, metavar="K",
                    help="CPU time only: smallest of K runs per CCD-exposure (no accuracy figures)")
    ap.add_argument("--max-units", type=int, default=None, help="with --timing: first N CCD-exposures only")
    ap.add_argument("--precomputed-sky", action="store_true",
                    help="pass the astrometry's background estimate as sky= (computed outside the timed call; "
                         "counts only where the pipeline passes it)")
    ap.add_argument("--worker-malloc", action="store_true",
                    help="allocator set up as in the pipeline's worker processes (see the module docstring)")
    a = ap.parse_args(argv)
    if a.worker_malloc:
        from pydriftn.pipeline.run import _worker_init

        _worker_init()
    from pydriftn.simulate import simulate_dataset

    data = Path(a.out) / f"{a.preset}-s{a.seed}-n{a.exposures}-p{a.satellite_prob}"
    if not (data / "simulation.json").is_file():
        t0 = time.perf_counter()
        print(f"simulating {a.preset} x {a.exposures} exposures in {data} ...", flush=True)
        simulate_dataset(data, preset=a.preset, seed=a.seed, n_exposures=a.exposures,
                         satellite_prob=a.satellite_prob)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    extra = dict(precomputed_sky=True) if a.precomputed_sky else {}
    if a.timing:
        timing(data, a.timing, a.max_units, **extra)
        return 0
    for with_mask in (True, False):
        st = evaluate(data, with_mask, verbose=a.verbose, **extra)
        report(st, "dq mask read" if with_mask else "no dq mask")
    return 0


if __name__ == "__main__":
    sys.exit(main())
