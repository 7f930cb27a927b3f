"""The ``pydriftn`` command: a thin front end over the library.

This is the only place that configures logging and prints. Every error raised
on purpose by the library (:class:`~pydriftn.errors.PydriftnError`) becomes one
line on stderr and exit code 2; an interrupted run exits with 130.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import PydriftnError

log = logging.getLogger("pydriftn")

EXIT_OK = 0
EXIT_SKIPPED = 1  # the run completed but some units were skipped or failed
EXIT_ERROR = 2


def _setup_logging(verbosity: int) -> None:
    level = max(logging.WARNING - 10 * verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------- commands
def _cmd_simulate(args) -> int:
    from .simulate import simulate_dataset

    overrides = {}
    if args.n_exposures is not None:
        overrides["n_exposures"] = args.n_exposures
    if args.ccds is not None:
        overrides["ccds"] = [c.strip() for c in args.ccds.split(",") if c.strip()]
    if args.drift_rate is not None:
        from .geometry import parse_drift_rate

        overrides["drift_rate_arcsec_s"] = parse_drift_rate(args.drift_rate)
    if args.n_nights is not None:
        overrides["n_nights"] = args.n_nights
    if args.stars_per_ccd is not None:
        overrides["stars_per_ccd"] = args.stars_per_ccd
    for opt, key in (("fz_exposures", "fz_exposures"), ("bright_stars", "n_bright_stars_per_ccd"),
                     ("satellite_prob", "satellite_prob")):
        if getattr(args, opt) is not None:
            overrides[key] = getattr(args, opt)
    ds = simulate_dataset(args.out_dir, preset=args.preset, seed=args.seed, n_workers=args.workers or 1,
                          **overrides)
    print(f"simulated dataset written to {Path(args.out_dir).resolve()}")
    for line in ds.summary_lines():
        print("  " + line)
    return EXIT_OK


def _cmd_demo(args) -> int:
    from .pipeline import run_demo

    result = run_demo(args.out_dir, preset=args.preset, workers=args.workers, progress=not args.quiet)
    for line in result.summary_lines():
        print(line)
    return result.exit_code


def _cmd_run(args) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    from .pipeline import run_pipeline

    if args.workers is not None:
        cfg = cfg.model_copy(update={"workers": args.workers})
    result = run_pipeline(cfg, progress=not args.quiet)
    for line in result.summary_lines():
        print(line)
    return result.exit_code


def _cmd_config(args) -> int:
    from .config import example_yaml, load_config

    if args.example:
        sys.stdout.write(example_yaml())
        return EXIT_OK
    if args.check:
        cfg = load_config(args.check)
        print(f"{args.check}: valid ({len(cfg.drifts_dirs)} night folder(s))")
        return EXIT_OK
    print("give --example or --check CONFIG.yaml", file=sys.stderr)
    return EXIT_ERROR


def _cmd_info(args) -> int:
    from .io import describe

    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for path in args.files:
            print(path)
            print(describe(path).to_string(index=False))
    return EXIT_OK


def _cmd_catalogue(args) -> int:
    from .catalogue import build_catalogue

    ccds = [c.strip() for c in args.ccds.split(",")] if args.ccds else None
    gaia = "tap" if args.gaia_tap else args.gaia
    cat = build_catalogue(args.g_image, args.r_image, ccds, args.out, gaia=gaia)
    print(f"{len(cat)} stars written to {Path(args.out).resolve()}")
    skipped = cat.attrs.get("skipped_ccds") or {}
    for ccd, why in skipped.items():
        print(f"  skipped CCD {ccd}: {why}")
    return EXIT_SKIPPED if skipped else EXIT_OK


def _cmd_query(args) -> int:
    from .pipeline import query_store

    df = query_store(args.store, args.sql)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", args.max_rows):
        print(df.to_string(index=False, max_rows=args.max_rows))
    return EXIT_OK


def _cmd_search(args) -> int:
    from .config import SearchConfig
    from .events import search_store

    defaults = SearchConfig()
    if args.config is not None:
        from .config import load_config

        defaults = load_config(args.config).search
    far = args.false_alarm_rate if args.false_alarm_rate is not None else defaults.false_alarm_per_star_night
    if not 0 < far < 1:
        raise PydriftnError(f"--false-alarm-rate: expected a probability in (0, 1), got {far}")
    scrambles = args.scrambles if args.scrambles is not None else defaults.n_scrambles
    if scrambles < 1:
        raise PydriftnError(f"--scrambles: expected at least 1, got {scrambles}")
    result = search_store(args.store, nights=args.night, out_dir=args.out, false_alarm_rate=far,
                          n_scrambles=scrambles, plots=defaults.report_pages if args.pages is None else args.pages,
                          efficiency_dir=args.efficiency if args.efficiency is not None else defaults.efficiency_dir)
    for line in result.summary_lines():
        print(line)
    return EXIT_OK


def _cmd_efficiency(args) -> int:
    if args.image_level:
        if args.store:
            raise PydriftnError("--store and --image-level exclude each other: the image-level run makes its own "
                                "stores")
        if args.cells is not None and args.cells < 1:
            raise PydriftnError(f"--cells: expected at least 1, got {args.cells}")
        if args.repeats < 1:
            raise PydriftnError(f"--repeats: expected at least 1, got {args.repeats}")
        from .events import image_level_efficiency

        result = image_level_efficiency(args.out, seed=args.seed, max_cells=args.cells, repeats=args.repeats,
                                        workers=args.workers)
    else:
        from .events import run_efficiency

        result = run_efficiency(args.out, store=args.store, seed=args.seed)
    for line in result.summary_lines():
        print(line)
    return EXIT_OK


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pydriftn",
        description="Drift-scan photometry: sub-second light curves from drifted DECam exposures.",
    )
    parser.add_argument("--version", action="version", version=f"pydriftn {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bar")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="simulate a small night and run the whole chain on it")
    p.add_argument("out_dir", nargs="?", default="pydriftn-demo", help="output folder (default: %(default)s)")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "full"], help="simulation size")
    p.add_argument("--workers", type=int, default=None, help="parallel workers (default: all cores)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run the pipeline described by a YAML configuration")
    p.add_argument("config", help="YAML configuration (see `pydriftn config --example`)")
    p.add_argument("--workers", type=int, default=None, help="override the number of workers")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("simulate", help="write a simulated drift-scan dataset with truth tables")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "full"], help="size preset")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--n-exposures", type=int, default=None, help="drift exposures per night")
    p.add_argument("--n-nights", type=int, default=None, help="number of nights")
    p.add_argument("--ccds", default=None, help="comma-separated CCD names, e.g. S4,N4")
    p.add_argument("--stars-per-ccd", type=int, default=None, help="stars per CCD (crowding)")
    p.add_argument("--drift-rate", default=None, help="drift-rate vector 'EAST,NORTH' in arcsec/s")
    p.add_argument("--fz-exposures", type=int, default=None, help="write this many exposures as .fits.fz")
    p.add_argument("--bright-stars", type=int, default=None,
                   help="saturating bright stars (with bleed trails) per CCD")
    p.add_argument("--satellite-prob", type=float, default=None,
                   help="probability of a satellite streak per CCD exposure")
    p.add_argument("--workers", type=int, default=None, help="processes (results identical for any number)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("catalogue", help="build the reference catalogue from pointed g and r images")
    p.add_argument("g_image")
    p.add_argument("r_image")
    p.add_argument("--ccds", default=None, help="comma-separated CCD names (default: all)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gaia", default=None, help="Gaia reference file (CSV, FITS or Parquet)")
    g.add_argument("--gaia-tap", action="store_true", help="query the Gaia archive (cached)")
    p.set_defaults(func=_cmd_catalogue)

    p = sub.add_parser("config", help="print an example configuration or check one")
    p.add_argument("--example", action="store_true", help="print a commented example with all defaults")
    p.add_argument("--check", metavar="CONFIG", default=None, help="validate a configuration file")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("info", help="list the CCD extensions and key header values of FITS files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("query", help="run SQL on a light-curve store (table `lightcurves`)")
    p.add_argument("store", help="output folder of a run (or its store/ folder)")
    p.add_argument("sql", help='e.g. "SELECT star_id, count(*) FROM lightcurves GROUP BY 1"')
    p.add_argument("--max-rows", type=int, default=50)
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("search", help="search the light-curve store for microlensing events and flares")
    p.add_argument("store")
    p.add_argument("--night", action="append", default=None, help="restrict to a night (repeatable)")
    p.add_argument("--out", default=None, help="report folder (default: STORE/search)")
    p.add_argument("--config", default=None, help="take the `search` section of this run configuration")
    p.add_argument("--false-alarm-rate", type=float, default=None,
                   help="target false-alarm probability per star-night (default 3e-5)")
    p.add_argument("--scrambles", type=int, default=None,
                   help="time-scrambled copies calibrating the threshold (default 20)")
    p.add_argument("--pages", type=int, default=None, help="candidate pages in the report (default 50)")
    p.add_argument("--efficiency", default=None, metavar="DIR",
                   help="show this `pydriftn efficiency` output in the report")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("efficiency", help="injection-recovery efficiency of the event search")
    p.add_argument("out", help="report folder")
    p.add_argument("--store", default=None, help="inject into this store's series (default: simulate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-level", action="store_true",
                   help="simulate events into images and run the whole chain per grid cell (~45 s per cell)")
    p.add_argument("--cells", type=int, default=None, help="with --image-level: the first N of the 8 default cells")
    p.add_argument("--repeats", type=int, default=1, help="with --image-level: datasets (20 events each) per cell")
    p.add_argument("--workers", type=int, default=None, help="with --image-level: pipeline workers (default all cores)")
    p.set_defaults(func=_cmd_efficiency)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    _setup_logging(0 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except PydriftnError as exc:
        print(f"pydriftn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"pydriftn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
