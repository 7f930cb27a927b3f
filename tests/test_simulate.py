"""Physics and format checks of pydriftn.simulate against its own truth and
independent references (pydriftn.geometry, pydriftn.models, Young 1967)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from pydriftn import geometry
from pydriftn.errors import ConfigError
from pydriftn.models import microlensing_magnification_curve
from pydriftn.simulate import make_config, moffat_mog, render_moving_sources, simulate_dataset
from pydriftn.simulate.field import scintillation_sigma_per_step
from pydriftn.simulate.psf import moffat_profile

QUIET = dict(
    cr_rate_per_mpix_s=0.0,
    flashes_per_ccd_exposure=0,
    satellite_first=False,
    n_bad_columns=0,
    events_per_ccd=0,
)


def _wcs_from_text(text):
    return WCS(fits.Header.fromstring(text, sep="\n"))


def _ext(path, ccd):
    with fits.open(path) as h:
        return h[0].header.copy(), h[ccd].header.copy(), h[ccd].data.astype(float)


@pytest.fixture(scope="module")
def small(sim_small):
    """The shared session dataset (small preset, seed 0, tests/conftest.py)."""
    return sim_small


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Single CCD, two exposures, sparse bright stars, nothing else."""
    return simulate_dataset(
        tmp_path_factory.mktemp("sparse"), "small", seed=11, ccds="S4", n_exposures=3,
        n_stars_per_ccd=40, r_min=14.0, r_max=17.5, **QUIET,
    )


# --------------------------------------------------------------------- PSF
def test_moffat_mixture_accuracy():
    psf = moffat_mog(3.0, 3)
    assert abs(psf.weights.sum() - 1) < 1e-12
    assert psf.max_rel_error < 5e-3 and psf.ee_error < 1e-2
    assert abs(psf.fwhm_ratio - 1) < 0.01
    r = np.linspace(0, 3, 301)
    assert np.max(np.abs(psf.profile(r, 1.0) - moffat_profile(r, 1.0, 3.0))) / moffat_profile(0, 1.0, 3.0) < 5e-3


def test_renderer_conserves_flux_and_matches_static_psf():
    psf = moffat_mog(3.0, 3)
    img = np.zeros((80, 90))
    t = np.linspace(0, 1, 200)
    xs = 20.3 + 40 * t
    ys = 40.7 + 0 * t
    w = np.full(200, 5.0)
    sig = psf.sigmas[:, None] * np.full(200, 4.0)[None, :]
    dep, _ = render_moving_sources(img, xs[None], ys[None], w[None], sig, psf)
    assert dep[0] == pytest.approx(1000.0, rel=1e-6)
    assert img.sum() == pytest.approx(1000.0, rel=1e-6)
    # centroid = mean path
    yy, xx = np.mgrid[:80, :90]
    assert (img * xx).sum() / img.sum() == pytest.approx(xs.mean(), abs=1e-6)
    assert (img * yy).sum() / img.sum() == pytest.approx(40.7, abs=1e-6)
    # static source: pixel values = MoG integrated over pixels (check centre pixel by quadrature)
    img2 = np.zeros((41, 41))
    render_moving_sources(img2, [[20.0]], [[20.0]], [[1.0]], psf.sigmas[:, None] * 4.0, psf)
    u = np.linspace(-0.5, 0.5, 201)
    uu, vv = np.meshgrid(u, u)
    centre = np.trapezoid(np.trapezoid(psf.profile(np.hypot(uu, vv), 4.0), u), u)
    assert img2[20, 20] == pytest.approx(centre, rel=1e-4)
    # line-spread function: rows of a static source = strip_fraction
    from pydriftn.simulate import strip_fraction

    rows = img2.sum(axis=1)
    k = np.arange(41)
    assert np.allclose(rows, strip_fraction(psf, k - 0.5 - 20.0, k + 0.5 - 20.0, 4.0), atol=1e-6)
    # truncated by the CCD edge: deposited is what landed
    img3 = np.zeros((30, 30))
    dep3, _ = render_moving_sources(img3, [[0.0]], [[15.0]], [[1.0]], psf.sigmas[:, None] * 4.0, psf)
    from scipy.stats import norm

    sk = psf.sigmas * 4.0
    fx = norm.cdf(0.5 / sk)  # pixel 0 starts at x = -0.5
    fy = norm.cdf(14.5 / sk) - norm.cdf(-15.5 / sk)
    assert dep3[0] == pytest.approx(img3.sum(), rel=1e-12)
    # the stamp stops 5 widest sigmas from the source: < 1e-6 of the flux is not rendered
    assert dep3[0] == pytest.approx(np.sum(psf.weights * fx * fy), rel=1e-6)


