"""Gaia DR3 reference stars: read from a local file or a TAP service, propagate to an epoch.

Local files may be CSV, FITS (binary table) or Parquet, with either
archive-style columns (``source_id, ra, dec, phot_g_mean_mag, pmra, pmdec,
ref_epoch``) or VizieR-style columns (``Source, RA_ICRS, DE_ICRS`` or
``RAJ2000, DEJ2000``, ``Gmag, pmRA, pmDE, Epoch``). They are mapped to the
internal names ``source_id, ra, dec, gmag, pmra, pmdec, ref_epoch``.

The TAP query is a plain synchronous ADQL request (``POST {url}/sync`` with
``REQUEST=doQuery, LANG=ADQL, FORMAT=csv``) made with the standard library,
so no extra dependency (pyvo/astroquery) is needed; answers are cached on
disk keyed by the query text, and network failures raise
:class:`~pydriftn.errors.CatalogueError` naming the service and the way out
(``--gaia FILE``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CatalogueError, FileMissingError, InputFileError

__all__ = [
    "GAIA_TAP_URL",
    "read_gaia_file",
    "normalise_gaia_columns",
    "query_gaia_tap",
    "propagate_to_epoch",
    "mjd_to_julian_year",
]

log = logging.getLogger(__name__)

GAIA_TAP_URL = "https://gea.esac.esa.int/tap-server/tap"

# internal name -> accepted names (case-insensitive), in order of preference;
# ra/dec candidates carry the epoch they imply when the table has none
_RA = [("ra", None), ("ra_icrs", None), ("raj2000", 2000.0), ("ra_j2000", 2000.0)]
_DEC = [("dec", None), ("de_icrs", None), ("dej2000", 2000.0), ("dec_j2000", 2000.0)]
_OPTIONAL = {
    "source_id": ["source_id", "source", "gaia_source_id", "dr3_source_id", "gaiadr3"],
    "gmag": ["phot_g_mean_mag", "gmag", "g_mag", "phot_g"],
    "pmra": ["pmra", "pm_ra", "pmra_cosdec"],
    "pmdec": ["pmdec", "pmde", "pm_dec"],
    "ref_epoch": ["ref_epoch", "epoch", "epoch_yr"],
}
_DEFAULT_EPOCH = 2016.0  # Gaia DR3


def mjd_to_julian_year(mjd):
    """Julian epoch (years) of an MJD: ``2000.0 + (mjd - 51544.5) / 365.25``."""
    return 2000.0 + (np.asarray(mjd, float) - 51544.5) / 365.25


def normalise_gaia_columns(df, *, source="Gaia table"):
    """Map a Gaia table's columns to ``source_id, ra, dec, gmag, pmra, pmdec, ref_epoch``.

    Parameters
    ----------
    df : pandas.DataFrame
    source : str
        Name used in error messages (the file name).

    Returns
    -------
    pandas.DataFrame
        New table with exactly the internal columns (missing optional ones are
        NaN; ``ref_epoch`` defaults to 2016.0, or 2000.0 for ``RAJ2000/DEJ2000``).

    Raises
    ------
    CatalogueError
        No recognisable RA/Dec columns; the message lists the columns found
        and the names expected.
    """
    lower = {str(c).lower(): c for c in df.columns}

    def pick(cands):
        for name, epoch in cands:
            if name in lower:
                return lower[name], epoch
        return None, None

    ra_col, ra_epoch = pick(_RA)
    dec_col, _ = pick(_DEC)
    if ra_col is None or dec_col is None:
        expected = "ra/dec (archive), RA_ICRS/DE_ICRS or RAJ2000/DEJ2000 (VizieR)"
        raise CatalogueError(
            f"{source}: no Gaia position columns; found columns {list(map(str, df.columns))}, "
            f"expected {expected} (+ optional source_id/Source, phot_g_mean_mag/Gmag, pmra/pmRA, pmdec/pmDE, ref_epoch/Epoch)"
        )
    out = pd.DataFrame(
        {"ra": pd.to_numeric(df[ra_col], errors="coerce").astype(float),
         "dec": pd.to_numeric(df[dec_col], errors="coerce").astype(float)}
    )
    for key, cands in _OPTIONAL.items():
        col = next((lower[c] for c in cands if c in lower), None)
        if col is None:
            out[key] = np.nan
        elif key == "source_id":
            out[key] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
        else:
            out[key] = pd.to_numeric(df[col], errors="coerce").astype(float)
    default_epoch = ra_epoch if ra_epoch is not None else _DEFAULT_EPOCH
    out["ref_epoch"] = out["ref_epoch"].fillna(default_epoch)
    if out["source_id"].isna().all():
        out["source_id"] = pd.array(np.arange(len(out), dtype=np.int64), dtype="Int64")
        log.warning("%s: no source_id column; using row numbers", source)
    out = out[np.isfinite(out["ra"]) & np.isfinite(out["dec"])].reset_index(drop=True)
    return out


def read_gaia_file(path):
    """Read a local Gaia file (CSV, FITS or Parquet) into the internal columns.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    pandas.DataFrame
        See :func:`normalise_gaia_columns`.

    Raises
    ------
    FileMissingError
        The file does not exist.
    InputFileError
        Unreadable or of an unknown format.
    CatalogueError
        Unknown column names.
    """
    path = Path(path)
    if not path.exists():
        raise FileMissingError("Gaia reference file does not exist", path=path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith((".fits", ".fit", ".fits.gz", ".fz")):
            from astropy.table import Table

            tab = Table.read(path, format="fits")
            names = [n for n in tab.colnames if len(tab[n].shape) <= 1]
            df = tab[names].to_pandas()
        elif name.endswith((".csv", ".csv.gz", ".txt", ".ecsv")):
            df = pd.read_csv(path, comment="#")
        else:
            raise InputFileError(
                "unknown Gaia file format: expected a name ending in .csv, .fits or .parquet", path=path
            )
    except (InputFileError, CatalogueError):
        raise
    except Exception as exc:
        raise InputFileError(f"cannot read Gaia table ({type(exc).__name__}: {exc})", path=path) from exc
    out = normalise_gaia_columns(df, source=str(path))
    log.info("read %d Gaia sources from %s", len(out), path)
    return out


def _cone_adql(ra, dec, radius_deg, gmag_max, table):
    return (
        f"SELECT source_id, ra, dec, phot_g_mean_mag, pmra, pmdec, ref_epoch FROM {table} "
        f"WHERE 1=CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.7f}, {dec:.7f}, {radius_deg:.6f})) "
        f"AND phot_g_mean_mag < {gmag_max:.2f}"
    )


def query_gaia_tap(
    ra, dec, radius_deg, *, gmag_max=21.0, url=None, table="gaiadr3.gaia_source", cache_dir=None, timeout=60.0
):
    """Gaia sources in a cone, from a TAP service (synchronous ADQL), cached on disk.

    Parameters
    ----------
    ra, dec : float
        Cone centre (deg, ICRS).
    radius_deg : float
        Cone radius (deg).
    gmag_max : float
        Faint limit in G.
    url : str, optional
        TAP service base URL (default :data:`GAIA_TAP_URL`, or the environment
        variable ``PYDRIFTN_GAIA_TAP_URL``).
    table : str
        Gaia table to query.
    cache_dir : str or Path, optional
        Folder of the cache (default ``$PYDRIFTN_CACHE`` or
        ``~/.cache/pydriftn/gaia``); one CSV per distinct query.
    timeout : float
        Network timeout (s).

    Returns
    -------
    pandas.DataFrame
        Internal columns (see :func:`normalise_gaia_columns`); ``attrs`` has
        ``gaia_query`` and ``gaia_cache_file``, ``gaia_from_cache``.

    Raises
    ------
    CatalogueError
        The service cannot be reached, times out or answers with an error.
    """
    url = (url or os.environ.get("PYDRIFTN_GAIA_TAP_URL") or GAIA_TAP_URL).rstrip("/")
    query = _cone_adql(float(ra), float(dec), float(radius_deg), float(gmag_max), table)
    if cache_dir is None:
        cache_dir = Path(os.environ.get("PYDRIFTN_CACHE", Path.home() / ".cache" / "pydriftn")) / "gaia"
    cache_dir = Path(cache_dir)
    key = hashlib.sha256(f"{url}\n{query}".encode()).hexdigest()[:24]
    cache_file = cache_dir / f"gaia_{key}.csv"
    if cache_file.exists():
        log.info("Gaia TAP answer read from cache %s", cache_file)
        df = pd.read_csv(cache_file)
        from_cache = True
    else:
        body = urllib.parse.urlencode(
            {"REQUEST": "doQuery", "LANG": "ADQL", "FORMAT": "csv", "QUERY": query}
        ).encode()
        req = urllib.request.Request(url + "/sync", data=body, method="POST")
        log.info("querying Gaia TAP %s (r=%.3f deg around %.5f, %.5f)", url, radius_deg, ra, dec)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            raise CatalogueError(
                f"Gaia TAP service {url} answered HTTP {exc.code} ({exc.reason}) to the query: {query}"
            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CatalogueError(
                f"cannot reach the Gaia TAP service {url} ({reason}); are you offline? "
                f"Give a local Gaia file instead (--gaia FILE, CSV/FITS/Parquet)"
            ) from exc
        if text.lstrip().startswith("<"):
            raise CatalogueError(f"Gaia TAP service {url} did not return CSV (an error document?): {text[:200]!r}")
        try:
            df = pd.read_csv(io.StringIO(text))
        except Exception as exc:
            raise CatalogueError(f"Gaia TAP service {url} returned unreadable CSV: {exc}") from exc
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        df.to_csv(tmp, index=False)
        os.replace(tmp, cache_file)
        from_cache = False
    out = normalise_gaia_columns(df, source=f"Gaia TAP answer ({url})")
    out.attrs.update({"gaia_query": query, "gaia_cache_file": str(cache_file), "gaia_from_cache": from_cache})
    return out


def propagate_to_epoch(gaia, epoch):
    """Move Gaia positions to ``epoch`` (Julian year) with their proper motions.

    Linear propagation in the tangent plane: ``dra = pmra * dt / cos(dec)``,
    ``ddec = pmdec * dt`` (pmra includes cos dec, mas/yr). Stars without
    proper motion keep their positions.

    Parameters
    ----------
    gaia : pandas.DataFrame
        Internal Gaia columns.
    epoch : float
        Target epoch (Julian year), e.g. ``mjd_to_julian_year(mjd)``.

    Returns
    -------
    pandas.DataFrame
        Copy with ``ra, dec`` moved and ``epoch`` set.
    """
    out = gaia.copy()
    dt = float(epoch) - out["ref_epoch"].to_numpy(float)
    pmra = np.nan_to_num(out["pmra"].to_numpy(float))
    pmdec = np.nan_to_num(out["pmdec"].to_numpy(float))
    cosd = np.cos(np.radians(out["dec"].to_numpy(float)))
    out["ra"] = out["ra"].to_numpy(float) + pmra * dt / 3.6e6 / np.maximum(cosd, 1e-6)
    out["dec"] = out["dec"].to_numpy(float) + pmdec * dt / 3.6e6
    out["epoch"] = float(epoch)
    return out
