"""Build the master reference catalogue from the pointed g and r images (+ Gaia).

Per CCD: read g and r (+ dq masks), check that they overlap on the sky,
measure sources in each band (:mod:`.photometry`), anchor each band's
astrometry on Gaia when given (:func:`.matching.anchor_to_gaia`, validated),
register the two bands on each other (a band without an accepted Gaia anchor
is tied to the other band's positions; a remaining g-r offset, or one-band-only
stars pairing up at a common offset, raises :class:`CatalogueError` naming the
CCD rather than cataloguing every star twice), cross-match
g and r into one record per star (stars seen in one band keep NaN for the
other), select reference stars (:mod:`.reference`), match to Gaia, save a PNG
grid of the reference stamps. A CCD that cannot be processed (missing in one
band, empty, no overlap, ...) is skipped with its reason logged and recorded in
``attrs["skipped_ccds"]``; the others complete. Output: one table for the
whole field, written atomically as ``master_catalogue.parquet`` (typed, with
the meta) and ``master_catalogue.csv``, plus ``catalogue_meta.json``.

Star ids: ``star_id = CCDNUM * 1_000_000 + k`` where ``k`` (1, 2, ...) runs
over the CCD's stars sorted by (dec, ra) — unique across CCDs, stable for
identical input and independent of which other CCDs are processed.

Gaia-only stars beside a CCD (``n_bands = 0``): a star just outside a pointed
CCD is in no g/r catalogue, yet during a drift exposure its trail runs onto
the CCD (a 20 s drift at 0.5"/s moves it 10", plus the dither between the
pointed and the drift images) and lays its light over the trails of the
catalogued stars there; unmodelled, that light is read as a brightening of
those stars at the instants their trails cross it. With a Gaia reference,
the Gaia stars within ``gaia_edge_margin_arcsec`` outside each CCD join the
catalogue (ids ``CCDNUM * 1_000_000 + 900_000 + k``, sorted by (dec, ra)),
with Gaia positions, no g/r measurement and ``mag_r``/``flux_r`` estimated
from G by the CCD's median ``mag_r - G`` of its Gaia-matched stars, so that
the later stages predict, model and de-blend their trails. A Gaia star that
another CCD catalogued, or that another CCD's margin already added, is kept
once.

Columns (:data:`CATALOGUE_COLUMNS`):

``star_id`` (int64), ``ccd``
    identity (see above).
``ra, dec`` (deg, ICRS), ``ra_err_arcsec, dec_err_arcsec``
    inverse-variance mean of the g and r positions after the Gaia anchor
    (epoch of the images); errors include the anchor's fit error.
``x_<b>, y_<b>``
    0-based pixel position in band ``b`` (g, r) image; NaN if not detected.
``flux_<b>, flux_err_<b>`` (e-, total, aperture-corrected), ``mag_<b>, mag_err_<b>``
    instrumental ``-2.5 log10(flux / EXPTIME)``; ``snr_<b>``,
    ``fwhm_px_<b>``, ``ellipticity_<b>``, ``flags_<b>``.
``g_r``
    ``mag_g - mag_r`` (instrumental colour).
``fwhm_arcsec, ellipticity``
    mean of the bands / r (g if r missing).
``nn_dist_arcsec``
    distance to the nearest other catalogued star.
``flags``
    OR of ``flags_g`` and ``flags_r`` (:mod:`.flags`); ``centroid_fallback``.
``n_bands``
    1 or 2; ``is_reference`` (bool).
``gaia_source_id`` (nullable Int64), ``gaia_sep_arcsec``, ``gaia_gmag``
    mutual nearest Gaia star within ``gaia_match_radius_arcsec``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CatalogueError, ConfigError, EmptyDataError, InputFileError
from .flags import CATALOGUE_FLAGS, SourceFlag
from .gaia import mjd_to_julian_year, normalise_gaia_columns, propagate_to_epoch, query_gaia_tap, read_gaia_file
from .images import PointedCCD, list_ccds, read_pointed_ccd
from .matching import anchor_to_gaia, find_offset, mutual_match, tangent_plane, from_tangent_plane
from .photometry import MeasureOptions, measure_sources
from .reference import save_stamp_grid, select_reference_stars

__all__ = ["DEFAULT_KNOBS", "build_catalogue", "catalogue_ccd", "CATALOGUE_COLUMNS"]

log = logging.getLogger(__name__)

STAR_ID_STRIDE = 1_000_000
#: ids of the Gaia-only stars beside a CCD: CCDNUM * STAR_ID_STRIDE + EDGE_ID_OFFSET + k
EDGE_ID_OFFSET = 900_000

DEFAULT_KNOBS = {
    # pydriftn 0.1.4 names (see pydriftn.config.CatalogueConfig)
    "num_target": 20,
    "edge_crit": 0.05,
    "iso_perc": 0.99,
    "flux_perc": 0.8,
    "morph_perc": 0.8,
    "detect_sigma": 5.0,
    # matching
    "match_radius_arcsec": 1.0,
    "gaia_match_radius_arcsec": 1.0,
    "gaia_search_radius_arcsec": 10.0,
    "gaia_gmag_max": 21.0,
    "gaia_tap_url": None,
    "gaia_cache_dir": None,
    "gaia_timeout_s": 60.0,
    # astrometric anchor validation (see pydriftn.catalogue.matching.anchor_to_gaia)
    "anchor_min_matches": 3,
    "anchor_max_rms_arcsec": None,  # None: 0.5 * gaia_match_radius_arcsec
    # Gaia stars this far outside a CCD join its catalogue (their trails drift onto it; see _gaia_edge_stars)
    "gaia_edge_margin_arcsec": 30.0,
    # photometry
    "aperture_fwhm": 0.8,
    "detect_thresh": 1.5,
    # output
    "stamps": True,
    "write_csv": True,
}

#: anchoring uses sources with none of these flags and S/N above this
_ANCHOR_BAD = SourceFlag.SATURATED | SourceFlag.BLENDED | SourceFlag.MASKED_PIXELS
_ANCHOR_MIN_SNR = 20.0
#: g and r positions of one CCD must agree to this fraction of match_radius_arcsec
_GR_TOLERANCE = 0.25

_BAND_COLS = ["x", "y", "flux", "flux_err", "mag", "mag_err", "snr", "fwhm_px", "ellipticity", "flags"]

CATALOGUE_COLUMNS = (
    ["star_id", "ccd", "ra", "dec", "ra_err_arcsec", "dec_err_arcsec"]
    + [f"{c}_{b}" for b in ("g", "r") for c in _BAND_COLS]
    + ["g_r", "fwhm_arcsec", "ellipticity", "nn_dist_arcsec", "flags", "centroid_fallback", "n_bands", "is_reference",
       "gaia_source_id", "gaia_sep_arcsec", "gaia_gmag"]
)


def _resolve_knobs(config, knobs):
    out = dict(DEFAULT_KNOBS)
    if config is not None:
        if hasattr(config, "model_dump"):
            config = config.model_dump()
        for k, v in dict(config).items():
            if k in out:
                out[k] = v
    for k, v in knobs.items():
        if k not in out:
            import difflib

            hint = difflib.get_close_matches(k, list(out), n=1)
            raise ConfigError(
                f"catalogue: unknown option {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; known: {sorted(out)}"
            )
        if v is not None or k.startswith("gaia_"):
            out[k] = v
    return out


def _check_overlap(g: PointedCCD, r: PointedCCD):
    """Raise CatalogueError when the g and r CCDs do not overlap on the sky."""
    ny, nx = r.data.shape
    xs = np.array([0, nx - 1, nx - 1, 0, (nx - 1) / 2])
    ys = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    ra, dec = r.wcs.pixel_to_world_values(xs, ys)
    gx, gy = g.wcs.world_to_pixel_values(ra, dec)
    gny, gnx = g.data.shape
    gx, gy = np.asarray(gx), np.asarray(gy)
    if not (np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))):
        overlap = False
    else:
        overlap = (gx[:4].max() >= 0) and (gx[:4].min() <= gnx - 1) and (gy[:4].max() >= 0) and (gy[:4].min() <= gny - 1)
    if not overlap:
        gra, gdec = g.wcs.pixel_to_world_values((gnx - 1) / 2, (gny - 1) / 2)
        from astropy.coordinates import SkyCoord

        sep_deg = SkyCoord(float(gra), float(gdec), unit="deg").separation(
            SkyCoord(float(ra[4]), float(dec[4]), unit="deg")).deg
        raise CatalogueError(
            f"CCD {g.ccd}: g image {g.path} and r image {r.path} do not overlap on the sky "
            f"(centres {sep_deg:.3f} deg apart: g at RA {float(gra):.5f} Dec {float(gdec):.5f}, "
            f"r at RA {float(ra[4]):.5f} Dec {float(dec[4]):.5f}); expected two images of the same field"
        )


def _gaia_for(gaia, im: PointedCCD, knobs):
    """Gaia table for one CCD (from a loaded table, or a cached TAP cone)."""
    if gaia is None:
        return None
    if isinstance(gaia, str) and gaia == "tap":
        ny, nx = im.data.shape
        ra_c, dec_c = im.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
        radius = 0.5 * np.hypot(nx, ny) * im.pixscale_arcsec / 3600.0 + 2.0 / 60.0
        return query_gaia_tap(
            float(ra_c), float(dec_c), radius, gmag_max=knobs["gaia_gmag_max"], url=knobs["gaia_tap_url"],
            cache_dir=knobs["gaia_cache_dir"], timeout=knobs["gaia_timeout_s"],
        )
    return gaia


def _measure_band(im: PointedCCD, band, gaia, knobs, opts):
    try:
        src, meta = measure_sources(
            im.data, gain=im.gain, saturation=im.saturation, read_noise=im.read_noise, bad_mask=im.bad_mask,
            saturated_mask=im.saturated_mask, exptime=im.exptime, fwhm_hint_px=im.fwhm_hint_px, options=opts,
        )
    except EmptyDataError as exc:
        raise EmptyDataError(f"{band} image: {exc}", path=im.path, extension=im.ccd) from exc
    except CatalogueError as exc:
        raise CatalogueError(f"{im.path}[{im.ccd}] ({band} image): {exc}") from exc
    ra, dec = im.wcs.pixel_to_world_values(src["x"].to_numpy(), src["y"].to_numpy())
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    pos_err = src["pos_err_px"].to_numpy() * im.pixscale_arcsec
    good = (((src["flags"].to_numpy() & int(_ANCHOR_BAD)) == 0) & ~src["centroid_fallback"].to_numpy()
            & (src["snr"].to_numpy() >= _ANCHOR_MIN_SNR))
    astro = {"anchored": False, "reference": None}
    if gaia is not None and len(gaia):
        epoch = mjd_to_julian_year(im.mjd) if np.isfinite(im.mjd) else 2016.0
        gp = propagate_to_epoch(gaia, epoch)
        ra2, dec2, am = anchor_to_gaia(
            src["x"], src["y"], good, im.wcs, gp["ra"].to_numpy(), gp["dec"].to_numpy(),
            pixscale_arcsec=im.pixscale_arcsec, shape=im.data.shape,
            match_radius_arcsec=knobs["gaia_match_radius_arcsec"],
            search_radius_arcsec=knobs["gaia_search_radius_arcsec"],
            min_matches=int(knobs["anchor_min_matches"]), max_rms_arcsec=knobs["anchor_max_rms_arcsec"],
            label=f"CCD {im.ccd} {band} onto Gaia",
        )
        am.pop("gaia_index", None)
        am.pop("source_index", None)
        am["epoch"] = float(epoch)
        if am["accepted"]:
            ra, dec = ra2, dec2
            astro = {"anchored": True, "reference": "gaia", **am}
            pos_err = np.hypot(pos_err, am["fit_err_arcsec"])
        else:
            astro = {"anchored": False, "reference": None, **am}
            log.warning("CCD %s %s: Gaia anchor not used (%s); positions from the image WCS for now",
                        im.ccd, band, am["reject_reason"])
    src["_good"] = good
    src["ra"] = ra
    src["dec"] = dec
    src["pos_err_arcsec"] = pos_err
    meta = {**meta, "astrometry": astro, "exptime_s": im.exptime, "mjd": im.mjd, "band_header": im.band,
            "pixscale_arcsec": im.pixscale_arcsec, "n_sources": int(len(src)), "image": im.path,
            "mask": im.mask_path}
    return src, meta


def _offset_search(ax, ay, bx, by, knobs):
    """:func:`find_offset` in arcsec with the catalogue's radii; adds ``significant``, ``offset_arcsec``."""
    rad = float(knobs["match_radius_arcsec"])
    search = 2.0 * float(knobs["gaia_search_radius_arcsec"])
    off = find_offset(ax, ay, bx, by, search_radius=search, bin_size=rad, refine_radius=rad)
    need = max(int(knobs["anchor_min_matches"]), int(np.ceil(off["n_chance"] + 4.0 * np.sqrt(off["n_chance"]))))
    off["significant"] = bool(off["n_peak"] >= need)
    off["offset_arcsec"] = float(np.hypot(off["dx"], off["dy"]))
    return off


