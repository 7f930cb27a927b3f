"""``pydriftn demo``: simulate a small night and run the whole chain on it."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

__all__ = ["run_demo", "demo_config"]


def demo_config(data_dir: Path, output_dir: Path, dataset) -> dict:
    """The run configuration for a simulated dataset (as written to ``demo.yaml``)."""
    nights = sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and p.name.startswith("night"))
    pointed = Path(data_dir) / "pointed"
    cfg = {
        "drifts_dirs": [str(p) for p in nights],
        "output_dir": str(output_dir),
        "read_mask": True,
        "img_keyword": "image",
        "mask_keyword": "dqmask",
        "pdf_output": "demo-extractions",
        "g_image": str(next(pointed.glob("*pointed_g-image.fits*"))),
        "r_image": str(next(pointed.glob("*pointed_r-image.fits*"))),
        "gaia": str(Path(data_dir) / "gaia_reference.csv"),
        "drift_rate_arcsec_s": list(dataset.config.drift_rate_arcsec_s),
        "search": {"enabled": True},
    }
    return cfg


def run_demo(out_dir="pydriftn-demo", *, preset: str = "small", workers=None, progress: bool = True,
             seed: int = 0):
    """Simulate a small night, run the pipeline and the event search on it.

    Returns the :class:`~pydriftn.pipeline.RunResult`, whose summary ends with
    where to look.
    """
    from ..config import config_from_dict
    from ..io import write_bytes_atomic
    from ..simulate import simulate_dataset
    from .run import run_pipeline

    out = Path(out_dir)
    data_dir = out / "data"
    if (data_dir / "simulation.json").is_file():
        log.info("using the simulated data already in %s", data_dir)
        from ..simulate import load_dataset

        ds = load_dataset(data_dir)
    else:
        log.info("simulating a %s night in %s", preset, data_dir)
        ds = simulate_dataset(data_dir, preset=preset, seed=seed)
    cfg_dict = demo_config(data_dir, out / "output", ds)
    if workers is not None:
        cfg_dict["workers"] = workers
    write_bytes_atomic(yaml.safe_dump(cfg_dict, sort_keys=False).encode(), out / "demo.yaml")
    cfg = config_from_dict(cfg_dict)
    result = run_pipeline(cfg, progress=progress)  # ends with the event search (search.enabled)
    result.extra_lines = list(result.extra_lines) + [
        "",
        f"Where to look: {Path(cfg.output_dir).resolve()}",
        f"  configuration used: {(out / 'demo.yaml').resolve()} (re-run with `pydriftn run` on it)",
        f"  truth of the simulation: {(data_dir / 'truth').resolve()}",
        f"  query the store: pydriftn query {cfg.output_dir} \"SELECT count(*) FROM lightcurves\"",
    ]
    return result
