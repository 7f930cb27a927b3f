"""Render one CCD of one exposure (drift or pointed) with its truth.

Order of operations for a drift exposure × CCD (all in electrons):

1. true WCS (true pointing of the exposure) and header WCS (with errors);
2. fine time grid (image motion <= ``max_step_px`` per step) and the common
   pattern: jitter (converted from along/cross track to x/y px with the trail
   direction from :mod:`pydriftn.geometry`), transparency, seeing;
3. stars whose trail + PSF can reach the CCD: positions from
   :func:`pydriftn.geometry.star_pixel_positions` (true WCS, drift vector) plus
   jitter; per-step weights ``flux * dt * transparency * rel_flux``, where
   ``rel_flux`` = microlensing magnification (:mod:`pydriftn.models`) ×
   (1 + white scintillation noise); rendered with
   :func:`~pydriftn.simulate.psf.render_moving_sources`;
4. flashes (static PSF for ``flash_duration_s``), a satellite streak;
5. sky (kept in the image), Poisson noise on the expected electrons, cosmic
   rays (added after, sharp), Gaussian read noise per amplifier (amp A:
   ``x < NAXIS1/2``), division by the amplifier gain, bad columns, saturation
   clipping at SATURATA/B;
6. dq mask with CP codes: 1 bad column, 3 saturated, 5 cosmic ray, 8 streak
   (one code per pixel, priority in that order).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from ..geometry import offset_sky, star_pixel_positions, trail_endpoints, trail_geometry
from .field import (
    STREAM_CCD_EXPOSURE,
    STREAM_DETECTOR,
    STREAM_EXPOSURE,
    STREAM_POINTED,
    STREAM_STAR,
    ccd_centre_offsets,
    common_pattern,
    fine_time_grid,
    make_wcs,
    pointing_crval,
    scintillation_sigma_per_step,
    stream_rng,
)
from .psf import moffat_mog, render_moving_sources

__all__ = ["detector_params", "render_drift_ccd", "render_pointed_ccd", "magnification"]

log = logging.getLogger(__name__)

MASK_BAD, MASK_SAT, MASK_BLEED, MASK_CR, MASK_STREAK = 1, 3, 4, 5, 8


def detector_params(cfg, seed, ccd):
    """Per-CCD amplifier gains, read noises, saturation levels, bad columns."""
    rng = stream_rng(seed, STREAM_DETECTOR, ccd)
    d = dict(
        gain=rng.uniform(*cfg.gain_range, 2),
        rdnoise=rng.uniform(*cfg.rdnoise_range_e, 2),
        saturate=rng.uniform(*cfg.saturate_range_adu, 2),
    )
    cols = rng.choice(np.arange(5, cfg.naxis1 - 5), size=min(cfg.n_bad_columns, max(cfg.naxis1 - 10, 0)), replace=False)
    bad = []
    for c in cols:
        y0 = int(rng.integers(0, cfg.naxis2 // 2))
        bad.append((int(c), y0, cfg.naxis2))  # column, first row, end row
    d["bad_columns"] = bad
    return d


def magnification(events_for_star, t_mjd):
    """Product of the magnifications of the events of one star at ``t_mjd``.

    Times are converted to seconds relative to each event's ``t0`` so that
    :func:`pydriftn.models.microlensing_magnification_curve` sees ``t``,
    ``t0`` and ``tE`` in seconds.
    """
    from ..models import microlensing_magnification_curve

    a = np.ones_like(np.asarray(t_mjd, dtype=float))
    for ev in events_for_star:
        t_s = (np.asarray(t_mjd, dtype=float) - ev["t0_mjd"]) * 86400.0
        a = a * microlensing_magnification_curve(t_s, 0.0, ev["te_s"], ev["u0"], ev["rho"])
    return a


def _amp_maps(cfg, det):
    nx = cfg.naxis1
    xa = nx // 2
    gain = np.empty(nx)
    gain[:xa], gain[xa:] = det["gain"][0], det["gain"][1]
    rn = np.empty(nx)
    rn[:xa], rn[xa:] = det["rdnoise"][0], det["rdnoise"][1]
    sat = np.empty(nx)
    sat[:xa], sat[xa:] = det["saturate"][0], det["saturate"][1]
    return gain, rn, sat


def make_cosmic_rays(rng, cfg, exptime_s):
    """Cosmic-ray deposits: compact hits (1-4 px) and short straight tracks.

    Returns
    -------
    list of (ys, xs, e) arrays, truth DataFrame (x, y, npix, counts_e, kind)
    """
    nx, ny = cfg.naxis1, cfg.naxis2
    n = int(rng.poisson(cfg.cr_rate_per_mpix_s * nx * ny / 1e6 * exptime_s))
    deposits, rows = [], []
    lo, hi = np.log(cfg.cr_counts_range_e[0]), np.log(cfg.cr_counts_range_e[1])
    for _ in range(n):
        total = math.exp(rng.uniform(lo, hi))
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        if rng.random() < 0.6:
            kind = "hit"
            npix = int(rng.integers(1, 5))
            cand = [(0, 0), (1, 0), (0, 1), (1, 1), (-1, 0), (0, -1)]
            sel = [cand[0]] + [cand[k] for k in rng.choice(np.arange(1, len(cand)), npix - 1, replace=False)]
            xs = np.array([int(round(x0)) + d[0] for d in sel])
            ys = np.array([int(round(y0)) + d[1] for d in sel])
        else:
            kind = "track"
            length = rng.uniform(3.0, 20.0)
            ang = rng.uniform(0, 2 * math.pi)
            s = np.arange(0.0, length, 0.3)
            pts = np.unique(
                np.stack([np.rint(x0 + s * math.cos(ang)), np.rint(y0 + s * math.sin(ang))], axis=1).astype(int), axis=0
            )
            xs, ys = pts[:, 0], pts[:, 1]
        ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        xs, ys = xs[ok], ys[ok]
        if len(xs) == 0:
            continue
        share = rng.gamma(4.0, 1.0, len(xs))
        e = total * share / share.sum()
        deposits.append((ys, xs, e))
        rows.append(
            dict(x=float(np.sum(xs * e) / e.sum()), y=float(np.sum(ys * e) / e.sum()), npix=int(len(xs)),
                 counts_e=float(e.sum()), kind=kind)
        )
    return deposits, pd.DataFrame(rows, columns=["x", "y", "npix", "counts_e", "kind"])


def satellite_line(cfg, seed, exposure):
    """The satellite streak of a drift exposure in focal-plane pixels, or None.

    A satellite crosses the whole focal plane in about a second, so its
    streak is one straight line shared by all CCDs (exposure-level generator:
    the same whatever CCDs are simulated). Returns ``(X, Y, ux, uy)``: a point
    relative to the focal-plane centre (CCD pixel axes) and the unit direction.
    """
    rng = stream_rng(seed, STREAM_EXPOSURE, exposure["expnum"], "satellite")
    forced = cfg.satellite_first and exposure.get("index", 0) == 0
    if not (forced or rng.random() < cfg.satellite_prob):
        return None
    offs = ccd_centre_offsets(cfg)
    if forced:
        dx, dy = offs[_satellite_ccd(cfg)]
        X = dx + rng.uniform(-0.3, 0.3) * cfg.naxis1
        Y = dy + rng.uniform(-0.3, 0.3) * cfg.naxis2
    else:
        xs = [o[0] for o in offs.values()]
        X = rng.uniform(min(xs) - cfg.naxis1 / 2, max(xs) + cfg.naxis1 / 2)
        Y = rng.uniform(-cfg.naxis2 / 2, cfg.naxis2 / 2)
    ang = rng.uniform(0, math.pi)
    return X, Y, math.cos(ang), math.sin(ang)


def _satellite(cfg, ccd, line, fwhm_px):
    """Image (e-) and truth of the streak ``line`` on one CCD, or (None, None)."""
    nx, ny = cfg.naxis1, cfg.naxis2
    X, Y, ux, uy = line
    dx, dy = ccd_centre_offsets(cfg)[ccd]
    xc, yc = X - dx + (nx - 1) / 2.0, Y - dy + (ny - 1) / 2.0
    # intersections of the line with the CCD borders [-0.5, n-0.5]
    ts = []
    for lim_x in (-0.5, nx - 0.5):
        if abs(ux) > 1e-12:
            t = (lim_x - xc) / ux
            if -0.5 <= yc + t * uy <= ny - 0.5:
                ts.append(t)
    for lim_y in (-0.5, ny - 0.5):
        if abs(uy) > 1e-12:
            t = (lim_y - yc) / uy
            if -0.5 <= xc + t * ux <= nx - 0.5:
                ts.append(t)
    if len(ts) < 2 or max(ts) - min(ts) < 1.0:
        return None, None
    t0, t1 = min(ts), max(ts)
    sigma = fwhm_px / 2.3548200450309493
    sb = cfg.satellite_surface_brightness_e
    yy, xx = np.mgrid[0:ny, 0:nx]
    d = (xx - xc) * (-uy) + (yy - yc) * ux
    from scipy.special import erf

    # Gaussian cross profile integrated across the pixel (normal direction)
    img = sb * 0.5 * (erf((d + 0.5) / (math.sqrt(2) * sigma)) - erf((d - 0.5) / (math.sqrt(2) * sigma)))
    img[np.abs(d) > 8 * sigma] = 0.0
    truth = dict(x0=xc + t0 * ux, y0=yc + t0 * uy, x1=xc + t1 * ux, y1=yc + t1 * uy, width_px=fwhm_px,
                 surface_brightness_e=sb)
    return img, truth


def wcs_text(w):
    """FITS header text (newline-separated cards) of a WCS, CD matrix kept."""
    return w.to_header(relax=True).tostring(sep="\n")


def _wcs_record(true_wcs, header_wcs):
    # made before the result is pickled (pickling turns CD into PC + CDELT)
    return dict(true_wcs_text=wcs_text(true_wcs), header_wcs_text=wcs_text(header_wcs),
                header_cd=np.array(header_wcs.wcs.cd, dtype=float))


def _satellite_ccd(cfg):
    return cfg.satellite_ccd if cfg.satellite_ccd in cfg.ccds else min(cfg.ccds)


def _bleed(counts, full_well):
    """Move charge above full well along each column (both ways), in place.

    Runs of over-full pixels keep ``full_well`` electrons; their excess is
    split in two and fills the pixels beyond each end of the run up to full
    well, outwards, until spent (charge reaching the CCD edge is lost).
    Returns the boolean map of pixels that received bled charge.
    """
    ny = counts.shape[0]
    bled = np.zeros(counts.shape, dtype=bool)
    for c in np.flatnonzero((counts >= full_well[None, :]).any(axis=0)):
        col = counts[:, c]
        cap = float(full_well[c])
        idx = np.flatnonzero(col > cap)
        if len(idx) == 0:
            continue
        for run in np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1):
            excess = float((col[run] - cap).sum())
            col[run] = cap
            for start, step, share in ((run[-1] + 1, 1, 0.5 * excess), (run[0] - 1, -1, 0.5 * excess)):
                j = start
                while share > 0 and 0 <= j < ny:
                    room = cap - col[j]
                    if room > 0:
                        take = min(room, share)
                        col[j] += take
                        share -= take
                        bled[j, c] = True
                    j += step
    return bled


def _finish(cfg, rng, model_e, det, cr_deposits, streak_e=None, sky_sigma_e=None):
    """Noise, cosmic rays, gain, bad columns, saturation; returns ADU image, mask."""
    gain, rn, sat = _amp_maps(cfg, det)
    counts = rng.poisson(model_e).astype(np.float64)
    crmask = np.zeros(model_e.shape, dtype=bool)
    for ys, xs, e in cr_deposits:
        np.add.at(counts, (ys, xs), e)
        crmask[ys, xs] = True
    full_well = sat * gain
    over = counts >= full_well[None, :]
    bled = _bleed(counts, full_well) if (cfg.bleed and over.any()) else None
    counts += rng.standard_normal(model_e.shape) * rn[None, :]
    adu = counts / gain[None, :]
    mask = np.zeros(model_e.shape, dtype=np.int32)
    if streak_e is not None and sky_sigma_e is not None:
        mask[streak_e > sky_sigma_e] = MASK_STREAK
    mask[crmask] = MASK_CR
    satmask = adu >= sat[None, :]
    adu = np.where(satmask, sat[None, :], adu)
    if bled is not None:
        mask[bled & ~over] = MASK_BLEED
    mask[over | (satmask & (bled is None or ~bled))] = MASK_SAT
    for col, y0, y1 in det["bad_columns"]:
        adu[y0:y1, col] = 0.3 * adu[y0:y1, col]  # dead column segment
        mask[y0:y1, col] = MASK_BAD
    return adu.astype(np.float32), mask


def _star_peak_sat(fps, model_adu, mask, n):
    peak = np.full(n, np.nan)
    satf = np.zeros(n, dtype=bool)
    for i, fp in enumerate(fps):
        if fp is None:
            continue
        y0, y1, x0, x1, st = fp
        core = st > 0.5 * st.max()
        peak[i] = float(model_adu[y0:y1, x0:x1][core].max())
        satf[i] = bool(np.any(mask[y0:y1, x0:x1][st > 0.1 * st.max()] == MASK_SAT))
    return peak, satf


def render_drift_ccd(cfg, seed, stars, events, exposure, ccd):
    """Simulate one CCD of one drift exposure.

    Parameters
    ----------
    cfg : SimulationConfig
    seed : int
    stars : DataFrame (from :func:`~pydriftn.simulate.field.make_star_field`)
    events : DataFrame (from :func:`~pydriftn.simulate.field.choose_events`)
    exposure : dict with ``expnum``, ``mjd_obs``, ``night``
    ccd : str

    Returns
    -------
    dict with ``image`` (float32 ADU), ``mask`` (int32), ``true_wcs``,
    ``header_wcs``, ``det``, ``fwhm_px``, ``avsky_adu`` and truth DataFrames
    ``trails``, ``lightcurves``, ``common``, ``flashes``, ``satellites``,
    ``cosmic_rays``.
    """
    expnum, mjd_obs = exposure["expnum"], exposure["mjd_obs"]
    rate = cfg.drift_rate
    psf = moffat_mog(cfg.moffat_beta, cfg.n_gauss)
    det = detector_params(cfg, seed, ccd)
    nx, ny = cfg.naxis1, cfg.naxis2
    # --- pointing and WCS (exposure-level draws are shared by all CCDs)
    probe = make_wcs(cfg, ccd, (cfg.ra_deg, cfg.dec_deg))
    tg0 = trail_geometry(probe, cfg.exptime_s, rate)
    t_mid, dt = fine_time_grid(cfg, tg0.speed_px_s)
    com = common_pattern(cfg, seed, expnum, t_mid, dt)
    crval = pointing_crval(cfg, com["pointing_east_arcsec"], com["pointing_north_arcsec"])
    true_wcs = make_wcs(cfg, ccd, crval, 0.0, sip=True)
    hcrval = offset_sky(crval[0], crval[1], com["header_east_arcsec"], com["header_north_arcsec"])
    header_wcs = make_wcs(cfg, ccd, (float(hcrval[0]), float(hcrval[1])), com["header_rot_deg"])
    tg = trail_geometry(true_wcs, cfg.exptime_s, rate)
    ux, uy = tg.direction
    ps = cfg.pixel_scale_arcsec
    j_al = com["jitter_along_arcsec"] / ps
    j_cr = com["jitter_cross_arcsec"] / ps
    jx = j_al * ux - j_cr * uy
    jy = j_al * uy + j_cr * ux
    fwhm_px = com["seeing_fwhm_arcsec"] / ps
    sigma_px = psf.sigmas[:, None] * fwhm_px[None, :]
    T = len(t_mid)
    rng = stream_rng(seed, STREAM_CCD_EXPOSURE, expnum, ccd)

    # --- stars that can reach the CCD
    ra = stars["ra"].to_numpy()
    dec = stars["dec"].to_numpy()
    xs0, ys0, xe0, ye0 = trail_endpoints(true_wcs, ra, dec, cfg.exptime_s, rate)
    pad = 5.0 * float(sigma_px.max()) + 6.0 * (np.abs(jx).max() + np.abs(jy).max()) + 2.0
    sel = (
        (np.maximum(xs0, xe0) > -pad)
        & (np.minimum(xs0, xe0) < nx - 1 + pad)
        & (np.maximum(ys0, ye0) > -pad)
        & (np.minimum(ys0, ye0) < ny - 1 + pad)
    )
    idx = np.flatnonzero(sel)
    sid = stars["star_id"].to_numpy()[idx]
    px, py = star_pixel_positions(true_wcs, ra[idx, None], dec[idx, None], t_mid[None, :], rate)
    px = px + jx[None, :]
    py = py + jy[None, :]
    # own light curves: events x scintillation
    t_mjd = mjd_obs + t_mid / 86400.0
    sig_sc = scintillation_sigma_per_step(cfg, dt)
    rel = np.empty((len(idx), T))
    ev_by_star = {}
    for rec in events.to_dict("records"):
        ev_by_star.setdefault(int(rec["star_id"]), []).append(rec)
    for k, s in enumerate(sid):
        eps = stream_rng(seed, STREAM_STAR, expnum, int(s)).standard_normal(T)
        rel[k] = 1.0 + sig_sc * eps
        if int(s) in ev_by_star:
            rel[k] *= magnification(ev_by_star[int(s)], t_mjd)
    flux = stars["flux_vr_e_s"].to_numpy()[idx]
    weights = flux[:, None] * dt * com["transparency"][None, :] * rel
    model = np.full((ny, nx), cfg.sky_e_s_px("VR") * cfg.exptime_s)
    dep, _pk, fps = render_moving_sources(model, px, py, weights, sigma_px, psf, footprints=True)
    total = weights.sum(axis=1)

    # --- flashes
    flash_rows = []
    on = np.flatnonzero(dep > 0.5 * total)
    lo, hi = np.log(cfg.flash_counts_range_e[0]), np.log(cfg.flash_counts_range_e[1])
    for f in range(cfg.flashes_per_ccd_exposure):
        tf = rng.uniform(0.0, cfg.exptime_s)
        cnt = math.exp(rng.uniform(lo, hi))
        jxf, jyf = float(np.interp(tf, t_mid, jx)), float(np.interp(tf, t_mid, jy))
        host = -1
        if f == 0 and len(on):
            k = int(rng.choice(on))
            host = int(sid[k])
            x_nom, y_nom = star_pixel_positions(true_wcs, ra[idx[k]], dec[idx[k]], tf, rate)
            fx, fy = float(x_nom) + jxf, float(y_nom) + jyf
        else:
            fx, fy = rng.uniform(10, nx - 11), rng.uniform(10, ny - 11)
        fw = float(np.interp(tf, t_mid, fwhm_px))
        d, _ = render_moving_sources(model, [[fx]], [[fy]], [[cnt]], psf.sigmas[:, None] * fw, psf)
        r_img, d_img = true_wcs.pixel_to_world_values(fx - jxf, fy - jyf)
        fra, fdec = offset_sky(r_img, d_img, -rate[0] * tf, -rate[1] * tf)
        flash_rows.append(
            dict(expnum=expnum, ccd=ccd, x=fx, y=fy, ra=float(fra), dec=float(fdec), t_s=tf,
                 t_mjd=mjd_obs + tf / 86400.0, duration_s=cfg.flash_duration_s, counts_e=float(d[0]),
                 host_star_id=host)
        )

    # --- satellite
    sat_rows = []
    streak = None
    line = satellite_line(cfg, seed, exposure)
    if line is not None:
        streak, st = _satellite(cfg, ccd, line, float(np.median(fwhm_px)))
        if streak is not None:
            model += streak
            sat_rows.append(dict(expnum=expnum, ccd=ccd, **st))

    # --- detector
    crs, cr_truth = make_cosmic_rays(rng, cfg, cfg.exptime_s)
    cr_truth.insert(0, "ccd", ccd)
    cr_truth.insert(0, "expnum", expnum)
    sky_e = cfg.sky_e_s_px("VR") * cfg.exptime_s
    image, mask = _finish(cfg, rng, model, det, crs, streak, math.sqrt(sky_e))
    gain, _, _ = _amp_maps(cfg, det)
    peak, satf = _star_peak_sat(fps, model / gain[None, :], mask, len(idx))

    keep = dep > 0
    trails = pd.DataFrame(
        dict(
            expnum=expnum,
            ccd=ccd,
            star_id=sid[keep],
            x_start=xs0[idx][keep],
            y_start=ys0[idx][keep],
            x_end=xe0[idx][keep],
            y_end=ye0[idx][keep],
            counts_e=dep[keep],
            peak_adu=peak[keep],
            saturated=satf[keep],
            on_ccd_fraction=(dep / total)[keep],
            expected_counts_e=total[keep],
            flux_e_s=flux[keep],
            scint_rms=np.std(rel[keep] / np.mean(rel[keep], axis=1, keepdims=True), axis=1),
        )
    )
    lc_ids = sid[keep] if cfg.store_all_lightcurves else np.array([s for s in sid[keep] if int(s) in ev_by_star])
    lc_rows = np.isin(sid, lc_ids)
    nlc = int(lc_rows.sum())
    lightcurves = pd.DataFrame(
        dict(
            expnum=np.full(nlc * T, expnum, dtype=np.int64),
            star_id=np.repeat(sid[lc_rows], T),
            t_s=np.tile(t_mid, nlc),
            mjd=np.tile(t_mjd, nlc),
            rel_flux=rel[lc_rows].ravel().astype(np.float32),
        )
    )
    common = pd.DataFrame(
        dict(
            expnum=expnum,
            ccd=ccd,
            t_s=t_mid,
            mjd=t_mjd,
            jitter_along_px=j_al,
            jitter_cross_px=j_cr,
            jitter_x_px=jx,
            jitter_y_px=jy,
            transparency=com["transparency"],
            seeing_fwhm_arcsec=com["seeing_fwhm_arcsec"],
        )
    )
    log.info("exp %d %s: %d stars rendered (%d on CCD), %d CRs", expnum, ccd, len(idx), int(keep.sum()), len(cr_truth))
    return dict(
        image=image,
        mask=mask,
        true_wcs=true_wcs,
        header_wcs=header_wcs,
        **_wcs_record(true_wcs, header_wcs),
        det=det,
        fwhm_px=float(np.median(fwhm_px)),
        avsky_adu=float(sky_e / np.mean(det["gain"])),
        trails=trails,
        lightcurves=lightcurves,
        common=common,
        flashes=pd.DataFrame(flash_rows, columns=["expnum", "ccd", "x", "y", "ra", "dec", "t_s", "t_mjd", "duration_s",
                                                  "counts_e", "host_star_id"]),
        satellites=pd.DataFrame(sat_rows, columns=["expnum", "ccd", "x0", "y0", "x1", "y1", "width_px",
                                                   "surface_brightness_e"]),
        cosmic_rays=cr_truth,
        dt_s=dt,
    )


def render_pointed_ccd(cfg, seed, stars, band, ccd, pointed_expnum):
    """Simulate one CCD of a pointed (tracked) image in ``band`` ('g' or 'r').

    Static Moffat (MoG) PSF with the band's seeing, ``pointed_exptime_s``,
    no jitter, no events; sky, noise, cosmic rays, bad columns, saturation as
    for drift images.
    """
    psf = moffat_mog(cfg.moffat_beta, cfg.n_gauss)
    det = detector_params(cfg, seed, ccd)
    nx, ny = cfg.naxis1, cfg.naxis2
    prng = stream_rng(seed, STREAM_POINTED, band)
    pe, pn = prng.normal(0.0, cfg.pointing_repeat_arcsec, 2)
    he, hn = prng.normal(0.0, cfg.header_pointing_error_arcsec, 2)
    hr = prng.normal(0.0, cfg.header_rotation_error_deg)
    crval = pointing_crval(cfg, pe, pn)
    true_wcs = make_wcs(cfg, ccd, crval, 0.0, sip=True)
    hcrval = offset_sky(crval[0], crval[1], he, hn)
    header_wcs = make_wcs(cfg, ccd, (float(hcrval[0]), float(hcrval[1])), hr)
    fwhm_px = cfg.seeing_arcsec(band) / cfg.pixel_scale_arcsec
    sigma_px = psf.sigmas[:, None] * np.array([fwhm_px])[None, :]
    x, y = true_wcs.world_to_pixel_values(stars["ra"].to_numpy(), stars["dec"].to_numpy())
    pad = 5.0 * float(sigma_px.max()) + 2
    sel = (x > -pad) & (x < nx - 1 + pad) & (y > -pad) & (y < ny - 1 + pad)
    idx = np.flatnonzero(sel)
    flux = stars[f"flux_{band}_e_s"].to_numpy()[idx] * cfg.pointed_exptime_s
    sky_e = cfg.sky_e_s_px(band) * cfg.pointed_exptime_s
    model = np.full((ny, nx), sky_e)
    dep, _pk, fps = render_moving_sources(model, x[idx, None], y[idx, None], flux[:, None], sigma_px, psf,
                                          footprints=True)
    rng = stream_rng(seed, STREAM_CCD_EXPOSURE, pointed_expnum, ccd)
    crs, cr_truth = make_cosmic_rays(rng, cfg, cfg.pointed_exptime_s)
    cr_truth.insert(0, "ccd", ccd)
    cr_truth.insert(0, "expnum", pointed_expnum)
    image, mask = _finish(cfg, rng, model, det, crs)
    gain, _, _ = _amp_maps(cfg, det)
    peak, satf = _star_peak_sat(fps, model / gain[None, :], mask, len(idx))
    keep = dep > 0
    truth = pd.DataFrame(
        dict(band=band, ccd=ccd, star_id=stars["star_id"].to_numpy()[idx][keep], x=x[idx][keep], y=y[idx][keep],
             counts_e=dep[keep], peak_adu=peak[keep], saturated=satf[keep], on_ccd_fraction=(dep / flux)[keep])
    )
    return dict(image=image, mask=mask, true_wcs=true_wcs, header_wcs=header_wcs, **_wcs_record(true_wcs, header_wcs),
                det=det, fwhm_px=fwhm_px,
                avsky_adu=float(sky_e / np.mean(det["gain"])), pointed=truth, cosmic_rays=cr_truth)
