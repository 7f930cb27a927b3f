"""Reading DECam Community Pipeline multi-extension FITS images.

Plain ``.fits`` files are opened memory-mapped (``astropy.io.fits``,
``memmap=True``), so reading one CCD of a 62-CCD exposure touches only that
CCD's bytes; tile-compressed ``.fits.fz`` (``CompImageHDU``) cannot be
memory-mapped and the requested CCD is decompressed in memory.

Every failure is turned into a typed error from :mod:`pydriftn.errors` that
names the file and the extension: :class:`~pydriftn.errors.FileMissingError`,
:class:`~pydriftn.errors.NotFITSError`, :class:`~pydriftn.errors.TruncatedFileError`,
:class:`~pydriftn.errors.MissingExtensionError`, :class:`~pydriftn.errors.WCSError`,
:class:`~pydriftn.errors.EmptyDataError`. Astropy reports a truncated file in
several ways (a ``VerifyWarning`` about a partial header block and fewer
HDUs, an ``AstropyUserWarning`` plus ``TypeError`` from a short memory map,
an ``OSError``), so the file structure is checked here explicitly: every
header must be complete and the file must hold every data byte the headers
announce.

Why not ccdproc: its ``CCDData`` reader does not merge inherited primary
cards, does not read ``.fits.fz`` CCDs by EXTNAME with our error types, and
would add a dependency for a few lines of astropy.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (
    EmptyDataError,
    FileMissingError,
    MaskError,
    MissingExtensionError,
    NotFITSError,
    TruncatedFileError,
    WCSError,
)
from ..flags import DEFAULT_BAD_PIXEL_FLAGS
from .headers import HeaderInfo, merge_headers

__all__ = [
    "CCDImage",
    "open_fits",
    "list_ccds",
    "read_primary_header",
    "read_header",
    "read_ccd",
    "wcs_from_header",
    "describe",
]

log = logging.getLogger(__name__)

_BLOCK = 2880
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- opening
def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileMissingError("file does not exist", path=path)
    if not path.is_file():
        raise NotFITSError("not a regular file (a directory?)", path=path)
    size = path.stat().st_size
    if size == 0:
        raise TruncatedFileError("file is empty (0 bytes); an interrupted copy?", path=path)
    with open(path, "rb") as fh:
        head = fh.read(30)
    if head.startswith(_GZIP_MAGIC):
        return path  # gzip-compressed FITS: let astropy decide
    if not head.startswith(b"SIMPLE  ="):
        shown = head[:20].decode("ascii", "replace").encode("unicode_escape").decode()
        raise NotFITSError(
            f"not a FITS file: it does not start with 'SIMPLE  =' (starts with {shown!r})", path=path
        )
    return path


def _is_compressed(hdu) -> bool:
    from astropy.io import fits

    return isinstance(hdu, fits.CompImageHDU)


def _check_structure(hdul, path: Path, caught) -> None:
    """Raise TruncatedFileError if a header is incomplete or data bytes are missing."""
    for w in caught:
        text = str(w.message)
        if "Error validating header for HDU" in text or "Header missing END card" in text:
            detail = " ".join(text.split())
            raise TruncatedFileError(
                f"file ends inside (or is corrupt after) the header of HDU #{len(hdul)} "
                f"({len(hdul)} complete HDU(s) read; astropy: {detail[:200]})",
                path=path,
            )
    with open(path, "rb") as fh:
        gz = fh.read(2) == _GZIP_MAGIC
    size = _gzip_length(path) if gz else path.stat().st_size
    for i, hdu in enumerate(hdul):
        info = hdul.fileinfo(i)
        if info is None:
            continue
        dat_loc, dat_span = int(info["datLoc"]), int(info["datSpan"])
        if size >= dat_loc + dat_span:
            continue
        # padded span missing: is a data byte missing, or only padding?
        if _is_compressed(hdu):
            needed = dat_span  # the table's exact size is not public; demand the padded span
        else:
            needed = int(getattr(hdu, "size", dat_span) or 0)
        name = _hdu_name(hdu, i)
        if size < dat_loc + needed:
            raise TruncatedFileError(
                f"file is truncated: {size} bytes, but the data of HDU #{i} ({name}) need "
                f"{dat_loc + needed} bytes",
                path=path,
                extension=name,
            )
        log.warning("%s: file lacks the final FITS padding of HDU #%d (%s); data are complete",
                    path, i, name)
    if gz and len(hdul):
        info = hdul.fileinfo(len(hdul) - 1)
        end = int(info["datLoc"]) + int(info["datSpan"])
        if size >= end + _BLOCK:
            raise TruncatedFileError(
                f"{size - end} bytes after the last complete HDU #{len(hdul) - 1} "
                "(a truncated or corrupt extension?)",
                path=path,
            )


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file; TruncatedFileError if the stream ends early."""
    import gzip
    import zlib

    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                n += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TruncatedFileError(f"gzip stream ends early or is corrupt ({exc})", path=path) from exc
    return n


