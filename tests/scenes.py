"""Building blocks for synthetic test scenes (imported by the test modules)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from astropy.table import Table
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


def noisy_refcat(rng: np.random.Generator, ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64],
                 flux_njy: npt.NDArray[np.float64], *, noise_mas: float, first_id: int) -> Table:
    """A reference catalogue of the given stars with Gaussian position noise (mas per axis, drawn
    RA first then Dec from ``rng``) and 1 % r-band flux errors."""
    n = len(ra)
    ref = Table()
    ref["id"] = np.arange(n, dtype=np.int64) + first_id
    sig = noise_mas / 3.6e6
    ref["ra"] = ra + rng.normal(0, sig, n) / np.cos(np.radians(dec))
    ref["dec"] = dec + rng.normal(0, sig, n)
    ref["r_flux"] = flux_njy
    ref["r_fluxErr"] = 0.01 * flux_njy
    return ref
