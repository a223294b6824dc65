"""Smooth 2-D fields over a detector (aperture corrections, spatial zero-point terms)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.polynomial import chebyshev as cheb


@dataclass(frozen=True)
class ChebyshevField:
    """A 2-D Chebyshev polynomial over a bounding box, triangular in order.

    ``coefficients[i, j]`` multiplies ``T_i(x') T_j(y')`` where ``x'``, ``y'``
    map the bbox ``(x_min, y_min, x_max, y_max)`` (parent pixels) to [-1, 1].
    Terms with ``i + j > order`` are zero.
    """

    coefficients: npt.NDArray[np.float64]
    bbox: tuple[float, float, float, float]
    error: float = 0.0  #: one-sigma scatter about the field (same unit as the field)
    flagged_fallback: bool = False  #: True when the field is a constant fallback

    @property
    def order(self) -> int:
        return int(self.coefficients.shape[0] - 1)

    def _scaled(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        x_min, y_min, x_max, y_max = self.bbox
        xs = (2.0 * np.asarray(x, float) - (x_min + x_max)) / max(x_max - x_min, 1e-12)
        ys = (2.0 * np.asarray(y, float) - (y_min + y_max)) / max(y_max - y_min, 1e-12)
        return xs, ys

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float64]:
        xs, ys = self._scaled(x, y)
        return np.asarray(cheb.chebval2d(xs, ys, self.coefficients), dtype=float)

    @classmethod
    def constant(cls, value: float, bbox: tuple[float, float, float, float], *, error: float = 0.0,
                 flagged_fallback: bool = False) -> ChebyshevField:
        return cls(np.array([[float(value)]]), bbox, error, flagged_fallback)

    @classmethod
    def fit(cls, x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike, *, order: int,
            bbox: tuple[float, float, float, float], weights: npt.ArrayLike | None = None) -> ChebyshevField:
        """Weighted least-squares fit of a triangular Chebyshev field of ``order``."""
        proto = cls(np.zeros((order + 1, order + 1)), bbox)
        xs, ys = proto._scaled(x, y)
        vander = cheb.chebvander2d(xs, ys, [order, order])
        keep = [i * (order + 1) + j for i in range(order + 1) for j in range(order + 1) if i + j <= order]
        a = vander[:, keep]
        zz = np.asarray(z, float)
        w = np.ones_like(zz) if weights is None else np.sqrt(np.asarray(weights, float))
        sol, *_ = np.linalg.lstsq(a * w[:, None], zz * w, rcond=None)
        coeffs = np.zeros((order + 1) ** 2)
        coeffs[keep] = sol
        return cls(coeffs.reshape(order + 1, order + 1), bbox)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "chebyshev",
            "coefficients": self.coefficients.tolist(),
            "bbox": list(self.bbox),
            "error": self.error,
            "flagged_fallback": self.flagged_fallback,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChebyshevField:
        return cls(np.asarray(d["coefficients"], float), tuple(d["bbox"]),  # type: ignore[arg-type]
                   float(d.get("error", 0.0)), bool(d.get("flagged_fallback", False)))
