"""Interpolation over masked pixels (bad columns, saturation bleed, no data, cosmic rays).

First pass: at every masked pixel, a weighted least-squares fit along its row
or column (whichever has more good pixels, with data on both sides) of
``a + b d + c g(d) + e d g(d)``, where ``g`` is the pixel-integrated 1-D PSF
profile: a star crossing the gap at any sub-pixel position is well described,
so its core is not cut (a local mean or polynomial loses 10-30 % of the peak of
a well-sampled star, worse for undersampled ones); ``a + b d`` absorb the sky.
Pixels without data on both sides within the window (wide gaps) are then filled by order-0 normalised
convolution (``gaussian_filter(image * good) / gaussian_filter(good)``) with a
window that doubles on each pass, treating already-filled pixels as good; the
filters run only in padded boxes around the pixels still to fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.special import erf as _erf

from ..errors import ConfigError
from ..exposure import writable_in_place
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
    overwrite_image: bool = False,
) -> InterpolationResult:
    """Replace pixels with any of ``planes`` set by values interpolated from good pixels.

    Parameters
    ----------
    image, mask
        Pixels and mask bits (``[y, x]``); not modified (but see ``overwrite_image``).
    planes
        Mask planes to interpolate over.
    psf_sigma_pix
        PSF Gaussian sigma (pixels); sets the first-pass window.
    config
        Window and iteration limits.
    overwrite_image
        Interpolate in ``image`` itself when it is a writable, C-contiguous float32 array (then
        ``result.image is image``), as numpy's ``overwrite_input``: for callers that own a fresh
        frame, it saves a 64 MB copy of a 4k x 4k image. Otherwise a copy is made as usual.

    Returns
    -------
    InterpolationResult
    """
    config.validate()
    if not (psf_sigma_pix > 0 and math.isfinite(psf_sigma_pix)):
        raise ConfigError(f"psf_sigma_pix must be positive and finite, got {psf_sigma_pix}")
    in_place = overwrite_image and writable_in_place(image, np.float32)
    img = image if in_place else np.array(image, dtype=np.float32, order="C", copy=True)
    msk = np.array(mask, dtype=MASK_DTYPE, order="C", copy=True)
    n_bad = _fill_masked(img, msk, planes=planes, psf_sigma_pix=psf_sigma_pix, config=config)
    return InterpolationResult(img, msk, n_bad)


def _fill_masked(img: npt.NDArray[np.float32], msk: npt.NDArray[np.uint32], *, planes: MaskPlane,
                 psf_sigma_pix: float, config: InterpolationConfig) -> int:
    """:func:`interpolate_masked` in place on private C-contiguous arrays; return the pixels replaced.

    For callers that already own fresh copies (``repair_cosmic_rays``): saves a 64 MB copy
    of a 4k mask. Arguments must have been validated.
    """
    flat_img, flat_msk = img.reshape(-1), msk.reshape(-1)
    # Everything below works on the flat indices of the bad pixels (a few per cent of a frame
    # at most), never on full-frame float temporaries.
    bad_idx = _flat_indices_with_bits(flat_msk, MASK_DTYPE(int(planes)))
    if not np.isfinite(flat_img.sum()):
        # The sum is finite when every pixel is (or it overflowed): only then look pixel by pixel.
        bad_idx = np.union1d(bad_idx, np.flatnonzero(~np.isfinite(flat_img)))
    n_bad = int(bad_idx.size)
    if n_bad == 0:
        return 0
    if n_bad == img.size:
        # Nothing to interpolate from: leave a flat zero and say so through INTRP.
        img[:] = 0.0
        msk |= MASK_DTYPE(int(MaskPlane.INTRP))
        return n_bad

    bad = np.zeros(img.shape, dtype=bool)
    bad.reshape(-1)[bad_idx] = True
    todo = _profile_pass(img, bad, bad_idx, psf_sigma_pix, config)
    sigma = max(psf_sigma_pix, 1.0)
    for _ in range(config.max_iterations):
        if todo.size == 0:
            break
        sigma *= 2.0
        todo = _normalized_convolution_pass(img, todo, sigma, config.min_weight)
    if todo.size:
        flat_img[todo] = np.median(img[~bad])
    flat_msk[bad_idx] |= MASK_DTYPE(int(MaskPlane.INTRP))
    return n_bad


def _flat_indices_with_bits(flat_mask: npt.NDArray[np.uint32], bits: np.uint32,
                            block: int = 1 << 16) -> npt.NDArray[np.intp]:
    """``flatnonzero(flat_mask & bits)``, block by block through cache-sized buffers.

    ``flatnonzero`` on the ``uint32`` array itself is several times slower than on a boolean
    array, and full-frame temporaries would cost 64 MB + 16 MB.
    """
    both = np.empty(block, dtype=flat_mask.dtype)
    hit = np.empty(block, dtype=bool)
    out = []
    for start in range(0, flat_mask.size, block):
        n = min(block, flat_mask.size - start)
        np.bitwise_and(flat_mask[start: start + n], bits, out=both[:n])
        np.not_equal(both[:n], 0, out=hit[:n])
        out.append(np.flatnonzero(hit[:n]) + start)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.intp)


def _profile_pass(img: npt.NDArray[np.float32], bad: npt.NDArray[np.bool_], bad_idx: npt.NDArray[np.intp],
                  psf_sigma_pix: float, config: InterpolationConfig) -> npt.NDArray[np.intp]:
    """Fill ``img`` in place by 1-D PSF-profile fits along rows or columns; return flat indices left."""
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
    flat_img, flat_bad = img.reshape(-1), bad.reshape(-1)
    di = d.astype(np.intp)
    left = []
    filled_idx, filled_val = [], []
    for start in range(0, bad_idx.size, config.chunk_pixels):
        idx = bad_idx[start: start + config.chunk_pixels]
        py, px = np.divmod(idx, nx)
        best_w = np.zeros((idx.size, len(d)))
        best_v = np.zeros((idx.size, len(d)))
        best_ok = np.zeros(idx.size, dtype=bool)
        best_n = np.zeros(idx.size, dtype=np.intp)
        for axis in (1, 0):
            if axis == 1:
                q = px[:, None] + di[None, :]
                inside = (q >= 0) & (q < nx)
                flat = idx[:, None] + np.where(inside, di[None, :], 0)
            else:
                q = py[:, None] + di[None, :]
                inside = (q >= 0) & (q < ny)
                flat = idx[:, None] + np.where(inside, di[None, :] * nx, 0)
            good = inside & ~flat_bad[flat]
            n_left = good[:, :r].sum(axis=1)
            n_right = good[:, r:].sum(axis=1)
            # Both sides must hold data: a one-sided fit would extrapolate the profile.
            ok = (n_left >= config.min_pixels_per_side) & (n_right >= config.min_pixels_per_side)
            n = n_left + n_right
            better = ok & (~best_ok | (n > best_n))
            # Fits read good pixels only, which this pass never writes: no copy of the image needed.
            best_w[better] = np.where(good[better], kernel[None, :], 0.0)
            best_v[better] = np.where(good[better], flat_img[flat[better]], 0.0)
            best_ok |= ok
            best_n = np.where(better, n, best_n)
        w, v = best_w[best_ok], best_v[best_ok]
        a = (w @ outer).reshape(-1, 4, 4)
        b = (w * v) @ basis
        # A small ridge keeps thin or sparse windows solvable; unconstrained terms shrink to 0.
        ridge = 1e-4 * np.trace(a, axis1=1, axis2=2)
        a[:, np.arange(4), np.arange(4)] += ridge[:, None]
        coef = np.linalg.solve(a, b[..., None])[..., 0]
        filled_idx.append(idx[best_ok])
        filled_val.append(coef @ at_zero)
        left.append(idx[~best_ok])
    # Written after all fits, so no fit reads a filled value.
    flat_img[np.concatenate(filled_idx)] = np.concatenate(filled_val)
    return np.concatenate(left)


def _normalized_convolution_pass(img: npt.NDArray[np.float32], todo: npt.NDArray[np.intp], sigma: float,
                                 min_weight: float, tile_pix: int = 32) -> npt.NDArray[np.intp]:
    """Order-0 fill of the ``todo`` pixels (flat indices) in place; return those left.

    The filter runs only inside the bounding box of each cluster of tiles holding
    ``todo`` pixels, padded by the filter radius (bad columns and bleed trails
    cover a few per cent of a 4k frame, while their bounding box is the whole
    frame). The result equals one full-frame pass: the Gaussian is truncated at
    4 sigma <= the padding, and pixels filled in this pass are not used as data
    until the next one.
    """
    ny, nx = img.shape
    pad = int(math.ceil(4.0 * sigma))
    flat_img = img.reshape(-1)
    ty, tx = np.divmod(todo, nx)
    ty //= tile_pix
    tx //= tile_pix
    tiles = np.zeros((-(-ny // tile_pix), -(-nx // tile_pix)), dtype=bool)
    tiles[ty, tx] = True
    # Clusters of tiles closer than the filter radius share one box (their pads would overlap).
    reach = 1 + pad // tile_pix
    grouped = ndimage.binary_dilation(tiles, np.ones((2 * reach + 1, 2 * reach + 1), bool)) if reach > 1 else \
        ndimage.binary_dilation(tiles, np.ones((3, 3), bool))
    labels, _ = ndimage.label(grouped)
    tile_label = labels[ty, tx]
    todo_mask = np.zeros(img.shape, dtype=bool)
    todo_mask.reshape(-1)[todo] = True
    filled = np.zeros(todo.size, dtype=bool)
    values = np.zeros(todo.size, dtype=np.float32)
    # The peak of a unit-normalised 2-D Gaussian is 1/(2 pi sigma^2); scale min_weight to it.
    peak = 2.0 * math.pi * sigma * sigma
    order = np.argsort(tile_label, kind="stable")
    bounds = np.flatnonzero(np.diff(tile_label[order])) + 1
    for members in np.split(order, bounds):
        yy, xx = np.divmod(todo[members], nx)
        y0, y1 = max(int(yy.min()) - pad, 0), min(int(yy.max()) + 1 + pad, ny)
        x0, x1 = max(int(xx.min()) - pad, 0), min(int(xx.max()) + 1 + pad, nx)
        box_todo = todo_mask[y0:y1, x0:x1]
        num = ndimage.gaussian_filter(np.where(box_todo, np.float32(0.0), img[y0:y1, x0:x1]), sigma,
                                      mode="constant")
        den = ndimage.gaussian_filter((~box_todo).astype(np.float32), sigma, mode="constant")
        ly, lx = yy - y0, xx - x0
        d = den[ly, lx]
        ok = d * peak >= min_weight
        filled[members] = ok
        values[members[ok]] = num[ly[ok], lx[ok]] / d[ok]
    # Written after all boxes: pixels filled in this pass are data only in the next one.
    flat_img[todo[filled]] = values[filled]
    return todo[~filled]
