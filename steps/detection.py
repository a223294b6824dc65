"""Source detection: PSF-matched filtering, thresholding, multi-threshold deblending (sep).

The image is divided by a smooth map of the sky noise and correlated with the
PSF (a Gaussian of ``psf_sigma_pix``), so a footprint is the set of pixels
whose filtered S/N is at least ``threshold_snr`` (Rubin's ``pixel_stdev``
threshold on the PSF-smoothed image), 8-connected. Footprints with several
local maxima are split into children by sep's multi-threshold deblending
(``deblend_nthresh`` levels, ``deblend_cont``), one footprint at a time, so a
blend's children do not depend on the rest of the frame (or in one sep call over
the frame: ``deblend_each_footprint``); the others are one child each. Either
way the objects are those of one ``sep.extract`` over the frame. Each
child's peak S/N is then computed with the per-pixel variance, including the
source's own Poisson noise, as ``sum(K I) / sqrt(sum(K^2 V))`` at the filtered
peak; children below ``peak_threshold_snr`` are dropped (their pixels stay in
``DETECTED`` so later background estimates ignore them). Footprints are
grown by ``grow_sigma * psf_sigma_pix`` (Rubin ``nSigmaToGrow``).

With ``max_peaks`` (the PSF pass), a crowded frame whose filtered image has more
local maxima above the peak threshold than the budget gets its peak threshold
raised, before sep runs, to the peak S/N of the budget-th brightest, and its
footprint threshold to ``raised_footprint_fraction`` of that; ``DETECTED`` still
marks every pixel above the configured footprint threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import sep
from astropy.table import Table

from ..errors import ConfigError, StepFailedError
from ..filters import correlate_separable, grow_labels
from ..footprints import Detections
from ..masks import MASK_DTYPE, MaskPlane
from ..psf import GaussianPsf
from ..stamps import Stamps

#: Rows per band of the band-by-band full-frame operations (16 bands of a 4k x 4k frame).
_BAND_ROWS = 256

SOURCE_COLUMNS = ("label", "parent_label", "x_peak", "y_peak", "peak_value", "peak_snr", "npix",
                  "deblend_nChild", "deblend_nPeaks", "x", "y", "sep_flag")


@dataclass(frozen=True)
class DetectionConfig:
    """Configuration of :func:`detect_sources` (Rubin names in brackets)."""

    #: Footprint threshold: per-pixel S/N of the PSF-filtered image [thresholdValue].
    threshold_snr: float = 10.0
    #: Minimum S/N at a child's peak [thresholdValue * includeThresholdMultiplier].
    peak_threshold_snr: float = 50.0
    #: Footprints are grown by this many PSF sigmas [nSigmaToGrow].
    grow_sigma: float = 2.4
    #: Minimum footprint area (pixels) [minPixels].
    min_pixels: int = 1
    #: Number of deblending sub-thresholds (sep ``deblend_nthresh``).
    deblend_nthresh: int = 32
    #: Minimum flux fraction of a child (sep ``deblend_cont``; 1 disables deblending). sep counts
    #: only a branch's flux above its splitting level, so a S/N 15 star 14 px from a 50x brighter
    #: one holds < 0.5 % and SExtractor's 0.005 merges it (~1 % of S/N >= 10 stars on the demo
    #: detectors); 1e-4 separates them (0.001 most of them) at no measurable cost (sep time
    #: unchanged; +0.3 % peaks; PSF size and WCS unchanged on the demo detectors).
    deblend_cont: float = 0.0001
    #: Deblend each footprint with several maxima on its own cut-out (:func:`_extract`) instead of
    #: in one sep call over the frame: the same objects, 0.5 s faster on the crowded 4096² frame's
    #: star pass. sep hands a blend's low pixels to its children at random, from a generator
    #: reseeded per call, so the two ways assign ~1 % of the blends' pixels differently.
    deblend_each_footprint: bool = True
    #: Pixels in these planes are excluded from detection.
    excluded_planes: MaskPlane = MaskPlane.BAD | MaskPlane.NO_DATA
    #: Bin size (pixels) of the smooth sky-noise map.
    noise_bin_size_pix: int = 128
    #: Smallest initial sep pixel stack of a blend's cut-out: each starts at four times its
    #: footprint's pixels or this, whichever is larger (a call over the frame at 1 000 000 or
    #: this), and is multiplied by 4 and retried when full, up to ``max_pixstack`` (sep clears
    #: its stack on every call: ~20 ns per entry).
    pixstack: int = 1_000
    max_pixstack: int = 64_000_000
    #: sep limit on sub-objects during deblending.
    sub_object_limit: int = 20_000
    #: Budget of kept peaks (``None``: no budget). When more local maxima of the filtered image
    #: than this reach ``peak_threshold_snr``, the peak threshold is raised, before sep runs, so
    #: that about this many (the brightest) are kept, as Rubin's adaptive PSF-pass detection does
    #: (``maxNumPeakPerBand``, 3000 in u, g, r, y and 5000 in i, z per detector). The thresholds
    #: used are in :class:`~singleframe.footprints.Detections`.
    max_peaks: int | None = None
    #: When ``max_peaks`` raises the peak threshold, footprints are cut at this fraction of it (at
    #: least ``threshold_snr``; 1 as Rubin, which folds the multiplier into the raised threshold:
    #: sep's time goes with its number of objects); DETECTED still marks every pixel above
    #: ``threshold_snr``.
    raised_footprint_fraction: float = 1.0

    def validate(self) -> None:
        if not self.threshold_snr > 0:
            raise ConfigError("detection.threshold_snr must be > 0")
        if self.peak_threshold_snr < self.threshold_snr:
            raise ConfigError(
                f"detection.peak_threshold_snr ({self.peak_threshold_snr}) must be >= threshold_snr "
                f"({self.threshold_snr})"
            )
        if self.grow_sigma < 0:
            raise ConfigError("detection.grow_sigma must be >= 0")
        if self.min_pixels < 1:
            raise ConfigError("detection.min_pixels must be >= 1")
        if self.deblend_nthresh < 1 or not 0 <= self.deblend_cont <= 1:
            raise ConfigError("detection.deblend_nthresh must be >= 1 and deblend_cont in [0, 1]")
        if self.noise_bin_size_pix < 8:
            raise ConfigError("detection.noise_bin_size_pix must be >= 8")
        if self.pixstack < 1000 or self.max_pixstack < self.pixstack or self.sub_object_limit < 100:
            raise ConfigError("detection needs 1000 <= pixstack <= max_pixstack and sub_object_limit >= 100")
        if self.max_peaks is not None and not self.max_peaks >= 1:
            raise ConfigError(f"detection.max_peaks must be >= 1 or None (no budget), got {self.max_peaks}")
        if not 0 < self.raised_footprint_fraction <= 1:
            raise ConfigError("detection.raised_footprint_fraction must be in (0, 1], got "
                              f"{self.raised_footprint_fraction}")


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Result of :func:`detect_sources`."""

    detections: Detections
    mask: npt.NDArray[np.uint32]  #: input mask with ``DETECTED`` set on every grown footprint
    n_footprints: int  #: parent footprints holding at least one kept source
    n_peaks: int  #: kept sources (children and isolated)