def _tie_band(im, src, meta, band, ref_src, ref_band, knobs):
    """Fit ``band``'s pixel positions onto the (good) sky positions of ``ref_band`` (same CCD)."""
    good_ref = ref_src["_good"].to_numpy(bool)
    x, y = src["x"].to_numpy(float), src["y"].to_numpy(float)
    ra2, dec2, am = anchor_to_gaia(
        x, y, src["_good"].to_numpy(bool), im.wcs, ref_src["ra"].to_numpy()[good_ref],
        ref_src["dec"].to_numpy()[good_ref], pixscale_arcsec=im.pixscale_arcsec, shape=im.data.shape,
        match_radius_arcsec=knobs["match_radius_arcsec"], search_radius_arcsec=2.0 * knobs["gaia_search_radius_arcsec"],
        min_matches=int(knobs["anchor_min_matches"]), max_rms_arcsec=knobs["anchor_max_rms_arcsec"],
        label=f"CCD {im.ccd} {band} onto {ref_band}",
    )
    am.pop("gaia_index", None)
    am.pop("source_index", None)
    tie = {f"tie_{k}": v for k, v in am.items()}
    meta["astrometry"].update(tie)
    if not am["accepted"]:
        return am
    src["ra"] = ra2
    src["dec"] = dec2
    src["pos_err_arcsec"] = np.hypot(src["pos_err_arcsec"].to_numpy(float), am["fit_err_arcsec"])
    meta["astrometry"]["reference"] = ref_band
    log.info("CCD %s: %s positions tied to the %s positions (%s fit, %d stars, correction %.2f\", rms %.3f\")",
             im.ccd, band, ref_band, am["kind"], am["n_used"], am["offset_arcsec"], am["rms_after_arcsec"])
    return am


