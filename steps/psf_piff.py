"""Piff as the PSF determiner (``psf_fit.determiner = "piff"``; ``pip install 'singleframe[piff]'``).

`Piff <https://github.com/rmjarvis/Piff>`_ (DES, Rubin) fits the same kind of model as our own
determiner: a pixel grid whose pixels vary as a polynomial of the position. Here it is given the
stamps our fit used, with their weights (the same candidates, reserve, brightest-first choice,
recentring, masked and neighbour pixels and outlier rejection as
:func:`~singleframe.steps.psf_determination.fit_psf`), and fits a native-pixel ``PixelGrid`` with a
``BasisPolynomial`` of the same order. Piff's own chi² rejection is not used: its chi² is
absolute, so a model short of the photon noise of a star at S/N ~ 1e4 flags the star (75 of 81 such
stars with ``nsigma = 4`` on a test frame), and the brightest stars hold most of the information;
without any rejection, blends bias it in crowded fields (size error +0.14 % on the crowded 4096²
frame, 300 stars). The fitted model is then stored as our :class:`~singleframe.psf.PixelPsf`:
Piff's centred model images are polynomials of the position of that order, so sampling them on a
grid of positions and solving for the Chebyshev coefficients reproduces them exactly (to 4e-7 of
the peak on the typical 4096² frame). Everything downstream (PSF photometry, aperture corrections,
persistence, the evaluator) sees one PSF type whatever fitted it.

Measured on the 4096² benchmark frames with the same stamps (median δe1/δe2 at the true star
positions, size error): typical, Piff −1.8e-4/−2.8e-4, 0.000 %, ours −1.8e-4/−2.7e-4, +0.001 %
(296 stars); crowded, Piff −0.7e-4/−1.7e-4, +0.043 %, ours −0.9e-4/−1.4e-4, +0.051 % (262 stars);
over 8 typical skies (``make bench-psf``) the rms of the median δe1/δe2 is 2.4e-4/2.0e-4 for both.
Piff took ~32 s where our fit takes 0.06 s. It is here for users whose downstream analyses are
validated on Piff models, and as an independent check of ours; the default stays ``pixel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import PsfFitError
from ..psf import PixelPsf, chebyshev_design

#: Positions per axis at which Piff's model is sampled to convert it (>= order + 1 for the exact fit).
_CONVERSION_GRID = 7


@dataclass(frozen=True, eq=False)
class PiffFit:
    """Piff's model as our pixel model, and each star's reduced chi² under it (NaN: not fitted)."""

    psf: PixelPsf
    chi2: npt.NDArray[np.float64]


def fit_piff(stamps: npt.NDArray[np.float64], weights: npt.NDArray[np.float64], x: npt.NDArray[np.float64],
             y: npt.NDArray[np.float64], order: int, bbox: tuple[float, float, float, float]) -> PiffFit:
    """Fit Piff to star stamps: the recentred stamps and weights our fit used.

    Parameters
    ----------
    stamps, weights
        ``(n, s, s)`` stamps with each star on the middle pixel, and their inverse-variance weights
        (zero: masked, or a neighbour's pixel), as :func:`~singleframe.steps.psf_determination.fit_psf`
        built them.
    x, y
        The stars' parent positions (the polynomial's variable).
    order
        Polynomial order of the spatial variation.
    bbox
        Parent ``(x0, y0, x1, y1)`` of the detector (the polynomial's domain).

    Returns
    -------
    PiffFit
        The model as a :class:`PixelPsf` of ``order``, and each star's reduced chi² under it.

    Raises
    ------
    PsfFitError
        If Piff fails, or its model is not a positive image.
    """
    import galsim
    import piff

    n, size, _ = stamps.shape
    half = size // 2
    stars = []
    for k in range(n):
        # The stamp's middle pixel holds the star's centre; GalSim images are 1-based, so the stamp is
        # placed with that pixel at the star's rounded position + 1 and the star exactly on it.
        cx, cy = int(round(x[k])) + 1, int(round(y[k])) + 1
        kw = {"xmin": cx - half, "ymin": cy - half, "scale": 1.0}
        data = piff.StarData(galsim.Image(np.ascontiguousarray(stamps[k], float), **kw), galsim.PositionD(cx, cy),
                             weight=galsim.Image(np.ascontiguousarray(weights[k], float), **kw),
                             properties={"chipnum": 0})
        stars.append(piff.Star(data, None))
    psf = piff.SimplePSF(piff.PixelGrid(scale=1.0, size=size), piff.BasisPolynomial(order=order))
    psf.set_context({0: galsim.PixelScale(1.0)}, None)
    try:
        psf.fit(stars, logger=None)
    except Exception as exc:  # Piff raises plain exceptions of many kinds on degenerate input
        raise PsfFitError(f"Piff could not fit the {n} PSF stars ({type(exc).__name__}: {exc}); "
                          "check the star selection, or use psf_fit.determiner = 'pixel'") from exc
    if len(psf.stars) != n:  # no outlier removal here: Piff returns its input stars, in order
        raise PsfFitError(f"Piff returned {len(psf.stars)} stars for {n}; this Piff version is not "
                          "supported, use psf_fit.determiner = 'pixel'")
    chi2 = np.array([s.fit.chisq / s.fit.dof if s.fit.chisq is not None and s.fit.dof else np.nan
                     for s in psf.stars])
    return PiffFit(_as_pixel_psf(psf, bbox, size, order), chi2)


def _as_pixel_psf(psf: object, bbox: tuple[float, float, float, float], size: int, order: int) -> PixelPsf:
    """Piff's centred, unit-sum model images on a grid of positions, fitted exactly by our Chebyshev basis."""
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
    return PixelPsf(coef.reshape(-1, size, size), np.eye(design.shape[1]), order, bbox)
