"""Physically faithful DECam drift-scan simulator with truth tables.

Entry point: :func:`simulate_dataset` (``pydriftn simulate OUT_DIR``).
See ``docs/DESIGN.md`` ("Simulated data layout") for files and columns.
"""

from .config import PRESETS, SimulationConfig, make_config
from .dataset import SimulatedDataset, exposure_schedule, load_dataset, simulate_dataset
from .psf import moffat_mog, render_moving_sources

__all__ = [
    "PRESETS",
    "SimulationConfig",
    "SimulatedDataset",
    "exposure_schedule",
    "load_dataset",
    "make_config",
    "moffat_mog",
    "render_moving_sources",
    "simulate_dataset",
]
