"""Second detection pass on the residual image: peaks the deblender merged into bright neighbours.

sep's multi-threshold deblending splits a footprint only where a branch
rises above one of its ``deblend_nthresh`` levels; a faint star on the wing
of a much brighter one (10–16 px from a star 20–300x brighter, measured on
the crowded 4096² benchmark frame) often shares the bright star's footprint
and peak, and is lost (~1 % of the isolated S/N ≥ 10 stars there). More
levels or a lower ``deblend_cont`` recover only a few of them at +1–4 s.

This step subtracts the PSF model (measured PSF flux at the measured
centroid) of every bright source, correlates the residual with the PSF
(a Gaussian of the PSF sigma, as detection) around the brightest ones, and
keeps local maxima of the filtered residual whose matched-filter S/N,
``sum(K R) / sqrt(sum(K² V) + (model_error_frac · sum(K M))²)``, passes the
peak threshold. The second noise term is the PSF-model error: a few % of the
subtracted model ``M`` is left at every bright star's core. A peak must lie
in a subtracted source's footprint (the deblender merged it there) and away
from every existing detection. The new sources are measured, like the
others, on the residual image, where the subtracted neighbours' pixels are
usable (their light is removed) instead of excluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.spatial import cKDTree

from ..errors import ConfigError
from ..exposure import Exposure
from ..footprints import Detections
from ..masks import MASK_DTYPE, MaskPlane
from .detection import smoothing_kernel
from .measurement import MeasurementConfig, measure_sources


@dataclass(frozen=True)
class ResidualDetectionConfig:
    """Configuration of :func:`detect_residual_sources`."""

    #: Sources with PSF-flux S/N at least this are subtracted (their PSF model at their PSF flux).
    #: 100 instead of 50 finds the same stars on the crowded 4096² frame with 3229 models, not 5692.
    model_min_snr: float = 100.0
    #: New peaks are searched around sources with PSF-flux S/N at least this: the merged stars of
    #: the crowded 4096² frame sit next to sources of S/N 165–940 (63 of 66 above 200). 200 finds
    #: the same eligible stars as 100 with half the windows (0.35 s instead of 0.52 s).
    search_min_snr: float = 200.0
    #: ... within this distance (pixels) of them (the merged stars lie 10–18 px away).
    search_radius_pix: float = 20.0
    #: Minimum matched-filter S/N of a residual peak. 10, not detection's 7: the residual peaks of
    #: S/N 7–10 are 5 % faint galaxies (star-selection contaminants) against 3 % above 10
    #: (crowded 4096² frame), and the stars among them are mostly below the S/N 10 of interest.
    peak_threshold_snr: float = 10.0
    #: Fractional error of the subtracted PSF model, added to the noise of the residual. 0.1 (the
    #: PSF core mismatch at bright stars' cores) halves the spurious residual peaks of 0.03.
    model_error_frac: float = 0.1
    #: New peaks closer than this many PSF sigmas to an existing detection (peak or centroid) are
    #: that detection (3.5 sigma ≈ 1.5 FWHM: 2.5 left 3x more spurious peaks at bright cores).
    min_separation_sigma: float = 3.5
    #: Radius (PSF sigmas) of the footprint given to a new source: other new sources' discs are
    #: excluded from its measurement, as the neighbours' footprints in the first pass.
    footprint_radius_sigma: float = 2.0
    #: A peak with any of these planes within 2 px (bleed trails, interpolated saturated cores,
    #: bad columns) is dropped: the residual there is the repair, not a source.
    excluded_planes: MaskPlane = (MaskPlane.BAD | MaskPlane.NO_DATA | MaskPlane.SAT | MaskPlane.INTRP
                                  | MaskPlane.EDGE)
    #: Only peaks inside the footprint of a subtracted source (the deblender merged them there).
    require_model_footprint: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid values."""
        if not (self.model_min_snr > 0 and self.search_min_snr >= self.model_min_snr):
            raise ConfigError("residual_detection needs model_min_snr > 0 and search_min_snr >= model_min_snr "
                              f"(got {self.model_min_snr}, {self.search_min_snr}): searched sources must be subtracted")
        if not self.search_radius_pix > 0 or not self.peak_threshold_snr > 0:
            raise ConfigError("residual_detection.search_radius_pix and peak_threshold_snr must be > 0")
        if not self.model_error_frac >= 0:
            raise ConfigError("residual_detection.model_error_frac must be >= 0")
        if not (self.min_separation_sigma > 0 and self.footprint_radius_sigma > 0):
            raise ConfigError("residual_detection.min_separation_sigma and footprint_radius_sigma must be > 0")