# --------------------------------------------------------------- files/keys
def test_headers_layout_and_timing(small):
    cfg = small.config
    mjds = []
    for expnum in small.expnums:
        path = small.drift_images[expnum]
        assert path.name == f"c4d_2021B0023-exp_{expnum}-image.fits" and path.parent.name == "night_1"
        assert small.drift_masks[expnum].name == f"c4d_2021B0023-exp_{expnum}-dqmask.fits"
        with fits.open(path) as h, fits.open(small.drift_masks[expnum]) as m:
            p = h[0].header
            assert h[0].data is None
            for k in ("EXPTIME", "DATE-OBS", "MJD-OBS", "EXPNUM", "FILTER", "OBJECT", "INSTRUME",
                      "PIXSCAL1", "PIXSCAL2", "TELRA", "TELDEC"):
                assert k in p, k
            assert p["EXPTIME"] == 20.0 and p["EXPNUM"] == expnum and p["INSTRUME"] == "DECam"
            assert p["FILTER"] == "VR DECam c0007 6300.0 2600.0"
            assert Time(p["DATE-OBS"], format="isot", scale="utc").mjd == pytest.approx(p["MJD-OBS"], abs=1e-9)
            mjds.append(p["MJD-OBS"])
            assert [x.name for x in h[1:]] == ["S4", "N4"] == [x.name for x in m[1:]]
            for ccd in ("S4", "N4"):
                e = h[ccd].header
                assert e["NAXIS1"] == 512 and e["NAXIS2"] == 1024 and h[ccd].data.dtype.kind == "f" and h[ccd].data.dtype.itemsize == 4
                for k in ("GAINA", "GAINB", "RDNOISEA", "RDNOISEB", "SATURATA", "SATURATB", "FWHM", "AVSKY",
                          "CCDNUM", "DETPOS"):
                    assert k in e, k
                assert 3.9 <= e["GAINA"] <= 4.1 and 6 <= e["RDNOISEB"] <= 7 and 40000 <= e["SATURATA"] <= 45000
                assert e["CTYPE1"] == "RA---TAN" and e["CTYPE2"] == "DEC--TAN"
                assert abs(e["CD1_1"]) < 1e-6 and e["CD1_2"] == pytest.approx(7.5e-5, rel=1e-3)
                assert e["CD2_1"] == pytest.approx(-7.5e-5, rel=1e-3) and abs(e["CD2_2"]) < 1e-6
                assert m[ccd].data.dtype.kind == "i" and m[ccd].data.shape == (1024, 512)
                # sky level: AVSKY (ADU) vs the image median
                assert np.median(h[ccd].data) == pytest.approx(e["AVSKY"], rel=0.03)
    steps = np.diff(mjds) * 86400.0
    assert np.allclose(steps, cfg.exptime_s + cfg.overhead_s, atol=1e-3)
    for band, fil in (("g", "g DECam SDSS c0001 4720.0 1520.0"), ("r", "r DECam SDSS c0002 6415.0 1480.0")):
        with fits.open(small.pointed_images[band]) as h:
            assert h[0].header["FILTER"] == fil and h[0].header["EXPTIME"] == 60.0
    # seeing differs per band in the pointed images
    fw = {b: fits.getheader(small.pointed_images[b], "S4")["FWHM"] for b in "gr"}
    assert fw["g"] > fw["r"]


def test_header_wcs_is_perturbed_from_true(small):
    w = small.read_truth("wcs")
    d = w[w.kind == "drift"]
    seps = []
    for rec in d.itertuples():
        tw, hw = _wcs_from_text(rec.true_wcs), _wcs_from_text(rec.header_wcs)
        ra, dec = tw.pixel_to_world_values(255.5, 511.5)
        x, y = hw.world_to_pixel_values(ra, dec)
        seps.append(math.hypot(x - 255.5, y - 511.5) * 0.27)
    seps = np.array(seps)
    assert np.all(seps > 0.01) and np.all(seps < 30)


def test_truth_tables_columns(small):
    cols = {
        "stars": ["star_id", "ra", "dec", "g", "r", "vr", "flux_vr_e_s", "flux_g_e_s", "flux_r_e_s"],
        "trails": ["expnum", "ccd", "star_id", "x_start", "y_start", "x_end", "y_end", "counts_e", "peak_adu",
                   "saturated", "on_ccd_fraction"],
        "pointed": ["band", "ccd", "star_id", "x", "y", "counts_e", "peak_adu", "saturated"],
        "lightcurves": ["expnum", "star_id", "t_s", "mjd", "rel_flux"],
        "common": ["expnum", "ccd", "t_s", "mjd", "jitter_along_px", "jitter_cross_px", "jitter_x_px",
                   "jitter_y_px", "transparency", "seeing_fwhm_arcsec"],
        "events": ["star_id", "t0_mjd", "te_s", "u0", "rho", "kind"],
        "flashes": ["expnum", "ccd", "x", "y", "ra", "dec", "t_mjd", "duration_s", "counts_e"],
        "satellites": ["expnum", "ccd", "x0", "y0", "x1", "y1", "width_px", "surface_brightness_e"],
        "cosmic_rays": ["expnum", "ccd", "x", "y", "npix", "counts_e"],
    }
    for name, c in cols.items():
        df = small.read_truth(name)
        assert set(c) <= set(df.columns), name
        assert len(df) > 0, name
    ev = small.read_truth("events")
    assert {"short", "long"} <= set(ev.kind)
    assert (ev.te_s[ev.kind == "short"] < 20).all()
    gaia = pd.read_csv(small.gaia_reference)
    assert list(gaia.columns) == ["source_id", "ra", "dec", "phot_g_mean_mag", "pmra", "pmdec", "ref_epoch"]
    assert gaia.phot_g_mean_mag.max() <= 20.5 and len(gaia) > 100
    # Gaia positions = true positions moved back by the proper motion (+ sub-mas errors)
    st = small.read_truth("stars").set_index("star_id")
    ids = gaia.source_id.to_numpy() - 4000000000000000000
    tru = st.loc[ids]
    dt_yr = 2016.0 - (2000.0 + (Time(small.config.start_isot).mjd - 51544.5) / 365.25)
    dra = (gaia.ra.to_numpy() - tru.ra.to_numpy()) * np.cos(np.radians(tru.dec.to_numpy())) * 3.6e6
    ddec = (gaia.dec.to_numpy() - tru.dec.to_numpy()) * 3.6e6
    assert np.median(np.abs(dra - tru.pmra_mas_yr.to_numpy() * dt_yr)) < 1.0
    assert np.median(np.abs(ddec - tru.pmdec_mas_yr.to_numpy() * dt_yr)) < 1.0
    assert np.std(ddec) > 5.0  # proper motions are there
    stars = small.read_truth("stars")
    assert 14 <= stars.r.min() and stars.r.max() <= 22.5
    # rising luminosity function
    assert (stars.r > 21).sum() > 3 * (stars.r < 18).sum()
    # r = 20 -> ~700 e-/s
    assert 10 ** (0.4 * (small.config.zp_r - 20)) == pytest.approx(700, rel=0.1)


