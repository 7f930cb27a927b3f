"""Reference catalogue from the pointed (tracked) g and r DECam images, anchored on Gaia.

Every drift exposure is matched against this catalogue. Main entry point:
:func:`build_catalogue` (also ``pydriftn catalogue G_IMAGE R_IMAGE``). The
building blocks are pure functions over arrays and tables:

* :func:`measure_sources` — background/noise map, detection, windowed
  centroids, aperture photometry with a curve-of-growth aperture correction,
  FWHM/ellipticity, flags (:class:`SourceFlag`);
* :func:`anchor_to_gaia`, :func:`mutual_match` — Gaia astrometric anchor and
  positional matching;
* :func:`read_gaia_file`, :func:`query_gaia_tap`, :func:`propagate_to_epoch`
  — Gaia reference (local file or TAP, proper motions);
* :func:`select_reference_stars` — reference stars with the 0.1.4 knobs.
"""

from .build import (CATALOGUE_COLUMNS, DEFAULT_KNOBS, EDGE_ID_OFFSET, build_catalogue, catalogue_ccd, read_catalogue,
                    write_catalogue)
from .flags import SourceFlag, flag_names
from .gaia import GAIA_TAP_URL, normalise_gaia_columns, propagate_to_epoch, query_gaia_tap, read_gaia_file
from .images import PointedCCD, read_pointed_ccd
from .matching import anchor_to_gaia, mutual_match, tangent_plane
from .photometry import MeasureOptions, measure_sources, noise_map
from .reference import save_stamp_grid, select_reference_stars

__all__ = [
    "CATALOGUE_COLUMNS",
    "EDGE_ID_OFFSET",
    "DEFAULT_KNOBS",
    "GAIA_TAP_URL",
    "MeasureOptions",
    "PointedCCD",
    "SourceFlag",
    "anchor_to_gaia",
    "build_catalogue",
    "catalogue_ccd",
    "flag_names",
    "measure_sources",
    "mutual_match",
    "noise_map",
    "normalise_gaia_columns",
    "propagate_to_epoch",
    "query_gaia_tap",
    "read_catalogue",
    "read_gaia_file",
    "read_pointed_ccd",
    "save_stamp_grid",
    "select_reference_stars",
    "tangent_plane",
    "write_catalogue",
]
