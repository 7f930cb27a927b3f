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
calibrate_null(blocks, ...) -> {pool: NullDistribution}
plot_candidate(lc, candidate, ax=None)
inject_microlensing(lc, params, seed=0, ...) -> lc with events
efficiency(lc, stars=None, te_s=..., u0=..., rho=..., mags=..., ...) -> table
plot_efficiency(table, ax=None)
run_efficiency(out_dir, store=None, seed=0) -> EfficiencyResult   (``pydriftn efficiency``)
simulate_lightcurves(n_stars, n_exposures, ...) -> (lc, stars)     (synthetic, Gaussian noise)
fit_microlensing / fit_flare / fit_flat, scan_block / scramble_block, build_blocks
"""

from .fit import FitResult, fit_flare, fit_flat, fit_microlensing, flare_model, microlensing_model
from .inject import EfficiencyResult, efficiency, inject_microlensing, plot_efficiency, run_efficiency
from .plot import plot_candidate
from .scan import DEFAULT_WIDTHS, NullDistribution, ScanResult, scan_block, scramble_block, window_statistic
from .search import (
    VETO_BITS,
    VETO_COMMON_MODE,
    VETO_FLAGGED,
    VETO_FLASH,
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
    "fit_microlensing", "fit_flare", "fit_flat", "FitResult", "microlensing_model", "flare_model",
    "scan_block", "scramble_block", "window_statistic", "ScanResult", "NullDistribution", "DEFAULT_WIDTHS",
    "build_blocks", "SeriesBlock", "default_bad_flag_mask", "EventSearchError",
    "VETO_FLAGGED", "VETO_COMMON_MODE", "VETO_NEIGHBOUR", "VETO_FLASH", "VETO_BITS", "veto_names",
]