# ----------------------------------------------------------------- physics
def _isolated(trails, pad):
    bx0 = np.minimum(trails.x_start, trails.x_end) - pad
    bx1 = np.maximum(trails.x_start, trails.x_end) + pad
    by0 = np.minimum(trails.y_start, trails.y_end) - pad
    by1 = np.maximum(trails.y_start, trails.y_end) + pad
    out = []
    for i in range(len(trails)):
        ov = (bx0 < bx1[i]) & (bx1 > bx0[i]) & (by0 < by1[i]) & (by1 > by0[i])
        out.append(ov.sum() == 1)
    return np.array(out), bx0.to_numpy(), bx1.to_numpy(), by0.to_numpy(), by1.to_numpy()


def _amp_arrays(e, nx):
    a = np.arange(nx) < nx // 2
    return np.where(a, e["GAINA"], e["GAINB"]), np.where(a, e["RDNOISEA"], e["RDNOISEB"])


def _check_pulls(pulls, min_n):
    """Pulls must look like N(0, 1): mean within 3.5 sigma, variance within the
    0.05 %-99.95 % range of its chi-square distribution."""
    from scipy.stats import chi2

    pulls = np.asarray(pulls)
    n = len(pulls)
    assert n >= min_n, f"only {n} pulls"
    assert abs(pulls.mean()) < 3.5 / math.sqrt(n), pulls
    ss = float(((pulls - pulls.mean()) ** 2).sum())
    assert chi2.ppf(5e-4, n - 1) < ss < chi2.ppf(1 - 5e-4, n - 1), pulls


def _box_pull(el, rn, sky_e, x0, x1, y0, y1, truth_e):
    """Pull of the sky-subtracted electrons in a box against the truth."""
    ny, nx = el.shape
    x0, x1, y0, y1 = max(x0, 0), min(x1, nx), max(y0, 0), min(y1, ny)
    npix = (x1 - x0) * (y1 - y0)
    meas = el[y0:y1, x0:x1].sum() - npix * sky_e
    var = truth_e + npix * sky_e + (rn[x0:x1] ** 2).sum() * (y1 - y0)
    return (meas - truth_e) / math.sqrt(var)


def test_flux_conservation_pulls(sparse):
    """Sky-subtracted electrons around isolated trails = truth counts_e within
    photon + read noise, including trails cut by the CCD edges."""
    cfg = sparse.config
    trails = sparse.read_truth("trails")
    sky_e = cfg.sky_e_s_px("VR") * cfg.exptime_s
    pulls, edge_pulls = [], []
    for expnum, tr in trails.groupby("expnum"):
        tr = tr.reset_index(drop=True)
        _, e, img = _ext(sparse.drift_images[expnum], "S4")
        gain, rn = _amp_arrays(e, cfg.naxis1)
        el = img * gain[None, :]
        iso, bx0, bx1, by0, by1 = _isolated(tr, 6.0 * e["FWHM"])
        for i in np.flatnonzero(iso & (tr.counts_e > 2e4).to_numpy() & ~tr.saturated.to_numpy()):
            box = (int(np.floor(bx0[i])), int(np.ceil(bx1[i])) + 1, int(np.floor(by0[i])), int(np.ceil(by1[i])) + 1)
            p = _box_pull(el, rn, sky_e, *box, tr.counts_e[i])
            (pulls if tr.on_ccd_fraction[i] > 0.999 else edge_pulls).append(p)
    _check_pulls(pulls, 15)
    # trails crossing the CCD edges: truth counts are what landed on the CCD
    edge_pulls = np.array(edge_pulls)
    assert len(edge_pulls) >= 3
    assert np.all(np.abs(edge_pulls) < 5)
    assert 0 < trails.on_ccd_fraction.min() < 0.5 and trails.on_ccd_fraction.max() <= 1.0


def test_pointed_flux_conservation(sparse):
    cfg = sparse.config
    pt = sparse.read_truth("pointed")
    pulls = []
    for band in ("g", "r"):
        tr = pt[(pt.band == band)].reset_index(drop=True)
        _, e, img = _ext(sparse.pointed_images[band], "S4")
        gain, rn = _amp_arrays(e, cfg.naxis1)
        el = img * gain[None, :]
        sky_e = cfg.sky_e_s_px(band) * cfg.pointed_exptime_s
        h = 6.0 * e["FWHM"]
        pseudo = pd.DataFrame(dict(x_start=tr.x, x_end=tr.x, y_start=tr.y, y_end=tr.y))
        iso, bx0, bx1, by0, by1 = _isolated(pseudo, h)
        for i in np.flatnonzero(iso & (tr.on_ccd_fraction > 0.999).to_numpy() & ~tr.saturated.to_numpy()
                                & (tr.counts_e > 1e4).to_numpy()):
            box = (int(np.floor(bx0[i])), int(np.ceil(bx1[i])) + 1, int(np.floor(by0[i])), int(np.ceil(by1[i])) + 1)
            pulls.append(_box_pull(el, rn, sky_e, *box, tr.counts_e[i]))
    _check_pulls(pulls, 15)
    # the brightest stars saturate in 60 s and are flagged
    assert pt.saturated.any() and (pt[pt.saturated].peak_adu > 30000).all()
    # seeing differs per band as configured
    assert fits.getheader(sparse.pointed_images["g"], "S4")["FWHM"] == pytest.approx(
        cfg.seeing_g_arcsec / cfg.pixel_scale_arcsec, rel=1e-3)