@contextmanager
def open_fits(path, *, memmap=True):
    """Open a FITS file with checks; yields an ``astropy.io.fits.HDUList``.

    All headers are read and the file structure is checked (see the module
    docstring). Use as ``with open_fits(p) as hdul: ...``.

    Parameters
    ----------
    path : str or os.PathLike
    memmap : bool
        Memory-map plain images (ignored by astropy for compressed HDUs).

    Raises
    ------
    FileMissingError, NotFITSError, TruncatedFileError
    """
    from astropy.io import fits

    path = _check_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=memmap, mode="readonly")
        except EOFError as exc:  # gzip stream ends early
            raise TruncatedFileError(f"compressed stream ends early ({exc})", path=path) from exc
        except (OSError, ValueError, TypeError, IndexError) as exc:
            size = path.stat().st_size
            if size % _BLOCK != 0 or size < _BLOCK:
                raise TruncatedFileError(
                    f"file is truncated: {size} bytes is not a whole number of 2880-byte "
                    f"FITS blocks and astropy cannot read it ({exc})",
                    path=path,
                ) from exc
            raise NotFITSError(f"corrupt FITS file, astropy cannot open it ({exc})", path=path) from exc
        try:
            hdul.readall()
        except Exception as exc:  # noqa: BLE001 - any failure here means a damaged file
            hdul.close()
            raise TruncatedFileError(f"cannot read all headers ({exc})", path=path) from exc
    try:
        _check_structure(hdul, path, [w for w in caught if w.category is not ResourceWarning])
    except Exception:
        hdul.close()
        raise
    try:
        yield hdul
    finally:
        hdul.close()


# --------------------------------------------------------------------------- HDUs
def _hdu_name(hdu, index: int) -> str:
    name = hdu.header.get("EXTNAME")
    if name is None or not str(name).strip():
        name = hdu.header.get("DETPOS")
    if name is None or not str(name).strip():
        return "PRIMARY" if index == 0 else f"HDU{index}"
    return str(name).strip()


def _image_hdus(hdul):
    """(index, name, hdu) of the 2-D image HDUs."""
    out = []
    for i, hdu in enumerate(hdul):
        if not getattr(hdu, "is_image", False):
            continue
        hdr = hdu.header
        naxis = hdr.get("ZNAXIS", hdr.get("NAXIS", 0)) if _is_compressed(hdu) else hdr.get("NAXIS", 0)
        if naxis != 2:
            continue
        out.append((i, _hdu_name(hdu, i), hdu))
    return out


def _find_hdu(hdul, ccd, path):
    """(index, name, hdu) of extension ``ccd`` (EXTNAME, case-insensitive, or integer index)."""
    images = _image_hdus(hdul)
    if isinstance(ccd, (int, np.integer)) and not isinstance(ccd, bool):
        idx = int(ccd)
        for i, name, hdu in images:
            if i == idx:
                return i, name, hdu
        present = [f"{i}:{n}" for i, n, _ in images]
        raise MissingExtensionError(
            f"no 2-D image HDU at index {idx} (image HDUs present: {', '.join(present) or 'none'})",
            path=path,
            extension=idx,
        )
    want = str(ccd).strip().upper()
    for i, name, hdu in images:
        if name.upper() == want:
            return i, name, hdu
    for i, hdu in enumerate(hdul):  # named, but not a 2-D image (empty HDU, table, cube)
        if _hdu_name(hdu, i).upper() == want:
            name = _hdu_name(hdu, i)
            naxis = hdu.header.get("NAXIS", 0)
            if getattr(hdu, "is_image", False):
                dims = [hdu.header.get(f"NAXIS{k}") for k in range(1, naxis + 1)]
                what = f"NAXIS = {naxis}" + (f", axes {dims}" if dims else ", no pixels")
            else:
                what = f"it is a {type(hdu).__name__}"
            raise EmptyDataError(f"extension is not a 2-D image ({what})", path=path, extension=name)
    present = [n for _, n, _ in images]
    raise MissingExtensionError(
        f"extension {str(ccd).strip()!r} not found (image extensions present: "
        f"{', '.join(present) or 'none'})",
        path=path,
        extension=str(ccd).strip(),
    )


