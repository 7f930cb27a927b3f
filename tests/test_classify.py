"""Classification of drift-image sources: star trails, flashes, satellites, cosmic rays.

Physics checks on seeded synthetic drift images rendered here (uniformly
moving Gaussian trails along the geometry from :mod:`pydriftn.geometry`,
PSF-shaped flashes, a Gaussian-profile streak, 1-3 pixel cosmic rays, Poisson
and read noise, CP-code dq mask) and on the simulator's ``small`` dataset
(Moffat PSF, jitter, seeing changes, microlensing events) against its truth
tables. Full-size speed and rates: ``benchmarks/bench_classify.py``.
"""
import math

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy.special import ndtr

from pydriftn.geometry import trail_geometry


def decam_wcs(nx, ny, rotation_deg=0.0, scale=0.27):
    s = scale / 3600.0
    th = np.radians(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [269.5, -29.0]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = rot @ np.array([[0.0, s], [-s, 0.0]])
    w.pixel_shape = (nx, ny)
    return w


def _stamp(img, x0, y0, ux, uy, L, flux, sigma, ripple=None):
    """Add a uniformly moving Gaussian (segment (x)PSF) of total flux ``flux``."""
    ny, nx = img.shape
    h = 5 * sigma
    xa, xb = min(x0, x0 + ux * L) - h, max(x0, x0 + ux * L) + h
    ya, yb = min(y0, y0 + uy * L) - h, max(y0, y0 + uy * L) + h
    i0, i1 = max(0, int(math.floor(xa))), min(nx, int(math.ceil(xb)) + 1)
    j0, j1 = max(0, int(math.floor(ya))), min(ny, int(math.ceil(yb)) + 1)
    if i0 >= i1 or j0 >= j1:
        return
    Y, X = np.mgrid[j0:j1, i0:i1]
    dx, dy = X - x0, Y - y0
    s = dx * ux + dy * uy
    c = dy * ux - dx * uy
    if L > 0:
        f = (ndtr(s / sigma) - ndtr((s - L) / sigma)) / L
        if ripple is not None:
            f = f * ripple(s)
    else:
        f = np.exp(-0.5 * (s / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    g = np.exp(-0.5 * (c / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
    img[j0:j1, i0:i1] += flux * f * g


def make_image(seed=0, nx=512, ny=1024, n_stars=150, n_flashes=6, n_flashes_on_trail=3, n_cr=20,
               satellite=None, drift=(0.0, 0.5), rotation_deg=0.0, fwhm=3.7, exptime=20.0, sky_e=640.0,
               gain=4.0, rn_e=6.5, flash_snr=(10.0, 30.0), star_flux=(2e3, 3e6), ripple_amp=0.0,
               movers=(), uncatalogued=0, flash_min_sep_px=12.0):
    """Render a drift image; returns dict with image (ADU), mask (CP codes), truth tables and geometry."""
    rng = np.random.default_rng(seed)
    w = decam_wcs(nx, ny, rotation_deg)
    geo = trail_geometry(w, exptime, drift)
    ux, uy = geo.direction
    L = geo.length_px
    sigma = fwhm / 2.3548200450309493
    img = np.full((ny, nx), sky_e, float)
    # stars (catalogued + uncatalogued)
    n_all = n_stars + uncatalogued
    xs = rng.uniform(-0.5 * L, nx + 0.5 * L, n_all)
    ys = rng.uniform(-0.5 * L, ny + 0.5 * L, n_all)
    x0 = xs - 0.5 * L * ux
    y0 = ys - 0.5 * L * uy
    lf = np.exp(rng.uniform(np.log(star_flux[0]), np.log(star_flux[1]), n_all))
    ripple = None
    if ripple_amp > 0:
        ph = rng.uniform(0, 2 * np.pi, 3)
        lam = rng.uniform(8, 20, 3)
        ripple = lambda s: 1 + ripple_amp * sum(np.sin(2 * np.pi * s / lam[k] + ph[k]) for k in range(3)) / 3
    for k in range(n_all):
        _stamp(img, x0[k], y0[k], ux, uy, L, lf[k], sigma, ripple)
    trails = pd.DataFrame(dict(star_id=np.arange(n_all), x_start=x0, y_start=y0, x_end=x0 + ux * L,
                               y_end=y0 + uy * L, counts_e=lf))
    cat = trails.iloc[:n_stars].reset_index(drop=True)
    # flashes at a given S/N (sky-limited optimal PSF S/N on the local background)
    fl = []
    noise_e = math.sqrt(sky_e + rn_e**2)
    on_ids = np.flatnonzero((xs[:n_stars] > 20) & (xs[:n_stars] < nx - 20) & (ys[:n_stars] > 20)
                            & (ys[:n_stars] < ny - 20) & (lf[:n_stars] < 3e5))
    for f in range(n_flashes):
        snr = rng.uniform(*flash_snr)
        t_s = np.nan
        host = -1
        for _ in range(100):
            if f < n_flashes_on_trail and len(on_ids):
                host = int(rng.choice(on_ids))
                t_s = rng.uniform(1.0, exptime - 1.0)
                fx = x0[host] + ux * geo.speed_px_s * t_s
                fy = y0[host] + uy * geo.speed_px_s * t_s
            else:
                fx, fy = rng.uniform(15, nx - 16), rng.uniform(15, ny - 16)
            if all(math.hypot(fx - a["x"], fy - a["y"]) > flash_min_sep_px for a in fl):
                break
        # local background (sky + star light) under the flash, from the noiseless image
        bg = img[int(round(fy)), int(round(fx))]
        var = bg + rn_e**2
        counts = snr * math.sqrt(var) * 2 * math.sqrt(math.pi) * sigma
        _stamp(img, fx, fy, ux, uy, 0.0, counts, sigma)
        fl.append(dict(x=fx, y=fy, counts_e=counts, snr=snr, t_s=t_s, host_star_id=host))
    flashes = pd.DataFrame(fl, columns=["x", "y", "counts_e", "snr", "t_s", "host_star_id"])
    # movers: (length_px, angle_deg, flux)
    mv = []
    for (ml, ma, mf) in movers:
        mx, my = rng.uniform(60, nx - 60), rng.uniform(60, ny - 60)
        a = math.radians(ma)
        _stamp(img, mx - 0.5 * ml * math.cos(a), my - 0.5 * ml * math.sin(a), math.cos(a), math.sin(a), ml, mf, sigma)
        mv.append(dict(x=mx, y=my, length_px=ml, angle_deg=ma, counts_e=mf))
    movers_df = pd.DataFrame(mv, columns=["x", "y", "length_px", "angle_deg", "counts_e"])
    # satellite: (angle_deg, surface brightness e per px length)
    sats = []
    streak = None
    if satellite is not None:
        ang, sb = satellite
        a = math.radians(ang)
        xc, yc = rng.uniform(0.3 * nx, 0.7 * nx), rng.uniform(0.3 * ny, 0.7 * ny)
        Y, X = np.mgrid[0:ny, 0:nx]
        d = (X - xc) * (-math.sin(a)) + (Y - yc) * math.cos(a)
        streak = sb * np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
        img += streak
        sats.append(dict(xc=xc, yc=yc, angle_deg=ang, sb_e=sb))
    counts = rng.poisson(img).astype(float)
    # cosmic rays: 1-3 px, 300-20000 e, sharp
    crs = []
    crmask = np.zeros((ny, nx), bool)
    for _ in range(n_cr):
        cx, cy = int(rng.integers(3, nx - 3)), int(rng.integers(3, ny - 3))
        npx = int(rng.integers(1, 4))
        tot = math.exp(rng.uniform(math.log(800), math.log(20000)))
        pts = [(0, 0), (1, 0), (1, 1)][:npx] if rng.random() < 0.5 else [(0, 0), (0, 1), (-1, 1)][:npx]
        share = rng.gamma(4.0, 1.0, npx)
        e = tot * share / share.sum()
        for (ddx, ddy), v in zip(pts, e):
            counts[cy + ddy, cx + ddx] += v
            crmask[cy + ddy, cx + ddx] = True
        crs.append(dict(x=cx + np.mean([p[0] for p in pts]), y=cy + np.mean([p[1] for p in pts]), npix=npx,
                        counts_e=tot))
    counts += rng.normal(0, rn_e, counts.shape)
    adu = (counts / gain).astype(np.float32)
    mask = np.zeros((ny, nx), np.int32)
    if streak is not None:
        mask[streak > math.sqrt(sky_e)] = 8
    mask[crmask] = 5
    return dict(image=adu, mask=mask, trails=cat, all_trails=trails, flashes=flashes,
                cosmic_rays=pd.DataFrame(crs, columns=["x", "y", "npix", "counts_e"]),
                satellites=pd.DataFrame(sats), movers=movers_df, geometry=geo, wcs=w, fwhm=fwhm, gain=gain,
                rn_e=rn_e, sky_e=sky_e, exptime=exptime)


# =========================================================================== tests
import pytest

from pydriftn.classify import (
    CLASSES,
    COLUMNS,
    FLAG_STREAK_CROSSED,
    classify_exposure_ccd,
    decode_mask,
    save_cutouts,
)
from pydriftn.errors import MaskError


def run(d, mask="cp", **kw):
    m = d["mask"] if mask == "cp" else (None if mask is None else mask)
    return classify_exposure_ccd(d["image"], m, d["trails"], d["geometry"], fwhm_px=d["fwhm"], gain=d["gain"],
                                 read_noise=d["rn_e"], wcs=d["wcs"], mjd_obs=59000.0, exptime=d["exptime"],
                                 mask_convention="cp", **kw)


def match(tab, x, y, tol):
    if len(tab) == 0:
        return None
    dd = np.hypot(tab["x"].to_numpy() - x, tab["y"].to_numpy() - y)
    k = int(np.argmin(dd))
    return tab.iloc[k] if dd[k] < tol else None


@pytest.fixture(scope="module")
def synth_images():
    return [make_image(seed=s, n_flashes=8, n_flashes_on_trail=4, n_cr=25) for s in (1, 2)]


@pytest.mark.parametrize("mask", ["cp", None])
def test_flashes_recovered_and_timed_on_trails(synth_images, mask):
    n = ok = false = 0
    for d in synth_images:
        res = run(d, mask)
        fl = res.table[res.table["class"] == "flash"]
        for _, f in d["flashes"].iterrows():
            n += 1
            m = match(fl, f.x, f.y, 1.5)
            if m is None:
                continue
            ok += 1
            # flux within 4 sigma + 10 % (Gaussian matched filter on a Gaussian PSF)
            assert abs(m.flux_e - f.counts_e) < 4 * m.flux_err_e + 0.1 * f.counts_e
            assert m.mjd_start == 59000.0 and m.mjd_end == pytest.approx(59000.0 + 20.0 / 86400.0)
            if f.host_star_id >= 0:
                # the instant from the position along the host's trail
                assert m.on_star_id == f.host_star_id
                assert m.t_s == pytest.approx(f.t_s, abs=0.25)
                assert m.sample_index == int(f.t_s // d["geometry"].sample_dt_s) or \
                    abs(m.t_s - f.t_s) > 0.5 * d["geometry"].sample_dt_s - 0.25
                assert m.t_mjd == pytest.approx(59000.0 + m.t_s / 86400.0)
                assert m.cross_offset_px < 0.5  # on the host's instantaneous image: on the trail's centre line
            elif not pd.isna(m.on_star_id):
                # a random flash that happens to fall on a trail: it must really lie on that trail
                t = d["trails"].set_index("star_id").loc[m.on_star_id]
                ux, uy = d["geometry"].direction
                dx, dy = f.x - t.x_start, f.y - t.y_start
                assert abs(dy * ux - dx * uy) < 1.5 * d["fwhm"]
                assert -d["fwhm"] < dx * ux + dy * uy < d["geometry"].length_px + d["fwhm"]
                # its distance from the trail's centre line, as measured (the flash position on a trail is pulled by
                # the trail model's residuals: ~0.7 px at worst here)
                assert m.cross_offset_px == pytest.approx(abs(dy * ux - dx * uy), abs=1.0)
            else:
                assert np.isnan(m.t_s)
            # every other trail the flash's wing reaches is listed, with the instant the star passed it
            ux, uy = d["geometry"].direction
            tr = d["trails"]
            dx, dy = f.x - tr["x_start"].to_numpy(), f.y - tr["y_start"].to_numpy()
            cross, along = np.abs(dy * ux - dx * uy), dx * ux + dy * uy
            inside = (along >= -d["fwhm"]) & (along <= d["geometry"].length_px + d["fwhm"])
            near = set(str(int(v)) for v in tr["star_id"][inside & (cross <= 3.0 * d["fwhm"] - 1.0)])
            far = set(str(int(v)) for v in tr["star_id"][~inside | (cross > 3.0 * d["fwhm"] + 1.0)])
            listed = set(m.near_star_ids.split(";")) if isinstance(m.near_star_ids, str) else set()
            on = {str(int(m.on_star_id))} if not pd.isna(m.on_star_id) else set()
            assert near - on <= listed and not (listed & far) and not (listed & on)
            for sid, t_near in zip(listed, str(m.near_t_mjd).split(";") if listed else []):
                assert 59000.0 - 1e-5 <= float(t_near) <= 59000.0 + 21.0 / 86400.0
        for _, r in fl.iterrows():
            if match(d["flashes"], r.x, r.y, 3.0) is None:
                false += 1
    assert ok / n >= 0.95, f"{ok}/{n} flashes recovered"
    assert false == 0


@pytest.mark.parametrize("mask", ["cp", None])
def test_cosmic_rays_are_sharp_not_flashes(synth_images, mask):
    n = ok = 0
    for d in synth_images:
        res = run(d, mask)
        cr = res.table[res.table["class"] == "cosmic_ray"]
        for _, c in d["cosmic_rays"].iterrows():
            n += 1
            ok += match(cr, c.x, c.y, 2.5) is not None
        # no cosmic ray became a flash
        fl = res.table[res.table["class"] == "flash"]
        for _, c in d["cosmic_rays"].iterrows():
            assert match(fl, c.x, c.y, 2.5) is None
    assert ok / n >= 0.99, f"{ok}/{n}"


@pytest.mark.parametrize("mask", ["cp", None])
def test_star_trails_kept_and_not_misclassified(synth_images, mask):
    for d in synth_images:
        res = run(d, mask)
        tab = res.table
        cat = tab[(tab["class"] == "star_trail") & (tab["subclass"] == "catalogued")]
        assert sorted(cat["star_id"]) == sorted(d["trails"]["star_id"])
        # every other detection is explained by an injected object
        other = tab[tab["class"].isin(["flash", "cosmic_ray", "other_trail", "satellite"])]
        inj = pd.concat([d["flashes"][["x", "y"]], d["cosmic_rays"][["x", "y"]]])
        for _, r in other.iterrows():
            assert match(inj, r.x, r.y, 3.0) is not None, r.to_dict()
        # fitted fluxes of bright trails agree with the truth (analytic PSF here)
        tr = d["trails"].set_index("star_id")
        br = cat[cat.snr > 50]
        rel = br.flux_e.to_numpy() / tr.loc[br.star_id, "counts_e"].to_numpy()
        assert np.median(rel) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("angle", [33.0, 97.0])
def test_satellite_found_masked_and_crossed_trails_kept(angle):
    d = make_image(seed=5, n_stars=400, n_flashes=2, n_flashes_on_trail=1, n_cr=5, satellite=(angle, 400.0))
    res = run(d, None)
    sat = res.table[(res.table["class"] == "satellite") & (res.table["subclass"] == "hough")]
    assert len(sat) == 1
    s = sat.iloc[0]
    truth = d["satellites"].iloc[0]
    a = math.radians(truth.angle_deg)
    th_true = (truth.angle_deg + 90.0) % 180.0
    rho_true = truth.xc * math.cos(math.radians(th_true)) + truth.yc * math.sin(math.radians(th_true))
    assert abs((s.theta_deg - th_true + 90) % 180 - 90) < 0.2
    assert s.rho_px == pytest.approx(rho_true, abs=1.0)
    assert s.surface_brightness_e == pytest.approx(400.0, rel=0.1)
    assert s.width_px == pytest.approx(d["fwhm"], rel=0.2)
    # the streak's pixels within 1.5 FWHM of the line are masked
    ny, nx = d["image"].shape
    Y, X = np.mgrid[0:ny, 0:nx]
    dist = (X - truth.xc) * (-math.sin(a)) + (Y - truth.yc) * math.cos(a)
    core = np.abs(dist) <= 1.5 * d["fwhm"]
    assert res.streak_mask[core].mean() > 0.99
    assert res.streak_mask.mean() < 0.05
    # trails crossing the streak are still catalogued star trails, flagged
    tab = res.table
    cat = tab[(tab["class"] == "star_trail") & (tab["subclass"] == "catalogued")]
    assert len(cat) == len(d["trails"])
    tr = d["trails"]
    s0 = (tr.x_start - truth.xc) * (-math.sin(a)) + (tr.y_start - truth.yc) * math.cos(a)
    s1 = (tr.x_end - truth.xc) * (-math.sin(a)) + (tr.y_end - truth.yc) * math.cos(a)
    frac = s0 / (s0 - s1)
    xc = tr.x_start + frac * (tr.x_end - tr.x_start)
    yc = tr.y_start + frac * (tr.y_end - tr.y_start)
    inside = (xc > 2) & (xc < nx - 3) & (yc > 2) & (yc < ny - 3)
    crossing = set(tr.star_id[((s0 * s1) < 0) & inside])
    assert crossing
    flagged = set(cat.star_id[(cat["flags"] & FLAG_STREAK_CROSSED) != 0])
    assert crossing <= flagged
    # no flash or cosmic ray invented along the streak
    fl = tab[tab["class"].isin(["flash", "other_trail"])]
    inj = d["flashes"][["x", "y"]]
    for _, r in fl.iterrows():
        assert match(inj, r.x, r.y, 3.0) is not None


def test_no_false_flashes_from_catalogue_position_errors():
    # catalogue positions 0.25 px rms off (no offsets fitted below S/N 250): every trail end carries a dipole
    # residual, blends of bright trails two independent ones; none of it may become a flash, and flashes
    # (S/N 10-30, most on bright trails) are still recovered
    n_false = n = ok = 0
    for seed in (21, 22):
        d = make_image(seed=seed, n_stars=250, n_flashes=8, n_flashes_on_trail=6, n_cr=10, star_flux=(2e4, 1e6))
        rng = np.random.default_rng(seed)
        tr = d["trails"].copy()
        ex, ey = rng.normal(0, 0.25, len(tr)), rng.normal(0, 0.25, len(tr))
        tr["x_start"] += ex
        tr["x_end"] += ex
        tr["y_start"] += ey
        tr["y_end"] += ey
        res = run(dict(d, trails=tr), "cp")
        fl = res.table[res.table["class"] == "flash"]
        n_false += sum(match(d["flashes"], r.x, r.y, 3.0) is None for _, r in fl.iterrows())
        for _, f in d["flashes"].iterrows():
            n += 1
            ok += match(fl, f.x, f.y, 1.5) is not None
    assert n_false <= 1, n_false
    assert ok / n >= 0.95, f"{ok}/{n}"


def test_no_false_streak_on_a_plain_field():
    d = make_image(seed=9, n_flashes=0, n_cr=10, n_stars=300)
    res = run(d, None)
    assert res.counts["satellite"] == 0
    assert not res.streak_mask.any()


def test_rotated_drift_new_star_and_moving_object():
    # east drift on a rotated CCD: trails along neither axis
    d = make_image(seed=3, drift=(0.35, 0.35), rotation_deg=30.0, n_flashes=3, n_flashes_on_trail=1, n_cr=5,
                   uncatalogued=4, star_flux=(2e3, 4e5), movers=[(18.0, 80.0, 6e4)])
    g = d["geometry"]
    assert abs(g.direction[0]) > 0.2 and abs(g.direction[1]) > 0.2
    res = run(d, "cp")
    tab = res.table
    new = tab[(tab["class"] == "star_trail") & (tab["subclass"] == "new")]
    unc = d["all_trails"].iloc[len(d["trails"]):]
    mid_x = 0.5 * (unc.x_start + unc.x_end)
    mid_y = 0.5 * (unc.y_start + unc.y_end)
    ny, nx = d["image"].shape
    for x, y, c in zip(mid_x, mid_y, unc.counts_e):
        if not (25 < x < nx - 25 and 25 < y < ny - 25) or c < 2e4:
            continue
        m = match(new, x, y, 0.6 * g.length_px)
        assert m is not None, (x, y, c)
        assert abs(m.angle_rel_drift_deg) < 10
    mv = d["movers"].iloc[0]
    other = tab[tab["class"] == "other_trail"]
    m = match(other, mv.x, mv.y, 8.0)
    assert m is not None
    assert m.length_px == pytest.approx(mv.length_px, rel=0.35)
    # flashes still found, the on-trail one timed
    fl = tab[tab["class"] == "flash"]
    for _, f in d["flashes"].iterrows():
        m = match(fl, f.x, f.y, 1.5)
        assert m is not None
        if f.host_star_id >= 0:
            assert m.t_s == pytest.approx(f.t_s, abs=0.3)


def test_empty_image_gives_empty_table_with_all_columns():
    d = make_image(seed=4, n_stars=0, n_flashes=0, n_cr=0)
    res = classify_exposure_ccd(d["image"], None, d["trails"].iloc[:0], d["geometry"], fwhm_px=d["fwhm"],
                                gain=d["gain"])
    assert list(res.table.columns) == COLUMNS
    assert len(res.table) == 0
    assert res.counts == {c: 0 for c in CLASSES}
    assert res.streak_mask.shape == d["image"].shape and not res.streak_mask.any()


def test_bad_inputs_raise_typed_errors():
    d = make_image(seed=4, n_stars=5, n_flashes=0, n_cr=0, nx=128, ny=256)
    with pytest.raises(MaskError, match="shape"):
        classify_exposure_ccd(d["image"], np.zeros((10, 10), np.int32), d["trails"], d["geometry"],
                              fwhm_px=d["fwhm"], gain=d["gain"], mask_convention="cp")
    with pytest.raises(MaskError, match="dtype"):
        decode_mask(np.zeros(d["image"].shape, np.float32), d["image"].shape)
    with pytest.raises(ValueError, match="x_end"):
        classify_exposure_ccd(d["image"], None, d["trails"].drop(columns=["x_end"]), d["geometry"],
                              fwhm_px=d["fwhm"], gain=d["gain"])
    with pytest.raises(ValueError, match="fwhm_px"):
        classify_exposure_ccd(d["image"], None, d["trails"], d["geometry"], fwhm_px=0.0, gain=d["gain"])


def test_pixelflag_mask_equivalent_to_cp_codes(synth_images):
    from pydriftn.flags import PixelFlag

    d = synth_images[0]
    codes = d["mask"]
    bits = np.zeros(codes.shape, np.uint16)
    bits[codes == 5] = int(PixelFlag.COSMIC_RAY)
    bits[codes == 8] = int(PixelFlag.STREAK)
    a = run(d, "cp").table
    b = classify_exposure_ccd(d["image"], bits, d["trails"], d["geometry"], fwhm_px=d["fwhm"], gain=d["gain"],
                              wcs=d["wcs"], mjd_obs=59000.0).table
    assert (a["class"].value_counts() == b["class"].value_counts()).all()
    dm = decode_mask(bits, bits.shape)
    assert dm["cr"].sum() == (codes == 5).sum()


def test_save_cutouts_writes_pngs(synth_images, tmp_path):
    d = synth_images[0]
    res = run(d, "cp")
    paths = save_cutouts(res, d["image"], tmp_path, prefix="exp1-S4-")
    n_non_star = int((res.table["class"] != "star_trail").sum())
    assert len(paths) == n_non_star > 0
    assert all(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


# --------------------------------------------------------------------------- simulator
def _classify_sim(ds, expnum, ccd, with_mask):
    from pydriftn.geometry import trail_geometry
    from pydriftn.io import read_ccd

    img = read_ccd(ds.drift_images[expnum], ccd, mask=True if with_mask else None)
    info = img.info
    geo = trail_geometry(img.wcs, info.exptime, ds.config.drift_rate_arcsec_s)
    tr = ds.read_truth("trails")
    tr = tr[(tr.expnum == expnum) & (tr.ccd == ccd)]
    res = classify_exposure_ccd(img.data, img.mask, tr, geo, fwhm_px=info.fwhm_px, gain=float(np.mean(info.gain)),
                                wcs=img.wcs, mjd_obs=info.mjd, exptime=info.exptime,
                                saturation_adu=float(min(info.saturation)))
    return res, info


def _simulator_checks(ds, with_mask):
    """Flashes (S/N >= 10), cosmic rays, satellites of the first 2 exposures vs truth; returns false flashes."""
    fl_t = ds.read_truth("flashes")
    sat_t = ds.read_truth("satellites")
    cr_t = ds.read_truth("cosmic_rays")
    n_fl = ok_fl = n_cr = ok_cr = n_sat = ok_sat = n_false = 0
    ev = set(ds.read_truth("events").star_id)
    for expnum in ds.expnums[:2]:
        for ccd in ds.config.ccds:
            res, info = _classify_sim(ds, expnum, ccd, with_mask)
            tab = res.table
            sel = lambda t: t[(t.expnum == expnum) & (t.ccd == ccd)]
            fl = tab[tab["class"] == "flash"]
            gain = float(np.mean(info.gain))
            sig_psf = info.fwhm_px / 2.3548200450309493
            for _, f in sel(fl_t).iterrows():
                xi, yi = int(round(f.x)), int(round(f.y))
                if res.streak_mask[yi, xi]:
                    continue
                # optimal-PSF S/N on the local background (sky + read noise + star light under it)
                var_e = (res.sky_sigma * gain) ** 2 + max(float(res.model[yi, xi]), 0.0) * gain
                if f.counts_e / math.sqrt(4 * math.pi * sig_psf**2 * var_e) < 10:
                    continue
                n_fl += 1
                m = match(fl, f.x, f.y, 2.0)
                ok_fl += m is not None
                if m is not None and f.host_star_id >= 0:
                    assert m.t_s == pytest.approx(f.t_s, abs=0.6)
            tf = sel(fl_t)
            trl = sel(ds.read_truth("trails"))
            evt = trl[trl.star_id.isin(ev)]
            for _, r in fl.iterrows():
                if match(tf, r.x, r.y, 3.0) is not None:
                    continue
                # on the trail of a star with a microlensing event: a real brightening, not a false flash
                dx, dy = r.x - evt.x_start.to_numpy(), r.y - evt.y_start.to_numpy()
                ux, uy = (evt.x_end - evt.x_start).to_numpy() / 37.04, (evt.y_end - evt.y_start).to_numpy() / 37.04
                on_ev = (np.abs(dy * ux - dx * uy) < 2 * info.fwhm_px) & (dx * ux + dy * uy > -8) & \
                    (dx * ux + dy * uy < 45)
                n_false += not on_ev.any()
            crs = tab[tab["class"] == "cosmic_ray"]
            sig_e = res.sky_sigma * float(np.mean(info.gain))
            for _, c in sel(cr_t).iterrows():
                if c.counts_e / c.npix < 5 * sig_e:
                    continue  # below the noise per pixel: not detectable without the mask
                n_cr += 1
                ok_cr += match(crs, c.x, c.y, 3.0 + (12.0 if c.kind == "track" else 0.0)) is not None
            for _, s in sel(sat_t).iterrows():
                n_sat += 1
                sats = tab[(tab["class"] == "satellite") & tab["subclass"].isin(["hough", "segment", "dqmask"])]
                ang = math.degrees(math.atan2(s.y1 - s.y0, s.x1 - s.x0)) % 180
                for _, m in sats.iterrows():
                    am = math.degrees(math.atan2(m.y1 - m.y0, m.x1 - m.x0)) % 180
                    if abs((am - ang + 90) % 180 - 90) < 1.0:
                        ok_sat += 1
                        break
    assert n_fl >= 4 and ok_fl == n_fl
    assert n_cr >= 5 and ok_cr / n_cr >= 0.99
    assert n_sat >= 1 and ok_sat == n_sat
    return n_false


@pytest.mark.parametrize("with_mask", [True, False])
def test_simulator_flashes_satellite_cosmic_rays(sim_small, with_mask):
    _simulator_checks(sim_small, with_mask)


def test_simulator_false_flash_rate(sim_small):
    # false flashes (not injected, not on a star with a microlensing event): <= 1 per 10 CCD-exposures
    # is the target; 4 CCD-exposures here allow at most 1
    n_false = _simulator_checks(sim_small, True)
    assert n_false <= 1, n_false


# ---------------------------------------------------------------- fast paths against their references


def test_fast_smoothing_equals_scipy_gaussian_filter():
    from scipy import ndimage as ndi

    from pydriftn.classify.core import _smooth

    rng = np.random.default_rng(3)
    B = rng.normal(0.0, 10.0, (301, 157)).astype(np.float32)
    B[100:110, 50:60] += 500.0
    for sig in (0.6, 0.78, 1.3):
        ref = ndi.gaussian_filter(B, sig, truncate=3.0)
        assert np.allclose(_smooth(B, sig), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_dead_column_search_equals_block_medians():
    from pydriftn.classify.core import _dead_columns

    rng = np.random.default_rng(4)
    r0 = rng.normal(0.0, 5.0, (1024, 300)).astype(np.float32)
    for k in range(40):  # column segments at various depths, some just at the threshold
        c, a = rng.integers(0, 300), rng.integers(0, 1000)
        r0[a:a + rng.integers(10, 600), c] = -rng.uniform(5.0, 40.0)
    got = _dead_columns(r0, 5.0)
    # reference: the median of every 64-row block of every column (every 2nd row), as documented
    nb = 1024 // 64
    med = np.median(r0[: nb * 64: 2].reshape(nb, -1, 300), axis=1)
    low = med < -max(8.0 * 5.0 / math.sqrt(32) * 1.25, 15.0)
    ref = np.repeat(low, 64, axis=0)
    assert low.any() and got is not None
    assert np.array_equal(got, ref)


def test_robust_median_equals_nanmedian():
    from pydriftn.classify._trailmodel import _robust_median

    rng = np.random.default_rng(5)
    a = rng.normal(size=(41, 37))
    a[rng.random(a.shape) < 0.3] = np.nan
    a[:, 3] = np.nan
    med, err = _robust_median(a)
    with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(a, axis=0)
        mad = np.nanmedian(np.abs(a - ref[None]), axis=0)
    assert np.array_equal(med, ref, equal_nan=True)
    n = np.sum(np.isfinite(a), axis=0)
    ok = n >= 3
    assert np.allclose(err[ok], 1.25 * 1.4826 * mad[ok] / np.sqrt(n[ok]))


def test_sky_block_medians_equal_np_median():
    from pydriftn.classify._background import _block_medians

    rng = np.random.default_rng(6)
    sub = rng.normal(100.0, 5.0, (96, 80)).astype(np.float32)
    good = rng.random(sub.shape) > 0.2
    good[:12, :20] = False  # a block with no good value
    good[12:24, :20] = rng.random((12, 20)) > 0.97  # a block with a handful (below the minimum count)
    for ey, ex, empty in ((np.arange(0, 97, 12), np.arange(0, 81, 20), True),  # equal blocks: the sorted path
                          (np.array([0, 10, 40, 96]), np.array([0, 33, 80]), False)):  # unequal blocks: the loop
        got = _block_medians(sub, good, ey, ex)
        ref = np.full((len(ey) - 1, len(ex) - 1), np.nan)
        for j in range(len(ey) - 1):
            for i in range(len(ex) - 1):
                v = sub[ey[j]:ey[j + 1], ex[i]:ex[i + 1]][good[ey[j]:ey[j + 1], ex[i]:ex[i + 1]]]
                if v.size > 16:
                    ref[j, i] = np.median(v)
        assert np.isnan(ref).any() == empty and np.isfinite(ref).any()
        assert np.array_equal(got, ref, equal_nan=True)


def test_sky_percentiles_equal_np_percentile():
    from pydriftn.classify._background import _percentiles

    rng = np.random.default_rng(15)
    for n in (11, 12, 1000, 100001):
        v = rng.standard_t(3, n) * 7.0
        q = [15.865525, 50.0]
        assert np.array_equal(_percentiles(v.copy(), q), np.percentile(v, q))
    v = np.round(rng.normal(0, 3, 5000))  # ties
    assert np.array_equal(_percentiles(v.copy(), [10.0, 15.865525, 50.0, 99.0]),
                          np.percentile(v, [10.0, 15.865525, 50.0, 99.0]))


def test_hough_chunked_accumulator_equals_one_bincount():
    from pydriftn.classify._streaks import _hough

    rng = np.random.default_rng(7)
    nyb, nxb, n_theta = 60, 40, 100  # n_theta not a multiple of the chunk of 32 angles
    x = rng.integers(0, nxb, 300).astype(float)
    y = rng.integers(0, nyb, 300).astype(float)
    band, th, diag = _hough(x, y, nyb, nxb, n_theta)
    nr = 2 * diag + 1
    r = np.rint(x[None, :] * np.cos(th)[:, None] + y[None, :] * np.sin(th)[:, None]).astype(np.int64) + diag
    acc = np.bincount((np.arange(n_theta)[:, None] * nr + r).ravel(), minlength=n_theta * nr).reshape(n_theta, nr)
    ref = acc.astype(float)
    ref[:, 1:] += acc[:, :-1]
    ref[:, :-1] += acc[:, 1:]
    assert np.array_equal(band, ref)


def test_streak_refine_chunk_and_segment_medians_equal_per_chunk():
    from pydriftn.classify._streaks import _chunk_medians, _nanmedian0, _segment_nanmedians

    rng = np.random.default_rng(16)
    for n in (5, 32, 63, 100, 4093, 4094):
        v = rng.normal(size=n) * 10
        nch = max(1, n // 32)
        ref = np.array([np.median(v[ch]) for ch in np.array_split(np.arange(n), nch)])
        assert np.array_equal(_chunk_medians(v, nch), ref)
    for n, nseg in ((2047, 16), (100, 2), (131, 3), (5, 2)):
        S = rng.normal(size=(n, 49)).astype(np.float32)
        S[rng.random(S.shape) < 0.1] = np.nan  # off the image
        S[:, 3] = np.nan
        with np.errstate(all="ignore"):
            ref = [_nanmedian0(S[sg]) for sg in np.array_split(np.arange(n), nseg)]
        got = _segment_nanmedians(S, nseg)
        assert len(got) == nseg and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(got, ref))


def test_streak_coverage_counts_only_the_line_clear_of_trails():
    """Bright trails that happen to line up (four along a line at 12 deg to the drift) leave residuals only on
    themselves: their line is lit where it crosses them, and was masked as a satellite (the stars on it lost
    the exposure). Counted on the stretches clear of the modelled trails, its coverage is 0; a real streak
    along the same line, lit between the trails too, keeps coverage 1."""
    from pydriftn.classify._streaks import _refine

    rng = np.random.default_rng(3)
    ny, nx, sigma, fwhm = 300, 400, 10.0, 3.7
    a = math.radians(12.0)
    Y, X = np.mgrid[0:ny, 0:nx]
    x_c, y_c = 200.0, 150.0
    across = -(X - x_c) * math.sin(a) + (Y - y_c) * math.cos(a)
    model = np.zeros((ny, nx))
    resid = rng.normal(0.0, sigma, (ny, nx))
    g = 1.0 / (math.sqrt(2 * math.pi) * fwhm / 2.3548)
    for s_ in (-150.0, -60.0, 30.0, 120.0):  # trails along x (the drift), centred on the line
        xs, ys = x_c + s_ * math.cos(a), y_c + s_ * math.sin(a)
        on = (np.abs(X - xs) <= 18) & (np.abs(Y - ys) <= 8)
        prof = np.exp(-0.5 * ((Y - ys) / (fwhm / 2.3548)) ** 2) * g
        model += np.where(on, 3e4 * prof, 0.0)
        resid += np.where(on, 0.03 * 3e4 * prof, 0.0)  # a 3 % residual of each bright trail
    theta = a + 0.5 * math.pi
    rho = x_c * math.cos(theta) + y_c * math.sin(theta)
    plain = _refine(resid, sigma, theta, rho, fwhm, nx, ny, band_px=12.0)
    clear = _refine(resid, sigma, theta, rho, fwhm, nx, ny, band_px=12.0, trails=model)
    assert plain is not None and plain.coverage >= 0.5  # what was masked
    assert clear is None or clear.coverage < 0.3
    streak = resid + 40.0 * np.exp(-0.5 * (across / (fwhm / 2.3548)) ** 2)  # 1.3 sigma/px along the line
    st = _refine(streak, sigma, theta, rho, fwhm, nx, ny, band_px=12.0, trails=model)
    assert st is not None and st.coverage > 0.9
    assert abs(math.degrees(math.atan2(st.y1 - st.y0, st.x1 - st.x0)) % 180 - 12.0) < 0.5


def test_short_segment_needs_two_lit_chunks_clear_of_trails():
    """A footprint through the under-modelled halo of a bright trail and an unmodelled trail beside it (a
    trail at the CCD edge, a faint star not in the catalogue) was fitted as a short streak lit on its whole
    length, and masked as a satellite (the false "segment" streaks of the image-level runs). Its line is lit,
    clear of the trail model and along the line (not by a source crossing it at an angle), on at most one
    32 px chunk; a real streak over the same trails is lit so on two or three."""
    from pydriftn.classify._streaks import _refine
    from pydriftn.classify.core import MIN_SEGMENT_CLEAR_CHUNKS

    rng = np.random.default_rng(11)
    ny, nx, sigma, fwhm = 90, 130, 10.0, 3.7  # a CCD corner
    sig_px = fwhm / 2.3548
    a = math.radians(25.0)
    Y, X = np.mgrid[0:ny, 0:nx]
    x_c, y_c = 50.0, 45.0
    resid = rng.normal(0.0, sigma, (ny, nx))
    model = np.zeros((ny, nx))
    g = 1.0 / (math.sqrt(2 * math.pi) * sig_px)
    # a bright trail centred on the line (3 % residual of a modelled trail) and, 50 px further along the
    # line, an unmodelled faint trail (its light is all residual)
    for s_, amp, modelled in ((0.0, 3e4, True), (50.0, 1.5e3, False)):
        xs, ys = x_c + s_ * math.cos(a), y_c + s_ * math.sin(a)
        on = (np.abs(X - xs) <= 18) & (np.abs(Y - ys) <= 8)
        prof = np.where(on, amp * g * np.exp(-0.5 * ((Y - ys) / sig_px) ** 2), 0.0)
        if modelled:
            model += prof
            resid += 0.03 * prof
        else:
            resid += prof
    theta = a + 0.5 * math.pi
    rho = x_c * math.cos(theta) + y_c * math.sin(theta)
    false_line = _refine(resid, sigma, theta, rho, fwhm, nx, ny, band_px=12.0, trails=model)
    assert false_line is None or false_line.clear_lit_chunks < MIN_SEGMENT_CLEAR_CHUNKS
    # a real streak, 110 px long, over the same trails
    along = (X - x_c) * math.cos(a) + (Y - y_c) * math.sin(a)
    across = -(X - x_c) * math.sin(a) + (Y - y_c) * math.cos(a)
    streak = resid + np.where(np.abs(along + 5.0) <= 60.0, 60.0 * np.exp(-0.5 * (across / sig_px) ** 2), 0.0)
    st = _refine(streak, sigma, theta, rho, fwhm, nx, ny, band_px=12.0, trails=model)
    assert st is not None and st.clear_lit_chunks >= MIN_SEGMENT_CLEAR_CHUNKS
    assert math.hypot(st.x1 - st.x0, st.y1 - st.y0) >= 100.0  # (its span also takes in the unmodelled trail)


def test_bin_image_equals_block_sums():
    from pydriftn.classify._streaks import bin_image

    rng = np.random.default_rng(8)
    a = rng.normal(size=(37, 50)).astype(np.float32)
    for b in (1, 2, 3, 4):
        ny, nx = 37 // b, 50 // b
        ref = a[: ny * b, : nx * b].astype(np.float64).reshape(ny, b, nx, b).sum(axis=(1, 3))
        got = bin_image(a, b)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.allclose(got, ref, rtol=0, atol=1e-5)


def test_decode_mask_union_index_and_image_subset():
    from pydriftn.flags import PixelFlag as P

    rng = np.random.default_rng(9)
    bits = np.zeros((40, 30), np.uint16)
    for f in (P.BAD_PIXEL, P.SATURATED, P.COSMIC_RAY, P.STREAK, P.LOW_WEIGHT):
        bits[rng.random(bits.shape) < 0.05] |= int(f)
    full = decode_mask(bits, bits.shape)
    part = decode_mask(bits, bits.shape, union=("bad", "sat", "cr"), images=("cr", "streak"))
    assert np.array_equal(part["union_index"], np.flatnonzero(full["bad"] | full["sat"] | full["cr"]))
    assert part["bad"] is None and part["sat"] is None
    assert np.array_equal(part["cr"], full["cr"]) and np.array_equal(part["streak"], full["streak"])


def test_trail_template_lookups_and_capped_table():
    """Table look-ups (several tables at one index) equal linear interpolation; the 2-D table of a template
    whose end caps are set after a first evaluation equals that of a template built with them."""
    from pydriftn.classify._trailmodel import TrailTemplate

    t = TrailTemplate.analytic(37.0, 1.6, 12.0)
    x = np.random.default_rng(10).uniform(-20.0, 20.0, 5000)
    g, gp = t._lookup((t.g, t.gp), t.c0, t.dc, x)
    cg = t.c0 + t.dc * np.arange(len(t.g))
    assert np.array_equal(g, t._lookup(t.g, t.c0, t.dc, x)) and np.array_equal(gp, t._lookup(t.gp, t.c0, t.dc, x))
    assert np.allclose(g, np.interp(x, cg, t.g), rtol=0, atol=1e-12 * t.g.max())
    delta = 0.2 * np.sin(np.arange(len(t.f)) * 0.1)
    eps = 0.05 * np.cos(np.arange(len(t.f)) * 0.05)
    caps = (t.s0, 0.5, -13.0, 0.5, np.random.default_rng(11).normal(0, 1e-4, (140, 53)), 8.0, 29.0)
    a = TrailTemplate(t.s0, t.ds, t.f, delta, t.c0, t.dc, t.g, eps)
    a.evaluate(np.zeros(3, np.float32), np.zeros(3, np.float32))  # table without caps built (and f g kept)
    a.set_caps(*caps)
    b = TrailTemplate(t.s0, t.ds, t.f, delta, t.c0, t.dc, t.g, eps)
    b.set_caps(*caps)
    assert np.array_equal(a._table2d()[3], b._table2d()[3])
    assert np.abs(a._table2d()[3].view(np.float32)).max() > 0


def test_final_model_sums_shared_pixels():
    """The model image of the joint fit: each pixel the sum of the (fitted) stamps covering it."""
    from pydriftn.classify._trailmodel import _final, _pairs, _pixel_index, trail_pixels

    rng = np.random.default_rng(14)
    n = 60
    x0, y0 = rng.uniform(0, 80, n), rng.uniform(0, 60, n)  # dense: many blends of 2 and 3 stamps
    ang = rng.normal(0.0, 0.05, n)
    tp = trail_pixels(x0, y0, np.cos(ang), np.sin(ang), np.full(n, 20.0), (60, 90), 4.0)
    ne = len(tp.pix)
    rep = _pixel_index(tp.pix, 60 * 90)
    pairs = _pairs(rep, ne, last=rep)
    T = np.exp(-0.5 * tp.c.astype(np.float64) ** 2).astype(np.float32)
    d = rng.normal(0, 1, ne).astype(np.float32) + 50.0 * T
    w = np.ones(ne, np.float32)
    model, F, _ = _final(tp, rep, ne, n, w, T, d, 1.0, (60, 90), pairs)
    assert np.bincount(rep, minlength=ne).max() >= 3
    ref = np.bincount(tp.pix, weights=F[tp.star] * T, minlength=60 * 90).reshape(60, 90)
    assert np.allclose(model, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_partial_streak_refit_equals_full_refit():
    import dataclasses

    from pydriftn.classify._trailmodel import fit_trails, refit_fluxes

    d = make_image(seed=5, n_stars=400, n_flashes=0, n_flashes_on_trail=0, n_cr=0, satellite=(33.0, 400.0))
    img = d["image"].astype(np.float32) - np.float32(d["sky_e"] / d["gain"])
    tr = d["trails"]
    sig = d["fwhm"] / 2.3548200450309493
    sky = math.sqrt(d["sky_e"] + d["rn_e"] ** 2) / d["gain"]
    bad = np.zeros(img.shape, bool)
    fit = fit_trails(img, bad, tr.x_start.to_numpy(), tr.y_start.to_numpy(), tr.x_end.to_numpy(),
                     tr.y_end.to_numpy(), sigma_psf=sig, sky_sigma=sky, gain=d["gain"])
    streak = d["mask"] == 8
    assert streak.any()
    part = refit_fluxes(fit, img, streak, sky_sigma=sky)
    full = refit_fluxes(dataclasses.replace(fit, w=None), img, streak, sky_sigma=sky)
    changed = part.flux != fit.flux
    assert 0 < changed.sum() < len(tr)  # only the crossed trails (and their blend partners) are refitted
    assert np.allclose(part.flux, full.flux, rtol=1e-6, atol=1e-6 * np.abs(full.flux).max())
    assert np.allclose(part.model, full.model, rtol=0, atol=1e-6 * np.abs(full.model).max())
    assert np.array_equal(part.n_masked, full.n_masked)
    # from the residual, updated in place (as the classification calls it): the same fluxes and model, and the
    # residual of the new model (0 on the excluded pixels)
    model0 = fit.model.copy()
    resid = img - fit.model
    inpl = refit_fluxes(fit, resid, streak, sky_sigma=sky, residual=True, inplace=True)
    assert inpl.model is fit.model
    assert np.allclose(inpl.flux, part.flux, rtol=1e-6, atol=1e-6 * np.abs(full.flux).max())
    assert np.allclose(inpl.model, part.model, rtol=0, atol=1e-6 * np.abs(full.model).max())
    assert (inpl.model != model0).any()
    on_stamp = np.zeros(img.size, bool)
    on_stamp[fit.pixels.pix] = True
    on_stamp = on_stamp.reshape(img.shape)
    want = np.where(streak & on_stamp, 0.0, img - part.model)  # (streak pixels off the stamps: zeroed by the caller)
    assert np.allclose(resid, want, rtol=0, atol=1e-5 * np.abs(img).max())
    assert np.array_equal(resid[~on_stamp], (img - model0)[~on_stamp])  # pixels on no stamp are never touched


def test_faint_trails_narrow_stamps_unbiased():
    """Faint trails get stamps of half-width ceil(2.5 sigma): their fluxes stay unbiased (pulls vs truth
    ~N(0, 1)) and agree with full-width stamps well within the errors; bright trails keep wide stamps."""
    from pydriftn.classify._trailmodel import fit_trails

    d = make_image(seed=7, n_stars=300, n_flashes=0, n_flashes_on_trail=0, n_cr=0, star_flux=(3e2, 3e5))
    img = d["image"].astype(np.float32) - np.float32(d["sky_e"] / d["gain"])
    tr = d["trails"]
    sig = d["fwhm"] / 2.3548200450309493
    sky = math.sqrt(d["sky_e"] + d["rn_e"] ** 2) / d["gain"]
    args = (img, None, tr.x_start.to_numpy(), tr.y_start.to_numpy(), tr.x_end.to_numpy(), tr.y_end.to_numpy())
    fit = fit_trails(*args, sigma_psf=sig, sky_sigma=sky, gain=d["gain"])
    ref = fit_trails(*args, sigma_psf=sig, sky_sigma=sky, gain=d["gain"], faint_snr=(0.0, 0.0))
    tp = fit.pixels
    cmax = np.zeros(tp.n)
    np.maximum.at(cmax, tp.star, np.abs(tp.c))
    narrow = cmax <= math.ceil(2.5 * sig)
    assert narrow.sum() >= 50 and (cmax > math.ceil(3.0 * sig) + 0.5).sum() >= 10
    assert len(ref.pixels.pix) > len(tp.pix)
    ny, nx = img.shape
    x_lo, x_hi = np.minimum(tr.x_start, tr.x_end), np.maximum(tr.x_start, tr.x_end)
    y_lo, y_hi = np.minimum(tr.y_start, tr.y_end), np.maximum(tr.y_start, tr.y_end)
    inside = ((x_lo > 10) & (x_hi < nx - 10) & (y_lo > 10) & (y_hi < ny - 10)).to_numpy()
    m = narrow & inside
    assert m.sum() >= 50
    truth = tr.counts_e.to_numpy() / d["gain"]
    pull = (fit.flux[m] - truth[m]) / fit.flux_err[m]
    assert abs(pull.mean()) < 0.3 and 0.7 < pull.std() < 1.4 and np.abs(pull).max() < 5.0
    # the left-out wing pixels carry almost no information on a faint trail's flux
    assert np.all(np.abs(fit.flux[m] - ref.flux[m]) < 0.5 * ref.flux_err[m])
    assert np.median(fit.flux_err[m] / ref.flux_err[m]) < 1.05


@pytest.mark.parametrize("mask", ["cp", None])
def test_precomputed_sky_gives_the_same_classification(synth_images, mask):
    """A sky estimated by the caller (here the true flat sky) replaces the internal estimate: the same flashes
    and catalogued trails, the cosmic rays within one, the noise measured on the caller's image as the internal
    estimate measures it (within 2 %; both ~3 % above the truth, from the sources) or taken as given, and the
    caller's array is reused as the residual."""
    from pydriftn.classify._background import sky_noise

    d = synth_images[0]
    sky_adu = d["sky_e"] / d["gain"]
    sig_true = math.sqrt(d["sky_e"] + d["rn_e"] ** 2) / d["gain"]
    ref = run(d, mask)
    sub = d["image"].astype(np.float32) - np.float32(sky_adu)
    assert abs(sky_noise(sub) / ref.sky_sigma - 1) < 0.02
    assert abs(ref.sky_sigma / sig_true - 1) < 0.05
    for sig in (None, sig_true):
        mine = sub.copy()
        res = run(d, mask, sky=(mine, sig))
        assert abs(res.sky_sigma / (ref.sky_sigma if sig is None else sig) - 1) < 0.02
        assert abs(res.meta["sky_level_adu"] - sky_adu) < 0.1 * sig_true
        for cls in ("flash", "star_trail"):
            a = ref.table[ref.table["class"] == cls]
            b = res.table[res.table["class"] == cls]
            assert len(a) == len(b)
            for _, r in a.iterrows():
                assert match(b, r.x, r.y, 1.0) is not None
        assert abs(res.counts["cosmic_ray"] - ref.counts["cosmic_ray"]) <= 1
        assert not np.array_equal(mine, sub)  # taken over: the residual now
    with pytest.raises(ValueError, match="sky-subtracted image"):
        run(d, mask, sky=(sub[:10], None))


# ---------------------------------------------------------------------------------------------------------------
# compiled kernels of the trail model (pydriftn.classify._kernels) against the numpy expressions they replaced


def _np_trail_pixels(x0, y0, ux, uy, length, shape, hw):
    """The numpy trail_pixels (boxes of the common size, masks, boolean-mask copies), one chunk."""
    ny, nx = shape
    x1, y1 = x0 + ux * length, y0 + uy * length
    bx0 = np.floor(np.minimum(x0, x1) - hw).astype(np.int64)
    bx1 = np.ceil(np.maximum(x0, x1) + hw).astype(np.int64)
    by0 = np.floor(np.minimum(y0, y1) - hw).astype(np.int64)
    by1 = np.ceil(np.maximum(y0, y1) + hw).astype(np.int64)
    W, H = int((bx1 - bx0).max()) + 1, int((by1 - by0).max()) + 1
    gx, gy = np.arange(W), np.arange(H)
    box = (gy[:, None] * nx + gx[None, :]).astype(np.int64)
    X, Y = bx0[:, None] + gx[None, :], by0[:, None] + gy[None, :]
    f32 = np.float32
    dx = (X - x0[:, None]).astype(f32)[:, None, :]
    dy = (Y - y0[:, None]).astype(f32)[:, :, None]
    uxx, uyy = ux[:, None, None].astype(f32), uy[:, None, None].astype(f32)
    s = dx * uxx + dy * uyy
    c = dy * uxx - dx * uyy
    ok = (np.abs(c) <= hw) & (s >= -hw) & (s <= (length[:, None, None] + hw).astype(f32))
    ok &= ((X >= 0) & (X < nx))[:, None, :]
    ok &= ((Y >= 0) & (Y < ny))[:, :, None]
    cnt = np.count_nonzero(ok.reshape(len(x0), -1), axis=1)
    star = np.repeat(np.arange(len(x0)), cnt)
    pix = ((by0 * nx + bx0)[:, None, None] + box[None]).reshape(ok.shape)[ok]
    return star, pix, s[ok], c[ok], cnt


def _random_trails(rng, n, shape, length=30.0):
    ny, nx = shape
    x0 = rng.uniform(-15, nx + 15, n)  # some off the edges
    y0 = rng.uniform(-40, ny + 5, n)
    th = np.radians(rng.uniform(60, 120, n))
    L = rng.uniform(0.5, 1.0, n) * length
    return x0, y0, np.cos(th), np.sin(th), L


def test_kernel_stamp_pixels_matches_numpy():
    """stamp_pixels: the same entries (order, float32 s and c bit for bit) and data/weights as the numpy
    trail_pixels and gather, with trails across and beyond the image edges, a masked image, and no trails."""
    from pydriftn.classify._kernels import stamp_pixels
    from pydriftn.classify._trailmodel import trail_pixels

    rng = np.random.default_rng(5)
    shape = (120, 90)
    img = rng.normal(0, 1, shape).astype(np.float32)
    bad = rng.random(shape) < 0.05
    for hw in (5.0, 7.0, 3.3):
        x0, y0, ux, uy, L = _random_trails(rng, 60, shape)
        ref = _np_trail_pixels(x0, y0, ux, uy, L, shape, hw)
        star, pix, s, c, d, w, cnt = stamp_pixels(x0, y0, ux, uy, L, shape, hw, img.ravel(), bad.ravel())
        for a, b in zip(ref, (star, pix, s, c, cnt)):
            assert a.dtype.kind == b.dtype.kind and np.array_equal(a, b)
        assert np.array_equal(d, img.ravel()[ref[1]])
        assert np.array_equal(w, (~bad.ravel()[ref[1]]).astype(np.float32))
        assert (pix < 0).sum() == 0 and (pix >= img.size).sum() == 0
        tp = trail_pixels(x0, y0, ux, uy, L, shape, hw)
        assert np.array_equal(tp.pix, ref[1]) and np.array_equal(tp.counts, ref[4])
    _, _, _, _, d, w, _ = stamp_pixels(x0, y0, ux, uy, L, shape, 5.0, img.ravel())  # no mask: all weights 1
    assert np.all(w == 1)
    assert trail_pixels(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), shape, 5.0).n == 0
    out = stamp_pixels(np.array([-100.0]), np.array([-100.0]), np.array([0.0]), np.array([1.0]), np.array([10.0]),
                       shape, 5.0, img.ravel())  # a trail entirely off the image: no entries
    assert all(len(a) == 0 for a in out[:6]) and out[6][0] == 0


def test_kernel_stamp_aperture_and_restamp_match_numpy():
    """stamp_aperture: the stamps' entry counts and the aperture sums (data and unmasked entries with |c| <=
    c_core) of the numpy stamps; stamp_pixels with per-trail half-widths (negative: none) written into given
    arrays, then wide stamps after them under other trail numbers: the numpy mask + take + concatenation."""
    from pydriftn.classify._kernels import stamp_aperture, stamp_pixels

    rng = np.random.default_rng(6)
    shape = (100, 80)
    img = rng.normal(0, 1, shape).astype(np.float32)
    bad = rng.random(shape) < 0.05
    x0, y0, ux, uy, L = _random_trails(rng, 40, shape)
    for b_ in (bad, None):
        fb = None if b_ is None else b_.ravel()
        star, pix, s, c, d, w, cnt = stamp_pixels(x0, y0, ux, uy, L, shape, 6.0, img.ravel(), fb)
        cnt_a, F, ncore = stamp_aperture(x0, y0, ux, uy, L, shape, 6.0, img.ravel(), fb, np.float32(2.4))
        core = (np.abs(c) <= 2.4) & (w > 0)
        assert np.array_equal(cnt_a, cnt)
        assert np.array_equal(ncore, np.bincount(star, core, 40).astype(np.int64))
        assert np.allclose(F, np.bincount(star, d * core, 40), rtol=1e-12, atol=1e-9)
    hwt = rng.choice([4.0, 5.0, 6.0], 40).astype(np.float32)
    for iw in (np.array([1, 7, 30]), np.zeros(0, np.int64)):
        hw_t = hwt.copy()
        hw_t[iw] = -1.0
        sw, pw, ssw, cw, dw, ww, cntw = stamp_pixels(x0[iw], y0[iw], ux[iw], uy[iw], L[iw], shape, 9.0, img.ravel())
        size = len(star) + len(sw) + 5
        out = tuple(np.full(size, -7, dt) for dt in (np.int64, np.int64, np.float32, np.float32, np.float32,
                                                      np.float32))
        kcnt = stamp_pixels(x0, y0, ux, uy, L, shape, 6.0, img.ravel(), c_limit=hw_t, out=out)[-1]
        m = int(kcnt.sum())
        cnt2 = stamp_pixels(x0[iw], y0[iw], ux[iw], uy[iw], L[iw], shape, 9.0, img.ravel(), ids=iw, out=out,
                            start=m)[-1]
        assert np.array_equal(cnt2, cntw)
        keep = np.abs(c) <= hw_t[star]
        ref = (np.concatenate([star[keep], iw[sw]]), np.concatenate([pix[keep], pw]), np.concatenate([s[keep], ssw]),
               np.concatenate([c[keep], cw]), np.concatenate([d[keep], dw]), np.concatenate([w[keep], ww]))
        assert np.array_equal(kcnt, np.bincount(star[keep], minlength=40))
        for a, b in zip(ref, out):
            assert np.array_equal(a, b[:m + len(sw)])
            assert np.all(b[m + len(sw):] == -7)  # nothing written beyond


def _np_pairs(lab, size):
    """The numpy _pixel_index + _pairs."""
    m = len(lab)
    idx = np.arange(m)
    lk = np.empty(size, np.int64)
    lk[lab] = idx
    last = lk[lab]
    dup = np.flatnonzero(last != idx)
    ld = last[dup]
    p1, p2 = [dup], [ld]
    if len(dup):
        multi = np.bincount(ld)[ld] > 1
        if multi.any():
            md, ml = dup[multi], ld[multi]
            o = np.argsort(ml, kind="stable")
            md, ml = md[o], ml[o]
            for k in range(1, len(md)):
                same = ml[k:] == ml[:-k]
                if not same.any():
                    break
                p1.append(md[:-k][same])
                p2.append(md[k:][same])
    return last, np.concatenate(p1), np.concatenate(p2)


def test_kernel_pixel_pairs_matches_numpy():
    """pixel_pairs: the same representative entries and the same pairs in the same order as the numpy code
    (pixels of 1 to 6 stamps), and nothing for no entries."""
    from pydriftn.classify._kernels import pixel_pairs

    rng = np.random.default_rng(7)
    for npix, ne in ((50, 200), (5000, 3000), (10, 0)):
        pix = rng.integers(0, npix, ne).astype(np.int64)
        rep, p1, p2 = pixel_pairs(pix, np.empty(npix, np.int32))
        r_rep, r1, r2 = _np_pairs(pix, npix)
        assert rep.dtype == np.int32 and np.array_equal(rep, r_rep)
        assert np.array_equal(p1, r1) and np.array_equal(p2, r2)
        if ne:
            assert np.bincount(pix).max() >= 3 or npix > ne
        # on int32 labels (the compact labels of the flux refit)
        rep2, q1, q2 = pixel_pairs(rep, np.empty(max(ne, 1), np.int32))
        assert np.array_equal(rep2, rep) and np.array_equal(q1, r1) and np.array_equal(q2, r2)


def _np_evaluate(tmpl, s, c, derivatives):
    """The numpy TrailTemplate._evaluate_block (float32 bilinear look-up in the 2-D table)."""
    c_lo, ns, nc, P = tmpl._table2d()
    tab = np.ascontiguousarray(P).view(np.complex128).ravel()
    f32 = np.float32
    u = s - f32(tmpl.s0)
    u *= f32(1.0 / tmpl.ds)
    np.clip(u, 0.0, ns - 1.001, out=u)
    i = u.astype(np.int32)
    u -= np.floor(u)
    v = c - f32(c_lo)
    v *= f32(1.0 / tmpl.dc)
    np.clip(v, 0.0, nc - 1.001, out=v)
    j = v.astype(np.int32)
    v -= np.floor(v)
    i *= np.int32(nc)
    i += j
    q = tab[i.astype(np.intp)].view(np.float32).reshape(-1, 4)
    c0, c1, c2, c3 = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    b = c3 * v
    b += c2
    T = b * u
    T += c0
    v *= c1
    T += v
    if not derivatives:
        return T
    Tc = c3 * u
    Tc += c1
    Tc *= f32(1.0 / tmpl.dc)
    return T, b * f32(1.0 / tmpl.ds), Tc


def _test_template():
    from pydriftn.classify._trailmodel import TrailTemplate

    base = TrailTemplate.analytic(30.0, 1.6, 9.0)
    rng = np.random.default_rng(8)
    nf = len(base.f)
    tm = TrailTemplate(base.s0, base.ds, base.f * (1 + 0.1 * np.sin(np.arange(nf) / 7.0)),
                       0.3 * np.sin(np.arange(nf) / 11.0), base.c0, base.dc, base.g, 0.05 * np.cos(np.arange(nf) / 5.0))
    tm.set_caps(base.s0, 0.5, -10.0, 0.5, rng.normal(0, 1e-4, (int((40 + 20) / 0.5), 41)), 5.0, 25.0)
    return base, tm


def test_kernel_template_eval_matches_numpy():
    """TrailTemplate.evaluate (compiled): bit for bit the numpy 2-D table look-up and its derivatives, inside,
    at and beyond the table's edges, with per-trail offsets applied as ``s - da[star]``; empty input."""
    rng = np.random.default_rng(9)
    for tm in _test_template():
        s = rng.uniform(-20, 55, 5000).astype(np.float32)
        c = rng.uniform(-15, 15, 5000).astype(np.float32)
        s[:3] = [tm.s0, -1e3, 1e3]
        T = tm.evaluate(s, c)
        assert np.array_equal(T, _np_evaluate(tm, s, c, False))
        for a, b in zip(tm.evaluate(s, c, derivatives=True), _np_evaluate(tm, s, c, True)):
            assert np.array_equal(a, b)
        star = rng.integers(0, 50, 5000)
        da = rng.uniform(-1, 1, 50)
        dc = rng.uniform(-1, 1, 50)
        da[::3] = 0.0
        f32 = np.float32
        ref = _np_evaluate(tm, s - da.astype(f32)[star], c - dc.astype(f32)[star], True)
        for a, b in zip(tm.evaluate(s, c, derivatives=True, shift=(star, da, dc)), ref):
            assert np.array_equal(a, b)
        assert tm.evaluate(s[:0], c[:0]).shape == (0,)
        assert tm.evaluate(s.reshape(50, 100), c.reshape(50, 100)).shape == (50, 100)


def _np_fit_sums(s, c, star, d, w, tmpl, F, da, dc, noise, first, n):
    """The numpy per-block sums of one _fit iteration (products in float32, float64 sums by bincount)."""
    f32 = np.float32
    da32, dc32, F32 = da.astype(f32), dc.astype(f32), F.astype(f32)
    if first is not None:
        T, Ts, Tc = first
    else:
        T, Ts, Tc = _np_evaluate(tmpl, s - da32[star], c - dc32[star], True)
    Fi = F32[star]
    FT = Fi * T
    r = d - FT
    wb = w
    if noise is not None:
        sky_sigma, gain = noise
        m = np.abs(FT)
        q = 0.03 * m
        q *= q
        sig = m / gain
        sig += sky_sigma**2
        sig += q
        np.sqrt(sig, out=sig)
        sig *= 5.0
        np.abs(r, out=q)
        wb = wb * (q < sig)
    J1, J2 = -Fi * Ts, -Fi * Tc
    wT, wJ1, wJ2 = wb * T, wb * J1, wb * J2
    return np.array([np.bincount(star, weights=x, minlength=n) for x in
                     (wT * T, wT * J1, wT * J2, wJ1 * J1, wJ1 * J2, wJ2 * J2, wT * r, wJ1 * r, wJ2 * r)])


def test_kernel_fit_sums_matches_numpy():
    """fit_sums: the nine per-trail sums of the offset fit equal the numpy products' sums to float64 rounding
    (float32 and float64 data, robust weights on and off, the first iteration's template given, masked
    entries, a trail without entries)."""
    from pydriftn.classify import _kernels as K
    from pydriftn.classify._trailmodel import _NO_F32

    rng = np.random.default_rng(10)
    n, ne = 40, 20000
    star = np.sort(rng.integers(0, n - 1, ne))  # trail n-1: no entries
    s = rng.uniform(-8, 40, ne).astype(np.float32)
    c = rng.uniform(-9, 9, ne).astype(np.float32)
    w = (rng.random(ne) > 0.1).astype(np.float32)
    F = rng.uniform(1e3, 1e5, n)
    da, dc = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    f32 = np.float32
    for tm in _test_template():
        Tt = _np_evaluate(tm, s - da.astype(f32)[star], c - dc.astype(f32)[star], False)
        d32 = (F.astype(f32)[star] * Tt + rng.normal(0, 3, ne).astype(f32)).astype(f32)
        d32[::97] += 500.0  # outliers the robust weights drop
        for d in (d32, d32.astype(np.float64)):
            for noise in (None, (3.0, 4.0)):
                for first in (None, _np_evaluate(tm, s, c, True)):
                    ref = _np_fit_sums(s, c, star, d, w, tm, F, da, dc, noise, first, n)
                    S = np.zeros((9, n))
                    robust = noise is not None
                    sky2, gain = (f32(noise[0] ** 2), f32(noise[1])) if robust else (f32(0), f32(1))
                    ft = first if first is not None else (_NO_F32, _NO_F32, _NO_F32)
                    K.fit_sums(s, c, star, d, w, da.astype(f32), dc.astype(f32), F.astype(f32), *tm._kernel_args(),
                               *ft, robust, sky2, gain, S)
                    scale = np.abs(ref).max(axis=1, keepdims=True)
                    assert np.all(np.abs(S - ref) <= 1e-12 * scale)
                    assert np.all(S[:, -1] == 0)


def test_kernel_flux_sums_and_render_match_numpy():
    """flux_sums (v = T w and the per-trail sums v^2, v d) and render_model (stamps, summed on shared pixels)
    against the numpy expressions: sums to float64 rounding, the model image bit for bit."""
    from pydriftn.classify import _kernels as K

    rng = np.random.default_rng(11)
    shape = (60, 50)
    n = 30
    x0, y0, ux, uy, L = _random_trails(rng, n, shape, length=20.0)
    img = rng.normal(0, 1, shape).astype(np.float32)
    star, pix, s, c, d, w, cnt = K.stamp_pixels(x0, y0, ux, uy, L, shape, 5.0, img.ravel())
    w[::13] = 0.0
    T = rng.random(len(s)).astype(np.float32)
    v = np.empty(len(T), np.float32)
    diag, b = np.zeros(n), np.zeros(n)
    K.flux_sums(T, w, d, star, v, diag, b)
    vr = T * w
    assert np.array_equal(v, vr)
    assert np.allclose(diag, np.bincount(star, vr * vr, n), rtol=1e-13, atol=0)
    assert np.allclose(b, np.bincount(star, vr * d, n), rtol=1e-13, atol=1e-300)
    F = rng.uniform(10, 1000, n)
    rep, p1, p2 = K.pixel_pairs(pix, np.empty(img.size, np.int32))
    assert len(p1) > 20  # shared pixels
    model = np.zeros(img.size, np.float32)
    K.render_model(F.astype(np.float32), T, star, pix, rep, p1, p2, model, np.full(len(T), np.nan))
    # numpy: scatter, then the shared pixels' float64 sums (np.bincount over their representative entries)
    own = F.astype(np.float32)[star] * T
    ref = np.zeros(img.size, np.float32)
    ref[pix] = own
    sh = np.zeros(len(T), bool)
    sh[p1] = sh[p2] = True
    shared = np.flatnonzero(sh)
    msum = np.bincount(rep[shared], weights=own[shared], minlength=len(T))
    ref[pix[shared]] = msum[rep[shared]].astype(np.float32)
    assert np.array_equal(model, ref)
    empty = np.zeros(0, np.int64)
    assert np.bincount(pix).max() >= 3  # (pixels of three stamps)
    # on compact labels (the flux refit: the entries' representatives as pixels of a 1 x n_entries image)
    m2 = np.zeros(len(T), np.float32)
    K.render_model(F.astype(np.float32), T, star, rep.astype(np.int64), rep, p1, p2, m2, np.empty(len(T)))
    assert np.array_equal(m2[rep], model[pix])
    K.render_model(F.astype(np.float32), T[:0], empty, empty, rep[:0], empty, empty, model, np.zeros(0))


def test_kernel_template_bins_matches_numpy():
    """template_bins: the seven per-(trail, bin) sums of the empirical template's residuals and the per-entry
    along-track template, equal to the numpy look-ups and np.bincount sums (the same order: bit for bit),
    including entries beyond both ends of the tables."""
    from pydriftn.classify import _kernels as K

    base, _ = _test_template()
    rng = np.random.default_rng(12)
    ne, nb = 30000, 25
    s = rng.uniform(base.s0 - 3, 45, ne)
    c = rng.uniform(-12, 12, ne)
    st = np.sort(rng.integers(0, nb, ne))
    Fi = rng.uniform(1e3, 1e5, nb)[st]
    dsel = Fi * base._evaluate_direct(s, c) + rng.normal(0, 3, ne)
    ds = 0.5
    s_lo = base.s0
    nsb = int(np.ceil((base.ds * (len(base.f) - 1)) / ds)) + 1
    # numpy (as _empirical_template computed them)
    fb = base._lookup(base.f, base.s0, base.ds, s)
    gb, gpb = base._lookup((base.g, base.gp), base.c0, base.dc, c)
    r = dsel - Fi * fb * gb
    h = gb + c * gpb
    key = st * nsb + np.clip(np.rint((s - s_lo) / ds).astype(np.int64), 0, nsb - 1)
    rF = r / Fi
    ref = [np.bincount(key, weights=x, minlength=nb * nsb) for x in
           (gb * gb, -fb * gb * h, (fb * h) ** 2, gb * rF, -fb * h * rF, rF * gpb, fb * gpb**2)]
    sums = np.zeros((7, nb * nsb))
    fbk = np.empty(ne)
    K.template_bins(s, c, st, Fi, dsel, base.f, base.g, base.gp, float(base.s0), 1.0 / base.ds, float(base.c0),
                    1.0 / base.dc, float(s_lo), ds, nsb, sums, fbk)
    assert np.array_equal(fbk, fb)
    for a, b in zip(ref, sums):
        assert np.array_equal(a, b)


def test_kernel_minus_neighbours_matches_numpy():
    """minus_neighbours: the bright entries' data minus the other trails' light on their pixels, bit for bit the
    numpy bincount expression (pixels shared by bright entries, by neighbours, by both; none)."""
    from pydriftn.classify import _kernels as K

    rng = np.random.default_rng(13)
    ne = 5000
    pix = rng.integers(0, 3000, ne)
    rep = K.pixel_pairs(pix, np.empty(3000, np.int32))[0]
    d = rng.normal(0, 10, ne).astype(np.float32)
    for eb, en in ((np.sort(rng.choice(ne, 1500, replace=False)), np.sort(rng.choice(ne, 700, replace=False))),
                   (np.arange(0, ne, 3), np.zeros(0, np.int64))):
        own = rng.uniform(0, 100, len(eb))
        other = rng.uniform(0, 100, len(en))
        other_n = np.bincount(rep[en], weights=other, minlength=ne)
        tot_b = np.bincount(rep[eb], weights=own, minlength=ne)
        ref = d[eb] - (tot_b[rep[eb]] - own) - other_n[rep[eb]]
        out = K.minus_neighbours(d, eb, rep, own, en, other, np.full(ne, np.nan), np.full(ne, np.nan))
        assert np.array_equal(out, ref)


def test_kernel_sky_subtract_and_residual_bin_match_numpy():
    """sky_subtract (float32 and float64 data, excluded pixels zeroed or not) and subtract_model_bin2 (odd and
    even shapes, with and without the 2x2 binning) bit for bit the numpy passes they replaced."""
    from pydriftn.classify import _kernels as K
    from pydriftn.classify._streaks import bin_image

    rng = np.random.default_rng(14)
    for ny, nx in ((130, 77), (64, 50), (1, 3)):
        excl = rng.random((ny, nx)) < 0.1
        rows = rng.normal(100, 5, ny).astype(np.float32)
        cols = rng.normal(0, 1, nx).astype(np.float32)
        for dt in (np.float32, np.float64):
            data = rng.normal(100, 10, (ny, nx)).astype(dt)
            for zero in (True, False):
                ref = np.subtract(data, rows[:, None], out=np.empty((ny, nx), np.float32))
                ref -= cols[None, :]
                if zero:
                    np.copyto(ref, 0.0, where=excl)
                out = np.empty((ny, nx), np.float32)
                K.sky_subtract(data, rows, cols, excl, zero, out)
                assert np.array_equal(out, ref)
        resid = rng.normal(0, 10, (ny, nx)).astype(np.float32)
        model = rng.normal(0, 10, (ny, nx)).astype(np.float32)
        ref = resid - model
        ref[excl] = 0.0
        for binned in (np.full((ny // 2, nx // 2), np.nan, np.float32), np.zeros((0, 0), np.float32)):
            r = resid.copy()
            K.subtract_model_bin2(r, model, excl, binned)
            assert np.array_equal(r, ref)
            if binned.size:
                assert np.array_equal(binned, bin_image(ref, 2))
