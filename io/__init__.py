"""singleframe.io: every byte on disk or on the wire.

``datasets``
    the registry of dataset types (declared once);
``refs``
    :class:`DatasetRef`, the small handle Prefect tasks pass between them;
``store``
    :class:`ArtifactStore`, atomic reads and writes on any fsspec filesystem,
    with a provenance sidecar per dataset;
``formats``
    FITS / Parquet / JSON serialisation (no pickle);
``refcat``
    HEALPix-partitioned reference catalogues;
``ingest``
    FITS files to ``post_isr_image`` datasets.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers and IDEs
    from .datasets import DATASET_TYPES, DatasetType, dataset_types, get_dataset_type
    from .formats import (
        FORMATS,
        StorageFormat,
        background_from_fits_bytes,
        background_to_fits_bytes,
        dict_from_json_bytes,
        dict_to_json_bytes,
        exposure_from_fits_bytes,
        exposure_to_fits_bytes,
        image_from_fits_bytes,
        image_to_fits_bytes,
        table_from_parquet_bytes,
        table_to_parquet_bytes,
    )
    from .ingest import IngestReport, RawFile, ingest_files, read_raw_file
    from .refcat import (
        REFCAT_COLUMNS,
        RefcatInfo,
        epoch_year_from_mjd,
        load_refcat,
        propagate_positions,
        read_refcat_info,
        refcat_from_table,
        write_refcat,
    )
    from .refs import DatasetRef
    from .store import PROVENANCE_SUFFIX, ArtifactStore

# Submodules load on first use: a process that only reads and writes frames and catalogues (a
# calibration worker) does not import pydantic (0.06-0.08 s of its start-up) or the ingest code.
_EXPORTS = {
    "DATASET_TYPES": "datasets",
    "DatasetType": "datasets",
    "dataset_types": "datasets",
    "get_dataset_type": "datasets",
    "FORMATS": "formats",
    "StorageFormat": "formats",
    "background_from_fits_bytes": "formats",
    "background_to_fits_bytes": "formats",
    "dict_from_json_bytes": "formats",
    "dict_to_json_bytes": "formats",
    "exposure_from_fits_bytes": "formats",
    "exposure_to_fits_bytes": "formats",
    "image_from_fits_bytes": "formats",
    "image_to_fits_bytes": "formats",
    "table_from_parquet_bytes": "formats",
    "table_to_parquet_bytes": "formats",
    "IngestReport": "ingest",
    "RawFile": "ingest",
    "ingest_files": "ingest",
    "read_raw_file": "ingest",
    "REFCAT_COLUMNS": "refcat",
    "RefcatInfo": "refcat",
    "epoch_year_from_mjd": "refcat",
    "load_refcat": "refcat",
    "propagate_positions": "refcat",
    "read_refcat_info": "refcat",
    "refcat_from_table": "refcat",
    "write_refcat": "refcat",
    "DatasetRef": "refs",
    "ArtifactStore": "store",
    "PROVENANCE_SUFFIX": "store",
}


__all__ = [
    "DATASET_TYPES",
    "FORMATS",
    "PROVENANCE_SUFFIX",
    "REFCAT_COLUMNS",
    "ArtifactStore",
    "DatasetRef",
    "DatasetType",
    "IngestReport",
    "RawFile",
    "RefcatInfo",
    "StorageFormat",
    "background_from_fits_bytes",
    "background_to_fits_bytes",
    "dataset_types",
    "dict_from_json_bytes",
    "dict_to_json_bytes",
    "epoch_year_from_mjd",
    "exposure_from_fits_bytes",
    "exposure_to_fits_bytes",
    "get_dataset_type",
    "image_from_fits_bytes",
    "image_to_fits_bytes",
    "ingest_files",
    "load_refcat",
    "propagate_positions",
    "read_raw_file",
    "read_refcat_info",
    "refcat_from_table",
    "table_from_parquet_bytes",
    "table_to_parquet_bytes",
    "write_refcat",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