def test_flash_counts_and_width(tmp_path):
    """Flashes: untrailed PSF with the seeing of their instant, truth counts."""
    ds = simulate_dataset(tmp_path, "small", seed=9, ccds="S4", n_exposures=4,
                          n_stars_per_ccd=0, cr_rate_per_mpix_s=0.0, satellite_first=False, n_bad_columns=0,
                          events_per_ccd=0, flashes_per_ccd_exposure=3, flash_counts_range_e=(2e5, 5e5))
    cfg = ds.config
    fl = ds.read_truth("flashes")
    com = ds.read_truth("common")
    psf = moffat_mog(cfg.moffat_beta, cfg.n_gauss)
    sky_e = cfg.sky_e_s_px("VR") * cfg.exptime_s
    pulls, var_pulls = [], []
    for rec in fl.itertuples():
        _, e, img = _ext(ds.drift_images[rec.expnum], "S4")
        gain, rn = _amp_arrays(e, cfg.naxis1)
        el = img * gain[None, :]
        h = int(np.ceil(6 * e["FWHM"]))
        x0, y0 = int(round(rec.x)) - h, int(round(rec.y)) - h
        if x0 < 0 or y0 < 0 or x0 + 2 * h + 1 > cfg.naxis1 or y0 + 2 * h + 1 > cfg.naxis2:
            continue
        others = fl[(fl.expnum == rec.expnum) & (fl.index != rec.Index)]
        if np.any((np.abs(others.x - rec.x) < 2 * h) & (np.abs(others.y - rec.y) < 2 * h)):
            continue
        pulls.append(_box_pull(el, rn, sky_e, x0, x0 + 2 * h + 1, y0, y0 + 2 * h + 1, rec.counts_e))
        # width: second moment = MoG variance at the flash's instant + pixel 1/12
        sub = el[y0:y0 + 2 * h + 1, x0:x0 + 2 * h + 1] - sky_e
        yy, xx = np.mgrid[y0:y0 + 2 * h + 1, x0:x0 + 2 * h + 1]
        f = sub.sum()
        cx, cy = (sub * xx).sum() / f, (sub * yy).sum() / f
        var_pix = np.clip(sub, 0, None) + sky_e + 49.0
        s_c = math.sqrt((var_pix * ((xx - cx) / f) ** 2).sum())
        assert abs(cx - rec.x) < 4 * s_c + 0.01 and abs(cy - rec.y) < 4 * s_c + 0.01
        c = com[com.expnum == rec.expnum]
        fw = np.interp(rec.t_s, c.t_s, c.seeing_fwhm_arcsec) / cfg.pixel_scale_arcsec
        var_pred = np.sum(psf.weights * (psf.sigmas * fw) ** 2) + 1 / 12
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        var = 0.5 * (sub * r2).sum() / f
        s_var = 0.5 * math.sqrt((var_pix * ((r2 - 2 * var) / f) ** 2).sum())
        assert abs(var - var_pred) < 4 * s_var + 0.02 * var_pred
        var_pulls.append((var - var_pred) / s_var)
    _check_pulls(pulls, 6)
    assert abs(np.mean(var_pulls)) < 3.5 / math.sqrt(len(var_pulls))


@pytest.fixture(scope="module", params=[(0.0, 0.5), (0.3, -0.4)], ids=["north", "diagonal"])
def bright(tmp_path_factory, request):
    return simulate_dataset(
        tmp_path_factory.mktemp("bright"), "small", seed=5, ccds="S4",
        n_exposures=2, n_stars_per_ccd=12, r_min=13.5, r_max=15.0, drift_rate_arcsec_s=request.param, **QUIET,
    )


def _predicted_moments(ds, rec, expnum):
    """Weighted mean and covariance of the true image path + PSF moments, from truth."""
    w = ds.read_truth("wcs")
    tw = _wcs_from_text(w[(w.expnum == expnum) & (w.ccd == rec.ccd)].true_wcs.iloc[0])
    com = ds.read_truth("common")
    com = com[(com.expnum == expnum) & (com.ccd == rec.ccd)].sort_values("t_s")
    lc = ds.read_truth("lightcurves")
    lc = lc[(lc.expnum == expnum) & (lc.star_id == rec.star_id)].sort_values("t_s")
    star = ds.read_truth("stars").set_index("star_id").loc[rec.star_id]
    t = com.t_s.to_numpy()
    x, y = geometry.star_pixel_positions(tw, star.ra, star.dec, t, ds.config.drift_rate)
    x = x + com.jitter_x_px.to_numpy()
    y = y + com.jitter_y_px.to_numpy()
    wt = com.transparency.to_numpy() * lc.rel_flux.to_numpy()
    mx, my = np.average(x, weights=wt), np.average(y, weights=wt)
    cov = np.cov(np.vstack([x, y]), aweights=wt, bias=True)
    psf = moffat_mog(ds.config.moffat_beta, ds.config.n_gauss)
    fwhm_px = com.seeing_fwhm_arcsec.to_numpy() / ds.config.pixel_scale_arcsec
    psf_var = np.average(np.sum(psf.weights[None, :] * (psf.sigmas[None, :] * fwhm_px[:, None]) ** 2, axis=1), weights=wt)
    return mx, my, cov + (psf_var + 1.0 / 12.0) * np.eye(2), tw


def test_trail_geometry_matches_wcs_and_drift(bright):
    cfg = bright.config
    n = 0
    for expnum in bright.expnums:
        n += _check_trail_moments(bright, expnum)
    assert n >= 3


