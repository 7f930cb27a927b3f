"""Tests of pydriftn.io: reading real DECam CP cutouts and synthetic MEFs, errors, masks, writers."""

import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.time import Time

from pydriftn import io as pio
from pydriftn.errors import (
    EmptyDataError,
    FileMissingError,
    HeaderError,
    MaskError,
    MissingExtensionError,
    NotFITSError,
    TruncatedFileError,
    WCSError,
)
from pydriftn.flags import PixelFlag

G_IMAGE = "c4d_181104_072440_ooi_g_ls9.S4.fits"
G_MASK = "c4d_181104_072440_ood_g_ls9.S4.fits"
R_IMAGE = "c4d_171113_061941_ooi_r_ls9.S4.fits"
R_MASK = "c4d_171113_061941_ood_r_ls9.S4.fits"


# --------------------------------------------------------------------------- fixtures
def _cutouts_path() -> Path:
    env = os.environ.get("PYDRIFTN_SHARED_DIR")
    shared = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    return shared / "data" / "decam-cp-cutouts"


@pytest.fixture(scope="module")
def cutouts():
    d = _cutouts_path()
    if not (d / G_IMAGE).is_file():
        pytest.skip(f"real DECam CP cutouts not found in {d} (shared/ absent; set PYDRIFTN_SHARED_DIR)")
    return d


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tan_cards(nx, ny, scale_arcsec=0.27, ra=150.0, dec=2.0):
    """DECam-like TAN WCS (CD1_2 = +s, CD2_1 = -s) centred on the image."""
    s = scale_arcsec / 3600.0
    return {
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": ra, "CRVAL2": dec,
        "CRPIX1": (nx + 1) / 2.0, "CRPIX2": (ny + 1) / 2.0,
        "CD1_1": 0.0, "CD1_2": s, "CD2_1": -s, "CD2_2": 0.0,
    }


PRIMARY_CARDS = {
    "EXPTIME": 20.0, "DATE-OBS": "2021-09-01T03:00:00.000", "MJD-OBS": Time("2021-09-01T03:00:00").mjd,
    "EXPNUM": 1000001, "FILTER": "VR DECam c0007 6300.0 2600.0", "PIXSCAL1": 0.27, "PIXSCAL2": 0.27,
    "PLVER": "V5.0", "INSTRUME": "DECam",
}
EXT_CARDS = {"GAINA": 4.1, "GAINB": 3.9, "RDNOISEA": 6.5, "RDNOISEB": 7.5, "SATURATA": 41000.0,
             "SATURATB": 39000.0, "FWHM": 4.2, "AVSKY": 120.0, "CCDNUM": 28}


def make_mef(path, exts, *, primary=None, ext_cards=None, wcs=True, compressed=False, quantize_level=16):
    """Write a MEF with one image extension per (name, array) in ``exts``."""
    primary = PRIMARY_CARDS if primary is None else primary
    ext_cards = EXT_CARDS if ext_cards is None else ext_cards
    ph = fits.PrimaryHDU()
    for k, v in primary.items():
        ph.header[k] = v
    hdus = [ph]
    for name, arr in exts:
        h = fits.Header()
        h["EXTNAME"] = name
        h["DETPOS"] = name
        for k, v in ext_cards.items():
            h[k] = v
        if wcs and arr is not None and np.ndim(arr) == 2:
            for k, v in tan_cards(arr.shape[1], arr.shape[0]).items():
                h[k] = v
        if compressed and arr is not None:
            kw = {"quantize_level": quantize_level} if np.asarray(arr).dtype.kind == "f" else {}
            hdus.append(fits.CompImageHDU(arr, header=h, **kw))
        else:
            hdus.append(fits.ImageHDU(arr, header=h))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Path(path)


def synthetic_image(shape=(64, 80), seed=1, sky=120.0, star=(40.3, 30.7, 5000.0)):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    x0, y0, amp = star
    img = sky + amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.8 ** 2))
    return (img + rng.normal(0, np.sqrt(img / 4.0))).astype(np.float32)


# --------------------------------------------------------------------------- real cutouts
@pytest.mark.parametrize("image, mask, band, exptime_key", [(G_IMAGE, G_MASK, "g", 140.0),
                                                              (R_IMAGE, R_MASK, "r", 88.0)])
def test_real_cutout_headerinfo(cutouts, image, mask, band, exptime_key):
    path = cutouts / image
    assert pio.list_ccds(path) == ["S4"]
    im = pio.read_ccd(path, "S4", mask=True)
    hi = im.info
    raw = fits.getheader(path, "S4")
    prim = fits.getheader(path, 0)
    assert im.data.dtype == np.float32 and im.data.dtype.isnative
    assert im.shape == (raw["NAXIS2"], raw["NAXIS1"]) == (100, 101)
    np.testing.assert_array_equal(im.data, fits.getdata(path, "S4").astype(np.float32))
    assert hi.gain == (raw["GAINA"], raw["GAINB"])
    assert hi.read_noise == (raw["RDNOISEA"], raw["RDNOISEB"])
    assert hi.saturation == (raw["SATURATA"], raw["SATURATB"])
    assert hi.pixel_scale == pytest.approx(0.27) and hi.pixel_scale_source == "PIXSCAL"
    assert hi.exptime == exptime_key == prim["EXPTIME"]
    assert hi.mjd == prim["MJD-OBS"]
    assert abs(hi.date_obs.mjd - hi.mjd) * 86400 < 1e-3  # DATE-OBS agrees with MJD-OBS (< 1 ms)
    assert hi.band == band and hi.filter.startswith(band + " DECam")
    assert hi.expnum == prim["EXPNUM"]
    assert hi.fwhm_px == raw["FWHM"] and hi.avsky == raw["AVSKY"]
    assert hi.defaults_used == ()
    # inherited primary cards are in the merged header, extension cards win
    assert im.header["EXPTIME"] == prim["EXPTIME"] and im.header["EXTNAME"] == "S4"
    assert im.header["DATE"] == raw["DATE"] != prim["DATE"]
    assert im.mask_path == str(cutouts / mask)


