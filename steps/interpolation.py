"""Interpolation over masked pixels (bad columns, saturation bleed, no data, cosmic rays).

First pass: at every masked pixel, a weighted least-squares fit along its row
or column (whichever has more good pixels, with data on both sides) of
``a + b d + c g(d) + e d g(d)``, where ``g`` is the pixel-integrated 1-D PSF
profile: a star crossing the gap at any sub-pixel position is well described,
so its core is not cut (a local mean or polynomial loses 10-30 % of the peak of
a well-sampled star, worse for undersampled ones); ``a + b d`` absorb the sky.
Pixels without data on both sides within the window (wide gaps) are then filled by order-0 normalised
convolution (``gaussian_filter(image * good) / gaussian_filter(good)``) with a
window that doubles on each pass, treating already-filled pixels as good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.special import erf as _erf

from ..errors import ConfigError
from ..masks import MASK_DTYPE, MaskPlane


@dataclass(frozen=True)
class InterpolationConfig:
    """Configuration of :func:`interpolate_masked`."""

    #: Half-width of the 1-D profile fit, in PSF sigmas ...
    half_width_psf_sigmas: float = 3.0
    #: ... and at least this many pixels.
    min_half_width_pix: float = 4.0
    #: Good pixels required on each side of a gap along the fitted row or column.
    min_pixels_per_side: int = 2
    #: Minimum summed Gaussian weight of good pixels for a fit (1 = one pixel at the centre).
    min_weight: float = 1.0
    #: Order-0 passes with doubling window for wide gaps.
    max_iterations: int = 8
    #: Masked pixels are processed in chunks of this many (bounds memory).
    chunk_pixels: int = 50_000

    def validate(self) -> None:
        if not (self.half_width_psf_sigmas > 0 and self.min_half_width_pix >= 2):
            raise ConfigError("interpolation.half_width_psf_sigmas must be > 0 and min_half_width_pix >= 2")
        if self.min_pixels_per_side < 1:
            raise ConfigError("interpolation.min_pixels_per_side must be >= 1")
        if not self.min_weight > 0:
            raise ConfigError("interpolation.min_weight must be > 0")
        if self.max_iterations < 1:
            raise ConfigError("interpolation.max_iterations must be >= 1")
        if self.chunk_pixels < 1:
            raise ConfigError("interpolation.chunk_pixels must be >= 1")


@dataclass(frozen=True, eq=False)
class InterpolationResult:
    """Result of :func:`interpolate_masked`."""

    image: npt.NDArray[np.float32]  #: new image, masked pixels replaced
    mask: npt.NDArray[np.uint32]  #: new mask, ``INTRP`` set on replaced pixels
    n_pixels: int  #: pixels replaced


def interpolate_masked(
    image: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    *,
    planes: MaskPlane,
    psf_sigma_pix: float,
    config: InterpolationConfig = InterpolationConfig(),
) -> InterpolationResult:
    """Replace pixels with any of ``planes`` set by values interpolated from good pixels.

    Parameters
    ----------
    image, mask
        Pixels and mask bits (``[y, x]``); not modified.
    planes
        Mask planes to interpolate over.
    psf_sigma_pix
        PSF Gaussian sigma (pixels); sets the first-pass window.
    config
        Window and iteration limits.

    Returns
    -------
    InterpolationResult
    """
    config.validate()
    if not (psf_sigma_pix > 0 and math.isfinite(psf_sigma_pix)):
        raise ConfigError(f"psf_sigma_pix must be positive and finite, got {psf_sigma_pix}")
    img = np.array(image, dtype=np.float32, copy=True)
    msk = np.array(mask, dtype=MASK_DTYPE, copy=True)
    bad = ((msk & MASK_DTYPE(int(planes))) != 0) | ~np.isfinite(img)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return InterpolationResult(img, msk, 0)
    if n_bad == bad.size:
        # Nothing to interpolate from: leave a flat zero and say so through INTRP.
        img[:] = 0.0
        msk |= MASK_DTYPE(int(MaskPlane.INTRP))
        return InterpolationResult(img, msk, n_bad)

    todo = _profile_pass(img, bad, psf_sigma_pix, config)
    sigma = max(psf_sigma_pix, 1.0)
    for _ in range(config.max_iterations):
        if not todo.any():
            break
        sigma *= 2.0
        todo = _normalized_convolution_pass(img, todo, sigma, config.min_weight)
    if todo.any():
        img[todo] = np.median(img[~bad])
    msk[bad] |= MASK_DTYPE(int(MaskPlane.INTRP))
    return InterpolationResult(img, msk, n_bad)


def _profile_pass(img: npt.NDArray[np.float32], bad: npt.NDArray[np.bool_], psf_sigma_pix: float,
                  config: InterpolationConfig) -> npt.NDArray[np.bool_]:
    """Fill ``img`` in place by 1-D PSF-profile fits along rows or columns; return pixels left."""
    ny, nx = img.shape
    r = int(math.ceil(max(config.half_width_psf_sigmas * psf_sigma_pix, config.min_half_width_pix)))
    d = np.concatenate([np.arange(-r, 0), np.arange(1, r + 1)]).astype(float)
    # Pixel-integrated 1-D Gaussian profile and its shift derivative (~ d * g): a star crossing
    # the gap at any sub-pixel position is a combination of the two; 1 and d absorb the sky.
    s2 = math.sqrt(2.0) * psf_sigma_pix
    g = 0.5 * (_erf((d + 0.5) / s2) - _erf((d - 0.5) / s2))
    g0 = 0.5 * (_erf(0.5 / s2) - _erf(-0.5 / s2))
    basis = np.stack([np.ones_like(d), d, g / g0, d * g / g0], axis=1)
    at_zero = np.array([1.0, 0.0, 1.0, 0.0])
    kernel = np.exp(-0.5 * (d / max(r / 1.5, 1.0)) ** 2)
    outer = (basis[:, :, None] * basis[:, None, :]).reshape(len(d), 16)
    ys, xs = np.nonzero(bad)
    left = np.zeros_like(bad)
    source = img.copy()  # fits read the original good pixels only
    di = d.astype(int)
    for start in range(0, ys.size, config.chunk_pixels):
        py, px = ys[start: start + config.chunk_pixels], xs[start: start + config.chunk_pixels]
        best_w = np.zeros((py.size, len(d)))
        best_v = np.zeros((py.size, len(d)))
        best_ok = np.zeros(py.size, dtype=bool)
        best_n = np.zeros(py.size)
        for axis in (1, 0):
            qy = py[:, None] + (di[None, :] if axis == 0 else 0)
            qx = px[:, None] + (di[None, :] if axis == 1 else 0)
            inside = (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx)
            qy, qx = np.clip(qy, 0, ny - 1), np.clip(qx, 0, nx - 1)
            good = inside & ~bad[qy, qx]
            n_left = good[:, :r].sum(axis=1)
            n_right = good[:, r:].sum(axis=1)
            # Both sides must hold data: a one-sided fit would extrapolate the profile.
            ok = (n_left >= config.min_pixels_per_side) & (n_right >= config.min_pixels_per_side)
            n = n_left + n_right
            better = ok & (~best_ok | (n > best_n))
            best_w[better] = np.where(good[better], kernel[None, :], 0.0)
            best_v[better] = np.where(good[better], source[qy[better], qx[better]], 0.0)
            best_ok |= ok
            best_n = np.where(better, n, best_n)
        w, v = best_w[best_ok], best_v[best_ok]
        a = (w @ outer).reshape(-1, 4, 4)
        b = (w * v) @ basis
        # A small ridge keeps thin or sparse windows solvable; unconstrained terms shrink to 0.
        ridge = 1e-4 * np.trace(a, axis1=1, axis2=2)
        a[:, np.arange(4), np.arange(4)] += ridge[:, None]
        coef = np.linalg.solve(a, b[..., None])[..., 0]
        img[py[best_ok], px[best_ok]] = coef @ at_zero
        left[py[~best_ok], px[~best_ok]] = True
    return left


def _normalized_convolution_pass(img: npt.NDArray[np.float32], todo: npt.NDArray[np.bool_], sigma: float,
                                 min_weight: float, tile_pix: int = 256) -> npt.NDArray[np.bool_]:
    """Order-0 fill of ``todo`` pixels in place, tile by tile.

    Only tiles holding ``todo`` pixels are filtered, each inside its box padded by the
    filter radius (bad columns and bleed trails cover a few percent of a 4k frame, while
    their bounding box is the whole frame). The result equals one full-frame pass: the
    Gaussian is truncated at 4 sigma <= the padding, and pixels filled in this pass are
    not used as data until the next one.
    """
    ny, nx = img.shape
    pad = int(math.ceil(4.0 * sigma))
    nty, ntx = -(-ny // tile_pix), -(-nx // tile_pix)
    padded = np.zeros((nty * tile_pix, ntx * tile_pix), bool)
    padded[:ny, :nx] = todo
    tiles = padded.reshape(nty, tile_pix, ntx, tile_pix).any(axis=(1, 3))
    left = todo.copy()
    # The peak of a unit-normalised 2-D Gaussian is 1/(2 pi sigma^2); scale min_weight to it.
    peak = 2.0 * math.pi * sigma * sigma
    for ty, tx in zip(*np.nonzero(tiles), strict=True):
        ty0, tx0 = int(ty) * tile_pix, int(tx) * tile_pix
        ty1, tx1 = min(ty0 + tile_pix, ny), min(tx0 + tile_pix, nx)
        y0, y1 = max(ty0 - pad, 0), min(ty1 + pad, ny)
        x0, x1 = max(tx0 - pad, 0), min(tx1 + pad, nx)
        box_todo = todo[y0:y1, x0:x1]
        good = (~box_todo).astype(np.float32)
        num = ndimage.gaussian_filter(np.where(box_todo, np.float32(0.0), img[y0:y1, x0:x1]), sigma,
                                      mode="constant")
        den = ndimage.gaussian_filter(good, sigma, mode="constant")
        inner = np.s_[ty0 - y0: ty1 - y0, tx0 - x0: tx1 - x0]
        fill = box_todo[inner] & (den[inner] * peak >= min_weight)
        sub = img[ty0:ty1, tx0:tx1]
        sub[fill] = num[inner][fill] / den[inner][fill]
        left[ty0:ty1, tx0:tx1] &= ~fill
    return left