def _check_trail_moments(bright, expnum):
    cfg = bright.config
    trails = bright.read_truth("trails")
    trails = trails[trails.expnum == expnum].reset_index(drop=True)
    _, e, img = _ext(bright.drift_images[expnum], "S4")
    gain, _ = _amp_arrays(e, cfg.naxis1)
    el = img * gain[None, :] - cfg.sky_e_s_px("VR") * cfg.exptime_s
    pad = 6.0 * e["FWHM"]
    iso, bx0, bx1, by0, by1 = _isolated(trails, pad)
    n = 0
    for i in np.flatnonzero(iso & (trails.on_ccd_fraction > 0.999).to_numpy()):
        rec = trails.iloc[i]
        x0, x1 = int(np.floor(bx0[i])), int(np.ceil(bx1[i])) + 1
        y0, y1 = int(np.floor(by0[i])), int(np.ceil(by1[i])) + 1
        if x0 < 0 or y0 < 0 or x1 > cfg.naxis1 or y1 > cfg.naxis2:
            continue
        sub = el[y0:y1, x0:x1]
        yy, xx = np.mgrid[y0:y1, x0:x1]
        f = sub.sum()
        # per-pixel variance (e-^2) for error propagation of the moments
        var = np.clip(sub, 0, None) + cfg.sky_e_s_px("VR") * cfg.exptime_s + 7.0**2
        cx, cy = (sub * xx).sum() / f, (sub * yy).sum() / f
        mx, my, cov_pred, tw = _predicted_moments(bright, rec, expnum)
        s_cx = math.sqrt((var * ((xx - cx) / f) ** 2).sum())
        s_cy = math.sqrt((var * ((yy - cy) / f) ** 2).sum())
        assert abs(cx - mx) < min(0.1, 4 * s_cx + 0.01) and abs(cy - my) < min(0.1, 4 * s_cy + 0.01)
        cxx = (sub * (xx - cx) ** 2).sum() / f
        cyy = (sub * (yy - cy) ** 2).sum() / f
        cxy = (sub * (xx - cx) * (yy - cy)).sum() / f
        lam, vec = np.linalg.eigh(np.array([[cxx, cxy], [cxy, cyy]]))
        uu = (xx - cx) * vec[0, 1] + (yy - cy) * vec[1, 1]  # along the major axis
        vv = (xx - cx) * vec[0, 0] + (yy - cy) * vec[1, 0]
        s_l1 = math.sqrt((var * ((uu**2 - lam[1]) / f) ** 2).sum())
        s_l0 = math.sqrt((var * ((vv**2 - lam[0]) / f) ** 2).sum())
        s_ang = math.degrees(math.sqrt((var * (uu * vv / f) ** 2).sum()) / (lam[1] - lam[0]))
        tg = geometry.trail_geometry(tw, cfg.exptime_s, cfg.drift_rate, x=mx, y=my)
        major = vec[:, 1]
        lam_pred, vec_pred = np.linalg.eigh(cov_pred)
        # direction: measured major axis = predicted one (the jitter path tilts it
        # by up to ~0.5 deg from the mean drift direction, which it must follow)
        ang = math.degrees(math.acos(min(1.0, abs(major @ vec_pred[:, 1]))))
        assert ang < 4 * s_ang + 0.01
        ang_drift = math.degrees(math.acos(min(1.0, abs(major @ np.array(tg.direction)))))
        assert ang_drift < 1.5
        length = math.sqrt(12.0 * (lam[1] - lam[0]))
        assert length == pytest.approx(tg.length_px, rel=0.02)
        assert abs(lam[1] - lam_pred[1]) < 4 * s_l1 + 0.01
        assert abs(lam[0] - lam_pred[0]) < 4 * s_l0 + 0.01
        # endpoints in truth are the geometry prediction
        star = bright.read_truth("stars").set_index("star_id").loc[rec.star_id]
        xs, ys, xe, ye = geometry.trail_endpoints(tw, star.ra, star.dec, cfg.exptime_s, cfg.drift_rate)
        assert np.allclose([xs, ys, xe, ye], [rec.x_start, rec.y_start, rec.x_end, rec.y_end], atol=1e-6)
        n += 1
    return n


@pytest.mark.parametrize("rate,axis,sign", [((0.0, 0.5), "x", -1), ((0.5, 0.0), "y", +1)])
def test_drift_direction_and_sense_from_image(tmp_path, rate, axis, sign):
    """+Dec drift moves images to -x, +RA drift to +y (DECam orientation); the
    sense is read from the image with a short, strong microlensing event."""
    ds = simulate_dataset(
        tmp_path, "small", seed=21, ccds="S4", n_exposures=1, naxis1=256, naxis2=512, n_stars_per_ccd=12,
        r_min=15.0, r_max=16.0, drift_rate_arcsec_s=rate,
        cr_rate_per_mpix_s=0.0, flashes_per_ccd_exposure=0, satellite_first=False, n_bad_columns=0,
        events_per_ccd=1, event_r_range=(15.0, 16.0), short_te_range_s=(1.0, 1.5), u0_range=(0.02, 0.03),
    )
    tr = ds.read_truth("trails")
    d_along = (tr.x_end - tr.x_start) if axis == "x" else (tr.y_end - tr.y_start)
    d_cross = (tr.y_end - tr.y_start) if axis == "x" else (tr.x_end - tr.x_start)
    assert np.allclose(d_along, sign * 20 * 0.5 / 0.27, rtol=0.01)
    assert np.all(np.abs(d_cross) < 0.1)
    ev = ds.read_truth("events").iloc[0]
    rec = tr[(tr.star_id == ev.star_id)].iloc[0]
    _, e, img = _ext(ds.drift_images[ds.expnums[0]], "S4")
    el = img - e["AVSKY"]
    cx, cy = 0.5 * (rec.x_start + rec.x_end), 0.5 * (rec.y_start + rec.y_end)
    h = 3 * e["FWHM"]
    if axis == "x":
        prof = el[int(cy - h):int(cy + h) + 1, :].sum(axis=0)
        lo, hi = sorted([rec.x_start, rec.x_end])
    else:
        prof = el[:, int(cx - h):int(cx + h) + 1].sum(axis=1)
        lo, hi = sorted([rec.y_start, rec.y_end])
    seg = np.arange(int(lo) - 5, int(hi) + 6)
    peak_pos = seg[np.argmax(prof[seg])]
    t0_s = (ev.t0_mjd - fits.getheader(ds.drift_images[ds.expnums[0]])["MJD-OBS"]) * 86400.0
    start = rec.x_start if axis == "x" else rec.y_start
    expected = start + sign * t0_s * 0.5 / 0.27
    assert abs(peak_pos - expected) <= 2.0


