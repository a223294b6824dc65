"""One error hierarchy for the whole pipeline.

Every error says what went wrong and what to do next. The classes map to an
operator's action:

``ConfigError``
    the configuration is invalid; fix it before any pixel is touched.
``UnprocessableFrameError``
    the input cannot be calibrated (too few stars, blank frame, wrong field);
    mark the detector as failed and move on. Not a bug, never retried.
``StepFailedError``
    an algorithm could not reach an acceptable answer; carries structured
    ``metadata`` (counts, thresholds) that is written into partial outputs.
``DatasetError`` / ``TransientIOError``
    I/O, wrapped once with the dataset name. Only ``TransientIOError`` is
    retried by the flows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SingleframeError(Exception):
    """Base class of every error raised on purpose by singleframe."""


class ConfigError(SingleframeError, ValueError):
    """The configuration is invalid. Raised before any work starts."""


class IngestError(SingleframeError):
    """An input file cannot be ingested; the message names the file and the fix."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}. {fix}")


class DatasetError(SingleframeError):
    """A dataset could not be read or written (wraps the underlying I/O error once)."""

    def __init__(self, message: str, *, dataset_type: str | None = None, uri: str | None = None) -> None:
        self.dataset_type = dataset_type
        self.uri = uri
        super().__init__(message)


class DatasetNotFoundError(DatasetError, KeyError):
    """The requested dataset is not in the store."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class TransientIOError(DatasetError):
    """An I/O failure that may succeed when tried again (network, object store)."""


class StepFailedError(SingleframeError):
    """A processing step could not produce an acceptable result.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    metadata
        Structured facts (counts, thresholds, measured values) that are
        written into the partial outputs as ``failure.metadata.*``.
    """

    def __init__(self, message: str, metadata: Mapping[str, Any] | None = None) -> None:
        self.metadata: dict[str, Any] = dict(metadata or {})
        super().__init__(message)


class UnprocessableFrameError(StepFailedError):
    """The frame cannot be calibrated (not a bug): mark the detector failed and skip it."""


# --- Specific failures, named after Rubin's where the meaning is the same ---


class SnapCombineError(UnprocessableFrameError):
    """Snaps of one visit cannot be combined (shape, band or count mismatch)."""


class PsfFitError(UnprocessableFrameError):
    """No acceptable PSF model (too few stars, non-finite size, not star-like)."""


class AllCentroidsFlaggedError(PsfFitError):
    """Every PSF-star centroid is flagged."""


class ApertureCorrectionError(StepFailedError):
    """Aperture corrections could not be measured (even with the fallback)."""


class AstrometryError(UnprocessableFrameError):
    """No trustworthy astrometric solution. No WCS is marked good."""


class NoPsfStarsToStarsMatchError(StepFailedError):
    """No PSF star matched any star of the final catalogue."""


class PhotometryError(UnprocessableFrameError):
    """No trustworthy photometric zero point."""


def error_type(error: BaseException) -> str:
    """The qualified name of ``error``'s type (``failure.type``), e.g. ``singleframe.errors.PsfFitError``."""
    return f"{type(error).__module__}.{type(error).__qualname__}"


def failure_metadata(error: BaseException) -> dict[str, Any]:
    """Describe ``error`` as flat ``failure.*`` keys, as Rubin writes into partial outputs."""
    meta: dict[str, Any] = {
        "failure.message": str(error),
        "failure.type": error_type(error),
    }
    for key, value in getattr(error, "metadata", {}).items():
        meta[f"failure.metadata.{key}"] = value
    return meta
