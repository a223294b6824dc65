"""Photometric calibration: instrumental counts to nanojansky."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: AB magnitude of 1 nJy: m_AB = -2.5 log10(f / 3631 Jy) = 31.4 - 2.5 log10(f / nJy).
AB_MAG_OF_ONE_NJY = 2.5 * math.log10(3631e9)


@dataclass(frozen=True)
class PhotoCalib:
    """A calibration constant over the detector.

    Attributes
    ----------
    calibration_njy_per_count
        Multiply an instrumental flux (counts) by this to get nJy.
    calibration_err_njy_per_count
        One-sigma uncertainty of the calibration, including any intrinsic scatter.
    """

    calibration_njy_per_count: float
    calibration_err_njy_per_count: float = 0.0

    @property
    def zero_point_mag(self) -> float:
        """AB magnitude of a source giving 1 count in the exposure."""
        return AB_MAG_OF_ONE_NJY - 2.5 * math.log10(self.calibration_njy_per_count)

    @property
    def zero_point_err_mag(self) -> float:
        return 2.5 / math.log(10) * self.calibration_err_njy_per_count / self.calibration_njy_per_count

    @classmethod
    def from_zero_point(cls, zero_point_mag: float, zero_point_err_mag: float = 0.0) -> PhotoCalib:
        calib = 10 ** (-0.4 * (zero_point_mag - AB_MAG_OF_ONE_NJY))
        return cls(calib, calib * zero_point_err_mag * math.log(10) / 2.5)

    def instflux_to_njy(self, instflux: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return np.asarray(instflux, dtype=float) * self.calibration_njy_per_count

    def instflux_err_to_njy(self, instflux: npt.ArrayLike, instflux_err: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Flux error in nJy including the calibration error (added in quadrature)."""
        f = np.asarray(instflux, dtype=float)
        e = np.asarray(instflux_err, dtype=float)
        c, ce = self.calibration_njy_per_count, self.calibration_err_njy_per_count
        return np.hypot(e * c, f * ce)

    def to_dict(self) -> dict[str, float]:
        return {
            "calibration_njy_per_count": self.calibration_njy_per_count,
            "calibration_err_njy_per_count": self.calibration_err_njy_per_count,
            "zero_point_mag": self.zero_point_mag,
            "zero_point_err_mag": self.zero_point_err_mag,
        }

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> PhotoCalib:
        return cls(float(d["calibration_njy_per_count"]), float(d.get("calibration_err_njy_per_count", 0.0)))


def njy_to_ab_mag(flux_njy: npt.ArrayLike) -> npt.NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return AB_MAG_OF_ONE_NJY - 2.5 * np.log10(np.asarray(flux_njy, dtype=float))


def ab_mag_to_njy(mag: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return 10 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_MAG_OF_ONE_NJY))


def flux_err_to_mag_err(flux: npt.ArrayLike, flux_err: npt.ArrayLike) -> npt.NDArray[np.float64]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2.5 / np.log(10) * np.asarray(flux_err, dtype=float) / np.asarray(flux, dtype=float)
