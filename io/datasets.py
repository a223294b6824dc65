"""Every dataset the pipeline reads or writes, declared once.

Flows and tests refer to datasets only by these names. Each entry says how
the dataset is stored (``storage``, one of :data:`STORAGE_KINDS`), which data
identifiers key it (``dimensions``) and what it holds. The output names are
Rubin's, so that products can be compared one to one.

Adding a dataset type is one line in :data:`_DECLARED`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from ..errors import ConfigError

#: How a dataset is serialised (see :mod:`singleframe.io.formats`).
STORAGE_KINDS = ("exposure", "background", "catalog", "json", "image")

#: All dimensions, outermost first; a dataset type uses a subset in this order.
ALL_DIMENSIONS = ("instrument", "visit", "detector", "snap")

#: Role of a dataset in the pipeline.
GROUPS = ("input", "output", "intermediate", "truth")

Storage = Literal["exposure", "background", "catalog", "json", "image"]

_INSTRUMENT = ("instrument",)
_DETECTOR = ("instrument", "visit", "detector")
_SNAP = ("instrument", "visit", "detector", "snap")


@dataclass(frozen=True)
class DatasetType:
    """A named kind of dataset.

    Attributes
    ----------
    name
        Canonical name, used in storage keys, Prefect task parameters and docs.
    storage
        Serialisation: ``exposure`` (multi-extension FITS), ``background``
        (FITS), ``catalog`` (Parquet with units), ``json`` or ``image`` (FITS).
    dimensions
        Data-identifier keys, a subset of :data:`ALL_DIMENSIONS` in that order.
    doc
        One-line description.
    internal
        True for intermediates that only exist to checkpoint the flow.
    group
        ``input``, ``output``, ``intermediate`` or ``truth`` (simulator truth).
    """

    name: str
    storage: Storage
    dimensions: tuple[str, ...]
    doc: str
    internal: bool = False
    group: str = "output"

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_KINDS:
            raise ConfigError(f"dataset type {self.name!r}: storage {self.storage!r} is not one of {STORAGE_KINDS}")
        if self.group not in GROUPS:
            raise ConfigError(f"dataset type {self.name!r}: group {self.group!r} is not one of {GROUPS}")
        ordered = tuple(d for d in ALL_DIMENSIONS if d in self.dimensions)
        if ordered != tuple(self.dimensions) or "instrument" not in self.dimensions:
            raise ConfigError(
                f"dataset type {self.name!r}: dimensions {self.dimensions} must include 'instrument' and "
                f"follow the order {ALL_DIMENSIONS}"
            )
        if "snap" in self.dimensions and "detector" not in self.dimensions:
            raise ConfigError(f"dataset type {self.name!r}: 'snap' needs 'visit' and 'detector'")
        if "detector" in self.dimensions and "visit" not in self.dimensions:
            raise ConfigError(f"dataset type {self.name!r}: 'detector' needs 'visit'")


def _in(name: str, storage: Storage, dims: tuple[str, ...], doc: str) -> DatasetType:
    return DatasetType(name, storage, dims, doc, internal=False, group="input")


def _out(name: str, storage: Storage, doc: str) -> DatasetType:
    return DatasetType(name, storage, _DETECTOR, doc, internal=False, group="output")


def _mid(name: str, storage: Storage, doc: str, dims: tuple[str, ...] = _DETECTOR) -> DatasetType:
    return DatasetType(name, storage, dims, doc, internal=True, group="intermediate")


def _truth(name: str, storage: Storage, doc: str, dims: tuple[str, ...] = _DETECTOR) -> DatasetType:
    return DatasetType(name, storage, dims, doc, internal=False, group="truth")


_DECLARED: tuple[DatasetType, ...] = (
    # -- inputs --------------------------------------------------------------------------
    _in("post_isr_image", "exposure", _SNAP, "ISR-corrected snap exposure (counts), one per snap"),
    _in("camera", "json", _INSTRUMENT, "camera geometry (singleframe.camera.Camera.to_dict)"),
    # -- outputs (Rubin names) -------------------------------------------------------------
    _out("preliminary_visit_image", "exposure", "calibrated, background-subtracted visit image with PSF, WCS, photoCalib"),
    _out("preliminary_visit_image_background", "background", "background model subtracted from the visit image"),
    _out("single_visit_star_unstandardized", "catalog", "calibrated star catalogue (fluxes in nJy, sky coordinates)"),
    _out("single_visit_psf_star", "catalog", "catalogue of PSF-star candidates with PSF/apcorr flags"),
    _out("single_visit_psf_star_footprints", "catalog", "footprints of PSF-star detections as run-length spans id,y,x_start,x_end"),
    _out("initial_astrometry_match_detector", "catalog", "source/reference matches used by the astrometric fit"),
    _out("initial_photometry_match_detector", "catalog", "source/reference matches used by the photometric fit"),
    _out("initial_photoCalib_detector", "json", "photometric calibration (nJy per count and its error)"),
    # -- intermediates -------------------------------------------------------------------
    _mid("characterized_image", "exposure", "snap-combined, background-subtracted exposure with PSF"),
    _mid("characterized_background", "background", "background subtracted while characterising the image"),
    _mid("characterized_psf_stars", "catalog", "PSF-pass catalogue with calib_psf_* flags, before aperture corrections"),
    _mid("aperture_correction", "json", "aperture-correction fields and calibration-flux normalisation"),
    _mid("apcorr_psf_stars", "catalog", "PSF-star catalogue with the normalised calibration flux, before astrometry"),
    _mid("astrometric_solution", "json", "fitted WCS header and its quality metrics"),
    _mid("star_catalog", "catalog", "star catalogue before photometric calibration"),
    _mid("detector_summary", "json", "summary statistics of one detector"),
    _mid("detector_failure", "json", "why a detector could not be calibrated (failure.* metadata)"),
    _mid("calibrate_config", "json", "resolved calibration configuration", _INSTRUMENT),
    # -- simulator truth -------------------------------------------------------------------
    _truth("truth_sources", "catalog", "simulated sources with true positions and fluxes"),
    _truth("truth_psf", "catalog", "true PSF moments on a grid over the detector"),
    _truth("truth_wcs", "json", "true WCS header of the detector"),
    _truth("truth_calib", "json", "true photometric calibration"),
    _truth("truth_cr_mask", "image", "true cosmic-ray pixels of one snap", _SNAP),
)

#: Registry ``name -> DatasetType`` (read-only).
DATASET_TYPES: MappingProxyType[str, DatasetType] = MappingProxyType({t.name: t for t in _DECLARED})
if len(DATASET_TYPES) != len(_DECLARED):  # pragma: no cover - guards the declaration list itself
    raise ConfigError("a dataset type is declared twice in singleframe.io.datasets")


def get_dataset_type(name: str) -> DatasetType:
    """Return the declared dataset type called ``name``.

    Raises
    ------
    ConfigError
        If no dataset type has that name; the message lists the valid names.
    """
    try:
        return DATASET_TYPES[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset type {name!r}; declared types are: {', '.join(sorted(DATASET_TYPES))}"
        ) from None


def dataset_types(*, group: str | None = None) -> tuple[DatasetType, ...]:
    """All declared dataset types, optionally only those of one ``group``."""
    if group is not None and group not in GROUPS:
        raise ConfigError(f"unknown dataset group {group!r}; valid groups: {GROUPS}")
    return tuple(t for t in _DECLARED if group is None or t.group == group)
