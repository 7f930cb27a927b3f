"""Sky, focal plane and time-dependent conditions of a simulated dataset.

* CCD layout and WCS: every CCD shares ``CRVAL`` (the focal-plane centre) and
  the DECam CP orientation (``CD1_2 = +s``, ``CD2_1 = -s``, ``s`` = pixel
  scale in degrees, so +x is -Dec and +y is +RA); ``CRPIX`` places each CCD in
  a schematic focal plane: S CCDs at +x of the centre, N CCDs at -x, side by
  side in the order given, separated by ``ccd_gap_px``. The TRUE WCS of an
  exposure (used for rendering) has the exposure's true pointing; the HEADER
  WCS differs by a random CRVAL shift and a rotation about the focal-plane
  centre.
* Star field: uniform positions over the union of the CCDs plus a margin that
  holds every star whose trail or PSF can reach a CCD, a rising luminosity
  function in r, uniform g-r colours, VR by a colour term, proper motions,
  and a Gaia-like reference made from it.
* Common pattern of an exposure: tracking jitter (along/cross track, sum of
  Ornstein-Uhlenbeck processes), transparency, seeing; per-star scintillation
  (Young 1967).
"""

from __future__ import annotations

import logging
import math
import zlib

import astropy.units as u
import numpy as np
import pandas as pd
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS, Sip

from ..errors import ConfigError
from ..geometry import offset_sky

__all__ = [
    "CCDNUM",
    "stream_rng",
    "ccd_centre_offsets",
    "make_wcs",
    "make_star_field",
    "gaia_reference",
    "choose_events",
    "ou_process",
    "common_pattern",
    "scintillation_sigma_per_step",
    "fine_time_grid",
]

log = logging.getLogger(__name__)

#: DECam CCDNUM of the DETPOS names (others get 0).
CCDNUM = {f"S{k}": k + 24 for k in range(1, 8)}
CCDNUM.update({f"N{k}": k + 31 for k in range(1, 8)})
CCDNUM.update({"S4": 28, "N4": 35})

# stream identifiers for numpy SeedSequence entropy
STREAM_FIELD = 1
STREAM_EXPOSURE = 2
STREAM_CCD_EXPOSURE = 3
STREAM_STAR = 4
STREAM_DETECTOR = 5
STREAM_POINTED = 6

#: Side (px) of the focal-plane tiles in which stars are generated.
TILE_PX = 256


def _name_key(name):
    return zlib.crc32(str(name).encode())


def stream_rng(seed, stream, *keys):
    """Independent numpy Generator for ``(seed, stream, *keys)``.

    Keys may be ints or strings (strings are hashed with CRC32), so e.g. the
    generator of ``(exposure, "N4")`` does not depend on which other CCDs are
    simulated or in which order.
    """
    ent = [int(seed) & 0xFFFFFFFF, int(stream)]
    for k in keys:
        ent.append(_name_key(k) if isinstance(k, str) else int(k) & 0xFFFFFFFFFFFF)
    return np.random.default_rng(ent)


def ccd_centre_offsets(cfg):
    """Pixel offset ``(dx, dy)`` of each CCD centre from the focal-plane centre.

    Schematic layout: S CCDs at +x (south, since +x is -Dec), N CCDs at -x,
    in the order they appear in ``cfg.ccds``.
    """
    step = cfg.naxis1 + cfg.ccd_gap_px
    out = {}
    n_s = n_n = 0
    for name in cfg.ccds:
        if str(name).upper().startswith("N"):
            out[name] = (-(0.5 + n_n) * step, 0.0)
            n_n += 1
        else:
            out[name] = ((0.5 + n_s) * step, 0.0)
            n_s += 1
    return out