def test_microlensing_truth_follows_models(small):
    ev = small.read_truth("events")
    lc = small.read_truth("lightcurves")
    sig = None
    for rec in ev.itertuples():
        l = lc[lc.star_id == rec.star_id]
        assert len(l)
        a = microlensing_magnification_curve((l.mjd.to_numpy() - rec.t0_mjd) * 86400.0, 0.0, rec.te_s, rec.u0, rec.rho)
        ratio = l.rel_flux.to_numpy() / a - 1.0
        dt = np.diff(np.sort(l.t_s.unique()))[0]
        sig = scintillation_sigma_per_step(small.config, dt)
        assert abs(ratio.mean()) < 5 * sig / math.sqrt(len(ratio))
        assert ratio.std() == pytest.approx(sig, rel=0.1)
    # at least one event is strongly magnified inside an exposure
    assert lc[lc.star_id.isin(ev.star_id)].rel_flux.max() > 1.5


def test_scintillation_matches_young(small):
    cfg = small.config
    lc = small.read_truth("lightcurves")
    ev = small.read_truth("events")
    lc = lc[~lc.star_id.isin(ev.star_id)]
    one = lc[lc.expnum == small.expnums[0]]
    dt = np.diff(np.sort(one.t_s.unique()))[0]
    # Young 1967 for D = 400 cm, X = 1.2, h = 2215 m, 0.5 s: ~0.17 %
    young_05 = 0.09 * 400 ** (-2 / 3) * 1.2**1.75 * math.exp(-2215 / 8000) / math.sqrt(2 * 0.5)
    assert 0.0015 < young_05 < 0.002
    nb = int(round(0.5 / dt))
    vals = []
    for _, g in one.groupby("star_id"):
        r = g.sort_values("t_s").rel_flux.to_numpy()
        m = len(r) // nb
        vals.append(r[: m * nb].reshape(m, nb).mean(axis=1))
    binned = np.concatenate(vals)
    sig_bin = scintillation_sigma_per_step(cfg, dt) / math.sqrt(nb)
    assert binned.std() == pytest.approx(sig_bin, rel=0.05)
    assert sig_bin == pytest.approx(young_05 * math.sqrt(0.5 / (nb * dt)), rel=1e-6)


def test_common_pattern_statistics(small):
    com = small.read_truth("common")
    cfg = small.config
    c = com[com.ccd == "S4"]
    jit = np.concatenate([c.jitter_along_px, c.jitter_cross_px]) * cfg.pixel_scale_arcsec
    assert 0.02 < jit.std() < 0.15
    assert 0.002 < c.transparency.std() < 0.05 and abs(c.transparency.mean() - 1) < 0.05
    assert c.seeing_fwhm_arcsec.mean() == pytest.approx(cfg.seeing_vr_arcsec, rel=0.15)
    # common to all CCDs of an exposure
    s4 = com[com.ccd == "S4"].reset_index(drop=True)
    n4 = com[com.ccd == "N4"].reset_index(drop=True)
    assert np.allclose(s4.transparency, n4.transparency) and np.allclose(s4.jitter_along_px, n4.jitter_along_px)
    # projection along/cross -> x/y is a rotation
    assert np.allclose(np.hypot(s4.jitter_x_px, s4.jitter_y_px), np.hypot(s4.jitter_along_px, s4.jitter_cross_px))


