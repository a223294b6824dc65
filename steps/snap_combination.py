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
    ia, ib = a.image.astype(np.float64), b.image.astype(np.float64)
    va, vb = a.variance.astype(np.float64), b.variance.astype(np.float64)
    mask = (a.mask | b.mask).astype(MASK_DTYPE)
    n_cr = 0
    if config.repair_cosmic_rays:
        hit_a, hit_b = _difference_hits(ia, ib, va, vb, ta / tb, a.mask | b.mask, config)
        r = ta / tb
        # Replace the hit snap by the other one scaled to its exposure time.
        ia = np.where(hit_a, ib * r, ia)
        va = np.where(hit_a, vb * r * r, va)
        ib = np.where(hit_b, ia / r, ib)
        vb = np.where(hit_b, va / (r * r), vb)
        hit = hit_a | hit_b
        mask |= np.where(hit, MASK_DTYPE(int(MaskPlane.CR)), MASK_DTYPE(0))
        n_cr = int(hit.sum())
    vi = dataclasses.replace(a.visit_info, exposure_time_s=ta + tb,
                             mjd_tai=0.5 * (a.visit_info.mjd_tai + b.visit_info.mjd_tai))
    combined = a.replace(image=(ia + ib).astype(np.float32), variance=(va + vb).astype(np.float32),
                         mask=mask, visit_info=vi).with_metadata(n_snaps=2, snap_cr_pixels=n_cr)
    return SnapCombineResult(combined, 2, n_cr)


def _difference_hits(ia: npt.NDArray[np.float64], ib: npt.NDArray[np.float64], va: npt.NDArray[np.float64],
                     vb: npt.NDArray[np.float64], ratio: float, mask: npt.NDArray[np.integer],
                     config: SnapCombineConfig) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Pixels hit in snap a only and in snap b only."""
    ny, nx = ia.shape
    d = ia - ib * ratio
    vd = va + vb * ratio * ratio
    sd = np.sqrt(np.where(vd > 0, vd, np.inf))
    z = d / sd
    unusable = (np.asarray(mask) & MASK_DTYPE(int(MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.BAD))) != 0
    cand = (np.abs(z) > config.difference_sigma) & ~unusable
    cand[0, :] = cand[-1, :] = False
    cand[:, 0] = cand[:, -1] = False
    ys, xs = np.nonzero(cand)
    hit = np.zeros((ny, nx), dtype=bool)
    if ys.size:
        neigh = np.stack([d[ys + dy, xs + dx] for dy, dx in _NEIGHBOURS_8], axis=1)
        sign = np.sign(d[ys, xs])
        excess = sign * (d[ys, xs] - np.median(neigh, axis=1)) / sd[ys, xs]
        sharp = excess > config.sharpness_sigma
        hit[ys[sharp], xs[sharp]] = True
        # One growth pass into same-sign neighbours above grow_sigma (faint track edges).
        hy, hx = ys[sharp], xs[sharp]
        hs = sign[sharp]
        for dy, dx in _NEIGHBOURS_8:
            gy, gx = np.clip(hy + dy, 0, ny - 1), np.clip(hx + dx, 0, nx - 1)
            grow = (hs * z[gy, gx] > config.grow_sigma) & ~unusable[gy, gx]
            hit[gy[grow], gx[grow]] = True
    positive = d > 0
    return hit & positive, hit & ~positive
