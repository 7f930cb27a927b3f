"""Event search over drift-scan light curves: microlensing (finite-source point lens) and flares.

Operates on light-curve tables (``star_id, night, expnum, ccd, sample, mjd,
norm_flux, norm_flux_err, flags``), independent of images. See
:mod:`pydriftn.events.search` for the method (boxcar matched-filter scan of
all stars at once, false-alarm calibration on time-scrambled series, least-
squares fits, vetoes) and :mod:`pydriftn.events.inject` for injection-recovery.

Public API
----------
search(lc, stars=None, flashes=None, **options) -> SearchResult
search_store(store, nights=None, out_dir=None, **options) -> SearchResult   (``pydriftn search``)
calibrate_null(blocks, ...) -> {pool: CombinedNull}
plot_candidate(lc, candidate, ax=None)
inject_microlensing(lc, params, seed=0, ...) -> lc with events
efficiency(lc, stars=None, te_s=..., u0=..., rho=..., mags=..., ...) -> table
plot_efficiency(table, ax=None)
run_efficiency(out_dir, store=None, seed=0) -> EfficiencyResult   (``pydriftn efficiency``)
image_level_efficiency(out_dir, cells=None, ...) -> ImageEfficiencyResult   (``pydriftn efficiency --image-level``)
write_report(result, lc, out_dir, run_dir=None, efficiency_dir=None) -> files   (PDF + HTML report)
simulate_lightcurves(n_stars, n_exposures, ...) -> (lc, stars)     (synthetic, Gaussian noise)
fit_microlensing / fit_flare / fit_flat, scan_block / scramble_block, build_blocks
"""

from .fit import FitResult, fit_flare, fit_flat, fit_microlensing, flare_model, microlensing_model
from .imagelevel import (
    DEFAULT_CELLS,
    ImageCell,
    ImageEfficiencyResult,
    image_level_efficiency,
    plot_image_efficiency,
    wilson_interval,
)
from .inject import EfficiencyResult, efficiency, inject_microlensing, plot_efficiency, run_efficiency
from .plot import plot_candidate
from .report import candidate_cutouts, write_report
from .scan import (DEFAULT_WIDTHS, CombinedNull, NullDistribution, ScanResult, gaussian_null_block, scan_block,
                   scramble_block, window_statistic)
from .search import (
    VETO_BITS,
    VETO_COMMON_MODE,
    VETO_FLAGGED,
    VETO_FLASH,
    VETO_REPEATS,
    VETO_UNRESOLVED,
    VETO_EDGE,
    VETO_LEVEL,
    VETO_NEIGHBOUR,
    SearchResult,
    calibrate_null,
    search,
    search_store,
    veto_names,
)
from .series import EventSearchError, SeriesBlock, build_blocks, default_bad_flag_mask
from .synthetic import noise_per_sample, simulate_lightcurves

__all__ = [
    "search", "search_store", "SearchResult", "calibrate_null", "plot_candidate",
    "inject_microlensing", "efficiency", "EfficiencyResult", "plot_efficiency", "run_efficiency",
    "simulate_lightcurves", "noise_per_sample",
    "image_level_efficiency", "ImageCell", "ImageEfficiencyResult", "DEFAULT_CELLS", "plot_image_efficiency",
    "wilson_interval", "write_report", "candidate_cutouts",
    "fit_microlensing", "fit_flare", "fit_flat", "FitResult", "microlensing_model", "flare_model",
    "scan_block", "scramble_block", "window_statistic", "ScanResult", "NullDistribution", "CombinedNull",
    "gaussian_null_block", "DEFAULT_WIDTHS",
    "build_blocks", "SeriesBlock", "default_bad_flag_mask", "EventSearchError",
    "VETO_FLAGGED", "VETO_COMMON_MODE", "VETO_NEIGHBOUR", "VETO_FLASH", "VETO_REPEATS", "VETO_UNRESOLVED",
    "VETO_EDGE", "VETO_LEVEL",
    "VETO_BITS", "veto_names",
]