def list_ccds(path) -> list[str]:
    """Names (EXTNAME) of the 2-D image extensions, in file order.

    A 2-D image without EXTNAME is listed by ``DETPOS``, else as ``'PRIMARY'``
    (HDU 0) or ``'HDU<i>'``; :func:`read_ccd` accepts these names.
    """
    with open_fits(path) as hdul:
        return [name for _, name, _ in _image_hdus(hdul)]


def read_primary_header(path):
    """The primary header (``astropy.io.fits.Header``, a copy)."""
    with open_fits(path) as hdul:
        return hdul[0].header.copy()


def read_header(path, ccd):
    """Header of extension ``ccd`` merged with the primary header (see
    :func:`pydriftn.io.merge_headers`)."""
    with open_fits(path) as hdul:
        i, name, hdu = _find_hdu(hdul, ccd, path)
        return _merged_header(hdul, i, hdu)


def _merged_header(hdul, i, hdu):
    hdr = hdu.header
    if i == 0:
        return hdr.copy()
    return merge_headers(hdul[0].header, hdr)


# --------------------------------------------------------------------------- WCS
def wcs_from_header(header, *, path=None, extname=None, shape=None):
    """Celestial WCS of a header, checked to give finite sky positions.

    TAN and TPV (CP) projections are supported (astropy/wcslib treat TPV as a
    polynomial distortion); SIP too.

    Parameters
    ----------
    header : astropy.io.fits.Header
    path, extname : optional
        Named in the error message.
    shape : (ny, nx), optional
        Image shape for the sanity check (default from NAXIS1/2).

    Raises
    ------
    WCSError
        No celestial WCS keys, astropy cannot parse them, or they give
        non-finite / non-invertible coordinates on the image.
    """
    from astropy.wcs import WCS

    ct1, ct2 = header.get("CTYPE1"), header.get("CTYPE2")
    if not ct1 or not ct2:
        missing = [k for k, v in (("CTYPE1", ct1), ("CTYPE2", ct2)) if not v]
        raise WCSError(
            f"no celestial WCS: header key(s) {', '.join(missing)} missing "
            "(expected e.g. RA---TAN/DEC--TAN or RA---TPV/DEC--TPV)",
            path=path,
            extension=extname,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning on RADECSYS, DATE-END, ...
            wcs = WCS(header, relax=True, naxis=2)
    except Exception as exc:  # noqa: BLE001 - wcslib raises many types
        raise WCSError(f"unusable WCS ({type(exc).__name__}: {exc})", path=path, extension=extname) from exc
    if not wcs.has_celestial or wcs.naxis != 2:
        raise WCSError(
            f"WCS is not celestial (CTYPE1={ct1!r}, CTYPE2={ct2!r}; expected RA/DEC axes)",
            path=path,
            extension=extname,
        )
    if shape is None:
        nx = header.get("ZNAXIS1", header.get("NAXIS1"))
        ny = header.get("ZNAXIS2", header.get("NAXIS2"))
        shape = (int(ny or 1), int(nx or 1))
    ny, nx = shape
    xs = np.array([(nx - 1) / 2.0, 0.0, nx - 1.0, 0.0, nx - 1.0])
    ys = np.array([(ny - 1) / 2.0, 0.0, 0.0, ny - 1.0, ny - 1.0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ra, dec = wcs.pixel_to_world_values(xs, ys)
            xb, yb = wcs.world_to_pixel_values(ra[:1], dec[:1])
    except Exception as exc:  # noqa: BLE001
        raise WCSError(f"WCS cannot transform pixel coordinates ({exc})", path=path, extension=extname) from exc
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise WCSError("WCS gives non-finite sky coordinates on the image", path=path, extension=extname)
    if not (abs(float(xb[0]) - xs[0]) < 0.01 and abs(float(yb[0]) - ys[0]) < 0.01):
        raise WCSError("WCS does not invert (pixel -> sky -> pixel differs by > 0.01 px)",
                       path=path, extension=extname)
    return wcs


# --------------------------------------------------------------------------- CCD image
@dataclass(frozen=True)
class CCDImage:
    """One CCD of an exposure, as read by :func:`read_ccd`.

    Attributes
    ----------
    data : ndarray, float32, shape (ny, nx)
        Pixels in ADU (native byte order, a private copy), indexed ``data[y, x]``.
    header : astropy.io.fits.Header
        Extension header merged with the primary header.
    wcs : astropy.wcs.WCS or None
        Celestial WCS (None only with ``require_wcs=False`` and no usable WCS).
    info : HeaderInfo
        Typed header values.
    path : str
        The image file.
    extname : str
        The extension's name.
    mask : ndarray of uint16 or None
        Decoded :class:`~pydriftn.flags.PixelFlag` bitmask (``None`` if no dq
        mask was read); read-only, so that ``mask_index`` stays valid (copy it
        to modify it).
    mask_path : str or None
        The dq-mask file, when ``mask`` was read.
    mask_index : ndarray of intp or None
        Flat indices (ascending) of the non-zero pixels of ``mask``, found
        while decoding it (None without a mask): consumers need no pass over
        the image to find the flagged pixels.
    """

    data: np.ndarray
    header: object
    wcs: object
    info: HeaderInfo
    path: str
    extname: str
    mask: np.ndarray | None = None
    mask_path: str | None = None
    mask_index: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def bad_pixels(self, flags=DEFAULT_BAD_PIXEL_FLAGS):
        """Boolean image: pixels carrying any of ``flags`` (int or names) or non-finite."""
        from .masks import bad_pixel_mask

        bad = ~np.isfinite(self.data)
        if self.mask is not None:
            bad |= bad_pixel_mask(self.mask, flags)
        return bad


def _read_pixels(hdu, path, name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", category=UserWarning)  # astropy's "truncated" warning
            raw = hdu.data
    except (TypeError, ValueError, OSError, EOFError, UserWarning) as exc:
        raise TruncatedFileError(f"cannot read the pixels ({type(exc).__name__}: {exc})",
                                 path=path, extension=name) from exc
    if raw is None or raw.size == 0:
        raise EmptyDataError("extension has no pixels (NAXIS = 0 or empty data)", path=path, extension=name)
    if raw.ndim != 2:
        raise EmptyDataError(f"expected a 2-D image, got shape {raw.shape}", path=path, extension=name)
    data = np.array(raw, dtype=np.float32, order="C")  # native-endian private copy
    # a finite maximum means no NaN and at least one finite pixel: the full-image test only when it is not
    if not np.isfinite(data.max()) and not np.isfinite(data).any():
        raise EmptyDataError(f"all {data.size} pixels are NaN or inf", path=path, extension=name)
    return data


def read_ccd(path, ccd, *, mask=None, img_keyword="image", mask_keyword="dqmask",
             dq_convention="auto", require_wcs=True, require_timing=False, memmap=True) -> CCDImage:
    """Read one CCD: float32 pixels, merged header, WCS, header values and (optionally) the dq mask.

    Parameters
    ----------
    path : str or os.PathLike
        ``.fits`` or ``.fits.fz`` (multi-extension) image.
    ccd : str or int
        EXTNAME (case-insensitive, e.g. ``'S4'``) or HDU index.
    mask : None, bool or path
        ``None``/``False``: no mask. ``True``: find it with :func:`pydriftn.io.find_mask`
        (``img_keyword`` → ``mask_keyword``, CP ``ooi`` → ``ood``); MaskError if absent.
        A path: read that file.
    dq_convention : {'auto', 'codes', 'bits'}
        How to decode the mask (see :func:`pydriftn.io.decode_cp_dq`).
    require_wcs : bool
        Raise WCSError if the extension has no usable WCS (else ``wcs=None``).
    require_timing : bool
        Raise HeaderError if EXPTIME or the start time is missing (drift images).
    memmap : bool
        Memory-map plain FITS files.

    Returns
    -------
    CCDImage

    Raises
    ------
    FileMissingError, NotFITSError, TruncatedFileError, MissingExtensionError,
    EmptyDataError, WCSError, HeaderError, MaskError
    """
    path = Path(path)
    with open_fits(path, memmap=memmap) as hdul:
        i, name, hdu = _find_hdu(hdul, ccd, path)
        header = _merged_header(hdul, i, hdu)
        data = _read_pixels(hdu, path, name)
    wcs = None
    try:
        wcs = wcs_from_header(header, path=path, extname=name, shape=data.shape)
    except WCSError:
        if require_wcs:
            raise
        log.warning("%s[%s]: no usable WCS; continuing without one", path, name)
    info = HeaderInfo.from_header(header, path=path, extname=name, wcs=wcs, require_timing=require_timing)
    mask_arr, mask_path, mask_index = None, None, None
    if mask is not None and mask is not False:
        from .masks import find_mask, read_mask

        if mask is True:
            mask_path = find_mask(path, img_keyword=img_keyword, mask_keyword=mask_keyword)
            if mask_path is None:
                raise MaskError(
                    f"no dq mask found beside the image (tried keyword {img_keyword!r} -> "
                    f"{mask_keyword!r} and CP 'ooi' -> 'ood', .fits/.fits.fz)",
                    path=path,
                    extension=name,
                )
        else:
            mask_path = Path(mask)
        mask_arr, mask_index = read_mask(mask_path, name, shape=data.shape, image_path=path,
                                         dq_convention=dq_convention, return_index=True)
        mask_arr.flags.writeable = False  # (mask_index lists its flagged pixels)
        mask_path = str(mask_path)
    return CCDImage(data=data, header=header, wcs=wcs, info=info, path=str(path), extname=name,
                    mask=mask_arr, mask_path=mask_path, mask_index=mask_index)


# --------------------------------------------------------------------------- describe
def describe(path):
    """One row per 2-D image extension: a quick inventory of a file.

    Columns: ``hdu`` (index), ``extname``, ``shape`` ((ny, nx)), ``compressed``,
    ``has_wcs``, ``exptime`` (s), ``mjd`` (UTC), ``band``, ``expnum``.
    Missing values are NaN / None; nothing is raised for a missing key.
    """
    import pandas as pd

    from .headers import _float_or_none, _read_time, band_from_filter

    rows = []
    path = Path(path)
    with open_fits(path) as hdul:
        for i, name, hdu in _image_hdus(hdul):
            hdr = _merged_header(hdul, i, hdu)
            nx = hdr.get("ZNAXIS1", hdr.get("NAXIS1"))
            ny = hdr.get("ZNAXIS2", hdr.get("NAXIS2"))
            try:
                wcs_from_header(hdr, path=path, extname=name)
                has_wcs = True
            except WCSError:
                has_wcs = False
            try:
                mjd, _ = _read_time(hdr, path, name, f"{path}[{name}]")
            except Exception:  # noqa: BLE001
                mjd = None
            exptime = _float_or_none(hdr.get("EXPTIME"))
            expnum = hdr.get("EXPNUM")
            rows.append({
                "hdu": i,
                "extname": name,
                "shape": (int(ny), int(nx)) if nx is not None and ny is not None else None,
                "compressed": _is_compressed(hdu),
                "has_wcs": has_wcs,
                "exptime": np.nan if exptime is None else exptime,
                "mjd": np.nan if mjd is None else mjd,
                "band": band_from_filter(hdr.get("FILTER")) or band_from_filter(hdr.get("BAND")),
                "expnum": None if expnum is None else expnum,
            })
    cols = ["hdu", "extname", "shape", "compressed", "has_wcs", "exptime", "mjd", "band", "expnum"]
    return pd.DataFrame(rows, columns=cols)
