"""PSF models: the interface every model follows, and the Gaussian model.

Every model gives, at any parent-pixel position ``(x, y)``, a normalised
kernel image (sum 1) and its second moments, and serialises itself to FITS
HDUs (no pickle) with a ``PSFTYPE`` keyword naming the class in the registry.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.io import fits

from .errors import DatasetError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

_REGISTRY: dict[str, type[PsfModel]] = {}


def register_psf(cls: type[PsfModel]) -> type[PsfModel]:
    """Class decorator: make ``cls`` loadable by :func:`psf_from_hdus` via its ``type_name``."""
    _REGISTRY[cls.type_name] = cls
    return cls


class PsfModel(abc.ABC):
    """Interface of a PSF model. Positions are parent pixel coordinates."""

    type_name: str = ""

    @abc.abstractmethod
    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        """Kernel image of odd ``size`` (default :attr:`default_size`), sum 1.

        With ``centered=True`` the PSF centre is the centre of the middle
        pixel; otherwise it is offset by the fractional part of ``(x, y)``
        (``x - round(x)``), so the stamp can be placed at ``round(x), round(y)``.
        """

    @abc.abstractmethod
    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        """Second moments ``(ixx, iyy, ixy)`` in pixel² (unweighted Gaussian-equivalent)."""

    @property
    @abc.abstractmethod
    def default_size(self) -> int:
        """Odd stamp size (pixels) holding nearly all the flux."""

    @abc.abstractmethod
    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        """FITS extensions describing the model; the first has ``PSFTYPE``."""

    @classmethod
    @abc.abstractmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> PsfModel:
        """Inverse of :meth:`to_hdus`."""

    # -- derived quantities ---------------------------------------------------------
    def sigma(self, x: float, y: float) -> float:
        """Determinant radius ``(ixx iyy - ixy²)^(1/4)`` in pixels."""
        ixx, iyy, ixy = self.moments(x, y)
        return float(max(ixx * iyy - ixy * ixy, 0.0) ** 0.25)

    def area(self, x: float, y: float) -> float:
        """Effective area ``(Σk)² / Σk²`` of the kernel in pixels² (noise-equivalent area)."""
        k = self.image(x, y, size=max(self.default_size, int(2 * math.ceil(8 * self.sigma(x, y)) + 1)))
        return float(k.sum() ** 2 / np.sum(k * k))


@register_psf
@dataclass(frozen=True)
class GaussianPsf(PsfModel):
    """An elliptical Gaussian, constant over the detector."""

    sigma_pix: float
    e1: float = 0.0
    e2: float = 0.0
    size: int = 0  # 0: choose from sigma

    type_name = "gaussian"

    def __post_init__(self) -> None:
        if not (self.sigma_pix > 0 and math.isfinite(self.sigma_pix)):
            raise ValueError(f"Gaussian PSF sigma must be positive and finite, got {self.sigma_pix}")

    @property
    def default_size(self) -> int:
        if self.size:
            return int(self.size)
        return int(2 * math.ceil(5.0 * self.sigma_pix) + 1)

    def _covariance(self) -> tuple[float, float, float]:
        # Moments with determinant radius sigma and ellipticity (e1, e2) in the
        # (xx-yy)/(xx+yy) convention.
        e = math.hypot(self.e1, self.e2)
        t = 2.0 * self.sigma_pix**2 / math.sqrt(max(1.0 - e * e, 1e-12))
        return 0.5 * t * (1 + self.e1), 0.5 * t * (1 - self.e1), 0.5 * t * self.e2

    def moments(self, x: float, y: float) -> tuple[float, float, float]:
        return self._covariance()

    def image(self, x: float, y: float, *, size: int | None = None, centered: bool = True) -> npt.NDArray[np.float64]:
        n = int(size or self.default_size)
        if n % 2 == 0:
            n += 1
        dx = 0.0 if centered else float(x - round(x))
        dy = 0.0 if centered else float(y - round(y))
        half = n // 2
        # Integrate over each pixel with 3x3 sub-samples so that narrow PSFs keep their flux.
        sub = (np.arange(3) - 1) / 3.0
        grid = np.arange(-half, half + 1, dtype=float)
        xx = (grid[None, :, None, None] + sub[None, None, None, :]) - dx
        yy = (grid[:, None, None, None] + sub[None, None, :, None]) - dy
        ixx, iyy, ixy = self._covariance()
        det = ixx * iyy - ixy * ixy
        q = (iyy * xx * xx - 2 * ixy * xx * yy + ixx * yy * yy) / det
        k = np.exp(-0.5 * q).sum(axis=(2, 3))
        return k / k.sum()

    def to_hdus(self) -> list[fits.ImageHDU | fits.BinTableHDU]:
        hdr = fits.Header()
        hdr["EXTNAME"] = "PSF"
        hdr["PSFTYPE"] = self.type_name
        hdr["SIGMA"] = (self.sigma_pix, "Gaussian sigma [pixel]")
        hdr["E1"] = self.e1
        hdr["E2"] = self.e2
        hdr["STAMPSZ"] = self.size
        data = self.image(0.0, 0.0).astype(np.float32)
        return [fits.ImageHDU(data=data, header=hdr)]

    @classmethod
    def from_hdus(cls, hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> GaussianPsf:
        h = hdus[0].header
        return cls(float(h["SIGMA"]), float(h.get("E1", 0.0)), float(h.get("E2", 0.0)), int(h.get("STAMPSZ", 0)))


def psf_from_hdus(hdus: Sequence[fits.ImageHDU | fits.BinTableHDU]) -> PsfModel:
    """Rebuild a PSF model from the HDUs written by its :meth:`PsfModel.to_hdus`."""
    if not hdus:
        raise DatasetError("no PSF extensions found")
    name = str(hdus[0].header.get("PSFTYPE", ""))
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DatasetError(f"unknown PSFTYPE {name!r}; known types: {sorted(_REGISTRY)}")
    return cls.from_hdus(hdus)


PsfFactory = Callable[[float], PsfModel]
