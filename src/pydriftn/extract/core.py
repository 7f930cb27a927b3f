"""Per-sample extraction of drift trails: optimal (profile-weighted), box, and L3.

Pipeline of :func:`extract_trails` for one CCD:

1. :func:`pydriftn.extract.stamps.cut_strips` — every trail becomes an
   ``(n_stars, n_samples, n_cross)`` array of sky-subtracted electrons with
   a variance model; sample boundaries are at ``start + k * e`` so that sample
   ``k`` of every star refers to the same instant (fractional columns split).
2. :func:`pydriftn.extract.profile.measure_profile` — the cross-track
   profile, common to all stars at an instant, from bright isolated
   reference stars: per-sample shift (jitter), running-window shape (seeing),
   per-star position offsets.
3. Optimal extraction (Horne 1986) across each strip with that profile:
   ``F = sum(P D / V) / sum(P^2 / V)``, ``V`` = read + sky + model source
   variance, iterated, with masked pixels given zero weight (bridged by the
   profile) and > ``outlier_sigma`` outliers rejected (unmasked cosmic rays).
   The uncertainty is the propagated variance of that weighted sum (plus the
   star's sky-level error and a per-sample profile-model term proportional
   to the flux, ``profile_sys``).
4. Trails whose cross-track windows overlap another trail of the table are
   solved jointly: per strip, a weighted linear least-squares for the star's
   amplitude and those of up to ``max_neighbours`` neighbours (each with the
   profile at its own position and instant); these samples carry DEBLENDED.
5. Neighbours closer across than ``min_separation_fwhm`` cannot be separated
   (same profile): their light adds to the star's flux where the trails
   overlap. :func:`_blend_fractions` measures how much (``blend_fraction``,
   from a least-squares split of the pair's light that uses the samples
   beyond the other trail's ends); at or above ``blend_max_fraction`` the star
   is BLENDED (dominated: its series is not searched), below it BLEND_MINOR
   (a nearly constant blend flux; the series is kept).

``method="box"`` sums the strip (masked pixels replaced by the profile);
``method="l3"`` is the original pydriftn 0.1.4 approach — a per-column fit of
a 3-parameter 1-D Moffat (amplitude, centre, width) whose integral is the
flux — vectorised (batched Gauss-Newton) rather than looped, kept for
comparison.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import gammaln

from . import flagbits as fb
from ._kernels import joint_strips, optimal_strips
from .profile import CrossProfile, measure_profile
from .stamps import cut_strips, per_column

__all__ = ["ExtractionResult", "extract_trails", "find_neighbours", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("optimal", "box", "l3")
SECONDS_PER_DAY = 86400.0


@dataclass
class ExtractionResult:
    """Per-sample series of the stars of one CCD exposure (arrays ``(S, K)`` unless noted).

    Attributes
    ----------
    star_id : ndarray (S,)
    trails : pandas.DataFrame
        The input trail table rows, same order (ID columns for the outputs).
    sample : ndarray (K,)
        Sample index ``k`` (sample ``k`` covers ``t_s`` in ``[k dt, (k+1) dt]``).
    t_s, mjd : ndarray (K,)
        Mid-sample time since shutter open and UTC MJD (NaN if no MJD-OBS given).
    flux, flux_err : ndarray
        Sky-subtracted flux in e-/s during the sample and its 1-sigma uncertainty
        (noise model: read noise, sky, source, sky-level error).
    flux_err_sample : ndarray
        The same without the sky-level error (which is common to all samples of
        a star).
    n_masked : ndarray of int16
        Masked pixels (bad/saturated/rejected) under the profile of the sample.
    flags : ndarray of int32
        Sample flags (:mod:`pydriftn.extract.flagbits`).
    star_flags : ndarray (S,) of int32
    ramp : ndarray (K,) of bool
        Samples in the shutter ramps (SHUTTER_RAMP).
    method : str
    dt_s : float
    sky_adu, sky_err_adu : ndarray (S,)
    gain : ndarray (S,)
        Gain used at each trail (e-/ADU).
    profile : CrossProfile or None
    delta_px : ndarray (S,)
        Fitted cross offset of each star from its forced position (px).
    profile_ref : ndarray (S,) of bool
    n_neighbours : ndarray (S,) of int
    blend_fraction : ndarray (S,)
        Contamination of the star's flux by coincident (unresolvable)
        neighbours: their light in its extraction relative to its own, at the
        sample where it is largest (0 without one; see ``blend_max_fraction``
        of :func:`extract_trails`). Also a column of ``trails``, so it reaches
        the per-star tables. ``extras["blend_series"]`` holds the per-sample
        value (S, K): it is 0 where the neighbour's trail does not overlap.
    blend_fraction_hi : ndarray (S,)
        Its 1-sigma high value (neighbours' fluxes 1 sigma up, the star's 1
        sigma down; ``inf`` when the star's own flux is not determined), which
        decides BLENDED / BLEND_MINOR; also a column of ``trails``.
    """

    star_id: np.ndarray
    trails: pd.DataFrame
    sample: np.ndarray
    t_s: np.ndarray
    mjd: np.ndarray
    flux: np.ndarray
    flux_err: np.ndarray
    flux_err_sample: np.ndarray
    n_masked: np.ndarray
    flags: np.ndarray
    star_flags: np.ndarray
    ramp: np.ndarray
    method: str
    dt_s: float
    sky_adu: np.ndarray
    sky_err_adu: np.ndarray
    gain: np.ndarray
    profile: CrossProfile | None = None
    delta_px: np.ndarray | None = None
    profile_ref: np.ndarray | None = None
    n_neighbours: np.ndarray | None = None
    blend_fraction: np.ndarray | None = None
    blend_fraction_hi: np.ndarray | None = None
    extras: dict = field(default_factory=dict)

    @property
    def n_stars(self):
        return len(self.star_id)

    @property
    def n_samples(self):
        return len(self.sample)


# --------------------------------------------------------------------------- neighbours
#: Neighbours considered beyond ``max_neighbours``: coincident ones (flagged, not fitted) must not push a
#: separable one that matters out of the joint fit.
_EXTRA_CANDIDATES = 3


def find_neighbours(x_start, y_start, x_end, y_end, reach_px, max_neighbours=3, along_margin_px=10.0,
                    brightness=None, alpha_px=None):
    """Trails whose cross-track windows may overlap (all trails of the table).

    Parameters
    ----------
    x_start, y_start, x_end, y_end : ndarray (S,)
    reach_px : float
        Largest cross-track separation that counts as overlapping.
    max_neighbours : int
        Keep at most this many per star: the closest in cross-track distance,
        or with ``brightness`` the ones whose light reaches the star's centre
        most (``brightness_j (1 + (d / alpha_px)^2)^-2.5``): in a crowded field
        a star can have several faint trails closer than one bright one, and
        the bright one is the neighbour the joint fit must not leave out.
    along_margin_px : float
        Trails overlap along-track if their extents, padded by this, overlap.
    brightness : ndarray (S,), optional
        Flux of every trail (any unit; negative counts as 0).
    alpha_px : float, optional
        Moffat scale of that ranking (default: ``reach_px / 4``).

    Returns
    -------
    nb : ndarray (S, M) of int
        Neighbour indices, ``-1`` for none.
    n_all : ndarray (S,)
        Number of overlapping trails before truncation to ``max_neighbours``.
    dcross : ndarray (S, M)
        Cross-track separation of each kept neighbour (px; ``inf`` for none).
    """
    from scipy.spatial import cKDTree

    x0 = np.asarray(x_start, float)
    y0 = np.asarray(y_start, float)
    x1 = np.asarray(x_end, float)
    y1 = np.asarray(y_end, float)
    S = len(x0)
    M = int(max_neighbours)
    nb = np.full((S, max(M, 1)), -1, dtype=np.int64)
    dc = np.full((S, max(M, 1)), np.inf)
    n_all = np.zeros(S, dtype=np.int64)
    if S < 2 or M <= 0:
        return nb[:, :M], n_all, dc[:, :M]
    mx, my = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    L = float(np.median(np.hypot(x1 - x0, y1 - y0)))
    dx, dy = np.median(x1 - x0), np.median(y1 - y0)
    ux, uy = (dx / L, dy / L) if L > 0 else (1.0, 0.0)
    tree = cKDTree(np.column_stack([mx, my]))
    pairs = tree.query_pairs(math.hypot(L + along_margin_px, reach_px), output_type="ndarray")
    if len(pairs) == 0:
        return nb[:, :M], n_all, dc[:, :M]
    a, b = pairs[:, 0], pairs[:, 1]
    ddx, ddy = mx[b] - mx[a], my[b] - my[a]
    d_al = ddx * ux + ddy * uy
    d_cr = -ddx * uy + ddy * ux
    keep = (np.abs(d_cr) < reach_px) & (np.abs(d_al) < L + along_margin_px)
    a, b, d_cr = a[keep], b[keep], np.abs(d_cr[keep])
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    dist = np.concatenate([d_cr, d_cr])
    if brightness is None:
        order = np.lexsort((dist, src))
    else:
        alpha = float(alpha_px) if alpha_px else 0.25 * float(reach_px)
        light = np.maximum(np.nan_to_num(np.asarray(brightness, float)[dst]), 0.0) * (1.0 + (dist / alpha) ** 2) ** -2.5
        order = np.lexsort((dist, -light, src))
    src, dst, dist = src[order], dst[order], dist[order]
    n_all = np.bincount(src, minlength=S)
    first = np.concatenate([[0], np.cumsum(n_all)[:-1]])
    rank = np.arange(len(src)) - first[src]
    sel = rank < M
    nb[src[sel], rank[sel]] = dst[sel]
    dc[src[sel], rank[sel]] = dist[sel]
    return nb[:, :M], n_all, dc[:, :M]


# --------------------------------------------------------------------------- helpers
def _sky_columns(sky, star_id, g_star):
    """sky_e, sky_err_e, sky_adu, sky_err_adu, sky_ok arrays aligned to ``star_id``.

    Electron values come from the ``sky_e``/``sky_err_e`` columns when the sky
    was measured with the gains (:func:`pydriftn.sky.local_sky` ``gain=``),
    else from the ADU values times the gain of the trail's amplifier.
    """
    S = len(star_id)
    if sky is None:
        z = np.zeros(S)
        return z, z, z, z, np.ones(S, bool)
    if isinstance(sky, pd.DataFrame):
        for c in ("star_id", "sky_adu"):
            if c not in sky.columns:
                raise KeyError(f"sky table: missing column {c!r} (expected the output of pydriftn.sky.local_sky)")
        s = sky.drop_duplicates("star_id").set_index("star_id").reindex(star_id)
        val = s["sky_adu"].to_numpy(float)
        err = s["sky_err_adu"].to_numpy(float) if "sky_err_adu" in s else np.zeros(S)
        ok = s["sky_ok"].fillna(False).to_numpy(bool).copy() if "sky_ok" in s else np.isfinite(val)
        ok &= np.isfinite(val)
        val_e = s["sky_e"].to_numpy(float) if "sky_e" in s else np.full(S, np.nan)
        err_e = s["sky_err_e"].to_numpy(float) if "sky_err_e" in s else np.full(S, np.nan)
        val_e = np.where(np.isfinite(val_e), val_e, val * g_star)
        err_e = np.where(np.isfinite(err_e), err_e, err * g_star)
        if (~ok).any():
            # unusable local sky: the median of the others, with a generous error
            fill = np.nanmedian(val_e[ok]) if ok.any() else 0.0
            big = 3.0 * np.nanmax(err_e[ok]) if ok.any() and np.isfinite(err_e[ok]).any() else 0.0
            val_e = np.where(ok, val_e, fill)
            err_e = np.where(ok & np.isfinite(err_e), err_e, big)
            val = np.where(ok, val, val_e / g_star)
            err = np.where(ok & np.isfinite(err), err, err_e / g_star)
        return val_e, np.nan_to_num(err_e), val, np.nan_to_num(err), ok
    val = np.broadcast_to(np.asarray(sky, float), (S,)).copy()
    return val * g_star, np.zeros(S), val, np.zeros(S), np.isfinite(val)


def _rowsum(a):
    """Sum over the last axis (cells of a strip); einsum is several times faster than
    ``sum(axis=-1)`` for such short rows."""
    return np.einsum("...c->...", a)


def _rowdot(a, b):
    """``(a * b).sum(axis=-1)`` without the temporary."""
    return np.einsum("...c,...c->...", a, b)


def _rowcount(mask):
    """Number of True cells per strip (boolean ``(..., C)`` array, ``C < 256``)."""
    m = np.ascontiguousarray(mask)
    if m.shape[-1] > 255:
        return m.sum(axis=-1)
    return np.einsum("...c->...", m.view(np.uint8)).astype(np.int64)


def _snr_per_sample(strips, return_flux=False):
    """Median over samples of a box-sum signal-to-noise (per star) [and of the box sum].

    Samples off the image are left out of the medians: a bright trail mostly beyond the CCD edge keeps its
    brightness (its on-CCD part lies over its neighbours' trails as much as a whole trail would)."""
    # strips.data is zero at bad cells
    B = _rowsum(strips.data)
    if strips.var0.strides[-1] == 0:  # one variance per strip (drift along x)
        V = strips.var0[..., 0] * (strips.data.shape[-1] - _rowcount(strips.bad))
    else:
        V = _rowsum(np.where(strips.bad, np.float32(0), strips.var0))
    V = V + np.maximum(B, 0) * strips.q
    R = B / np.sqrt(np.maximum(V, 1e-9))
    off = (strips.sample_flags & fb.OFF_IMAGE) != 0
    part = off.any(axis=1) & ~off.all(axis=1)
    snr = np.median(R, axis=1)
    box = np.median(B, axis=1) if return_flux else None
    if part.any():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            snr[part] = np.nanmedian(np.where(off[part], np.nan, R[part]), axis=1)
            if return_flux:
                box[part] = np.nanmedian(np.where(off[part], np.nan, B[part]), axis=1)
    return (snr, box) if return_flux else snr


def _reject_worst(d, M, V, bad, outlier_sigma, sys_frac, overwrite=False):
    """Mask, per strip, the most deviant *positive* outlier above ``outlier_sigma``
    (Horne's one-pixel-at-a-time rejection; cosmic rays missed by the mask are
    positive, and rejecting negatives or several pixels at once lets a poor
    profile eat a strip).

    Works with the signed square ``z |z|`` of the normalised residual (no
    square root) and looks for the worst cell only in strips that have one
    above the threshold. ``overwrite=True`` lets it use ``M`` as scratch
    space. Returns the updated mask (a copy only if it changed) and the
    strips that changed ``(s, k)`` (or None).
    """
    z2 = np.multiply(M, M)
    z2 *= np.float32(sys_frac * sys_frac)
    z2 += V  # variance of the residual
    r = np.subtract(d, M, out=M if overwrite else None)
    np.divide(r, z2, out=z2)
    np.abs(r, out=r)
    z2 *= r  # z |z|
    if bad.any():
        np.copyto(z2, -np.inf, where=bad)
    cand = _rowcount(z2 > np.float32(outlier_sigma) ** 2) > 0
    if not cand.any():
        return bad, None
    s_i, k_i = np.nonzero(cand)
    j = np.argmax(z2[s_i, k_i], axis=-1)
    bad = bad.copy()
    bad[s_i, k_i, j] = True
    return bad, (s_i, k_i)


def _optimal_single(d, var0, q, bad, P, n_iter=2, outlier_sigma=5.0, sys_frac=0.1, subset=None):
    """Horne optimal extraction of independent strips.

    ``d`` must be zero at the cells flagged in ``bad`` (as :func:`cut_strips`
    gives it). Returns F, var_F, bad (updated), w, sum(w P); with ``subset``
    (bool over stars) only those stars are computed (others: F NaN, w 0).
    The variance of the weighted sum ``sum(w^2 V) / sum(w P)^2`` with
    ``w = P / V`` is ``1 / sum(w P)``.
    """
    if subset is not None and not np.all(subset):
        S, K, C = d.shape
        F = np.full((S, K), np.nan)
        varF = np.full((S, K), np.inf)
        bad_out = bad.copy()
        w = np.zeros_like(P)
        swp = np.zeros((S, K), dtype=np.float32)
        if np.any(subset):
            i = np.flatnonzero(subset)
            r = _optimal_single(d[i], var0[i], q[i], bad[i], P[i], n_iter, outlier_sigma, sys_frac)
            F[i], varF[i], bad_out[i], w[i], swp[i] = r
        return F, varF, bad_out, w, swp
    # the iterations per strip: one compiled loop (pydriftn.extract._kernels.optimal_strips)
    return optimal_strips(d, var0, q, bad, P, int(n_iter), float(outlier_sigma or 0.0), float(sys_frac))


def _joint_solve(d, var0, q, bad, A, active, n_iter=1, outlier_sigma=5.0, sys_frac=0.1):
    """Weighted LS for the amplitudes of profiles ``A[m]`` per strip (m = 0: the star).

    Parameters
    ----------
    d, var0, bad : ndarray (N, K, C)
    q : ndarray (N, K)
    A : list of M1 ndarrays (N, K, C)
        Unit-flux profiles: the star's, then its neighbours'.
    active : ndarray of bool (N, K, M1)

    Returns
    -------
    F, varF : ndarray (N, K)
        The star's amplitude and its variance.
    bad : ndarray (N, K, C)
        Updated with rejected outliers.
    """
    M1 = len(A)
    N, K, C = d.shape
    P = A[0]
    # d is zero at the cells flagged in bad (cut_strips)
    sP = _rowsum(np.where(bad, np.float32(0), P))
    amps = np.zeros((N, K, M1), dtype=np.float64)
    amps[..., 0] = np.where(sP > 0.05, _rowsum(d) / np.maximum(sP, 0.05), 0.0)
    eye = np.eye(M1)
    iu = [(m, l) for m in range(M1) for l in range(m, M1)]
    for it in range(n_iter + 1):
        M = A[0] * amps[..., 0:1].astype(np.float32)
        for m in range(1, M1):
            M += A[m] * amps[..., m : m + 1].astype(np.float32)
        V = q[:, :, None] * np.maximum(M, np.float32(0))
        V += var0
        if outlier_sigma and it >= 1:
            bad, _ = _reject_worst(d, M, V, bad, outlier_sigma, sys_frac)
        w = np.reciprocal(V)
        np.copyto(w, np.float32(0), where=bad)
        wA = [w * a for a in A]
        Nmat = np.empty((N, K, M1, M1))
        for m, l in iu:
            Nmat[..., m, l] = Nmat[..., l, m] = _rowdot(wA[m], A[l])
        rhs = np.stack([_rowdot(wa, d) for wa in wA], axis=-1).astype(np.float64)
        # inactive neighbours and empty strips: decouple; tiny ridge against coincident trails
        diag = np.diagonal(Nmat, axis1=-2, axis2=-1).copy()
        empty = ~(diag > 0) | ~active
        er = np.flatnonzero(empty.reshape(-1, M1).any(axis=1))
        if len(er):  # only the (few) strips with an empty column
            Nf, ef = Nmat.reshape(-1, M1, M1), empty.reshape(-1, M1)
            Nf[er] = Nf[er] * ~(ef[er, :, None] | ef[er, None, :]) + ef[er, :, None] * eye
        dmax = diag[..., 0]
        for m in range(1, M1):
            dmax = np.maximum(dmax, diag[..., m])
        ridge = 1e-6 * np.maximum(dmax, 1e-30)
        for m in range(M1):
            Nmat[..., m, m] += ridge
        rhs = np.where(empty, 0.0, rhs)
        amps, cov00 = _solve_spd_small(Nmat, rhs)
    cov00 = np.where(empty[..., 0], np.inf, cov00)
    return amps[..., 0], cov00, bad


def _solve_spd_small(Nmat, rhs):
    """Solve batched small symmetric systems ``Nmat x = rhs``; also ``inv(Nmat)[0, 0]``.

    Closed form (adjugate) for 1x1 to 3x3, which is what almost every
    de-blended strip needs (the star and one or two neighbours) and is far
    faster than batched LAPACK calls on tiny matrices; LAPACK otherwise.
    """
    n = Nmat.shape[-1]
    if n == 1:
        a = Nmat[..., 0, 0]
        return rhs / a[..., None], 1.0 / a
    if n == 2:
        a, b, d = Nmat[..., 0, 0], Nmat[..., 0, 1], Nmat[..., 1, 1]
        det = a * d - b * b
        r0, r1 = rhs[..., 0], rhs[..., 1]
        x = np.stack([(d * r0 - b * r1) / det, (a * r1 - b * r0) / det], axis=-1)
        return x, d / det
    if n == 3:
        a, b, c = Nmat[..., 0, 0], Nmat[..., 0, 1], Nmat[..., 0, 2]
        e, f, i = Nmat[..., 1, 1], Nmat[..., 1, 2], Nmat[..., 2, 2]
        # cofactors of the symmetric matrix [[a b c] [b e f] [c f i]]
        A00 = e * i - f * f
        A01 = c * f - b * i
        A02 = b * f - c * e
        A11 = a * i - c * c
        A12 = b * c - a * f
        A22 = a * e - b * b
        det = a * A00 + b * A01 + c * A02
        r0, r1, r2 = rhs[..., 0], rhs[..., 1], rhs[..., 2]
        x = np.stack([(A00 * r0 + A01 * r1 + A02 * r2) / det,
                      (A01 * r0 + A11 * r1 + A12 * r2) / det,
                      (A02 * r0 + A12 * r1 + A22 * r2) / det], axis=-1)
        return x, A00 / det
    x = np.linalg.solve(Nmat, rhs[..., None])[..., 0]
    return x, np.linalg.inv(Nmat)[..., 0, 0]


def _l3_fit(d, bad, offset, fwhm_px, beta=2.5, n_iter=12):
    """Batched per-column fit of A (1 + ((u - mu)/alpha)^2)^-beta; returns integral flux, ok."""
    w = (~bad).astype(np.float64)
    alpha0 = fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    A = np.maximum(np.where(bad, -np.inf, d).max(axis=2), 1.0)
    mu = np.zeros(A.shape)
    la = np.full(A.shape, math.log(alpha0))
    lam = np.full(A.shape, 1e-2)
    u = offset.astype(np.float64)

    def model(A, mu, la):
        al = np.exp(la)[..., None]
        z = (u - mu[..., None]) / al
        base = 1.0 + z * z
        f = base ** (-beta)
        return f, z, base, al

    f, z, base, al = model(A, mu, la)
    chi2 = (w * (d - A[..., None] * f) ** 2).sum(axis=2)
    for _ in range(n_iter):
        # Jacobian wrt (A, mu, log alpha)
        dA = f
        dmu = A[..., None] * f * (2 * beta * z / base) / al
        dla = A[..., None] * f * (2 * beta * z * z / base)
        J = np.stack([dA, dmu, dla], axis=-1)
        r = d - A[..., None] * f
        JtJ = np.einsum("...ci,...c,...cj->...ij", J, w, J)
        Jtr = np.einsum("...ci,...c,...c->...i", J, w, r)
        diag = np.diagonal(JtJ, axis1=-2, axis2=-1)
        H = JtJ + (lam[..., None] * diag)[..., None] * np.eye(3) + 1e-12 * np.eye(3)
        step = np.linalg.solve(H, Jtr[..., None])[..., 0]
        A1, mu1, la1 = A + step[..., 0], mu + step[..., 1], la + step[..., 2]
        la1 = np.clip(la1, math.log(0.3), math.log(30.0))
        mu1 = np.clip(mu1, -offset.shape[-1] / 2, offset.shape[-1] / 2)
        f1, z1, b1, al1 = model(A1, mu1, la1)
        chi1 = (w * (d - A1[..., None] * f1) ** 2).sum(axis=2)
        better = chi1 < chi2
        A = np.where(better, A1, A)
        mu = np.where(better, mu1, mu)
        la = np.where(better, la1, la)
        chi2 = np.where(better, chi1, chi2)
        lam = np.where(better, lam * 0.3, lam * 10.0)
        f, z, base, al = model(A, mu, la)
    norm = math.exp(0.5 * math.log(math.pi) + gammaln(beta - 0.5) - gammaln(beta))
    flux = A * np.exp(la) * norm
    ok = np.isfinite(flux) & (w.sum(axis=2) >= 4)
    return flux, ok


# --------------------------------------------------------------------------- main
def extract_trails(
    image,
    mask,
    trails,
    geometry,
    sky=None,
    *,
    gain=1.0,
    read_noise_e=0.0,
    saturation_adu=None,
    mjd_obs=None,
    method="optimal",
    half_width=None,
    half_width_fwhm=2.0,
    fwhm_px=None,
    ramp_fwhm=1.5,
    profile_halfwindow=2,
    n_profile_refs=80,
    ref_snr_min=20.0,
    deblend=True,
    max_neighbours=3,
    outlier_sigma=5.0,
    max_bridged_fraction=0.5,
    bridge_sys=0.05,
    profile_sys=0.0015,
    min_separation_fwhm=0.6,
    blend_max_fraction=0.1,
    bad_bits=None,
    samples=None,
):
    """Extract per-sample fluxes of every trail of a CCD exposure.

    Parameters
    ----------
    image : ndarray (ny, nx)
        Drift image, ADU, sky kept.
    mask : ndarray (ny, nx) or None
        Pixel bitmask, nonzero = bad.
    trails : pandas.DataFrame
        ``star_id, x_start, y_start, x_end, y_end`` (+ ``flags``, magnitudes …)
        for ALL stars to extract (forced positions).
    geometry : pydriftn.geometry.TrailGeometry
    sky : pandas.DataFrame or array_like or None
        Output of :func:`pydriftn.sky.local_sky` (matched on ``star_id``), or
        per-star sky in ADU, or None (image already sky-subtracted).
    gain, read_noise_e, saturation_adu : scalar or (amp_A, amp_B)
        e-/ADU, e-, ADU (amp A for ``x < NAXIS1/2``).
    mjd_obs : float, optional
        MJD-OBS (shutter open, UTC) for the sample time stamps.
    method : {'optimal', 'box', 'l3'}
    half_width : int, optional
        Cross-track half-width in pixels; default ``ceil(half_width_fwhm * FWHM)``.
    half_width_fwhm : float
    fwhm_px : float, optional
        Seeing FWHM (px) used to size the window before the profile is
        measured; default measured from the data.
    ramp_fwhm : float
        Samples within ``ramp_fwhm * FWHM`` of either trail end are SHUTTER_RAMP.
    profile_halfwindow : int
        Running window (samples) of the profile shape.
    n_profile_refs, ref_snr_min : int, float
        Profile reference stars: up to this many, per-sample S/N at least this.
    deblend : bool
        Joint fit of overlapping trails.
    max_neighbours : int
    outlier_sigma : float
        Rejection of unmasked outlier pixels (0 = off).
    max_bridged_fraction : float
        Samples whose masked pixels carry more than this fraction of the
        profile get NaN flux and NO_DATA.
    min_separation_fwhm : float
        Neighbours closer than this (in FWHM, across the trail) cannot be
        separated ("coincident"): they are not fitted, so their light adds to
        the star's flux where their trails overlap along the drift (and their
        variations leak into its series with the same weight).
    blend_max_fraction : float
        Largest contamination of a star's flux by its coincident neighbours
        (``blend_fraction``: their flux relative to the star's, each weighted by
        the overlap of its profile with the star's extraction weights, at the
        sample where it is largest; the decision uses its 1-sigma high value
        ``blend_fraction_hi``, so a pair whose split is poorly determined is
        treated as dominated) for which the star keeps a usable series:
        at or above it the star is BLENDED (its series is dominated by, or
        carries a large share of, another source's variations; the event
        search skips it); between 1e-3 and it the star is BLEND_MINOR (an
        unresolved fainter source adds a nearly constant ``blend_fraction`` of
        the flux where the trails overlap — a blend flux, which the
        microlensing fit has a parameter for — and its variations leak in at
        ``blend_fraction`` of their relative amplitude). Default 0.1: a
        neighbour's 100 % flare then moves the star's series by at most 10 %,
        and the extracted level is within 10 % of the star's own.
    bridge_sys : float
        Relative uncertainty of the profile under masked pixels, added to the
        variance of bridged samples as ``(bridge_sys * F * sum(P_masked))**2``.
    profile_sys : float
        Relative per-sample uncertainty of the flux from the model of what a
        sample sees (cross-track profile and along-track sampling), added to
        every sample's variance as ``(profile_sys * F)**2``. A star's sample
        weights the light of each instant through its own sub-pixel phase and
        the profile measured from the references (a running window of the
        seeing, the per-sample jitter shift), so part of the along-track jitter
        and seeing modulation is not common to all stars and survives the
        normalisation in proportion to the flux. Without it the normalised
        series of bright stars (S/N > 200 per sample) scatter 1.2-1.35 times
        their reported noise on the simulator, whose isolated bright stars show
        an excess scatter of 0.1-0.3 % per sample (a truth that follows each
        star's own pixel sampling does not remove it: it is in the data).
        0.0015 brings the bright bins of three bright simulated fields to
        scatter/expected 1.0-1.15; 0.002 over-corrects them (0.75), because
        the term also lowers the ensemble weight of the brightest references.
    bad_bits : int, optional
        Mask bits that make a pixel unusable (default: any nonzero value), e.g.
        :data:`pydriftn.flags.DEFAULT_BAD_PIXEL_FLAGS` for a decoded bitmask.
    samples : array of int, optional
        Sample indices (default the whole trail, ``0 .. n_samples-1``).

    Returns
    -------
    ExtractionResult
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    for c in ("star_id", "x_start", "y_start", "x_end", "y_end"):
        if c not in trails.columns:
            raise KeyError(f"trail table: missing column {c!r} (need star_id, x_start, y_start, x_end, y_end)")
    img = np.asarray(image)
    ny, nx = img.shape
    trails = trails.reset_index(drop=True)
    S = len(trails)
    star_id = trails["star_id"].to_numpy()
    from pydriftn.sky import _trail_arrays

    x0, y0, x1, y1 = _trail_arrays(trails)  # non-finite positions: far off the image
    dt = float(geometry.sample_dt_s)
    k = np.arange(geometry.n_samples) if samples is None else np.asarray(samples, dtype=np.int64)
    K = len(k)
    t_s = (k + 0.5) * dt
    mjd = np.full(K, np.nan) if mjd_obs is None else float(mjd_obs) + t_s / SECONDS_PER_DAY
    g_col = per_column(gain, nx, "gain")
    mx = np.clip(np.rint(0.5 * (x0 + x1)).astype(int), 0, nx - 1)
    g_star = g_col[mx]
    sky_e, sky_err_e, sky_adu, sky_err_adu, sky_ok = _sky_columns(sky, star_id, g_star)
    in_flags = trails["flags"].to_numpy(np.int64) if "flags" in trails.columns else np.zeros(S, np.int64)

    # ---- window size
    if half_width is None:
        if fwhm_px is None:
            fwhm_px = _estimate_fwhm(img, mask, x0, y0, x1, y1, geometry, sky_e, gain, read_noise_e,
                                     saturation_adu, k, in_flags, bad_bits=bad_bits)
        half_width = int(math.ceil(half_width_fwhm * fwhm_px))
    W = int(half_width)
    strips = cut_strips(img, mask, x0, y0, x1, y1, geometry, sky_e, gain, read_noise_e,
                        saturation_adu, half_width=W, k=k, bad_bits=bad_bits)
    star_flags = np.where(sky_ok, 0, fb.BAD_SKY).astype(np.int32)

    # ---- neighbours and profile references
    fwhm_guess = fwhm_px if fwhm_px is not None else W / half_width_fwhm
    snr, box = _snr_per_sample(strips, return_flux=True)
    # contamination of each star's core by its neighbours: flux ratio x their
    # line-spread function at the star's centre relative to their peak
    alpha = max(fwhm_guess, 1.0)
    if S > 1:
        # the neighbours that contaminate most (not the closest: a bright trail 1 FWHM away matters more than
        # faint ones nearer)
        nb, n_all, dcross = find_neighbours(x0, y0, x1, y1, reach_px=W + 2.0 * fwhm_guess,
                                            max_neighbours=max_neighbours + _EXTRA_CANDIDATES,
                                            along_margin_px=3 * fwhm_guess,
                                            brightness=box, alpha_px=alpha)
    else:
        nb, n_all, dcross = np.full((S, 0), -1, np.int64), np.zeros(S, np.int64), np.zeros((S, 0))
    nbv = nb >= 0
    bratio = np.where(nbv, np.maximum(box[np.where(nbv, nb, 0)], 0) / np.maximum(box, 1e-9)[:, None], 0.0)
    contamination = (bratio * (1.0 + (np.where(nbv, dcross, np.inf) / alpha) ** 2) ** -2.5).sum(axis=1)
    isolated = contamination < 0.01
    # neighbours worth a joint fit: bright enough to matter, and separable (two
    # trails closer than ~0.6 FWHM across have the same profile: their split per
    # sample is degenerate, so they are not fitted but flagged BLENDED)
    contrib = bratio * (1.0 + (np.where(nbv, dcross, np.inf) / alpha) ** 2) ** -2.5
    matters = nbv & (contrib > 1e-3)
    coincident = matters & (dcross < min_separation_fwhm * alpha)
    nb_co = np.where(coincident, nb, -1)  # flagged BLENDED / BLEND_MINOR once the fluxes are known
    # the joint fit takes the max_neighbours separable neighbours whose light reaches the star most (the list
    # is ranked by it): coincident ones, which are not fitted, do not take their places
    separable = matters & ~coincident
    nb = np.where(separable & (np.cumsum(separable, axis=1) <= max_neighbours), nb, -1)
    sat_star = (strips.sample_flags & fb.SATURATED).any(axis=1)
    off_star = (strips.sample_flags & fb.OFF_IMAGE).any(axis=1)
    cand = (snr >= ref_snr_min) & ~sat_star & ~off_star & isolated & (in_flags == 0) & sky_ok
    ref = np.zeros(S, bool)
    if cand.sum() < 5:
        cand = np.isfinite(snr) & ~sat_star & ~off_star & (snr > 5) & isolated
    if cand.sum() < 3:
        log.warning("extract_trails: fewer than 3 isolated reference stars for the profile; using blended ones")
        cand = np.isfinite(snr) & ~sat_star & ~off_star & (snr > 5)
    order = np.argsort(-np.where(cand, snr, -np.inf))[: int(n_profile_refs)]
    ref[order[cand[order]]] = True
    prof, delta, _ = measure_profile(strips, ref, halfwindow=profile_halfwindow)

    # ---- profile of every strip, normalised to the total flux (aperture-corrected)
    psi = strips.phase - prof.shift[None, :] - delta[:, None]
    P = prof.strip_profile(psi, np.arange(K)[None, :], W, normalise="total")

    sample_flags = strips.sample_flags.copy()
    fwhm_med = float(np.median(prof.fwhm_px)) if prof.n_ref else float(fwhm_guess)
    ramp_px = ramp_fwhm * fwhm_med
    n_tot = geometry.n_samples
    ramp = ((k + 0.5) < ramp_px) | ((n_tot - (k + 0.5)) < ramp_px)
    sample_flags |= np.where(ramp[None, :], fb.SHUTTER_RAMP, 0).astype(np.int32)

    w = None
    if method == "optimal":
        has_nb = (nb >= 0).any(axis=1) if (deblend and nb.shape[1] > 0) else np.zeros(S, bool)
        F, varF, bad2, w, swp = _optimal_single(strips.data, strips.var0, strips.q, strips.bad, P,
                                                n_iter=2, outlier_sigma=outlier_sigma)
        wsum_cells = _rowsum(w)
        sky_lever = np.where(swp > 0, wsum_cells / np.where(swp > 0, swp, 1.0), 0.0)
        if has_nb.any():
            idx = np.flatnonzero(has_nb)
            Fj, varj, badj, dbl_sub = _deblend(strips, prof, delta, P, nb, x0, y0, x1, y1, geometry,
                                               outlier_sigma, reach=W + 2.0 * fwhm_guess + 2.0, idx=idx)
            ni, ki = np.nonzero(dbl_sub)
            if bad2 is strips.bad:
                bad2 = bad2.copy()
            F[idx[ni], ki] = Fj[ni, ki]
            varF[idx[ni], ki] = varj[ni, ki]
            bad2[idx[ni], ki] = badj[ni, ki]
            dbl = np.zeros((S, K), bool)
            dbl[idx] = dbl_sub
            sample_flags |= np.where(dbl, fb.DEBLENDED, 0).astype(np.int32)
    elif method == "box":
        good = ~strips.bad
        sP = np.where(good, P, 0).sum(axis=2)
        F = np.where(sP > 0, np.where(good, strips.data, 0).sum(axis=2) / np.where(sP > 0, sP, 1.0), np.nan)
        V = strips.var0 + strips.q[:, :, None] * np.maximum(F[:, :, None] * P, 0)
        varF = np.where(good, V, 0).sum(axis=2) / np.where(sP > 0, sP, 1.0) ** 2
        bad2 = strips.bad
        sky_lever = np.where(sP > 0, good.sum(axis=2) / np.where(sP > 0, sP, 1.0), 0.0)
    else:  # l3
        Fl, ok = _l3_fit(strips.data.astype(np.float64), strips.bad, strips.offset, fwhm_med)
        F = np.where(ok, Fl, np.nan)
        good = ~strips.bad
        V = strips.var0 + strips.q[:, :, None] * np.maximum(strips.data, 0)
        varF = np.where(good, V, 0).sum(axis=2)
        bad2 = strips.bad
        sky_lever = good.sum(axis=2).astype(float)

    # ---- masked pixels, bridging, flags
    # (only strips with a masked or rejected cell: bad2 contains strips.bad)
    n_masked = np.zeros((S, K), dtype=np.int16)
    bridged = np.zeros((S, K))
    hit = _rowcount(bad2) > 0
    if hit.any():
        hs, hk = np.nonzero(hit)
        Ph, b2, b1 = P[hs, hk], bad2[hs, hk], strips.bad[hs, hk]
        sig = Ph > 0.01
        n_masked[hs, hk] = (b2 & sig).sum(axis=1)
        bridged[hs, hk] = np.where(b2, Ph, 0).sum(axis=1)
        sample_flags[hs, hk] |= np.where((b1 & sig).any(axis=1), fb.MASKED_PIXELS, 0).astype(np.int32)
        sample_flags[hs, hk] |= np.where((b2 & ~b1 & sig).any(axis=1), fb.OUTLIER_PIXELS, 0).astype(np.int32)
    # bridging uncertainty: the profile fraction under masked/rejected pixels is
    # taken from the measured profile, which is good to a few per cent only
    varF = varF + (bridge_sys * np.nan_to_num(F) * bridged) ** 2
    if profile_sys:
        varF = varF + (float(profile_sys) * np.nan_to_num(F)) ** 2
    nodata = (bridged > max_bridged_fraction) | ~np.isfinite(F) | ~np.isfinite(varF)
    sample_flags |= np.where(nodata, fb.NO_DATA, 0).astype(np.int32)
    F = np.where(nodata, np.nan, F)
    varF = np.where(nodata, np.nan, varF)
    # ---- coincident neighbours: how much of the star's flux is theirs
    if w is None:  # box: uniform weights; l3: ~ a sky-limited profile fit
        w = np.where(strips.bad, 0, 1.0 if method == "box" else P).astype(np.float32)
    cat_flux = _catalogue_flux(trails)
    blend_fraction, blend_hi, blend_series, blend_cat = _blend_fractions(
        strips, prof, delta, P, w, F, varF, nb_co, x0, y0, x1, y1, geometry, k, ramp, cat_flux=cat_flux)
    # the decision uses the catalogue's fluxes where every member of the blend has one: a star's own
    # brightening (the event the search is for) must not turn it from a minor into a major blend in
    # the exposure where it happens; else the 1-sigma-high split from the drift data
    decide = np.where(np.isfinite(blend_cat), blend_cat, blend_hi)
    major = decide >= float(blend_max_fraction)
    minor = (decide >= 1e-3) & ~major
    star_flags |= np.where(major, fb.BLENDED, 0).astype(np.int32)
    star_flags |= np.where(minor, fb.BLEND_MINOR, 0).astype(np.int32)
    trails["blend_fraction"] = blend_fraction
    trails["blend_fraction_hi"] = blend_hi
    trails["blend_fraction_cat"] = blend_cat
    sky_var = sky_err_e[:, None] ** 2 * sky_lever**2
    flux = (F / dt).astype(np.float64)
    err_sample = np.sqrt(varF) / dt
    err = np.sqrt(varF + sky_var) / dt
    n_bad = int(nodata.sum())
    log.info("extract_trails[%s]: %d stars x %d samples, W=%d px, FWHM %.2f px, %d profile refs, "
             "%d deblended stars, %d samples without data, %d BLENDED and %d BLEND_MINOR stars", method, S, K, W,
             fwhm_med, int(ref.sum()), int((nb >= 0).any(axis=1).sum()) if deblend else 0, n_bad,
             int(major.sum()), int(minor.sum()))
    return ExtractionResult(
        star_id=star_id,
        trails=trails,
        sample=k,
        t_s=t_s,
        mjd=mjd,
        flux=flux,
        flux_err=err,
        flux_err_sample=err_sample,
        n_masked=n_masked,
        flags=sample_flags,
        star_flags=star_flags,
        ramp=ramp,
        method=method,
        dt_s=dt,
        sky_adu=sky_adu,
        sky_err_adu=sky_err_adu,
        gain=g_star,
        profile=prof,
        delta_px=delta,
        profile_ref=ref,
        n_neighbours=n_all,
        blend_fraction=blend_fraction,
        blend_fraction_hi=blend_hi,
        extras={"half_width": W, "fwhm_px": fwhm_med, "blend_series": blend_series},
    )


def _estimate_fwhm(img, mask, x0, y0, x1, y1, geometry, sky_e, gain, read_noise_e, saturation_adu, k, in_flags,
                   n_max=300, bad_bits=None):
    """Seeing FWHM (px) from a wide-window profile of the brightest trails."""
    S = len(x0)
    W0 = 12
    # brightness proxy: sum along the trail centre line at a few samples
    kk = k[len(k) // 4: 3 * len(k) // 4: max(1, len(k) // 8)]
    strips = cut_strips(img, mask, x0, y0, x1, y1, geometry, sky_e, gain, read_noise_e, saturation_adu,
                        half_width=W0, k=kk, bad_bits=bad_bits)
    snr = _snr_per_sample(strips)
    sat = (strips.sample_flags & (fb.SATURATED | fb.OFF_IMAGE)).any(axis=1)
    snr = np.where(sat | (in_flags != 0), -np.inf, snr)
    order = np.argsort(-snr)[: min(n_max, S)]
    ref = np.zeros(S, bool)
    ref[order[np.isfinite(snr[order]) & (snr[order] > 10)]] = True
    if ref.sum() == 0:
        log.warning("extract_trails: no bright trail to measure the FWHM; assuming 4 px")
        return 4.0
    prof, _, _ = measure_profile(strips, ref, halfwindow=len(kk), n_iter=1)
    return float(np.median(prof.fwhm_px))


def _lsf_cdf(prof):
    """Along-track line-spread function and its cumulative (px -> per px, fraction) from the cross profile.

    The light a trail leaves beyond its ends is the PSF's marginal integrated
    from the end outwards; the measured cross-track profile (median over
    samples, pixel-integrated) is that marginal for a round PSF, wings
    included — a Gaussian of the same FWHM misses half of the wing light at
    1-2 FWHM, which is all of a faint neighbour's flux.
    """
    tab = np.median(np.maximum(np.asarray(prof.table, float), 0.0), axis=0)
    u = prof.u0 + prof.bin_px * np.arange(len(tab))
    cdf = np.cumsum(tab) * prof.bin_px
    if not cdf[-1] > 0:
        return (lambda x: np.where(np.abs(np.asarray(x, float)) < 0.5, 1.0, 0.0),
                lambda x: np.clip(np.asarray(x, float) + 0.5, 0.0, 1.0))
    tab, cdf = tab / cdf[-1], cdf / cdf[-1]
    return (lambda x: np.interp(x, u, tab, left=0.0, right=0.0),
            lambda x: np.interp(x, u + 0.5 * prof.bin_px, cdf, left=0.0, right=1.0))


#: Catalogue flux columns (pointed images) used for the blend decision, in order of preference.
CATALOGUE_FLUX_COLUMNS = ("flux_r", "flux_g")


def _catalogue_flux(trails):
    """The catalogue's flux of every trail's star (first of :data:`CATALOGUE_FLUX_COLUMNS` present), or None.

    Only the ratios between stars of one CCD matter; a star without it (NaN) falls back to the drift data.
    """
    for col in CATALOGUE_FLUX_COLUMNS:
        if col in trails.columns:
            v = pd.to_numeric(trails[col], errors="coerce").to_numpy(float)
            if np.isfinite(v).any():
                return v
    return None


def _blend_fractions(strips, prof, delta, P, w, F, varF, nb_co, x0, y0, x1, y1, geometry, k, ramp,
                     model_err=0.05, end_err_px=0.3, overlap_err=0.02, cat_flux=None):
    """Contamination of each star's extracted flux by its coincident neighbours.

    A coincident neighbour ``j`` of star ``i`` (closer across the drift than
    the joint fit can separate) is not in the model, so at sample ``k`` of
    ``i`` its light adds ``c_ijk F_j`` to the extracted flux, with
    ``c_ijk = O_ijk p_ijk``: ``O`` the overlap of ``j``'s cross profile
    (at its offset) with ``i``'s extraction weights ``w`` relative to ``i``'s
    own (``sum w P_j / sum w P_i``), ``p`` the fraction of ``j``'s along-track
    light at that position (0 beyond its trail ends: trails offset along the
    drift overlap on part of the series only; from the measured profile, see
    :func:`_lsf_cdf`). The stars' own fluxes ``F_i`` come from a weighted
    least-squares fit of ``F_i(k) = p_iik F_i + sum_j c_ijk F_j`` to the
    extracted samples (ramps included) of every star with a coincident
    neighbour: the samples beyond the other trail's ends and the profile
    offset separate the pair. Each sample's variance includes a model error
    of ``model_err`` times the neighbours' light in it (the profile, offsets
    and wings are known to a few per cent; for a faint star beside a bright
    one that error, not the noise, limits what the overlapped samples say)
    and, near trail ends, that of an ``end_err_px`` error of the end
    positions (the light's slope there times that shift, for the star's own
    light and its neighbours'), so a dominated star's flux comes from its
    clean samples. The 1-sigma range of each star's flux adds to the
    statistical one the largest change of the solution when the overlaps are
    ``overlap_err`` (relative) off or the trail ends ``end_err_px`` off (the
    along-track jitter, 0.26 px rms in the simulator, moves them); a pair
    whose split rests on the small difference between two nearly identical
    profiles gets a wide range, and its fainter member counts as dominant in
    ``fraction_hi``. Where nothing
    separates the two at all (trails on top of each other), a tiny ridge
    (1e-6 of each diagonal element) keeps the normal equations solvable and
    the range is wide: both stars come out BLENDED. (The box sums are no use for this:
    each member's sum includes the other's light.)

    Returns
    -------
    fraction : ndarray (S,)
        ``max_k sum_j c_ijk F_j / F_i`` over the full-illumination samples
        (``inf`` when the star's own flux fits to <= 0; 0 without neighbour).
    fraction_hi : ndarray (S,)
        The same with each neighbour's flux 1 sigma higher and the star's 1
        sigma lower (``inf`` if that is <= 0): where the split of the light is
        poorly determined (faint pairs, trails nearly on top of each other)
        this, not the best value, says whether the star may be dominated.
    series : ndarray (S, K) float32
        ``sum_j c_ijk F_j / (p_iik F_i)`` per sample (0 outside the overlap).
    fraction_cat : ndarray (S,)
        The same as ``fraction`` with the catalogue's fluxes ``cat_flux`` (the
        pointed images) for ``F``: it does not depend on what the star does
        during the exposure (NaN where a flux is missing, or without
        ``cat_flux``).
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    S, K, C = P.shape
    fraction = np.zeros(S)
    series = np.zeros((S, K), dtype=np.float32)
    no_cat = np.full(S, np.nan) if cat_flux is None else np.where(np.isfinite(cat_flux) & (cat_flux > 0), 0.0, np.nan)
    if nb_co.size == 0 or not (nb_co >= 0).any():
        return fraction, fraction.copy(), series, no_cat
    ii, mm = np.nonzero(nb_co >= 0)
    jj = nb_co[ii, mm]
    pairs = np.unique(np.concatenate([np.column_stack([ii, jj]), np.column_stack([jj, ii])]), axis=0)
    i, j = pairs[:, 0], pairs[:, 1]
    frac = geometry.sample_dt_s / geometry.exptime_s
    if strips.major_axis == "x":
        a0, ea, c0, ec = x0, (x1 - x0) * frac, y0, (y1 - y0) * frac
    else:
        a0, ea, c0, ec = y0, (y1 - y0) * frac, x0, (x1 - x0) * frac
    ea_j = np.where(np.abs(ea[j]) > 0, ea[j], 1.0)[:, None]
    kb_f = (strips.along_centre[i] - a0[j][:, None]) / ea_j  # j's sample coordinate at i's strips
    D = c0[j][:, None] + ec[j][:, None] * kb_f - strips.cross_centre[i]  # j's centre relative to i's, across
    kb = np.clip(np.floor(kb_f).astype(np.int64), 0, K - 1)
    psi = strips.phase[i] - D - prof.shift[kb] - delta[j][:, None]
    Pj = prof.strip_profile(psi, kb, strips.half_width, normalise="total")
    wi = w[i]
    own = _rowdot(wi, P[i])
    O = np.where(own > 0, _rowdot(wi, Pj) / np.where(own > 0, own, 1.0), 0.0)
    lsf, cdf = _lsf_cdf(prof)
    n_tot = geometry.n_samples
    step = np.abs(ea_j)  # px per sample along the drift
    pres = cdf(kb_f * step) - cdf((kb_f - n_tot) * step)
    slope = np.abs(lsf(kb_f * step) - lsf((kb_f - n_tot) * step))  # d pres / d (end position), per px
    O = np.where(np.isfinite(O), O, 0.0)
    coef = np.where(np.isfinite(O), O, 0.0) * np.clip(pres, 0.0, 1.0)  # (Np, K)

    # weighted least squares for the own fluxes of the stars involved
    stars = np.unique(pairs)
    n_s = len(stars)
    loc = np.full(S, -1, np.int64)
    loc[stars] = np.arange(n_s)
    li, lj = loc[i], loc[j]
    step_s = np.median(np.abs(ea)) if np.isfinite(ea).any() else 1.0
    kc = np.asarray(k, float) + 0.5
    p_own = np.clip(cdf(kc * step_s) - cdf((kc - n_tot) * step_s), 0.0, 1.0)  # (K,) own light per sample
    s_own = np.abs(lsf(kc * step_s) - lsf((kc - n_tot) * step_s))
    Fs, Vs = F[stars], varF[stars]
    good = np.isfinite(Fs) & np.isfinite(Vs) & (Vs > 0) & (p_own[None, :] > 0.01)
    y = np.where(good, Fs, 0.0)
    # pairs (a, b) of rows of ``pairs`` with the same star i (pairs are sorted by i)
    P_n = len(i)
    g_max = int(np.bincount(i).max())
    pa, pb = [], []
    for r in range(-(g_max - 1), g_max):
        a = np.arange(max(0, -r), min(P_n, P_n - r))
        a = a[i[a + r] == i[a]]
        pa.append(a)
        pb.append(a + r)
    pa, pb = np.concatenate(pa), np.concatenate(pb)

    def solve(cf, wt, p_own=p_own):
        """Weighted least squares (normal equations, tiny ridge) with coefficients ``cf``."""
        rhs = (wt * p_own * y).sum(axis=1) + np.bincount(lj, weights=(wt[li] * cf * y[li]).sum(axis=1), minlength=n_s)
        cross = (wt[li] * cf * p_own).sum(axis=1)
        rows = np.concatenate([np.arange(n_s), li, lj, lj[pa]])
        cols = np.concatenate([np.arange(n_s), lj, li, lj[pb]])
        vals = np.concatenate([(wt * p_own**2).sum(axis=1), cross, cross,
                               (wt[li[pa]] * cf[pa] * cf[pb]).sum(axis=1)])
        N = sp.csr_matrix((vals, (rows, cols)), shape=(n_s, n_s))
        diag = N.diagonal()
        Nr = (N + sp.diags(1e-6 * np.where(diag > 0, diag, 1.0))).tocsc()
        return np.atleast_1d(spsolve(Nr, rhs)), Nr

    own_f = None
    for _ in range(3):
        var = np.where(good, Vs, 1.0)
        if own_f is not None:  # model errors, from the previous solution (the first uses the noise only)
            fj = np.maximum(own_f[lj], 0.0)[:, None]
            mvar = (end_err_px * s_own[None, :] * np.maximum(own_f, 0.0)[:, None]) ** 2
            np.add.at(mvar, li, (model_err * coef * fj) ** 2 + (end_err_px * O * slope * fj) ** 2)
            var = var + mvar
        wt = np.where(good, 1.0 / var, 0.0)
        own_f, Nr = solve(coef, wt)
    # systematic uncertainty of the split: the same fit with the profile overlaps
    # ``overlap_err`` off (all together, and opposite for the two members of a pair)
    # and the trail ends ``end_err_px`` off along the drift (all trails: the
    # jitter at the shutter's opening and closing; or only the neighbours)
    anti = np.where(i < j, 1.0, -1.0)[:, None]
    alts = [(coef * (1 + overlap_err), p_own), (coef * (1 + overlap_err * anti), p_own)]
    for sh in (end_err_px, -end_err_px):
        pres_e = (cdf(kb_f * step + sh) - cdf((kb_f - n_tot) * step + sh)).clip(0.0, 1.0)
        p_own_e = np.clip(cdf(kc * step_s + sh) - cdf((kc - n_tot) * step_s + sh), 0.0, 1.0)
        alts += [(O * pres_e, p_own), (O * pres_e, p_own_e)]
    sys2 = np.zeros(n_s)
    for cf, po in alts:
        sys2 = np.maximum(sys2, (solve(cf, wt, po)[0] - own_f) ** 2)
    sig_f = np.sqrt(_inverse_diagonal_sqrt(Nr) ** 2 + sys2)

    # contamination per sample of each star: sum_j c_ijk F_j / F_i, best and 1-sigma high
    full = ~np.asarray(ramp, bool)
    if not full.any():
        full = np.ones(K, bool)
    has = np.isin(np.arange(S), i)
    out = []
    for Fi, Fj in ((own_f[li], np.maximum(own_f[lj], 0.0)),
                   (own_f[li] - sig_f[li], np.maximum(own_f[lj], 0.0) + sig_f[lj])):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(Fi[:, None] > 0, coef * Fj[:, None] / np.where(Fi > 0, Fi, 1.0)[:, None],
                             np.where(coef > 1e-3, np.inf, 0.0))
        tot = np.zeros((S, K))
        np.add.at(tot, i, ratio)
        out.append(tot)
    series[:] = np.minimum(out[0] / np.maximum(p_own, 0.05)[None, :], np.finfo(np.float32).max)
    fraction = np.where(has, out[0][:, full].max(axis=1), 0.0)
    fraction_hi = np.where(has, out[1][:, full].max(axis=1), 0.0)
    fraction_cat = no_cat
    if cat_flux is not None:  # the same sum with the catalogue's fluxes; NaN if any member lacks one
        ok = np.isfinite(cat_flux[i]) & (cat_flux[i] > 0) & np.isfinite(cat_flux[j])
        tot = np.zeros((S, K))
        ratio = np.where(ok, np.maximum(cat_flux[j], 0.0) / np.where(ok, cat_flux[i], 1.0), 0.0)
        np.add.at(tot, i, coef * ratio[:, None])
        fraction_cat = np.where(has, tot[:, full].max(axis=1), no_cat)
        fraction_cat[np.bincount(i[~ok], minlength=S) > 0] = np.nan
    return fraction, fraction_hi, series, fraction_cat


def _inverse_diagonal_sqrt(N):
    """``sqrt(diag(N^-1))`` of a sparse symmetric positive-definite matrix made of small
    independent blocks (groups of mutually coincident stars), block by block.

    The blocks of one size are inverted together (one stacked ``np.linalg.inv``
    call, the same LAPACK solve per block as one call each); a size whose stack
    holds a singular block falls back to one call per block (``inf`` for the
    singular ones).
    """
    from scipy.sparse.csgraph import connected_components

    n = N.shape[0]
    out = np.empty(n)
    n_comp, lab = connected_components(N, directed=False)
    size = np.bincount(lab, minlength=n_comp)
    d = N.diagonal()
    single = size[lab] == 1
    with np.errstate(divide="ignore"):
        out[single] = np.where(d[single] > 0, 1.0 / np.sqrt(np.where(d[single] > 0, d[single], 1.0)), np.inf)
    if single.all():
        return out
    # position of every row inside its block (rows of a block in increasing order, as N[grp][:, grp])
    order = np.argsort(lab, kind="stable")
    start = np.zeros(n_comp, np.int64)
    start[1:] = np.cumsum(size)[:-1]
    local = np.empty(n, np.int64)
    local[order] = np.arange(n) - start[lab[order]]
    coo = N.tocoo()
    coo.sum_duplicates()
    r, c, v = coo.row, coo.col, coo.data
    multi = ~single[r]
    r, c, v = r[multi], c[multi], v[multi]
    for g in np.unique(size[size > 1]):
        comps = np.flatnonzero(size == g)
        slot = np.full(n_comp, -1, np.int64)
        slot[comps] = np.arange(comps.size)
        e = size[lab[r]] == g
        blocks = np.zeros((comps.size, g, g))
        blocks[slot[lab[r[e]]], local[r[e]], local[c[e]]] = v[e]
        rows = np.flatnonzero(size[lab] == g)
        try:
            inv_diag = np.diagonal(np.linalg.inv(blocks), axis1=1, axis2=2)
        except np.linalg.LinAlgError:
            inv_diag = np.full((comps.size, g), np.inf)
            for b in range(comps.size):
                try:
                    inv_diag[b] = np.diag(np.linalg.inv(blocks[b]))
                except np.linalg.LinAlgError:
                    pass
        out[rows] = np.sqrt(np.clip(inv_diag[slot[lab[rows]], local[rows]], 0.0, None))
    return out


def _deblend(strips, prof, delta, P, nb, x0, y0, x1, y1, geometry, outlier_sigma, reach, idx):
    """Joint fit of the stars ``idx`` with their overlapping neighbours ``nb[idx]`` (see module docstring).

    Returns F, varF, bad, deblended (arrays over ``idx``).
    """
    S, K, C = strips.data.shape
    nbi = nb[idx]
    M = int((nbi >= 0).sum(axis=1).max()) if len(idx) else 0
    # compact the neighbour columns (valid ones first)
    order = np.argsort(nbi < 0, axis=1, kind="stable")
    nbi = np.take_along_axis(nbi, order, axis=1)[:, :M]
    frac = geometry.sample_dt_s / geometry.exptime_s
    if strips.major_axis == "x":
        a0, ea, c0, ec = x0, (x1 - x0) * frac, y0, (y1 - y0) * frac
    else:
        a0, ea, c0, ec = y0, (y1 - y0) * frac, x0, (x1 - x0) * frac
    N = len(idx)
    ac = strips.along_centre[idx]
    cc = strips.cross_centre[idx]
    n_tot = geometry.n_samples
    margin = 3.0 * float(np.nanmedian(prof.fwhm_px))
    # geometry of every neighbour relative to every strip (cheap, (N, K) arrays)
    geo_m = []
    on_any = np.zeros((N, K), dtype=bool)
    for m in range(M):
        b = nbi[:, m]
        okb = b >= 0
        bb = np.where(okb, b, 0)
        # neighbour's continuous sample coordinate at the strip's along position
        kb_f = (ac - a0[bb][:, None]) / ea[bb][:, None]
        D = c0[bb][:, None] + ec[bb][:, None] * kb_f - cc  # its centre relative to the star's, cross axis
        on = okb[:, None] & (kb_f > -margin) & (kb_f < n_tot + margin) & (np.abs(D) < reach)
        geo_m.append((bb, kb_f, D, on))
        on_any |= on
    # profiles only for the strips that have a neighbour, as a flat list of strips
    ni, ki = np.nonzero(on_any)
    Q = len(ni)
    F = np.full((N, K), np.nan)
    varF = np.full((N, K), np.inf)
    bad = strips.bad[idx].copy()
    dbl = np.zeros((N, K), dtype=bool)
    if Q == 0:
        return F, varF, bad, dbl
    si = idx[ni]
    phase = strips.phase[si, ki][:, None]
    Ab = np.zeros((Q, M, C), dtype=np.float32)  # the neighbours' profiles (the star's: P)
    active = np.zeros((Q, 1, M + 1), dtype=bool)
    active[..., 0] = True
    for m, (bb, kb_f, D, on) in enumerate(geo_m):
        onq = on[ni, ki]
        r = np.flatnonzero(onq)  # profiles only where this neighbour is near
        kf = kb_f[ni[r], ki[r]][:, None]
        Dq = D[ni[r], ki[r]][:, None]
        dq = delta[bb][ni[r]][:, None]
        # the strip covers the neighbour's sample coordinates [kb_f - 0.5, kb_f + 0.5]:
        # parts of two of its samples, each with its own profile and jitter shift
        m0 = np.floor(kf - 0.5)
        phi = (kf - 0.5 - m0).astype(np.float32)[..., None]
        Pr = 0.0
        for kk, wk in ((m0, 1.0 - phi), (m0 + 1, phi)):
            kb = np.clip(kk.astype(np.int64), 0, K - 1)
            psi_b = phase[r] - Dq - prof.shift[kb] - dq
            Pr = Pr + wk * prof.strip_profile(psi_b, kb, strips.half_width, normalise="total", reach_px=reach + 1.0)
        Ab[r, m] = Pr[:, 0]
        active[r, 0, m + 1] = _rowsum(Pr[:, 0]) > 1e-3
    dq_any = active[:, 0, 1:].any(axis=1)
    keep = np.flatnonzero(dq_any)
    if len(keep) == 0:
        return F, varF, bad, dbl
    ni, ki, si = ni[keep], ki[keep], si[keep]
    act = active[keep, 0, 1:]  # (Q, M)
    # most strips have one active neighbour: solve each group with only its active
    # columns (a 2x2 system for most), not with M + 1 columns everywhere
    n_act = act.sum(axis=1)
    order = np.argsort(~act, axis=1, kind="stable")  # active neighbours first
    for g in np.unique(n_act):
        sel = np.flatnonzero(n_act == g)
        rows = keep[sel]
        cols = order[sel, :g]
        q_s, q_k = si[sel], ki[sel]
        if g <= 2:  # the star and one or two neighbours: one compiled loop over the strips
            Fq, vq, bq = joint_strips(strips.data, strips.var0, strips.q, strips.bad, q_s, q_k, P, Ab, rows,
                                      np.ascontiguousarray(cols), 1, float(outlier_sigma or 0.0), 0.1)
            F[ni[sel], ki[sel]] = Fq
            varF[ni[sel], ki[sel]] = vq
            bad[ni[sel], ki[sel]] = bq
            continue
        Ag = [P[q_s, q_k][:, None, :]] + [Ab[rows, cols[:, j]][:, None, :] for j in range(g)]
        actg = np.ones((len(sel), 1, g + 1), dtype=bool)
        Fq, vq, bq = _joint_solve(strips.data[q_s, q_k][:, None, :], strips.var0[q_s, q_k][:, None, :],
                                  strips.q[q_s, q_k][:, None], strips.bad[q_s, q_k][:, None, :], Ag, actg,
                                  outlier_sigma=outlier_sigma)
        F[ni[sel], ki[sel]] = Fq[:, 0]
        varF[ni[sel], ki[sel]] = vq[:, 0]
        bad[ni[sel], ki[sel]] = bq[:, 0]
    dbl[ni, ki] = True
    return F, varF, bad, dbl
