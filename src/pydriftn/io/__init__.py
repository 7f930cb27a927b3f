"""FITS input/output for pydriftn.

* :mod:`pydriftn.io.fits` — open DECam CP multi-extension images (``.fits``
  memory-mapped, ``.fits.fz`` tile-compressed), list CCDs, read one CCD
  (:class:`CCDImage`: float32 pixels, merged header, WCS, :class:`HeaderInfo`,
  decoded dq mask), :func:`describe` a file.
* :mod:`pydriftn.io.headers` — header conventions (:class:`HeaderInfo`,
  per-amplifier maps, primary-header inheritance).
* :mod:`pydriftn.io.masks` — find the dq mask beside an image, read it,
  decode CP codes/bits to the :class:`pydriftn.flags.PixelFlag` bitmask.
* :mod:`pydriftn.io.writers` — atomic writers for products.

Every failure raises a typed error from :mod:`pydriftn.errors` naming the
file and the extension.
"""

from .fits import (
    CCDImage,
    describe,
    list_ccds,
    open_fits,
    read_ccd,
    read_header,
    read_primary_header,
    wcs_from_header,
)
from .headers import DECAM_DEFAULTS, HeaderInfo, amp_map, band_from_filter, merge_headers
from .masks import (
    CP_DQ_BITS,
    CP_DQ_CODES,
    bad_pixel_mask,
    decode_cp_dq,
    detect_dq_convention,
    find_mask,
    read_mask,
)
from .writers import atomic_path, fsync_paths, write_bytes_atomic, write_fits_atomic, write_table_atomic

__all__ = [
    "CCDImage",
    "HeaderInfo",
    "DECAM_DEFAULTS",
    "CP_DQ_CODES",
    "CP_DQ_BITS",
    "open_fits",
    "list_ccds",
    "read_primary_header",
    "read_header",
    "read_ccd",
    "wcs_from_header",
    "describe",
    "merge_headers",
    "amp_map",
    "band_from_filter",
    "find_mask",
    "read_mask",
    "decode_cp_dq",
    "detect_dq_convention",
    "bad_pixel_mask",
    "atomic_path",
    "write_bytes_atomic",
    "write_table_atomic",
    "fsync_paths",
    "write_fits_atomic",
]
