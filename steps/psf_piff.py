"""Piff as the PSF determiner (``psf_fit.determiner = "piff"``; ``pip install 'singleframe[piff]'``).

`Piff <https://github.com/rmjarvis/Piff>`_ (DES, Rubin) fits the same kind of model as our own
determiner: a pixel grid whose pixels vary as a polynomial of the position. Here it is given the
stars our fit kept (the same candidates, reserve, brightest-first choice and outlier rejection as
:func:`~singleframe.steps.psf_determination.fit_psf`) and fits a native-pixel ``PixelGrid`` with a
``BasisPolynomial`` of the same order. Piff's own chi² rejection is not used: its chi² is
absolute, so a model short of the photon noise of a star at S/N ~ 1e4 flags the star (75 of 81 such
stars with ``nsigma = 4`` on a test frame), and the brightest stars hold most of the information;
without any rejection, blends bias it in crowded fields (size error +0.14 % on the crowded 4096²
frame, 300 stars). The fitted model is then stored as our :class:`~singleframe.psf.PixelPsf`:
Piff's centred model images are polynomials of the position of that order, so sampling them on a
grid of positions and solving for the Chebyshev coefficients reproduces them exactly (to 4e-7 of
the peak on the typical 4096² frame). Everything downstream (PSF photometry, aperture corrections,
persistence, the evaluator) sees one PSF type whatever fitted it.

Measured on the 4096² benchmark frames with the same stars (median δe1/δe2 at the true star
positions, size error): typical, Piff −2.5e-4/−3.8e-4, +0.011 %, ours −2.6e-4/−3.7e-4, −0.004 %
(272 stars); crowded, Piff −1.2e-4/−1.8e-4, +0.064 %, ours −1.3e-4/−1.7e-4, +0.049 % (219 stars).
Piff took 40-45 s where our fit takes 0.06 s. It is here for users whose downstream analyses are
validated on Piff models, and as an independent check of ours; the default stays ``pixel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import PsfFitError
from ..exposure import Exposure
from ..masks import MaskPlane
from ..psf import PixelPsf, chebyshev_design

if TYPE_CHECKING:
    from .psf_determination import PsfFitConfig

#: Positions per axis at which Piff's model is sampled to convert it (>= order + 1 for the exact fit).
_CONVERSION_GRID = 7


@dataclass(frozen=True, eq=False)
class PiffFit:
    """Piff's model as our pixel model, and each star's reduced chi² under it (NaN: not fitted)."""

    psf: PixelPsf
    chi2: npt.NDArray[np.float64]


def fit_piff(exposure: Exposure, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], half: int, order: int,
             config: PsfFitConfig) -> PiffFit:
    """Fit Piff to the stars at ``(x, y)`` (parent pixels) with ``(2 half + 1)²`` stamps.

    Pixels in ``config.bad_mask_planes`` get zero weight, the others their inverse variance.

    Returns
    -------
    PiffFit
        The model as a :class:`PixelPsf` of ``order``, and each star's reduced chi² under it (NaN for a
        star with no usable pixel, which is not fitted).

    Raises
    ------
    PsfFitError
        If Piff fails, or its model is not a positive image.
    """
    import galsim
    import piff

    size = 2 * half + 1
    bits = 0
    for plane in config.bad_mask_planes:
        bits |= int(MaskPlane[plane])
    ox, oy = exposure.origin
    ny, nx = exposure.shape
    stars, fitted = [], []
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        ic, jc = int(round(xi - ox)), int(round(yi - oy))
        r0, r1 = max(jc - half, 0), min(jc + half + 1, ny)
        c0, c1 = max(ic - half, 0), min(ic + half + 1, nx)
        if r1 <= r0 or c1 <= c0:
            continue
        img = np.asarray(exposure.image[r0:r1, c0:c1], float)
        var = np.asarray(exposure.variance[r0:r1, c0:c1], float)
        good = ((exposure.mask[r0:r1, c0:c1] & np.uint32(bits)) == 0) & (var > 0) & np.isfinite(img)
        if not good.any():
            continue
        weight = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
        # GalSim images are 1-based with pixel centres on integers: parent pixel p is GalSim p + 1.
        kw = {"xmin": c0 + ox + 1, "ymin": r0 + oy + 1, "scale": 1.0}
        data = piff.StarData(galsim.Image(np.where(good, img, 0.0), **kw), galsim.PositionD(xi + 1.0, yi + 1.0),
                             weight=galsim.Image(weight, **kw), properties={"chipnum": 0})
        stars.append(piff.Star(data, None))
        fitted.append(i)
    psf = piff.SimplePSF(piff.PixelGrid(scale=1.0, size=size), piff.BasisPolynomial(order=order))
    psf.set_context({0: galsim.PixelScale(1.0)}, None)
    try:
        psf.fit(stars, logger=None)
    except Exception as exc:  # Piff raises plain exceptions of many kinds on degenerate input
        raise PsfFitError(f"Piff could not fit the {len(stars)} PSF stars ({type(exc).__name__}: {exc}); "
                          "check the star selection, or use psf_fit.determiner = 'pixel'") from exc
    if len(psf.stars) != len(fitted):  # no outlier removal here: Piff returns its input stars, in order
        raise PsfFitError(f"Piff returned {len(psf.stars)} stars for {len(fitted)}; this Piff version is not "
                          "supported, use psf_fit.determiner = 'pixel'")
    chi2 = np.full(x.size, np.nan)
    for i, star in zip(fitted, psf.stars, strict=True):
        if star.fit.chisq is not None and star.fit.dof:
            chi2[i] = star.fit.chisq / star.fit.dof
    return PiffFit(_as_pixel_psf(psf, exposure, size, order), chi2)


def _as_pixel_psf(psf: object, exposure: Exposure, size: int, order: int) -> PixelPsf:
    """Piff's centred, unit-sum model images on a grid of positions, fitted exactly by our Chebyshev basis."""
    bbox = tuple(float(v) for v in exposure.bbox)
    gx, gy = np.meshgrid(np.linspace(bbox[0], bbox[2], _CONVERSION_GRID),
                         np.linspace(bbox[1], bbox[3], _CONVERSION_GRID))
    gx, gy = gx.ravel(), gy.ravel()
    images = np.empty((gx.size, size * size))
    for k, (xi, yi) in enumerate(zip(gx, gy, strict=True)):
        im = psf.draw(x=xi + 1.0, y=yi + 1.0, chipnum=0, stamp_size=size, center=True).array  # type: ignore[attr-defined]
        total = float(im.sum())
        if not (math.isfinite(total) and total > 0):
            raise PsfFitError(f"Piff's model has a non-positive or non-finite sum ({total}) at ({xi:.0f}, {yi:.0f}); "
                              "use psf_fit.determiner = 'pixel'")
        images[k] = (im / total).ravel()
    design = chebyshev_design(gx, gy, order=order, bbox=bbox)
    coef, *_ = np.linalg.lstsq(design, images, rcond=None)
    return PixelPsf(coef.reshape(-1, size, size), np.eye(design.shape[1]), order, bbox)  # type: ignore[arg-type]
