"""Run whole nights: catalogue once, then every (exposure, CCD) unit in parallel.

Resumable and safe: every unit writes its outputs atomically and then a
``done.json`` record of its inputs (size, mtime) and configuration; a re-run
skips units whose record matches and redoes the others, so a run killed at any
moment and restarted ends with exactly the outputs of an uninterrupted run.
Exposure-level CSV files, the PDFs and the DuckDB views are assembled from the
unit outputs at the end of the run, deterministically. Input files are only
ever opened for reading.

The same :func:`run_unit` runs in local worker processes or on a
dask.distributed cluster, so results do not depend on the executor. Worker
processes the pipeline starts itself keep freed memory for the next unit
(:func:`_worker_init`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import __version__
from ..errors import PydriftnError
from .units import Skip, Unit, config_fingerprint, content_fingerprint, discover_units, file_fingerprint

log = logging.getLogger(__name__)

__all__ = ["RunResult", "UnitStatus", "run_pipeline", "run_unit", "unit_dir"]

#: Configuration sections whose values shape a unit's outputs.
_UNIT_CONFIG_KEYS = ("drift_rate_arcsec_s", "astrometry", "sky", "extract", "detrend", "classify",
                     "read_mask", "read_targets", "target_radius_arcsec")


@dataclass
class UnitStatus:
    """What happened to one unit."""

    key: str
    status: str  # "done", "resumed", "skipped", "failed"
    reason: str = ""
    n_stars: int = 0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """Summary of a run."""

    output_dir: Path
    units: list[UnitStatus] = field(default_factory=list)
    skipped_inputs: list[Skip] = field(default_factory=list)
    seconds: float = 0.0
    products: list[Path] = field(default_factory=list)
    extra_lines: list[str] = field(default_factory=list)

    @property
    def n_done(self) -> int:
        return sum(u.status in ("done", "resumed") for u in self.units)

    @property
    def exit_code(self) -> int:
        bad = self.skipped_inputs or any(u.status in ("skipped", "failed") for u in self.units)
        return 1 if bad else 0

    def summary_lines(self) -> list[str]:
        by = {}
        for u in self.units:
            by.setdefault(u.status, []).append(u)
        done = by.get("done", [])
        lines = [f"pydriftn run: {len(self.units)} unit(s) in {self.seconds:.1f} s -> {self.output_dir}"]
        lines.append(f"  processed: {len(done)}, resumed (already complete): {len(by.get('resumed', []))}")
        if done:
            per = sum(u.seconds for u in done) / len(done)
            lines.append(f"  stars extracted: {sum(u.n_stars for u in self.units)}; "
                         f"time per unit: {per:.2f} s")
        counts = {}
        for u in self.units:
            for k, v in u.counts.items():
                counts[k] = counts.get(k, 0) + v
        if counts:
            lines.append("  classified: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        for u in by.get("skipped", []):
            lines.append(f"  skipped {u.key}: {u.reason}")
        for u in by.get("failed", []):
            lines.append(f"  FAILED {u.key}: {u.reason}")
        for s in self.skipped_inputs:
            lines.append(f"  skipped {s.what}: {s.reason}")
        for p in self.products:
            lines.append(f"  wrote {p}")
        return lines + list(self.extra_lines)


def unit_dir(output_dir, unit: Unit) -> Path:
    """Folder of one unit's intermediate outputs."""
    return Path(output_dir) / unit.night / "units" / f"exp_{unit.expnum}" / unit.ccd


def store_path(output_dir, unit: Unit) -> Path:
    """Light-curve store file of one unit (hive-partitioned by night and exposure)."""
    return (Path(output_dir) / "store" / "lightcurves" / f"night={unit.night}"
            / f"expnum={unit.expnum}" / f"{unit.ccd}.parquet")


def _unit_record(unit: Unit, catalogue_hash, unit_config: dict) -> dict:
    return {
        "unit": unit.key,
        "version": __version__,
        "image": file_fingerprint(unit.image_path),
        "mask": file_fingerprint(unit.mask_path),
        "catalogue": catalogue_hash,
        "config": config_fingerprint(unit_config),
    }


