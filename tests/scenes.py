"""Building blocks for synthetic test scenes (imported by the test modules)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.special import erf


def add_gaussian_star(img: npt.NDArray[np.float64], x: float, y: float, flux: float, sigma: float) -> None:
    """Add, in place, a pixel-integrated Gaussian star (exact for undersampled PSFs) at array (x, y)."""
    h = int(6 * sigma) + 3
    ix, iy = int(round(x)), int(round(y))
    gx, gy = np.arange(ix - h, ix + h + 1), np.arange(iy - h, iy + h + 1)
    s2 = np.sqrt(2) * sigma
    ex = 0.5 * (erf((gx + 0.5 - x) / s2) - erf((gx - 0.5 - x) / s2))
    ey = 0.5 * (erf((gy + 0.5 - y) / s2) - erf((gy - 0.5 - y) / s2))
    img[iy - h: iy + h + 1, ix - h: ix + h + 1] += flux * np.outer(ey, ex)
