"""Whole-night processing: units of work, executors, the light-curve store.

``run_pipeline(cfg)`` runs every (exposure, CCD) unit of the configured night
folders — locally in worker processes or on a dask.distributed cluster —
resumably, and assembles the products; ``run_demo`` simulates a small night
and runs the chain on it; ``query_store`` runs SQL on a run's store.
"""

from .demo import run_demo
from .products import open_store, query_store, wide_extractions
from .run import RunResult, UnitStatus, run_pipeline, run_unit
from .units import Unit, discover_units

__all__ = [
    "RunResult",
    "Unit",
    "UnitStatus",
    "discover_units",
    "open_store",
    "query_store",
    "run_demo",
    "run_pipeline",
    "run_unit",
    "wide_extractions",
]
