"""Cosmic rays: pixels sharper than the PSF allows, then grown into their faint wings.

The test is Rubin's (meas_algorithms ``CR.cc``) in vectorised form. A pixel
is a candidate when it is ``min_sigma`` standard deviations above the
background. It is a cosmic ray when, along any of the four directions
through its opposite neighbours (horizontal, vertical, two diagonals),

    sharpness_factor * r_d * (I - noise_factor σ_I) > m_d + noise_factor σ_m

where ``m_d`` is the mean of the two neighbours and ``r_d`` the
neighbour-to-centre ratio of the pixel-integrated PSF. A star centred on a
pixel has ``m_d >= r_d I`` in every direction (off-centre stars are broader
still), so with ``sharpness_factor < 1`` no star core passes. Found cosmic
rays are grown into adjacent pixels above ``grow_sigma`` unless those pixels
look like part of a PSF-wide source (their other neighbours are comparably
bright), which protects star cores next to a hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from ..errors import ConfigError, StepFailedError
from ..exposure import Exposure
from ..masks import MASK_DTYPE, MaskPlane
from ..psf import GaussianPsf
from .interpolation import InterpolationConfig, interpolate_masked

#: (dy, dx) of one neighbour of each opposite pair: horizontal, vertical, two diagonals.
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
_DEFAULT_INTERPOLATION = InterpolationConfig()
_NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class CosmicRayConfig:
    """Configuration of :func:`find_cosmic_rays` (Rubin names in brackets)."""

    #: A candidate is at least this many sigma above the background [minSigma].
    min_sigma: float = 6.0
    #: Safety factor on the PSF neighbour/centre ratio [cond3_fac2].
    sharpness_factor: float = 0.35
    #: Noise margin (sigma) applied to the centre and the neighbour mean [cond3_fac].
    noise_factor: float = 2.0
    #: Neighbours of cosmic rays at least this many sigma above background join them.
    grow_sigma: float = 2.5
    #: Growth passes [niteration].
    n_grow_iterations: int = 3
    #: A growth candidate whose other neighbours average more than this fraction of the PSF
    #: expectation is treated as part of a source and not grown into.
    grow_source_fraction: float = 0.5
    #: More cosmic-ray pixels than this means the frame (or the PSF) is wrong [nCrPixelMax].
    max_cr_pixels: int = 1_000_000
    #: Pixels in these planes are never cosmic rays and are not used as neighbours.
    excluded_planes: MaskPlane = MaskPlane.SAT | MaskPlane.BAD | MaskPlane.NO_DATA

    def validate(self) -> None:
        if not self.min_sigma > 0:
            raise ConfigError("cosmic_rays.min_sigma must be > 0")
        if not 0 < self.sharpness_factor <= 1:
            raise ConfigError("cosmic_rays.sharpness_factor must be in (0, 1]")
        if self.noise_factor < 0 or self.grow_sigma < 0:
            raise ConfigError("cosmic_rays.noise_factor and grow_sigma must be >= 0")
        if self.n_grow_iterations < 0:
            raise ConfigError("cosmic_rays.n_grow_iterations must be >= 0")
        if not 0 < self.grow_source_fraction <= 1:
            raise ConfigError("cosmic_rays.grow_source_fraction must be in (0, 1]")
        if self.max_cr_pixels < 1:
            raise ConfigError("cosmic_rays.max_cr_pixels must be >= 1")


@dataclass(frozen=True, eq=False)
class CosmicRayResult:
    """Result of :func:`find_cosmic_rays`."""

    cr_mask: npt.NDArray[np.bool_]
    n_cosmic_rays: int  #: connected (8-neighbour) groups of cosmic-ray pixels
    n_pixels: int


@dataclass(frozen=True, eq=False)
class RepairResult:
    """Result of :func:`repair_cosmic_rays`."""

    exposure: Exposure
    n_cosmic_rays: int
    n_pixels: int


def _psf_ratios(psf_sigma_pix: float) -> tuple[npt.NDArray[np.float64], float]:
    """Neighbour/centre ratio per direction and the mean 8-neighbour ratio of a centred PSF."""
    k = GaussianPsf(psf_sigma_pix).image(0.0, 0.0, size=3)
    c = k[1, 1]
    ratios = np.array([k[1 + dy, 1 + dx] / c for dy, dx in _DIRECTIONS])
    mean8 = (k.sum() - c) / 8.0 / c
    return ratios, float(mean8)


def find_cosmic_rays(
    image: npt.NDArray[np.floating],
    variance: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    *,
    psf_sigma_pix: float,
    config: CosmicRayConfig = CosmicRayConfig(),
) -> CosmicRayResult:
    """Find cosmic-ray pixels.

    Parameters
    ----------
    image, variance, mask
        Pixel arrays (``[y, x]``); the image should be background-subtracted
        (a global median is removed anyway).
    psf_sigma_pix
        Gaussian sigma of the PSF (pixels).
    config
        Thresholds.

    Returns
    -------
    CosmicRayResult

    Raises
    ------
    ConfigError
        Invalid config or PSF width.
    StepFailedError
        More than ``max_cr_pixels`` cosmic-ray pixels (wrong PSF or a broken frame).
    """
    config.validate()
    if not (psf_sigma_pix > 0 and np.isfinite(psf_sigma_pix)):
        raise ConfigError(f"psf_sigma_pix must be positive and finite, got {psf_sigma_pix}")
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    ny, nx = img.shape
    excluded = (np.asarray(mask) & MASK_DTYPE(int(config.excluded_planes))) != 0
    # One background level, as Rubin does: the image is normally background-subtracted.
    sample = img[::7, ::7][~excluded[::7, ::7]]
    bkg = np.float32(np.median(sample)) if sample.size else np.float32(0.0)

    above = img - bkg
    cand = (above > 0) & (above * above > np.float32(config.min_sigma**2) * var) & ~excluded
    cand[0, :] = cand[-1, :] = False
    cand[:, 0] = cand[:, -1] = False
    ys, xs = np.nonzero(cand)
    cr = np.zeros((ny, nx), dtype=bool)
    ratios, mean8 = _psf_ratios(psf_sigma_pix)
    if ys.size:
        val = above[ys, xs]
        sig = np.sqrt(np.maximum(var[ys, xs], 0.0))
        is_cr = np.zeros(ys.size, dtype=bool)
        for (dy, dx), ratio in zip(_DIRECTIONS, ratios, strict=True):
            a = above[ys + dy, xs + dx]
            b = above[ys - dy, xs - dx]
            usable = ~(excluded[ys + dy, xs + dx] | excluded[ys - dy, xs - dx])
            m = 0.5 * (a + b)
            sm = 0.5 * np.sqrt(np.maximum(var[ys + dy, xs + dx] + var[ys - dy, xs - dx], 0.0))
            sharp = config.sharpness_factor * ratio * (val - config.noise_factor * sig) > m + config.noise_factor * sm
            is_cr |= sharp & usable
        cr[ys[is_cr], xs[is_cr]] = True
        _grow(cr, above, var, excluded, mean8, config)

    n_pixels = int(cr.sum())
    if n_pixels > config.max_cr_pixels:
        raise StepFailedError(
            f"{n_pixels} cosmic-ray pixels exceed max_cr_pixels={config.max_cr_pixels}; "
            "the PSF width is probably far too large or the frame is broken",
            metadata={"n_cr_pixels": n_pixels, "max_cr_pixels": config.max_cr_pixels,
                      "psf_sigma_pix": float(psf_sigma_pix)},
        )
    n_groups = _count_groups(cr) if n_pixels else 0
    return CosmicRayResult(cr, n_groups, n_pixels)


def _grow(cr: npt.NDArray[np.bool_], above: npt.NDArray[np.float32], var: npt.NDArray[np.float32],
          excluded: npt.NDArray[np.bool_], mean8: float, config: CosmicRayConfig) -> None:
    """Grow ``cr`` in place (a private array) into faint, non-source-like neighbours."""
    ny, nx = cr.shape
    front_y, front_x = np.nonzero(cr)
    for _ in range(config.n_grow_iterations):
        if front_y.size == 0:
            break
        cy = (front_y[:, None] + np.array([d[0] for d in _NEIGHBOURS_8])[None, :]).ravel()
        cx = (front_x[:, None] + np.array([d[1] for d in _NEIGHBOURS_8])[None, :]).ravel()
        inside = (cy > 0) & (cy < ny - 1) & (cx > 0) & (cx < nx - 1)
        flat = np.unique(cy[inside] * nx + cx[inside])
        cy, cx = flat // nx, flat % nx
        keep = ~cr[cy, cx] & ~excluded[cy, cx]
        cy, cx = cy[keep], cx[keep]
        val = above[cy, cx]
        keep = (val > 0) & (val * val > np.float32(config.grow_sigma**2) * var[cy, cx])
        cy, cx, val = cy[keep], cx[keep], val[keep]
        # Mean of the neighbours that are not cosmic rays: a source pixel has bright neighbours.
        s = np.zeros(cy.size, dtype=np.float64)
        n = np.zeros(cy.size, dtype=np.float64)
        for dy, dx in _NEIGHBOURS_8:
            ok = ~cr[cy + dy, cx + dx] & ~excluded[cy + dy, cx + dx]
            s += np.where(ok, above[cy + dy, cx + dx], 0.0)
            n += ok
        source_like = s > config.grow_source_fraction * mean8 * val * np.maximum(n, 1)
        add = ~source_like
        front_y, front_x = cy[add], cx[add]
        cr[front_y, front_x] = True


def _count_groups(cr: npt.NDArray[np.bool_]) -> int:
    """Number of 8-connected groups, labelled only inside the bounding box of the hits."""
    rows = np.flatnonzero(cr.any(axis=1))
    cols = np.flatnonzero(cr.any(axis=0))
    box = cr[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    _, n = ndimage.label(box, structure=np.ones((3, 3), dtype=bool))
    return int(n)


def repair_cosmic_rays(
    exposure: Exposure,
    *,
    psf_sigma_pix: float,
    config: CosmicRayConfig = CosmicRayConfig(),
    interpolate: bool = False,
    interpolation: InterpolationConfig = _DEFAULT_INTERPOLATION,
) -> RepairResult:
    """Set the ``CR`` plane of a new exposure and, if ``interpolate``, fill those pixels.

    Cosmic rays already in the ``CR`` plane are kept (and interpolated too).
    Metadata ``cosmic_ray_count`` records the number found in this call.
    """
    found = find_cosmic_rays(exposure.image, exposure.variance, exposure.mask,
                             psf_sigma_pix=psf_sigma_pix, config=config)
    mask = exposure.mask | np.where(found.cr_mask, MASK_DTYPE(int(MaskPlane.CR)), MASK_DTYPE(0))
    image = exposure.image
    if interpolate and np.any(mask & MASK_DTYPE(int(MaskPlane.CR))):
        res = interpolate_masked(image, mask, planes=MaskPlane.CR, psf_sigma_pix=psf_sigma_pix,
                                 config=interpolation)
        image, mask = res.image, res.mask
    new = exposure.replace(image=image, mask=mask.astype(MASK_DTYPE)).with_metadata(
        cosmic_ray_count=found.n_cosmic_rays)
    return RepairResult(new, found.n_cosmic_rays, found.n_pixels)
