"""Drift-scan geometry: where a star's image is at each instant of an exposure.

Everything about a trail — direction, sense, length, and which instant each
point of it belongs to — follows from four things read from the data: the WCS
of the CCD at shutter open, the drift-rate vector, the exposure time and the
shutter-open time (``DATE-OBS``/``MJD-OBS``). Nothing here assumes that
trails run along x or y, or in which sense.

Convention (see ``docs/DESIGN.md``): the drift-rate vector
``(rate_east, rate_north)`` in arcsec/s says that at ``t_s`` seconds after the
shutter opened the image of a star at ``(ra, dec)`` lies at the pixel where the
shutter-open WCS places the sky point offset from the star by
``(rate_east * t_s, rate_north * t_s)`` arcsec in the tangent plane at the
star. With DECam CP orientation (Dec decreasing along +x) a +Dec drift moves
images towards -x.

The offset is applied with the exact gnomonic deprojection rather than with
:meth:`astropy.coordinates.SkyCoord.spherical_offsets_by`, because it is
called for every star at many instants in hot loops and the closed form is
vectorised and two orders of magnitude faster; it is tested against astropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ARCSEC_PER_RAD",
    "DEFAULT_DRIFT_RATE_ARCSEC_S",
    "TrailGeometry",
    "parse_drift_rate",
    "offset_sky",
    "star_pixel_positions",
    "trail_endpoints",
    "trail_geometry",
    "anchor_to_start",
    "start_to_anchor",
    "sample_times_mjd",
]

ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0
SECONDS_PER_DAY = 86400.0
#: Default drift-rate vector (east, north) in arcsec/s: 0.5"/s in +Dec.
DEFAULT_DRIFT_RATE_ARCSEC_S = (0.0, 0.5)


def parse_drift_rate(drift_rate_arcsec_s):
    """Return the drift-rate vector as a ``(east, north)`` tuple of floats.

    Parameters
    ----------
    drift_rate_arcsec_s : float or sequence of two floats or str
        A scalar means a drift in Declination only (``(0, rate)``); a pair
        is ``(east, north)``; a string ``"E,N"`` is parsed as a pair.

    Raises
    ------
    ValueError
        If the value cannot be read as one or two finite numbers, or the
        rate is zero.
    """
    value = drift_rate_arcsec_s
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"drift rate {drift_rate_arcsec_s!r}: expected 'EAST,NORTH' in arcsec/s"
            ) from None
    if np.isscalar(value):
        east, north = 0.0, float(value)
    else:
        seq = list(value)
        if len(seq) == 1:
            east, north = 0.0, float(seq[0])
        elif len(seq) == 2:
            east, north = float(seq[0]), float(seq[1])
        else:
            raise ValueError(
                f"drift rate {drift_rate_arcsec_s!r}: expected one or two numbers "
                "(north) or (east, north) in arcsec/s"
            )
    if not (math.isfinite(east) and math.isfinite(north)):
        raise ValueError(f"drift rate {drift_rate_arcsec_s!r} is not finite")
    if east == 0.0 and north == 0.0:
        raise ValueError("drift rate is zero: a drift scan needs a non-zero drift-rate vector")
    return east, north


def offset_sky(ra_deg, dec_deg, east_arcsec, north_arcsec):
    """Sky position offset from ``(ra, dec)`` by a tangent-plane offset.

    Exact gnomonic deprojection of the standard coordinates
    ``(xi, eta) = (east, north)`` about each input position. All inputs
    broadcast against each other.

    Parameters
    ----------
    ra_deg, dec_deg : array_like
        Positions in degrees.
    east_arcsec, north_arcsec : array_like
        Offsets in arcsec towards +RA and +Dec.

    Returns
    -------
    ra, dec : ndarray
        Offset positions in degrees, RA wrapped into [0, 360).
    """
    ra0 = np.radians(ra_deg)
    dec0 = np.radians(dec_deg)
    xi = np.asarray(east_arcsec, dtype=float) / ARCSEC_PER_RAD
    eta = np.asarray(north_arcsec, dtype=float) / ARCSEC_PER_RAD
    cos_dec0 = np.cos(dec0)
    sin_dec0 = np.sin(dec0)
    denom = cos_dec0 - eta * sin_dec0
    dra = np.arctan2(xi, denom)
    dec = np.arctan2((sin_dec0 + eta * cos_dec0) * np.cos(dra), denom)
    ra = np.mod(np.degrees(ra0 + dra), 360.0)
    return ra, np.degrees(dec)


def star_pixel_positions(wcs, ra_deg, dec_deg, t_s, drift_rate_arcsec_s=DEFAULT_DRIFT_RATE_ARCSEC_S):
    """Pixel position of stars' images at times ``t_s`` after shutter open.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Celestial WCS of the CCD at shutter open.
    ra_deg, dec_deg : array_like
        Star positions (degrees).
    t_s : array_like
        Seconds since shutter open; broadcasts against the positions (pass
        ``ra[:, None]`` and ``t[None, :]`` for a stars × times grid).
    drift_rate_arcsec_s : float or (float, float)
        Drift-rate vector, see :func:`parse_drift_rate`.

    Returns
    -------
    x, y : ndarray
        0-based pixel coordinates.
    """
    east, north = parse_drift_rate(drift_rate_arcsec_s)
    t = np.asarray(t_s, dtype=float)
    ra, dec = offset_sky(ra_deg, dec_deg, east * t, north * t)
    x, y = wcs.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def trail_endpoints(wcs, ra_deg, dec_deg, exptime_s, drift_rate_arcsec_s=DEFAULT_DRIFT_RATE_ARCSEC_S):
    """Start (t=0) and end (t=EXPTIME) pixel positions of trails.

    Returns
    -------
    x_start, y_start, x_end, y_end : ndarray
    """
    x0, y0 = star_pixel_positions(wcs, ra_deg, dec_deg, 0.0, drift_rate_arcsec_s)
    x1, y1 = star_pixel_positions(wcs, ra_deg, dec_deg, float(exptime_s), drift_rate_arcsec_s)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class TrailGeometry:
    """Shape of a star trail on a CCD, derived from WCS, drift rate and EXPTIME.

    Attributes
    ----------
    direction : (float, float)
        Unit vector ``(ux, uy)`` in pixels along which images move.
    speed_px_s : float
        Image speed in pixels per second.
    length_px : float
        Distance moved during the exposure (start to end), in pixels.
    exptime_s : float
        Exposure time in seconds.
    sample_dt_s : float
        Time to move one pixel: the natural sample spacing of a series.
    drift_rate_arcsec_s : (float, float)
        The drift-rate vector ``(east, north)`` used.
    """

    direction: tuple[float, float]
    speed_px_s: float
    length_px: float
    exptime_s: float
    sample_dt_s: float
    drift_rate_arcsec_s: tuple[float, float]

    @property
    def angle_deg(self) -> float:
        """Position angle of the motion on the pixel grid, degrees from +x towards +y."""
        return math.degrees(math.atan2(self.direction[1], self.direction[0]))

    @property
    def cross_direction(self) -> tuple[float, float]:
        """Unit vector perpendicular to the motion (rotated +90° from it)."""
        ux, uy = self.direction
        return (-uy, ux)

    @property
    def n_samples(self) -> int:
        """Number of whole one-pixel samples along the trail."""
        return int(math.floor(self.length_px + 1e-9))

    @property
    def displacement_px(self) -> tuple[float, float]:
        """Vector from the trail start to its end, in pixels."""
        return (self.direction[0] * self.length_px, self.direction[1] * self.length_px)


def trail_geometry(wcs, exptime_s, drift_rate_arcsec_s=DEFAULT_DRIFT_RATE_ARCSEC_S, x=None, y=None):
    """Trail geometry at a pixel of a CCD (default: the CCD centre).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        Shutter-open WCS; its ``pixel_shape`` gives the CCD centre when
        ``x``/``y`` are not given.
    exptime_s : float
        Exposure time (s), > 0.
    drift_rate_arcsec_s : float or (float, float)
        Drift-rate vector.
    x, y : float, optional
        Where to evaluate (geometry varies slightly across a CCD with
        distortion).

    Returns
    -------
    TrailGeometry
    """
    exptime_s = float(exptime_s)
    if not exptime_s > 0:
        raise ValueError(f"exptime_s must be positive, got {exptime_s}")
    rate = parse_drift_rate(drift_rate_arcsec_s)
    if x is None or y is None:
        if wcs.pixel_shape is None:
            raise ValueError("wcs has no pixel_shape: give x and y explicitly")
        nx, ny = wcs.pixel_shape
        x = (nx - 1) / 2.0 if x is None else x
        y = (ny - 1) / 2.0 if y is None else y
    ra, dec = wcs.pixel_to_world_values(float(x), float(y))
    x0, y0, x1, y1 = trail_endpoints(wcs, ra, dec, exptime_s, rate)
    dx, dy = float(x1 - x0), float(y1 - y0)
    length = math.hypot(dx, dy)
    if not length > 0:
        raise ValueError("drift produces no motion on this CCD (zero-length trail)")
    speed = length / exptime_s
    return TrailGeometry(
        direction=(dx / length, dy / length),
        speed_px_s=speed,
        length_px=length,
        exptime_s=exptime_s,
        sample_dt_s=1.0 / speed,
        drift_rate_arcsec_s=rate,
    )


_ANCHOR_FRACTION = {"start": 0.0, "middle": 0.5, "end": 1.0}


def _anchor_fraction(anchor):
    try:
        return _ANCHOR_FRACTION[anchor]
    except KeyError:
        raise ValueError(f"anchor must be one of 'start', 'middle', 'end', got {anchor!r}") from None


def anchor_to_start(x, y, geometry: TrailGeometry, anchor="middle"):
    """Convert a trail reference point (``start``/``middle``/``end``) to the start point."""
    f = _anchor_fraction(anchor)
    dx, dy = geometry.displacement_px
    return np.asarray(x) - f * dx, np.asarray(y) - f * dy


def start_to_anchor(x_start, y_start, geometry: TrailGeometry, anchor="middle"):
    """Convert a trail start point to the chosen reference point."""
    f = _anchor_fraction(anchor)
    dx, dy = geometry.displacement_px
    return np.asarray(x_start) + f * dx, np.asarray(y_start) + f * dy


def sample_times_mjd(mjd_obs, n_samples, sample_dt_s):
    """UTC MJD at mid-sample of samples ``0..n_samples-1``.

    Sample ``k`` covers ``[k*dt, (k+1)*dt]`` seconds after shutter open.
    """
    k = np.arange(int(n_samples), dtype=float)
    return float(mjd_obs) + (k + 0.5) * float(sample_dt_s) / SECONDS_PER_DAY