def test_masks_cosmic_rays_saturation_streak(small):
    crs = small.read_truth("cosmic_rays")
    sats = small.read_truth("satellites")
    assert len(sats) >= 1
    for expnum in small.expnums[:1]:
        for ccd in ("S4", "N4"):
            with fits.open(small.drift_images[expnum]) as h, fits.open(small.drift_masks[expnum]) as m:
                img, msk, e = h[ccd].data, m[ccd].data, h[ccd].header
            assert set(np.unique(msk)) <= {0, 1, 3, 5, 8}
            c = crs[(crs.expnum == expnum) & (crs.ccd == ccd)]
            for rec in c.itertuples():
                yy, xx = int(round(rec.y)), int(round(rec.x))
                win = msk[max(yy - 3, 0):yy + 4, max(xx - 3, 0):xx + 4]
                assert np.any((win == 5) | (win == 3) | (win == 1))
            assert (msk == 5).sum() >= c.npix.sum() * 0.5
            sat = msk == 3
            if sat.any():
                lim = np.where(np.arange(img.shape[1]) < img.shape[1] // 2, e["SATURATA"], e["SATURATB"])
                assert np.allclose(img[sat], np.broadcast_to(lim, img.shape)[sat], rtol=1e-6)
            assert (msk == 1).sum() > 0
    s = sats.iloc[0]
    with fits.open(small.drift_masks[s.expnum]) as m:
        assert (m[s.ccd].data == 8).sum() > 100


def test_flashes_in_image(small):
    fl = small.read_truth("flashes")
    assert (fl.host_star_id >= 0).any() and (fl.host_star_id < 0).any()
    assert (fl.duration_s <= 0.01).all()
    cfg = small.config
    # the flash's sky position maps to its pixel position at its instant (drift convention + jitter)
    w = small.read_truth("wcs")
    com = small.read_truth("common")
    for rec in fl.itertuples():
        tw = _wcs_from_text(w[(w.kind == "drift") & (w.expnum == rec.expnum) & (w.ccd == rec.ccd)].true_wcs.iloc[0])
        c = com[(com.expnum == rec.expnum) & (com.ccd == rec.ccd)]
        x, y = geometry.star_pixel_positions(tw, rec.ra, rec.dec, rec.t_s, cfg.drift_rate)
        x += np.interp(rec.t_s, c.t_s, c.jitter_x_px)
        y += np.interp(rec.t_s, c.t_s, c.jitter_y_px)
        assert math.hypot(x - rec.x, y - rec.y) < 1e-3
    for rec in fl[fl.host_star_id >= 0].itertuples():
        tr = small.read_truth("trails")
        host = tr[(tr.expnum == rec.expnum) & (tr.ccd == rec.ccd) & (tr.star_id == rec.host_star_id)].iloc[0]
        # the flash lies on the host's trail segment (within jitter)
        p0 = np.array([host.x_start, host.y_start])
        p1 = np.array([host.x_end, host.y_end])
        frac = rec.t_s / cfg.exptime_s
        assert np.hypot(*(p0 + frac * (p1 - p0) - [rec.x, rec.y])) < 1.5


def test_determinism_and_ccd_order(tmp_path):
    kw = dict(n_exposures=1, naxis1=128, naxis2=256, n_stars_per_ccd=30)
    a = simulate_dataset(tmp_path / "a", "small", seed=7, ccds="S4,N4", **kw)
    b = simulate_dataset(tmp_path / "b", "small", seed=7, ccds="N4,S4", **kw)
    c = simulate_dataset(tmp_path / "c", "small", seed=8, ccds="S4,N4", **kw)
    d = simulate_dataset(tmp_path / "d", "small", seed=7, ccds="S4", **kw)
    e = a.expnums[0]
    # a CCD does not depend on which other CCDs are simulated
    assert np.array_equal(fits.getdata(a.drift_images[e], "S4"), fits.getdata(d.drift_images[e], "S4"))
    for ccd in ("S4", "N4"):
        da = fits.getdata(a.drift_images[e], ccd)
        db = fits.getdata(b.drift_images[e], ccd)
        dc = fits.getdata(c.drift_images[e], ccd)
        assert np.array_equal(da, db)
        assert not np.array_equal(da, dc)
    ta, tb = a.read_truth("trails"), b.read_truth("trails")
    key = ["ccd", "star_id"]
    pd.testing.assert_frame_equal(ta.sort_values(key).reset_index(drop=True), tb.sort_values(key).reset_index(drop=True))


def test_fz_output_and_bad_config(tmp_path):
    ds = simulate_dataset(tmp_path, "small", seed=1, ccds="S4", n_exposures=2, naxis1=128, naxis2=256,
                          n_stars_per_ccd=20, fz_exposures=1)
    last = ds.drift_images[ds.expnums[-1]]
    assert last.name.endswith("-image.fits.fz")
    with fits.open(last) as h:
        assert h["S4"].data.shape == (256, 128) and h[0].header["EXPTIME"] == 20.0
        assert abs(np.median(h["S4"].data) - h["S4"].header["AVSKY"]) < 0.05 * h["S4"].header["AVSKY"]
    with pytest.raises(ConfigError, match="unknown key"):
        make_config("small", n_stars=3)
    with pytest.raises(ConfigError, match="preset"):
        make_config("huge")
    with pytest.raises(ConfigError, match="header_pointing_error_arcsec"):
        make_config("small", header_pointing_error_arcsec=120)


def test_sip_distortion_and_parallel_workers(tmp_path):
    kw = dict(ccds="S4,N4", n_exposures=1, naxis1=128, naxis2=256, n_stars_per_ccd=40, sip_amplitude_px=3.0)
    a = simulate_dataset(tmp_path / "a", "small", seed=2, **kw)
    b = simulate_dataset(tmp_path / "b", "small", seed=2, n_workers=2, **kw)
    e = a.expnums[0]
    for ccd in ("S4", "N4"):
        assert np.array_equal(fits.getdata(a.drift_images[e], ccd), fits.getdata(b.drift_images[e], ccd))
        assert fits.getheader(a.drift_images[e], ccd) == fits.getheader(b.drift_images[e], ccd)
        assert fits.getheader(a.drift_images[e], ccd)["CTYPE1"] == "RA---TAN"  # header never carries SIP
    w = a.read_truth("wcs")
    rec = w[(w.kind == "drift") & (w.ccd == "S4")].iloc[0]
    assert "RA---TAN-SIP" in rec.true_wcs and "A_2_0" in rec.true_wcs
    tw = _wcs_from_text(rec.true_wcs)
    nosip = tw.deepcopy()
    nosip.sip = None
    # the distortion moves a corner by up to ~the configured amplitude
    d = np.hypot(*(np.subtract(tw.all_world2pix([[*nosip.pixel_to_world_values(0.0, 0.0)]], 0)[0], [0.0, 0.0])))
    assert 0.05 < d < 5
    tr = a.read_truth("trails")
    stars = a.read_truth("stars").set_index("star_id")
    t = tr[(tr.ccd == "S4")]
    xs, ys, xe, ye = geometry.trail_endpoints(tw, stars.loc[t.star_id].ra.to_numpy(), stars.loc[t.star_id].dec.to_numpy(),
                                              20.0, a.config.drift_rate)
    assert np.allclose(xs, t.x_start) and np.allclose(ye, t.y_end)


def test_bleed_conserves_charge_and_saturated_trails(tmp_path):
    from pydriftn.simulate.render import _bleed

    rng = np.random.default_rng(0)
    counts = rng.uniform(0, 100, (200, 6))
    counts[90:95, 2] = [300, 900, 2000, 700, 250]
    counts[10, 4] = 1500
    before = counts.sum(axis=0)
    bled = _bleed(counts, np.full(6, 400.0))
    assert np.allclose(counts.sum(axis=0), before)  # nothing reached the edges
    assert counts.max() <= 400.0 + 1e-9
    assert bled[:, 2].sum() > 5 and bled[:, 0].sum() == 0
    # a dataset with saturating stars: clipped, flagged 3 (core) and 4 (bleed), truth flag set
    ds = simulate_dataset(tmp_path, "tiny", seed=3, n_exposures=1, n_bright_stars_per_ccd=3)
    tr = ds.read_truth("trails")
    assert tr.saturated.sum() >= 1 and (tr[tr.saturated].peak_adu > 40000).all()
    with fits.open(ds.drift_images[ds.expnums[0]]) as h, fits.open(ds.drift_masks[ds.expnums[0]]) as m:
        img, msk, e = h["S4"].data, m["S4"].data, h["S4"].header
    assert (msk == 3).sum() > 0 and (msk == 4).sum() > 0
    assert img.max() <= max(e["SATURATA"], e["SATURATB"]) + 1e-3
    assert not tr[~tr.saturated].peak_adu.gt(max(e["SATURATA"], e["SATURATB"])).any()


def test_satellite_crosses_focal_plane_with_its_flux(tmp_path):
    from pydriftn.simulate.field import ccd_centre_offsets

    ds = simulate_dataset(tmp_path, "small", seed=4, n_exposures=3, naxis1=256, naxis2=512, n_stars_per_ccd=0,
                          cr_rate_per_mpix_s=0.0, flashes_per_ccd_exposure=0, n_bad_columns=0, events_per_ccd=0,
                          satellite_prob=1.0, ccd_gap_px=20)
    cfg = ds.config
    sats = ds.read_truth("satellites")
    assert set(sats.expnum) == set(ds.expnums)
    offs = ccd_centre_offsets(cfg)
    both = 0
    for expnum, g in sats.groupby("expnum"):
        # one straight line in focal-plane coordinates
        pts = []
        for rec in g.itertuples():
            dx, dy = offs[rec.ccd]
            for x, y in ((rec.x0, rec.y0), (rec.x1, rec.y1)):
                pts.append((x + dx - (cfg.naxis1 - 1) / 2, y + dy - (cfg.naxis2 - 1) / 2))
        pts = np.array(pts)
        if len(g) > 1:
            both += 1
            d = pts[1] - pts[0]
            cross = [abs(d[0] * (p[1] - pts[0][1]) - d[1] * (p[0] - pts[0][0])) / np.hypot(*d) for p in pts[2:]]
            assert max(cross) < 1e-6
        # flux: sky-subtracted electrons = surface brightness x length (ends lose < 1 px of profile)
        for rec in g.itertuples():
            _, e, img = _ext(ds.drift_images[expnum], rec.ccd)
            gain, rn = _amp_arrays(e, cfg.naxis1)
            length = math.hypot(rec.x1 - rec.x0, rec.y1 - rec.y0)
            if length < 100:
                continue
            sky_e = cfg.sky_e_s_px("VR") * cfg.exptime_s
            meas = (img * gain[None, :]).sum() - img.size * sky_e
            noise = math.sqrt(img.size * (sky_e + 42.0) + rec.surface_brightness_e * length)
            # profile cut where the line leaves the CCD at an angle: allow ~1 FWHM of length per end
            tol = 4 * noise + 2 * rec.width_px * rec.surface_brightness_e
            assert abs(meas - rec.surface_brightness_e * length) < tol
    assert both >= 1


def test_event_stars_keep_the_minimum_separation():
    """``event_min_separation_arcsec``: no two event stars of a CCD closer than that (the image-level
    efficiency's ten events per small CCD otherwise land side by side); 0 keeps the old draw exactly."""
    from pydriftn.simulate.dataset import exposure_schedule
    from pydriftn.simulate.field import choose_events, make_star_field, make_wcs

    def events(**ov):
        cfg = make_config("small", n_stars_per_ccd=800, events_per_ccd=10, event_r_range=(16.0, 18.5), **ov)
        stars = make_star_field(cfg, 5)
        nominal = {c: make_wcs(cfg, c, (cfg.ra_deg, cfg.dec_deg)) for c in cfg.ccds}
        ev = choose_events(cfg, stars, 5, exposure_schedule(cfg), nominal)
        return ev.merge(stars[["star_id", "ra", "dec"]], on="star_id")

    def min_sep(ev):
        c = SkyCoord(ev["ra"].to_numpy() * u.deg, ev["dec"].to_numpy() * u.deg)
        out = np.inf
        for _, g in ev.groupby("ccd"):
            cc = SkyCoord(g["ra"].to_numpy() * u.deg, g["dec"].to_numpy() * u.deg)
            s = cc[:, None].separation(cc[None, :]).arcsec
            out = min(out, s[~np.eye(len(g), dtype=bool)].min())
        return out, len(c)

    base, n_base = min_sep(events())
    sep, n_sep = min_sep(events(event_min_separation_arcsec=20.0))
    assert n_sep == n_base == 10 * len(make_config("small").ccds)
    assert sep >= 20.0 > base  # the plain draw does put event stars closer than 20"
    assert make_config("small").to_dict().get("event_min_separation_arcsec") is None
    assert make_config("small", event_min_separation_arcsec=20.0).to_dict()["event_min_separation_arcsec"] == 20.0
    with pytest.raises(ConfigError, match="event_min_separation_arcsec"):
        make_config("small", event_min_separation_arcsec=-1.0).validate()