def test_real_cutout_known_values_g(cutouts):
    hi = pio.read_ccd(cutouts / G_IMAGE, "S4").info
    assert hi.gain[0] == pytest.approx(4.05, abs=0.01)
    assert hi.saturation[0] == pytest.approx(43991, abs=1)
    assert hi.pixel_scale == 0.27
    assert hi.exptime == 140.0
    assert hi.mjd == pytest.approx(58426.30880066, abs=1e-9)
    assert hi.band == "g"
    # per-column amplifier map: amp A is x < NAXIS1/2 (101 columns -> 0..50 are A)
    col = hi.amp_map("gain", kind="column")
    assert col.shape == (101,)
    assert np.all(col[:51] == np.float32(hi.gain[0])) and np.all(col[51:] == np.float32(hi.gain[1]))
    assert hi.amp_map("saturation").shape == (100, 101)


@pytest.mark.parametrize("image, mask", [(G_IMAGE, G_MASK), (R_IMAGE, R_MASK)])
def test_real_mask_found_and_decoded(cutouts, image, mask):
    img = cutouts / image
    assert pio.find_mask(img) == cutouts / mask  # ooi -> ood
    raw = fits.getdata(cutouts / mask, "S4")
    im = pio.read_ccd(img, "S4", mask=True)
    m = im.mask
    assert m.dtype == np.uint16 and m.shape == im.shape
    conv, reason = pio.detect_dq_convention(raw, fits.getheader(cutouts / mask, 0))
    assert conv == "codes" and "PLVER" in reason
    present = set(np.unique(raw).tolist())
    assert {3, 4} <= present <= {0, 1, 3, 4}
    # each CP code decodes to exactly its flag
    expected = {0: 0, 1: PixelFlag.BAD_PIXEL, 3: PixelFlag.SATURATED, 4: PixelFlag.BLEED}
    for code in present:
        assert np.all(m[raw == code] == int(expected[code])), code
    # the saturated star: brightest pixel and every pixel above its amp's SATURATx is SATURATED
    j, i = np.unravel_index(np.argmax(im.data), im.shape)
    assert im.data[j, i] > max(im.info.saturation)
    assert m[j, i] & PixelFlag.SATURATED
    over = im.data >= im.info.amp_map("saturation")
    assert over.sum() > 100
    assert np.all(m[over] & PixelFlag.SATURATED)
    assert np.all(im.bad_pixels()[over])
    np.testing.assert_array_equal(im.bad_pixels(flags="BAD_PIXEL"), raw == 1)
    np.testing.assert_array_equal(im.bad_pixels(flags="SATURATED|BLEED"), (raw == 3) | (raw == 4))


def test_real_mask_code_1_is_bad_pixel(cutouts):
    raw = fits.getdata(cutouts / G_MASK, "S4")
    assert (raw == 1).any()
    m = pio.read_mask(cutouts / G_MASK, "S4", shape=raw.shape)
    assert np.all(m[raw == 1] == PixelFlag.BAD_PIXEL)


def _halo_centroid(data, raw_mask):
    """Flux-weighted centroid of the unmasked halo (>20 sigma) of the saturated star; no WCS used."""
    good = raw_mask == 0
    sky = np.median(data[good])
    sig = 1.4826 * np.median(np.abs(data[good] - sky))
    w = np.where(good & (data - sky > 20 * sig), data - sky, 0.0)
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()


def _gaia(cutouts):
    t = vstack([Table.read(p) for p in sorted(cutouts.glob("chunk-*.fits"))])
    return t[["source_id", "ra", "dec", "phot_g_mean_mag"]].to_pandas()


def _sep_arcsec(ra1, dec1, ra2, dec2):
    from astropy.coordinates import SkyCoord

    return SkyCoord(ra1, dec1, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).arcsec


def test_real_tpv_wcs_matches_gaia(cutouts):
    im = pio.read_ccd(cutouts / G_IMAGE, "S4")
    assert "TPV" in im.header["CTYPE1"]
    x, y = _halo_centroid(im.data, fits.getdata(cutouts / G_MASK, "S4"))
    ra, dec = im.wcs.pixel_to_world_values(x, y)
    gaia = _gaia(cutouts)
    bright = gaia[gaia.phot_g_mean_mag < 12]
    sep = _sep_arcsec(ra, dec, bright.ra.to_numpy(), bright.dec.to_numpy())
    k = int(np.argmin(sep))
    assert bright.phot_g_mean_mag.iloc[k] == pytest.approx(10.5, abs=0.1)
    assert sep[k] < 2.5  # saturated star: the halo centroid is rough
    # the TPV distortion matters here: the same WCS without PV terms is further off
    hdr = im.header.copy()
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    for key in [k for k in hdr if re.match(r"PV\d_\d+$", k)]:
        del hdr[key]
    tan = pio.wcs_from_header(hdr)
    ra_t, dec_t = tan.pixel_to_world_values(x, y)
    sep_tan = _sep_arcsec(ra_t, dec_t, bright.ra.iloc[k], bright.dec.iloc[k])
    assert sep_tan > sep[k] + 1.0
    # and the WCS pixel scale (distortion included) is the DECam one
    from pydriftn.io.headers import _wcs_pixel_scale

    assert 0.25 < _wcs_pixel_scale(im.wcs, im.shape) < 0.28