def _is_complete(out_dir: Path, unit: Unit, record: dict) -> bool:
    done = unit_dir(out_dir, unit) / "done.json"
    if not done.is_file():
        return False
    try:
        old = json.loads(done.read_text())
    except (OSError, ValueError):
        return False
    if any(old.get(k) != v for k, v in record.items()):
        return False
    return all((Path(out_dir) / rel).is_file() for rel in old.get("outputs", []))


_CATALOGUE_CACHE: dict = {}


def _read_catalogue(path) -> pd.DataFrame:
    key = (str(path), os.stat(path).st_mtime_ns)
    if key not in _CATALOGUE_CACHE:
        _CATALOGUE_CACHE.clear()
        p = Path(path)
        _CATALOGUE_CACHE[key] = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    return _CATALOGUE_CACHE[key]


_FINGERPRINT_CACHE: dict = {}


def _catalogue_fingerprint(path) -> str:
    """:func:`content_fingerprint` of the catalogue, hashed once per process while its size and mtime stay.

    Every unit records it; a field catalogue of 10^5 stars (~10 MB) costs ~20 ms to hash.
    """
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINT_CACHE:
        _FINGERPRINT_CACHE.clear()
        _FINGERPRINT_CACHE[key] = content_fingerprint(path)
    return _FINGERPRINT_CACHE[key]


