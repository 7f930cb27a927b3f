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

import math
from dataclasses import dataclass

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
    offset: np.ndarray  # float32 cross offset (px) of pixel centre from the star's position
    q: np.ndarray  # (S, K) float32 source-variance factor (w1^2 + w2^2)/(w1 + w2)
    sample_flags: np.ndarray  # (S, K) int32 flags from the pixels (masked, saturated, CR, off image)
    n_bad_core: np.ndarray  # (S, K) int16 masked pixels within 1.5 FWHM-ish (filled later)
    k: np.ndarray  # (K,) sample indices
    half_width: int
    major_axis: str  # 'x' or 'y': the image axis closest to the drift
    cross_centre: np.ndarray  # (S, K) float64 cross-axis coordinate of the star at mid-sample
    along_centre: np.ndarray  # (S, K) float64 along-axis coordinate at mid-sample
    phase: np.ndarray  # (S, K) float64 offset of the central cell from the star (= offset[..., W])


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
    cvec = np.arange(-W, W + 1, dtype=np.int64)
    j = jc[:, :, None] + cvec[None, None, :]  # (S, K, C) cross-axis pixel index
    offset = (j - cc[:, :, None]).astype(np.float32)

    n_along, n_cross = (nx, ny) if major == "x" else (ny, nx)
    inside_c = (j >= 0) & (j < n_cross)
    edge = not bool(inside_c.all())
    jcl = np.clip(j, 0, n_cross - 1) if edge else j
    flat = img.reshape(-1)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    mflat = None if mask is None else np.asarray(mask).reshape(-1)
    sky = np.asarray(sky_e, dtype=np.float32)[:, None, None]
    data = np.zeros((S, K, C), dtype=np.float32)
    # with the drift along x, read noise and sky are the same for every cell of a
    # strip: keep one value per strip and broadcast (saves passes over the cells)
    var0 = np.zeros((S, K, 1) if major == "x" else (S, K, C), dtype=np.float32)
    bad = ~inside_c if edge else np.zeros((S, K, C), dtype=bool)
    flags = np.zeros((S, K), dtype=np.int32)
    sat_any = np.zeros((S, K), dtype=bool)
    cr_any = np.zeros((S, K), dtype=bool)
    off_along = np.zeros((S, K), dtype=bool)
    for ia, wa in ((i1, w1), (i2, w2)):
        used = wa > 1e-9
        inside_a = (ia >= 0) & (ia < n_along)
        off_along |= used & ~inside_a
        iacl = np.clip(ia, 0, n_along - 1)
        if major == "x":
            # the amplifier (gain, read noise, saturation) is the same for the whole strip column
            idx = jcl * nx + iacl[:, :, None]
            g = g_col[iacl][:, :, None]
            rn2 = rn2_col[iacl][:, :, None]
            sat_lvl = None if sat_col is None else sat_col[iacl][:, :, None]
        else:
            idx = iacl[:, :, None] * nx + jcl
            g = g_col[jcl]
            rn2 = rn2_col[jcl]
            sat_lvl = None if sat_col is None else sat_col[jcl]
        vals = flat[idx]
        wa32 = wa.astype(np.float32)[:, :, None]
        data += wa32 * (vals * g - sky)
        var0 += (wa32 * wa32) * (rn2 + np.maximum(sky, np.float32(0)))
        badc = ~np.isfinite(vals)
        if sat_lvl is not None:
            badc |= vals >= sat_lvl
        if mflat is not None:
            mv = mflat[idx]
            badc |= (mv != 0) if bad_bits is None else ((mv & bad_bits) != 0)
        badc &= used[:, :, None]
        bad |= badc
        # which flags: only for the (few) strips with a bad pixel
        hit = badc.any(axis=2)
        if hit.any():
            hs, hk = np.nonzero(hit)
            vh = vals[hs, hk]
            if sat_lvl is not None:
                sl = sat_lvl[hs, hk] if sat_lvl.shape[-1] != 1 else sat_lvl[hs, hk][:, :1]
                sat_any[hs, hk] |= (vh >= sl).any(axis=1)
            if mflat is not None:
                mh = mv[hs, hk]
                if fb.PIXEL_COSMIC_RAY:
                    cr_any[hs, hk] |= ((mh & fb.PIXEL_COSMIC_RAY) != 0).any(axis=1)
                if fb.PIXEL_SATURATED:
                    sat_any[hs, hk] |= ((mh & fb.PIXEL_SATURATED) != 0).any(axis=1)
    bad |= off_along[:, :, None]
    off_image = off_along | (~inside_c).any(axis=2) if edge else off_along
    flags |= np.where(off_image, fb.OFF_IMAGE, 0).astype(np.int32)
    flags |= np.where(sat_any, fb.SATURATED, 0).astype(np.int32)
    flags |= np.where(cr_any, fb.COSMIC_RAY, 0).astype(np.int32)
    data[bad] = 0.0
    var0 = np.broadcast_to(var0, (S, K, C))
    wsum = (w1 + w2).astype(np.float32)
    q = np.where(wsum > 0, (w1 * w1 + w2 * w2) / np.where(wsum > 0, wsum, 1.0), 1.0).astype(np.float32)
    return Strips(
        data=data,
        var0=var0,
        bad=bad,
        offset=offset,
        q=q,
        sample_flags=flags,
        n_bad_core=np.zeros((S, K), dtype=np.int16),
        k=k,
        half_width=W,
        major_axis=major,
        cross_centre=cc,
        along_centre=ac,
        phase=(jc - cc),
    )
