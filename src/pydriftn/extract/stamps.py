"""Cut every trail into per-sample cross-track strips: ``(n_stars, n_samples, n_cross)`` arrays.

Sample ``k`` of a star covers ``t_s`` in ``[k*dt, (k+1)*dt]``; during it the
image moves from ``start + k*e`` to ``start + (k+1)*e`` where
``e = (end - start) * dt / EXPTIME`` (≈ one pixel along the drift). The strip
of sample ``k`` is that along-track interval: the pixel columns (rows, when
the drift is closer to the y axis) it overlaps are split proportionally (at
most two per strip), so that sample ``k`` of every star on the CCD refers to
the same instant whatever the sub-pixel phase of its trail. Across the trail
the strip takes ``2*half_width + 1`` whole pixels centred on the star's
instantaneous position; ``offset`` holds each pixel centre's distance from
that position (pixels, along the cross axis).

Values are converted to sky-subtracted electrons with the gain of the
amplifier of each pixel (amp A for ``x < NAXIS1/2``), and carry a variance
model (read noise and sky; the source term is added by the extractor from the
model, as in Horne 1986, since a data-based source variance biases optimal
extraction).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import flagbits as fb

__all__ = ["Strips", "per_column", "cut_strips"]


def per_column(value, nx, name):
    """Per-column array of an amplifier quantity given as a scalar or ``(amp_A, amp_B)``.

    Amp A covers ``x < nx // 2`` (DESIGN: amp A x < NAXIS1/2).
    """
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        return np.full(nx, float(arr[0]))
    if arr.size == 2:
        return np.where(np.arange(nx) < nx // 2, arr[0], arr[1])
    if arr.size == nx:
        return arr.astype(np.float64)
    raise ValueError(f"{name}: expected a scalar, (amp_A, amp_B) or one value per column, got {arr.size} values")


@dataclass
class Strips:
    """Per-sample cross-track strips of a set of trails (arrays ``(S, K, C)`` unless noted)."""

    data: np.ndarray  # float32 electrons, sky subtracted
    var0: np.ndarray  # float32 e^2: read noise + sky (+ sky-level error not included)
    bad: np.ndarray  # bool: masked / saturated / off image / non-finite
    q: np.ndarray  # (S, K) float32 source-variance factor (w1^2 + w2^2)/(w1 + w2)
    sample_flags: np.ndarray  # (S, K) int32 flags from the pixels (masked, saturated, CR, off image)
    n_bad_core: np.ndarray  # (S, K) int16 masked pixels within 1.5 FWHM-ish (filled later)
    k: np.ndarray  # (K,) sample indices
    half_width: int
    major_axis: str  # 'x' or 'y': the image axis closest to the drift
    cross_centre: np.ndarray  # (S, K) float64 cross-axis coordinate of the star at mid-sample
    along_centre: np.ndarray  # (S, K) float64 along-axis coordinate at mid-sample
    phase: np.ndarray  # (S, K) float64 offset of the central cell from the star (= offset[..., W])

    @cached_property
    def offset(self):
        """``(S, K, C)`` float32 cross offset (px) of each pixel centre from the star's position
        (computed on first use: the extraction needs it only for its profile reference stars,
        :meth:`offset_rows`)."""
        return self.offset_rows(slice(None))

    def offset_rows(self, rows):
        """:attr:`offset` of the stars ``rows`` (index or slice): ``float32(phase) + (c - W)``."""
        W = int(self.half_width)
        return self.phase[rows].astype(np.float32)[..., None] + np.arange(-W, W + 1, dtype=np.float32)


def cut_strips(image, mask, x_start, y_start, x_end, y_end, geometry, sky_e, gain, read_noise_e,
               saturation_adu=None, half_width=8, k=None, bad_bits=None):
    """Cut trails into per-sample strips (see module docstring).

    Parameters
    ----------
    image : ndarray (ny, nx)
        ADU, sky kept.
    mask : ndarray (ny, nx) or None
        Nonzero = bad.
    x_start, y_start, x_end, y_end : ndarray (S,)
        Trail end points (t = 0 and t = EXPTIME), 0-based pixels.
    geometry : TrailGeometry
        Supplies ``sample_dt_s``, ``exptime_s``, ``direction`` and ``n_samples``.
    sky_e : ndarray (S,)
        Local sky of each trail (electrons/pixel).
    gain, read_noise_e, saturation_adu : scalar, (A, B) or per-column
        e-/ADU, e-, ADU.
    half_width : int
        Cross-track half-width (pixels).
    k : array of int, optional
        Sample indices (default ``0 .. n_samples-1``).
    bad_bits : int, optional
        Mask bits that make a pixel unusable (default: any nonzero value), e.g.
        :data:`pydriftn.flags.DEFAULT_BAD_PIXEL_FLAGS` for a decoded bitmask.

    Returns
    -------
    Strips

    Notes
    -----
    Each strip combines two pixel columns (rows) of the image: the one its
    interval starts in ("lead") and the next one ("other"). The gathers, the
    pixel tests, the combination and the pixel flags are one compiled loop
    (:func:`pydriftn.extract._kernels.cut_cells`); with the drift along x it
    reads the cells along the image rows, and where the trail moves by one
    column per sample the "other" column of sample ``k`` is the "lead"
    column of sample ``k + 1``, so each pixel is read and tested once.
    """
    img = np.asarray(image)
    ny, nx = img.shape
    S = len(x_start)
    if k is None:
        k = np.arange(geometry.n_samples)
    k = np.asarray(k, dtype=np.int64)
    K = len(k)
    W = int(half_width)
    C = 2 * W + 1
    g_col = per_column(gain, nx, "gain").astype(np.float32)
    rn2_col = (per_column(read_noise_e, nx, "read_noise_e") ** 2).astype(np.float32)
    sat_col = None if saturation_adu is None else per_column(saturation_adu, nx, "saturation_adu").astype(np.float32)

    x0 = np.asarray(x_start, dtype=np.float64)
    y0 = np.asarray(y_start, dtype=np.float64)
    frac = geometry.sample_dt_s / geometry.exptime_s
    ex = (np.asarray(x_end, dtype=np.float64) - x0) * frac
    ey = (np.asarray(y_end, dtype=np.float64) - y0) * frac
    ux, uy = geometry.direction
    major = "x" if abs(ux) >= abs(uy) else "y"
    kk = k.astype(np.float64)[None, :]
    if major == "x":
        a0, ea, c0, ec = x0, ex, y0, ey
    else:
        a0, ea, c0, ec = y0, ey, x0, ex
    # along-axis interval of each sample
    pa = a0[:, None] + ea[:, None] * kk
    pb = pa + ea[:, None]
    lo = np.minimum(pa, pb)
    hi = np.maximum(pa, pb)
    i1 = np.floor(lo + 0.5)
    w1 = np.minimum(hi, i1 + 0.5) - lo
    w2 = np.maximum(hi - (i1 + 0.5), 0.0)
    i1 = i1.astype(np.int64)
    i2 = i1 + 1
    cc = c0[:, None] + ec[:, None] * (kk + 0.5)  # cross coordinate at mid-sample
    ac = a0[:, None] + ea[:, None] * (kk + 0.5)
    jc = np.floor(cc + 0.5).astype(np.int64)
    phase = jc - cc

    n_along, n_cross = (nx, ny) if major == "x" else (ny, nx)
    sky = np.asarray(sky_e, dtype=np.float32)
    # lead column of each sample and the column after it (along the drift sense)
    fwd = bool(np.median(ea) >= 0) if ea.size else True
    lead, other = (i1, i2) if fwd else (i2, i1)
    w_lead, w_other = (w1, w2) if fwd else (w2, w1)
    # the gathers, validity tests, gains, combination of the two columns, variances and pixel flags:
    # one compiled loop over the strips (pydriftn.extract._kernels.cut_cells)
    from ._kernels import cut_cells

    src = img if img.dtype in (np.float32, np.float64) else img.astype(np.float32)
    use_mask = mask is not None
    m2 = np.asarray(mask) if use_mask else np.zeros((1, 1), dtype=np.uint8)
    if use_mask and m2.dtype.kind not in "iub":
        m2 = m2.astype(np.int64)
    data, var0, bad, flags = cut_cells(
        src, m2, use_mask, -1 if bad_bits is None else int(bad_bits), g_col, rn2_col,
        sat_col if sat_col is not None else g_col, sat_col is not None, major == "x",
        np.ascontiguousarray(lead), np.ascontiguousarray(other), jc, w_lead, w_other, w1, w2, sky, W,
        int(fb.PIXEL_COSMIC_RAY), int(fb.PIXEL_SATURATED), int(fb.PIXEL_STREAK),
        int(fb.OFF_IMAGE), int(fb.SATURATED), int(fb.COSMIC_RAY), int(fb.SATELLITE))
    wsum = (w1 + w2).astype(np.float32)
    var0 = np.broadcast_to(var0, (S, K, C))
    q = np.where(wsum > 0, (w1 * w1 + w2 * w2) / np.where(wsum > 0, w1 + w2, 1.0), 1.0).astype(np.float32)
    return Strips(
        data=data,
        var0=var0,
        bad=bad,
        q=q,
        sample_flags=flags,
        n_bad_core=np.zeros((S, K), dtype=np.int16),
        k=k,
        half_width=W,
        major_axis=major,
        cross_centre=cc,
        along_centre=ac,
        phase=phase,
    )
