"""Match detected trails to catalogue stars without a good prior.

1. **Vote** (:func:`vote_transform`): for the brightest detections and the
   brightest catalogue stars (pixel positions predicted with the header WCS),
   every pair difference is a vote for the pointing offset; the votes go into
   a 2-D histogram, one per trial rotation about the CCD centre (steps small
   enough that the rotation error at the CCD corner stays inside a bin). The
   tallest peak over all rotations gives rotation and shift; its height against
   the random-pair level says whether the catalogue belongs to this field.
2. **Refine** (:func:`refine_matches`): nearest-neighbour matching with a
   shrinking radius and an affine fit, then a final one-to-one assignment
   whose cost adds the position offset (in units of its error) and the
   magnitude inconsistency (after a fitted zero point).

Written here rather than taken from a library (astroalign/triangle matching
is not a dependency, and offset voting is both simpler and more robust for a
field that is known up to a shift and a small rotation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..errors import AstrometryError

log = logging.getLogger(__name__)

__all__ = ["VoteResult", "vote_transform", "refine_matches", "apply_affine", "fit_affine"]


@dataclass
class VoteResult:
    """Best rotation and shift from :func:`vote_transform`."""

    rotation_deg: float
    shift_px: tuple
    peak: int
    background: float
    significance: float


def _rotate(xy, centre, ang_rad):
    c, s = math.cos(ang_rad), math.sin(ang_rad)
    d = xy - centre
    return np.c_[c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]] + centre


def vote_transform(det_xy, cat_xy, centre, *, max_shift_px, max_rotation_deg, bin_px=3.0,
                   min_peak=6, min_significance=5.0):
    """Find rotation and shift that bring catalogue positions onto detections.

    Parameters
    ----------
    det_xy : ndarray (n, 2)
        Positions of the brightest detections.
    cat_xy : ndarray (m, 2)
        Positions of the brightest catalogue stars predicted by the header WCS.
    centre : (float, float)
        Rotation centre (CCD centre).
    max_shift_px, max_rotation_deg : float
        Search range.
    bin_px : float
        Histogram bin size.

    Raises
    ------
    AstrometryError
        No significant peak (catalogue of another field, or nothing in common).
    """
    det_xy = np.asarray(det_xy, float)
    cat_xy = np.asarray(cat_xy, float)
    if len(det_xy) < 3 or len(cat_xy) < 3:
        raise AstrometryError(
            f"matching: {len(det_xy)} detections and {len(cat_xy)} catalogue stars; at least 3 of each needed")
    centre = np.asarray(centre, float)
    rmax = float(np.max(np.hypot(*(det_xy - centre).T))) + 1.0
    step = math.degrees(0.7 * bin_px / rmax)
    nrot = int(math.ceil(max_rotation_deg / step)) if max_rotation_deg > 0 else 0
    rots = np.linspace(-nrot * step, nrot * step, 2 * nrot + 1) if nrot else np.array([0.0])
    nb = int(math.ceil(2 * max_shift_px / bin_px)) + 1
    # pairs that can fall in the histogram at any trial rotation (a rotation moves a
    # catalogue position by at most its distance from the centre times the angle):
    # selected once, so each rotation handles a few % of all pairs
    rcat = float(np.max(np.hypot(*(cat_xy - centre).T)))
    lim = max_shift_px + rcat * math.radians(float(np.max(np.abs(rots)))) + 2 * bin_px
    d0 = det_xy[:, None, :] - cat_xy[None, :, :]
    pi, pj = np.nonzero((np.abs(d0[..., 0]) < lim) & (np.abs(d0[..., 1]) < lim))
    det_p = det_xy[pi]
    best = None
    for rot in rots:
        c = _rotate(cat_xy, centre, math.radians(rot))
        d = det_p - c[pj]
        ij = np.floor((d + max_shift_px) / bin_px).astype(np.int64)
        ok = (ij[:, 0] >= 0) & (ij[:, 0] < nb) & (ij[:, 1] >= 0) & (ij[:, 1] < nb)
        h = np.bincount(ij[ok, 1] * nb + ij[ok, 0], minlength=nb * nb).reshape(nb, nb)
        # a true peak can straddle bin edges: sum 2x2 cells
        h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        k = int(np.argmax(h2))
        iy, ix = divmod(k, h2.shape[1])
        peak = int(h2[iy, ix])
        if best is None or peak > best[0]:
            best = (peak, rot, iy, ix, h, h2)
    peak, rot, iy, ix, h, h2 = best
    bg = float(np.mean(h2))
    signif = (peak - bg) / math.sqrt(max(bg, 1.0))
    # refine the shift as the mean of the votes inside the peak cells
    c = _rotate(cat_xy, centre, math.radians(rot))
    d = det_p - c[pj]
    lo = np.array([ix, iy]) * bin_px - max_shift_px
    sel = np.all((d >= lo) & (d < lo + 2 * bin_px), axis=1)
    shift = d[sel].mean(axis=0) if sel.any() else lo + bin_px
    log.debug("vote: rotation %.3f deg, shift (%.1f, %.1f) px, peak %d over %.2f (%.1f sigma)",
              rot, shift[0], shift[1], peak, bg, signif)
    if peak < min_peak or signif < min_significance:
        raise AstrometryError(
            f"matching: no consistent offset between {len(det_xy)} detected trails and {len(cat_xy)} "
            f"catalogue stars within {max_shift_px:.0f} px and {max_rotation_deg:.2f} deg "
            f"(best peak {peak} pairs vs {bg:.1f} expected at random); is the catalogue from this field?")
    return VoteResult(rotation_deg=float(rot), shift_px=(float(shift[0]), float(shift[1])), peak=peak,
                      background=bg, significance=float(signif))


def fit_affine(src, dst, w=None):
    """Least-squares affine ``dst = M @ src + t``; returns a (2, 3) matrix."""
    A = np.c_[src, np.ones(len(src))]
    if w is not None:
        sw = np.sqrt(w)[:, None]
        A = A * sw
        dst = dst * sw
    coef, *_ = np.linalg.lstsq(A, dst, rcond=None)
    return coef.T


def apply_affine(M, xy):
    """Apply a (2, 3) affine matrix to positions (n, 2)."""
    xy = np.asarray(xy, float)
    return xy @ M[:, :2].T + M[:, 2]


def refine_matches(det_xy, det_mag, cat_xy, cat_mag, vote: VoteResult, centre, *, det_err=None,
                   radii=(6.0, 3.0, 1.5), final_radius=1.5, mag_tol=1.0):
    """Iterative matching seeded by the vote, with a magnitude-consistency term.

    Parameters
    ----------
    det_xy : ndarray (n, 2)
        All detection positions.
    det_mag : ndarray (n,)
        Instrumental magnitudes ``-2.5 log10(flux)`` (NaN allowed).
    cat_xy : ndarray (m, 2)
        Catalogue positions predicted by the header WCS.
    cat_mag : ndarray (m,)
        Catalogue magnitudes.
    vote : VoteResult
    det_err : ndarray (n,), optional
        Position errors (px).

    Returns
    -------
    det_index, cat_index : ndarray of int
        One-to-one matched pairs.
    affine : ndarray (2, 3)
        Map from header-WCS catalogue positions to detected positions.
    info : dict
        ``zero_point``, ``mag_scatter``, ``rms_px``.
    """
    det_xy = np.asarray(det_xy, float)
    cat_xy = np.asarray(cat_xy, float)
    centre = np.asarray(centre, float)
    th = math.radians(vote.rotation_deg)
    c, s = math.cos(th), math.sin(th)
    R = np.array([[c, -s], [s, c]])
    M = np.c_[R, centre - R @ centre + np.asarray(vote.shift_px)]
    err = np.full(len(det_xy), 0.3) if det_err is None else np.hypot(np.nan_to_num(det_err, nan=1.0), 0.05)
    for r in radii:
        pred = apply_affine(M, cat_xy)
        tree = cKDTree(pred)
        d, j = tree.query(det_xy, distance_upper_bound=r)
        ok = np.isfinite(d)
        if ok.sum() < 3:
            raise AstrometryError(f"matching: only {ok.sum()} detections within {r} px after the vote")
        M = fit_affine(cat_xy[j[ok]], det_xy[ok])
    pred = apply_affine(M, cat_xy)
    tree = cKDTree(pred)
    # zero point from unambiguous close pairs
    d, j = tree.query(det_xy, distance_upper_bound=final_radius)
    ok = np.isfinite(d) & np.isfinite(det_mag) & np.isfinite(cat_mag[np.minimum(j, len(cat_mag) - 1)])
    if ok.sum() >= 3:
        dm = cat_mag[j[ok]] - det_mag[ok]
        zp = float(np.median(dm))
        sm = float(max(1.4826 * np.median(np.abs(dm - zp)), 0.05))
    else:
        zp, sm = 0.0, np.inf
    # candidate pairs within the final radius (+3 sigma), cost = position + magnitude
    pairs = tree.query_ball_point(det_xy, r=final_radius + 3 * np.clip(err, 0, 2.0))
    di, ci = [], []
    for i, lst in enumerate(pairs):
        di.extend([i] * len(lst))
        ci.extend(lst)
    di = np.asarray(di, dtype=np.intp)
    ci = np.asarray(ci, dtype=np.intp)
    if di.size == 0:
        raise AstrometryError("matching: no detection lies near a catalogue star after refinement")
    dpos = np.hypot(*(det_xy[di] - pred[ci]).T) / err[di]
    dmag = cat_mag[ci] - det_mag[di] - zp
    mterm = np.where(np.isfinite(dmag), (dmag / max(sm, 0.1)) ** 2, 4.0)
    cost = dpos**2 + np.minimum(mterm, 100.0)
    badmag = np.isfinite(dmag) & (np.abs(dmag) > max(mag_tol, 5 * sm))
    order = np.argsort(cost + 1e6 * badmag, kind="stable")
    used_d = np.zeros(len(det_xy), bool)
    used_c = np.zeros(len(cat_xy), bool)
    out_d, out_c = [], []
    for k in order:
        a, b = di[k], ci[k]
        if used_d[a] or used_c[b] or badmag[k]:
            continue
        used_d[a] = used_c[b] = True
        out_d.append(a)
        out_c.append(b)
    out_d = np.asarray(out_d, dtype=np.intp)
    out_c = np.asarray(out_c, dtype=np.intp)
    M = fit_affine(cat_xy[out_c], det_xy[out_d])
    res = apply_affine(M, cat_xy[out_c]) - det_xy[out_d]
    rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1))))
    return out_d, out_c, M, {"zero_point": zp, "mag_scatter": sm, "rms_px": rms}
