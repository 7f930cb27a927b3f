"""Image-level vs series-level injection-recovery efficiency (issue #8: "through the full image-level pipeline
for a subset").

Run from the repository root::

    python benchmarks/bench_efficiency_image.py                  # default subset, 8 cells, 2 workers
    python benchmarks/bench_efficiency_image.py --cells 3        # the first 3 cells only
    python benchmarks/bench_efficiency_image.py --repeats 2      # twice the events per cell
    python benchmarks/bench_efficiency_image.py --fresh          # ignore the cached cells
    python benchmarks/bench_efficiency_image.py --research       # search the cached pipeline runs again

For each cell of :data:`pydriftn.events.imagelevel.DEFAULT_CELLS` (tE 1, 3, 10 s x u0 0.1, 0.5 short events
with rho 0.01, one long tE = 30 s event, one rho = 1 event; source r 16-18.5) the simulator renders 20 events of
exactly those parameters into a small-preset night (CCDs S4 + N4, 512 x 1024 px, 3 drift exposures, 500 stars
per CCD, 10 events per CCD), ``run_pipeline`` runs the whole chain on it, ``search_store`` searches the store and
the candidates are matched to the truth by sky position. The series-level efficiency of the same cells is
measured on the same store (40 injections per cell into stars of the same magnitude range, the simulated event
stars left out). Both levels are printed side by side:

* ``found``: an unvetoed candidate above threshold on the event's star with t0 within 0.5 s and tE within 30 %;
* ``detected``: the same with t0 only inside the event (``max(1 s, tE max(1, rho))``), the criterion of
  ``pydriftn efficiency``;
* ``of searchable``: of the events on stars with samples the search uses (not all flagged, e.g. BLENDED);
* ``of peak-observed``: of the events whose peak the star's searchable samples recorded
  (:func:`pydriftn.events.imagelevel.peak_observed`: a sample within the event's half-maximum as the
  PSF-smeared samples see it, or samples on both sides while it is magnified by >= 1.1; not a short event in
  a gap between exposures or while the star's trail was off the CCD or flagged); the others cannot be found
  with t0 to 0.5 s. The totals over all cells are printed for all events, the searchable ones and the
  peak-observed ones;
* intervals: Wilson, 68 %;
* false positives: unvetoed candidates above threshold on the stars without a simulated event, per event-free
  star-night (target <= 1e-4), each listed.

Results are cached per cell in ``bench_output/efficiency_image/`` (a cell is re-run only if its parameters
change; ``--fresh`` re-runs everything; ``--research`` keeps the cached simulations and pipeline runs and
searches their stores again, e.g. after a change to the search).
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one BLAS/OpenMP thread per process, set before numpy is imported
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_output" / "efficiency_image"


class _OnlyOurs(logging.Filter):
    """Progress lines of the image-level driver, warnings of everything else."""

    def filter(self, record):
        return record.name == "pydriftn.events.imagelevel" or record.levelno >= logging.WARNING


#: A catalogue star this close to a simulated event star holds the event's light (a merged pair: the event
#: star itself was not catalogued within the 0.5" match radius): it is not counted as event-free.
EVENT_LIGHT_RADIUS_ARCSEC = 1.0


def _stars_with_event_light(rep_dir: Path) -> set:
    """Catalogue stars within :data:`EVENT_LIGHT_RADIUS_ARCSEC` of a simulated event star of a repeat."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    truth = rep_dir / "sim" / "truth"
    cat_path = rep_dir / "run" / "catalogue" / "master_catalogue.parquet"
    if not (truth / "events.parquet").is_file() or not cat_path.is_file():
        return set()
    ev = pd.read_parquet(truth / "events.parquet").merge(pd.read_parquet(truth / "stars.parquet"), on="star_id")
    cat = pd.read_parquet(cat_path, columns=["star_id", "ra", "dec"])
    if ev.empty or cat.empty:
        return set()
    c_ev = SkyCoord(ev["ra"].to_numpy() * u.deg, ev["dec"].to_numpy() * u.deg)
    c_cat = SkyCoord(cat["ra"].to_numpy() * u.deg, cat["dec"].to_numpy() * u.deg)
    idx_cat, _, _, _ = c_ev.search_around_sky(c_cat, EVENT_LIGHT_RADIUS_ARCSEC * u.arcsec)
    return set(cat["star_id"].to_numpy()[idx_cat].astype("int64"))


def false_positives(out: Path, inj: pd.DataFrame) -> tuple[int, int, list]:
    """Unvetoed candidates above threshold on stars without a simulated event, over every cell's search.

    Stars holding an event's light (matched to a simulated event star, or within
    :data:`EVENT_LIGHT_RADIUS_ARCSEC` of one) are left out of both counts.
    Returns ``(n_false, n_event_free_star_nights, rows)`` (rows: cell, repeat, star_id, statistic, model).
    """
    n_false, n_free, rows = 0, 0, []
    for cand_path in sorted(Path(out).glob("cells/*/rep*/search/candidates.parquet")):
        cell, rep = cand_path.parts[-4], int(cand_path.parts[-3][3:])
        c = pd.read_parquet(cand_path)
        sel = (inj["cell"] == cell) & (inj["repeat"] == rep) & inj["star_id"].notna()
        events = set(inj.loc[sel, "star_id"].astype("int64")) | _stars_with_event_light(cand_path.parents[1])
        if len(c):
            c = c[c["above_threshold"].astype(bool) & (c["vetoes"] == 0) & ~c["star_id"].isin(events)]
            rows += [dict(cell=cell, repeat=rep, star_id=r.star_id, statistic=round(float(r.statistic), 1),
                          model=r.model) for r in c.itertuples()]
            n_false += len(c)
        sn = pd.read_parquet(cand_path.with_name("star_nights.parquet"), columns=["star_id"])
        n_free += int((~sn["star_id"].isin(events)).sum())
    return n_false, n_free, rows