def _register_bands(ims, srcs, metas, ra0, dec0, knobs):
    """Make the g and r positions of one CCD consistent before they are merged.

    A band whose Gaia anchor was rejected (or that had no Gaia) is tied to
    the other band's positions (the anchored one; r when neither is). Then
    the g→r offset of all usable stars is measured independently
    (:func:`find_offset`); a significant offset above ``_GR_TOLERANCE`` ×
    ``match_radius_arcsec`` raises instead of merging into doubled stars.

    Raises
    ------
    CatalogueError
        Naming the CCD and band: a band could be neither anchored on Gaia nor
        tied to the other band although both have enough usable stars, or the
        g and r positions still disagree.
    """
    ccd = ims["r"].ccd
    anchored = {b: bool(metas[b]["astrometry"].get("anchored")) for b in ("g", "r")}
    nmin = int(knobs["anchor_min_matches"])
    n_good = {b: int(srcs[b]["_good"].sum()) for b in ("g", "r")}
    reg = {"tied": None}
    if not (anchored["g"] and anchored["r"]):
        band = "g" if not anchored["g"] else "r"
        ref = "r" if band == "g" else "g"
        am = _tie_band(ims[band], srcs[band], metas[band], band, srcs[ref], ref, knobs)
        reg["tied"] = f"{band}->{ref}" if am["accepted"] else None
        if not am["accepted"]:
            why_gaia = metas[band]["astrometry"].get("reject_reason") or "no Gaia reference"
            if min(n_good.values()) >= nmin:
                raise CatalogueError(
                    f"CCD {ccd}: the {band} positions can be neither anchored on Gaia ({why_gaia}) nor tied to "
                    f"the {ref} positions ({am['reject_reason']}); {n_good['g']} usable g and {n_good['r']} usable "
                    f"r stars. Refusing to merge g and r into doubled stars: check the {band} image WCS of {ccd} "
                    f"({ims[band].path}) or raise gaia_search_radius_arcsec"
                )
            log.warning("CCD %s: %s positions not registered on %s (%d usable g, %d usable r stars): %s",
                        ccd, band, ref, n_good["g"], n_good["r"], am["reject_reason"])
    # independent check of the g and r positions (good stars of both bands, tangent plane in arcsec)
    gg, gr = srcs["g"]["_good"].to_numpy(bool), srcs["r"]["_good"].to_numpy(bool)
    xg, yg = tangent_plane(srcs["g"]["ra"].to_numpy()[gg], srcs["g"]["dec"].to_numpy()[gg], ra0, dec0)
    xr, yr = tangent_plane(srcs["r"]["ra"].to_numpy()[gr], srcs["r"]["dec"].to_numpy()[gr], ra0, dec0)
    off = _offset_search(xg, yg, xr, yr, knobs)
    tol = _GR_TOLERANCE * float(knobs["match_radius_arcsec"])
    reg.update(gr_dx_arcsec=off["dx"], gr_dy_arcsec=off["dy"], gr_offset_arcsec=off["offset_arcsec"],
               gr_n_pairs=off["n_peak"], gr_n_chance=off["n_chance"])
    if off["significant"] and off["offset_arcsec"] > tol:
        a = {b: metas[b]["astrometry"] for b in ("g", "r")}
        raise CatalogueError(
            f"CCD {ccd}: the g and r positions differ by {off['offset_arcsec']:.2f}\" (r - g: {off['dx']:+.2f}\" "
            f"E, {off['dy']:+.2f}\" N, {off['n_peak']} stars; tolerance {tol:.2f}\") after the astrometric anchor "
            f"(g: {a['g'].get('reference') or 'image WCS'}, offset {a['g'].get('offset_arcsec', float('nan')):.2f}\"; "
            f"r: {a['r'].get('reference') or 'image WCS'}, offset {a['r'].get('offset_arcsec', float('nan')):.2f}\"); "
            f"refusing to merge them into doubled stars"
        )
    return reg