def run_unit(unit: Unit, catalogue_path: str, unit_config: dict, output_dir: str,
             targets: list | None = None) -> UnitStatus:
    """Process one unit and write its outputs; never raises for bad data.

    This is the function every executor runs. It returns a :class:`UnitStatus`:
    ``done`` with the star count, ``skipped`` for a data problem (a
    :class:`~pydriftn.errors.PydriftnError`, reason given) or ``failed`` for an
    unexpected exception (traceback logged).
    """
    from ..config import PipelineConfig
    from ..io import fsync_paths, write_bytes_atomic, write_table_atomic
    from .stages import process_exposure_ccd

    t0 = time.perf_counter()
    out = Path(output_dir)
    udir = unit_dir(out, unit)
    try:
        cfg = PipelineConfig.model_validate({"drifts_dirs": ["."], **unit_config})
        catalogue = _read_catalogue(catalogue_path)
        products = process_exposure_ccd(unit, catalogue, cfg, targets=targets)
        udir.mkdir(parents=True, exist_ok=True)
        outputs = []
        # each product atomically, then one flush of them all before the done record (a power cut before it
        # leaves the unit without done.json, so it is redone)
        for name, table in products.tables.items():
            path = store_path(out, unit) if name == "samples" else udir / f"{name}.parquet"
            write_table_atomic(table, path, fsync=False)
            outputs.append(path)
        for name, data in products.files.items():
            path = udir / name
            write_bytes_atomic(data, path, fsync=False)
            outputs.append(path)
        fsync_paths(outputs)
        outputs = [str(p.relative_to(out)) for p in outputs]
        record = _unit_record(unit, _catalogue_fingerprint(catalogue_path), unit_config)
        record["outputs"] = sorted(outputs)
        record["n_stars"] = int(products.n_stars)
        record["counts"] = products.counts
        write_bytes_atomic(json.dumps(record, indent=1, sort_keys=True).encode(), udir / "done.json")
        return UnitStatus(unit.key, "done", n_stars=int(products.n_stars),
                          seconds=time.perf_counter() - t0, counts=dict(products.counts))
    except PydriftnError as exc:
        log.warning("%s skipped: %s", unit.key, exc)
        return UnitStatus(unit.key, "skipped", reason=str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one bad unit must not stop the night
        log.error("%s failed:\n%s", unit.key, traceback.format_exc())
        return UnitStatus(unit.key, "failed", reason=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - t0)


def _unit_config(cfg) -> dict:
    data = cfg.model_dump(mode="json")
    return {k: data[k] for k in _UNIT_CONFIG_KEYS}


class _Progress:
    """A progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.n = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="unit", file=sys.stderr, dynamic_ncols=True)

    def update(self, status: UnitStatus):
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(status.key, refresh=False)
            return
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        log.info("[%d/%d] %s %s (%.2f unit/s, ETA %.0f s)", self.n, self.total, status.key,
                 status.status, rate, eta)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _execute(todo, catalogue_path, unit_config, output_dir, targets, cfg, progress):
    """Run units with the configured executor; yield statuses as they finish."""
    workers = cfg.workers or os.cpu_count() or 1
    args = (str(catalogue_path), unit_config, str(output_dir), targets)
    if cfg.executor == "dask":
        from distributed import Client, LocalCluster, as_completed as dask_completed

        if cfg.scheduler:
            client = Client(cfg.scheduler)
            cluster = None
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            client.run(_worker_init)  # (only the workers of the cluster started here)
        try:
            # the units' log records (warnings, a skipped unit's reason, a failed unit's traceback) come back
            # to this process's handlers: the run's log file and the console
            level = logging.getLogger("pydriftn").getEffectiveLevel()
            client.run(_set_pydriftn_level, level)
            client.forward_logging("pydriftn", level=level)
            futures = [client.submit(run_unit, u, *args, pure=False, key=f"unit-{u.key}") for u in todo]
            for fut in dask_completed(futures):
                yield fut.result()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return
    if workers <= 1 or len(todo) <= 1:
        for u in todo:
            yield run_unit(u, *args)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    # the workers' log records (a unit's warnings, a failed unit's traceback) come back to this process's
    # handlers (the run's log file, the CLI's console), instead of each worker's bare stderr
    records = ctx.Queue()
    listener = logging.handlers.QueueListener(records, _Relay(), respect_handler_level=False)
    listener.start()
    try:
        with _one_thread_per_worker(), ProcessPoolExecutor(
                max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                initargs=(records, logging.getLogger("pydriftn").getEffectiveLevel())) as pool:
            futures = [pool.submit(run_unit, u, *args) for u in todo]
            for fut in as_completed(futures):
                yield fut.result()
    finally:
        listener.stop()
        records.close()


def _set_pydriftn_level(level):
    """(On a dask worker) log pydriftn records from ``level`` on, for :meth:`distributed.Client.forward_logging`."""
    logging.getLogger("pydriftn").setLevel(level)


class _Relay(logging.Handler):
    """Hands a worker's log record to the logger of the same name in this process (and so its handlers)."""

    def emit(self, record):
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _worker_init(log_records=None, log_level=logging.WARNING):
    """Set up a worker process of the pipeline's own pool (local processes or a local dask cluster).

    ``log_records``: a queue to which the worker's ``pydriftn`` log records of
    ``log_level`` and above are sent (the parent relays them to its handlers).

    With glibc, large blocks (every image-sized array: ~33 MB for a full-size
    CCD) are by default mapped fresh from the kernel and unmapped when freed,
    so each unit pays a page fault and a page zeroing for every page of every
    such array (~10^4 faults per unit). A worker processes one unit after
    another with the same allocation pattern: serving large blocks from the
    heap and keeping freed memory for reuse saves ~60 ms of CPU per
    full-size unit; the worker's resident memory then stays at its per-unit
    peak (~0.8 GB) between units instead of falling back to ~0.5 GB. A no-op
    where glibc's ``mallopt`` is not available.
    """
    import ctypes

    if log_records is not None:
        import logging.handlers

        pkg = logging.getLogger("pydriftn")
        pkg.addHandler(logging.handlers.QueueHandler(log_records))
        pkg.setLevel(log_level)
        pkg.propagate = False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, (1 << 31) - 1)


