"""Physically faithful DECam drift-scan simulator with truth tables.

Entry point: :func:`simulate_dataset` (``pydriftn simulate OUT_DIR``);
:func:`load_dataset` re-opens a written dataset. Presets ``tiny`` (1 CCD
256 × 512, 2 exposures), ``small`` (S4 + N4, 512 × 1024, 3 exposures, ~300
stars per CCD) and ``full`` (2046 × 4094, ~2000 stars per CCD); every knob is
a field of :class:`SimulationConfig` (units in its docstring).

Physics, per drift exposure × CCD: stars from a rising luminosity function
with colours, positions from the TRUE shutter-open WCS and the drift-rate
vector through :func:`pydriftn.geometry.star_pixel_positions` on a fine time
grid (<= 0.1 px of motion per step), plus a common tracking jitter; seeing that
wanders, common transparency changes, per-star scintillation (Young 1967),
finite-source microlensing from :mod:`pydriftn.models`; Moffat PSF (sum of 3
Gaussians), exact pixel and time integration; flashes, a satellite streak,
cosmic rays; sky, Poisson and read noise per amplifier, gain, bad columns,
saturation; CP-style MEF images and dq masks, and a HEADER WCS perturbed from
the true one.

Outputs (``docs/DESIGN.md``, "Simulated data layout", is the reference)::

    OUT_DIR/pointed/c4d_2021B0023-pointed_{g,r}-{image,dqmask}.fits
    OUT_DIR/night_{k}/c4d_2021B0023-exp_{EXPNUM}-{image,dqmask}.fits[.fz]
    OUT_DIR/gaia_reference.csv   source_id, ra, dec, phot_g_mean_mag, pmra, pmdec, ref_epoch
    OUT_DIR/simulation.json      seed, version, config, exposure schedule
    OUT_DIR/truth/*.parquet:

``stars``
    star_id, ra, dec (deg, epoch of the observations), g, r, vr (mag),
    flux_vr_e_s, flux_g_e_s, flux_r_e_s (e-/s), pmra_mas_yr, pmdec_mas_yr.
``trails`` (one row per star × drift exposure × CCD with light on the CCD)
    expnum, ccd, star_id, x_start, y_start, x_end, y_end (px, 0-based, true
    WCS at t = 0 and EXPTIME, no jitter), counts_e (expected e- deposited on
    the CCD), peak_adu (noiseless model peak incl. sky), saturated (bool),
    on_ccd_fraction (counts_e / expected_counts_e), expected_counts_e (e- that
    reached the focal plane), flux_e_s, scint_rms (rms of rel_flux).
``pointed``
    band, ccd, star_id, x, y, counts_e, peak_adu, saturated, on_ccd_fraction.
``lightcurves`` (fine grid; all stars in tiny/small, event stars in full)
    expnum, star_id, t_s (mid-step, s after shutter open), mjd, rel_flux (the
    star's own changes: magnification × (1 + scintillation)).
``common`` (fine grid)
    expnum, ccd, t_s, mjd, jitter_along_px, jitter_cross_px, jitter_x_px,
    jitter_y_px, transparency, seeing_fwhm_arcsec.
``events``
    star_id, ccd, t0_mjd, te_s, u0, rho, kind ('short' | 'long').
``flashes``
    expnum, ccd, x, y (px, incl. jitter), ra, dec, t_s, t_mjd, duration_s,
    counts_e, host_star_id (-1 if not on a star).
``satellites``
    expnum, ccd, x0, y0, x1, y1, width_px (FWHM), surface_brightness_e (e- per
    px of length).
``cosmic_rays``
    expnum, ccd, x, y (energy-weighted), npix, counts_e, kind ('hit' | 'track').
``wcs``
    kind ('drift' | 'pointed'), expnum, band, ccd, true_wcs, header_wcs (FITS
    header text, cards separated by newlines).

Why our own renderer: see :mod:`pydriftn.simulate.psf`.
"""

from .config import PRESETS, SimulationConfig, make_config
from .dataset import SimulatedDataset, exposure_schedule, load_dataset, simulate_dataset
from .psf import moffat_mog, render_moving_sources, strip_fraction

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
    "strip_fraction",
]
