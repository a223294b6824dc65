"""A starting Gaussian PSF measured from the data (Rubin installs a fixed 4 px FWHM).

Bright, isolated, unsaturated local maxima are found directly in the
background-subtracted image; each gets adaptive (Gaussian-weighted) second
moments, computed for all stamps at once. Stars form the tightest cluster
of sizes at the small end: cosmic rays are sharper (and rejected by a minimum
size and an ellipticity cut), galaxies and blends are larger. The size is the
densest peak of the distribution of log sizes, refined by a clipped median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, PsfFitError
from ..masks import MASK_DTYPE, MaskPlane
from ..psf import GaussianPsf, adaptive_moments
from .detection import is_local_maximum

#: Adaptive-moment iterations and tolerance (relative size / px); a few iterations suffice for stars.
_MAX_ITERATIONS = 40
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class InitialPsfConfig:
    """Configuration of :func:`estimate_initial_psf`."""

    #: Minimum S/N of the peak pixel of a candidate.
    min_peak_snr: float = 30.0
    #: At most this many (brightest) candidates are measured.
    max_candidates: int = 400
    #: Half-size of the measurement stamp (pixels); fits FWHM up to ~15 px.
    stamp_half_size_pix: int = 20
    #: No brighter-or-equal peak and no masked pixel within this radius (pixels).
    isolation_radius_pix: float = 12.0
    #: Sizes below this sigma (pixels, pixel-corrected) are cosmic rays or hot pixels.
    min_sigma_pix: float = 0.6
    #: Sizes above this sigma (pixels) are ignored.
    max_sigma_pix: float = 8.0
    #: Adaptive-moment candidates more elongated than this are rejected (tracks, blends).
    max_ellipticity: float = 0.3
    #: Fewer usable stars than this raises :class:`~singleframe.errors.PsfFitError`.
    min_stars: int = 5
    #: Half-width (in ln sigma) of the cluster around the densest size.
    cluster_half_width: float = 0.12
    #: Wide PSFs: a star's peak-pixel S/N falls as 1/sigma^2, so a 2.5" seeing frame has few peaks above
    #: ``min_peak_snr``. If the first search fails, candidates are searched again on the image smoothed by
    #: a box of this side (pixels; S/N of the box mean), which gains ~box x in S/N for wide PSFs. 1 disables.
    wide_psf_box_pix: int = 5
    #: Mask planes that make a candidate unusable when set near it.
    bad_planes: MaskPlane = MaskPlane.SAT | MaskPlane.BAD | MaskPlane.NO_DATA | MaskPlane.CR | MaskPlane.EDGE

    def validate(self) -> None:
        if not self.min_peak_snr > 0:
            raise ConfigError("initial_psf.min_peak_snr must be > 0")
        if self.max_candidates < 1 or self.min_stars < 1:
            raise ConfigError("initial_psf.max_candidates and min_stars must be >= 1")
        if self.stamp_half_size_pix < 4:
            raise ConfigError("initial_psf.stamp_half_size_pix must be >= 4")
        if not 0 < self.min_sigma_pix < self.max_sigma_pix:
            raise ConfigError("initial_psf needs 0 < min_sigma_pix < max_sigma_pix")
        if not 0 < self.max_ellipticity < 1:
            raise ConfigError("initial_psf.max_ellipticity must be in (0, 1)")
        if self.wide_psf_box_pix < 1 or self.wide_psf_box_pix % 2 == 0:
            raise ConfigError("initial_psf.wide_psf_box_pix must be an odd integer >= 1")
        if not self.cluster_half_width > 0:
            raise ConfigError("initial_psf.cluster_half_width must be > 0")


@dataclass(frozen=True, eq=False)
class InitialPsfResult:
    """Result of :func:`estimate_initial_psf`."""

    sigma_pix: float  #: Gaussian sigma of the PSF (pixels), corrected for pixelisation
    n_stars: int  #: stars in the size cluster
    psf: GaussianPsf
    n_candidates: int = 0  #: peaks measured
    sizes_pix: npt.NDArray[np.float64] | None = None  #: measured sigma of every candidate (NaN = failed)


def estimate_initial_psf(
    image: npt.NDArray[np.floating],
    variance: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    *,
    config: InitialPsfConfig = InitialPsfConfig(),
    origin: tuple[int, int] = (0, 0),
) -> InitialPsfResult:
    """Measure the PSF width of a background-subtracted image from its bright stars.

    Parameters
    ----------
    image, variance, mask
        Pixel arrays (``[y, x]``), background subtracted.
    config
        Candidate selection and clustering.
    origin
        Parent coordinates of ``image[0, 0]`` (kept for the interface; the size is position-free).

    Returns
    -------
    InitialPsfResult

    Raises
    ------
    PsfFitError
        Fewer than ``min_stars`` star-like candidates, also after the wide-PSF
        (box-smoothed) search; ``metadata`` holds the counts of the last search.
    """
    config.validate()
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    msk = np.asarray(mask)
    bits = MASK_DTYPE(int(config.bad_planes))
    try:
        return _estimate(img, var, msk, bits, img, var, config)
    except PsfFitError:
        if config.wide_psf_box_pix == 1:
            raise
    # Second search for wide PSFs on box means (S/N of the mean: variance / box² for independent pixels).
    from scipy import ndimage

    b = config.wide_psf_box_pix
    bad = (msk & bits) != 0
    img_s = ndimage.uniform_filter(np.where(bad, 0.0, img).astype(np.float32), size=b, mode="constant")
    var_s = ndimage.uniform_filter(var, size=b, mode="constant") / np.float32(b * b)
    return _estimate(img, var, msk, bits, img_s, var_s, config)


def _estimate(img: npt.NDArray[np.float32], var: npt.NDArray[np.float32], mask: npt.NDArray[np.integer],
              bad_bits: np.unsignedinteger, det_img: npt.NDArray[np.float32], det_var: npt.NDArray[np.float32],
              config: InitialPsfConfig) -> InitialPsfResult:
    """One search: peaks of ``det_img`` (S/N against ``det_var``), moments on the raw ``img``."""
    h = config.stamp_half_size_pix
    ny, nx = det_img.shape

    # Candidates: bright pixels that are strict local maxima of their 3x3 neighbourhood.
    # A positive pixel passes the S/N cut only if it exceeds sqrt(k min(var)), so one comparison
    # over the image picks a small superset and the exact cut runs on that subset only.
    k = np.float32(config.min_peak_snr**2)
    v_min = float(np.min(det_var)) if det_var.size else 0.0
    floor = math.sqrt(float(k) * max(v_min, 0.0)) * (1.0 - 1e-6) if math.isfinite(v_min) else 0.0
    ys, xs = np.divmod(np.flatnonzero(det_img > np.float32(floor)), det_img.shape[1])  # 2x np.nonzero's speed
    inner = (ys >= h) & (ys < ny - h) & (xs >= h) & (xs < nx - h)
    ys, xs = ys[inner], xs[inner]
    v = det_img[ys, xs]
    keep = (v > 0) & (v * v > k * det_var[ys, xs]) & ((mask[ys, xs] & bad_bits) == 0)
    ys, xs = ys[keep], xs[keep]
    meta = {"n_peaks": 0, "n_candidates": 0, "n_measured": 0, "n_stars": 0, "min_stars": config.min_stars}
    if ys.size:
        is_max = is_local_maximum(det_img, ys, xs)
        ys, xs = ys[is_max], xs[is_max]
        v = det_img[ys, xs]
    meta["n_peaks"] = int(ys.size)
    if ys.size:
        ys, xs, v = _isolated(ys, xs, v, config.isolation_radius_pix)
        order = np.argsort(v)[::-1][: config.max_candidates]
        ys, xs = ys[order], xs[order]
    meta["n_candidates"] = int(ys.size)
    if ys.size < config.min_stars:
        # Many peaks but few isolated ones: each source has several maxima (a donut's ring) or the field is crowded.
        why = ("the frame has too few bright stars for an initial PSF" if meta["n_peaks"] < 2 * config.min_stars else
               f"{meta['n_peaks']} peaks lie within {config.isolation_radius_pix:g} px of each other: sources with "
               "several maxima (donut / defocused or trailed PSF) or a very crowded field")
        raise PsfFitError(
            f"only {ys.size} isolated unsaturated peaks with S/N >= {config.min_peak_snr} "
            f"(need {config.min_stars}); {why}",
            metadata=meta,
        )

    offs = np.arange(-h, h + 1)
    sy = ys[:, None, None] + offs[None, :, None]
    sx = xs[:, None, None] + offs[None, None, :]
    stamp_bad = (mask[sy, sx] & bad_bits) != 0
    # A masked pixel within the isolation radius spoils the moments.
    rr = offs[:, None] ** 2 + offs[None, :] ** 2
    near = rr <= config.isolation_radius_pix**2
    clean = ~np.any(stamp_bad & near[None], axis=(1, 2))
    stamps = np.where(stamp_bad, np.float32(0), img[sy, sx])
    sigma, e = _adaptive_sigma(stamps)
    good = clean & np.isfinite(sigma) & (e <= config.max_ellipticity)
    # The moments of a pixel-integrated profile include the pixel's own 1/12 px^2.
    sigma_c = np.sqrt(np.maximum(sigma * sigma - 1.0 / 12.0, 1e-6))
    good &= (sigma_c >= config.min_sigma_pix) & (sigma_c <= config.max_sigma_pix)
    meta["n_measured"] = int(good.sum())
    if good.sum() < config.min_stars:
        raise PsfFitError(
            f"only {int(good.sum())} of {ys.size} candidates have clean, round, star-like moments "
            f"(need {config.min_stars}); cannot estimate an initial PSF",
            metadata=meta,
        )
    best, n_stars = _densest_size(np.log(sigma_c[good]), config.cluster_half_width)
    meta["n_stars"] = n_stars
    if n_stars < config.min_stars:
        raise PsfFitError(
            f"the tightest size cluster holds {n_stars} stars (need {config.min_stars}); "
            "the size distribution has no clear stellar locus",
            metadata=meta,
        )
    s = float(math.exp(best))
    sizes = np.where(good, sigma_c, np.nan)
    return InitialPsfResult(s, int(n_stars), GaussianPsf(s), int(ys.size), sizes)


def _isolated(ys: npt.NDArray[np.intp], xs: npt.NDArray[np.intp], v: npt.NDArray[np.float32],
              radius: float) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Keep peaks with no other candidate peak within ``radius`` (k-d tree, no O(n^2) matrix)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([xs, ys]).astype(float))
    counts = np.array([len(n) for n in tree.query_ball_point(tree.data, r=radius)])
    keep = counts == 1
    return ys[keep], xs[keep], v[keep]


def _adaptive_sigma(stamps: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Adaptive moments of all stamps at once: sigma (px, incl. pixel) and ellipticity.

    The shared HSM-style iteration (:func:`singleframe.psf.adaptive_moments`) starts from
    sigma = sqrt(2) px at the stamp centre; its deconvolution update reaches the fixed point
    (weighted moments = half the weight's) in a few steps instead of ~30 plain ``2 Mw`` steps.
    """
    am = adaptive_moments(stamps, sigma_guess_pix=math.sqrt(2.0), max_iterations=_MAX_ITERATIONS,
                          tolerance=_TOLERANCE)
    det = am.xx * am.yy - am.xy * am.xy
    ok = am.converged & np.isfinite(det) & (det > 0) & np.isfinite(am.flux) & (am.flux > 0)
    # Centres further than 2 px from the peak are not the peak's source (a brighter neighbour's wing).
    ok &= (np.abs(am.x) <= 2.0) & (np.abs(am.y) <= 2.0)
    sigma = np.where(ok, np.where(ok, det, 1.0) ** 0.25, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.hypot(am.xx - am.yy, 2 * am.xy) / (am.xx + am.yy)
    return sigma, np.where(ok, e, np.nan)


def _densest_size(log_sigma: npt.NDArray[np.float64], half_width: float) -> tuple[float, int]:
    """Centre of the smallest-size dense cluster of ``log_sigma`` and its population."""
    srt = np.sort(log_sigma)
    # Count neighbours within +-half_width of each value (sorted, so two searchsorted calls).
    lo = np.searchsorted(srt, srt - half_width, side="left")
    hi = np.searchsorted(srt, srt + half_width, side="right")
    counts = hi - lo
    # Stars are the smallest tight cluster: the first value whose density is at least half
    # of the maximum (galaxies can outnumber stars but are spread over many sizes).
    first = int(np.argmax(counts >= 0.5 * counts.max()))
    # Move to the local density peak near it.
    j = first
    while j + 1 < len(srt) and counts[j + 1] >= counts[j] and srt[j + 1] - srt[first] < half_width:
        j += 1
    members = srt[lo[j]: hi[j]]
    centre = float(np.median(members))
    for _ in range(3):
        members = srt[np.abs(srt - centre) <= half_width]
        centre = float(np.median(members))
    return centre, int(members.size)
