"""Data-quality masks: finding the mask beside an image, reading and decoding it.

The DECam Community Pipeline (CP) has written its ``ood`` / ``dqmask`` files
in two conventions:

``codes`` (CP >= V3.5.0, i.e. all recent InstCal products; also what
:mod:`pydriftn.simulate` writes)
    one integer code per pixel: 0 good, 1 bad pixel, 2 hot / no value,
    3 saturated, 4 bleed trail, 5 cosmic ray, 6 low weight, 7 transient
    (multi-exposure difference detection), 8 streak (satellite).

``bits`` (CP < V3.5.0)
    a bitmask: 1 bad pixel, 2 saturated, 4 interpolated, 16 cosmic ray,
    64 bleed trail, 128 transient, 256 edge, 512 edge2, 2048 long thin streak.

(The version boundary is the one used by the Legacy Surveys pipeline,
``legacypipe.decam.decam_has_dq_codes``.) Both are decoded to the internal
:class:`~pydriftn.flags.PixelFlag` bitmask (``uint16``). Values outside the
convention (unknown codes or bits, negative values) become ``BAD_PIXEL``, with
a warning giving their number.

``dq_convention='auto'`` decides as follows:

1. if the mask's (merged) header has ``PLVER`` (CP version, e.g. ``'V4.8.2a'``),
   ``codes`` for versions >= 3.5.0, else ``bits``;
2. otherwise from the values: ``codes`` if all values are in 0..8, else
   ``bits``.

Rule 2 cannot tell an old bit-valued mask that happens to hold only the
values 0, 1, 2, 4 or 8 (and has no ``PLVER``) from a code mask; decode such
files with ``dq_convention='bits'`` explicitly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from ..errors import MaskError
from ..flags import DEFAULT_BAD_PIXEL_FLAGS, PIXEL_DTYPE, PixelFlag, encode_flags

__all__ = [
    "CP_DQ_CODES",
    "CP_DQ_BITS",
    "find_mask",
    "read_mask",
    "decode_cp_dq",
    "detect_dq_convention",
    "bad_pixel_mask",
]

log = logging.getLogger(__name__)

#: CP integer dq code → internal pixel flag.
CP_DQ_CODES = {
    0: PixelFlag(0),
    1: PixelFlag.BAD_PIXEL,
    2: PixelFlag.BAD_PIXEL,  # hot pixel / no value
    3: PixelFlag.SATURATED,
    4: PixelFlag.BLEED,
    5: PixelFlag.COSMIC_RAY,
    6: PixelFlag.LOW_WEIGHT,
    7: PixelFlag.TRANSIENT,
    8: PixelFlag.STREAK,
}

#: CP dq bit (old CP) → (CP name, internal pixel flag).
CP_DQ_BITS = {
    1: ("badpix", PixelFlag.BAD_PIXEL),
    2: ("satur", PixelFlag.SATURATED),
    4: ("interp", PixelFlag.INTERPOLATED),
    16: ("cr", PixelFlag.COSMIC_RAY),
    64: ("bleed", PixelFlag.BLEED),
    128: ("trans", PixelFlag.TRANSIENT),
    256: ("edge", PixelFlag.EDGE),
    512: ("edge2", PixelFlag.EDGE),
    2048: ("longthin", PixelFlag.STREAK),
}

_CODES_LUT = np.array([int(CP_DQ_CODES[k]) for k in range(9)], dtype=PIXEL_DTYPE)
_KNOWN_BITS = sum(CP_DQ_BITS)
_FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fits", ".fit", ".fz")


# --------------------------------------------------------------------------- discovery
def _split_suffix(name: str):
    low = name.lower()
    for s in _FITS_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)], name[-len(s):]
    return name, ""


def _replace_last(s: str, old: str, new: str):
    k = s.rfind(old)
    return None if k < 0 else s[:k] + new + s[k + len(old):]


def find_mask(image_path, img_keyword="image", mask_keyword="dqmask"):
    """The dq-mask file beside an image, found from the file name, or None.

    Candidate names (first existing one wins), each tried with the image's
    suffix and then ``.fits``, ``.fits.fz``:

    1. the last occurrence of ``img_keyword`` in the name (without suffix)
       replaced by ``mask_keyword`` (``...-image.fits`` → ``...-dqmask.fits``);
    2. CP names: the last ``_ooi_`` (else ``ooi``) replaced by ``_ood_`` / ``ood``
       (``c4d_..._ooi_g_ls9.fits.fz`` → ``c4d_..._ood_g_ls9.fits.fz``).

    The image itself is never returned.

    Parameters
    ----------
    image_path : str or os.PathLike
    img_keyword, mask_keyword : str

    Returns
    -------
    pathlib.Path or None
    """
    image_path = Path(image_path)
    stem, suffix = _split_suffix(image_path.name)
    stems = []
    if img_keyword and mask_keyword:
        s = _replace_last(stem, img_keyword, mask_keyword)
        if s is not None:
            stems.append(s)
    for old, new in (("_ooi_", "_ood_"), ("ooi", "ood")):
        s = _replace_last(stem, old, new)
        if s is not None:
            stems.append(s)
            break
    suffixes = [suffix] + [s for s in (".fits", ".fits.fz") if s != suffix]
    tried = []
    for s in dict.fromkeys(stems):
        for suf in suffixes:
            cand = image_path.with_name(s + suf)
            if cand.name == image_path.name:
                continue
            tried.append(cand.name)
            if cand.is_file():
                log.debug("%s: dq mask %s", image_path, cand)
                return cand
    log.debug("%s: no dq mask (tried %s)", image_path, ", ".join(tried) or "nothing")
    return None


# --------------------------------------------------------------------------- decoding
def _plver_tuple(plver):
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", str(plver))
    if not m:
        return None
    return tuple(int(g or 0) for g in m.groups())


def detect_dq_convention(dq, header=None):
    """``('codes' | 'bits', reason)`` for a CP dq array (rules in the module docstring)."""
    dq = np.asarray(dq)
    lohi = (int(dq.min()), int(dq.max())) if dq.size else None
    return _detect(lohi, header)


def _detect(lohi, header):
    if header is not None and header.get("PLVER") is not None:
        v = _plver_tuple(header.get("PLVER"))
        if v is not None:
            conv = "codes" if v >= (3, 5, 0) else "bits"
            return conv, f"PLVER={str(header.get('PLVER')).strip()!r}"
    if lohi is None:
        return "codes", "empty mask"
    lo, hi = lohi
    if lo >= 0 and hi <= 8:
        return "codes", f"values in 0..{hi}"
    return "bits", f"values in {lo}..{hi} (max > 8)"


def _bits_lut():
    """Internal flags for every combination of the low 12 CP bits (unknown bits -> BAD_PIXEL)."""
    v = np.arange(1 << 12)
    lut = np.zeros(v.size, dtype=PIXEL_DTYPE)
    for bit, (_, flag) in CP_DQ_BITS.items():
        lut[(v & bit) != 0] |= PIXEL_DTYPE(int(flag))
    lut[(v & ~_KNOWN_BITS) != 0] |= PIXEL_DTYPE(int(PixelFlag.BAD_PIXEL))
    return lut


_BITS_LUT = _bits_lut()


def decode_cp_dq(dq, convention="auto", *, header=None, where=None, return_index=False):
    """Decode a CP dq array to the internal :class:`~pydriftn.flags.PixelFlag` bitmask.

    Zero (good) decodes to zero in both conventions, so only the non-zero
    pixels (a few per cent of a CP mask) are looked up, in small look-up
    tables: one pass over the image finds them (a zero test, which needs no
    byte swap, so a big-endian memory map is read in place), and the output
    is a zeroed image with the decoded flags scattered into it. On a full
    DECam CCD this is ~5x faster than a look-up over every pixel, with
    identical output.

    Parameters
    ----------
    dq : array_like of int
        The mask as stored in the file.
    convention : {'auto', 'codes', 'bits'}
        See the module docstring.
    header : astropy.io.fits.Header, optional
        Used by ``'auto'`` (``PLVER``).
    where : str, optional
        File/extension named in warnings.
    return_index : bool
        Also return the flat indices (ascending) of the non-zero decoded
        pixels, found here anyway (callers then need no pass over the image
        to find them).

    Returns
    -------
    ndarray of uint16, same shape
    index : ndarray of intp
        With ``return_index``.
    """
    dq = np.asarray(dq)
    where = where or "dq mask"
    if dq.dtype.kind == "f":
        if not np.all(np.isfinite(dq)) or np.any(dq != np.round(dq)):
            raise MaskError(f"{where}: dq mask holds non-integer values (dtype {dq.dtype})")
        dq = dq.astype(np.int64)
    elif dq.dtype.kind == "b":
        dq = dq.view(np.uint8)
    elif dq.dtype.kind not in "iu":
        raise MaskError(f"{where}: dq mask has dtype {dq.dtype}, expected integers")
    if convention not in ("auto", "codes", "bits"):
        raise ValueError(f"dq_convention must be 'auto', 'codes' or 'bits', got {convention!r}")
    # the non-zero pixels: a zero test is independent of the byte order
    nonzero = dq.view(dq.dtype.newbyteorder("=")) != 0
    idx = np.flatnonzero(nonzero)
    vals = (dq.reshape(-1)[idx] if dq.flags.c_contiguous else dq[nonzero]).astype(np.int64)
    del nonzero
    if dq.size == 0:
        lohi = None
    else:
        lo = int(vals.min()) if vals.size else 0
        hi = int(vals.max()) if vals.size else 0
        if idx.size < dq.size:  # zeros present
            lo, hi = min(lo, 0), max(hi, 0)
        lohi = (lo, hi)
    if convention == "auto":
        convention, reason = _detect(lohi, header)
        log.debug("%s: decoding as CP %s (%s)", where, convention, reason)
    if convention == "codes":
        flags = np.take(_CODES_LUT, vals, mode="clip")
        unknown = (vals < 0) | (vals > 8)
        if unknown.any():
            log.warning("%s: %d pixel(s) with unknown CP dq code(s) %s; flagged BAD_PIXEL",
                        where, int(np.count_nonzero(unknown)), np.unique(vals[unknown])[:10].tolist())
            flags[unknown] = int(PixelFlag.BAD_PIXEL)
    else:
        # bits: one look-up over the low 12 bits; negatives and higher bits are unknown
        low = np.where(vals < 0, 0, vals) & 0xFFF
        flags = np.take(_BITS_LUT, low)
        unknown = (vals < 0) | (vals > 0xFFF) | ((low & ~_KNOWN_BITS) != 0)
        if unknown.any():
            flags[unknown] |= PIXEL_DTYPE(int(PixelFlag.BAD_PIXEL))
            log.warning("%s: %d pixel(s) with unknown CP dq bit(s) (values e.g. %s); flagged BAD_PIXEL",
                        where, int(np.count_nonzero(unknown)), np.unique(vals[unknown])[:10].tolist())
    out = np.zeros(dq.shape, dtype=PIXEL_DTYPE)
    out.reshape(-1)[idx] = flags
    if return_index:
        nz = flags != 0
        return out, (idx if nz.all() else idx[nz])
    return out


def bad_pixel_mask(bitmask, flags=DEFAULT_BAD_PIXEL_FLAGS):
    """Boolean image: pixels of a decoded bitmask carrying any of ``flags``.

    Parameters
    ----------
    bitmask : ndarray of uint
        Decoded :class:`~pydriftn.flags.PixelFlag` mask.
    flags : int, str or iterable of str
        Which flags count as bad (default
        :data:`~pydriftn.flags.DEFAULT_BAD_PIXEL_FLAGS`); names like
        ``'BAD_PIXEL|SATURATED'`` are accepted.
    """
    if not isinstance(flags, (int, np.integer)):
        flags = encode_flags(flags, "pixel")
    return (np.asarray(bitmask) & int(flags)) != 0


# --------------------------------------------------------------------------- reading
def read_mask(path, ccd, shape=None, *, image_path=None, dq_convention="auto", memmap=True, return_index=False):
    """Read and decode extension ``ccd`` of a dq-mask file.

    Parameters
    ----------
    path : str or os.PathLike
        The mask file (``.fits`` or ``.fits.fz``).
    ccd : str or int
        EXTNAME or HDU index.
    shape : (ny, nx), optional
        The image's shape; a different mask shape raises :class:`MaskError`.
    image_path : str or os.PathLike, optional
        The image, named in the shape-mismatch message.
    dq_convention : {'auto', 'codes', 'bits'}
        See :func:`decode_cp_dq`.
    return_index : bool
        Also return the flat indices of its non-zero pixels (see :func:`decode_cp_dq`).

    Returns
    -------
    ndarray of uint16
        :class:`~pydriftn.flags.PixelFlag` bitmask.
    index : ndarray of intp
        With ``return_index``.

    Raises
    ------
    FileMissingError, NotFITSError, TruncatedFileError, MissingExtensionError, MaskError
    """
    from .fits import _find_hdu, _merged_header, open_fits

    path = Path(path)
    with open_fits(path, memmap=memmap) as hdul:
        i, name, hdu = _find_hdu(hdul, ccd, path)
        header = _merged_header(hdul, i, hdu)
        try:
            raw = hdu.data
        except (TypeError, ValueError, OSError) as exc:
            raise MaskError(f"cannot read the mask pixels ({exc})", path=path, extension=name) from exc
        if raw is None or raw.ndim != 2:
            raise MaskError(f"expected a 2-D mask, got {None if raw is None else raw.shape}",
                            path=path, extension=name)
        if shape is not None and tuple(raw.shape) != tuple(int(s) for s in shape):
            img = f"image {image_path}[{name}]" if image_path is not None else "the image"
            raise MaskError(
                f"mask shape {tuple(raw.shape)} (ny, nx) does not match {img} shape "
                f"{tuple(int(s) for s in shape)}",
                path=path,
                extension=name,
            )
        # decoded while the file is open, straight from the (memory-mapped) pixels:
        # the result is a new array, so no private copy of the raw mask is needed
        return decode_cp_dq(raw, dq_convention, header=header, where=f"{path}[{name}]", return_index=return_index)
