"""Local sky in stadium annuli: statistics against astropy, geometry, masking, honesty of errors."""

import math

import numpy as np
import pandas as pd
import pytest
from astropy.stats import sigma_clipped_stats

from pydriftn.extract.synthetic import make_geometry, render_field
from pydriftn.sky import (
    SKY_COLUMNS,
    clipped_stats_rows,
    local_sky,
    segment_distance,
    sky_table_filename,
    stadium_offsets,
    trail_footprint_image,
)


def test_clipped_stats_rows_match_astropy():
    rng = np.random.default_rng(2)
    v = rng.normal(500.0, 7.0, (40, 600))
    v[:, :40] += rng.exponential(80.0, (40, 40))  # faint sources / wings: one-sided contamination
    v[rng.random(v.shape) < 0.15] = np.nan
    med, std, n = clipped_stats_rows(v, sigma=3.0, maxiters=10)
    for i in range(0, 40, 7):
        row = v[i][np.isfinite(v[i])]
        _, amed, astd = sigma_clipped_stats(row, sigma=3.0, maxiters=10)
        assert med[i] == pytest.approx(amed, abs=1e-3)
        assert std[i] == pytest.approx(astd, rel=1e-4)
    # an empty row gives NaN, not an error
    v[3] = np.nan
    med, std, n = clipped_stats_rows(v)
    assert np.isnan(med[3]) and n[3] == 0


def test_segment_distance_and_stadium_area():
    # distance to a horizontal segment from (0,0) to (10,0)
    d = segment_distance(np.array([5.0, -3.0, 14.0]), np.array([2.0, 4.0, -3.0]), 0.0, 0.0, 10.0, 0.0)
    np.testing.assert_allclose(d, [2.0, 5.0, 5.0])
    # a filled stadium of radius r and length L has area 2 r L + pi r^2, whatever its direction
    for ang in (0.0, 33.0, 90.0, 180.0):
        th = math.radians(ang)
        ox, oy = stadium_offsets((math.cos(th), math.sin(th)), 37.0, 0.0, 9.3)
        assert len(ox) == pytest.approx(2 * 9.3 * 37 + math.pi * 9.3**2, rel=0.03)
        ox2, _ = stadium_offsets((math.cos(th), math.sin(th)), 37.0, 9.3, 14.3)
        assert len(ox2) == pytest.approx(2 * 5 * 37 + math.pi * (14.3**2 - 9.3**2), rel=0.03)


def test_footprint_counts_overlaps():
    trails = pd.DataFrame({"star_id": [1, 2], "x_start": [60.0, 60.0], "y_start": [50.0, 53.0],
                           "x_end": [23.0, 23.0], "y_end": [50.0, 53.0]})
    c = trail_footprint_image((100, 100), trails, 4.0)
    assert c.max() == 2 and c[51, 40] == 2 and c[47, 40] == 1 and c[57, 40] == 0 and c[0, 0] == 0
    b = trail_footprint_image((100, 100), trails, 4.0, counts=False)
    assert b.dtype == bool and np.array_equal(b, c > 0)


@pytest.fixture(scope="module")
def field():
    return render_field(n_stars=70, shape=(700, 500), seed=11, mags=np.random.default_rng(11).uniform(15, 21, 70))