def make_wcs(cfg, ccd, crval, rotation_deg=0.0, sip=False):
    """TAN (optionally TAN-SIP) WCS of one CCD.

    Parameters
    ----------
    cfg : SimulationConfig
    ccd : str
    crval : (float, float)
        Focal-plane centre (degrees).
    rotation_deg : float
        Rotation of the CD matrix (about the focal-plane centre).
    sip : bool
        Add the true quadratic SIP distortion of amplitude
        ``cfg.sip_amplitude_px`` (at the focal-plane corner).
    """
    dx, dy = ccd_centre_offsets(cfg)[ccd]
    s = cfg.pixel_scale_arcsec / 3600.0
    base = np.array([[0.0, s], [-s, 0.0]])
    th = math.radians(rotation_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [float(crval[0]) % 360.0, float(crval[1])]
    w.wcs.crpix = [(cfg.naxis1 + 1) / 2.0 - dx, (cfg.naxis2 + 1) / 2.0 - dy]
    w.wcs.cd = rot @ base
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (cfg.naxis1, cfg.naxis2)
    if sip and cfg.sip_amplitude_px:
        nccd = max(1, len(cfg.ccds))
        rmax = math.hypot(nccd * (cfg.naxis1 + cfg.ccd_gap_px) / 2.0, cfg.naxis2 / 2.0)
        c = cfg.sip_amplitude_px / rmax**2
        a = np.zeros((3, 3))
        b = np.zeros((3, 3))
        a[2, 0], a[1, 1], a[0, 2] = 0.6 * c, -0.3 * c, 0.4 * c
        b[2, 0], b[1, 1], b[0, 2] = -0.2 * c, 0.5 * c, 0.7 * c
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def _pixel_box_union(cfg, margin_px):
    offs = ccd_centre_offsets(cfg)
    xs = [o[0] for o in offs.values()]
    ys = [o[1] for o in offs.values()]
    hx, hy = cfg.naxis1 / 2.0 + margin_px, cfg.naxis2 / 2.0 + margin_px
    return min(xs) - hx, max(xs) + hx, min(ys) - hy, max(ys) + hy


def field_margin_px(cfg):
    """Margin (px) around every CCD within which stars are generated."""
    east, north = cfg.drift_rate
    trail = math.hypot(east, north) * cfg.exptime_s / cfg.pixel_scale_arcsec
    fwhm_px = max(cfg.seeing_vr_arcsec, cfg.seeing_g_arcsec, cfg.seeing_r_arcsec) / cfg.pixel_scale_arcsec
    psf_pad = 5.0 * 1.1 * fwhm_px * (1.0 + 4.0 * cfg.seeing_rms_frac) + 2.0
    point = 5.0 * cfg.pointing_repeat_arcsec / cfg.pixel_scale_arcsec
    jit = 6.0 * cfg.jitter_rms_arcsec / cfg.pixel_scale_arcsec
    return trail + psf_pad + point + jit + 2.0


def _lf_sample(rng, n, mmin, mmax, slope):
    u = rng.random(n)
    a, b = 10 ** (slope * mmin), 10 ** (slope * mmax)
    return np.log10(a + u * (b - a)) / slope


def make_star_field(cfg, seed):
    """The true star field (positions at the epoch of the observations).

    Returns
    -------
    pandas.DataFrame
        ``star_id, ra, dec, g, r, vr, flux_vr_e_s, flux_g_e_s, flux_r_e_s,
        pmra_mas_yr, pmdec_mas_yr`` (+ private ``_gaia_err_*`` unit normals used
        by :func:`gaia_reference`), sorted by ``star_id``.
    """
    margin = field_margin_px(cfg)
    x0, x1, y0, y1 = _pixel_box_union(cfg, margin)
    density = cfg.n_stars_per_ccd / float(cfg.naxis1 * cfg.naxis2)
    # Stars are generated per focal-plane tile of TILE_PX x TILE_PX pixels, each
    # tile with its own generator: a CCD's stars do not depend on which other
    # CCDs are simulated, and star_id encodes (tile, index) stably.
    cols = {k: [] for k in ("id", "px", "py", "r", "gr", "pmra", "pmdec", "gx", "gy")}
    for tx in range(int(math.floor(x0 / TILE_PX)), int(math.floor(x1 / TILE_PX)) + 1):
        for ty in range(int(math.floor(y0 / TILE_PX)), int(math.floor(y1 / TILE_PX)) + 1):
            rng = stream_rng(seed, STREAM_FIELD, tx + 2**15, ty + 2**15)
            n = int(rng.poisson(density * TILE_PX * TILE_PX))
            if n >= 2**16:
                raise ConfigError(
                    f"simulation config: n_stars_per_ccd={cfg.n_stars_per_ccd} gives {n} stars in one "
                    f"{TILE_PX}-px tile (max 65535)"
                )
            cols["id"].append(((tx + 2**15) * 2**16 + (ty + 2**15)) * 2**16 + np.arange(n, dtype=np.int64))
            cols["px"].append((tx + rng.random(n)) * TILE_PX)
            cols["py"].append((ty + rng.random(n)) * TILE_PX)
            cols["r"].append(_lf_sample(rng, n, cfg.r_min, cfg.r_max, cfg.lf_slope))
            cols["gr"].append(rng.uniform(cfg.gr_min, cfg.gr_max, n))
            cols["pmra"].append(rng.normal(0.0, cfg.pm_rms_mas_yr, n))
            cols["pmdec"].append(rng.normal(0.0, cfg.pm_rms_mas_yr, n))
            cols["gx"].append(rng.standard_normal(n))
            cols["gy"].append(rng.standard_normal(n))
            if cfg.n_bright_stars_per_ccd > 0:
                # bright (saturating) stars on top of the luminosity function;
                # drawn after the others so those do not change
                nb = int(rng.poisson(cfg.n_bright_stars_per_ccd * TILE_PX * TILE_PX / (cfg.naxis1 * cfg.naxis2)))
                cols["id"].append(((tx + 2**15) * 2**16 + (ty + 2**15)) * 2**16 + n + np.arange(nb, dtype=np.int64))
                cols["px"].append((tx + rng.random(nb)) * TILE_PX)
                cols["py"].append((ty + rng.random(nb)) * TILE_PX)
                cols["r"].append(rng.uniform(*cfg.bright_r_range, nb))
                cols["gr"].append(rng.uniform(cfg.gr_min, cfg.gr_max, nb))
                cols["pmra"].append(rng.normal(0.0, cfg.pm_rms_mas_yr, nb))
                cols["pmdec"].append(rng.normal(0.0, cfg.pm_rms_mas_yr, nb))
                cols["gx"].append(rng.standard_normal(nb))
                cols["gy"].append(rng.standard_normal(nb))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(c["id"])
    px, py, r, gr = c["px"], c["py"], c["r"], c["gr"]
    pmra, pmdec = c["pmra"], c["pmdec"]
    # focal-plane pixel offsets -> tangent-plane (east, north) arcsec with the
    # nominal orientation (+x = -Dec, +y = +RA)
    east = py * cfg.pixel_scale_arcsec
    north = -px * cfg.pixel_scale_arcsec
    ra, dec = offset_sky(cfg.ra_deg, cfg.dec_deg, east, north)
    g = r + gr
    vr = r + cfg.vr_colour_term * (gr - 0.6)
    df = pd.DataFrame(
        {
            "star_id": c["id"],
            "ra": ra,
            "dec": dec,
            "g": g,
            "r": r,
            "vr": vr,
            "flux_vr_e_s": 10 ** (0.4 * (cfg.zp_vr - vr)),
            "flux_g_e_s": 10 ** (0.4 * (cfg.zp_g - g)),
            "flux_r_e_s": 10 ** (0.4 * (cfg.zp_r - r)),
            "pmra_mas_yr": pmra,
            "pmdec_mas_yr": pmdec,
            "_gaia_err_east": c["gx"],
            "_gaia_err_north": c["gy"],
        }
    )
    df = df.sort_values("star_id", ignore_index=True)
    log.info("star field: %d stars (%.0f per CCD area, margin %.0f px)", n, cfg.n_stars_per_ccd, margin)
    return df


def _julian_year(mjd):
    return 2000.0 + (mjd - 51544.5) / 365.25


def gaia_reference(cfg, stars, seed, obs_mjd):
    """Gaia-like reference of the field at ``cfg.gaia_ref_epoch``.

    ``G = r - 0.1 - 0.25 (g - r)`` (a broad-band colour term), kept to
    ``G <= gaia_g_max``; positions are moved back by the proper motion from
    the epoch of the observations and given random errors of
    ``gaia_pos_err_mas * 10**(0.2 (G - 17))`` per axis.
    """
    G = stars["r"].to_numpy() - 0.1 - 0.25 * (stars["g"].to_numpy() - stars["r"].to_numpy())
    dt_yr = cfg.gaia_ref_epoch - _julian_year(obs_mjd)
    err = np.maximum(cfg.gaia_pos_err_mas * 10 ** (0.2 * (G - 17.0)), 0.02)
    e_east = stars["pmra_mas_yr"].to_numpy() * dt_yr + stars["_gaia_err_east"].to_numpy() * err
    e_north = stars["pmdec_mas_yr"].to_numpy() * dt_yr + stars["_gaia_err_north"].to_numpy() * err
    ra, dec = offset_sky(stars["ra"].to_numpy(), stars["dec"].to_numpy(), e_east / 1000.0, e_north / 1000.0)
    keep = G <= cfg.gaia_g_max
    ids = 4000000000000000000 + stars["star_id"].to_numpy()
    return pd.DataFrame(
        {
            "source_id": ids[keep],
            "ra": ra[keep],
            "dec": dec[keep],
            "phot_g_mean_mag": G[keep],
            "pmra": stars["pmra_mas_yr"].to_numpy()[keep],
            "pmdec": stars["pmdec_mas_yr"].to_numpy()[keep],
            "ref_epoch": np.full(int(keep.sum()), cfg.gaia_ref_epoch),
        }
    )


def choose_events(cfg, stars, seed, exposures, nominal_wcs):
    """Pick stars and parameters for injected microlensing events.

    Per CCD, ``events_per_ccd`` stars with r in ``event_r_range`` whose
    nominal trail in the first exposure lies well inside the CCD. Kinds
    alternate (``cfg.event_kind == "alternate"``; ``"short"`` or ``"long"``
    makes every event that kind): ``short`` (tE in ``short_te_range_s``, t0
    inside a random exposure of a random night, 20-80 % into it) and ``long``
    (tE in ``long_te_range_s``, t0 uniform over a random night's exposures).

    Returns
    -------
    pandas.DataFrame
        ``star_id, ccd, t0_mjd, te_s, u0, rho, kind``.
    """
    from ..geometry import trail_endpoints

    rows = []
    used = set()
    nights = sorted({e["night"] for e in exposures})
    by_night = {n: [e for e in exposures if e["night"] == n] for n in nights}
    for ccd in sorted(cfg.ccds):
        rng = stream_rng(seed, STREAM_FIELD, "events", ccd)
        w = nominal_wcs[ccd]
        xs, ys, xe, ye = trail_endpoints(w, stars["ra"].to_numpy(), stars["dec"].to_numpy(), cfg.exptime_s, cfg.drift_rate)
        m = 30.0
        ok = (
            (stars["r"].to_numpy() >= cfg.event_r_range[0])
            & (stars["r"].to_numpy() <= cfg.event_r_range[1])
            & (np.minimum(xs, xe) > m)
            & (np.maximum(xs, xe) < cfg.naxis1 - 1 - m)
            & (np.minimum(ys, ye) > m)
            & (np.maximum(ys, ye) < cfg.naxis2 - 1 - m)
        )
        cand = [i for i in np.flatnonzero(ok) if i not in used]
        if len(cand) < cfg.events_per_ccd:
            log.warning("CCD %s: only %d candidate stars for %d events", ccd, len(cand), cfg.events_per_ccd)
        if cfg.event_min_separation_arcsec > 0:
            pick = _separated_picks(rng, cand, stars, cfg.events_per_ccd, cfg.event_min_separation_arcsec)
        else:
            pick = rng.choice(cand, size=min(cfg.events_per_ccd, len(cand)), replace=False) if cand else []
        for j, idx in enumerate(pick):
            used.add(int(idx))
            kind = ("short" if j % 2 == 0 else "long") if cfg.event_kind == "alternate" else cfg.event_kind
            if kind == "short":
                te = rng.uniform(*cfg.short_te_range_s)
                night = by_night[nights[int(rng.integers(len(nights)))]]
                e = night[int(rng.integers(len(night)))]
                t0 = e["mjd_obs"] + rng.uniform(0.2, 0.8) * cfg.exptime_s / 86400.0
            else:
                te = rng.uniform(*cfg.long_te_range_s)
                night = by_night[nights[int(rng.integers(len(nights)))]]
                t0 = rng.uniform(night[0]["mjd_obs"], night[-1]["mjd_obs"] + cfg.exptime_s / 86400.0)
            u0 = rng.uniform(*cfg.u0_range)
            rho = math.exp(rng.uniform(math.log(cfg.rho_range[0]), math.log(cfg.rho_range[1])))
            rows.append(
                dict(star_id=int(stars["star_id"].iloc[idx]), ccd=ccd, t0_mjd=t0, te_s=te, u0=u0, rho=rho, kind=kind)
            )
    return pd.DataFrame(rows, columns=["star_id", "ccd", "t0_mjd", "te_s", "u0", "rho", "kind"])


def _separated_picks(rng, cand, stars, n, min_sep_arcsec):
    """Up to ``n`` of the ``cand`` star indices in random order, each at least ``min_sep_arcsec`` from the
    ones taken before it (fewer, with a warning, when the candidates are too crowded)."""
    order = rng.permutation(np.asarray(cand, dtype=np.int64)) if len(cand) else np.zeros(0, np.int64)
    sky = SkyCoord(stars["ra"].to_numpy(float) * u.deg, stars["dec"].to_numpy(float) * u.deg)
    taken = []
    for idx in order:
        if len(taken) == n:
            break
        if not taken or sky[taken].separation(sky[idx]).arcsec.min() >= min_sep_arcsec:
            taken.append(int(idx))
    if len(taken) < n:
        log.warning("only %d event stars at least %g arcsec apart (%d asked)", len(taken), min_sep_arcsec, n)
    return taken


def fine_time_grid(cfg, speed_px_s):
    """Fine time steps of a drift exposure: mid-times (s) and the step (s).

    The step moves the image by at most ``cfg.max_step_px`` pixels.
    """
    n = max(1, int(math.ceil(cfg.exptime_s * speed_px_s / cfg.max_step_px)))
    dt = cfg.exptime_s / n
    return (np.arange(n) + 0.5) * dt, dt


def ou_process(rng, n, dt, sigma, tau):
    """Stationary Ornstein-Uhlenbeck series (exact AR(1) discretisation)."""
    if sigma == 0 or n == 0:
        return np.zeros(n)
    from scipy.signal import lfilter  # the AR(1) recursion in C

    phi = math.exp(-dt / tau)
    drive = sigma * math.sqrt(1.0 - phi * phi) * rng.standard_normal(n)
    drive[0] = sigma * rng.standard_normal()  # stationary start
    return lfilter([1.0], [1.0, -phi], drive)


def common_pattern(cfg, seed, expnum, t_mid, dt):
    """Common pattern of one drift exposure (the same on every CCD).

    Returns
    -------
    dict of ndarray (T,)
        ``jitter_along_arcsec``, ``jitter_cross_arcsec``, ``transparency``,
        ``seeing_fwhm_arcsec``; plus scalar ``pointing_east_arcsec``,
        ``pointing_north_arcsec`` (true pointing offset of the exposure),
        ``header_east_arcsec``, ``header_north_arcsec``, ``header_rot_deg``
        (header WCS errors).
    """
    rng = stream_rng(seed, STREAM_EXPOSURE, expnum)
    n = len(t_mid)
    taus = list(cfg.jitter_tau_s)
    sig = cfg.jitter_rms_arcsec / math.sqrt(len(taus))
    along = sum(ou_process(rng, n, dt, sig, tau) for tau in taus)
    cross = sum(ou_process(rng, n, dt, sig, tau) for tau in taus)
    transp = 1.0 + ou_process(rng, n, dt, cfg.transparency_rms, cfg.transparency_tau_s)
    seeing = cfg.seeing_vr_arcsec * np.exp(ou_process(rng, n, dt, cfg.seeing_rms_frac, cfg.seeing_tau_s))
    pe, pn = rng.normal(0.0, cfg.pointing_repeat_arcsec, 2)
    he, hn = rng.normal(0.0, cfg.header_pointing_error_arcsec, 2)
    hr = rng.normal(0.0, cfg.header_rotation_error_deg)
    return dict(
        jitter_along_arcsec=along,
        jitter_cross_arcsec=cross,
        transparency=np.clip(transp, 0.0, None),
        seeing_fwhm_arcsec=seeing,
        pointing_east_arcsec=float(pe),
        pointing_north_arcsec=float(pn),
        header_east_arcsec=float(he),
        header_north_arcsec=float(hn),
        header_rot_deg=float(hr),
    )


def scintillation_sigma_per_step(cfg, dt):
    """Relative scintillation rms of one fine step of length ``dt`` seconds.

    Young (1967): ``sigma(T) = 0.09 D**(-2/3) X**1.75 exp(-h/8000 m) (2T)**-0.5``
    for an integration of ``T`` seconds (D in cm). White noise per step with
    this rms averages to ``sigma(T)`` over any longer interval.
    (D = 400 cm, X = 1.2, h = 2215 m: 0.17 % in 0.5 s.)
    """
    return (
        0.09
        * cfg.aperture_cm ** (-2.0 / 3.0)
        * cfg.airmass**1.75
        * math.exp(-cfg.altitude_m / 8000.0)
        / math.sqrt(2.0 * dt)
    )


def pointing_crval(cfg, east_arcsec, north_arcsec):
    """Focal-plane centre shifted from the nominal pointing."""
    ra, dec = offset_sky(cfg.ra_deg, cfg.dec_deg, east_arcsec, north_arcsec)
    return float(ra), float(dec)

