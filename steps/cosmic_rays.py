"""Cosmic rays: pixels sharper than the PSF allows, then grown into their faint wings.

The test is Rubin's (meas_algorithms ``CR.cc``) in vectorised form. A pixel
is a candidate when it is ``min_sigma`` standard deviations above the
background. It is a cosmic ray when, along any of the four directions
through its opposite neighbours (horizontal, vertical, two diagonals),

    sharpness_factor * r_d * (I - noise_factor σ_I) > m_d + noise_factor σ_m

where ``m_d`` is the mean of the two neighbours and ``r_d`` the
neighbour-to-centre ratio of the pixel-integrated PSF. A star centred on a
pixel has ``m_d >= r_d I`` in every direction (off-centre stars are broader
still), so with ``sharpness_factor < 1`` no star core passes.

Found cosmic rays are grown, pass after pass, into adjacent pixels above
``grow_sigma`` that either do not look like part of a PSF-wide source (their
other neighbours are faint), which catches the faint wings of a hit, or pass
the sharpness test with the milder ``grow_sharpness_factor`` along a
direction free of cosmic rays, which follows a track across a star. A star
core next to a hit passes neither: its neighbours are bright, and it is not
sharper than the PSF.

Notes
-----
Everything after the candidate cut runs on flat pixel indices: candidates are
a few per cent of a frame, cosmic-ray pixels a few thousand, so no
full-frame temporary beyond the one boolean output mask is needed. The
candidate cut itself runs over blocks of rows that stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.sparse import csgraph

from ..errors import ConfigError, StepFailedError
from ..exposure import Exposure, writable_in_place
from ..masks import MASK_DTYPE, MaskPlane
from ..psf import GaussianPsf
from .interpolation import InterpolationConfig, _fill_masked  # in place: one 64 MB copy fewer

#: (dy, dx) of one neighbour of each opposite pair: horizontal, vertical, two diagonals.
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
_DEFAULT_INTERPOLATION = InterpolationConfig()
_NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
#: Rows per block of the candidate cut: a block of float32 temporaries stays in cache.
_BLOCK_ROWS = 64
#: Star peaks vouching for the growth factor: S/N at least this, and at least this many of them.
_STAR_PEAK_SNR = 30.0
_MIN_STAR_PEAKS = 20


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
    #: Growth passes [niteration]; each pass adds at most one pixel layer.
    n_grow_iterations: int = 3
    #: A growth candidate whose other neighbours average more than this fraction of the PSF
    #: expectation is treated as part of a source, unless it passes the milder sharpness test.
    grow_source_fraction: float = 0.5
    #: Sharpness factor for pixels next to a cosmic ray (directions through cosmic-ray pixels
    #: are not used): follows a track across a star; a star core needs a factor near 1 to pass.
    grow_sharpness_factor: float = 0.7
    #: ... capped at this fraction of the median ``min_d m_d / (r_d I)`` of bright star peaks on the
    #: frame, so that a PSF width guessed too large cannot make it flag star cores.
    grow_star_margin: float = 0.8
    #: More cosmic-ray pixels than this means the frame (or the PSF) is wrong [nCrPixelMax].
    max_cr_pixels: int = 1_000_000
    #: Pixels in these planes are never cosmic rays and are not used as neighbours.
    excluded_planes: MaskPlane = MaskPlane.SAT | MaskPlane.BAD | MaskPlane.NO_DATA

    def validate(self) -> None:
        if not self.min_sigma > 0:
            raise ConfigError("cosmic_rays.min_sigma must be > 0")
        if not 0 < self.sharpness_factor <= 1:
            raise ConfigError("cosmic_rays.sharpness_factor must be in (0, 1]")
        if not self.sharpness_factor <= self.grow_sharpness_factor <= 1:
            raise ConfigError("cosmic_rays.grow_sharpness_factor must be in [sharpness_factor, 1]")
        if not 0 < self.grow_star_margin <= 1:
            raise ConfigError("cosmic_rays.grow_star_margin must be in (0, 1]")
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


class _Pixels:
    """Flat views of one frame with the lookups the tests need, all at given flat indices."""

    def __init__(self, image: npt.NDArray[np.floating], variance: npt.NDArray[np.floating],
                 mask: npt.NDArray[np.integer], excluded_planes: MaskPlane) -> None:
        self.img = np.ascontiguousarray(image, dtype=np.float32)
        self.var = np.ascontiguousarray(variance, dtype=np.float32)
        self.msk = np.ascontiguousarray(mask)
        self.ny, self.nx = self.img.shape
        self.flat_img = self.img.reshape(-1)
        self.flat_var = self.var.reshape(-1)
        self.flat_msk = self.msk.reshape(-1)
        self.bits = MASK_DTYPE(int(excluded_planes))
        self.bkg = np.float32(0.0)

    def excluded(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        return (self.flat_msk[idx] & self.bits) != 0

    def above(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
        return self.flat_img[idx] - self.bkg

    def interior(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Pixels with all 8 neighbours on the frame."""
        y, x = np.divmod(idx, self.nx)
        return (y > 0) & (y < self.ny - 1) & (x > 0) & (x < self.nx - 1)


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
    px = _Pixels(image, variance, mask, config.excluded_planes)
    # One background level, as Rubin does: the image is normally background-subtracted.
    sample = px.img[::7, ::7][(px.msk[::7, ::7] & px.bits) == 0]
    px.bkg = np.float32(np.median(sample)) if sample.size else np.float32(0.0)

    cr = np.zeros((px.ny, px.nx), dtype=bool)
    ratios, mean8 = _psf_ratios(psf_sigma_pix)
    cand = _candidates(px, config.min_sigma)
    cand = cand[~px.excluded(cand)]
    # Cheap necessary condition first (image values only): the full test implies
    # sharpness_factor * r_d * I > m_d for some direction; few candidates survive it.
    # Candidates brighter than all 8 neighbours that fail it are star (or galaxy) peaks.
    val = px.above(cand)
    centre = px.flat_img[cand]
    maybe = np.zeros(cand.size, dtype=bool)
    peak = np.ones(cand.size, dtype=bool)
    for (dy, dx), ratio in zip(_DIRECTIONS, ratios, strict=True):
        off = dy * px.nx + dx
        a, b = px.flat_img[cand + off], px.flat_img[cand - off]
        peak &= (a <= centre) & (b <= centre)
        maybe |= np.float32(2.0 * config.sharpness_factor * ratio) * val > (a + b) - np.float32(2.0) * px.bkg
    grow_factor = _grow_factor(px, cand[peak & ~maybe], ratios, config)
    cand = cand[maybe]
    is_cr = _sharp(px, cand, None, ratios, config.sharpness_factor, config.noise_factor)
    found = cand[is_cr]
    cr.reshape(-1)[found] = True
    if found.size:
        found = _grow(px, cr, found, ratios, mean8, grow_factor, config)

    n_pixels = int(found.size)
    if n_pixels > config.max_cr_pixels:
        raise StepFailedError(
            f"{n_pixels} cosmic-ray pixels exceed max_cr_pixels={config.max_cr_pixels}; "
            "the PSF width is probably far too large or the frame is broken",
            metadata={"n_cr_pixels": n_pixels, "max_cr_pixels": config.max_cr_pixels,
                      "psf_sigma_pix": float(psf_sigma_pix)},
        )
    n_groups = _count_groups(found, px.nx) if n_pixels else 0
    return CosmicRayResult(cr, n_groups, n_pixels)


