"""Apply the photometric calibration to pixels, background and catalogues (counts → nJy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.table import Table

from ..background import BackgroundList
from ..errors import ConfigError
from ..exposure import Exposure
from ..photo_calib import PhotoCalib, flux_err_to_mag_err, njy_to_ab_mag


@dataclass(frozen=True, eq=False)
class CalibratedExposure:
    """Pixels and background in nJy.

    Attributes
    ----------
    exposure
        Image (nJy), variance (nJy²), identity ``photo_calib`` carrying the
        relative calibration error, ``BUNIT = nJy`` in the metadata.
    background
        Every background component multiplied by the calibration (unit nJy).
    """

    exposure: Exposure
    background: BackgroundList


def calibrate_exposure(exposure: Exposure, photo_calib: PhotoCalib, *, background: BackgroundList) -> CalibratedExposure:
    """Scale image, variance and background from counts to nJy.

    Parameters
    ----------
    exposure
        Background-subtracted exposure in counts.
    photo_calib
        Fitted calibration (nJy per count).
    background
        The background subtracted from ``exposure`` (counts).

    Returns
    -------
    CalibratedExposure
        Adding the returned background to the returned image and dividing by
        the calibration recovers the input image plus its background.

    Raises
    ------
    ConfigError
        The calibration is not finite and positive.
    """
    c = float(photo_calib.calibration_njy_per_count)
    if not (math.isfinite(c) and c > 0):
        raise ConfigError(f"photometric calibration must be finite and > 0 to calibrate pixels, got {c}")
    rel_err = float(photo_calib.calibration_err_njy_per_count) / c
    bkg = background.scaled(c, "nJy")
    # float32 products: one extra rounding of c (6e-8 relative), far below any noise, and no
    # 128 MB float64 temporaries per plane.
    image = np.multiply(exposure.image, np.float32(c), dtype=np.float32)
    variance = np.multiply(exposure.variance, np.float32(c * c), dtype=np.float32)
    out = exposure.replace(image=image, variance=variance, photo_calib=PhotoCalib(1.0, rel_err), background=bkg,
                           metadata={**exposure.metadata, "BUNIT": "nJy"})
    return CalibratedExposure(out, bkg)


def calibrate_catalog(catalog: Table, photo_calib: PhotoCalib) -> Table:
    """Return a copy of ``catalog`` with calibrated fluxes and AB magnitudes.

    For every ``<x>_instFlux`` column adds ``<x>_flux`` and ``<x>_fluxErr``
    (nJy; the error includes the calibration error in quadrature) and
    ``<x>_mag``, ``<x>_magErr`` (AB). A missing ``<x>_instFluxErr`` gives
    NaN errors. Non-positive fluxes give NaN magnitudes.
    """
    out = catalog.copy(copy_data=True)
    for col in [c for c in catalog.colnames if c.endswith("_instFlux")]:
        base = col[: -len("_instFlux")]
        inst = np.asarray(catalog[col], float)
        inst_err = (np.asarray(catalog[f"{base}_instFluxErr"], float) if f"{base}_instFluxErr" in catalog.colnames
                    else np.full(len(catalog), np.nan))
        flux = photo_calib.instflux_to_njy(inst)
        flux_err = photo_calib.instflux_err_to_njy(inst, inst_err)
        with np.errstate(divide="ignore", invalid="ignore"):
            mag = np.where(flux > 0, njy_to_ab_mag(flux), np.nan)
            mag_err = np.where(flux > 0, flux_err_to_mag_err(flux, flux_err), np.nan)
        out[f"{base}_flux"] = flux * u.nJy
        out[f"{base}_fluxErr"] = flux_err * u.nJy
        # Plain "mag" (AB by definition here): function units such as mag(AB) do not round-trip through Parquet.
        out[f"{base}_mag"] = mag * u.mag
        out[f"{base}_magErr"] = mag_err * u.mag
    return out
