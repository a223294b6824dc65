"""Data identifiers and packed source ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Bits reserved for the per-catalogue source index in a packed source id.
SOURCE_INDEX_BITS = 24
DETECTOR_BITS = 10


@dataclass(frozen=True, order=True)
class DataId:
    """Identifies one detector of one visit of one instrument."""

    instrument: str
    visit: int
    detector: int

    def __str__(self) -> str:
        return f"{self.instrument}/visit-{self.visit}/det-{self.detector:03d}"

    @property
    def label(self) -> str:
        """Short human label used for Prefect task-run names (``visit-123/det-042``)."""
        return f"visit-{self.visit}/det-{self.detector:03d}"

    def to_dict(self) -> dict[str, object]:
        return {"instrument": self.instrument, "visit": self.visit, "detector": self.detector}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> DataId:
        return cls(str(d["instrument"]), int(d["visit"]), int(d["detector"]))  # type: ignore[call-overload]


def packed_source_ids(visit: int, detector: int, n: int, *, catalog: int = 0) -> npt.NDArray[np.int64]:
    """Unique int64 ids ``(visit, detector, catalog, index)`` for ``n`` sources (index from 1).

    ``catalog`` separates the PSF-star catalogue (0) from the star catalogue (1)
    so the two never share ids; all ids exceed 1e9 for any visit ≥ 1.
    """
    if n >= (1 << (SOURCE_INDEX_BITS - 1)):
        raise ValueError(f"too many sources ({n}) for a packed id")
    base = ((int(visit) << DETECTOR_BITS) | int(detector)) << SOURCE_INDEX_BITS
    base |= (int(catalog) & 1) << (SOURCE_INDEX_BITS - 1)
    return base + np.arange(1, n + 1, dtype=np.int64)
