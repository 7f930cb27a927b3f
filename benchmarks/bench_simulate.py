"""Benchmark of pydriftn.simulate: time per full-size CCD and for the small preset.

Run from the repository root::

    python benchmarks/bench_simulate.py            # full CCD render + small preset
    python benchmarks/bench_simulate.py --dataset  # also write a full-preset dataset (1 exposure)

Prints the figures with the targets beside them. Outputs go to
``bench_output/simulate/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


from pydriftn.simulate import make_config, moffat_mog, simulate_dataset
from pydriftn.simulate.dataset import exposure_schedule
from pydriftn.simulate.field import choose_events, make_star_field, make_wcs
from pydriftn.simulate.render import render_drift_ccd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_output" / "simulate"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="store_true", help="also time a full-preset dataset (1 exposure, 2 CCDs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crowded", type=int, default=0, metavar="N",
                    help="also time one full CCD with N stars per CCD (crowding)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus={os.cpu_count()}")

    psf = moffat_mog(3.0, 3)
    print(f"PSF: Moffat beta=3 as 3 Gaussians, peak error {psf.max_rel_error:.2%}, "
          f"enclosed-flux error {psf.ee_error:.2%}, FWHM ratio {psf.fwhm_ratio:.4f}")

    # one full-size CCD with ~2000 stars (+ margin stars), one drift exposure
    cfg = make_config("full", ccds=("S4",), n_exposures=1)
    t0 = time.perf_counter()
    stars = make_star_field(cfg, args.seed)
    sched = exposure_schedule(cfg)
    nominal = {c: make_wcs(cfg, c, (cfg.ra_deg, cfg.dec_deg)) for c in cfg.ccds}
    events = choose_events(cfg, stars, args.seed, sched, nominal)
    t1 = time.perf_counter()
    c1 = time.process_time()
    res = render_drift_ccd(cfg, args.seed, stars, events, sched[0], "S4")
    t2 = time.perf_counter()
    c2 = time.process_time()
    tr = res["trails"]
    n_full = int((tr.on_ccd_fraction > 0.999).sum())
    print(f"full CCD 2046x4094: {len(tr)} trails with light on the CCD ({n_full} entirely, the rest cut by edges), "
          f"{len(res['common'])} fine steps of {res['dt_s'] * 1000:.1f} ms")
    print(f"  field setup {t1 - t0:.2f} s; render one CCD (stars, noise, mask, truth) {t2 - t1:.2f} s wall, "
          f"{c2 - c1:.2f} s CPU  [target <= 30 s]")
    if os.path.exists("/proc/loadavg"):
        print(f"  load average during the run: {open('/proc/loadavg').read().split()[0]} on {os.cpu_count()} cpus")

    if args.crowded:
        ccfg = make_config("full", ccds=("S4",), n_exposures=1, n_stars_per_ccd=args.crowded)
        cst = make_star_field(ccfg, args.seed)
        ta, ca = time.perf_counter(), time.process_time()
        cres = render_drift_ccd(ccfg, args.seed, cst, events.iloc[0:0], sched[0], "S4")
        print(f"crowded full CCD, {args.crowded} stars per CCD ({len(cres['trails'])} trails): "
              f"{time.perf_counter() - ta:.1f} s wall, {time.process_time() - ca:.1f} s CPU")

    t3 = time.perf_counter()
    c3 = time.process_time()
    ds = simulate_dataset(OUT / "small", "small", seed=args.seed)
    t4 = time.perf_counter()
    c4 = time.process_time()
    print(f"small preset (2 CCDs 512x1024, 3 drift exposures + pointed g, r, truth, files): {t4 - t3:.2f} s wall, "
          f"{c4 - c3:.2f} s CPU  [target: seconds]")
    sizes = sum(p.stat().st_size for p in ds.out_dir.rglob("*") if p.is_file())
    print(f"  written {sizes / 1e6:.1f} MB to {ds.out_dir}")

    if args.dataset:
        t5 = time.perf_counter()
        ds = simulate_dataset(OUT / "full", "full", seed=args.seed, n_exposures=1)
        t6 = time.perf_counter()
        sizes = sum(p.stat().st_size for p in ds.out_dir.rglob("*") if p.is_file())
        print(f"full preset, 1 exposure, 2 CCDs + pointed g, r: {t6 - t5:.1f} s, {sizes / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