def _candidates(px: _Pixels, min_sigma: float) -> npt.NDArray[np.intp]:
    """Flat indices of interior pixels more than ``min_sigma`` sigma above the background."""
    thr2 = np.float32(min_sigma**2)
    out = []
    for y0 in range(1, px.ny - 1, _BLOCK_ROWS):
        y1 = min(y0 + _BLOCK_ROWS, px.ny - 1)
        a = px.img[y0:y1] - px.bkg
        ok = a > 0
        np.multiply(a, a, out=a)
        ok &= a > px.var[y0:y1] * thr2
        ok[:, 0] = ok[:, -1] = False
        out.append(np.flatnonzero(ok) + y0 * px.nx)
    return np.concatenate(out) if out else np.zeros(0, np.intp)


def _grow_factor(px: _Pixels, peaks: npt.NDArray[np.intp], ratios: npt.NDArray[np.float64],
                 config: CosmicRayConfig) -> float:
    """Sharpness factor for growth, capped by how sharp bright stars on the frame are.

    ``q = min_d m_d / (r_d I)`` at a star peak is about 1 when the PSF width is right, lower
    when it is overestimated or the PSF core is sharper than a Gaussian (undersampled
    Kolmogorov); the growth test flags a peak only if ``q < grow_sharpness_factor``.
    """
    val = px.above(peaks)
    bright = val * val > np.float32(_STAR_PEAK_SNR**2) * px.flat_var[peaks]
    peaks, val = peaks[bright], val[bright]
    q = np.full(peaks.size, np.inf, dtype=np.float32)
    clean = np.ones(peaks.size, dtype=bool)
    for (dy, dx), ratio in zip(_DIRECTIONS, ratios, strict=True):
        off = dy * px.nx + dx
        clean &= ~(px.excluded(peaks + off) | px.excluded(peaks - off))
        m = 0.5 * (px.above(peaks + off) + px.above(peaks - off))
        np.minimum(q, m / (np.float32(ratio) * val), out=q)
    q = q[clean]
    if q.size < _MIN_STAR_PEAKS:
        # Too few stars to vouch for the milder test: grow with the strict factor only.
        return config.sharpness_factor
    # The median is robust to hits on star wings (which are peaks too, but sharp); the spread of q
    # over sub-pixel star positions and noise is inside the margin.
    cap = config.grow_star_margin * float(np.median(q))
    return float(np.clip(cap, config.sharpness_factor, config.grow_sharpness_factor))


