"""End-to-end pipeline speed: time per full-size (exposure, CCD) unit and throughput.

Simulates one full-size drift exposure with two CCDs (cached in
``bench_output/pipeline``), builds the catalogue, then runs the very unit
function of ``pydriftn run`` on ``--units`` units (default 60, the CCD count of
one DECam exposure; the two simulated CCDs are reused under distinct exposure
numbers) with 1 and 2 worker processes. Prints the time per unit (with a
breakdown by stage for one unit) and the wall time for a 60-CCD exposure:
"cold" includes starting the worker processes for just these units; "warm"
is the steady state of a run, whose pool stays up for the whole night (BLAS
single-threaded per worker and freed memory kept for the next unit, as
``pydriftn run`` sets them up).

Target: a 60-CCD exposure processed in <= 20 s on 2 cores (DECam takes one
every ~48 s).

Also prints the process CPU time per unit and per stage (median of
``--cpu-units`` units in one worker set up as the pipeline's): unlike the wall
times, valid on a busy machine.

Usage: python benchmarks/bench_pipeline.py [--units 60] [--stars 2000] [--cpu-units 5]
"""

from __future__ import annotations

import argparse
import os
import cProfile
import pstats
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pydriftn.config import config_from_dict  # noqa: E402
from pydriftn.pipeline.run import _one_thread_per_worker, _unit_config, _worker_init, run_unit  # noqa: E402
from pydriftn.pipeline.stages import prepare_catalogue  # noqa: E402
from pydriftn.pipeline.units import Unit, discover_units  # noqa: E402
from pydriftn.simulate import simulate_dataset  # noqa: E402


def _dataset(stars: int, fresh: bool):
    out = ROOT / "bench_output" / f"pipeline_{stars}"
    if fresh and out.exists():
        shutil.rmtree(out)
    if not (out / "simulation.json").is_file():
        t0 = time.perf_counter()
        simulate_dataset(out, preset="full", seed=11, n_exposures=1, ccds=["S4", "N4"],
                         n_stars_per_ccd=stars)
        print(f"simulated 2 full-size CCDs x 1 exposure in {time.perf_counter() - t0:.1f} s")
    return out


def _quiet_worker_init():
    """The pipeline's worker set-up, without the stages' warnings on stderr (the run's own log is not kept here)."""
    import logging

    logging.disable(logging.WARNING)
    _worker_init()


def _warm_up(_):
    """Import the stages in a worker (what a pool that stays up for the night has done long before)."""
    import pydriftn.pipeline.stages  # noqa: F401

    return os.getpid()


#: Stage functions timed by :func:`_cpu_breakdown`: (label, module, attribute). The stages import them from
#: these modules when called, so wrapping the module attributes times every call.
_STAGES = [("read_ccd", "pydriftn.io", "read_ccd"), ("astrometry", "pydriftn.astrometry", "solve_exposure_ccd"),
           ("forced trails", "pydriftn.astrometry", "predict_trails"),
           ("classification", "pydriftn.classify", "classify_exposure_ccd"), ("sky", "pydriftn.sky", "local_sky"),
           ("extraction", "pydriftn.extract", "extract_trails"), ("normalisation", "pydriftn.detrend", "normalise"),
           ("writes", "pydriftn.io", "write_table_atomic"),
           ("process_exposure_ccd", "pydriftn.pipeline.stages", "process_exposure_ccd")]