def _empty_sources() -> Table:
    t = Table()
    for name in SOURCE_COLUMNS:
        dtype = np.int64 if name in ("label", "parent_label", "npix", "deblend_nChild", "deblend_nPeaks",
                                     "sep_flag") else np.float64
        t[name] = np.zeros(0, dtype=dtype)
    return t


def _sky_sigma_blocks(variance: npt.NDArray[np.float32], excluded: npt.NDArray[np.bool_],
                      bin_size: int) -> npt.NDArray[np.float32]:
    """Binned-median sky noise sigma, one value per ``bin_size`` square (block-constant map).

    Each block is sampled every ``step`` pixels, ``step`` the largest divisor of ``bin_size`` up to
    ``bin_size // 16``: the samples of a block are then exactly its ``bin_size`` pixels (as
    :func:`_snr_image` spreads the values), whatever ``bin_size`` is.
    """
    step = max(d for d in range(1, max(1, bin_size // 16) + 1) if bin_size % d == 0)
    sub = np.where(excluded[::step, ::step] | ~(variance[::step, ::step] > 0), np.nan,
                   variance[::step, ::step]).astype(np.float32)
    per = bin_size // step
    nby, nbx = math.ceil(sub.shape[0] / per), math.ceil(sub.shape[1] / per)
    padded = np.full((nby * per, nbx * per), np.nan, dtype=np.float32)
    padded[: sub.shape[0], : sub.shape[1]] = sub
    blocks = padded.reshape(nby, per, nbx, per).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    finite = np.isfinite(blocks).any(axis=2)
    med = np.full((nby, nbx), np.nan, dtype=np.float32)
    if finite.any():
        med[finite] = np.nanmedian(blocks[finite], axis=1)
    good_all = sub[np.isfinite(sub)]
    fill = np.float32(np.median(good_all)) if good_all.size else np.float32(1.0)
    return np.sqrt(np.where(np.isfinite(med), med, fill)).astype(np.float32)


def _snr_image(img: npt.NDArray[np.float32], excluded: npt.NDArray[np.bool_],
               sigma_blocks: npt.NDArray[np.float32], bin_size: int) -> npt.NDArray[np.float32]:
    """``img / sky sigma`` (excluded pixels 0), one band of blocks at a time: no full-size sigma map."""
    ny, nx = img.shape
    out = np.empty((ny, nx), np.float32)
    for by in range(sigma_blocks.shape[0]):
        rows = slice(by * bin_size, min((by + 1) * bin_size, ny))
        sig = np.repeat(sigma_blocks[by], bin_size)[:nx]
        np.divide(img[rows], sig[None, :], out=out[rows])
    out[excluded] = 0.0
    return out


def smoothing_kernel(psf_sigma_pix: float) -> npt.NDArray[np.float64]:
    """The detection filter: a unit-sum Gaussian of the PSF sigma on Rubin's odd width ``int(7 sigma + 0.5)``."""
    half = int(7 * psf_sigma_pix + 0.5) // 2
    return np.asarray(GaussianPsf(psf_sigma_pix).image(0.0, 0.0, size=2 * max(half, 1) + 1), np.float64)


def detect_sources(
    image: npt.NDArray[np.floating],
    variance: npt.NDArray[np.floating],
    mask: npt.NDArray[np.integer],
    *,
    psf_sigma_pix: float,
    config: DetectionConfig = DetectionConfig(),
    origin: tuple[int, int] = (0, 0),
) -> DetectionResult:
    """Detect and deblend sources on a background-subtracted image.

    Parameters
    ----------
    image, variance, mask
        Pixel arrays (``[y, x]``); not modified.
    psf_sigma_pix
        Gaussian sigma of the PSF (pixels); sets the matched filter and the growth.
    config
        Thresholds, growth and deblending.
    origin
        Parent coordinates of ``image[0, 0]``; added to every position.

    Returns
    -------
    DetectionResult
        No sources is a valid, empty result.

    Raises
    ------
    ConfigError
        Invalid config or PSF width.
    StepFailedError
        sep ran out of its pixel stack or object limit (raise ``pixstack``).
    """
    config.validate()
    if not (psf_sigma_pix > 0 and math.isfinite(psf_sigma_pix)):
        raise ConfigError(f"psf_sigma_pix must be positive and finite, got {psf_sigma_pix}")
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    msk = np.asarray(mask, dtype=MASK_DTYPE)
    ny, nx = img.shape
    # Band by band, here and for DETECTED below: full-frame ``msk & bits`` and ``labels > 0`` are
    # 64 + 16 MB temporaries on a 4k x 4k frame, each page-faulted in afresh.
    bands = [slice(y0, y0 + _BAND_ROWS) for y0 in range(0, ny, _BAND_ROWS)]
    excluded = np.empty((ny, nx), bool)
    excluded_bits = MASK_DTYPE(int(config.excluded_planes))
    for rows in bands:
        np.not_equal(msk[rows] & excluded_bits, 0, out=excluded[rows])
        excluded[rows] |= ~np.isfinite(img[rows])

    kernel = smoothing_kernel(psf_sigma_pix).astype(np.float32)
    k_norm = float(np.sqrt(np.sum(kernel.astype(np.float64) ** 2)))
    data = _snr_image(img, excluded, _sky_sigma_blocks(var, excluded, config.noise_bin_size_pix),
                      config.noise_bin_size_pix)

    # The Gaussian kernel is separable: two 1-D passes (OpenCV, ~35 ms on 4096²) instead of
    # sep's direct 2-D convolution (~0.4 s); sep then thresholds and deblends the filtered image
    # unchanged (same footprints and barycentres to float precision).
    filtered = correlate_separable(data, kernel.sum(axis=1), kernel.sum(axis=0), out=data)
    del data
    threshold_snr, peak_threshold_snr = float(config.threshold_snr), float(config.peak_threshold_snr)
    if config.max_peaks is not None:
        bright = _bright_peak_snr(filtered, img, var, excluded, kernel, k_norm, peak_threshold_snr)
        if bright.size > config.max_peaks:
            # The footprint threshold rises with the peaks its footprints must hold.
            factor = float(np.partition(bright, bright.size - config.max_peaks)[bright.size - config.max_peaks]) \
                / peak_threshold_snr
            peak_threshold_snr *= factor
            threshold_snr = max(threshold_snr, config.raised_footprint_fraction * peak_threshold_snr)
    # With raised thresholds, DETECTED still marks every pixel above the configured one (sep's
    # footprints with min_pixels 1 are exactly its connected pixels), so later background
    # estimates mask as much.
    detected_px = None
    if threshold_snr > config.threshold_snr:
        detected_px = np.empty((ny, nx), np.uint8)
        thr = np.float32(config.threshold_snr * k_norm)
        for rows in bands:
            np.greater_equal(filtered[rows], thr, out=detected_px[rows], casting="unsafe")
            detected_px[rows] &= ~excluded[rows]
    if config.deblend_each_footprint:
        objects, seg = _extract(filtered, threshold_snr * k_norm, excluded, config)
    else:
        objects, seg = _extract_frame(filtered, threshold_snr * k_norm, excluded, config)
    del filtered
    grow = int(round(0.886 * int(config.grow_sigma * psf_sigma_pix + 0.5)))  # square of the disk's area
    if detected_px is not None and grow > 0:
        detected_px = grow_labels(detected_px, grow, 1)
    if len(objects) == 0:
        if detected_px is None:
            out_mask = msk.copy()  # no footprint: nothing is DETECTED
        else:  # but the pixels above the configured threshold, which the budget raised, are
            out_mask = np.empty_like(msk)
            _set_detected(out_mask, msk, detected_px, bands)
        dets = Detections(np.zeros((ny, nx), np.int32), _empty_sources(), (int(origin[0]), int(origin[1])),
                          threshold_snr, peak_threshold_snr)
        return DetectionResult(dets, out_mask, 0, 0)

    xc, yc = objects.xcpeak, objects.ycpeak
    snr = _peak_snr(img, var, excluded, kernel, xc, yc)
    del excluded
    keep = snr >= peak_threshold_snr

    parent_of = objects.parent  # children of one footprint share it
    n_children = np.bincount(parent_of)
    kept_idx = np.flatnonzero(keep)
    n_kept = kept_idx.size

    # Every footprint is grown (sources below the peak threshold too, so that they are DETECTED
    # and ignored by later background estimates); labels keep only the retained sources.
    grown = grow_labels(seg, grow, len(objects)) if grow > 0 else seg
    del seg
    labels = grown.astype(np.int32)
    del grown
    out_mask = np.empty_like(msk)
    _set_detected(out_mask, msk, labels if detected_px is None else detected_px, bands)
    del detected_px

    lut = np.zeros(len(objects) + 1, dtype=np.int32)
    lut[kept_idx + 1] = np.arange(1, n_kept + 1, dtype=np.int32)
    # Footprints cover a small fraction of the frame: remap (in place) and count only their
    # pixels (a full-frame bincount first converts 16M labels to int64), a band at a time (the
    # indices of a frame's footprint pixels are tens of MB on a 4k x 4k frame in poor seeing).
    counts = np.zeros(n_kept + 1, np.int64)
    for rows in bands:
        band = labels[rows].reshape(-1)  # a view: the band's rows are contiguous
        inside = np.flatnonzero(band != 0)  # on a boolean, nonzero runs ~2.5x faster than on int32
        kept_of_pixel = lut[band[inside]]
        band[inside] = kept_of_pixel
        counts += np.bincount(kept_of_pixel, minlength=n_kept + 1)
    npix = counts[1:]
    del inside, kept_of_pixel

    # Parents are renumbered 1..n over those that keep a source; isolated sources get 0.
    kept_parents = parent_of[kept_idx]
    uniq, parent_rank = np.unique(kept_parents, return_inverse=True)
    n_peaks_in_parent = n_children[kept_parents]
    parent_label = np.where(n_peaks_in_parent > 1, parent_rank + 1, 0)

    x0, y0 = int(origin[0]), int(origin[1])
    sources = Table()
    sources["label"] = np.arange(1, n_kept + 1, dtype=np.int64)
    sources["parent_label"] = parent_label.astype(np.int64)
    sources["x_peak"] = (xc[kept_idx] + x0).astype(np.float64)
    sources["y_peak"] = (yc[kept_idx] + y0).astype(np.float64)
    sources["peak_value"] = img[yc[kept_idx], xc[kept_idx]].astype(np.float64)
    sources["peak_snr"] = snr[kept_idx]
    sources["npix"] = npix.astype(np.int64)
    sources["deblend_nChild"] = np.zeros(n_kept, dtype=np.int64)
    sources["deblend_nPeaks"] = n_peaks_in_parent.astype(np.int64)
    # Isophotal barycentre of the filtered image (sub-pixel), parent coordinates.
    sources["x"] = objects.x[kept_idx] + x0
    sources["y"] = objects.y[kept_idx] + y0
    sources["sep_flag"] = objects.flag[kept_idx]
    for name in ("x_peak", "y_peak", "x", "y"):
        sources[name].unit = "pix"

    dets = Detections(labels, sources, (x0, y0), threshold_snr, peak_threshold_snr)
    return DetectionResult(dets, out_mask, int(uniq.size), int(n_kept))


@dataclass(frozen=True, eq=False)
class _Objects:
    """sep's objects (children) of a frame: peak pixel, isophotal barycentre, flags and parent."""

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    xcpeak: npt.NDArray[np.int64]
    ycpeak: npt.NDArray[np.int64]
    flag: npt.NDArray[np.int64]
    #: 0-based index of each object's parent footprint (an 8-connected set of pixels above threshold).
    parent: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.x.size)


def _extract(data: npt.NDArray[np.float32], thresh: float, excluded: npt.NDArray[np.bool_],
             config: DetectionConfig) -> tuple[_Objects, npt.NDArray[np.int32]]:
    """sep.extract's objects and segmentation map (no filter: ``data`` is already matched-filtered).

    ``data`` is modified: its excluded pixels are set to -inf.

    The footprints are the 8-connected sets of unexcluded pixels above ``thresh`` (OpenCV). A
    footprint with a single local maximum cannot split at any deblending level (each connected
    part above a sub-threshold holds a maximum of its own), so it is its own object, analysed
    here as sep does: barycentre of the pixel values, peak pixel, sep's ``SINGU`` flag for a
    singular second-moment matrix, ``TRUNC`` where it touches the frame's border. Only the
    footprints with several maxima (a plateau counts as several) go through sep's multi-threshold
    deblending, each on its own cut-out: ~3700 of the crowded 4096² frame's 21 000 footprints.

    The objects, flags, footprints and parents are those of one ``sep.extract`` over the frame,
    the barycentres within 1e-6 px (tested). sep's deblending hands the low pixels of a blend to
    its children at random (SExtractor's gatherup), from a generator reseeded per call, so in one
    call over the frame a blend's draws depend on the blends met before it; here they depend on
    the blend alone (0.9 % of the crowded frame's footprint pixels go to another child of the
    same blend, and 23 of its 8170 children peak at another pixel). On that frame, in one
    process: 0.96 s here, 1.2 s for the single call.
    """
    ny, nx = data.shape
    above = (data > np.float32(thresh)) & ~excluded
    # BBDT: the same components and statistics as OpenCV's default algorithm, in half its time.
    n_lab, lab, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(above.view(np.uint8), 8, cv2.CV_32S,
                                                                         cv2.CCL_BBDT)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    keep = area >= int(config.min_pixels)
    keep[0] = False
    # Local maxima: no 8-neighbour above it. Excluded pixels (which sep ignores: they are masked
    # in every call below) become -inf, so that only footprint pixels compete with footprint
    # pixels; the pixels below the threshold are below every footprint pixel anyway.
    data[excluded] = -np.inf
    grown = cv2.dilate(data, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
    ys, xs = np.divmod(np.flatnonzero(above), nx)  # 2x faster than np.nonzero of a 2-D array
    comp = lab[ys, xs]
    # sep lists the footprints in the order its scan closes them: by the raster index of their
    # last pixel (bottom row, rightmost).
    last_pixel = np.full(n_lab, -1, np.int64)
    np.maximum.at(last_pixel, comp, ys.astype(np.int64) * nx + xs)
    is_max = data[ys, xs] >= grown[ys, xs]
    del grown
    max_comp = comp[is_max]
    n_max = np.bincount(max_comp, minlength=n_lab)
    # Each footprint's (last) maximum; a single-maximum footprint's peak.
    peak_x, peak_y = np.zeros(n_lab, np.int64), np.zeros(n_lab, np.int64)
    peak_x[max_comp], peak_y[max_comp] = xs[is_max], ys[is_max]
    del is_max, max_comp
    single = keep & (n_max == 1)
    multi = np.flatnonzero(keep & (n_max > 1))

    # Single-maximum footprints: sep's analysis from per-footprint pixel sums.
    ids = np.flatnonzero(single)
    one = single[comp]
    ys, xs, comp = ys[one], xs[one], comp[one]
    v = data[ys, xs].astype(np.float64)
    sums = [np.bincount(comp, weights=w, minlength=n_lab)[ids]
            for w in (v, v * xs, v * ys, v * xs * xs, v * ys * ys, v * xs * ys)]
    del v, one
    s0 = np.where(sums[0] != 0, sums[0], 1.0)
    mx, my = sums[1] / s0, sums[2] / s0
    mx2 = sums[3] / s0 - mx * mx
    my2 = sums[4] / s0 - my * my
    mxy = sums[5] / s0 - mx * my
    flag1 = np.where(mx2 * my2 - mxy * mxy < 0.00694, sep.OBJ_SINGU, 0).astype(np.int64)
    sx0, sy0 = stats[ids, cv2.CC_STAT_LEFT], stats[ids, cv2.CC_STAT_TOP]
    sx1 = sx0 + stats[ids, cv2.CC_STAT_WIDTH] - 1
    sy1 = sy0 + stats[ids, cv2.CC_STAT_HEIGHT] - 1
    flag1 |= np.where((sx0 == 0) | (sy0 == 0) | (sx1 == nx - 1) | (sy1 == ny - 1), sep.OBJ_TRUNC, 0)
    xc1, yc1 = peak_x[ids], peak_y[ids]

    # Several maxima: sep on a cut-out of the footprint, one pixel of excluded margin around it
    # (so that sep's TRUNC still means the frame's border), with a pixel stack of its size.
    sep.set_sub_object_limit(int(config.sub_object_limit))
    children: list[tuple[np.ndarray, np.ndarray, int, int]] = []
    stack_before = sep.get_extract_pixstack()
    try:
        for label in multi.tolist():
            x0, y0 = max(int(stats[label, 0]) - 1, 0), max(int(stats[label, 1]) - 1, 0)
            x1 = min(int(stats[label, 0] + stats[label, 2]) + 1, nx)
            y1 = min(int(stats[label, 1] + stats[label, 3]) + 1, ny)
            stack = max(4 * int(area[label]), int(config.pixstack))
            objs, sub_seg = _run_sep(np.ascontiguousarray(data[y0:y1, x0:x1]), thresh,
                                     lab[y0:y1, x0:x1] != label, config, stack=stack)
            children.append((objs, sub_seg, x0, y0))
    finally:
        sep.set_extract_pixstack(stack_before)
    n_children = np.array([len(c[0]) for c in children], np.int64)
    # Objects in sep's order: footprints as its scan closes them, a blend's children in its order.
    parent_label = np.concatenate([ids, np.repeat(multi, n_children)]).astype(np.int64)
    xs_all = np.concatenate([mx, *(np.asarray(o["x"], float) + x0 for o, _, x0, _ in children)])
    ys_all = np.concatenate([my, *(np.asarray(o["y"], float) + y0 for o, _, _, y0 in children)])
    xc_all = np.concatenate([xc1, *(np.asarray(o["xcpeak"], np.int64) + x0 for o, _, x0, _ in children)])
    yc_all = np.concatenate([yc1, *(np.asarray(o["ycpeak"], np.int64) + y0 for o, _, _, y0 in children)])
    fl_all = np.concatenate([flag1, *(np.asarray(o["flag"], np.int64) for o, *_ in children)])
    order = np.argsort(last_pixel[parent_label], kind="stable")
    label_of = np.empty(order.size, np.int32)
    label_of[order] = np.arange(1, order.size + 1, dtype=np.int32)
    # Segmentation: a single footprint's label through a lookup of its OpenCV label; a
    # footprint's children (labelled 1..k in their cut-out, in sep's order, so consecutive here)
    # offset by the first one's.
    lut = np.zeros(n_lab, np.int32)
    lut[ids] = label_of[:ids.size]
    seg = np.zeros((ny, nx), np.int32)
    seg[ys, xs] = lut[comp]
    del ys, xs, comp
    first = ids.size
    for (_, sub_seg, x0, y0), k in zip(children, n_children.tolist(), strict=True):
        if k:
            mine = sub_seg > 0
            seg_view = seg[y0:y0 + sub_seg.shape[0], x0:x0 + sub_seg.shape[1]]
            seg_view[mine] = sub_seg[mine] + (int(label_of[first]) - 1)
        first += k
    _, parent = np.unique(parent_label[order], return_inverse=True)
    return _Objects(xs_all[order], ys_all[order], xc_all[order], yc_all[order], fl_all[order],
                    parent.astype(np.int64)), seg


def _extract_frame(data: npt.NDArray[np.float32], thresh: float, excluded: npt.NDArray[np.bool_],
                   config: DetectionConfig) -> tuple[_Objects, npt.NDArray[np.int32]]:
    """:func:`_extract` as one sep call over the frame; parents from OpenCV's components of its footprints."""
    stack_before = sep.get_extract_pixstack()
    sep.set_sub_object_limit(int(config.sub_object_limit))
    try:
        objs, seg = _run_sep(data, thresh, excluded, config, stack=max(int(config.pixstack), 1_000_000))
    finally:
        sep.set_extract_pixstack(stack_before)
    seg = np.asarray(seg, np.int32)
    _, comp = cv2.connectedComponentsWithAlgorithm((seg > 0).view(np.uint8), 8, cv2.CV_32S, cv2.CCL_BBDT)
    xc, yc = np.asarray(objs["xcpeak"], np.int64), np.asarray(objs["ycpeak"], np.int64)
    _, parent = np.unique(comp[yc, xc], return_inverse=True)  # an object's peak lies in its footprint
    return _Objects(np.asarray(objs["x"], float), np.asarray(objs["y"], float), xc, yc,
                    np.asarray(objs["flag"], np.int64), parent.astype(np.int64)), seg


def _run_sep(data: npt.NDArray[np.float32], thresh: float, excluded: npt.NDArray[np.bool_],
             config: DetectionConfig, *, stack: int) -> tuple[np.ndarray, np.ndarray]:
    """sep.extract (no filter) of ``data``, its pixel stack grown on demand."""
    while True:
        sep.set_extract_pixstack(stack)
        try:
            return sep.extract(
                data, thresh, mask=excluded, minarea=int(config.min_pixels), filter_kernel=None,
                deblend_nthresh=int(config.deblend_nthresh),
                deblend_cont=float(config.deblend_cont), clean=False, segmentation_map=True,
            )
        except Exception as exc:  # sep raises a bare Exception for its internal limits
            full = "pixel buffer full" in str(exc)
            if full and stack < config.max_pixstack:
                stack = min(stack * 4, int(config.max_pixstack))
                continue
            raise StepFailedError(
                f"sep.extract failed ({exc}); raise detection.max_pixstack / sub_object_limit or the "
                "threshold for this crowded frame",
                metadata={"pixstack": stack, "sub_object_limit": config.sub_object_limit},
            ) from exc


def _set_detected(out: npt.NDArray[np.uint32], mask: npt.NDArray[np.uint32], footprints: npt.NDArray[np.integer],
                  bands: list[slice]) -> None:
    """``out = mask | DETECTED`` where ``footprints`` is non-zero, a band of rows at a time."""
    detected_bit = MASK_DTYPE(int(MaskPlane.DETECTED))
    for rows in bands:
        np.bitwise_or(mask[rows], (footprints[rows] > 0).astype(MASK_DTYPE) * detected_bit, out=out[rows])


def _bright_peak_snr(filtered: npt.NDArray[np.float32], img: npt.NDArray[np.float32], var: npt.NDArray[np.float32],
                     excluded: npt.NDArray[np.bool_], kernel: npt.NDArray[np.float32], k_norm: float,
                     peak_threshold_snr: float) -> npt.NDArray[np.float64]:
    """Peak S/N (as :func:`_peak_snr`) of the local maxima of ``filtered`` that reach ``peak_threshold_snr``.

    Every sep child peaks at such a maximum (a close pair the deblender keeps merged counts
    twice here). ``filtered / k_norm`` is the S/N against the sky noise alone, at least the
    peak S/N, which adds the source's own noise; the 0.8 margin covers a pixel variance below
    its block's median sky. The threshold is compared first and the 3x3 maximum test runs on
    the pixels above it, a band of rows at a time (a nebula or a large galaxy can put millions
    of pixels above it: their indices stay band-sized).
    """
    ny, nx = filtered.shape
    thr = np.float32(0.8 * peak_threshold_snr * k_norm)
    ys, xs = [], []
    for y0 in range(1, ny - 1, _BAND_ROWS):  # the first and last rows and columns hold no maximum
        y1 = min(y0 + _BAND_ROWS, ny - 1)
        y, x = np.divmod(np.flatnonzero(filtered[y0:y1] >= thr), nx)
        inner = (x > 0) & (x < nx - 1)
        y, x = y[inner] + y0, x[inner]
        is_max = is_local_maximum(filtered, y, x)
        ys.append(y[is_max])
        xs.append(x[is_max])
    y, x = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (ys, xs))
    snr = _peak_snr(img, var, excluded, kernel, x.astype(np.int64), y.astype(np.int64))
    return snr[snr >= peak_threshold_snr]


def is_local_maximum(image: npt.NDArray[np.floating], ys: npt.NDArray[np.integer],
                     xs: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Whether each pixel ``(ys, xs)`` (none on the image border) is a maximum of its 3x3 neighbourhood.

    Ties go to the earlier pixel in raster order (strictly above the four neighbours before it, at
    least the four after it), so a plateau of equal values holds one maximum.
    """
    v = image[ys, xs]
    out = np.ones(v.shape, bool)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        n = image[ys + dy, xs + dx]
        out &= (v > n) if (dy, dx) < (0, 0) else (v >= n)
    return out


def _peak_snr(img: npt.NDArray[np.float32], var: npt.NDArray[np.float32], excluded: npt.NDArray[np.bool_],
              kernel: npt.NDArray[np.float32], xc: npt.NDArray[np.int64],
              yc: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Matched-filter S/N ``sum(K I) / sqrt(sum(K^2 V))`` at each peak, per-pixel variance."""
    st = Stamps(img.shape, xc, yc, kernel.shape[0] // 2)
    k = np.where(st.inside & ~st.cut(excluded), kernel[None].astype(np.float64), 0.0)
    num = np.sum(k * st.cut(img), axis=(1, 2))
    den = np.sum(k * k * np.maximum(st.cut(var), 0.0), axis=(1, 2))
    return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
