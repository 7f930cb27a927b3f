"""The project's single registry of quality flags.

Two independent bitmasks are defined here, each flag exactly once, with its
bit value, name and a one-line description (the pattern of
``photutils.aperture.ApertureFlags``, written as :class:`enum.IntFlag` so the
values combine with ``|`` and work directly with numpy integer arrays):

:class:`PixelFlag`
    The internal per-pixel bitmask (``uint16``) that :mod:`pydriftn.io`
    produces when it decodes a Community Pipeline data-quality (dq) mask
    (see :func:`pydriftn.io.decode_cp_dq`). A pixel may carry several bits.

:class:`SampleFlag`
    Per-source / per-trail / per-sample flags written into the ``flags``
    columns of the tables of the later stages (extraction, detrending, event
    search, classification).

The two registries are separate on purpose: a pixel flag and a table flag
with the same name (``SATURATED``, ``COSMIC_RAY``) have *different* bit
values. The module-level constants (``pydriftn.flags.SATURATED`` ...) are the
:class:`SampleFlag` members, because tables are what the later stages OR
together; pixel bits are always spelt ``PixelFlag.SATURATED``.

Helpers: :func:`decode_flags` (value → list of names), :func:`encode_flags`
(names → value), :func:`flag_table` (the registry as a DataFrame, for docs and
reports), :func:`has_any` (vectorised test of an array against a set of
flags) and :func:`count_flags` (how many array elements carry each flag).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import numpy as np

__all__ = [
    "PixelFlag",
    "SampleFlag",
    "PIXEL_DTYPE",
    "DEFAULT_BAD_PIXEL_FLAGS",
    "decode_flags",
    "encode_flags",
    "flag_table",
    "has_any",
    "count_flags",
    # module-level SampleFlag constants
    "TRUNCATED",
    "SATURATED",
    "MASKED_PIXELS",
    "COSMIC_RAY",
    "DEBLENDED",
    "BLENDED",
    "NEAR_EDGE",
    "SHUTTER_RAMP",
    "FEW_VALID_SAMPLES",
    "SATELLITE",
    "UNMATCHED",
    "OFF_IMAGE",
    "NO_DATA",
    "OUTLIER_PIXELS",
    "BAD_SKY",
    "NOT_NORMALISED",
    "BLEND_MINOR",
]


class _DescribedFlag(enum.IntFlag):
    """IntFlag whose members carry a ``description`` (defined with the value)."""

    def __new__(cls, value, description=""):
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.description = description
        return obj


class PixelFlag(_DescribedFlag):
    """Bits of the internal per-pixel mask (dtype :data:`PIXEL_DTYPE`)."""

    BAD_PIXEL = 1, "detector bad or hot pixel, bad column, no data"
    SATURATED = 2, "pixel at or above the amplifier's saturation level"
    BLEED = 4, "bleed trail of a saturated star"
    COSMIC_RAY = 8, "cosmic-ray hit"
    LOW_WEIGHT = 16, "low weight (large variance) in the CP weight map"
    TRANSIENT = 32, "multi-exposure transient / difference detection"
    STREAK = 64, "satellite or aircraft streak (long thin feature)"
    EDGE = 128, "CCD edge region flagged by the CP"
    INTERPOLATED = 256, "value interpolated by the CP over a bad pixel"


class SampleFlag(_DescribedFlag):
    """Bits of the ``flags`` columns of per-source, per-trail and per-sample tables."""

    TRUNCATED = 1, "the trail crosses a CCD edge (part of it is off the CCD)"
    SATURATED = 2, "a pixel of the footprint is saturated (or SATURATED/BLEED in the dq mask)"
    MASKED_PIXELS = 4, "dq-masked or non-finite pixels inside the footprint"
    COSMIC_RAY = 8, "cosmic-ray pixels inside the footprint"
    DEBLENDED = 16, "flux separated from an overlapping source by a joint fit"
    BLENDED = 32, "another source overlaps the footprint"
    NEAR_EDGE = 64, "the aperture or extraction window reaches a CCD edge"
    SHUTTER_RAMP = 128, "sample taken while the shutter was opening or closing"
    FEW_VALID_SAMPLES = 256, "too few valid samples in the series for a reliable statistic"
    SATELLITE = 512, "a satellite/aircraft streak crosses the footprint"
    UNMATCHED = 1024, "no catalogue star explains the source"
    OFF_IMAGE = 2048, "the sample's position is outside the CCD"
    NO_DATA = 4096, "no usable pixels for this sample"
    OUTLIER_PIXELS = 8192, "pixels rejected as outliers from the profile fit"
    BAD_SKY = 16384, "local sky estimate failed or is unreliable"
    NOT_NORMALISED = 32768, "the common-pattern normalisation could not be applied"
    BLEND_MINOR = 65536, ("an unresolved fainter source adds up to blend_max_fraction of the flux "
                          "(star's blend_fraction); kept in the series")


#: dtype of the decoded per-pixel mask (holds every :class:`PixelFlag` bit).
PIXEL_DTYPE = np.uint16

#: Pixel flags that make a pixel unusable for photometry by default.
#: ``EDGE``, ``INTERPOLATED`` and ``TRANSIENT`` are *not* in the default: the
#: CP edge bits mark a margin that is still usable, interpolated values are
#: flagged but finite, and a "transient" in a drift image is exactly the kind
#: of signal the pipeline looks for.
DEFAULT_BAD_PIXEL_FLAGS = (
    PixelFlag.BAD_PIXEL
    | PixelFlag.SATURATED
    | PixelFlag.BLEED
    | PixelFlag.COSMIC_RAY
    | PixelFlag.LOW_WEIGHT
    | PixelFlag.STREAK
)

_REGISTRIES = {"pixel": PixelFlag, "sample": SampleFlag}

# module-level constants: the SampleFlag members (see module docstring)
TRUNCATED = SampleFlag.TRUNCATED
SATURATED = SampleFlag.SATURATED
MASKED_PIXELS = SampleFlag.MASKED_PIXELS
COSMIC_RAY = SampleFlag.COSMIC_RAY
DEBLENDED = SampleFlag.DEBLENDED
BLENDED = SampleFlag.BLENDED
NEAR_EDGE = SampleFlag.NEAR_EDGE
SHUTTER_RAMP = SampleFlag.SHUTTER_RAMP
FEW_VALID_SAMPLES = SampleFlag.FEW_VALID_SAMPLES
SATELLITE = SampleFlag.SATELLITE
UNMATCHED = SampleFlag.UNMATCHED
OFF_IMAGE = SampleFlag.OFF_IMAGE
NO_DATA = SampleFlag.NO_DATA
OUTLIER_PIXELS = SampleFlag.OUTLIER_PIXELS
BAD_SKY = SampleFlag.BAD_SKY
NOT_NORMALISED = SampleFlag.NOT_NORMALISED
BLEND_MINOR = SampleFlag.BLEND_MINOR


def _registry(registry) -> type[_DescribedFlag]:
    if isinstance(registry, str):
        try:
            return _REGISTRIES[registry.lower()]
        except KeyError:
            raise ValueError(
                f"unknown flag registry {registry!r}; expected one of {sorted(_REGISTRIES)}"
            ) from None
    if isinstance(registry, type) and issubclass(registry, enum.IntFlag):
        return registry
    raise TypeError(f"registry must be 'pixel', 'sample' or an IntFlag class, got {registry!r}")


def decode_flags(value, registry=None) -> list[str]:
    """Names of the flags set in ``value``, in bit order.

    Parameters
    ----------
    value : int or IntFlag
        A flag value (one table cell, one pixel).
    registry : {'sample', 'pixel'} or IntFlag class, optional
        Which registry the value belongs to. Default: the class of ``value``
        if it is a flag member, else :class:`SampleFlag`.

    Returns
    -------
    list of str
        Member names; bits not defined in the registry appear as ``'BIT<n>'``
        (n = bit index), so nothing is silently dropped.
    """
    if registry is None:
        registry = type(value) if isinstance(value, _DescribedFlag) else SampleFlag
    cls = _registry(registry)
    v = int(value)
    if v < 0:
        raise ValueError(f"flag value must be non-negative, got {v}")
    names = [m.name for m in cls if v & int(m)]
    known = 0
    for m in cls:
        known |= int(m)
    rest = v & ~known
    bit = 0
    while rest:
        if rest & 1:
            names.append(f"BIT{bit}")
        rest >>= 1
        bit += 1
    return names


def encode_flags(names, registry="sample") -> int:
    """The value with the named flags set.

    Parameters
    ----------
    names : str or iterable of str
        Flag names (case-insensitive); a single string may hold several names
        separated by ``|`` or ``,``.
    registry : {'sample', 'pixel'} or IntFlag class

    Raises
    ------
    ValueError
        An unknown name (the message lists the known ones).
    """
    cls = _registry(registry)
    if isinstance(names, str):
        names = [n for part in names.split("|") for n in part.split(",")]
    value = 0
    for n in names:
        key = str(n).strip().upper()
        if not key:
            continue
        if key not in cls.__members__:
            raise ValueError(
                f"unknown {cls.__name__} flag {n!r}; known: {', '.join(cls.__members__)}"
            )
        value |= int(cls.__members__[key])
    return value


def flag_table(registry="sample"):
    """The registry as a DataFrame with columns ``bit``, ``value``, ``name``, ``description``."""
    import pandas as pd

    cls = _registry(registry)
    rows = [
        {
            "bit": int(m).bit_length() - 1,
            "value": int(m),
            "name": m.name,
            "description": getattr(m, "description", ""),
        }
        for m in cls
    ]
    return pd.DataFrame(rows, columns=["bit", "value", "name", "description"])


def _as_value(flags, registry) -> int:
    if isinstance(flags, (int, np.integer)):
        return int(flags)
    if isinstance(flags, str) or isinstance(flags, Iterable):
        return encode_flags(flags, registry)
    raise TypeError(f"flags must be an int, a name or names, got {flags!r}")


def has_any(values, flags, registry="sample"):
    """Element-wise: does ``values`` carry any of ``flags``?

    Parameters
    ----------
    values : array_like of int
        Flag values (a mask image or a ``flags`` column).
    flags : int, str or iterable of str
        The flags to test for (value, or names as in :func:`encode_flags`).
    registry : {'sample', 'pixel'} or IntFlag class
        Used to resolve names.

    Returns
    -------
    ndarray of bool
    """
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise TypeError(f"flag values must be integers, got dtype {v.dtype}")
    return (v & _as_value(flags, registry)) != 0


def count_flags(values, registry="sample") -> dict[str, int]:
    """Number of elements of ``values`` carrying each flag of the registry."""
    cls = _registry(registry)
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise TypeError(f"flag values must be integers, got dtype {v.dtype}")
    return {m.name: int(np.count_nonzero(v & int(m))) for m in cls}
