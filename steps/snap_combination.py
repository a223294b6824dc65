"""Combine the snaps of one visit: sum, after repairing cosmic rays that hit one snap only.

Two snaps of a visit see the same sky through (nearly) the same PSF, so the
scaled difference ``d = a - b * t_a / t_b`` is noise except where a cosmic
ray hit one of them. A pixel is such a hit when ``|d| > k sigma_d`` and it is
sharp in the difference: it also exceeds the median of its 8 neighbours'
differences by ``k sigma_d`` (a cosmic-ray track keeps most neighbours quiet,
while a star's Poisson or seeing residual is PSF-wide, so its neighbours
follow it). The hit snap's pixel is replaced by the other snap's value scaled
by the exposure-time ratio before the sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, SnapCombineError
from ..exposure import Exposure
from ..masks import MASK_DTYPE, MaskPlane

_NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class SnapCombineConfig:
    """Configuration of :func:`combine_snaps`."""

    #: Repair cosmic rays found in the snap difference before summing.
    repair_cosmic_rays: bool = True
    #: A hit exceeds the scaled difference noise by this many sigma ...
    difference_sigma: float = 5.0
    #: ... and the median of its neighbours' differences by this many sigma (sharpness).
    sharpness_sigma: float = 4.0
    #: Neighbours of hits above this many sigma in the difference join them (one pass).
    grow_sigma: float = 2.5

    def validate(self) -> None:
        if not (self.difference_sigma > 0 and self.sharpness_sigma > 0 and self.grow_sigma > 0):
            raise ConfigError("snap_combine.difference_sigma, sharpness_sigma and grow_sigma must be > 0")


@dataclass(frozen=True, eq=False)
class SnapCombineResult:
    """Result of :func:`combine_snaps`."""

    exposure: Exposure
    n_snaps: int
    n_cr_pixels_from_difference: int


def _check(snaps: Sequence[Exposure]) -> None:
    a, b = snaps
    problems = []
    if a.shape != b.shape:
        problems.append(f"shape {a.shape} vs {b.shape}")
    if a.origin != b.origin:
        problems.append(f"origin {a.origin} vs {b.origin}")
    if a.visit_info.band != b.visit_info.band:
        problems.append(f"band {a.visit_info.band!r} vs {b.visit_info.band!r}")
    if a.visit_info.visit != b.visit_info.visit:
        problems.append(f"visit {a.visit_info.visit} vs {b.visit_info.visit}")
    if a.detector.id != b.detector.id:
        problems.append(f"detector {a.detector.id} vs {b.detector.id}")
    if not (a.visit_info.exposure_time_s > 0 and b.visit_info.exposure_time_s > 0):
        problems.append(f"exposure times {a.visit_info.exposure_time_s} and {b.visit_info.exposure_time_s} "
                        "must be positive")
    if problems:
        raise SnapCombineError(
            f"snap 0 (visit {a.visit_info.visit}) and snap 1 (visit {b.visit_info.visit}) cannot be combined: "
            + "; ".join(problems) + ". Pass snaps of one visit and detector, or a single snap.",
            metadata={"mismatch": "; ".join(problems)},
        )


def combine_snaps(snaps: Sequence[Exposure], *, config: SnapCombineConfig = SnapCombineConfig()) -> SnapCombineResult:
    """Combine one or two snaps into the visit exposure.

    Parameters
    ----------
    snaps
        One exposure (returned unchanged) or two snaps of the same visit.
    config
        Cosmic-ray thresholds on the snap difference.

    Returns
    -------
    SnapCombineResult
        Image and variance summed, masks OR'ed (``CR`` added on repaired
        pixels); visit info of snap 0 with summed exposure time and mean MJD.

    Raises
    ------
    SnapCombineError
        No snaps, more than two, or snaps that differ in shape, origin, band, visit or detector.
    """
    config.validate()
    if len(snaps) == 1:
        return SnapCombineResult(snaps[0], 1, 0)
    if len(snaps) != 2:
        raise SnapCombineError(
            f"got {len(snaps)} snaps; combination supports 1 or 2 snaps per visit. "
            "Split the input or combine the extra snaps first.",
            metadata={"n_snaps": len(snaps)},
        )
    _check(snaps)
    a, b = snaps
    ta, tb = float(a.visit_info.exposure_time_s), float(b.visit_info.exposure_time_s)
    r = ta / tb
    # float32 throughout and pixel-level fixes: 4096² snaps cost ~0.3 GB at the peak instead
    # of ~1.4 GB of float64 temporaries.
    image = np.add(a.image, b.image, dtype=np.float32)
    variance = np.add(a.variance, b.variance, dtype=np.float32)
    mask = np.bitwise_or(a.mask, b.mask, dtype=MASK_DTYPE)
    n_cr = 0
    if config.repair_cosmic_rays:
        ya, xa, yb, xb = _difference_hits(a, b, r, mask, config)
        # A hit snap is replaced by the other one scaled to its exposure time.
        ib, vb = b.image[ya, xa].astype(np.float64), b.variance[ya, xa].astype(np.float64)
        image[ya, xa] = ib * r + ib
        variance[ya, xa] = vb * r * r + vb
        ia, va = a.image[yb, xb].astype(np.float64), a.variance[yb, xb].astype(np.float64)
        image[yb, xb] = ia + ia / r
        variance[yb, xb] = va + va / (r * r)
        mask[ya, xa] |= MASK_DTYPE(int(MaskPlane.CR))
        mask[yb, xb] |= MASK_DTYPE(int(MaskPlane.CR))
        n_cr = int(ya.size + yb.size)
    vi = dataclasses.replace(a.visit_info, exposure_time_s=ta + tb,
                             mjd_tai=0.5 * (a.visit_info.mjd_tai + b.visit_info.mjd_tai))
    combined = a.replace(image=image, variance=variance, mask=mask,
                         visit_info=vi).with_metadata(n_snaps=2, snap_cr_pixels=n_cr)
    return SnapCombineResult(combined, 2, n_cr)


def _difference_hits(a: Exposure, b: Exposure, ratio: float, mask: npt.NDArray[np.integer],
                     config: SnapCombineConfig, block_rows: int = 256) -> tuple[npt.NDArray[np.intp], ...]:
    """Pixels hit in snap a only and in snap b only, as ``(ya, xa, yb, xb)`` index arrays.

    The difference ``a - ratio b`` is formed in blocks of rows (with a one-row halo for the
    neighbour tests), in float32: only candidate pixels are examined further.
    """
    ny, nx = a.shape
    unusable_bits = MASK_DTYPE(int(MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.BAD))
    hit = np.zeros((ny, nx), dtype=bool)
    negative = np.zeros((ny, nx), dtype=bool)
    rf = np.float32(ratio)
    for y0 in range(0, ny, block_rows):
        lo, hi = max(y0 - 1, 0), min(y0 + block_rows + 1, ny)
        d = a.image[lo:hi] - b.image[lo:hi] * rf
        vd = a.variance[lo:hi] + b.variance[lo:hi] * (rf * rf)
        sd = np.sqrt(np.where(vd > 0, vd, np.float32(np.inf)))
        z = d / sd
        unusable = (mask[lo:hi] & unusable_bits) != 0
        cand = (np.abs(z) > config.difference_sigma) & ~unusable
        # Only rows of this block are candidates; the frame's outer pixels never are.
        cand[: y0 - lo] = False
        cand[min(y0 + block_rows, ny) - lo:] = False
        if y0 == 0:
            cand[0] = False
        if hi == ny:
            cand[-1] = False
        cand[:, 0] = cand[:, -1] = False
        ys, xs = np.nonzero(cand)
        if not ys.size:
            continue
        neigh = np.stack([d[ys + dy, xs + dx] for dy, dx in _NEIGHBOURS_8], axis=1)
        sign = np.sign(d[ys, xs])
        excess = sign * (d[ys, xs] - np.median(neigh, axis=1)) / sd[ys, xs]
        sharp = excess > config.sharpness_sigma
        hy, hx, hs = ys[sharp], xs[sharp], sign[sharp]
        hit[hy + lo, hx] = True
        negative[hy + lo, hx] = hs < 0
        # One growth pass into same-sign neighbours above grow_sigma (faint track edges).
        bh = hi - lo
        for dy, dx in _NEIGHBOURS_8:
            gy, gx = np.clip(hy + dy, 0, bh - 1), np.clip(hx + dx, 0, nx - 1)
            grow = (hs * z[gy, gx] > config.grow_sigma) & ~unusable[gy, gx]
            hit[gy[grow] + lo, gx[grow]] = True
            negative[gy[grow] + lo, gx[grow]] = d[gy[grow], gx[grow]] <= 0
    ys, xs = np.divmod(np.flatnonzero(hit), hit.shape[1])  # a third of a 2-D np.nonzero's time
    neg = negative[ys, xs]
    return ys[~neg], xs[~neg], ys[neg], xs[neg]