def test_real_input_never_modified(cutouts, tmp_path):
    before = {p.name: _sha(p) for p in (cutouts / G_IMAGE, cutouts / G_MASK)}
    pio.read_ccd(cutouts / G_IMAGE, "S4", mask=True)
    pio.describe(cutouts / G_IMAGE)
    after = {p.name: _sha(p) for p in (cutouts / G_IMAGE, cutouts / G_MASK)}
    assert before == after


def test_describe_real(cutouts):
    df = pio.describe(cutouts / G_IMAGE)
    assert list(df.columns) == ["hdu", "extname", "shape", "compressed", "has_wcs", "exptime", "mjd",
                                "band", "expnum"]
    row = df.iloc[0]
    assert len(df) == 1 and row.extname == "S4" and row["shape"] == (100, 101)
    assert bool(row.has_wcs) and not bool(row.compressed)
    assert row.exptime == 140.0 and row.mjd == pytest.approx(58426.30880066) and row.band == "g"


# --------------------------------------------------------------------------- compressed
def _fz_from(src_path, dst_path, quantize_level=16):
    """Tile-compress every image extension of ``src_path`` (lossy float, lossless int)."""
    with fits.open(src_path) as h:
        out = [fits.PrimaryHDU(header=h[0].header)]
        for hdu in h[1:]:
            kw = {"quantize_level": quantize_level} if hdu.data.dtype.kind == "f" else {}
            out.append(fits.CompImageHDU(hdu.data, header=hdu.header, **kw))
        fits.HDUList(out).writeto(dst_path, overwrite=True)
    return Path(dst_path)


def _row_scales(fz_path, ext):
    """ZSCALE of each compression tile (one tile = one image row here)."""
    with fits.open(fz_path, disable_image_compression=True) as h:
        hdu = h[ext]
        assert hdu.header["ZTILE2"] == 1
        return np.array(hdu.data["ZSCALE"], dtype=float)


def _assert_within_quantisation(a, b, scales):
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert np.all(diff <= scales[:, None] + 1e-6 * np.abs(b)), float(diff.max())
    assert diff.max() > 0  # really lossy: the comparison is not trivial


def test_fz_real_cutout_same_pixels(cutouts, tmp_path):
    fz = _fz_from(cutouts / G_IMAGE, tmp_path / G_IMAGE.replace(".fits", ".fits.fz"))
    fz_mask = _fz_from(cutouts / G_MASK, tmp_path / G_MASK.replace(".fits", ".fits.fz"))
    assert pio.list_ccds(fz) == ["S4"]
    a = pio.read_ccd(cutouts / G_IMAGE, "S4")
    b = pio.read_ccd(fz, "S4", mask=True)
    assert b.mask_path == str(fz_mask)  # ooi -> ood with the .fits.fz suffix
    assert b.data.dtype == np.float32 and b.shape == a.shape
    _assert_within_quantisation(b.data, a.data, _row_scales(fz, "S4"))
    # integer mask compression is lossless
    np.testing.assert_array_equal(b.mask, pio.read_mask(cutouts / G_MASK, "S4"))
    assert b.info.gain == a.info.gain and b.info.mjd == a.info.mjd and b.info.band == "g"
    np.testing.assert_allclose(b.wcs.pixel_to_world_values(10.0, 20.0), a.wcs.pixel_to_world_values(10.0, 20.0))
    assert bool(pio.describe(fz).compressed.iloc[0])


def test_fz_synthetic_same_pixels(tmp_path):
    imgs = [("S4", synthetic_image(seed=1)), ("N4", synthetic_image(seed=2))]
    plain = make_mef(tmp_path / "c4d_x-exp_1000001-image.fits", imgs)
    fz = make_mef(tmp_path / "c4d_x-exp_1000001-image.fits.fz", imgs, compressed=True, quantize_level=8)
    assert pio.list_ccds(fz) == pio.list_ccds(plain) == ["S4", "N4"]
    for name, arr in imgs:
        a = pio.read_ccd(plain, name)
        b = pio.read_ccd(fz, name)
        np.testing.assert_array_equal(a.data, arr)
        _assert_within_quantisation(b.data, arr, _row_scales(fz, name))
        assert a.info.as_dict() | {"path": None} == b.info.as_dict() | {"path": None}


def test_find_mask_variants(tmp_path):
    img = synthetic_image()
    codes = np.zeros(img.shape, np.int32)
    im = make_mef(tmp_path / "night1-image.fits.fz", [("S4", img)], compressed=True)
    assert pio.find_mask(im) is None
    mk = make_mef(tmp_path / "night1-dqmask.fits", [("S4", codes)], wcs=False)
    assert pio.find_mask(im) == mk  # .fits.fz image, plain .fits mask
    # keyword: only the last occurrence is replaced
    im2 = make_mef(tmp_path / "image_set-image.fits", [("S4", img)])
    mk2 = make_mef(tmp_path / "image_set-dqmask.fits", [("S4", codes)], wcs=False)
    assert pio.find_mask(im2) == mk2
    # custom keywords; never the image itself
    im3 = make_mef(tmp_path / "a_sci.fits", [("S4", img)])
    assert pio.find_mask(im3, img_keyword="sci", mask_keyword="bpm") is None
    mk3 = make_mef(tmp_path / "a_bpm.fits", [("S4", codes)], wcs=False)
    assert pio.find_mask(im3, img_keyword="sci", mask_keyword="bpm") == mk3
    assert pio.find_mask(im3, img_keyword="sci", mask_keyword="sci") is None


