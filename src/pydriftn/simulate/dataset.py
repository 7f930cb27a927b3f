"""Write a complete simulated dataset (images, masks, truth, reference).

See :mod:`pydriftn.simulate` for the layout and the truth-table columns.
Files are written atomically (temporary name in the same directory, then
``os.replace``), so a crashed run never leaves a half-written FITS file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.time import Time
import astropy.units as u

from .. import __version__
from .config import FILTER_NAMES, SimulationConfig, make_config
from .field import CCDNUM, choose_events, gaia_reference, make_star_field, make_wcs
from .psf import moffat_mog
from .render import render_drift_ccd, render_pointed_ccd

__all__ = ["SimulatedDataset", "exposure_schedule", "simulate_dataset", "load_dataset", "PROPID", "drift_image_name"]

log = logging.getLogger(__name__)

PROPID = "2021B-0023"
_PREFIX = "c4d_2021B0023"


def drift_image_name(expnum, kind="image", fz=False):
    """File name of a drift exposure (``kind`` 'image' or 'dqmask')."""
    return f"{_PREFIX}-exp_{int(expnum)}-{kind}.fits" + (".fz" if fz else "")


def pointed_image_name(band, kind="image"):
    """File name of a pointed image."""
    return f"{_PREFIX}-pointed_{band}-{kind}.fits"


@dataclass
class SimulatedDataset:
    """Paths of a simulated dataset and the configuration that made it.

    Attributes
    ----------
    out_dir : Path
    config : SimulationConfig
    seed : int
    expnums : list of int
        Drift exposure numbers in time order.
    drift_images, drift_masks : dict expnum -> Path
    pointed_images, pointed_masks : dict band -> Path
    truth : dict name -> Path
        ``stars, trails, pointed, lightcurves, common, events, flashes,
        satellites, cosmic_rays, wcs``.
    gaia_reference : Path
    simulation_json : Path
    """

    out_dir: Path
    config: SimulationConfig
    seed: int
    expnums: list = field(default_factory=list)
    drift_images: dict = field(default_factory=dict)
    drift_masks: dict = field(default_factory=dict)
    pointed_images: dict = field(default_factory=dict)
    pointed_masks: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)
    gaia_reference: Path | None = None
    simulation_json: Path | None = None

    def read_truth(self, name):
        """Read one truth table as a DataFrame."""
        return pd.read_parquet(self.truth[name])

    def summary_lines(self):
        """Human-readable summary (for the CLI)."""
        cfg = self.config
        lines = [
            f"preset {cfg.preset}, seed {self.seed}: {len(self.expnums)} drift exposures x {len(cfg.ccds)} CCDs "
            f"({','.join(cfg.ccds)}, {cfg.naxis1}x{cfg.naxis2} px), EXPTIME {cfg.exptime_s:g} s, "
            f"drift (E,N) = ({cfg.drift_rate[0]:g}, {cfg.drift_rate[1]:g}) arcsec/s",
            f"drift images: {sorted({str(p.parent) for p in self.drift_images.values()})}",
            f"pointed g, r: {self.out_dir / 'pointed'}",
        ]
        try:
            n_ev = len(self.read_truth("events"))
            n_fl = len(self.read_truth("flashes"))
            n_sat = len(self.read_truth("satellites"))
            n_tr = len(self.read_truth("trails"))
            lines.append(f"truth: {n_tr} trails, {n_ev} microlensing events, {n_fl} flashes, {n_sat} satellites "
                         f"in {self.out_dir / 'truth'}")
        except (OSError, KeyError):  # pragma: no cover - partial dataset
            pass
        lines.append(f"Gaia-like reference: {self.gaia_reference}")
        return lines


def exposure_schedule(cfg):
    """Drift exposures: list of dicts ``index, night, expnum, mjd_obs, date_obs, dir``.

    Exposure ``i`` of night ``k`` (1-based) starts at
    ``start + (k-1) days + i * (exptime_s + overhead_s)``.
    """
    t0 = Time(cfg.start_isot, format="isot", scale="utc")
    out = []
    expnum = cfg.first_expnum
    for night in range(1, cfg.n_nights + 1):
        for i in range(cfg.n_exposures):
            t = t0 + ((night - 1) * 86400.0 + i * (cfg.exptime_s + cfg.overhead_s)) * u.s
            out.append(
                dict(index=len(out), night=night, expnum=expnum, mjd_obs=float(t.mjd),
                     date_obs=t.isot, dir=f"night_{night}", fz=i >= cfg.n_exposures - cfg.fz_exposures)
            )
            expnum += 1
    return out


def _sexa(value_deg, hours):
    a = Angle(value_deg, unit=u.deg)
    if hours:
        return a.to_string(unit=u.hourangle, sep=":", precision=3, pad=True)
    return a.to_string(unit=u.deg, sep=":", precision=2, pad=True, alwayssign=True)


def _primary_header(cfg, seed, *, expnum, mjd_obs, exptime, band, obj, prodtype, tel_crval):
    t = Time(mjd_obs, format="mjd", scale="utc")
    h = fits.Header()
    h["OBJECT"] = (obj, "Name of the object observed")
    h["PROCTYPE"] = ("InstCal", "Data processing level")
    h["PRODTYPE"] = (prodtype, "Data product type")
    h["PLVER"] = ("V4.1.0", "CP-like version: dq masks hold integer codes")
    h["PIXSCAL1"] = (cfg.pixel_scale_arcsec, "[arcsec/pixel] Pixel scale, axis 1")
    h["PIXSCAL2"] = (cfg.pixel_scale_arcsec, "[arcsec/pixel] Pixel scale, axis 2")
    h["OBS-LONG"] = (70.81489, "[deg] Observatory east longitude")
    h["TELESCOP"] = ("CTIO 4.0-m telescope", "Telescope name")
    h["OBSERVAT"] = ("CTIO", "Observatory name")
    h["OBS-LAT"] = (-30.16606, "[deg] Observatory latitude")
    h["OBS-ELEV"] = (cfg.altitude_m, "[m] Observatory elevation")
    h["INSTRUME"] = ("DECam", "Instrument used to obtain these data")
    h["EXPREQ"] = (exptime, "[s] Requested exposure duration")
    h["EXPTIME"] = (exptime, "[s] Exposure duration")
    h["DATE-OBS"] = (t.isot, "DateTime of observation start (UTC)")
    h["TIME-OBS"] = (t.isot.split("T")[1], "Time of observation start (UTC)")
    h["MJD-OBS"] = (mjd_obs, "MJD of observation start")
    h["MJD-END"] = (mjd_obs + exptime / 86400.0, "Exposure end")
    h["TIMESYS"] = ("UTC", "Time system")
    h["EXPNUM"] = (int(expnum), "DECam exposure number")
    h["OBSTYPE"] = ("object", "Type of observation")
    h["PROPID"] = (PROPID, "Proposal ID")
    h["FILTER"] = (FILTER_NAMES[band], "Unique filter identifier")
    h["BAND"] = band
    h["TELEQUIN"] = (2000.0, "Equinox of telescope coordinates")
    h["TELSTAT"] = ("Track", "Telescope tracking status")
    h["RA"] = (_sexa(cfg.ra_deg, True), "[HH:MM:SS] Target RA")
    h["DEC"] = (_sexa(cfg.dec_deg, False), "[DD:MM:SS] Target DEC")
    h["TELRA"] = (_sexa(tel_crval[0], True), "[HH:MM:SS] Telescope RA")
    h["TELDEC"] = (_sexa(tel_crval[1], False), "[DD:MM:SS] Telescope DEC")
    h["AIRMASS"] = (cfg.airmass, "Airmass")
    h["RADESYS"] = ("ICRS", "World coordinate reference frame")
    h["SIMULATD"] = (True, "pydriftn.simulate synthetic data")
    h["SIMVERS"] = (__version__, "pydriftn version that simulated it")
    h["SIMSEED"] = (int(seed), "simulation seed")
    if band == "VR":
        h["SIMDRFTE"] = (cfg.drift_rate[0], "[arcsec/s] simulated drift rate east")
        h["SIMDRFTN"] = (cfg.drift_rate[1], "[arcsec/s] simulated drift rate north")
    return h


def _ext_header(cfg, ccd, res, band):
    det = res["det"]
    h = fits.Header()
    h["INHERIT"] = (True, "Inherits global header")
    h["CCDNUM"] = (CCDNUM.get(ccd, 0), "CCD number")
    h["DETPOS"] = (ccd, "detector position ID")
    h["GAINA"] = (float(det["gain"][0]), "[e-/ADU] gain amp A (x < NAXIS1/2)")
    h["RDNOISEA"] = (float(det["rdnoise"][0]), "[electrons] Read noise for amp A")
    h["SATURATA"] = (float(det["saturate"][0]), "[ADU] saturation amp A")
    h["GAINB"] = (float(det["gain"][1]), "[e-/ADU] gain amp B")
    h["RDNOISEB"] = (float(det["rdnoise"][1]), "[electrons] Read noise for amp B")
    h["SATURATB"] = (float(det["saturate"][1]), "[ADU] saturation amp B")
    h["SATURATE"] = (float(min(det["saturate"])), "[ADU] lower of SATURATA/B")
    h["FWHM"] = (round(float(res["fwhm_px"]), 4), "Median FWHM in pixels")
    h["AVSKY"] = (round(float(res["avsky_adu"]), 4), "[ADU] average sky")
    h["FILTER"] = FILTER_NAMES[band]
    wh = fits.Header.fromstring(res["header_wcs_text"], sep="\n")
    for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        wh.remove(k, ignore_missing=True)
    cd = res["header_cd"]
    for key in wh:
        if key in ("MJDREF", "DATEREF", "MJD-OBS", "DATE-OBS"):
            continue
        h[key] = (wh[key], wh.comments[key])
    h["CD1_1"], h["CD1_2"] = float(cd[0, 0]), float(cd[0, 1])
    h["CD2_1"], h["CD2_2"] = float(cd[1, 0]), float(cd[1, 1])
    return h


def _write_atomic(hdul, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        hdul.writeto(tmp, overwrite=True, output_verify="exception")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_mef(path, primary, exts, fz):
    """exts: list of (data, header, extname)."""
    hdus = [fits.PrimaryHDU(header=primary)]
    for data, hdr, name in exts:
        if fz:
            kw = dict(compression_type="RICE_1")
            if data.dtype.kind == "f":
                kw["quantize_level"] = 16.0
            hdus.append(fits.CompImageHDU(data=data, header=hdr, name=name, **kw))
        else:
            hdus.append(fits.ImageHDU(data=data, header=hdr, name=name))
    _write_atomic(fits.HDUList(hdus), path)


def _write_parquet(df, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    df.reset_index(drop=True).to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _map(fn, args, n_workers):
    if n_workers <= 1 or len(args) <= 1:
        return [fn(*a) for a in args]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(n_workers, len(args))) as pool:
        futs = [pool.submit(fn, *a) for a in args]
        return [f.result() for f in futs]


def simulate_dataset(out_dir, preset="small", seed=0, n_workers=1, **overrides):
    """Simulate a drift-scan dataset with truth tables.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing; existing files of the same names are replaced.
    preset : {'small', 'full'} or SimulationConfig
    seed : int
        Master seed; every (exposure, CCD) has its own generator derived from
        it, so results do not depend on the order CCDs are made in.
    n_workers : int
        Processes rendering the CCDs of an exposure in parallel (results are
        identical to ``n_workers=1``).
    **overrides
        Fields of :class:`~pydriftn.simulate.config.SimulationConfig`
        (``None`` values ignored), e.g. ``n_exposures=2``,
        ``ccds="S4"``, ``drift_rate_arcsec_s=(0.5, 0.0)``.

    Returns
    -------
    SimulatedDataset
    """
    cfg = make_config(preset, **overrides)
    seed = int(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pointed").mkdir(exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    ds = SimulatedDataset(out_dir=out, config=cfg, seed=seed)
    sched = exposure_schedule(cfg)
    ds.expnums = [e["expnum"] for e in sched]

    stars = make_star_field(cfg, seed)
    nominal = {c: make_wcs(cfg, c, (cfg.ra_deg, cfg.dec_deg)) for c in cfg.ccds}
    events = choose_events(cfg, stars, seed, sched, nominal)

    truth = {k: [] for k in ("trails", "pointed", "lightcurves", "common", "flashes", "satellites", "cosmic_rays", "wcs")}

    # pointed g and r
    mjd_g = sched[0]["mjd_obs"] - cfg.pointed_lead_s / 86400.0
    for j, band in enumerate(("g", "r")):
        mjd = mjd_g + j * (cfg.pointed_exptime_s + cfg.overhead_s) / 86400.0
        pexp = cfg.first_expnum - 10 + j
        results = dict(zip(cfg.ccds, _map(render_pointed_ccd, [(cfg, seed, stars, band, c, pexp) for c in cfg.ccds],
                                          n_workers)))
        tel = results[cfg.ccds[0]]["header_wcs"].wcs.crval
        for prodtype, key in (("image", "image"), ("dqmask", "mask")):
            prim = _primary_header(cfg, seed, expnum=pexp, mjd_obs=mjd, exptime=cfg.pointed_exptime_s, band=band,
                                   obj=f"drift_field_{band}", prodtype=prodtype, tel_crval=tel)
            exts = [(results[c][key], _ext_header(cfg, c, results[c], band), c) for c in cfg.ccds]
            path = out / "pointed" / pointed_image_name(band, prodtype)
            _write_mef(path, prim, exts, fz=False)
            (ds.pointed_images if key == "image" else ds.pointed_masks)[band] = path
        for c in cfg.ccds:
            truth["pointed"].append(results[c]["pointed"])
            truth["cosmic_rays"].append(results[c]["cosmic_rays"])
            truth["wcs"].append(dict(kind="pointed", expnum=pexp, band=band, ccd=c,
                                     true_wcs=results[c]["true_wcs_text"],
                                     header_wcs=results[c]["header_wcs_text"]))

    for e in sched:
        results = dict(zip(cfg.ccds, _map(render_drift_ccd, [(cfg, seed, stars, events, e, c) for c in cfg.ccds],
                                          n_workers)))
        night_dir = out / e["dir"]
        night_dir.mkdir(exist_ok=True)
        tel = results[cfg.ccds[0]]["header_wcs"].wcs.crval
        for prodtype, key in (("image", "image"), ("dqmask", "mask")):
            prim = _primary_header(cfg, seed, expnum=e["expnum"], mjd_obs=e["mjd_obs"], exptime=cfg.exptime_s,
                                   band="VR", obj="drift_field_VR", prodtype=prodtype, tel_crval=tel)
            exts = [(results[c][key], _ext_header(cfg, c, results[c], "VR"), c) for c in cfg.ccds]
            path = night_dir / drift_image_name(e["expnum"], prodtype, fz=e["fz"])
            _write_mef(path, prim, exts, fz=e["fz"])
            (ds.drift_images if key == "image" else ds.drift_masks)[e["expnum"]] = path
        for c in cfg.ccds:
            r = results[c]
            for k in ("trails", "lightcurves", "common", "flashes", "satellites", "cosmic_rays"):
                truth[k].append(r[k])
            truth["wcs"].append(dict(kind="drift", expnum=e["expnum"], band="VR", ccd=c,
                                     true_wcs=r["true_wcs_text"], header_wcs=r["header_wcs_text"]))

    tdir = out / "truth"
    _write_parquet(stars[[c for c in stars.columns if not c.startswith("_")]], tdir / "stars.parquet")
    ds.truth["stars"] = tdir / "stars.parquet"
    _write_parquet(events, tdir / "events.parquet")
    ds.truth["events"] = tdir / "events.parquet"
    for k, parts in truth.items():
        if k == "wcs":
            df = pd.DataFrame(parts)
        else:
            parts = [p for p in parts if len(p)]
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if k == "lightcurves" and len(df):
            df = df.drop_duplicates(["expnum", "star_id", "t_s"])
        _write_parquet(df, tdir / f"{k}.parquet")
        ds.truth[k] = tdir / f"{k}.parquet"

    gaia = gaia_reference(cfg, stars, seed, sched[0]["mjd_obs"])
    ds.gaia_reference = out / "gaia_reference.csv"
    tmp = out / f".gaia_reference.csv.tmp-{os.getpid()}"
    gaia.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, ds.gaia_reference)

    ds.simulation_json = out / "simulation.json"
    psf = moffat_mog(cfg.moffat_beta, cfg.n_gauss)
    meta = dict(seed=seed, pydriftn_version=__version__, config=cfg.to_dict(),
                psf=dict(model="sum of Gaussians approximating a Moffat", beta=cfg.moffat_beta,
                         weights=psf.weights.tolist(), sigmas_in_fwhm=psf.sigmas.tolist(),
                         max_rel_error=psf.max_rel_error, ee_error=psf.ee_error),
                exposures=[{k: v for k, v in e.items()} for e in sched])
    tmp = out / f".simulation.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, ds.simulation_json)
    log.info("simulated %d drift exposures x %d CCDs into %s", len(sched), len(cfg.ccds), out)
    return ds


_TRUTH_NAMES = ("stars", "events", "trails", "pointed", "lightcurves", "common", "flashes", "satellites",
                "cosmic_rays", "wcs")


def load_dataset(out_dir):
    """Re-open a dataset written by :func:`simulate_dataset` (from ``simulation.json``).

    Raises
    ------
    FileMissingError
        If ``simulation.json`` is not in ``out_dir``.
    """
    from ..errors import FileMissingError, InputFileError

    out = Path(out_dir)
    meta_path = out / "simulation.json"
    if not meta_path.is_file():
        raise FileMissingError("not a simulated dataset (simulation.json missing)", path=meta_path)
    try:
        meta = json.loads(meta_path.read_text())
        cfg = make_config(meta["config"])
    except (ValueError, KeyError) as exc:
        raise InputFileError(f"cannot read the simulation parameters: {exc}", path=meta_path) from None
    ds = SimulatedDataset(out_dir=out, config=cfg, seed=int(meta["seed"]))
    for e in meta["exposures"]:
        ds.expnums.append(int(e["expnum"]))
        fz = bool(e.get("fz", False))
        ds.drift_images[int(e["expnum"])] = out / e["dir"] / drift_image_name(e["expnum"], "image", fz)
        ds.drift_masks[int(e["expnum"])] = out / e["dir"] / drift_image_name(e["expnum"], "dqmask", fz)
    for band in ("g", "r"):
        ds.pointed_images[band] = out / "pointed" / pointed_image_name(band, "image")
        ds.pointed_masks[band] = out / "pointed" / pointed_image_name(band, "dqmask")
    for name in _TRUTH_NAMES:
        ds.truth[name] = out / "truth" / f"{name}.parquet"
    ds.gaia_reference = out / "gaia_reference.csv"
    ds.simulation_json = meta_path
    return ds