def _sharp(px: _Pixels, idx: npt.NDArray[np.intp], cr: npt.NDArray[np.bool_] | None,
           ratios: npt.NDArray[np.float64], factor: float, noise_factor: float) -> npt.NDArray[np.bool_]:
    """The sharpness test at ``idx``; directions through excluded (or ``cr``) pixels are not used."""
    val = px.above(idx)
    sig = np.sqrt(np.maximum(px.flat_var[idx], 0.0))
    out = np.zeros(idx.size, dtype=bool)
    for (dy, dx), ratio in zip(_DIRECTIONS, ratios, strict=True):
        off = dy * px.nx + dx
        ia, ib = idx + off, idx - off
        usable = ~(px.excluded(ia) | px.excluded(ib))
        if cr is not None:
            usable &= ~(cr[ia] | cr[ib])
        m = 0.5 * (px.above(ia) + px.above(ib))
        sm = 0.5 * np.sqrt(np.maximum(px.flat_var[ia] + px.flat_var[ib], 0.0))
        out |= usable & (np.float32(factor * ratio) * (val - np.float32(noise_factor) * sig)
                         > m + np.float32(noise_factor) * sm)
    return out


def _grow(px: _Pixels, cr: npt.NDArray[np.bool_], found: npt.NDArray[np.intp], ratios: npt.NDArray[np.float64],
          mean8: float, grow_factor: float, config: CosmicRayConfig) -> npt.NDArray[np.intp]:
    """Grow ``cr`` in place (a private array) from ``found``; return all cosmic-ray flat indices."""
    flat_cr = cr.reshape(-1)
    offsets = np.array([dy * px.nx + dx for dy, dx in _NEIGHBOURS_8])
    front = found  # candidates, hence growth, are interior pixels: every neighbour exists
    added = [found]
    thr2 = np.float32(config.grow_sigma**2)
    for _ in range(config.n_grow_iterations):
        if front.size == 0:
            break
        nb = np.unique((front[:, None] + offsets[None, :]).ravel())
        nb = nb[px.interior(nb)]
        nb = nb[~flat_cr[nb] & ~px.excluded(nb)]
        val = px.above(nb)
        nb = nb[(val > 0) & (val * val > thr2 * px.flat_var[nb])]
        val = px.above(nb)
        # Mean of the neighbours that are not cosmic rays: a source pixel has bright neighbours.
        s = np.zeros(nb.size, dtype=np.float32)
        n = np.zeros(nb.size, dtype=np.float32)
        for off in offsets:
            q = nb + off
            ok = ~flat_cr[q] & ~px.excluded(q)
            s += np.where(ok, px.above(q), np.float32(0.0))
            n += ok
        add = s <= np.float32(config.grow_source_fraction * mean8) * val * np.maximum(n, 1)
        # Source-like pixels join only if sharp along a direction free of cosmic rays: a track
        # crossing a star; the star core itself is not sharp.
        rest = ~add
        if rest.any():
            add[rest] = _sharp(px, nb[rest], flat_cr, ratios, grow_factor, config.noise_factor)
        front = nb[add]
        flat_cr[front] = True
        added.append(front)
    return np.concatenate(added)