# --------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    p = tmp_path / "nope-image.fits"
    with pytest.raises(FileMissingError, match="nope-image.fits"):
        pio.read_ccd(p, "S4")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        pio.list_ccds(p)


def test_text_file_named_fits(tmp_path):
    p = tmp_path / "notes-image.fits"
    p.write_text("this is not FITS\n" * 200)
    with pytest.raises(NotFITSError, match=r"notes-image\.fits.*not a FITS file"):
        pio.read_ccd(p, "S4")
    with pytest.raises(NotFITSError):
        pio.list_ccds(p)


@pytest.mark.parametrize("cut, where", [(40000, r"\[S4\].*truncated"),  # inside the S4 data
                                        (20000, r"header of HDU #1"),  # inside the S4 header
                                        (5000, r"truncated"),  # inside the primary header
                                        (0, r"empty")])
def test_truncated_real_file(cutouts, tmp_path, cut, where):
    p = tmp_path / G_IMAGE
    p.write_bytes((cutouts / G_IMAGE).read_bytes()[:cut])
    with pytest.raises(TruncatedFileError, match=re.escape(str(p)) + ".*" + where):
        pio.read_ccd(p, "S4")
    with pytest.raises(TruncatedFileError):
        pio.list_ccds(p)


def test_missing_padding_only_is_readable(cutouts, tmp_path, caplog):
    src = (cutouts / G_IMAGE).read_bytes()
    p = tmp_path / G_IMAGE
    p.write_bytes(src[: len(src) - 1000])  # data complete (ends at 69200), padding cut
    with caplog.at_level(logging.WARNING, logger="pydriftn.io"):
        im = pio.read_ccd(p, "S4")
    np.testing.assert_array_equal(im.data, pio.read_ccd(cutouts / G_IMAGE, "S4").data)
    assert "padding" in caplog.text


def test_missing_extension_lists_present(cutouts, tmp_path):
    with pytest.raises(MissingExtensionError, match=r"ooi_g_ls9\.S4\.fits\[N4\].*present: S4"):
        pio.read_ccd(cutouts / G_IMAGE, "N4")
    p = make_mef(tmp_path / "x-image.fits", [("S4", synthetic_image()), ("N4", synthetic_image())])
    with pytest.raises(MissingExtensionError, match=r"x-image\.fits\[S5\].*S4, N4") as ei:
        pio.read_ccd(p, "S5")
    assert ei.value.extension == "S5" and ei.value.path == str(p)
    assert isinstance(ei.value, KeyError)
    with pytest.raises(MissingExtensionError, match=r"index 7"):
        pio.read_ccd(p, 7)
    assert pio.read_ccd(p, 2).extname == "N4"


def test_header_without_wcs(tmp_path):
    p = make_mef(tmp_path / "nowcs-image.fits", [("S4", synthetic_image())], wcs=False)
    with pytest.raises(WCSError, match=r"nowcs-image\.fits\[S4\].*CTYPE1"):
        pio.read_ccd(p, "S4")
    im = pio.read_ccd(p, "S4", require_wcs=False)
    assert im.wcs is None and im.info.pixel_scale == 0.27
    assert not pio.describe(p).has_wcs.iloc[0]


def test_unusable_wcs(tmp_path):
    img = synthetic_image()
    p = make_mef(tmp_path / "badwcs-image.fits", [("S4", img)])
    with fits.open(p, mode="update") as h:
        for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            h["S4"].header[k] = 0.0  # singular matrix
    with pytest.raises(WCSError, match=r"badwcs-image\.fits\[S4\]"):
        pio.read_ccd(p, "S4")


def test_all_nan_and_empty_extension(tmp_path):
    nan = np.full((30, 40), np.nan, np.float32)
    p = make_mef(tmp_path / "nan-image.fits", [("S4", synthetic_image()), ("N4", nan)])
    with pytest.raises(EmptyDataError, match=r"nan-image\.fits\[N4\].*NaN"):
        pio.read_ccd(p, "N4")
    assert pio.read_ccd(p, "S4").data.shape == (64, 80)
    # a named extension without pixels
    h = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(name="S4")])
    q = tmp_path / "empty-image.fits"
    h.writeto(q)
    assert pio.list_ccds(q) == []
    with pytest.raises(EmptyDataError, match=r"empty-image\.fits\[S4\].*no pixels"):
        pio.read_ccd(q, "S4")


def test_mask_shape_mismatch_names_both_files(tmp_path):
    img = make_mef(tmp_path / "n-image.fits", [("S4", synthetic_image((64, 80)))])
    make_mef(tmp_path / "n-dqmask.fits", [("S4", np.zeros((64, 79), np.int32))], wcs=False)
    with pytest.raises(MaskError, match=r"n-dqmask\.fits\[S4\].*\(64, 79\).*n-image\.fits.*\(64, 80\)"):
        pio.read_ccd(img, "S4", mask=True)
    with pytest.raises(MaskError, match=r"no dq mask"):
        pio.read_ccd(make_mef(tmp_path / "m-image.fits", [("S4", synthetic_image())]), "S4", mask=True)


