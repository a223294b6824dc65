"""Dataset references: the small, JSON-serialisable handles Prefect tasks pass around.

Tasks never return arrays: they return a :class:`DatasetRef` and the next task
reads the dataset from the store. Prefect records the import path of this
class in its results, so it lives in this stable module and must not move.
"""

from __future__ import annotations

from typing import Any

import pydantic


class DatasetRef(pydantic.BaseModel, frozen=True):
    """Where one dataset is stored, and which bytes it held when the reference was made.

    Attributes
    ----------
    dataset_type
        Name of a declared dataset type (see :mod:`singleframe.io.datasets`).
    instrument, visit, detector, snap
        Data identifier; dimensions the type lacks are ``None``.
    run
        Collection (output run) the dataset belongs to.
    uri
        Full fsspec URI of the dataset file.
    checksum
        Hex SHA-256 of the stored bytes (``None`` when the reference came from a
        cheap listing; :meth:`ArtifactStore.ref` fills it in).
    """

    dataset_type: str
    instrument: str
    visit: int | None = None
    detector: int | None = None
    snap: int | None = None
    run: str
    uri: str
    checksum: str | None = None

    @property
    def data_id(self) -> dict[str, Any]:
        """The identifier as a dict holding only the dimensions that are set."""
        d: dict[str, Any] = {"instrument": self.instrument}
        for key in ("visit", "detector", "snap"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d

    def provenance_record(self) -> dict[str, Any]:
        """``{dataset_type, data_id, run, checksum}``: an entry of a provenance ``inputs`` list."""
        return {"dataset_type": self.dataset_type, "data_id": self.data_id, "run": self.run,
                "checksum": self.checksum}

    def __str__(self) -> str:
        parts = [self.dataset_type, self.instrument]
        if self.visit is not None:
            parts.append(f"visit-{self.visit}")
        if self.detector is not None:
            parts.append(f"det-{self.detector:03d}")
        if self.snap is not None:
            parts.append(f"snap-{self.snap}")
        return f"{'/'.join(parts)} (run {self.run})"