def _count_groups(idx: npt.NDArray[np.intp], nx: int) -> int:
    """Number of 8-connected groups among the flat indices ``idx`` (each index once)."""
    order = np.sort(idx)
    n = order.size
    rows, cols = [], []
    x = order % nx
    # Forward neighbours only (right, and the three below); each link is found once.
    for off, dx in ((1, 1), (nx - 1, -1), (nx, 0), (nx + 1, 1)):
        target = order + off
        pos = np.minimum(np.searchsorted(order, target), n - 1)
        hit = (order[pos] == target) & (x + dx >= 0) & (x + dx < nx)
        rows.append(np.flatnonzero(hit))
        cols.append(pos[hit])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sparse.coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(n, n))
    n_groups, _ = csgraph.connected_components(graph, directed=False)
    return int(n_groups)


def repair_cosmic_rays(
    exposure: Exposure,
    *,
    psf_sigma_pix: float,
    config: CosmicRayConfig = CosmicRayConfig(),
    interpolate: bool = False,
    interpolation: InterpolationConfig = _DEFAULT_INTERPOLATION,
    overwrite_mask: bool = False,
    overwrite_image: bool = False,
) -> RepairResult:
    """Set the ``CR`` plane of a new exposure and, if ``interpolate``, fill those pixels.

    Cosmic rays already in the ``CR`` plane are kept (and interpolated too).
    Metadata ``cosmic_ray_count`` records the number found in this call. With
    ``overwrite_mask`` (``overwrite_image``, with ``interpolate``) the mask (image) of
    ``exposure`` is modified in place where it is a writable C-contiguous array of the
    exposure's dtype, and shared by the result (numpy's ``overwrite_input``: for a caller that
    owns the frame, it saves a 64 MB copy on a 4k x 4k detector); ``exposure`` must not be
    used after.
    """
    found = find_cosmic_rays(exposure.image, exposure.variance, exposure.mask,
                             psf_sigma_pix=psf_sigma_pix, config=config)
    mask = exposure.mask if overwrite_mask and writable_in_place(exposure.mask, MASK_DTYPE) else \
        np.array(exposure.mask, dtype=MASK_DTYPE, order="C", copy=True)
    mask.reshape(-1)[np.flatnonzero(found.cr_mask)] |= MASK_DTYPE(int(MaskPlane.CR))
    image = exposure.image
    if interpolate:
        interpolation.validate()
        # The CR plane is read back from the mask: earlier cosmic rays are filled too.
        if not (overwrite_image and writable_in_place(image, np.float32)):
            image = np.array(image, dtype=np.float32, order="C", copy=True)
        _fill_masked(image, mask, planes=MaskPlane.CR, psf_sigma_pix=psf_sigma_pix, config=interpolation)
    new = exposure.replace(image=image, mask=mask).with_metadata(cosmic_ray_count=found.n_cosmic_rays)
    return RepairResult(new, found.n_cosmic_rays, found.n_pixels)