def _cpu_breakdown(units, args):
    """Process CPU time of each unit and of its stages, in a worker set up as the pipeline's (run in a pool).

    CPU time of the process (``time.process_time``), not wall time: valid on a
    busy machine, where wall times are not. Returns ``(totals, {label: [per unit]})``.
    """
    import importlib
    import logging

    logging.disable(logging.WARNING)
    spent = {}

    def timed(label, f):
        def g(*a, **k):
            t = time.process_time()
            try:
                return f(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.process_time() - t
        return g

    for label, mod, name in _STAGES:
        m = importlib.import_module(mod)
        setattr(m, name, timed(label, getattr(m, name)))
    totals, per = [], {label: [] for label, _, _ in _STAGES}
    for u in units:
        spent.clear()
        t = time.process_time()
        run_unit(u, *args)
        totals.append(time.process_time() - t)
        for label in per:
            per[label].append(spent.get(label, 0.0))
    return totals, per


def _run_all(units, args, workers):
    """Wall time of ``units`` on ``workers`` processes: (cold, incl. start-up), (warm pool), statuses."""
    if workers == 1:
        t0 = time.perf_counter()
        statuses = [run_unit(u, *args) for u in units]
        wall = time.perf_counter() - t0
        return wall, wall, statuses
    import multiprocessing

    with _one_thread_per_worker():
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_quiet_worker_init) as pool:
            statuses = list(pool.map(run_unit, units, *[[a] * len(units) for a in args]))
        cold = time.perf_counter() - t0
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_quiet_worker_init) as pool:
            # start every worker and let it read the catalogue once, as a night's run has long done
            list(pool.map(_warm_up, range(4 * workers)))
            list(pool.map(run_unit, units[:workers], *[[a] * workers for a in args]))
            t0 = time.perf_counter()
            statuses = list(pool.map(run_unit, units, *[[a] * len(units) for a in args]))
            warm = time.perf_counter() - t0
    return cold, warm, statuses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=60)
    ap.add_argument("--stars", type=int, default=2000)
    ap.add_argument("--fresh", action="store_true", help="re-simulate the data")
    ap.add_argument("--cpu-units", type=int, default=5,
                    help="units timed by process CPU per stage in one worker (0: skip)")
    ns = ap.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)  # (the stages' warnings, e.g. trails with little sky, are not the figures)
    data = _dataset(ns.stars, ns.fresh)
    out = ROOT / "bench_output" / "pipeline_run"
    if out.exists():
        shutil.rmtree(out)
    cfg = config_from_dict({
        "drifts_dirs": [str(data / "night_1")], "output_dir": str(out),
        "g_image": str(next((data / "pointed").glob("*pointed_g-image.fits"))),
        "r_image": str(next((data / "pointed").glob("*pointed_r-image.fits"))),
        "gaia": str(data / "gaia_reference.csv"),
        "classify": {"save_cutouts": False},
    })
    t0 = time.perf_counter()
    catalogue = prepare_catalogue(cfg, out)
    print(f"catalogue (2 CCDs, g and r): {time.perf_counter() - t0:.1f} s")
    real_units, _ = discover_units(cfg.drifts_dirs)
    unit_config = _unit_config(cfg)
    args = (str(catalogue), unit_config, str(out), None)

    # one unit, profiled by stage (first call pays imports: warm up first)
    run_unit(real_units[0], *args)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    st = run_unit(real_units[0], *args)
    prof.disable()
    one = time.perf_counter() - t0
    print(f"\none full-size unit ({st.n_stars} stars, status {st.status}): {one:.2f} s on one core")
    stats = pstats.Stats(prof)
    stage_funcs = {
        "read_ccd": "read_ccd", "astrometry": "solve_exposure_ccd", "forced trails": "predict_trails",
        "classification": "classify_exposure_ccd", "sky": "local_sky", "extraction": "extract_trails",
        "normalisation": "normalise", "tables": "long_table",
    }
    for label, fn in stage_funcs.items():
        cum = sum(v[3] for k, v in stats.stats.items() if k[2] == fn)
        print(f"  {label:15s} {cum:6.2f} s")

    units = [Unit(u.night, 9_000_000 + i, real_units[i % len(real_units)].ccd,
                  real_units[i % len(real_units)].image_path, real_units[i % len(real_units)].mask_path)
             for i, u in enumerate([real_units[0]] * ns.units)]

    # process CPU per unit and stage in one worker set up as the pipeline's (valid under load)
    if ns.cpu_units > 0:
        import multiprocessing

        cpu_units = [Unit(u.night, 8_000_000 + i, u.ccd, u.image_path, u.mask_path)
                     for i, u in enumerate([real_units[0]] * (ns.cpu_units + 1))]
        with _one_thread_per_worker(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                           initializer=_quiet_worker_init) as pool:
            totals, per = pool.submit(_cpu_breakdown, cpu_units, args).result()
        totals, per = totals[1:], {k: v[1:] for k, v in per.items()}  # (the first unit pays the imports)

        def med(v):
            return sorted(v)[len(v) // 2]

        rest = [t - sum(per[k][i] for k in per if k != "process_exposure_ccd") for i, t in enumerate(totals)]
        stages = "  ".join(f"{k} {med(v):.3f}" for k, v in per.items() if k != "process_exposure_ccd")
        print(f"\nprocess CPU per unit, one worker set up as the pipeline's (median of {ns.cpu_units}, valid under "
              f"load): {med(totals):.3f} s (min {min(totals):.3f}); without classification "
              f"{med([t - c for t, c in zip(totals, per['classification'])]):.3f} s")
        print(f"  {stages}  rest {med(rest):.3f}")
    print(f"\n{ns.units} units (one DECam exposure has 60 CCDs):")
    for workers in (1, 2):
        cold, warm, statuses = _run_all(units, args, workers)
        ok = sum(s.status == "done" for s in statuses)
        cpu = sorted(s.seconds for s in statuses)[len(statuses) // 2]
        print(f"  {workers} worker(s): {ok}/{ns.units} done, median {cpu:.2f} s per unit in a worker")
        print(f"      cold start (pool started for these units): {cold:6.1f} s wall "
              f"-> 60-CCD exposure in {cold / ns.units * 60:.1f} s")
        print(f"      warm pool (workers up, as during a night): {warm:6.1f} s wall "
              f"-> 60-CCD exposure in {warm / ns.units * 60:.1f} s (target <= 20 s)")


if __name__ == "__main__":
    main()
