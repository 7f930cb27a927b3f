"""Exposure-level products assembled from the unit outputs.

Per night folder, the files users of pydriftn 0.1.4 know:
``driftastrom-exp_{N}.csv``, ``driftskysub-exp_{N}.csv``,
``driftextract-exp_{N}.csv`` (or ``target-driftextract-exp_{N}.csv`` with a
target list), plus ``classify-exp_{N}.csv``; at the top of the output folder
``{pdf_output}.pdf`` (one page of extractions per night) and
``{pdf_output}-median.pdf`` (median series per exposure and night),
``flashes.parquet`` (every source classified as a flash, for the event
search's veto and for transient follow-up), and ``lightcurves.duckdb`` with a
``lightcurves`` view over the Parquet store.

Assembly is deterministic (rows sorted by CCD and star ID), so a resumed run
writes byte-identical files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["assemble_outputs", "query_store", "open_store", "store_glob", "wide_extractions"]

#: Column aliases written into the CSV files for users of pydriftn 0.1.4.
_COMPAT = {"ccd": "chp", "star_id": "ref_star_id"}


def store_glob(output_dir) -> str:
    """Glob of every Parquet file of the light-curve store of a run."""
    out = Path(output_dir)
    if (out / "lightcurves").is_dir() and not (out / "store").is_dir():
        return str(out / "lightcurves" / "**" / "*.parquet")
    return str(out / "store" / "lightcurves" / "**" / "*.parquet")


def _with_compat_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for new, old in _COMPAT.items():
        if new in df.columns and old not in df.columns:
            df[old] = df[new]
    return df


def wide_extractions(samples: pd.DataFrame, value: str = "norm_flux") -> pd.DataFrame:
    """The original's wide layout: ID columns then ``extraction_0 .. extraction_N``."""
    if samples.empty:
        return pd.DataFrame(columns=["ccd", "star_id"])
    wide = samples.pivot_table(index=["ccd", "star_id"], columns="sample", values=value, aggfunc="first")
    wide = wide.sort_index()
    wide.columns = [f"extraction_{int(c)}" for c in wide.columns]
    wide = wide.reset_index()
    wide.insert(0, "expnum", samples["expnum"].iloc[0])
    return _with_compat_columns(wide)


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    from ..io import write_table_atomic

    write_table_atomic(df, path)
    return path


def _read_unit_tables(output_dir: Path, units, name: str) -> pd.DataFrame:
    from .run import store_path, unit_dir

    frames = []
    for u in units:
        p = store_path(output_dir, u) if name == "samples" else unit_dir(output_dir, u) / f"{name}.parquet"
        if (unit_dir(output_dir, u) / "done.json").is_file() and p.is_file():
            frames.append(pd.read_parquet(p))
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    keys = [k for k in ("ccd", "star_id", "sample") if k in df.columns]
    if keys:
        df = df.sort_values(keys, kind="mergesort").reset_index(drop=True)
    return df


def assemble_outputs(cfg, output_dir, units, targets=None) -> list[Path]:
    """Write the per-exposure CSVs, the PDFs and the DuckDB views of a run."""
    output_dir = Path(output_dir)
    written: list[Path] = []
    by_exposure: dict[tuple[str, int], list] = {}
    for u in units:
        by_exposure.setdefault((u.night, u.expnum), []).append(u)
    prefix = "target-" if targets is not None else ""
    medians = []
    for (night, expnum), us in sorted(by_exposure.items()):
        night_dir = output_dir / night
        trails = _read_unit_tables(output_dir, us, "trails")
        if not trails.empty:
            written.append(_write_csv(_with_compat_columns(trails), night_dir / f"driftastrom-exp_{expnum}.csv"))
        sky = _read_unit_tables(output_dir, us, "sky")
        if not sky.empty:
            written.append(_write_csv(_with_compat_columns(sky), night_dir / f"driftskysub-exp_{expnum}.csv"))
        samples = _read_unit_tables(output_dir, us, "samples")
        if not samples.empty:
            if targets is not None:
                samples = samples[samples["star_id"].isin(targets)]
            wide = wide_extractions(samples)
            written.append(_write_csv(wide, night_dir / f"{prefix}driftextract-exp_{expnum}.csv"))
            med = samples.groupby("sample")["norm_flux"].median()
            medians.append((night, expnum, med))
        wcs_file = _write_exposure_wcs(output_dir, us, night_dir / f"wcs-exp_{expnum}.fits")
        if wcs_file is not None:
            written.append(wcs_file)
        classes = _read_unit_tables(output_dir, us, "classify")
        if not classes.empty:
            written.append(_write_csv(_with_compat_columns(classes), night_dir / f"classify-exp_{expnum}.csv"))
    flashes = _read_unit_tables(output_dir, units, "classify")
    if not flashes.empty and "class" in flashes.columns:
        flashes = flashes[flashes["class"] == "flash"].reset_index(drop=True)
        written.append(_write_csv(flashes, output_dir / "flashes.parquet"))
    written.extend(_write_pdfs(cfg, output_dir, by_exposure, medians, targets))
    db = _write_duckdb(output_dir)
    if db is not None:
        written.append(db)
    return written