def _check_no_doubles(tab, ccd, knobs):
    """Raise when the one-band-only stars of a CCD pair up at a common offset (g and r copies of the same stars)."""
    only_g = np.isfinite(tab["x_g"].to_numpy()) & ~np.isfinite(tab["x_r"].to_numpy())
    only_r = np.isfinite(tab["x_r"].to_numpy()) & ~np.isfinite(tab["x_g"].to_numpy())
    if only_g.sum() < 3 or only_r.sum() < 3:
        return
    xi, eta = tab["_xi"].to_numpy(), tab["_eta"].to_numpy()
    off = _offset_search(xi[only_g], eta[only_g], xi[only_r], eta[only_r], knobs)
    if off["significant"] and off["n_peak"] >= 5 and off["offset_arcsec"] > float(knobs["match_radius_arcsec"]):
        raise CatalogueError(
            f"CCD {ccd}: {off['n_peak']} g-only and r-only stars pair up at a common offset of "
            f"{off['offset_arcsec']:.2f}\" (r - g: {off['dx']:+.2f}\" E, {off['dy']:+.2f}\" N; {off['n_chance']:.1f} "
            f"expected by chance): the g and r astrometry disagree and the stars would be catalogued twice"
        )


def _merge_bands(sg, sr, ra0, dec0, radius_arcsec):
    """One row per star from the g and r source tables (mutual nearest match)."""
    xg, yg = tangent_plane(sg["ra"], sg["dec"], ra0, dec0)
    xr, yr = tangent_plane(sr["ra"], sr["dec"], ra0, dec0)
    ig, ir, _ = mutual_match(xg, yg, xr, yr, radius_arcsec)
    ng, nr = len(sg), len(sr)
    only_g = np.setdiff1d(np.arange(ng), ig)
    only_r = np.setdiff1d(np.arange(nr), ir)
    rows_g = np.concatenate([ig, only_g, np.full(len(only_r), -1)])
    rows_r = np.concatenate([ir, np.full(len(only_g), -1), only_r])
    out = {}
    for band, s, rows in (("g", sg, rows_g), ("r", sr, rows_r)):
        has = rows >= 0
        for c in _BAND_COLS:
            v = s[c].to_numpy()
            if c == "flags":
                col = np.zeros(len(rows), np.int64)
                col[has] = v[rows[has]]
            else:
                col = np.full(len(rows), np.nan)
                col[has] = v[rows[has]]
            out[f"{c}_{band}"] = col
    # combined position: inverse-variance mean in the tangent plane
    def pick(arr, rows):
        v = np.full(len(rows), np.nan)
        v[rows >= 0] = np.asarray(arr, float)[rows[rows >= 0]]
        return v

    pxg, pyg, eg = pick(xg, rows_g), pick(yg, rows_g), pick(sg["pos_err_arcsec"], rows_g)
    pxr, pyr, er = pick(xr, rows_r), pick(yr, rows_r), pick(sr["pos_err_arcsec"], rows_r)
    wg = np.where(np.isfinite(pxg), 1.0 / np.maximum(eg, 1e-4) ** 2, 0.0)
    wr = np.where(np.isfinite(pxr), 1.0 / np.maximum(er, 1e-4) ** 2, 0.0)
    wsum = wg + wr
    xi = (np.nan_to_num(pxg) * wg + np.nan_to_num(pxr) * wr) / wsum
    eta = (np.nan_to_num(pyg) * wg + np.nan_to_num(pyr) * wr) / wsum
    ra, dec = from_tangent_plane(xi, eta, ra0, dec0)
    err = 1.0 / np.sqrt(wsum)
    tab = pd.DataFrame(out)
    cf = np.zeros(len(rows_g), bool)
    for s, rows in ((sg, rows_g), (sr, rows_r)):
        has = rows >= 0
        cf[has] |= s["centroid_fallback"].to_numpy(bool)[rows[has]]
    tab["centroid_fallback"] = cf
    tab.insert(0, "ra", ra)
    tab.insert(1, "dec", dec)
    tab.insert(2, "ra_err_arcsec", err)
    tab.insert(3, "dec_err_arcsec", err)
    tab["_xi"] = xi
    tab["_eta"] = eta
    return tab, int(len(ig))


