"""Units of work: one CCD of one drift exposure, found in the night folders.

A night folder holds drift images (file names containing ``img_keyword``)
and, beside each, an optional dq mask (``mask_keyword``). Listing a night is
cheap: only primary headers and extension names are read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import PydriftnError

log = logging.getLogger(__name__)

__all__ = ["Unit", "Skip", "discover_units", "file_fingerprint", "content_fingerprint",
           "config_fingerprint"]


@dataclass(frozen=True, order=True)
class Unit:
    """One CCD of one drift exposure.

    Attributes
    ----------
    night : str
        Name of the night folder (used for output sub-folders).
    expnum : int
        Exposure number (``EXPNUM``).
    ccd : str
        CCD extension name (``EXTNAME``).
    image_path : str
        Drift image (multi-extension FITS).
    mask_path : str or None
        Its dq mask, when read.
    """

    night: str
    expnum: int
    ccd: str
    image_path: str
    mask_path: str | None = None

    @property
    def key(self) -> str:
        """Stable identifier ``night/exp_{EXPNUM}/{ccd}``."""
        return f"{self.night}/exp_{self.expnum}/{self.ccd}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skip:
    """Something that was not processed, and why."""

    what: str
    reason: str


def file_fingerprint(path) -> dict | None:
    """Size and modification time of a file: enough to notice a changed input."""
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def content_fingerprint(path) -> str | None:
    """SHA-256 of a file's content (for inputs that may move, like a catalogue)."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_fingerprint(obj) -> str:
    """SHA-256 of a JSON-able object (the configuration that shapes a unit's output)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_image_name(name: str, img_keyword: str, mask_keyword: str) -> bool:
    if mask_keyword and mask_keyword in name:
        return False
    if img_keyword in name:
        return True
    # CP names: ooi = image, ood = dq mask, oow = weight
    return img_keyword == "image" and "_ooi_" in name


def _prefer_uncompressed(files):
    """Drop ``X.fits.fz``/``X.fits.gz`` when ``X.fits`` is present too (same exposure)."""
    names = {p.name for p in files}
    keep = []
    for p in files:
        for suffix in (".fz", ".gz"):
            if p.name.endswith(suffix) and p.name[: -len(suffix)] in names:
                log.info("%s: using the uncompressed copy %s", p, p.name[: -len(suffix)])
                break
        else:
            keep.append(p)
    return keep


def discover_units(drifts_dirs, *, img_keyword="image", mask_keyword="dqmask", read_mask=True,
                   ccds=None, image_glob="*.fits*"):
    """List the (exposure, CCD) units of the given night folders.

    Parameters
    ----------
    drifts_dirs : list of path
        Night folders.
    img_keyword, mask_keyword : str
        File-name keywords of images and dq masks.
    read_mask : bool
        Look for the dq mask beside each image.
    ccds : list of str, optional
        CCDs to process; ``None`` takes every CCD of each file.
    image_glob : str
        File pattern inside a night folder.

    Returns
    -------
    units : list of Unit
        Sorted by night, exposure number and CCD.
    skipped : list of Skip
        Files or CCDs that cannot be processed, with the reason.
    """
    from ..io import find_mask, list_ccds, read_primary_header

    units: list[Unit] = []
    skipped: list[Skip] = []
    seen_names = set()
    for night_dir in drifts_dirs:
        night_dir = Path(night_dir)
        night = night_dir.name or night_dir.resolve().name
        if night in seen_names:
            night = f"{night}_{len(seen_names)}"
        seen_names.add(night)
        files = sorted(p for p in night_dir.glob(image_glob)
                       if p.is_file() and _is_image_name(p.name, img_keyword, mask_keyword))
        files = _prefer_uncompressed(files)
        if not files:
            skipped.append(Skip(str(night_dir), f"no image files matching {image_glob!r} "
                                                f"with keyword {img_keyword!r}"))
            continue
        for path in files:
            try:
                primary = read_primary_header(path)
                expnum = primary.get("EXPNUM")
                if expnum is None:
                    raise PydriftnError(f"{path}: primary header has no EXPNUM")
                present = list_ccds(path)
            except PydriftnError as exc:
                skipped.append(Skip(str(path), str(exc)))
                log.warning("skipping %s: %s", path, exc)
                continue
            mask_path = None
            if read_mask:
                mask = find_mask(path, img_keyword=img_keyword, mask_keyword=mask_keyword)
                if mask is None:
                    log.warning("%s: no dq mask found (keyword %r); cosmic rays will be "
                                "detected from the image", path, mask_keyword)
                else:
                    mask_path = str(mask)
            wanted = present if ccds is None else list(ccds)
            for ccd in wanted:
                if ccd not in present:
                    skipped.append(Skip(f"{path}[{ccd}]", f"CCD {ccd} not in file "
                                        f"(present: {', '.join(present)})"))
                    continue
                units.append(Unit(night, int(expnum), ccd, str(path), mask_path))
    units.sort()
    return units, skipped