def _write_exposure_wcs(output_dir: Path, units, path: Path):
    """One FITS file per exposure with the re-fitted WCS of each CCD as a header extension."""
    from astropy.io import fits

    from ..io import write_fits_atomic
    from .run import unit_dir

    hdus = [fits.PrimaryHDU()]
    for u in sorted(units, key=lambda u: u.ccd):
        p = unit_dir(output_dir, u) / "wcs.fits"
        if (unit_dir(output_dir, u) / "done.json").is_file() and p.is_file():
            hdr = fits.getheader(p, 0)
            ext = fits.ImageHDU(header=hdr, name=u.ccd)
            hdus.append(ext)
    if len(hdus) == 1:
        return None
    hdus[0].header["EXPNUM"] = units[0].expnum
    hdus[0].header["COMMENT"] = "WCS at shutter open of each CCD, re-fitted by pydriftn"
    write_fits_atomic(fits.HDUList(hdus), path)
    return path


def _write_pdfs(cfg, output_dir: Path, by_exposure, medians, targets) -> list[Path]:
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    from ..io import write_bytes_atomic

    nights = sorted({n for n, _ in by_exposure})
    if not medians:
        return []
    written = []
    pdf_path = output_dir / f"{cfg.pdf_output}.pdf"
    import io as _io

    buf = _io.BytesIO()
    with PdfPages(buf, metadata={"CreationDate": None, "ModDate": None}) as pdf:
        for night in nights:
            fig = Figure(figsize=(11, 6))
            ax = fig.add_subplot()
            for (n, expnum), us in sorted(by_exposure.items()):
                if n != night:
                    continue
                samples = _read_unit_tables(output_dir, us, "samples")
                if samples.empty:
                    continue
                if targets is not None:
                    samples = samples[samples["star_id"].isin(targets)]
                ids = np.unique(samples["star_id"])[:50]
                for sid in ids:
                    s = samples[samples["star_id"] == sid]
                    ax.plot(s["mjd"], s["norm_flux"], lw=0.5, alpha=0.6)
            ax.set_xlabel("MJD (UTC)")
            ax.set_ylabel("normalised flux")
            ax.set_title(f"{night}: extractions (up to 50 stars per exposure)")
            pdf.savefig(fig)
    write_bytes_atomic(buf.getvalue(), pdf_path)
    written.append(pdf_path)
    if len(medians) > 1:
        buf = _io.BytesIO()
        with PdfPages(buf, metadata={"CreationDate": None, "ModDate": None}) as pdf:
            for night in nights:
                fig = Figure(figsize=(11, 6))
                ax = fig.add_subplot()
                for n, expnum, med in medians:
                    if n == night:
                        ax.plot(med.index, med.values, label=f"exp {expnum}")
                ax.set_xlabel("sample")
                ax.set_ylabel("median normalised flux")
                ax.set_title(f"{night}: median series per exposure")
                ax.legend(fontsize="small")
                pdf.savefig(fig)
        med_path = output_dir / f"{cfg.pdf_output}-median.pdf"
        write_bytes_atomic(buf.getvalue(), med_path)
        written.append(med_path)
    return written


def _view_sql(pattern: str) -> str:
    quoted = pattern.replace("'", "''")
    return ("CREATE VIEW lightcurves AS SELECT * FROM "
            f"read_parquet('{quoted}', hive_partitioning = true, union_by_name = true)")


def open_store(output_dir):
    """A DuckDB connection with a ``lightcurves`` view over a run's Parquet store."""
    import duckdb

    con = duckdb.connect()
    pattern = store_glob(output_dir)
    if not list(Path(output_dir).glob("**/lightcurves/**/*.parquet")):
        from ..errors import PydriftnError

        raise PydriftnError(f"{output_dir}: no light-curve store found (expected {pattern})")
    con.execute(_view_sql(pattern))
    return con


def query_store(output_dir, sql: str) -> pd.DataFrame:
    """Run SQL on a run's light-curve store (table ``lightcurves``)."""
    import duckdb

    from ..errors import PydriftnError

    con = open_store(output_dir)
    try:
        return con.execute(sql).fetchdf()
    except duckdb.Error as exc:
        raise PydriftnError(f"query failed: {exc}") from None
    finally:
        con.close()


def _write_duckdb(output_dir: Path) -> Path | None:
    """A DuckDB file whose ``lightcurves`` view reads the Parquet store in place."""
    import duckdb

    if not list((output_dir / "store").glob("lightcurves/**/*.parquet")):
        return None
    path = output_dir / "lightcurves.duckdb"
    tmp = output_dir / ".lightcurves.duckdb.tmp"
    if tmp.exists():
        tmp.unlink()
    con = duckdb.connect(str(tmp))
    try:
        pattern = str((output_dir / "store" / "lightcurves").resolve() / "**" / "*.parquet")
        con.execute(_view_sql(pattern))
    finally:
        con.close()
    tmp.replace(path)
    return path