@dataclass(frozen=True, eq=False)
class ResidualDetectionResult:
    """Result of :func:`detect_residual_sources`.

    Attributes
    ----------
    catalog
        New sources measured on the residual image (the columns of
        :func:`~singleframe.steps.measurement.measure_sources`; ``id`` continues
        after the input labels, ``parent`` is the label of the subtracted
        source whose footprint held the peak).
    peaks
        One row per new source: ``x_peak``, ``y_peak`` (parent px), ``peak_snr``.
    n_modelled, n_searched, n_candidates
        Sources subtracted, sources searched around, local maxima tested.
    """

    catalog: Table
    peaks: Table
    n_modelled: int
    n_searched: int
    n_candidates: int

    @property
    def n_new(self) -> int:
        return len(self.catalog)


def detect_residual_sources(exposure: Exposure, catalog: Table, detections: Detections, *,
                            config: ResidualDetectionConfig = ResidualDetectionConfig(),
                            measurement_config: MeasurementConfig | None = None) -> ResidualDetectionResult:
    """Find and measure sources hidden in bright neighbours' footprints.

    Parameters
    ----------
    exposure
        The exposure ``catalog`` was measured on (background subtracted, with
        its PSF and the detection mask); not modified.
    catalog
        :func:`~singleframe.steps.measurement.measure_sources` output for ``detections``.
    detections
        The first-pass detections (labels and peaks).
    config, measurement_config
        This step's options; the measurement of the new sources (default
        ``MeasurementConfig()``; pass the first pass's).

    Returns
    -------
    ResidualDetectionResult
        Empty (zero rows, same columns) when nothing is found.

    Raises
    ------
    ConfigError
        Invalid config, no PSF, or ``catalog`` / ``detections`` not matching ``exposure``.
    """
    config.validate()
    measurement_config = measurement_config if measurement_config is not None else MeasurementConfig()
    if exposure.psf is None:
        raise ConfigError("detect_residual_sources needs an exposure with a PSF (fit the PSF first)")
    if detections.labels.shape != exposure.shape or len(catalog) != len(detections):
        raise ConfigError("catalog, detections and exposure do not match: pass the measure_sources catalogue of "
                          "these detections on this exposure")
    ny, nx = exposure.shape
    ox, oy = exposure.origin
    psf = exposure.psf
    sigma = float(psf.sigma(*exposure.center_pix))
    n = len(catalog)

    flux = np.asarray(catalog["base_PsfFlux_instFlux"], float) if n else np.zeros(0)
    err = np.asarray(catalog["base_PsfFlux_instFluxErr"], float) if n else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, np.nan)
    cen_ok = ~np.asarray(catalog["base_SdssCentroid_flag"], bool) if n else np.zeros(0, bool)
    xc = np.asarray(catalog["base_SdssCentroid_x"], float) - ox if n else np.zeros(0)
    yc = np.asarray(catalog["base_SdssCentroid_y"], float) - oy if n else np.zeros(0)
    modelled = cen_ok & np.isfinite(snr) & (snr >= config.model_min_snr) & (flux > 0)
    searched = modelled & (snr >= config.search_min_snr)
    if "base_PixelFlags_flag_saturated" in catalog.colnames:
        # A saturated star's PSF flux comes from its wings only: its residual is not clean.
        searched &= ~np.asarray(catalog["base_PixelFlags_flag_saturated"], bool)
    mi = np.flatnonzero(modelled)
    si = np.flatnonzero(searched)
    if si.size == 0:
        return _empty(exposure, detections, measurement_config, mi.size, 0, 0)

    residual = _subtract_models(exposure, xc[mi], yc[mi], flux[mi], measurement_config)
    bad_bits = MASK_DTYPE(int(config.excluded_planes))
    kernel = smoothing_kernel(sigma)
    # The search filter is truncated at 2.5 sigma (9 taps instead of 13 at sigma 1.8 px, -30 % of
    # the search time): it only locates the maxima; their S/N is computed with the full kernel.
    h_search = min(int(2.5 * sigma + 0.5), kernel.shape[0] // 2)
    c = kernel.shape[0] // 2
    k1 = kernel.sum(axis=1)[c - h_search:c + h_search + 1]
    # Candidates: maxima whose filtered value could reach the threshold at the lowest sky noise;
    # the cheap tests run first, the exact S/N (with the model error) on the survivors.
    var = np.asarray(exposure.variance)
    sub = var[::16, ::16]
    sub = sub[np.isfinite(sub) & (sub > 0)]
    var_low = float(np.percentile(sub, 1.0)) if sub.size else 0.0
    k_norm2 = float(np.sum(kernel * kernel))
    gx, gy = _filtered_maxima(residual, xc[si], yc[si], k1, radius_pix=config.search_radius_pix,
                              min_value=0.5 * config.peak_threshold_snr * math.sqrt(k_norm2 * var_low))
    n_cand = gx.size
    labels = detections.labels
    parent = labels[gy, gx].astype(np.int64)
    keep = np.ones(gx.size, bool)
    if config.require_model_footprint:
        is_model = np.zeros(n + 1, bool)
        is_model[mi + 1] = True
        keep &= is_model[parent]
    src = detections.sources
    ex = np.r_[np.asarray(src["x_peak"], float) - ox, xc[np.isfinite(xc)]] if n else np.zeros(0)
    ey = np.r_[np.asarray(src["y_peak"], float) - oy, yc[np.isfinite(yc)]] if n else np.zeros(0)
    if ex.size and keep.any():
        d, _ = cKDTree(np.c_[ex, ey]).query(np.c_[gx[keep], gy[keep]])
        keep[np.flatnonzero(keep)[d <= config.min_separation_sigma * sigma]] = False
    keep[np.flatnonzero(keep)[_near_planes(exposure.mask, bad_bits, gx[keep], gy[keep], 2)]] = False
    gx, gy, parent = gx[keep], gy[keep], parent[keep]
    nu = _matched_snr(residual, var, np.asarray(exposure.image, np.float32), exposure.mask, bad_bits, kernel,
                      gx, gy, config.model_error_frac)
    keep = nu >= config.peak_threshold_snr
    gx, gy, nu, parent = gx[keep], gy[keep], nu[keep], parent[keep]
    if gx.size == 0:
        return _empty(exposure, detections, measurement_config, mi.size, si.size, n_cand)

    # Footprints for the measurement on the residual: the subtracted sources' pixels become
    # background near the new sources; each new source owns a disc (excluded from the others).
    reach = _measurement_reach_pix(measurement_config)
    new_labels = np.asarray(labels, np.int32).copy()
    lut = np.arange(n + 1, dtype=np.int32)
    lut[mi + 1] = 0
    wy, wx = _window_indices(gx, gy, reach, (ny, nx))
    new_labels[wy, wx] = lut[new_labels[wy, wx]]
    r = config.footprint_radius_sigma * sigma
    ro = int(math.ceil(r))
    oyy, oxx = np.mgrid[-ro:ro + 1, -ro:ro + 1]
    disc = oyy**2 + oxx**2 <= r * r
    dy = np.clip(gy[:, None] + oyy[disc][None, :], 0, ny - 1)
    dx = np.clip(gx[:, None] + oxx[disc][None, :], 0, nx - 1)
    ids = (n + 1 + np.arange(gx.size)).astype(np.int32)
    new_labels[dy, dx] = ids[:, None]
    npix = np.sum(new_labels[dy, dx] == ids[:, None], axis=1)
    peaks = Table()
    peaks["label"] = ids.astype(np.int64)
    peaks["parent_label"] = parent
    peaks["x_peak"] = gx.astype(float) + ox
    peaks["y_peak"] = gy.astype(float) + oy
    peaks["peak_snr"] = nu
    peaks["npix"] = npix.astype(np.int64)
    peaks["deblend_nChild"] = np.zeros(gx.size, np.int64)
    peaks["deblend_nPeaks"] = np.ones(gx.size, np.int64)
    dets = Detections(new_labels, peaks, (ox, oy), float("nan"), float(config.peak_threshold_snr))
    measured = measure_sources(exposure.replace(image=residual), dets, config=measurement_config).catalog
    out_peaks = peaks["x_peak", "y_peak", "peak_snr"]
    return ResidualDetectionResult(measured, out_peaks, int(mi.size), int(si.size), int(n_cand))


def _empty(exposure: Exposure, detections: Detections, measurement_config: MeasurementConfig, n_modelled: int,
           n_searched: int, n_candidates: int) -> ResidualDetectionResult:
    """A zero-row result with the measurement's columns."""
    empty_src = Table({"label": np.zeros(0, np.int64), "parent_label": np.zeros(0, np.int64),
                       "x_peak": np.zeros(0), "y_peak": np.zeros(0), "peak_snr": np.zeros(0),
                       "npix": np.zeros(0, np.int64), "deblend_nChild": np.zeros(0, np.int64),
                       "deblend_nPeaks": np.zeros(0, np.int64)})
    dets = Detections(detections.labels, empty_src, exposure.origin)  # no source reads the labels
    cat = measure_sources(exposure, dets, config=measurement_config).catalog
    return ResidualDetectionResult(cat, empty_src["x_peak", "y_peak", "peak_snr"], n_modelled, n_searched,
                                   n_candidates)


def _measurement_reach_pix(config: MeasurementConfig) -> int:
    """Largest distance (pixels) from a source at which its measurement reads pixels."""
    return int(math.ceil(max(config.stamp_size_pix // 2, config.max_psf_stamp_pix // 2,
                             max(config.aperture_radii_pix),
                             config.compensated_radius_pix * config.compensated_annulus_outer_factor))) + 1


def _window_indices(gx: npt.NDArray[np.int64], gy: npt.NDArray[np.int64], half: int,
                    shape: tuple[int, int]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Row and column indices ``(n, 2 half + 1, 2 half + 1)`` of square windows, clipped to the image."""
    off = np.arange(-half, half + 1)
    wy = np.clip(gy[:, None, None] + off[None, :, None], 0, shape[0] - 1)
    wx = np.clip(gx[:, None, None] + off[None, None, :], 0, shape[1] - 1)
    return np.broadcast_to(wy, (gx.size, off.size, off.size)), np.broadcast_to(wx, (gx.size, off.size, off.size))


def _subtract_models(exposure: Exposure, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64],
                     flux: npt.NDArray[np.float64], config: MeasurementConfig) -> npt.NDArray[np.float32]:
    """``image − Σ flux · PSF`` (float32, a new array), PSF stamps as the PSF-flux fit uses them."""
    assert exposure.psf is not None
    ny, nx = exposure.shape
    size = min(int(exposure.psf.default_size) | 1, config.max_psf_stamp_pix)
    h = size // 2
    ox, oy = exposure.origin
    residual = np.array(exposure.image, dtype=np.float32, copy=True)
    if x.size == 0:
        return residual
    stamps = exposure.psf.images(x + ox, y + oy, size=size, centered=False)
    stamps *= flux[:, None, None]
    jx, jy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    off = np.arange(-h, h + 1)
    yy = jy[:, None, None] + off[None, :, None]
    xx = jx[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    flat = (yy * nx + xx)[inside]
    # Unbuffered: overlapping stamps of neighbours accumulate.
    np.subtract.at(residual.reshape(-1), flat, stamps[inside].astype(np.float32))
    return residual


def _filtered_maxima(residual: npt.NDArray[np.float32], x: npt.NDArray[np.float64], y: npt.NDArray[np.float64],
                     k1: npt.NDArray[np.float64], *, radius_pix: float, min_value: float
                     ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Local maxima (3x3) above ``min_value`` of the PSF-filtered residual within ``radius_pix`` of the positions.

    The residual is filtered on one square window per position (cut as one stack, windows at
    the image border shifted inwards) by two 1-D passes. Returns the array indices of the
    maxima, each once. Per-position windows cost less than tiles of the frame: on the crowded
    4096² frame the windows hold ~10 M pixels, the 64-px tiles they touch ~26 M.
    """
    ny, nx = residual.shape
    m = k1.size // 2 + 1  # filter half-width plus the 1-px ring of the maxima test
    r = int(math.ceil(radius_pix))
    wy, wx = min(2 * (r + m) + 1, ny), min(2 * (r + m) + 1, nx)
    sy = np.clip(np.round(y).astype(np.int64) - r - m, 0, ny - wy)
    sx = np.clip(np.round(x).astype(np.int64) - r - m, 0, nx - wx)
    windows = sliding_window_view(residual, (wy, wx))[sy, sx]
    k = k1.astype(np.float32)
    filt = ndimage.correlate1d(ndimage.correlate1d(windows, k, axis=1, mode="constant"), k, axis=2, mode="constant")
    del windows
    # Trusted region of each window: away from its cut edges (the filter there misses pixels),
    # except where the cut edge is the image edge (zero outside, as detection).
    lo_y = np.where(sy == 0, 1, m)
    hi_y = np.where(sy + wy == ny, wy - 1, wy - m)
    lo_x = np.where(sx == 0, 1, m)
    hi_x = np.where(sx + wx == nx, wx - 1, wx - m)
    wi, py, px = np.nonzero(filt > min_value)
    ok = (py >= lo_y[wi]) & (py < hi_y[wi]) & (px >= lo_x[wi]) & (px < hi_x[wi])
    wi, py, px = wi[ok], py[ok], px[ok]
    val = filt[wi, py, px]
    is_max = np.ones(wi.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_max &= val >= filt[wi, py + dy, px + dx]
    gy = (sy[wi] + py)[is_max]
    gx = (sx[wi] + px)[is_max]
    flat = np.unique(gy * nx + gx)  # overlapping windows find a maximum more than once
    gy, gx = flat // nx, flat % nx
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[gx, gy])
    near = d <= radius_pix
    return gx[near].astype(np.int64), gy[near].astype(np.int64)


def _matched_snr(residual: npt.NDArray[np.float32], variance: npt.NDArray[np.floating],
                 image: npt.NDArray[np.float32], mask: npt.NDArray[np.uint32], bad_bits: np.uint32,
                 kernel: npt.NDArray[np.float64], gx: npt.NDArray[np.int64], gy: npt.NDArray[np.int64],
                 model_error_frac: float) -> npt.NDArray[np.float64]:
    """``sum(K R) / sqrt(sum(K² V) + (f sum(K M))²)`` at the given pixels (``M = image − residual``)."""
    if gx.size == 0:
        return np.zeros(0)
    h = kernel.shape[0] // 2
    wy, wx = _window_indices(gx, gy, h, residual.shape)
    off = np.arange(-h, h + 1)
    inside = (((gy[:, None] + off[None, :]) >= 0) & ((gy[:, None] + off[None, :]) < residual.shape[0]))[:, :, None] \
        & (((gx[:, None] + off[None, :]) >= 0) & ((gx[:, None] + off[None, :]) < residual.shape[1]))[:, None, :]
    k = np.where(inside & ((mask[wy, wx] & bad_bits) == 0), kernel[None], 0.0)
    r = residual[wy, wx].astype(float)
    model = image[wy, wx].astype(float) - r
    num = np.sum(k * r, axis=(1, 2))
    den = np.sum(k * k * np.maximum(np.asarray(variance)[wy, wx], 0.0), axis=(1, 2))
    den = den + (model_error_frac * np.sum(k * model, axis=(1, 2))) ** 2
    return np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)


def _near_planes(mask: npt.NDArray[np.uint32], bad_bits: np.uint32, gx: npt.NDArray[np.int64],
                 gy: npt.NDArray[np.int64], half: int) -> npt.NDArray[np.bool_]:
    """True where any pixel within ``half`` (square) of ``(gx, gy)`` has one of ``bad_bits``."""
    if gx.size == 0:
        return np.zeros(0, bool)
    wy, wx = _window_indices(gx, gy, half, mask.shape)
    return np.any((mask[wy, wx] & bad_bits) != 0, axis=(1, 2))


__all__ = ["ResidualDetectionConfig", "ResidualDetectionResult", "detect_residual_sources"]
