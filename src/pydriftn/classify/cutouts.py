"""PNG cutouts of the non-star detections of a classification, model overlaid."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

__all__ = ["save_cutouts"]

log = logging.getLogger(__name__)


def save_cutouts(result, image, out_dir, *, size=41, prefix="", max_cutouts=200, classes=None):
    """Write one PNG per non-star detection: image, trail model contours, the object's shape.

    Parameters
    ----------
    result : ClassificationResult
    image : ndarray
        The image that was classified (ADU).
    out_dir : str or Path
        Created if missing.
    size : int
        Cutout side (px); satellites get a binned view of the whole CCD.
    prefix : str
        File-name prefix (e.g. ``"exp_1000001-S4-"``).
    max_cutouts : int
        At most this many files (brightest first).
    classes : iterable of str, optional
        Classes to write (default: everything but ``star_trail``).

    Returns
    -------
    list of Path
    """
    # a Figure without pyplot: no global state, the user's backend is left alone
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tab = result.table
    want = set(classes) if classes is not None else {"flash", "satellite", "cosmic_ray", "other_trail"}
    sel = tab[tab["class"].isin(want)]
    sel = sel.sort_values("snr", ascending=False, na_position="last").head(max_cutouts)
    img = np.asarray(image, dtype=float)
    ny, nx = img.shape
    h = size // 2
    written = []
    for k, row in sel.iterrows():
        fig = Figure(figsize=(6.4, 3.4))
        axes = fig.subplots(1, 2)
        if row["class"] == "satellite" and np.isfinite(row["x0"]):
            b = max(1, int(math.ceil(max(nx, ny) / 256)))
            small = img[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b).mean(axis=(1, 3))
            lo, hi = np.percentile(small, [5, 99.5])
            axes[0].imshow(small, origin="lower", cmap="gray", vmin=lo, vmax=hi)
            axes[0].plot([row["x0"] / b, row["x1"] / b], [row["y0"] / b, row["y1"] / b], "r-", lw=0.8)
            m = result.streak_mask[: ny // b * b, : nx // b * b].reshape(ny // b, b, nx // b, b).any(axis=(1, 3))
            axes[1].imshow(m, origin="lower", cmap="Reds")
            axes[1].set_title("streak mask", fontsize=8)
        else:
            xc, yc = int(round(row["x"])), int(round(row["y"]))
            y0, y1 = max(0, yc - h), min(ny, yc + h + 1)
            x0, x1 = max(0, xc - h), min(nx, xc + h + 1)
            cut = img[y0:y1, x0:x1]
            lo, hi = np.percentile(cut, [5, 99.7])
            ext = (x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5)
            axes[0].imshow(cut, origin="lower", cmap="gray", vmin=lo, vmax=hi, extent=ext)
            if result.model is not None:
                mc = result.model[y0:y1, x0:x1]
                if np.nanmax(mc) > 0:
                    axes[0].contour(np.arange(x0, x1), np.arange(y0, y1), mc,
                                    levels=np.nanmax(mc) * np.array([0.1, 0.5]), colors="c", linewidths=0.6)
            resid = cut - (result.model[y0:y1, x0:x1] if result.model is not None else 0)
            lo2, hi2 = np.percentile(resid, [5, 99.7])
            axes[1].imshow(resid, origin="lower", cmap="gray", vmin=lo2, vmax=hi2, extent=ext)
            axes[1].set_title("minus trail model", fontsize=8)
            L = row["length_px"] if np.isfinite(row["length_px"]) else 3.0
            W = row["width_px"] if np.isfinite(row["width_px"]) else 3.0
            A = row["angle_deg"] if np.isfinite(row["angle_deg"]) else 0.0
            for ax in axes:
                ax.add_patch(Ellipse((row["x"], row["y"]), max(L, 2.0), max(W, 2.0), angle=A, fill=False,
                                     color="r", lw=0.8))
        title = f"{row['class']} ({row['subclass']})  x={row['x']:.1f} y={row['y']:.1f}  S/N={row['snr']:.1f}"
        if row["class"] == "flash" and np.isfinite(row.get("t_s", np.nan)):
            title += f"\non star {row['on_star_id']} t={row['t_s']:.2f}s"
        fig.suptitle(title, fontsize=8)
        for ax in axes:
            ax.tick_params(labelsize=6)
        path = out / f"{prefix}{row['class']}-{k:04d}.png"
        fig.savefig(path, dpi=80)
        written.append(path)
    log.info("wrote %d cutouts to %s", len(written), out)
    return written
