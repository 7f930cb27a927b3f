"""Pool image-level efficiency runs of several seeds (issue #8 must-show, with its sampling error).

Run from the repository root, after ``bench_efficiency_image.py --seed S --out DIR`` for each seed::

    python benchmarks/pool_efficiency.py DIR [DIR ...]

One image-level run (8 cells x 3 repeats x 20 events) measures the efficiency to about +-1.5 % and the
false-positive rate from a handful of events, so the must-show figures are printed per run and pooled:

* found of peak-observed (as ``bench_efficiency_image.py``: an unvetoed candidate above threshold on the
  event's star, t0 within 0.5 s, tE within 30 %; of the events whose peak the star's usable samples recorded),
  per run, pooled, and pooled per cell;
* false positives per event-free star-night, per run and pooled, and their ratio to the search's nominal
  false-alarm rate per star-night;
* intervals: Wilson, 68 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _frac(k: int, n: int) -> str:
    from pydriftn.events.imagelevel import wilson_interval

    if n == 0:
        return "-"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="output folders of bench_efficiency_image.py (one per seed)")
    ns = ap.parse_args(argv)

    from bench_efficiency_image import false_positives
    from pydriftn.events.imagelevel import wilson_interval
    from pydriftn.events.search import DEFAULT_FALSE_ALARM_RATE

    injs, k_tot, n_tot, f_tot, s_tot = [], 0, 0, 0, 0
    print("run                               found of peak-observed                 false positives per star-night")
    for d in ns.dirs:
        d = Path(d)
        path = d / "injections_image.parquet"
        if not path.is_file():
            print(f"{d}: no injections_image.parquet (run bench_efficiency_image.py --out {d} first)")
            continue
        inj = pd.read_parquet(path)
        inj["run"] = d.name
        injs.append(inj)
        obs = inj[inj["peak_observed"].astype(bool)]
        k, n = int(obs["found"].sum()), len(obs)
        n_false, n_free, _rows = false_positives(d, inj)
        k_tot, n_tot, f_tot, s_tot = k_tot + k, n_tot + n, f_tot + n_false, s_tot + n_free
        rate = f"{n_false}/{n_free} = {n_false / n_free:.1e}" if n_free else "-"
        print(f"{d.name:<33} {_frac(k, n):<38} {rate}")
    if not injs:
        return 1
    print(f"{'pooled':<33} {_frac(k_tot, n_tot):<38} ", end="")
    if s_tot:
        lo, hi = wilson_interval(f_tot, s_tot)
        print(f"{f_tot}/{s_tot} = {f_tot / s_tot:.1e} [{lo:.1e}, {hi:.1e}] "
              f"({f_tot / s_tot / DEFAULT_FALSE_ALARM_RATE:.2f} x the nominal {DEFAULT_FALSE_ALARM_RATE:.0e})")
    else:
        print("-")
    print("   targets: found >= 0.9; false positives <= 1e-4 per star-night, within 2x of the nominal rate")
    allinj = pd.concat(injs, ignore_index=True)
    obs = allinj[allinj["peak_observed"].astype(bool)]
    print("\npooled per cell (found of peak-observed):")
    for cell, g in obs.groupby("cell", sort=False):
        print(f"  {cell:<36} {_frac(int(g['found'].sum()), len(g))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