def test_timing_required_for_drift_images(tmp_path, caplog):
    prim = {k: v for k, v in PRIMARY_CARDS.items() if k != "EXPTIME"}
    p = make_mef(tmp_path / "noexp-image.fits", [("S4", synthetic_image())], primary=prim)
    with pytest.raises(HeaderError, match=r"noexp-image\.fits\[S4\].*EXPTIME"):
        pio.read_ccd(p, "S4", require_timing=True)
    with caplog.at_level(logging.WARNING):
        assert pio.read_ccd(p, "S4").info.exptime is None
    assert "EXPTIME" in caplog.text
    prim = {k: v for k, v in PRIMARY_CARDS.items() if k not in ("DATE-OBS", "MJD-OBS")}
    q = make_mef(tmp_path / "notime-image.fits", [("S4", synthetic_image())], primary=prim)
    with pytest.raises(HeaderError, match=r"notime-image\.fits\[S4\].*DATE-OBS.*MJD-OBS"):
        pio.read_ccd(q, "S4", require_timing=True)
    with pytest.raises(HeaderError):
        pio.read_ccd(q, "S4").info.require_timing()


# --------------------------------------------------------------------------- headers
def test_missing_key_fallback_warns(tmp_path, caplog):
    cards = {k: v for k, v in EXT_CARDS.items() if k not in ("GAINA", "GAINB", "SATURATB")}
    p = make_mef(tmp_path / "nogain-image.fits", [("S4", synthetic_image())], ext_cards=cards)
    with caplog.at_level(logging.WARNING, logger="pydriftn.io"):
        hi = pio.read_ccd(p, "S4").info
    assert hi.gain == (4.0, 4.0)  # documented DECam default
    assert hi.saturation == (41000.0, 40000.0)
    assert "gain" in hi.defaults_used and "saturation" in hi.defaults_used
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in ("GAINA", "GAINB", "SATURATB"):
        assert any(str(p) in m and "[S4]" in m and key in m for m in msgs), key
    # GAIN (one value for the CCD) is used before the default
    cards["GAIN"] = 3.5
    q = make_mef(tmp_path / "gain-image.fits", [("S4", synthetic_image())], ext_cards=cards)
    assert pio.read_ccd(q, "S4").info.gain == (3.5, 3.5)


def test_pixel_scale_from_wcs_then_default(tmp_path, caplog):
    prim = {k: v for k, v in PRIMARY_CARDS.items() if not k.startswith("PIXSCAL")}
    p = make_mef(tmp_path / "nops-image.fits", [("S4", synthetic_image())], primary=prim)
    hi = pio.read_ccd(p, "S4").info
    assert hi.pixel_scale_source == "WCS" and hi.pixel_scale == pytest.approx(0.27, rel=1e-4)
    q = make_mef(tmp_path / "nopsnowcs-image.fits", [("S4", synthetic_image())], primary=prim, wcs=False)
    with caplog.at_level(logging.WARNING, logger="pydriftn.io"):
        hi = pio.read_ccd(q, "S4", require_wcs=False).info
    assert hi.pixel_scale_source == "default" and hi.pixel_scale == 0.27
    assert any("PIXSCAL1" in r.getMessage() and "[S4]" in r.getMessage() for r in caplog.records)


def test_time_derivations_and_band():
    base = fits.Header({"EXPTIME": 20.0, "FILTER": "VR DECam c0007 6300.0 2600.0", "NAXIS1": 10, "NAXIS2": 10})
    t = Time("2021-09-01T03:00:00.250", scale="utc")
    h = base.copy()
    h["DATE-OBS"] = t.isot
    hi = pio.HeaderInfo.from_header(h, path="x.fits", extname="S4")
    assert hi.mjd == pytest.approx(t.mjd, abs=1e-10) and hi.band == "VR"
    h = base.copy()
    h["MJD-OBS"] = t.mjd
    hi = pio.HeaderInfo.from_header(h, path="x.fits", extname="S4")
    assert abs((hi.date_obs - t).sec) < 1e-3
    assert hi.mjd_end == pytest.approx(t.mjd + 20.0 / 86400)
    # old style: date and time in separate keys
    h = base.copy()
    h["DATE-OBS"] = "2021-09-01"
    h["TIME-OBS"] = "03:00:00.250"
    assert pio.HeaderInfo.from_header(h).mjd == pytest.approx(t.mjd, abs=1e-10)
    assert pio.band_from_filter("g DECam SDSS c0001 4720.0 1520.0") == "g"
    assert pio.band_from_filter("r DECam SDSS c0002 6415.0 1480.0") == "r"
    assert pio.band_from_filter("  ") is None


def test_merge_headers_inherit():
    prim = fits.Header({"EXPTIME": 20.0, "OBJECT": "field", "CTYPE1": "RA---TAN", "CRPIX1": 5.0})
    ext = fits.Header({"EXTNAME": "S4", "OBJECT": "own"})
    m = pio.merge_headers(prim, ext)
    assert m["EXPTIME"] == 20.0 and m["OBJECT"] == "own"
    assert "CTYPE1" not in m and "CRPIX1" not in m  # WCS keys are never inherited
    assert "EXPTIME" not in ext  # inputs untouched
    ext["INHERIT"] = False
    assert "EXPTIME" not in pio.merge_headers(prim, ext)


