"""Drift geometry: direction and sense from WCS + drift vector, never assumed."""

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from pydriftn import geometry as geo


def decam_like_wcs(scale_arcsec=0.27, rotation_deg=0.0, nx=2046, ny=4094, dec0=-30.0):
    """A DECam CP-oriented TAN WCS: x along -Dec, y along +RA."""
    s = scale_arcsec / 3600.0
    th = np.radians(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    cd = rot @ np.array([[0.0, s], [-s, 0.0]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, dec0]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = cd
    w.pixel_shape = (nx, ny)
    return w


def test_offset_sky_matches_astropy_spherical_offsets():
    rng = np.random.default_rng(1)
    ra = rng.uniform(0, 360, 50)
    dec = rng.uniform(-85, 85, 50)
    east = rng.uniform(-60, 60, 50)
    north = rng.uniform(-60, 60, 50)
    ra1, dec1 = geo.offset_sky(ra, dec, east, north)
    c = SkyCoord(ra * u.deg, dec * u.deg).spherical_offsets_by(east * u.arcsec, north * u.arcsec)
    sep = SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(c).to_value(u.arcsec)
    # astropy offsets are spherical (offset frame), ours gnomonic: they differ
    # only at third order, ~1e-5" for 1-arcmin offsets
    assert np.max(sep) < 1e-4


def test_plus_dec_drift_moves_decam_images_towards_minus_x():
    w = decam_like_wcs()
    g = geo.trail_geometry(w, 20.0, (0.0, 0.5))
    assert g.direction[0] == pytest.approx(-1.0, abs=1e-6)
    assert abs(g.direction[1]) < 1e-6
    # 10 arcsec at 0.27"/px
    assert g.length_px == pytest.approx(10.0 / 0.27, rel=1e-4)
    assert g.sample_dt_s == pytest.approx(0.27 / 0.5, rel=1e-4)
    assert g.n_samples == 37


def test_east_drift_moves_decam_images_along_y():
    w = decam_like_wcs()
    g = geo.trail_geometry(w, 20.0, (0.5, 0.0))
    # CD1_2 > 0: RA increases with y, so an east drift moves images towards +y
    assert g.direction[1] == pytest.approx(1.0, abs=1e-5)


def test_rotated_wcs_gives_rotated_trail():
    w = decam_like_wcs(rotation_deg=30.0)
    g0 = geo.trail_geometry(decam_like_wcs(), 20.0, 0.5)
    g = geo.trail_geometry(w, 20.0, 0.5)
    dang = (g.angle_deg - g0.angle_deg + 180) % 360 - 180
    assert abs(abs(dang) - 30.0) < 1e-3


def test_positions_linear_in_time_and_endpoints_consistent():
    w = decam_like_wcs()
    ra, dec = w.pixel_to_world_values(np.array([100.0, 1500.0]), np.array([200.0, 3000.0]))
    t = np.linspace(0, 20, 11)
    x, y = geo.star_pixel_positions(w, ra[:, None], dec[:, None], t[None, :], 0.5)
    assert x.shape == (2, 11)
    assert np.allclose(x[:, 0], [100.0, 1500.0], atol=1e-6)
    dx = np.diff(x, axis=1)
    assert np.allclose(dx, dx[:, :1], atol=1e-4)
    x0, y0, x1, y1 = geo.trail_endpoints(w, ra, dec, 20.0, 0.5)
    assert np.allclose(x1, x[:, -1]) and np.allclose(y1, y[:, -1])


def test_anchor_round_trip():
    g = geo.trail_geometry(decam_like_wcs(), 20.0, 0.5)
    xs, ys = 500.0, 600.0
    for anchor in ("start", "middle", "end"):
        xa, ya = geo.start_to_anchor(xs, ys, g, anchor)
        xb, yb = geo.anchor_to_start(xa, ya, g, anchor)
        assert xb == pytest.approx(xs) and yb == pytest.approx(ys)
    xm, _ = geo.start_to_anchor(xs, ys, g, "middle")
    assert xm == pytest.approx(xs - g.length_px / 2, abs=1e-6)
    with pytest.raises(ValueError, match="anchor"):
        geo.anchor_to_start(0, 0, g, "left")


def test_parse_drift_rate():
    assert geo.parse_drift_rate(0.5) == (0.0, 0.5)
    assert geo.parse_drift_rate("0.1,0.4") == (0.1, 0.4)
    with pytest.raises(ValueError, match="zero"):
        geo.parse_drift_rate((0, 0))
    with pytest.raises(ValueError, match="EAST,NORTH"):
        geo.parse_drift_rate("fast")


def test_sample_times():
    t = geo.sample_times_mjd(60000.0, 3, 0.54)
    assert np.allclose((t - 60000.0) * 86400, [0.27, 0.81, 1.35])