def _true_sky_adu(f):
    xm = 0.5 * (f.trails["x_start"] + f.trails["x_end"]).to_numpy()
    g = np.where(xm < f.image.shape[1] // 2, f.gain[0], f.gain[1])
    return f.sky_e / g


def test_local_sky_unbiased_with_honest_errors(field):
    f = field
    # with the gains, an annulus straddling the amplifier boundary is not biased
    sky = local_sky(f.image, f.mask, f.trails, f.geometry, gain=f.gain)
    assert list(sky.columns) == SKY_COLUMNS
    assert (sky["star_id"].to_numpy() == f.trails["star_id"].to_numpy()).all()
    ok = sky["sky_ok"].to_numpy()
    assert ok.mean() > 0.9
    pull = ((sky["sky_e"] - f.sky_e) / sky["sky_err_e"]).to_numpy()[ok]
    # the ADU values are the electron values in the gain of the trail's amplifier
    g_mid = sky["sky_e"] / sky["sky_adu"]
    assert set(np.round(g_mid, 6)) <= {round(f.gain[0], 6), round(f.gain[1], 6)}
    # sky error: median of a clipped Gaussian sample; the pulls scatter ~1 (faint
    # unmasked wings make them a little positive at most)
    assert abs(np.median(pull)) < 0.6
    assert 0.7 < np.std(pull) < 1.4
    # per-pixel noise: the rms is the sky + read noise in ADU
    rn = np.where(g_mid == f.gain[0], f.read_noise_e[0], f.read_noise_e[1])
    expected_rms = np.sqrt(f.sky_e + rn**2) / g_mid
    assert np.median(sky["sky_rms_adu"].to_numpy()[ok] / expected_rms[ok]) == pytest.approx(1.0, abs=0.05)


def test_other_trails_and_flagged_pixels_are_masked():
    geo = make_geometry()
    # star 0 faint, star 1 very bright 14 px away across track: inside star 0's annulus
    pos = np.array([[200.0, 120.0], [200.0, 134.0]])
    f = render_field(positions=pos, mags=[19.0, 13.5], shape=(260, 260), seed=3, geometry=geo,
                     saturation_adu=(1e9, 1e9))
    true = _true_sky_adu(f)[0]
    # without clipping (sigma=50) the masking alone must do the job:
    # neighbour masked (default): unbiased; neighbour not masked: biased high
    good = local_sky(f.image, f.mask, f.trails, geo, sigma=50)
    naive = local_sky(f.image, f.mask, f.trails, geo, mask_radius=0.5, sigma=50)
    err = good["sky_err_adu"].iloc[0]
    assert abs(good["sky_adu"].iloc[0] - true) < 4 * err
    assert naive["sky_adu"].iloc[0] - true > 4 * err
    # flagged pixels are ignored even when absurd
    img = f.image.copy()
    mask = f.mask.copy()
    img[100:140, 150:260] = 1e6
    mask[100:140, 150:260] = 1
    masked = local_sky(img, mask, f.trails, geo, sigma=50)
    assert abs(masked["sky_adu"].iloc[0] - true) < 5 * masked["sky_err_adu"].iloc[0]
    assert masked["n_sky_pixels"].iloc[0] < good["n_sky_pixels"].iloc[0]
    # the flagged pixels given by their flat indices: the same table (with and without a choice of bits)
    mask[30:33, :] = 256
    for bits in (None, 0xFF):
        ref = local_sky(img, mask, f.trails, geo, sigma=50, bad_bits=bits)
        via = local_sky(img, mask, f.trails, geo, sigma=50, bad_bits=bits, mask_index=np.flatnonzero(mask))
        pd.testing.assert_frame_equal(via, ref)


def test_verbose_save_and_filename(field):
    f = field
    sky, ann = local_sky(f.image, f.mask, f.trails.iloc[:5], f.geometry, radius=7, pad=5, verbose_save=True)
    ox, oy = ann["offsets"]
    assert ann["values"].shape == (5, len(ox))
    assert np.array_equal(np.isfinite(ann["values"]).sum(axis=1) >= sky["n_sky_pixels"], np.ones(5, bool))
    assert sky_table_filename(1000001) == "driftskysub-exp_1000001.csv"


def test_bad_bits_select_which_mask_bits_count(field):
    f = field
    mask = f.mask.astype(np.uint16).copy()
    mask[:, :] |= 256  # e.g. PixelFlag.INTERPOLATED everywhere: not bad by choice
    assert not local_sky(f.image, mask, f.trails.iloc[:5], f.geometry)["sky_ok"].any()
    ok = local_sky(f.image, mask, f.trails.iloc[:5], f.geometry, bad_bits=0xFF)
    ref = local_sky(f.image, f.mask, f.trails.iloc[:5], f.geometry)
    np.testing.assert_allclose(ok["sky_adu"], ref["sky_adu"])


def test_few_sky_pixels_are_logged_not_warned(field, caplog):
    """A data condition (annuli without enough sky) is a log record, not a Python warning."""
    import logging
    import warnings

    f = field
    mask = np.ones(f.image.shape, dtype=np.int32)  # everything flagged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING, logger="pydriftn.sky"):
            sky = local_sky(f.image, mask, f.trails.iloc[:4], f.geometry, gain=f.gain)
    assert not sky["sky_ok"].any() and sky["n_sky_pixels"].eq(0).all() and sky["sky_adu"].isna().all()
    assert any("fewer than 20 usable sky pixels" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- compiled kernels vs numpy
def _row_search_numpy(v, thr, n, side):
    """The vectorised per-row binary search that :func:`pydriftn.extract._kernels.clip_rows` replaced."""
    n_rows, m = v.shape
    thr = np.asarray(thr, dtype=v.dtype)
    hi = np.array(np.broadcast_to(n, np.broadcast_shapes(np.shape(n), thr.shape)), dtype=np.intp)
    thr = np.broadcast_to(thr, hi.shape)
    lo = np.zeros_like(hi)
    flat = v.reshape(-1)
    base = np.arange(n_rows, dtype=np.intp) * m
    for _ in range(max(int(m).bit_length(), 1)):
        mid = (lo + hi) >> 1
        val = flat[base + np.minimum(mid, m - 1)]
        right = (val < thr) if side == "left" else (val <= thr)
        right &= lo < hi
        lo = np.where(right, mid + 1, lo)
        hi = np.where(right | (lo >= hi), hi, mid)
    return lo


def _clipped_stats_rows_numpy(values, sigma=3.0, maxiters=10):
    """The numpy clipping of sorted rows that the compiled kernel replaced (same arithmetic)."""
    v = np.sort(np.asarray(values, dtype=np.float32), axis=1)
    n_rows, m = v.shape
    rows = np.arange(n_rows)
    nfin = _row_search_numpy(v, np.float32(np.inf), np.full(n_rows, m), "right")
    if np.isinf(v[rows, 0]).any() or np.isinf(v[rows, np.maximum(nfin - 1, 0)]).any():
        v = np.where(np.isinf(v), np.float32(np.nan), v)
        v.sort(axis=1)
        nfin = _row_search_numpy(v, np.float32(np.inf), np.full(n_rows, m), "right")
    mid = v[rows, np.clip((nfin - 1) // 2, 0, m - 1)]
    mid = np.where(nfin > 0, mid, 0.0).astype(np.float32)
    c1 = np.cumsum(np.subtract(v.T, mid[None, :]), axis=0, dtype=np.float32)
    c2 = np.cumsum(np.square(np.subtract(v.T, mid[None, :])), axis=0, dtype=np.float32)
    lo = np.zeros(n_rows, dtype=np.intp)
    hi = nfin.astype(np.intp)

    def csum(c, i):
        return np.where(i > 0, c[np.maximum(i - 1, 0), rows].astype(np.float64), 0.0)

    def stats(lo, hi):
        cnt = hi - lo
        safe = cnt > 0
        i1 = np.clip(lo + (cnt - 1) // 2, 0, m - 1)
        i2 = np.clip(lo + cnt // 2, 0, m - 1)
        med = 0.5 * (v[rows, i1].astype(np.float64) + v[rows, i2])
        s1 = csum(c1, hi) - csum(c1, lo)
        s2 = csum(c2, hi) - csum(c2, lo)
        cn = np.where(safe, cnt, 1)
        var = np.maximum(s2 / cn - (s1 / cn) ** 2, 0.0)
        return np.where(safe, med, np.nan), np.where(safe, np.sqrt(var), np.nan), cnt

    med, std, cnt = stats(lo, hi)
    for _ in range(int(maxiters)):
        new_lo = _row_search_numpy(v, (med - sigma * std).astype(np.float32), nfin, "left")
        new_hi = _row_search_numpy(v, (med + sigma * std).astype(np.float32), nfin, "right")
        bad = ~np.isfinite(med) | (new_hi <= new_lo)
        new_lo = np.where(bad, lo, new_lo)
        new_hi = np.where(bad, hi, new_hi)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
        med, std, cnt = stats(lo, hi)
    return med, std, cnt


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_rows_kernel_is_the_numpy_clipping(seed):
    """The compiled clipping gives bit for bit the statistics of the numpy version it replaced."""
    rng = np.random.default_rng(seed)
    v = rng.normal(300.0, 5.0, (64, 250)).astype(np.float32)
    v[:, :30] += rng.exponential(60.0, (64, 30)).astype(np.float32)  # one-sided contamination
    v[rng.random(v.shape) < 0.2] = np.nan
    v[5] = np.nan  # empty row
    v[6, 1:] = np.nan  # one value
    v[7, :] = 42.0  # constant row (std 0)
    v[8, 3] = np.inf  # infinities count as missing
    v[9, 4] = -np.inf
    for sigma, maxiters in ((3.0, 10), (2.0, 1), (1.5, 0)):
        got = clipped_stats_rows(v, sigma=sigma, maxiters=maxiters)
        ref = _clipped_stats_rows_numpy(v, sigma=sigma, maxiters=maxiters)
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)
    assert np.isnan(got[0][5]) and got[2][5] == 0 and got[2][6] == 1 and got[1][7] == 0.0
    # no rows, no columns
    assert clipped_stats_rows(np.zeros((0, 5)))[0].shape == (0,)
    assert np.isnan(clipped_stats_rows(np.zeros((3, 0)))[0]).all()


def _annulus_values_numpy(img, mask, bad_bits, covered, cx, cy, ox, oy, g_col):
    """The numpy gather of the annulus pixels that the compiled kernel replaced."""
    ny, nx = img.shape
    n = len(cx)
    cxc = np.clip(cx, -(10 * nx), 11 * nx)
    cyc = np.clip(cy, -(10 * ny), 11 * ny)
    X = cxc[:, None] + ox[None, :]
    Y = cyc[:, None] + oy[None, :]
    inside = (X >= 0) & (X < nx) & (Y >= 0) & (Y < ny)
    idx = np.clip(Y, 0, ny - 1) * nx + np.clip(X, 0, nx - 1)
    flat = img.reshape(-1)
    vals = np.take(flat, idx)
    if g_col is not None:
        xmin = np.clip(cx + ox.min(), 0, nx - 1)
        xmax = np.clip(cx + ox.max(), 0, nx - 1)
        straddle = g_col[xmin] != g_col[xmax]
        vals *= g_col[np.clip(cx, 0, nx - 1)][:, None].astype(vals.dtype)
        sidx = np.flatnonzero(straddle)
        vals[sidx] = flat[idx[sidx]] * g_col[idx[sidx] % nx]
    unusable = covered.copy()
    if mask is not None:
        unusable |= (mask != 0) if bad_bits is None else ((mask & bad_bits) != 0)
    good = ~np.take(unusable.reshape(-1), idx) & inside & np.isfinite(vals)
    np.copyto(vals, np.nan, where=~good)
    return vals, good.sum(axis=1), inside.sum(axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_annulus_values_kernel_is_the_numpy_gather(dtype):
    """Annulus pixels (edges, far-off trails, masked, non-finite, gain boundary) as the numpy gather gave them."""
    from pydriftn.extract._kernels import annulus_values
    from pydriftn.sky import _covered_buffer

    rng = np.random.default_rng(4)
    ny, nx = 90, 120
    img = rng.normal(100.0, 3.0, (ny, nx)).astype(dtype)
    img[rng.random(img.shape) < 0.01] = np.nan
    img[3, 7] = np.inf
    mask = (rng.random(img.shape) < 0.03).astype(np.uint16) * rng.choice([1, 256], img.shape).astype(np.uint16)
    ox, oy = stadium_offsets((0.96, 0.28), 9.0, 4.0, 7.0)
    fox, foy = stadium_offsets((0.96, 0.28), 9.0, 0.0, 4.0)
    # interior trails, trails over every edge, one straddling the gain boundary, far off the image
    cx = np.concatenate([rng.integers(-8, nx + 8, 40), [nx // 2, -10**7, 5 * nx]]).astype(np.int64)
    cy = np.concatenate([rng.integers(-8, ny + 8, 40), [ny // 2, 3, -10**6]]).astype(np.int64)
    buf, bx, by = _covered_buffer((ny, nx), cx, cy, fox, foy)
    covered = buf[by : by + ny, bx : bx + nx]
    g_col = np.where(np.arange(nx) < nx // 2, 4.07, 3.96).astype(np.float32)
    for g, m, bits in ((g_col, mask, None), (None, mask, 0xFF), (g_col, None, None)):
        ref = _annulus_values_numpy(img, m, bits, covered, cx, cy, ox, oy, g)
        got = annulus_values(img.reshape(-1), buf.reshape(-1), buf.shape[1], bx, by,
                             mask.reshape(-1) if m is not None else np.zeros(1, np.uint8), m is not None,
                             -1 if bits is None else bits, cx, cy, ox, oy,
                             g if g is not None else np.ones(nx, np.float32), g is not None)
        assert got[0].dtype == ref[0].dtype
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[2], ref[2])
    assert (ref[2] < len(ox)).any() and (ref[2] == 0).any()  # the edge cases were there
    # no trails
    assert annulus_values(img.reshape(-1), buf.reshape(-1), buf.shape[1], bx, by, np.zeros(1, np.uint8), False, -1,
                          cx[:0], cy[:0], ox, oy, g_col, True)[0].shape == (0, len(ox))