def test_amp_map_convention():
    col = pio.amp_map((1.0, 2.0), (3, 6), kind="column")
    assert col.tolist() == [1, 1, 1, 2, 2, 2]
    col = pio.amp_map((1.0, 2.0), (3, 7), kind="column")  # x < 3.5 is amp A
    assert col.tolist() == [1, 1, 1, 1, 2, 2, 2]
    img = pio.amp_map((1.0, 2.0), (3, 6))
    assert img.shape == (3, 6) and img.dtype == np.float32
    assert np.all(img[:, :3] == 1) and np.all(img[:, 3:] == 2)
    assert np.all(pio.amp_map(5.0, (2, 4)) == 5.0)
    hi = pio.HeaderInfo.from_header(fits.Header({"NAXIS1": 2046, "NAXIS2": 4094, "GAINA": 4.0, "GAINB": 4.2}))
    assert hi.amp_boundary == 1023
    assert hi.amp_of_column([0, 1022, 1023, 2045]).tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------- dq decoding
def test_decode_codes_all_values():
    codes = np.arange(0, 10, dtype=np.int32).reshape(2, 5)
    out = pio.decode_cp_dq(codes, "codes")
    expected = [0, PixelFlag.BAD_PIXEL, PixelFlag.BAD_PIXEL, PixelFlag.SATURATED, PixelFlag.BLEED,
                PixelFlag.COSMIC_RAY, PixelFlag.LOW_WEIGHT, PixelFlag.TRANSIENT, PixelFlag.STREAK,
                PixelFlag.BAD_PIXEL]  # 9: unknown code -> BAD_PIXEL
    assert out.ravel().tolist() == [int(e) for e in expected]


def test_decode_bits_and_auto(caplog):
    dq = np.array([[0, 1, 2, 4], [16, 64, 128, 256], [512, 2048, 2 | 64, 8]], dtype=np.int32)
    with caplog.at_level(logging.WARNING):
        out = pio.decode_cp_dq(dq, "bits")
    P = PixelFlag
    expected = [[0, P.BAD_PIXEL, P.SATURATED, P.INTERPOLATED], [P.COSMIC_RAY, P.BLEED, P.TRANSIENT, P.EDGE],
                [P.EDGE, P.STREAK, P.SATURATED | P.BLEED, P.BAD_PIXEL]]  # 8 is not a CP bit
    assert out.tolist() == [[int(v) for v in row] for row in expected]
    assert "unknown CP dq bit" in caplog.text
    assert pio.detect_dq_convention(dq)[0] == "bits"  # max > 8
    assert pio.detect_dq_convention(np.array([0, 3, 5, 8]))[0] == "codes"
    assert pio.detect_dq_convention(np.array([0, 3]), fits.Header({"PLVER": "V3.4.1"}))[0] == "bits"
    assert pio.detect_dq_convention(np.array([0, 300]), fits.Header({"PLVER": "V4.8.2a"}))[0] == "codes"
    np.testing.assert_array_equal(pio.decode_cp_dq(dq, "auto"), out)
    with pytest.raises(ValueError):
        pio.decode_cp_dq(dq, "nibbles")


def test_bad_pixel_mask_configurable():
    m = np.array([0, int(PixelFlag.TRANSIENT), int(PixelFlag.COSMIC_RAY), int(PixelFlag.EDGE)], np.uint16)
    assert pio.bad_pixel_mask(m).tolist() == [False, False, True, False]
    assert pio.bad_pixel_mask(m, "TRANSIENT|EDGE").tolist() == [False, True, False, True]
    assert pio.bad_pixel_mask(m, int(PixelFlag.COSMIC_RAY)).tolist() == [False, False, True, False]


def test_simulator_style_mask_via_read_ccd(tmp_path):
    img = synthetic_image()
    codes = np.zeros(img.shape, np.int32)
    codes[5, :] = 1
    codes[10, 10] = 5
    codes[20:22, 30] = 3
    codes[40, 40:50] = 8
    p = make_mef(tmp_path / "e-image.fits", [("S4", img)])
    make_mef(tmp_path / "e-dqmask.fits", [("S4", codes)], wcs=False)
    im = pio.read_ccd(p, "S4", mask=True)
    assert np.all(im.mask[5] == PixelFlag.BAD_PIXEL)
    assert im.mask[10, 10] == PixelFlag.COSMIC_RAY
    assert np.all(im.mask[20:22, 30] == PixelFlag.SATURATED)
    assert np.all(im.mask[40, 40:50] == PixelFlag.STREAK)
    assert im.bad_pixels().sum() == (codes != 0).sum()
    # the flagged pixels' flat indices found while decoding: those of the decoded mask
    np.testing.assert_array_equal(im.mask_index, np.flatnonzero(im.mask))
    out, index = pio.decode_cp_dq(codes, "codes", return_index=True)
    np.testing.assert_array_equal(out, im.mask)
    np.testing.assert_array_equal(index, np.flatnonzero(out))
    assert pio.read_ccd(p, "S4").mask_index is None
    with pytest.raises(ValueError):  # read-only: the index cannot go stale
        im.mask[0, 0] = 1