def _gaia_edge_stars(gp, gaia_xi_eta, pairs, images, tab, margin_arcsec, prefix):
    """Gaia stars within ``margin_arcsec`` outside the CCD's g and r images, as catalogue rows (see the module
    docstring); ``images``: the (g, r) PointedCCDs, r last.

    ``gp``: Gaia at the catalogue's epoch, ``gaia_xi_eta`` its tangent-plane coordinates, ``pairs`` the
    (catalogue row, Gaia row) indices of the matches; ``tab``: the CCD's catalogue with its Gaia match (``gaia_gmag``),
    whose median ``mag_r - gaia_gmag`` (non-saturated, unblended stars; >= 5 of them) puts G on the
    instrumental r scale (NaN magnitudes otherwise).
    """
    if not margin_arcsec or margin_arcsec <= 0 or gp is None or not len(gp):
        return None
    inside = np.zeros(len(gp), bool)
    near = np.zeros(len(gp), bool)
    # Gaia -> pixels of each band by an affine fit to the Gaia-matched stars' measured pixel positions (the
    # image headers' WCS may be off by many pixels before the anchor)
    gxi, geta = (np.asarray(v, float) for v in gaia_xi_eta)
    ia, ib = (np.asarray(v, np.int64) for v in pairs)
    for im, band in zip(images, ("g", "r")):
        ny, nx = im.data.shape
        px, py = tab[f"x_{band}"].to_numpy(float)[ia], tab[f"y_{band}"].to_numpy(float)[ia]
        use = np.isfinite(px) & np.isfinite(py)
        if use.sum() < 6:
            log.warning("CCD %s: %d Gaia-matched stars in %s, too few to place the Gaia edge stars", im.ccd,
                        int(use.sum()), band)
            return None
        A = np.column_stack([gxi[ib[use]], geta[ib[use]], np.ones(int(use.sum()))])
        cx, *_ = np.linalg.lstsq(A, px[use], rcond=None)
        cy, *_ = np.linalg.lstsq(A, py[use], rcond=None)
        Aall = np.column_stack([gxi, geta, np.ones(len(gp))])
        x, y = Aall @ cx, Aall @ cy
        m = float(margin_arcsec) / float(im.pixscale_arcsec)
        inside |= (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
        near |= (np.isfinite(x) & np.isfinite(y) & (x > -0.5 - m) & (x < nx - 0.5 + m) & (y > -0.5 - m)
                 & (y < ny - 0.5 + m))
    r = images[-1]
    sel = np.flatnonzero(near & ~inside)
    if sel.size == 0:
        return None
    bad = int(SourceFlag.SATURATED | SourceFlag.BLENDED)
    ok = (np.isfinite(tab["gaia_gmag"].to_numpy(float)) & np.isfinite(tab["mag_r"].to_numpy(float))
          & ((tab["flags"].to_numpy(np.int64) & bad) == 0))
    offset = float(np.median((tab["mag_r"] - tab["gaia_gmag"]).to_numpy(float)[ok])) if ok.sum() >= 5 else np.nan
    g = gp.iloc[sel]
    gmag = g["gmag"].to_numpy(float)
    mag_r = gmag + offset
    edge = pd.DataFrame({c: np.full(sel.size, np.nan) for c in CATALOGUE_COLUMNS})
    edge["ra"] = g["ra"].to_numpy(float)
    edge["dec"] = g["dec"].to_numpy(float)
    edge["mag_r"] = mag_r
    edge["flux_r"] = 10.0 ** (-0.4 * mag_r) * float(r.exptime)  # (read_pointed_ccd requires EXPTIME > 0)
    for b in ("g", "r"):
        edge[f"flags_{b}"] = np.int64(0)
    edge["flags"] = np.int64(0)
    edge["centroid_fallback"] = False
    edge["n_bands"] = np.int64(0)
    edge["is_reference"] = False
    edge["gaia_source_id"] = pd.array(g["source_id"].to_numpy(), dtype="Int64")
    edge["gaia_sep_arcsec"] = 0.0
    edge["gaia_gmag"] = gmag
    edge = edge.sort_values(["dec", "ra"], kind="mergesort").reset_index(drop=True)
    edge["star_id"] = np.int64(prefix) * STAR_ID_STRIDE + EDGE_ID_OFFSET + np.arange(1, len(edge) + 1, dtype=np.int64)
    edge["ccd"] = r.ccd
    return edge


def catalogue_ccd(g: PointedCCD, r: PointedCCD, *, gaia=None, knobs=None, ccd_index=0):
    """Catalogue of one CCD from its g and r images (already read).

    Parameters
    ----------
    g, r : PointedCCD
    gaia : pandas.DataFrame or "tap" or None
        Internal Gaia columns (see :func:`pydriftn.catalogue.read_gaia_file`).
    knobs : dict, optional
        Options (see :data:`DEFAULT_KNOBS`).
    ccd_index : int
        Fallback for the star-id prefix when the header has no CCDNUM.

    Returns
    -------
    table : pandas.DataFrame
        Rows of this CCD (columns :data:`CATALOGUE_COLUMNS`), sorted by star_id.
    meta : dict
        Per-band measurement and astrometry meta, match counts, timing.
    """
    knobs = _resolve_knobs(None, knobs or {})
    t0 = time.perf_counter()
    _check_overlap(g, r)
    opts = MeasureOptions(detect_sigma=knobs["detect_sigma"], aperture_fwhm=knobs["aperture_fwhm"],
                          detect_thresh=knobs["detect_thresh"])
    gaia_g = _gaia_for(gaia, g, knobs)
    gaia_r = _gaia_for(gaia, r, knobs) if not (isinstance(gaia, str) and gaia == "tap") else gaia_g
    sg, mg = _measure_band(g, "g", gaia_g, knobs, opts)
    sr, mr = _measure_band(r, "r", gaia_r, knobs, opts)
    ny, nx = r.data.shape
    ra0, dec0 = (float(v) for v in r.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2))
    reg = _register_bands({"g": g, "r": r}, {"g": sg, "r": sr}, {"g": mg, "r": mr}, ra0, dec0, knobs)
    tab, n_pairs = _merge_bands(sg, sr, ra0, dec0, knobs["match_radius_arcsec"])
    if n_pairs == 0:
        log.warning("CCD %s: no star matched between g and r within %.2f\"", g.ccd, knobs["match_radius_arcsec"])
    _check_no_doubles(tab, g.ccd, knobs)
    # combined quantities
    pix = {"g": g.pixscale_arcsec, "r": r.pixscale_arcsec}
    fw = np.column_stack([tab["fwhm_px_g"] * pix["g"], tab["fwhm_px_r"] * pix["r"]])
    tab["fwhm_arcsec"] = np.nanmean(np.where(np.isfinite(fw), fw, np.nan), axis=1) if len(tab) else np.empty(0)
    tab["ellipticity"] = tab["ellipticity_r"].where(np.isfinite(tab["ellipticity_r"]), tab["ellipticity_g"])
    tab["g_r"] = tab["mag_g"] - tab["mag_r"]
    tab["flags"] = (tab["flags_g"].to_numpy(np.int64) | tab["flags_r"].to_numpy(np.int64))
    tab["n_bands"] = np.isfinite(tab["x_g"]).astype(np.int64) + np.isfinite(tab["x_r"]).astype(np.int64)
    if len(tab) > 1:
        from scipy.spatial import cKDTree

        pts = tab[["_xi", "_eta"]].to_numpy()
        d, _ = cKDTree(pts).query(pts, k=2)
        tab["nn_dist_arcsec"] = d[:, 1]
    else:
        tab["nn_dist_arcsec"] = np.inf
    # ids: CCDNUM * 1e6 + rank by (dec, ra)
    tab = tab.sort_values(["dec", "ra"], kind="mergesort").reset_index(drop=True)
    prefix = g.ccdnum or r.ccdnum or (ccd_index + 1)
    if len(tab) >= EDGE_ID_OFFSET:
        raise CatalogueError(f"CCD {g.ccd}: {len(tab)} stars exceed the id range ({EDGE_ID_OFFSET - 1} per CCD)")
    tab.insert(0, "star_id", np.int64(prefix) * STAR_ID_STRIDE + np.arange(1, len(tab) + 1, dtype=np.int64))
    tab.insert(1, "ccd", g.ccd)
    # reference stars (r leads, as in 0.1.4; detected in both bands)
    both = tab["n_bands"].to_numpy() == 2
    sel = np.zeros(len(tab), bool)
    sel_both = select_reference_stars(
        tab[both], shape=r.data.shape, num_target=int(knobs["num_target"]), edge_crit=knobs["edge_crit"],
        iso_perc=knobs["iso_perc"], flux_perc=knobs["flux_perc"], morph_perc=knobs["morph_perc"], band="r",
    )
    sel[np.flatnonzero(both)[sel_both]] = True
    tab["is_reference"] = sel
    # Gaia match of the combined positions (Gaia moved to the mean epoch of g and r)
    tab["gaia_source_id"] = pd.array([pd.NA] * len(tab), dtype="Int64")
    tab["gaia_sep_arcsec"] = np.nan
    tab["gaia_gmag"] = np.nan
    gmeta = {}
    if gaia_r is not None and len(gaia_r) and len(tab):
        epochs = [mjd_to_julian_year(im.mjd) for im in (g, r) if np.isfinite(im.mjd)]
        gp = propagate_to_epoch(gaia_r, float(np.mean(epochs)) if epochs else 2016.0)
        gxi, geta = tangent_plane(gp["ra"], gp["dec"], ra0, dec0)
        ia, ib, dist = mutual_match(tab["_xi"], tab["_eta"], gxi, geta, knobs["gaia_match_radius_arcsec"])
        sid = tab["gaia_source_id"].copy()
        sid.iloc[ia] = gp["source_id"].to_numpy()[ib]
        tab["gaia_source_id"] = sid.astype("Int64")
        tab.loc[ia, "gaia_sep_arcsec"] = dist
        tab.loc[ia, "gaia_gmag"] = gp["gmag"].to_numpy(float)[ib]
        gmeta = {"n_gaia_matched": int(len(ia)), "gaia_sep_median_arcsec": float(np.median(dist)) if len(ia) else None}
        edge = _gaia_edge_stars(gp, (gxi, geta), (ia, ib), (g, r), tab, float(knobs["gaia_edge_margin_arcsec"]),
                                prefix)
        gmeta["n_gaia_edge"] = 0 if edge is None else int(len(edge))
    else:
        edge = None
    tab = tab.drop(columns=["_xi", "_eta"])
    if edge is not None and len(edge):
        tab = pd.concat([tab, edge], ignore_index=True)
        tab["gaia_source_id"] = tab["gaia_source_id"].astype("Int64")
    tab = tab[CATALOGUE_COLUMNS]
    meta = {
        "g": mg, "r": mr, "n_stars": int(len(tab)), "n_matched_gr": n_pairs, "gr_registration": reg,
        "n_only_g": int(((tab["n_bands"] == 1) & tab["x_r"].isna()).sum()),
        "n_only_r": int(((tab["n_bands"] == 1) & tab["x_g"].isna()).sum()),
        "n_reference": int(sel.sum()), "shape": list(r.data.shape), **gmeta,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "CCD %s: %d stars (%d in both bands), %d reference stars, FWHM g %.2f\" r %.2f\"",
        g.ccd, len(tab), n_pairs, int(sel.sum()), mg["fwhm_px"] * g.pixscale_arcsec, mr["fwhm_px"] * r.pixscale_arcsec,
    )
    return tab, meta


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_atomic(path, writer):
    from ..io import atomic_path

    with atomic_path(Path(path)) as tmp:
        writer(tmp)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "timing_s")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def write_catalogue(cat, out_dir, *, write_csv=True):
    """Write ``master_catalogue.parquet`` (+ ``.csv``) and ``catalogue_meta.json`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = _jsonable(dict(cat.attrs))
    tab = cat.copy()
    tab.attrs = {}
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(tab, preserve_index=False)
    md = dict(table.schema.metadata or {})
    # timings stay in catalogue_meta.json only: identical inputs give a byte-identical Parquet file
    md[b"pydriftn_catalogue"] = json.dumps(_without_timings(meta)).encode()
    table = table.replace_schema_metadata(md)
    _write_atomic(out_dir / "master_catalogue.parquet", lambda p: pq.write_table(table, p))
    if write_csv:
        _write_atomic(out_dir / "master_catalogue.csv", lambda p: tab.to_csv(p, index=False, float_format="%.8g"))
    _write_atomic(out_dir / "catalogue_meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return out_dir / "master_catalogue.parquet"


def read_catalogue(path):
    """Read a master catalogue (Parquet or CSV); the Parquet meta goes to ``attrs``."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path)
        if "gaia_source_id" in df:
            df["gaia_source_id"] = df["gaia_source_id"].astype("Int64")
        return df
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    df = table.to_pandas()
    md = table.schema.metadata or {}
    if b"pydriftn_catalogue" in md:
        df.attrs.update(json.loads(md[b"pydriftn_catalogue"]))
    return df


