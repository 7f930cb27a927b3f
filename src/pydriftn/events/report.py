"""The event-search report: one PDF and one HTML page with every candidate and the search's sensitivity.

``write_report`` collects what an astronomer checks before believing a
candidate, in one place:

* a summary page: star-nights searched, false-alarm rate and thresholds per
  noise pool, counts of candidates, detections and vetoed candidates (by veto);
* the candidate table (best-fit parameters, statistic, false-alarm
  probability, vetoes);
* one page per candidate: the light curve with the fitted models
  (:func:`~.plot.plot_candidate`) above cutouts of the drift images of the
  exposures involved, with the star's trail and the position along it at the
  fitted ``t0`` marked (the position along a trail is the time);
* the efficiency of the search (injection-recovery tables and plots written by
  ``pydriftn efficiency``), when a folder holding them is given or found next
  to the store.

The drift-image cutouts need the run's folder (``pydriftn run`` output): each
unit's ``done.json`` names the image and ``forced.parquet`` holds the trail
end points of every catalogued star; without them the pages have the light
curve only. matplotlib is used without pyplot (the user's backend is left
alone); files are written atomically.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .series import SECONDS_PER_DAY

__all__ = ["write_report", "candidate_cutouts"]

log = logging.getLogger(__name__)

#: Candidate-table columns shown in the report (those present).
TABLE_COLUMNS = ["star_id", "night", "ccd", "model", "statistic", "false_alarm_prob", "t0_mjd", "te_s", "te_err_s",
                 "u0", "rho", "peak_magnification", "rise_s", "decay_s", "veto_reasons"]


def _vetoes(c) -> str:
    v = c.get("veto_reasons", "")
    return v if isinstance(v, str) and v else ""


def _exposures_in_window(lc: pd.DataFrame, cand) -> pd.DataFrame:
    """(night, expnum, ccd, shutter-open MJD) of the candidate star's exposures overlapping its window.

    The window is the matched-filter window widened to the fitted ``t0`` (and
    ``t0 +- tE`` for a microlensing fit), so that the exposure holding the peak
    is always shown.
    """
    sel = lc["star_id"] == cand["star_id"]
    for k in ("night", "ccd"):
        if k in lc.columns and pd.notna(cand.get(k)):
            sel &= lc[k] == cand[k]
    d = lc.loc[sel, [c for c in ("night", "expnum", "ccd", "mjd", "t_s") if c in lc.columns]]
    if d.empty:
        return d
    lo, hi = float(cand["window_start_mjd"]), float(cand["window_end_mjd"])
    t0 = cand.get("t0_mjd", np.nan)
    if pd.notna(t0):
        te = cand.get("te_s", np.nan)
        half = (float(te) if pd.notna(te) else 0.0) / SECONDS_PER_DAY
        lo, hi = min(lo, float(t0) - half), max(hi, float(t0) + half)
    g = d.groupby(["night", "expnum", "ccd"], sort=True).agg(mjd_min=("mjd", "min"), mjd_max=("mjd", "max"))
    if "t_s" in d.columns:
        d = d.assign(open_mjd=d["mjd"] - d["t_s"] / SECONDS_PER_DAY)
        g["open_mjd"] = d.groupby(["night", "expnum", "ccd"], sort=True)["open_mjd"].median()
    else:
        g["open_mjd"] = g["mjd_min"]
    hit = (g["mjd_max"] >= lo) & (g["mjd_min"] <= hi)
    return g.loc[hit].reset_index()


def candidate_cutouts(run_dir, lc: pd.DataFrame, cand, *, half_size_px: int = 24, max_exposures: int = 4):
    """Drift-image cutouts of the exposures of a candidate's window.

    Parameters
    ----------
    run_dir : path
        Output folder of ``pydriftn run`` (holding ``NIGHT/units/exp_N/CCD``).
    lc : pandas.DataFrame
        Light-curve table (``star_id, night, expnum, ccd, mjd, t_s``).
    cand : mapping
        A candidate row.
    half_size_px : int
        Margin around the trail's bounding box (px).
    max_exposures : int
        At most this many exposures (those nearest the fitted ``t0``).

    Returns
    -------
    list of dict
        ``expnum, ccd, image (2-D array), origin (x0, y0), trail ((xs, ys), (xe, ye)),
        at_t0 ((x, y) or None), image_path``; exposures whose unit outputs or
        image cannot be read are left out (logged).
    """
    from ..io import read_ccd

    run_dir = Path(run_dir)
    exps = _exposures_in_window(lc, cand)
    if exps.empty:
        return []
    t0 = cand.get("t0_mjd", np.nan)
    if pd.notna(t0) and len(exps) > max_exposures:
        mid = 0.5 * (exps["mjd_min"] + exps["mjd_max"])
        exps = exps.iloc[np.argsort(np.abs(mid - float(t0)).to_numpy(), kind="stable")[:max_exposures]]
        exps = exps.sort_values("mjd_min")
    out = []
    for _, e in exps.iterrows():
        udir = run_dir / str(e["night"]) / "units" / f"exp_{int(e['expnum'])}" / str(e["ccd"])
        try:
            record = json.loads((udir / "done.json").read_text())
            image_path = record["image"]["path"]
            forced = pd.read_parquet(udir / "forced.parquet", columns=["star_id", "x_start", "y_start", "x_end",
                                                                       "y_end"])
        except (OSError, ValueError, KeyError) as exc:
            log.info("report: no cutout for star %s exposure %s: unit outputs unreadable in %s (%s)",
                     cand["star_id"], e["expnum"], udir, exc)
            continue
        row = forced.loc[forced["star_id"] == cand["star_id"]]
        if row.empty:
            continue
        xs, ys, xe, ye = (float(row.iloc[0][k]) for k in ("x_start", "y_start", "x_end", "y_end"))
        try:
            img = read_ccd(image_path, str(e["ccd"]), require_wcs=False)
        except Exception as exc:  # noqa: BLE001 - a report page without its cutout, not a failed report
            log.info("report: no cutout for star %s exposure %s: %s", cand["star_id"], e["expnum"], exc)
            continue
        ny, nx = img.data.shape
        x0 = max(int(np.floor(min(xs, xe))) - half_size_px, 0)
        x1 = min(int(np.ceil(max(xs, xe))) + half_size_px + 1, nx)
        y0 = max(int(np.floor(min(ys, ye))) - half_size_px, 0)
        y1 = min(int(np.ceil(max(ys, ye))) + half_size_px + 1, ny)
        at_t0 = None
        if pd.notna(t0) and img.info.exptime and img.info.exptime > 0:
            frac = (float(t0) - float(e["open_mjd"])) * SECONDS_PER_DAY / float(img.info.exptime)
            if -0.05 <= frac <= 1.05:
                at_t0 = (xs + frac * (xe - xs), ys + frac * (ye - ys))
        out.append({"expnum": int(e["expnum"]), "ccd": str(e["ccd"]), "image": np.array(img.data[y0:y1, x0:x1]),
                    "origin": (x0, y0), "trail": ((xs, ys), (xe, ye)), "at_t0": at_t0,
                    "image_path": str(image_path)})
    return out


def _draw_cutouts(fig, cutouts, rect):
    """Cutouts side by side in ``rect`` (left, bottom, width, height) of ``fig``."""
    from astropy.visualization import AsinhStretch, AsymmetricPercentileInterval, ImageNormalize

    n = len(cutouts)
    left, bottom, width, height = rect
    for i, c in enumerate(cutouts):
        ax = fig.add_axes([left + i * width / n, bottom, width / n * 0.95, height])
        data = c["image"]
        finite = data[np.isfinite(data)]
        if finite.size:
            norm = ImageNormalize(finite, interval=AsymmetricPercentileInterval(5.0, 99.8), stretch=AsinhStretch(0.05))
        else:
            norm = None
        x0, y0 = c["origin"]
        extent = (x0 - 0.5, x0 + data.shape[1] - 0.5, y0 - 0.5, y0 + data.shape[0] - 0.5)
        ax.imshow(data, origin="lower", cmap="gray_r", norm=norm, extent=extent, interpolation="nearest")
        (xs, ys), (xe, ye) = c["trail"]
        ax.annotate("", xy=(xe, ye), xytext=(xs, ys),
                    arrowprops={"arrowstyle": "->", "color": "tab:orange", "lw": 0.8, "alpha": 0.8})
        if c["at_t0"] is not None:
            ax.plot(*c["at_t0"], "o", mfc="none", mec="tab:red", ms=12, mew=1.2)
        ax.set_title(f"exp {c['expnum']} {c['ccd']}", fontsize=7)
        ax.tick_params(labelsize=6)


def _summary_lines(result, lc) -> list[str]:
    c = result.candidates
    det = result.detections
    lines = [f"star-nights searched: {len(result.star_nights)}",
             f"false-alarm rate per star-night: {result.false_alarm_rate:g}",
             f"candidates (above pre-threshold): {len(c)}",
             f"detections (above threshold, not vetoed): {len(det)}"]
    if not c.empty and "above_threshold" in c.columns:
        vetoed = c[c["above_threshold"].astype(bool) & (c.get("vetoes", 0) != 0)]
        lines.append(f"above threshold but vetoed: {len(vetoed)}")
        if len(vetoed) and "veto_reasons" in vetoed.columns:
            reasons = vetoed["veto_reasons"].fillna("").str.split(",").explode()
            reasons = reasons[reasons != ""].value_counts()
            for name, n in reasons.items():
                lines.append(f"    vetoed by {name}: {n}")
    for pool, thr in sorted(result.thresholds.items(), key=lambda kv: str(kv[0])):
        lines.append(f"threshold, pool {pool}: {thr:.2f}")
    if lc is not None and not lc.empty:
        lines.append(f"samples in the searched store: {len(lc)}; nights: "
                     f"{', '.join(map(str, sorted(lc['night'].unique()))) if 'night' in lc.columns else '?'}")
    return lines


def _efficiency_images(efficiency_dir) -> list[Path]:
    if efficiency_dir is None:
        return []
    d = Path(efficiency_dir)
    return sorted(p for p in d.glob("*.png") if p.is_file())


def _efficiency_tables(efficiency_dir) -> list[tuple[str, pd.DataFrame]]:
    if efficiency_dir is None:
        return []
    out = []
    for p in sorted(Path(efficiency_dir).glob("efficiency*.csv")):
        try:
            out.append((p.name, pd.read_csv(p)))
        except (OSError, ValueError) as exc:
            log.warning("report: cannot read %s: %s", p, exc)
    return out


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _candidate_figure(lc, cand, cutouts):
    from matplotlib.figure import Figure

    from .plot import plot_candidate

    fig = Figure(figsize=(10, 7.5 if cutouts else 4.0))
    if cutouts:
        ax = fig.add_axes([0.08, 0.47, 0.9, 0.45])
        _draw_cutouts(fig, cutouts, (0.06, 0.04, 0.92, 0.33))
    else:
        ax = fig.add_axes([0.08, 0.14, 0.9, 0.72])
    plot_candidate(lc, cand, ax=ax)
    return fig


def _text_figure(title, lines):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5))
    fig.text(0.05, 0.95, title, fontsize=14, va="top", weight="bold")
    fig.text(0.05, 0.88, "\n".join(lines), fontsize=9, va="top", family="monospace")
    return fig


def _table_lines(table: pd.DataFrame, columns) -> list[str]:
    cols = [c for c in columns if c in table.columns]
    if table.empty or not cols:
        return ["(none)"]
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        return table[cols].to_string(index=False).splitlines()


def write_report(result, lc: pd.DataFrame, out_dir, *, run_dir=None, efficiency_dir=None, max_candidates: int = 50,
                 include_vetoed: bool = True, name: str = "report"):
    """Write ``NAME.pdf`` and ``NAME.html`` (with per-candidate PNGs) in ``out_dir``.

    Parameters
    ----------
    result : pydriftn.events.SearchResult
    lc : pandas.DataFrame
        The light curves that were searched.
    out_dir : path
    run_dir : path, optional
        Output folder of ``pydriftn run``, for drift-image cutouts.
    efficiency_dir : path, optional
        Folder with ``efficiency*.csv`` / ``*.png`` from ``pydriftn efficiency``.
    max_candidates : int
        Pages for at most this many candidates above threshold (detections
        first, by statistic; then vetoed ones if ``include_vetoed``).
    include_vetoed : bool
        Also give pages to candidates above threshold that were vetoed (marked).

    Returns
    -------
    list of pathlib.Path
        Files written.
    """
    from matplotlib.backends.backend_pdf import PdfPages

    from ..io import write_bytes_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cands = result.candidates
    det = result.detections
    pages = det
    if include_vetoed and not cands.empty and "above_threshold" in cands.columns:
        vetoed = cands[cands["above_threshold"].astype(bool) & ~cands.index.isin(det.index)]
        pages = pd.concat([det, vetoed.sort_values("statistic", ascending=False)])
    pages = pages.head(max_candidates)

    summary = _summary_lines(result, lc)
    eff_tables = _efficiency_tables(efficiency_dir)
    eff_images = _efficiency_images(efficiency_dir)

    pdf_buf = _io.BytesIO()
    html_parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>pydriftn event search</title>",
                  "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
                  "td,th{border:1px solid #ccc;padding:2px 6px}pre{font-size:12px}"
                  ".veto{color:#a00}</style></head><body>",
                  "<h1>pydriftn event search</h1>", "<pre>" + html.escape("\n".join(summary)) + "</pre>"]
    written = []
    with PdfPages(pdf_buf) as pdf:
        pdf.savefig(_text_figure("pydriftn event search", summary))
        table_lines = _table_lines(pages, TABLE_COLUMNS)
        for i in range(0, len(table_lines), 55):
            pdf.savefig(_text_figure("candidates above threshold" + (" (cont.)" if i else ""),
                                     table_lines[i:i + 55]))
        html_parts.append("<h2>Candidates above threshold</h2>")
        cols = [c for c in TABLE_COLUMNS if c in pages.columns]
        html_parts.append(pages[cols].to_html(index=False, float_format="{:.5g}".format, na_rep="")
                          if len(pages) else "<p>(none)</p>")
        for _, cand in pages.iterrows():
            cutouts = []
            if run_dir is not None:
                try:
                    cutouts = candidate_cutouts(run_dir, lc, cand)
                except Exception as exc:  # noqa: BLE001 - the page keeps its light curve
                    log.warning("report: cutouts of star %s failed: %s", cand["star_id"], exc)
            fig = _candidate_figure(lc, cand, cutouts)
            pdf.savefig(fig)
            png_name = f"candidate_{cand.get('night', '')}_{cand.get('ccd', '')}_{cand['star_id']}.png"
            written.append(write_bytes_atomic(_png(fig), out / png_name))
            veto = _vetoes(cand)
            html_parts.append(f"<h3>star {cand['star_id']} {html.escape(str(cand.get('night', '')))} "
                              f"{html.escape(str(cand.get('ccd', '')))}: {html.escape(str(cand.get('model', '')))}"
                              + (f" <span class='veto'>vetoed: {html.escape(veto)}</span>" if veto else "")
                              + f"</h3><img src='{html.escape(png_name)}' width='900'>")
        if eff_tables or eff_images:
            html_parts.append("<h2>Search efficiency (injection-recovery)</h2>")
        for tname, table in eff_tables:
            lines = _table_lines(table, list(table.columns))
            for i in range(0, len(lines), 55):
                pdf.savefig(_text_figure(f"efficiency: {tname}" + (" (cont.)" if i else ""), lines[i:i + 55]))
            html_parts.append(f"<h3>{html.escape(tname)}</h3>"
                              + table.to_html(index=False, float_format="{:.4g}".format, na_rep=""))
        for p in eff_images:
            from matplotlib.figure import Figure
            from matplotlib.image import imread

            fig = Figure(figsize=(10, 7.5))
            ax = fig.add_axes([0, 0, 1, 1])
            ax.imshow(imread(p))
            ax.set_axis_off()
            pdf.savefig(fig)
            data = base64.b64encode(p.read_bytes()).decode()
            html_parts.append(f"<h3>{html.escape(p.name)}</h3><img src='data:image/png;base64,{data}'>")
    html_parts.append("</body></html>")
    written.insert(0, write_bytes_atomic(pdf_buf.getvalue(), out / f"{name}.pdf"))
    written.insert(1, write_bytes_atomic("\n".join(html_parts).encode(), out / f"{name}.html"))
    return written