# --------------------------------------------------------------------------- writers
def _tmp_leftovers(d):
    return [p.name for p in Path(d).iterdir() if p.name.startswith(".") and ".tmp" in p.name]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_write_table_atomic_round_trip(tmp_path, suffix):
    df = pd.DataFrame({"star_id": [1, 2, 3], "flux_e_s": [1.5, np.nan, 3.25], "ccd": ["S4", "N4", "S4"]})
    out = pio.write_table_atomic(df, tmp_path / "sub" / f"t{suffix}")
    back = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, df)
    assert _tmp_leftovers(out.parent) == []
    with pytest.raises(FileExistsError):
        pio.write_table_atomic(df, out, overwrite=False)


def test_write_table_atomic_parquet_dictionary_only_for_non_float_columns(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    n = 5000
    df = pd.DataFrame({"star_id": np.repeat(np.arange(50), 100), "ccd": ["S4"] * n,
                       "flux": rng.normal(100.0, 5.0, n), "level": np.float32(3.5),
                       "flags": np.zeros(n, np.int32), "cat": pd.Categorical(["a", "b"] * (n // 2))})
    out = pio.write_table_atomic(df, tmp_path / "t.parquet")
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, df)  # values and dtypes (categorical too) unchanged
    meta = pq.ParquetFile(out).metadata.row_group(0)
    dict_page = {meta.column(i).path_in_schema: meta.column(i).has_dictionary_page for i in range(meta.num_columns)}
    assert dict_page == {"star_id": True, "ccd": True, "flux": False, "level": False, "flags": True, "cat": True}
    # an explicit choice is passed through
    out2 = pio.write_table_atomic(df, tmp_path / "t2.parquet", use_dictionary=True)
    assert pq.ParquetFile(out2).metadata.row_group(0).column(2).has_dictionary_page
    pd.testing.assert_frame_equal(pd.read_parquet(out2), df)


def test_write_table_atomic_failure_keeps_old_file(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("old\n")

    class Boom(Exception):
        pass

    class BadFrame(pd.DataFrame):
        def to_csv(self, path, **kw):
            Path(path).write_text("partial")
            raise Boom("disk full")

    with pytest.raises(Boom):
        pio.write_table_atomic(BadFrame({"a": [1]}), p)
    assert p.read_text() == "old\n"
    assert _tmp_leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=r"t\.xlsx"):
        pio.write_table_atomic(pd.DataFrame({"a": [1]}), tmp_path / "t.xlsx")


def test_write_fits_and_bytes_atomic(tmp_path):
    arr = synthetic_image()
    out = pio.write_fits_atomic(fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(arr, name="S4")]),
                                tmp_path / "o.fits")
    np.testing.assert_array_equal(fits.getdata(out, "S4"), arr)
    out2 = pio.write_fits_atomic(fits.ImageHDU(arr, name="N4"), tmp_path / "o2.fits")
    assert pio.list_ccds(out2) == ["N4"]
    b = pio.write_bytes_atomic(b"\x00\x01abc", tmp_path / "x.bin")
    assert b.read_bytes() == b"\x00\x01abc"
    pio.write_bytes_atomic(b"new", b)
    assert b.read_bytes() == b"new"
    with pytest.raises(TypeError):
        pio.write_bytes_atomic("text", tmp_path / "y.txt")
    assert _tmp_leftovers(tmp_path) == []
    # permissions follow the umask like a normal open(), not mkstemp's private 0o600
    ref = tmp_path / "ref.bin"
    ref.write_bytes(b"")
    assert os.stat(b).st_mode & 0o777 == os.stat(ref).st_mode & 0o777


# --------------------------------------------------------------------------- gzip, memmap
def test_gzip_fits_and_truncated_gzip(cutouts, tmp_path):
    import gzip

    raw = (cutouts / G_IMAGE).read_bytes()
    gz = tmp_path / G_IMAGE.replace(".fits", ".fits.gz")
    gz.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(pio.read_ccd(gz, "S4").data, pio.read_ccd(cutouts / G_IMAGE, "S4").data)
    cut = tmp_path / "cut.fits.gz"
    cut.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    with pytest.raises(TruncatedFileError, match=r"cut\.fits\.gz"):
        pio.read_ccd(cut, "S4")
    # a gzip stream that is complete but holds a FITS file cut inside the S4 header
    cut2 = tmp_path / "cut2.fits.gz"
    cut2.write_bytes(gzip.compress(raw[:20000]))
    with pytest.raises(TruncatedFileError, match=r"cut2\.fits\.gz"):
        pio.list_ccds(cut2)


def test_plain_fits_is_memory_mapped(cutouts):
    import mmap

    with pio.open_fits(cutouts / G_IMAGE) as hdul:
        base = hdul["S4"].data
        while getattr(base, "base", None) is not None and not isinstance(base, mmap.mmap):
            base = base.base
        assert isinstance(base, mmap.mmap)
    # read_ccd returns a private, native-endian copy that outlives the file handle
    im = pio.read_ccd(cutouts / G_IMAGE, "S4")
    assert im.data.flags.owndata and im.data.dtype.isnative


def test_decode_bits_lut_matches_per_bit_definition(caplog):
    """The vectorised look-up equals the bit-by-bit definition of CP_DQ_BITS on random values."""
    rng = np.random.default_rng(5)
    dq = rng.integers(-3, 1 << 13, 5000).astype(np.int32)
    ref = np.zeros(dq.size, np.uint16)
    known = 0
    for bit, (_, flag) in pio.CP_DQ_BITS.items():
        known |= bit
        ref[(dq >= 0) & ((dq & bit) != 0)] |= int(flag)
    ref[(dq < 0) | ((dq & ~known) != 0)] |= int(PixelFlag.BAD_PIXEL)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(pio.decode_cp_dq(dq, "bits", where="m.fits[S4]"), ref)
    assert "m.fits[S4]" in caplog.text
    # big-endian input (as stored in FITS) decodes identically
    np.testing.assert_array_equal(pio.decode_cp_dq(dq.astype(">i4"), "bits"), ref)


# --------------------------------------------------------------------------- simulated data (slow)
@pytest.mark.slow
def test_simulated_dataset_conventions(tmp_path_factory):
    """Read the simulator's MEFs: names, masks, headers and WCS agree with its truth tables."""
    from astropy.wcs import WCS

    from pydriftn.simulate import simulate_dataset

    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(out, preset="tiny", seed=3)
    cr = pd.read_parquet(out / "truth" / "cosmic_rays.parquet")
    wcs_truth = pd.read_parquet(out / "truth" / "wcs.parquet")
    images = sorted((out / "night_1").glob("*-image.fits*"))
    assert images
    n_cr_checked = 0
    for img in images:
        for ccd in pio.list_ccds(img):
            im = pio.read_ccd(img, ccd, mask=True, require_timing=True)
            assert im.mask_path.endswith(img.name.replace("-image", "-dqmask"))
            hi = im.info
            assert hi.band == "VR" and hi.exptime > 0 and hi.defaults_used == ()
            # cosmic-ray hits of this exposure are flagged COSMIC_RAY in the decoded mask (within 1 px)
            hits = cr[(cr.expnum == hi.expnum) & (cr.ccd == ccd) & (cr.kind == "hit")]
            for x, y in zip(hits.x, hits.y):
                i, j = int(round(x)), int(round(y))
                win = im.mask[max(j - 1, 0): j + 2, max(i - 1, 0): i + 2]
                assert np.any(win & PixelFlag.COSMIC_RAY), (img.name, x, y)
                n_cr_checked += 1
            # header WCS read by pio equals the simulator's header_wcs truth
            row = wcs_truth[(wcs_truth.kind == "drift") & (wcs_truth.expnum == hi.expnum) & (wcs_truth.ccd == ccd)]
            ref = WCS(fits.Header.fromstring(row.header_wcs.iloc[0], sep="\n"))
            xs, ys = np.array([0.0, 100.0, 255.0]), np.array([0.0, 300.0, 511.0])
            np.testing.assert_allclose(im.wcs.pixel_to_world_values(xs, ys), ref.pixel_to_world_values(xs, ys),
                                       atol=1e-9)
    assert n_cr_checked > 0


def test_decode_any_layout_matches_per_pixel_definition():
    """Big-endian (as read from FITS), strided and narrow unsigned masks decode pixel by pixel as defined."""
    rng = np.random.default_rng(5)
    P = PixelFlag

    def code_flag(v):
        return int(pio.CP_DQ_CODES[v]) if 0 <= v <= 8 else int(P.BAD_PIXEL)

    def bits_flag(v):
        f = 0
        for bit, (_, flag) in pio.CP_DQ_BITS.items():
            if v >= 0 and v & bit:
                f |= int(flag)
        if v < 0 or v & ~sum(pio.CP_DQ_BITS):
            f |= int(P.BAD_PIXEL)
        return f

    codes = np.where(rng.random((40, 30)) < 0.9, 0, rng.integers(-2, 11, (40, 30)))
    bits = np.where(rng.random((40, 30)) < 0.9, 0, rng.integers(-3, 5000, (40, 30)))
    for arr, conv, ref in [(codes.astype(">i4"), "codes", code_flag), (codes.astype("<i4")[::2, ::3], "codes", code_flag),
                           (np.abs(codes).astype(np.uint8).T, "codes", code_flag),
                           (bits.astype(">i4"), "bits", bits_flag), (bits.astype(np.int64)[:, ::2], "bits", bits_flag),
                           (np.abs(bits).astype(np.uint16), "bits", bits_flag),
                           (np.abs(bits).astype(np.uint8), "bits", bits_flag)]:
        out = pio.decode_cp_dq(arr, conv)
        assert out.dtype == np.uint16 and out.shape == arr.shape
        assert out.tolist() == [[ref(int(v)) for v in row] for row in arr.tolist()], (arr.dtype, arr.strides, conv)
    assert pio.decode_cp_dq(np.zeros((0, 3), np.int32)).shape == (0, 3)
    assert not pio.decode_cp_dq(np.zeros((4, 4), ">i4")).any()


def test_unflushed_atomic_writes_then_one_flush(tmp_path, monkeypatch):
    """``fsync=False`` writes are still atomic (no partial file, no leftovers); ``fsync_paths`` then flushes
    every file and each directory once."""
    import os as _os

    synced = []
    real_fsync = _os.fsync
    monkeypatch.setattr(_os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    df = pd.DataFrame({"a": [1, 2]})
    paths = [pio.write_table_atomic(df, tmp_path / "u" / "t.parquet", fsync=False),
             pio.write_bytes_atomic(b"x", tmp_path / "u" / "w.bin", fsync=False),
             pio.write_bytes_atomic(b"y", tmp_path / "v" / "z.bin", fsync=False)]
    assert synced == [] and _tmp_leftovers(tmp_path / "u") == []
    pd.testing.assert_frame_equal(pd.read_parquet(paths[0]), df)
    pio.fsync_paths(paths)
    assert len(synced) == 3 + 2  # three files, two directories