def _drop_duplicate_edge_stars(cat, radius_arcsec):
    """Keep each Gaia-only edge star once, and none that another CCD measured (same Gaia source, or a
    measured star within ``radius_arcsec``)."""
    edge = (cat["n_bands"] == 0).to_numpy()
    if not edge.any():
        return cat
    sid = cat["gaia_source_id"]
    measured_ids = set(sid[~edge].dropna().astype("int64"))
    drop = edge & sid.isin(measured_ids).to_numpy(bool)
    drop |= edge & sid.duplicated(keep="first").to_numpy(bool) & sid.notna().to_numpy(bool)
    if (~edge).any():
        from scipy.spatial import cKDTree

        dec0 = float(np.radians(np.nanmedian(cat["dec"])))
        xy = np.column_stack([cat["ra"].to_numpy(float) * np.cos(dec0), cat["dec"].to_numpy(float)]) * 3600.0
        d, _ = cKDTree(xy[~edge]).query(xy[edge], k=1)
        drop[np.flatnonzero(edge)[d <= float(radius_arcsec)]] = True
    if drop.any():
        log.info("catalogue: %d Gaia edge stars already catalogued by another CCD dropped", int(drop.sum()))
    return cat[~drop].reset_index(drop=True)


def build_catalogue(g_path, r_path, ccds=None, out_dir=None, gaia=None, *, config=None, **knobs):
    """Build the master catalogue of a field from its pointed g and r images.

    Parameters
    ----------
    g_path, r_path : str or Path
        Pointed g and r images (MEF; dq masks found beside them).
    ccds : list of str, optional
        CCD (extension) names; default: every image extension of the g file
        and of the r file (a CCD present in only one is skipped with a reason).
    out_dir : str or Path, optional
        Output folder (``master_catalogue.parquet``, ``master_catalogue.csv``,
        ``catalogue_meta.json``, ``reference_stamps_<CCD>.png``); None: no files.
    gaia : None, str/Path, pandas.DataFrame or "tap"
        Gaia reference: a local file (CSV/FITS/Parquet), an already-read
        table, ``"tap"`` for the (cached) Gaia archive TAP service, or None.
    config : pydriftn.config.CatalogueConfig or dict, optional
        Knobs (``num_target, edge_crit, iso_perc, flux_perc, morph_perc,
        detect_sigma``); keyword ``knobs`` override it.
    **knobs
        Any key of :data:`DEFAULT_KNOBS`.

    Returns
    -------
    pandas.DataFrame
        The catalogue (columns :data:`CATALOGUE_COLUMNS`); ``attrs`` holds
        ``photometry`` (method), ``flags`` (bit names), ``knobs``, per-CCD
        ``ccds`` meta (FWHM, aperture correction, Gaia offset and scatter
        before/after), ``skipped_ccds`` ({ccd: reason}) and ``gaia``.

    Raises
    ------
    CatalogueError
        No CCD could be catalogued (the message lists each CCD's reason), or
        the Gaia file has unknown columns / the TAP service cannot be reached.
    InputFileError
        g or r file missing or not FITS.
    ConfigError
        Unknown knob.
    """
    t0 = time.perf_counter()
    kn = _resolve_knobs(config, knobs)
    gaia_meta = {"source": None}
    if gaia is None:
        gtab = None
    elif isinstance(gaia, pd.DataFrame):
        internal = {"ra", "dec", "source_id", "gmag", "pmra", "pmdec", "ref_epoch"}
        gtab = gaia if internal <= set(gaia.columns) else normalise_gaia_columns(gaia, source="Gaia table")
        gaia_meta = {"source": "table", "n": int(len(gaia))}
    elif isinstance(gaia, str) and gaia == "tap":
        gtab = "tap"
        gaia_meta = {"source": "tap", "url": kn["gaia_tap_url"] or os.environ.get("PYDRIFTN_GAIA_TAP_URL") or "default"}
    else:
        gtab = read_gaia_file(gaia)
        gaia_meta = {"source": str(gaia), "n": int(len(gtab))}
    g_ccds = list_ccds(g_path)
    r_ccds = list_ccds(r_path)
    if ccds is None:
        ccds = list(dict.fromkeys(g_ccds + r_ccds))
    elif isinstance(ccds, str):
        ccds = [c.strip() for c in ccds.split(",") if c.strip()]
    if not ccds:
        raise CatalogueError(f"no CCD to catalogue: {g_path} and {r_path} have no image extensions")
    parts, metas, skipped = [], {}, {}
    out_dir = None if out_dir is None else Path(out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for k, ccd in enumerate(ccds):
        try:
            g = read_pointed_ccd(g_path, ccd)
            r = read_pointed_ccd(r_path, ccd)
            tab, meta = catalogue_ccd(g, r, gaia=gtab, knobs=kn, ccd_index=k)
        except (InputFileError, CatalogueError) as exc:
            if isinstance(exc, CatalogueError) and isinstance(gtab, str) and gtab == "tap" and "Gaia TAP" in str(exc):
                raise
            skipped[ccd] = f"{type(exc).__name__}: {exc}"
            log.warning("skipping CCD %s: %s", ccd, skipped[ccd])
            continue
        parts.append(tab)
        metas[ccd] = meta
        if out_dir is not None and kn["stamps"]:
            refs = tab[tab["is_reference"]]
            if len(refs):
                sub = r.data - np.nanmedian(r.data)
                save_stamp_grid(
                    sub, refs["x_r"].to_numpy(), refs["y_r"].to_numpy(), [str(s) for s in refs["star_id"]],
                    out_dir / f"reference_stamps_{ccd}.png", half_size=int(max(8, round(3 * meta["r"]["fwhm_px"]))),
                    title=f"{Path(str(r_path)).name} [{ccd}] reference stars (r)",
                )
    if not parts:
        raise CatalogueError(
            "no CCD could be catalogued: " + "; ".join(f"{c}: {why}" for c, why in skipped.items())
        )
    cat = pd.concat(parts, ignore_index=True).sort_values("star_id", kind="mergesort").reset_index(drop=True)
    cat["gaia_source_id"] = cat["gaia_source_id"].astype("Int64")
    cat = _drop_duplicate_edge_stars(cat, kn["match_radius_arcsec"])
    photometry = next(iter(metas.values()))["r"]["photometry"]
    cat.attrs = _jsonable({
        "photometry": photometry,
        "flux_unit": "e- (total, aperture-corrected)",
        "mag_definition": "-2.5 log10(flux / exptime), instrumental (e-/s)",
        "flags": {f.name: int(f) for f in SourceFlag if f & CATALOGUE_FLAGS},
        "flags_registry": "pydriftn.flags.SampleFlag",
        "knobs": {k: v for k, v in kn.items()},
        "ccds": metas,
        "skipped_ccds": skipped,
        "gaia": gaia_meta,
        "g_image": str(g_path),
        "r_image": str(r_path),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    if out_dir is not None:
        write_catalogue(cat, out_dir, write_csv=kn["write_csv"])
        log.info("catalogue of %d stars (%d CCDs, %d skipped) written to %s", len(cat), len(metas), len(skipped), out_dir)
    return cat