#: Thread-pool variables of BLAS/OpenMP libraries. With one worker process per core, a
#: multi-threaded BLAS in every worker only oversubscribes the cores (dask's nanny sets the same).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                     "NUMEXPR_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_per_worker():
    """Spawned worker processes get single-threaded BLAS/OpenMP (values the user set are kept)."""
    added = [k for k in _THREAD_VARIABLES if k not in os.environ]
    for k in added:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def run_search(cfg, out_dir=None):
    """The event search over a run's store with the ``search`` section of its configuration.

    Writes the candidate tables and the report in ``out_dir`` (default
    ``OUTPUT/search``); returns the :class:`~pydriftn.events.SearchResult`.
    """
    from ..events import search_store

    s = cfg.search
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "search"
    return search_store(cfg.output_dir, out_dir=out, false_alarm_rate=s.false_alarm_per_star_night,
                        n_scrambles=s.n_scrambles, plots=s.report_pages,
                        efficiency_dir=s.efficiency_dir)


def _clean_stale_temporaries(output_dir: Path) -> int:
    n = 0
    for p in output_dir.rglob(".*.tmp*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def run_pipeline(cfg, *, progress: bool = True, log_file: bool = True) -> RunResult:
    """Run catalogue → astrometry → sky → extraction → normalisation → classification.

    Parameters
    ----------
    cfg : pydriftn.config.PipelineConfig
        Validated configuration (see :func:`pydriftn.config.load_config`).
    progress : bool
        Show a progress bar on a terminal (log lines otherwise).
    log_file : bool
        Write ``pydriftn.log`` in the output folder for the duration of the run.

    Returns
    -------
    RunResult
    """
    from .products import assemble_outputs
    from .stages import prepare_catalogue, select_targets

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = None
    pkg_logger = logging.getLogger("pydriftn")
    old_level = pkg_logger.level
    if log_file:
        # the run's own log file, for the duration of the run only
        handler = logging.FileHandler(out / "pydriftn.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        pkg_logger.addHandler(handler)
        pkg_logger.setLevel(logging.DEBUG)
    try:
        n = _clean_stale_temporaries(out)
        if n:
            log.info("removed %d temporary file(s) left by an interrupted run", n)
        log.info("pydriftn %s: configuration %s", __version__, cfg.model_dump_json())
        result = RunResult(output_dir=out)
        units, skipped = discover_units(cfg.drifts_dirs, img_keyword=cfg.img_keyword,
                                        mask_keyword=cfg.mask_keyword, read_mask=cfg.read_mask,
                                        ccds=cfg.ccds, image_glob=cfg.image_glob)
        result.skipped_inputs.extend(skipped)
        catalogue_path = prepare_catalogue(cfg, out)
        targets = select_targets(cfg, catalogue_path)
        unit_config = _unit_config(cfg)
        catalogue_hash = content_fingerprint(catalogue_path)
        todo = []
        for u in units:
            if _is_complete(out, u, _unit_record(u, catalogue_hash, unit_config)):
                record = json.loads((unit_dir(out, u) / "done.json").read_text())
                result.units.append(UnitStatus(u.key, "resumed", n_stars=record.get("n_stars", 0),
                                               counts=record.get("counts", {})))
            else:
                todo.append(u)
        log.info("%d unit(s): %d to process, %d already complete", len(units), len(todo),
                 len(units) - len(todo))
        bar = _Progress(len(todo), progress)
        try:
            for status in _execute(todo, catalogue_path, unit_config, out, targets, cfg, progress):
                result.units.append(status)
                bar.update(status)
        finally:
            bar.close()
        result.units.sort(key=lambda s: s.key)
        result.products = assemble_outputs(cfg, out, units, targets=targets)
        if cfg.search.enabled:
            result.extra_lines = list(result.extra_lines) + run_search(cfg).summary_lines()
        result.seconds = time.perf_counter() - t0
        summary = {
            "version": __version__,
            "units": [s.__dict__ for s in result.units],
            "skipped_inputs": [s.__dict__ for s in result.skipped_inputs],
        }
        from ..io import write_bytes_atomic

        write_bytes_atomic(json.dumps(summary, indent=1, sort_keys=True).encode(), out / "run_summary.json")
        for line in result.summary_lines():
            log.debug(line)  # the log file gets the summary; the CLI prints it
        return result
    finally:
        if handler is not None:
            pkg_logger.removeHandler(handler)
            pkg_logger.setLevel(old_level)
            handler.close()
