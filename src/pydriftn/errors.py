"""Exception hierarchy of pydriftn.

Every error a user can cause (bad file, bad configuration, bad table) derives
from :class:`PydriftnError`, so the CLI can turn it into one clear line and a
non-zero exit code. Messages name the file, the extension and the key, and say
what was expected.
"""

from __future__ import annotations

__all__ = [
    "PydriftnError",
    "InputFileError",
    "FileMissingError",
    "NotFITSError",
    "TruncatedFileError",
    "MissingExtensionError",
    "WCSError",
    "EmptyDataError",
    "HeaderError",
    "MaskError",
    "ConfigError",
    "CatalogueError",
    "AstrometryError",
]


class PydriftnError(Exception):
    """Base class of every error raised on purpose by pydriftn."""


class InputFileError(PydriftnError):
    """An input file cannot be used.

    Parameters
    ----------
    message : str
        What is wrong and what was expected.
    path : str or os.PathLike, optional
        The file concerned.
    extension : str or int, optional
        The FITS extension concerned (EXTNAME or index).
    """

    def __init__(self, message, *, path=None, extension=None):
        self.path = None if path is None else str(path)
        self.extension = extension
        where = ""
        if self.path is not None:
            where = self.path
            if extension is not None:
                where += f"[{extension}]"
            where += ": "
        super().__init__(where + message)


class FileMissingError(InputFileError, FileNotFoundError):
    """The file does not exist."""


class NotFITSError(InputFileError):
    """The file exists but is not a FITS file."""


class TruncatedFileError(InputFileError):
    """The FITS file ends before its headers say it should."""


class MissingExtensionError(InputFileError, KeyError):
    """The requested extension is not in the file."""

    def __str__(self):  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class WCSError(InputFileError):
    """The extension has no usable celestial WCS."""


class EmptyDataError(InputFileError):
    """The extension has no pixels, or only NaN/inf pixels."""


class HeaderError(InputFileError):
    """A header keyword is missing or unusable and has no safe default."""


class MaskError(InputFileError):
    """A data-quality mask is missing, corrupt or does not match its image."""


class ConfigError(PydriftnError):
    """The configuration is invalid (names the key, the value, what was expected)."""


class CatalogueError(PydriftnError):
    """A catalogue cannot be built or used (no sources, no overlap, bad columns)."""


class AstrometryError(PydriftnError):
    """Trails cannot be matched to the catalogue or the WCS cannot be fitted."""