def loss_breakdown(inj: pd.DataFrame) -> pd.DataFrame:
    """Per cell: why image-level events were not found."""
    rows = []
    for cell, g in inj.groupby("cell", sort=False):
        s = g[g["searchable"]]
        rows.append(dict(
            cell=cell, n=len(g), not_catalogued=int((~g["in_catalogue"]).sum()),
            no_searchable_samples=int((g["in_catalogue"] & ~g["searchable"]).sum()),
            no_candidate=int((~s["candidate"]).sum()), below_threshold=int((s["candidate"] & ~s["above_threshold"]).sum()),
            vetoed=int((s["above_threshold"] & (s["vetoes"] != 0)).sum()),
            veto_reasons=",".join(sorted(set(s.loc[s["vetoes"] != 0, "veto_reasons"].astype(str)))),
            t0_outside_event=int((s["above_threshold"] & (s["vetoes"] == 0) & ~s["detected"]).sum()),
            fit_inaccurate=int((s["detected"] & ~s["found"]).sum()),
            # vetoed only as a flash on the star although the microlensing fit has t0 / tE right
            flash_vetoed_fit_ok=int((s["above_threshold"] & (s["veto_reasons"].astype(str) == "flash")
                                     & (s["dt0_s"].abs() <= 0.5) & ((s["te_ratio"] - 1).abs() <= 0.3)).sum()),
            found=int(g["found"].sum()),
            found_of_searchable=f"{int(s['found'].sum())}/{len(s)}"))
        if "peak_observed" in g.columns and g["peak_observed"].notna().all():
            o = g[g["peak_observed"].astype(bool)]
            # searchable stars whose peak time fell outside their usable samples (a gap, off the CCD, flagged)
            rows[-1]["peak_not_observed"] = int((g["searchable"] & ~g["peak_observed"].astype(bool)).sum())
            rows[-1]["found_of_peak_observed"] = f"{int(o['found'].sum())}/{len(o)}"
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=None, help="run only the first N cells of the default subset")
    ap.add_argument("--repeats", type=int, default=1, help="datasets per cell (20 events each)")
    ap.add_argument("--events-per-ccd", type=int, default=10)
    ap.add_argument("--stars-per-ccd", type=int, default=500)
    ap.add_argument("--series", type=int, default=40, help="series-level injections per cell")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="re-run every cell")
    ap.add_argument("--research", action="store_true",
                    help="search the cached pipeline runs again (after a change to the search only)")
    ap.add_argument("--full-trail", action="store_true",
                    help="store and search the shutter-ramp samples too (extract.full_trail)")
    ap.add_argument("--out", default=None, help=f"output folder (default {OUT})")
    ns = ap.parse_args(argv)
    out = Path(ns.out) if ns.out else OUT

    from pydriftn.events.imagelevel import image_level_efficiency, wilson_interval

    h = logging.StreamHandler(sys.stdout)
    h.addFilter(_OnlyOurs())
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(h)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("pydriftn").setLevel(logging.INFO)
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    if ns.fresh and out.exists():
        shutil.rmtree(out)
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    res = image_level_efficiency(out, events_per_ccd=ns.events_per_ccd, n_stars_per_ccd=ns.stars_per_ccd,
                                 preset="small", seed=ns.seed, workers=ns.workers, max_cells=ns.cells,
                                 repeats=ns.repeats, n_series=ns.series, research=ns.research,
                                 pipeline_options={"extract": {"full_trail": True}} if ns.full_trail else None)
    wall = time.perf_counter() - t0
    print()
    print("\n".join(res.summary_lines()))
    pd.set_option("display.width", 200)
    print("\nwhere the image-level events went (per cell; flash_vetoed_fit_ok: vetoed only by the flash veto -- the "
          "classification found a flash on the event's trail -- with t0 and tE right):")
    print(loss_breakdown(res.injections).to_string(index=False))
    s = res.series_injections
    if len(s):
        print("\nseries level, median fit errors of the detected injections:")
        d = s[s["detected"]]
        print(d.groupby("cell", sort=False).agg(median_dt0_s=("dt0_s", "median"),
                                                median_te_ratio=("te_ratio", "median")).to_string())
    n_false, n_free, rows = false_positives(out, res.injections)
    if n_free:
        lo, hi = wilson_interval(n_false, n_free)
        print(f"\nfalse positives (unvetoed candidates above threshold on stars without a simulated event): "
              f"{n_false} in {n_free} event-free star-nights = {n_false / n_free:.1e} per star-night "
              f"[68 %: {lo:.1e}, {hi:.1e}]   (target <= 1e-4)")
        for r in rows:
            print(f"  {r['cell']} rep {r['repeat']}: star {r['star_id']}, statistic {r['statistic']}, {r['model']}")
    print(f"\nwall time {wall:.0f} s (cached cells are not re-run)")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
