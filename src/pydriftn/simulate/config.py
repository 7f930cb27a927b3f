"""Configuration of the drift-scan simulator: every physical knob, with units.

:class:`SimulationConfig` is a plain frozen dataclass (the simulator is a
test-data generator, not a pipeline stage, so it is not part of the pipeline's
pydantic model). Presets ``small`` and ``full`` are dictionaries of overrides
applied on top of the dataclass defaults; :func:`make_config` builds a
validated config from a preset plus keyword overrides.

Photometric scale (documented in ``docs/DESIGN.md``): zero points are the
magnitude giving 1 e-/s at the observed airmass (extinction included), so the
rate of a star is ``10**(0.4 * (zp - mag))`` e-/s. Defaults: r 27.1 (r = 20 →
≈ 690 e-/s), g 27.0, VR 27.6 (VR is ~1.75× wider than r). Sky brightness in
mag/arcsec² converts to e-/s/pixel as ``10**(0.4*(zp - mu)) * pixscale**2``
(VR 21.0 → ≈ 32 e-/s/px at 0.27"/px).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..geometry import parse_drift_rate

__all__ = ["SimulationConfig", "PRESETS", "make_config", "FILTER_NAMES"]

#: Accepted values of ``SimulationConfig.event_kind``.
EVENT_KINDS = ("alternate", "short", "long")

#: FILTER header values of DECam.
FILTER_NAMES = {
    "VR": "VR DECam c0007 6300.0 2600.0",
    "g": "g DECam SDSS c0001 4720.0 1520.0",
    "r": "r DECam SDSS c0002 6415.0 1480.0",
}


@dataclass(frozen=True)
class SimulationConfig:
    """All knobs of the simulator. Units are in the names or the comments.

    Geometry and pointing
    ---------------------
    ccds : CCD names (DETPOS), one image extension each, e.g. ``("S4", "N4")``.
    naxis1, naxis2 : CCD size in pixels (x = columns, y = rows).
    pixel_scale_arcsec : arcsec per pixel (CD matrix magnitude / 3600).
    ccd_gap_px : gap between adjacent CCDs in the (schematic) focal plane.
    ra_deg, dec_deg : nominal pointing (focal-plane centre, CRVAL).
    pointing_repeat_arcsec : rms of the TRUE pointing offset of each exposure
        from the nominal one (the telescope returns to the field each time).
    header_pointing_error_arcsec : rms per axis of the HEADER WCS error
        (CRVAL shift) relative to the true WCS; the pipeline must re-fit it.
        Up to 60".
    header_rotation_error_deg : rms of the HEADER WCS rotation error about the
        focal-plane centre. Up to 0.2°.
    sip_amplitude_px : size (pixels at the CCD corner) of a true quadratic
        SIP distortion in the rendering WCS; 0 = none (default). The header
        WCS never carries it.

    Exposures
    ---------
    n_exposures : drift exposures per night.
    n_nights : nights (directories ``night_1`` ...; night k starts k-1 days later).
    exptime_s : drift EXPTIME (s).
    overhead_s : readout + overhead between exposures (s); spacing is
        ``exptime_s + overhead_s``.
    drift_rate_arcsec_s : drift-rate vector (east, north) arcsec/s.
    start_isot : UTC DATE-OBS of the first drift exposure.
    first_expnum : EXPNUM of the first drift exposure.
    pointed_exptime_s : EXPTIME of the pointed (tracked) g and r images.
    pointed_lead_s : the pointed g image starts this long before the first
        drift exposure (r follows g after exptime + overhead).
    fz_exposures : the last ``fz_exposures`` drift exposures of each night are
        written as tile-compressed ``.fits.fz`` (RICE, quantised like CP)
        INSTEAD of ``.fits``.

    Photometry
    ----------
    zp_vr, zp_g, zp_r : zero points (mag for 1 e-/s, extinction included).
    sky_vr, sky_g, sky_r : sky brightness (mag/arcsec²).
    airmass, altitude_m, aperture_cm : for scintillation (Young 1967).
    seeing_vr_arcsec, seeing_g_arcsec, seeing_r_arcsec : mean FWHM.
    moffat_beta : Moffat index of the PSF (approximated by a sum of Gaussians).
    n_gauss : number of Gaussians in that approximation (2-4).

    Stars
    -----
    n_stars_per_ccd : stars with ``r_min <= r <= r_max`` per CCD area (density
        is uniform; stars in a margin around each CCD are simulated too).
        Crowding knob: raise it for bulge-like fields.
    r_min, r_max : r range; luminosity function dN/dm ∝ 10**(lf_slope*m).
    n_bright_stars_per_ccd : mean number per CCD area of extra bright stars
        (r uniform in ``bright_r_range``) that saturate drift exposures
        (default 0: none).
    bleed : charge above full well (SATURATA/B × GAINA/B electrons) bleeds
        along the column (y), conserving charge; pixels filled only by
        bleeding get mask code 4, pixels over full well themselves code 3.
    gr_min, gr_max : uniform g-r colour range.
    vr_colour_term : VR = r + vr_colour_term * ((g-r) - 0.6).
    pm_rms_mas_yr : rms proper motion per axis (mas/yr).
    gaia_g_max : faint limit of the Gaia-like reference (G).
    gaia_pos_err_mas : rms position error of the reference at G = 17
        (scales as 10**(0.2*(G-17)), floor 0.02 mas).
    gaia_ref_epoch : Gaia reference epoch (Julian year).

    Common pattern (per exposure, shared by all stars and CCDs)
    ------------------------------------------------------------
    jitter_rms_arcsec : rms of the tracking jitter per axis (along, cross).
    jitter_tau_s : correlation times of the two Ornstein-Uhlenbeck components
        summed (equal variance) to make the jitter.
    transparency_rms : rms of the slow transparency variation (fraction).
    transparency_tau_s : its correlation time (s).
    seeing_rms_frac : rms fractional variation of the FWHM over time.
    seeing_tau_s : its correlation time (s).
    max_step_px : largest image motion per fine time step (px).

    Injected phenomena
    ------------------
    events_per_ccd : microlensing events per CCD (on stars of r in
        ``event_r_range``); alternate "short" (tE < exptime, t0 inside an
        exposure) and "long" (tE spanning several exposures) kinds.
    event_kind : ``"alternate"`` (default: short, long, short, ... on each
        CCD), ``"short"`` or ``"long"`` (every event of that kind). With
        equal ends of the ranges below (e.g. ``short_te_range_s=(3, 3)``,
        ``u0_range=(0.1, 0.1)``, ``rho_range=(0.01, 0.01)``) every event has
        exactly those parameters: the image-level injection-recovery
        (:mod:`pydriftn.events.imagelevel`) simulates one grid cell this way.
        Written to ``simulation.json`` only when not the default, so default
        datasets are unchanged.
    short_te_range_s, long_te_range_s, u0_range, rho_range : event parameters.
    event_min_separation_arcsec : event stars of a CCD are at least this far
        apart (default 0: any). Real events are rare enough never to coincide
        within a few arcsec; on a small, dense CCD with many events per
        night, two event stars whose trails share light would trip the
        search's neighbour veto, which is right for real data and a loss
        that no real sky produces. Written to ``simulation.json`` only when
        not 0.
    flashes_per_ccd_exposure : millisecond flashes per CCD and exposure; the
        first of each set is placed ON a star's instantaneous image.
    flash_counts_range_e : total counts of a flash (e-), log-uniform.
    flash_duration_s : duration (s).
    satellite_prob : probability of a satellite streak per exposure (one
        straight line across the whole focal plane, seen by every CCD it
        crosses); ``satellite_first`` forces one in the first drift exposure
        through CCD ``satellite_ccd`` (default S4; if absent, the CCD
        whose name sorts first).
    satellite_surface_brightness_e : e- per pixel of streak length.
    cr_rate_per_mpix_s : cosmic-ray rate (per megapixel per second of exposure;
        the default 0.5 gives ~5 per small-preset CCD exposure and ~80 per
        full CCD, generous on purpose so that every test sees some).
    cr_counts_range_e : total e- per cosmic ray (log-uniform).
    n_bad_columns : bad columns per CCD (CP code 1).

    Detector
    --------
    gain_range, rdnoise_range_e, saturate_range_adu : per-amplifier values are
        drawn uniformly from these ranges (fixed per CCD for the dataset).

    Output
    ------
    store_all_lightcurves : write the fine-grid relative light curve of every
        star (else only of stars with injected events; the per-trail
        ``scint_rms`` column always says how large the rest is).
    """

    preset: str = "small"
    # geometry
    ccds: tuple = ("S4", "N4")
    naxis1: int = 512
    naxis2: int = 1024
    pixel_scale_arcsec: float = 0.27
    ccd_gap_px: int = 60
    ra_deg: float = 269.5
    dec_deg: float = -29.0
    pointing_repeat_arcsec: float = 1.0
    header_pointing_error_arcsec: float = 3.0
    header_rotation_error_deg: float = 0.02
    sip_amplitude_px: float = 0.0
    # exposures
    n_exposures: int = 3
    n_nights: int = 1
    exptime_s: float = 20.0
    overhead_s: float = 28.0
    drift_rate_arcsec_s: tuple = (0.0, 0.5)
    start_isot: str = "2021-08-15T01:00:00.000"
    first_expnum: int = 1000001
    pointed_exptime_s: float = 60.0
    pointed_lead_s: float = 600.0
    fz_exposures: int = 0
    # photometry
    zp_vr: float = 27.6
    zp_g: float = 27.0
    zp_r: float = 27.1
    sky_vr: float = 21.0
    sky_g: float = 22.0
    sky_r: float = 21.0
    airmass: float = 1.2
    altitude_m: float = 2215.0
    aperture_cm: float = 400.0
    seeing_vr_arcsec: float = 1.0
    seeing_g_arcsec: float = 1.25
    seeing_r_arcsec: float = 1.1
    moffat_beta: float = 3.0
    n_gauss: int = 3
    # stars
    n_stars_per_ccd: int = 300
    r_min: float = 14.0
    r_max: float = 22.5
    lf_slope: float = 0.3
    n_bright_stars_per_ccd: float = 0.0
    bright_r_range: tuple = (10.0, 12.0)
    bleed: bool = True
    gr_min: float = 0.3
    gr_max: float = 1.2
    vr_colour_term: float = 0.1
    pm_rms_mas_yr: float = 4.0
    gaia_g_max: float = 20.5
    gaia_pos_err_mas: float = 0.1
    gaia_ref_epoch: float = 2016.0
    # common pattern
    jitter_rms_arcsec: float = 0.07
    jitter_tau_s: tuple = (0.3, 1.5)
    transparency_rms: float = 0.015
    transparency_tau_s: float = 8.0
    seeing_rms_frac: float = 0.04
    seeing_tau_s: float = 5.0
    max_step_px: float = 0.1
    # injected phenomena
    events_per_ccd: int = 2
    event_kind: str = "alternate"
    event_r_range: tuple = (16.0, 19.0)
    short_te_range_s: tuple = (2.0, 8.0)
    long_te_range_s: tuple = (40.0, 120.0)
    u0_range: tuple = (0.02, 0.5)
    rho_range: tuple = (0.001, 0.05)
    event_min_separation_arcsec: float = 0.0
    flashes_per_ccd_exposure: int = 2
    flash_counts_range_e: tuple = (5000.0, 50000.0)
    flash_duration_s: float = 0.001
    satellite_prob: float = 0.0
    satellite_first: bool = True
    satellite_ccd: str = "S4"
    satellite_surface_brightness_e: float = 3000.0
    cr_rate_per_mpix_s: float = 0.5
    cr_counts_range_e: tuple = (500.0, 20000.0)
    n_bad_columns: int = 2
    # detector
    gain_range: tuple = (3.9, 4.1)
    rdnoise_range_e: tuple = (6.0, 7.0)
    saturate_range_adu: tuple = (40000.0, 45000.0)
    # output
    store_all_lightcurves: bool = True

    # ---------------------------------------------------------------- derived
    @property
    def drift_rate(self):
        """Drift-rate vector ``(east, north)`` arcsec/s as floats."""
        return parse_drift_rate(self.drift_rate_arcsec_s)

    def zp(self, band):
        """Zero point (mag for 1 e-/s) of ``band`` in {'VR', 'g', 'r'}."""
        return {"VR": self.zp_vr, "g": self.zp_g, "r": self.zp_r}[band]

    def sky_e_s_px(self, band):
        """Sky rate in e-/s/pixel of ``band``."""
        mu = {"VR": self.sky_vr, "g": self.sky_g, "r": self.sky_r}[band]
        return 10 ** (0.4 * (self.zp(band) - mu)) * self.pixel_scale_arcsec**2

    def seeing_arcsec(self, band):
        """Mean FWHM (arcsec) of ``band``."""
        return {"VR": self.seeing_vr_arcsec, "g": self.seeing_g_arcsec, "r": self.seeing_r_arcsec}[band]

    def to_dict(self):
        """JSON-friendly dict of all fields."""
        d = dataclasses.asdict(self)
        if d["event_kind"] == "alternate":  # optional knob: default datasets' simulation.json unchanged
            del d["event_kind"]
        if d["event_min_separation_arcsec"] == 0.0:
            del d["event_min_separation_arcsec"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def validate(self):
        """Raise :class:`~pydriftn.errors.ConfigError` on impossible values."""
        problems = []
        if not self.ccds:
            problems.append("ccds: at least one CCD name expected")
        if len(set(self.ccds)) != len(self.ccds):
            problems.append(f"ccds: duplicate names in {self.ccds}")
        for k in ("naxis1", "naxis2", "n_exposures", "n_nights"):
            if int(getattr(self, k)) < 1:
                problems.append(f"{k}: expected >= 1, got {getattr(self, k)}")
        for k in ("exptime_s", "pixel_scale_arcsec", "pointed_exptime_s", "max_step_px",
                  "seeing_vr_arcsec", "seeing_g_arcsec", "seeing_r_arcsec", "moffat_beta"):
            if not float(getattr(self, k)) > 0:
                problems.append(f"{k}: expected > 0, got {getattr(self, k)}")
        if self.overhead_s < 0:
            problems.append(f"overhead_s: expected >= 0, got {self.overhead_s}")
        if not 2 <= self.n_gauss <= 4:
            problems.append(f"n_gauss: expected 2..4, got {self.n_gauss}")
        if self.moffat_beta <= 1.5:
            problems.append(f"moffat_beta: expected > 1.5, got {self.moffat_beta}")
        if abs(self.header_pointing_error_arcsec) > 60:
            problems.append("header_pointing_error_arcsec: expected <= 60")
        if abs(self.header_rotation_error_deg) > 0.2:
            problems.append("header_rotation_error_deg: expected <= 0.2")
        if not self.r_min < self.r_max:
            problems.append(f"r_min/r_max: expected r_min < r_max, got {self.r_min}, {self.r_max}")
        if self.n_stars_per_ccd < 0:
            problems.append("n_stars_per_ccd: expected >= 0")
        try:
            parse_drift_rate(self.drift_rate_arcsec_s)
        except ValueError as exc:
            problems.append(f"drift_rate_arcsec_s: {exc}")
        if not 0 <= self.fz_exposures <= self.n_exposures:
            problems.append(f"fz_exposures: expected 0..n_exposures, got {self.fz_exposures}")
        if self.event_kind not in EVENT_KINDS:
            problems.append(f"event_kind: expected one of {EVENT_KINDS}, got {self.event_kind!r}")
        for k in ("short_te_range_s", "long_te_range_s", "u0_range", "rho_range", "event_r_range"):
            lo, hi = getattr(self, k)
            if not lo <= hi:
                problems.append(f"{k}: expected (low, high) with low <= high, got {getattr(self, k)}")
        if not (math.isfinite(self.event_min_separation_arcsec) and self.event_min_separation_arcsec >= 0):
            problems.append(f"event_min_separation_arcsec: expected >= 0, got {self.event_min_separation_arcsec}")
        if not 0 < self.rho_range[0]:
            problems.append(f"rho_range: expected > 0 (log-uniform), got {self.rho_range}")
        if not math.isfinite(self.dec_deg) or abs(self.dec_deg) > 89:
            problems.append(f"dec_deg: expected |dec| <= 89, got {self.dec_deg}")
        if problems:
            raise ConfigError("simulation config: " + "; ".join(problems))
        return self


PRESETS = {
    "tiny": dict(
        preset="tiny",
        ccds=("S4",),
        naxis1=256,
        naxis2=512,
        n_exposures=2,
        n_stars_per_ccd=100,
        events_per_ccd=2,
        flashes_per_ccd_exposure=1,
        store_all_lightcurves=True,
    ),
    "small": dict(
        preset="small",
        ccds=("S4", "N4"),
        naxis1=512,
        naxis2=1024,
        n_exposures=3,
        n_stars_per_ccd=300,
        events_per_ccd=2,
        flashes_per_ccd_exposure=2,
        store_all_lightcurves=True,
    ),
    "full": dict(
        preset="full",
        ccds=("S4", "N4"),
        naxis1=2046,
        naxis2=4094,
        n_exposures=3,
        n_stars_per_ccd=2000,
        ccd_gap_px=201,  # DECam: 3.0 mm between S4 and N4 (long edges)
        events_per_ccd=4,
        flashes_per_ccd_exposure=3,
        store_all_lightcurves=False,
    ),
}

#: Accepted alternative names of config fields (e.g. CLI spellings).
ALIASES = {"stars_per_ccd": "n_stars_per_ccd", "drift_rate": "drift_rate_arcsec_s", "nights": "n_nights"}

_TUPLE_FIELDS = {f.name for f in dataclasses.fields(SimulationConfig) if isinstance(f.default, tuple)}


def make_config(preset="small", **overrides):
    """Build a :class:`SimulationConfig` from a preset and overrides.

    Parameters
    ----------
    preset : {'tiny', 'small', 'full'} or SimulationConfig
    **overrides
        Any field of :class:`SimulationConfig`. ``ccds`` may be a string
        ``"S4,N4"``; ``drift_rate_arcsec_s`` a string ``"E,N"`` or a pair.
        ``None`` values are ignored (convenient for CLI options). Aliases:
        ``stars_per_ccd``, ``drift_rate``, ``nights``.

    Raises
    ------
    ConfigError
        Unknown preset or field, or impossible values.
    """
    if isinstance(preset, SimulationConfig):
        base = dataclasses.asdict(preset)
    elif isinstance(preset, dict):
        base = dict(preset)
    else:
        if preset not in PRESETS:
            raise ConfigError(f"simulation preset {preset!r}: expected one of {sorted(PRESETS)}")
        base = dict(PRESETS[preset])
    names = {f.name for f in dataclasses.fields(SimulationConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        key = ALIASES.get(key, key)
        if key not in names:
            import difflib

            hint = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(
                f"simulation config: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        if key == "ccds" and isinstance(value, str):
            value = tuple(c.strip() for c in value.split(",") if c.strip())
        if key == "drift_rate_arcsec_s":
            try:
                value = parse_drift_rate(value)
            except ValueError as exc:
                raise ConfigError(f"simulation config: drift_rate_arcsec_s: {exc}") from None
        if key in _TUPLE_FIELDS and isinstance(value, list):
            value = tuple(value)
        base[key] = value
    for key in _TUPLE_FIELDS:
        if key in base and isinstance(base[key], list):
            base[key] = tuple(base[key])
    return SimulationConfig(**base).validate()
