"""Per-sample extraction of drift-scan trails (optimal, box, L3 profile fit).

See :mod:`pydriftn.extract.core` for the method. Public entry points:

* :func:`extract_trails` — all stars of one CCD exposure → :class:`ExtractionResult`;
* :func:`find_neighbours` — overlapping trails (for de-blending);
* :mod:`pydriftn.extract.flagbits` — sample flag bits;
* :mod:`pydriftn.extract.synthetic` — seeded synthetic trails with truth (tests).
"""

from . import flagbits
from .core import METHODS, ExtractionResult, extract_trails, find_neighbours
from .profile import CrossProfile, measure_profile
from .stamps import Strips, cut_strips

__all__ = [
    "METHODS",
    "ExtractionResult",
    "extract_trails",
    "find_neighbours",
    "CrossProfile",
    "measure_profile",
    "Strips",
    "cut_strips",
    "flagbits",
]
