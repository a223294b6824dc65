"""Source measurement: centroids, adaptive shapes, PSF/aperture/Gaussian fluxes, pixel flags.

Every source is measured on stacked stamps (one ``(n, s, s)`` array cut once),
so centroids, moments and PSF fits are array operations over all sources at
once; circular apertures use sep's exact-overlap sums. Pixels that belong to
other sources' footprints are excluded from every measurement (Rubin's noise
replacer replaces them by noise; excluding them gives the same expectation
without adding noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import astropy.units as u
import numpy as np
import numpy.typing as npt
import sep
from astropy.table import Table

from ..errors import ConfigError
from ..exposure import Exposure
from ..fields import ChebyshevField
from ..footprints import Detections
from ..masks import MaskPlane
from ..psf import adaptive_moments
from ..stamps import Stamps

#: Fluxes that receive aperture corrections (Rubin's registered ap-corr plugins).
AP_CORR_FIELDS = ("base_PsfFlux", "base_GaussianFlux")

#: Pixel-flag suffix → mask plane, for "any pixel of the footprint" flags.
_FOOTPRINT_FLAGS = {
    "edge": MaskPlane.EDGE,
    "nodata": MaskPlane.NO_DATA,
    "saturated": MaskPlane.SAT,
    "interpolated": MaskPlane.INTRP,
    "cr": MaskPlane.CR,
    "bad": MaskPlane.BAD,
    "suspect": MaskPlane.SUSPECT,
}
#: Largest half-size (pixels) of the grown stamps that read a big footprint's pixel flags.
_MAX_FOOTPRINT_HALF_PIX = 127
#: Flags also computed on the 3x3 pixels around the centroid.
_CENTER_FLAGS = {
    "saturatedCenter": MaskPlane.SAT,
    "interpolatedCenter": MaskPlane.INTRP,
    "crCenter": MaskPlane.CR,
    "suspectCenter": MaskPlane.SUSPECT,
}


@dataclass(frozen=True)
class MeasurementConfig:
    """Configuration of :func:`measure_sources`."""

    #: Radii (pixels) of the circular apertures ``base_CircularApertureFlux_<r>_0``.
    aperture_radii_pix: tuple[float, ...] = (3.0, 6.0, 9.0, 12.0, 17.0, 25.0)
    #: Radius (pixels) of the compensated top-hat aperture.
    compensated_radius_pix: float = 12.0
    #: Inner/outer radius of the compensating annulus, in units of the aperture radius.
    compensated_annulus_inner_factor: float = 1.0
    compensated_annulus_outer_factor: float = 1.7
    #: Side (pixels, odd) of the stamps for centroids, moments and the local background.
    stamp_size_pix: int = 31
    #: Largest side (pixels, odd) of the adaptive-moment stamps (without a PSF: the measurement stamps).
    moments_stamp_size_pix: int = 61
    #: Half-side of the adaptive-moment stamps in PSF sigmas (at most ``moments_stamp_size_pix``):
    #: beyond 4.5 sigma the weighted profile of a PSF-sized source holds < 1e-6 of its second
    #: moment, and the cost scales with the stamp's area (0.8″ seeing: 19 px instead of 25, 40 %
    #: fewer pixels; 2.5″ seeing: 49 px, where a fixed 25 px truncated the moments by 2 %).
    moments_stamp_psf_sigmas: float = 4.5
    #: Largest PSF stamp (pixels, odd) used by the PSF-flux fit.
    max_psf_stamp_pix: int = 41
    #: Annulus (pixels) of the local background (must fit in the stamp).
    local_background_inner_pix: float = 7.0
    local_background_outer_pix: float = 15.0
    #: Adaptive-moment iterations and convergence tolerance (relative size / pixels).
    adaptive_max_iterations: int = 40
    adaptive_tolerance: float = 1e-6
    #: Centroids further than this (pixels) from the peak are reset to the peak and flagged.
    max_centroid_shift_pix: float = 2.0
    #: Mask planes whose pixels are left out of the PSF, Gaussian and moment fits.
    bad_mask_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "CR")
    #: Exclude pixels of other sources' footprints from every measurement.
    replace_neighbours: bool = True
    #: Sources are measured in batches of at most this many: the stacked stamps and fits hold
    #: ~50 kB per source, so a crowded 4096² frame (20 000 sources) peaks ~1 GB lower.
    max_sources_per_batch: int = 2500

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the fields are inconsistent."""
        if self.max_sources_per_batch < 1:
            raise ConfigError(f"max_sources_per_batch must be >= 1, got {self.max_sources_per_batch}")
        if not self.aperture_radii_pix or any(not (r > 0) for r in self.aperture_radii_pix):
            raise ConfigError(f"aperture_radii_pix must be positive, got {self.aperture_radii_pix}")
        if not self.compensated_radius_pix > 0:
            raise ConfigError("compensated_radius_pix must be > 0")
        if not (1.0 <= self.compensated_annulus_inner_factor < self.compensated_annulus_outer_factor):
            raise ConfigError("need 1 <= compensated_annulus_inner_factor < compensated_annulus_outer_factor")
        for name in ("stamp_size_pix", "moments_stamp_size_pix", "max_psf_stamp_pix"):
            v = getattr(self, name)
            if v < 5 or v % 2 == 0:
                raise ConfigError(f"{name} must be odd and >= 5, got {v}")
        if not (self.moments_stamp_psf_sigmas >= 3.0 and math.isfinite(self.moments_stamp_psf_sigmas)):
            raise ConfigError(f"moments_stamp_psf_sigmas must be >= 3 (the weighted profile is truncated "
                              f"below), got {self.moments_stamp_psf_sigmas}")
        if not (0 <= self.local_background_inner_pix < self.local_background_outer_pix <= self.stamp_size_pix // 2):
            raise ConfigError(
                "need 0 <= local_background_inner_pix < local_background_outer_pix <= stamp_size_pix // 2 "
                f"(= {self.stamp_size_pix // 2}); enlarge stamp_size_pix or shrink the annulus"
            )
        if self.adaptive_max_iterations < 1 or not self.adaptive_tolerance > 0:
            raise ConfigError("adaptive_max_iterations must be >= 1 and adaptive_tolerance > 0")
        if not self.max_centroid_shift_pix > 0:
            raise ConfigError("max_centroid_shift_pix must be > 0")
        unknown = [p for p in self.bad_mask_planes if p not in MaskPlane.__members__]
        if unknown:
            raise ConfigError(f"unknown mask planes {unknown}; valid: {list(MaskPlane.__members__)}")


@dataclass(frozen=True, eq=False)
class MeasurementResult:
    """Catalogue (one row per detection, Rubin column names, astropy units) and counts."""

    catalog: Table
    n_sources: int
    n_flagged_centroid: int


def aperture_name(radius_pix: float) -> str:
    """Rubin's column stem of a circular aperture, e.g. 12 → ``base_CircularApertureFlux_12_0``."""
    whole = int(math.floor(radius_pix))
    tenths = int(round((radius_pix - whole) * 10))
    return f"base_CircularApertureFlux_{whole}_{tenths}"


def compensated_name(radius_pix: float) -> str:
    """Column stem of the compensated top-hat flux, e.g. ``base_CompensatedTophatFlux_12``."""
    return f"base_CompensatedTophatFlux_{int(round(radius_pix))}"


def flag_columns(config: MeasurementConfig) -> frozenset[str]:
    """Every boolean column that :func:`measure_sources` and :func:`apply_aperture_corrections` write.

    Config validation checks the flag names other steps select on against these (with the
    pipeline's own ``calib_*`` flags), so that a misspelt name is an error, not a filter that
    silently selects nothing.
    """
    names = {"base_SdssCentroid_flag", "ext_shapeHSM_HsmSourceMoments_flag", "ext_shapeHSM_HsmPsfMoments_flag",
             "base_PsfFlux_flag", "base_PsfFlux_flag_edge", "base_GaussianFlux_flag",
             "base_ClassificationSizeExtendedness_flag", "base_PixelFlags_flag_offimage",
             f"{compensated_name(config.compensated_radius_pix)}_flag", "base_NormalizedCompensatedTophatFlux_flag"}
    names |= {f"base_PixelFlags_flag_{key}" for key in (*_FOOTPRINT_FLAGS, *_CENTER_FLAGS)}
    for r in config.aperture_radii_pix:
        stem = aperture_name(float(r))
        names |= {f"{stem}_flag", f"{stem}_flag_apertureTruncated", f"{stem}_flag_neighbours"}
    names |= {f"{name}_flag_apCorr" for name in AP_CORR_FIELDS}
    return frozenset(names)


def measure_sources(exposure: Exposure, detections: Detections, *,
                    config: MeasurementConfig = MeasurementConfig(),
                    ap_corr: Mapping[str, ChebyshevField] | None = None,
                    aperture_fluxes: bool = True, start: Table | None = None) -> MeasurementResult:
    """Measure every detection of ``exposure``.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (counts) with ``psf`` set; PSF-dependent
        columns are NaN and flagged when it is None.
    detections
        Segmentation labels and peaks (parent coordinates).
    config
        Measurement options.
    ap_corr
        Optional aperture-correction fields (``name → ChebyshevField``) to apply
        to ``base_PsfFlux`` and ``base_GaussianFlux``.
    aperture_fluxes
        False leaves out the circular apertures and the compensated top-hat
        (half the cost on a 4096² frame): PSF-star and star selection need only
        centroids, shapes and PSF fluxes; :func:`measure_aperture_fluxes` adds
        them afterwards to the rows that are kept.
    start
        An earlier catalogue of the same ``detections`` (row for row, e.g. before the cosmic
        rays were interpolated): its converged centroids and adaptive moments start the
        iteration, which then stops after a step or two where the pixels are unchanged. The
        values are the same as from a cold start within ``adaptive_tolerance``; only the cost
        differs (about half of the moments' on a crowded 4096² frame).

    Returns
    -------
    MeasurementResult
        ``catalog`` with one row per detection in label order.

    Raises
    ------
    ConfigError
        Detections of another exposure, or a ``start`` catalogue of other detections.

    Notes
    -----
    Centroids and shapes are HSM-style adaptive moments (elliptical Gaussian
    weight iterated to its fixed point, :func:`singleframe.psf.adaptive_moments`);
    the centroid stands in for SdssCentroid and is reset to the peak (and
    flagged) when the iteration fails or wanders more than
    ``max_centroid_shift_pix``. ``base_GaussianFlux`` is the flux of that
    matched Gaussian. The PSF flux is the inverse-variance linear fit of the
    PSF model at the fixed centroid.
    """
    config.validate()
    src = detections.sources
    if tuple(detections.origin) != tuple(exposure.origin) or detections.labels.shape != exposure.shape:
        raise ConfigError(
            f"detections (origin {detections.origin}, shape {detections.labels.shape}) do not match the exposure "
            f"(origin {exposure.origin}, shape {exposure.shape}); detect on this exposure first"
        )
    n = len(src)
    labels_id = np.asarray(src["label"], np.int64) if n else np.zeros(0, np.int64)
    x_peak = np.asarray(src["x_peak"], float) if n else np.zeros(0)
    y_peak = np.asarray(src["y_peak"], float) if n else np.zeros(0)
    npix = np.asarray(src["npix"], np.int64) if n and "npix" in src.colnames else None
    labels = np.asarray(detections.labels, np.int32)
    guess = None if start is None else _start_guess(start, labels_id)
    # Footprint flags: from the stamps when they cover less than a third of the frame, else
    # from one pass over the mask (~30 ms on 4096², against ~110 ms of stamps for 20 000 sources).
    bits = _footprint_bits(exposure.mask, labels, labels_id) if n * config.stamp_size_pix ** 2 > labels.size / 3 \
        else None
    batches = [slice(i, i + config.max_sources_per_batch) for i in range(0, n, config.max_sources_per_batch)]
    parts = [_measure(exposure, x_peak[b], y_peak[b], labels=labels, own_label=labels_id[b], recentre=True,
                      footprint_npix=None if npix is None else npix[b], config=config,
                      aperture_fluxes=aperture_fluxes, guess=None if guess is None else guess[:, b],
                      footprint_bits=None if bits is None else bits[labels_id[b]])
             for b in batches or [slice(0, 0)]]
    head = {"id": labels_id, "parent": np.asarray(src["parent_label"], np.int64) if n else np.zeros(0, np.int64)}
    for name in ("deblend_nChild", "deblend_nPeaks"):
        head[name] = np.asarray(src[name], np.int32) if n else np.zeros(0, np.int32)
    catalog = _assemble(head, parts)
    if ap_corr:
        catalog = apply_aperture_corrections(catalog, ap_corr)
    return MeasurementResult(catalog, n, int(np.count_nonzero(catalog["base_SdssCentroid_flag"])))


#: Columns of a ``start`` catalogue that seed the adaptive moments (centroid, then shape).
_START_COLUMNS = ("base_SdssCentroid_x", "base_SdssCentroid_y", "ext_shapeHSM_HsmSourceMoments_xx",
                  "ext_shapeHSM_HsmSourceMoments_yy", "ext_shapeHSM_HsmSourceMoments_xy")


def _start_guess(start: Table, labels_id: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """``(5, n)`` centroids (parent pixels) and moments of ``start``; NaN where it flagged them."""
    flags = ("base_SdssCentroid_flag", "ext_shapeHSM_HsmSourceMoments_flag")
    missing = [c for c in ("id", *_START_COLUMNS, *flags) if c not in start.colnames]
    if missing:
        raise ConfigError(f"the start catalogue lacks {missing}; pass a catalogue from measure_sources")
    if len(start) != labels_id.size or not np.array_equal(np.asarray(start["id"], np.int64), labels_id):
        raise ConfigError(f"the start catalogue ({len(start)} rows) is not a measurement of these "
                          f"{labels_id.size} detections (its ids differ); measure without start")
    guess = np.array([np.asarray(start[c], float) for c in _START_COLUMNS]).reshape(5, -1)
    guess[:, np.asarray(start[flags[0]], bool) | np.asarray(start[flags[1]], bool)] = np.nan
    return guess


def measure_aperture_fluxes(exposure: Exposure, catalog: Table, detections: Detections, *,
                            config: MeasurementConfig = MeasurementConfig()) -> Table:
    """Add the aperture columns to a catalogue measured with ``aperture_fluxes=False``.

    Every row is measured at its ``base_SdssCentroid_x/_y`` with the pixels of other
    footprints of ``detections`` excluded (row ``id`` = its label), exactly as
    :func:`measure_sources` does: the values equal a full measurement's. The
    columns are placed where :func:`measure_sources` puts them.
    """
    config.validate()
    missing = [c for c in ("id", "base_SdssCentroid_x", "base_SdssCentroid_y") if c not in catalog.colnames]
    if missing:
        raise ConfigError(f"catalog lacks {missing}; pass a catalogue from measure_sources(aperture_fluxes=False)")
    ox, oy = exposure.origin
    x = np.asarray(catalog["base_SdssCentroid_x"], float) - ox
    y = np.asarray(catalog["base_SdssCentroid_y"], float) - oy
    columns = _aperture_columns(exposure, x, y, np.asarray(detections.labels, np.int32),
                                np.asarray(catalog["id"], np.int64), config)
    out = catalog.copy(copy_data=False)
    clash = [name for name in columns if name in out.colnames]
    if clash:
        raise ConfigError(f"catalog already has aperture columns {clash[:3]}...; measure it with aperture_fluxes=False")
    anchor = "base_LocalBackground_instFlux"
    index = out.colnames.index(anchor) if anchor in out.colnames else len(out.colnames)
    out.add_columns(list(columns.values()), indexes=[index] * len(columns), names=list(columns))
    return out


def measure_at_positions(exposure: Exposure, x: npt.ArrayLike, y: npt.ArrayLike, *,
                         config: MeasurementConfig = MeasurementConfig()) -> Table:
    """Measure fixed positions (e.g. sky sources) with the same columns as :func:`measure_sources`.

    The centroid is not iterated (``base_SdssCentroid_x/_y`` are the inputs) and
    no neighbour pixels are excluded; ``id`` and ``parent`` are 0.
    """
    config.validate()
    xs = np.atleast_1d(np.asarray(x, float))
    ys = np.atleast_1d(np.asarray(y, float))
    columns = _measure(exposure, xs, ys, labels=None, own_label=np.zeros(xs.size, np.int64),
                       recentre=False, config=config)
    head = {"id": np.zeros(xs.size, np.int64), "parent": np.zeros(xs.size, np.int64),
            "deblend_nChild": np.zeros(xs.size, np.int32), "deblend_nPeaks": np.zeros(xs.size, np.int32)}
    return _assemble(head, [columns])


def apply_aperture_corrections(catalog: Table, ap_corr: Mapping[str, ChebyshevField]) -> Table:
    """Return a copy of ``catalog`` with aperture corrections applied.

    For each ``name`` in ``ap_corr`` whose ``<name>_instFlux`` column exists,
    adds ``<name>_apCorr``, ``<name>_apCorrErr`` and ``<name>_flag_apCorr``
    (correction not finite and positive, or source outside the field's bbox)
    and multiplies ``<name>_instFlux`` and ``<name>_instFluxErr`` by the
    correction (errors are scaled, not inflated, as Rubin does by default).
    """
    out = catalog.copy(copy_data=True)
    x = np.asarray(out["base_SdssCentroid_x"], float)
    y = np.asarray(out["base_SdssCentroid_y"], float)
    for name, field in ap_corr.items():
        if f"{name}_instFlux" not in out.colnames:
            continue
        corr = np.asarray(field.evaluate(x, y), float).reshape(-1) if len(out) else np.zeros(0)
        x_min, y_min, x_max, y_max = field.bbox
        outside = (x < x_min - 0.5) | (x > x_max + 0.5) | (y < y_min - 0.5) | (y > y_max + 0.5)
        bad = ~np.isfinite(corr) | ~(corr > 0) | outside
        use = np.where(bad, 1.0, corr)
        out[f"{name}_apCorr"] = corr
        out[f"{name}_apCorrErr"] = np.full(len(out), float(field.error))
        out[f"{name}_flag_apCorr"] = bad
        flux = np.asarray(out[f"{name}_instFlux"], float) * use
        err = np.asarray(out[f"{name}_instFluxErr"], float) * use
        out[f"{name}_instFlux"] = np.where(bad, np.nan, flux)
        out[f"{name}_instFluxErr"] = np.where(bad, np.nan, err)
        out[f"{name}_instFlux"].unit = catalog[f"{name}_instFlux"].unit
        out[f"{name}_instFluxErr"].unit = catalog[f"{name}_instFluxErr"].unit
        if f"{name}_flag" in out.colnames:
            out[f"{name}_flag"] = np.asarray(out[f"{name}_flag"], bool) | bad
    return out


# --------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------
def _assemble(head: dict[str, Any], parts: list[dict[str, Any]]) -> Table:
    """One catalogue: the ``head`` columns, then the measured columns of ``parts`` (batches, in order).

    Batches are joined column by column and the table is built once: building a table per
    batch and stacking them cost ~45 ms per 20 000 sources.
    """
    columns = dict(head)
    for name, first in parts[0].items():
        if len(parts) == 1:
            columns[name] = first
        elif isinstance(first, u.Quantity):
            columns[name] = u.Quantity(np.concatenate([p[name].value for p in parts]), first.unit, copy=False)
        else:
            columns[name] = np.concatenate([p[name] for p in parts])
    return Table(columns)


def _bad_bits(config: MeasurementConfig) -> np.uint32:
    bits = 0
    for p in config.bad_mask_planes:
        bits |= int(MaskPlane[p])
    return np.uint32(bits)


def _cut_usable(st: Stamps, exposure: Exposure, bad_bits: np.uint32, labels: npt.NDArray[np.int32] | None,
                own_label: npt.NDArray[np.integer], config: MeasurementConfig
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.uint32],
                           npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.int32] | None]:
    """Image, variance and mask stamps, the usable-pixel mask, the neighbour mask and the label stamps.

    A pixel is usable when it lies on the image, carries none of the bad mask bits, has a
    positive variance and (with ``replace_neighbours``) belongs to no other source's footprint.
    """
    img_st, var_st, msk_st = st.cut(exposure.image), st.cut(exposure.variance), st.cut(exposure.mask)
    usable = st.inside & ((msk_st & bad_bits) == 0) & (var_st > 0)
    lab_st = None
    neighbour = np.zeros_like(usable)
    if labels is not None and config.replace_neighbours:
        lab_st = st.cut(labels)
        neighbour = (lab_st != 0) & (lab_st != own_label[:, None, None].astype(np.int32))
        usable &= ~neighbour
    return img_st, var_st, msk_st, usable, neighbour, lab_st


def _measure(exposure: Exposure, x_start: npt.NDArray[np.float64], y_start: npt.NDArray[np.float64], *,
             labels: npt.NDArray[np.int32] | None, own_label: npt.NDArray[np.int64], recentre: bool,
             config: MeasurementConfig, footprint_npix: npt.NDArray[np.int64] | None = None,
             aperture_fluxes: bool = True, guess: npt.NDArray[np.float64] | None = None,
             footprint_bits: npt.NDArray[np.uint32] | None = None) -> dict[str, Any]:
    """The measured columns of the sources starting at ``x_start``, ``y_start`` (parent pixels), in catalogue order.

    ``footprint_bits``: the mask planes set in each source's footprint (:func:`_footprint_bits`),
    if already known; else they are read from the stamps.
    """
    n = x_start.size
    ox, oy = exposure.origin
    ny, nx = exposure.shape
    mask = exposure.mask
    bad_bits = _bad_bits(config)
    psf = exposure.psf
    cat: dict[str, Any] = {}  # columns, in catalogue order

    # --- centroids and adaptive moments on stacked stamps --------------------------
    half = config.stamp_size_pix // 2
    ix = np.round(x_start - ox).astype(np.int64)
    iy = np.round(y_start - oy).astype(np.int64)
    st = Stamps(exposure.shape, ix, iy, half)
    inside = st.inside
    img_st, var_st, msk_st, valid, neighbour, lab_st = _cut_usable(st, exposure, bad_bits, labels, own_label,
                                                                   config)
    sigma0 = float(psf.sigma(*exposure.center_pix)) if psf is not None and n else math.nan
    psf_known = math.isfinite(sigma0) and sigma0 > 0
    sigma0 = sigma0 if psf_known else 2.0
    # Moments on stamps ``moments_stamp_psf_sigmas`` PSF sigmas wide (see the config); without
    # a PSF, the measurement stamp (or the moments' widest, if smaller).
    mh = min(config.moments_stamp_size_pix // 2, half)
    if psf_known:
        mh = min(max(int(math.ceil(config.moments_stamp_psf_sigmas * sigma0)), 3),
                 config.moments_stamp_size_pix // 2)
    if mh <= half:
        sl = slice(half - mh, half + mh + 1)
        m_img, m_var, m_valid = img_st[:, sl, sl], var_st[:, sl, sl], valid[:, sl, sl]
    else:  # very poor seeing: stamps wider than the measurement stamps, cut for the moments alone
        m_img, m_var, _, m_valid, _, _ = _cut_usable(Stamps(exposure.shape, ix, iy, mh), exposure, bad_bits,
                                                     labels, own_label, config)
    x_guess, y_guess, shape_guess = (x_start - ox) - ix, (y_start - oy) - iy, None
    if guess is not None:  # a warm start where the earlier measurement converged
        warm = np.all(np.isfinite(guess), axis=0)
        x_guess = np.where(warm, guess[0] - ox - ix, x_guess)
        y_guess = np.where(warm, guess[1] - oy - iy, y_guess)
        shape_guess = (guess[2], guess[3], guess[4])
    am = adaptive_moments(m_img, variance=m_var, valid=m_valid,
                          sigma_guess_pix=sigma0, x_guess=x_guess, y_guess=y_guess, shape_guess=shape_guess,
                          max_iterations=config.adaptive_max_iterations, tolerance=config.adaptive_tolerance,
                          recentre=recentre) if n else None
    if am is not None:
        shift = np.hypot(am.x + ix - (x_start - ox), am.y + iy - (y_start - oy))
        shape_ok = am.converged & np.isfinite(am.xx) & np.isfinite(am.yy) & np.isfinite(am.xy)
        cen_ok = shape_ok & (shift <= config.max_centroid_shift_pix) & np.isfinite(am.x_err) & np.isfinite(am.y_err)
        if not recentre:
            cen_ok = np.ones(n, bool)
        xc = np.where(cen_ok, am.x + ix + ox, x_start)
        yc = np.where(cen_ok, am.y + iy + oy, y_start)
        x_err = np.where(cen_ok, am.x_err, np.nan)
        y_err = np.where(cen_ok, am.y_err, np.nan)
        mxx = np.where(shape_ok, am.xx, np.nan)
        myy = np.where(shape_ok, am.yy, np.nan)
        mxy = np.where(shape_ok, am.xy, np.nan)
        # The flux of the matched Gaussian means nothing where its shape failed (a collapsed or
        # diverged weight gives any value): NaN there, not a flagged number.
        g_flux, g_err = np.where(shape_ok, am.flux, np.nan), np.where(shape_ok, am.flux_err, np.nan)
        g_ok = np.isfinite(g_flux) & np.isfinite(g_err)
        # Adaptive moments fail on ~1 % of faint (S/N < 15) point sources (noise drives the
        # size iteration away). A fixed-weight (PSF-sized Gaussian) centroid still measures them,
        # so their PSF flux is not lost; their size is estimated below from the fixed-weight trace.
        fb = np.flatnonzero(~cen_ok) if recentre else np.zeros(0, np.int64)
        fb_trace = np.full(n, np.nan)
        if fb.size:
            fx, fy, fex, fey, ftr = _fixed_weight_moments(
                m_img[fb], m_var[fb], m_valid[fb], sigma0,
                ((x_start - ox) - ix)[fb], ((y_start - oy) - iy)[fb])
            fshift = np.hypot(fx + ix[fb] - (x_start - ox)[fb], fy + iy[fb] - (y_start - oy)[fb])
            good = np.isfinite(fx) & np.isfinite(fy) & (fshift <= config.max_centroid_shift_pix)
            g = fb[good]
            xc[g] = fx[good] + ix[g] + ox
            yc[g] = fy[good] + iy[g] + oy
            x_err[g] = fex[good]
            y_err[g] = fey[good]
            cen_ok[g] = True
            fb_trace[g] = ftr[good]
    else:
        xc, yc = x_start.copy(), y_start.copy()
        x_err = y_err = mxx = myy = mxy = g_flux = g_err = fb_trace = np.zeros(0)
        cen_ok = shape_ok = g_ok = np.zeros(0, bool)
    cat["base_SdssCentroid_x"] = u.Quantity(xc, u.pix)
    cat["base_SdssCentroid_y"] = u.Quantity(yc, u.pix)
    cat["base_SdssCentroid_xErr"] = u.Quantity(x_err, u.pix)
    cat["base_SdssCentroid_yErr"] = u.Quantity(y_err, u.pix)
    cat["base_SdssCentroid_flag"] = ~cen_ok
    cat["ext_shapeHSM_HsmSourceMoments_xx"] = u.Quantity(mxx, u.pix**2)
    cat["ext_shapeHSM_HsmSourceMoments_yy"] = u.Quantity(myy, u.pix**2)
    cat["ext_shapeHSM_HsmSourceMoments_xy"] = u.Quantity(mxy, u.pix**2)
    cat["ext_shapeHSM_HsmSourceMoments_flag"] = ~shape_ok

    # --- PSF moments and PSF flux at the fixed centroid -----------------------------
    if psf is not None and n:
        pm = np.asarray(psf.moments_many(xc, yc), float).reshape(n, 3)
        p_size = min(int(psf.default_size) | 1, config.max_psf_stamp_pix)
        kernels = psf.images(xc, yc, size=p_size, centered=False)
        ph = p_size // 2
        jx = np.round(xc - ox).astype(np.int64)
        jy = np.round(yc - oy).astype(np.int64)
        if ph <= half:
            # Most centroids round to the peak pixel: their PSF stamps are the centre of the stamps
            # already cut; only the sources that moved are cut again.
            sp = slice(half - ph, half + ph + 1)
            d_st, v_st = img_st[:, sp, sp].copy(), var_st[:, sp, sp].copy()
            use, p_inside = valid[:, sp, sp].copy(), inside[:, sp, sp].copy()
            moved = np.flatnonzero((jx != ix) | (jy != iy))
            if moved.size:
                pst = Stamps(exposure.shape, jx[moved], jy[moved], ph)
                md, mv, _, mu, _, _ = _cut_usable(pst, exposure, bad_bits, labels, own_label[moved], config)
                d_st[moved], v_st[moved], use[moved], p_inside[moved] = md, mv, mu, pst.inside
        else:
            pst = Stamps(exposure.shape, jx, jy, ph)
            p_inside = pst.inside
            d_st, v_st, _, use, _, _ = _cut_usable(pst, exposure, bad_bits, labels, own_label, config)
        # Sums over each stamp's pixels as row dot products of (n, P) arrays.
        wgt = np.where(use, 1.0 / np.where(v_st > 0, v_st, 1.0), 0.0).reshape(n, -1)
        d = np.where(use, d_st, 0.0).astype(float).reshape(n, -1)
        k_flat = kernels.reshape(n, -1)
        wk = wgt * k_flat
        spp = np.einsum("np,np->n", wk, k_flat)
        spd = np.einsum("np,np->n", wk, d)
        with np.errstate(divide="ignore", invalid="ignore"):
            pflux = spd / spp
            perr = 1.0 / np.sqrt(spp)
        # At the least-squares flux, sum(w (d - f k)^2) = sum(w d^2) - f sum(w k d): float64
        # keeps its cancellation below 1e-8 even at S/N 1e4.
        chi2 = np.einsum("np,np->n", wgt * d, d) - pflux * spd
        npix = np.count_nonzero(use.reshape(n, -1), axis=1)
        area = k_flat.sum(axis=1) ** 2 / np.einsum("np,np->n", k_flat, k_flat)
        p_edge = ~p_inside.all(axis=(1, 2))
        p_flag = ~(np.isfinite(pflux) & np.isfinite(perr)) | (npix == 0) | p_edge | ~cen_ok
    else:
        pm = np.full((n, 3), np.nan)
        pflux = perr = chi2 = area = np.full(n, np.nan)
        npix = np.zeros(n, np.int64)
        p_edge = np.zeros(n, bool)
        p_flag = np.ones(n, bool)
    # Fallback sizes (shape flag stays set): for Gaussians of per-axis variance s under a weight
    # of variance w, the weighted trace is 2 s w / (s + w); linearised about the PSF (s = p) its
    # log-derivative is w / (p + w), which converts the trace ratio into a size ratio.
    fbs = np.flatnonzero(np.isfinite(fb_trace) & ~shape_ok) if n else np.zeros(0, np.int64)
    if fbs.size:
        t_psf_fb = pm[fbs, 0] + pm[fbs, 1]
        p_var, w_var = t_psf_fb / 2.0, sigma0**2
        tw_psf = 2.0 * p_var * w_var / (p_var + w_var)
        beta = w_var / (p_var + w_var)
        t_est = t_psf_fb * (1.0 + (fb_trace[fbs] / tw_psf - 1.0) / beta)
        # Far from the PSF the linearisation can give a negative size: no estimate there.
        t_est = np.where(t_est > 0, t_est, np.nan)
        mxx = mxx.copy()
        myy = myy.copy()
        mxy = mxy.copy()
        mxx[fbs] = myy[fbs] = t_est / 2.0
        mxy[fbs] = 0.0
        cat["ext_shapeHSM_HsmSourceMoments_xx"] = u.Quantity(mxx, u.pix**2)
        cat["ext_shapeHSM_HsmSourceMoments_yy"] = u.Quantity(myy, u.pix**2)
        cat["ext_shapeHSM_HsmSourceMoments_xy"] = u.Quantity(mxy, u.pix**2)
    cat["ext_shapeHSM_HsmPsfMoments_xx"] = u.Quantity(pm[:, 0], u.pix**2)
    cat["ext_shapeHSM_HsmPsfMoments_yy"] = u.Quantity(pm[:, 1], u.pix**2)
    cat["ext_shapeHSM_HsmPsfMoments_xy"] = u.Quantity(pm[:, 2], u.pix**2)
    cat["ext_shapeHSM_HsmPsfMoments_flag"] = ~np.all(np.isfinite(pm), axis=1)
    cat["base_PsfFlux_instFlux"] = u.Quantity(pflux, u.ct)
    cat["base_PsfFlux_instFluxErr"] = u.Quantity(perr, u.ct)
    cat["base_PsfFlux_area"] = u.Quantity(area, u.pix**2)
    cat["base_PsfFlux_chi2"] = chi2
    cat["base_PsfFlux_npixels"] = np.asarray(npix, np.int32)
    cat["base_PsfFlux_flag"] = p_flag
    cat["base_PsfFlux_flag_edge"] = p_edge

    cat["base_GaussianFlux_instFlux"] = u.Quantity(g_flux, u.ct)
    cat["base_GaussianFlux_instFluxErr"] = u.Quantity(g_err, u.ct)
    cat["base_GaussianFlux_flag"] = ~g_ok

    xl, yl = xc - ox, yc - oy
    if aperture_fluxes:
        for name, col in _aperture_columns(exposure, xl, yl, labels, own_label, config).items():
            cat[name] = col

    # --- local background: annulus median of source-free pixels ---------------------
    gy, gx = np.mgrid[-half:half + 1, -half:half + 1]
    rr = np.hypot(gx, gy)
    ann = (rr >= config.local_background_inner_pix) & (rr <= config.local_background_outer_pix)
    bg_ok = inside & ((msk_st & (bad_bits | np.uint32(int(MaskPlane.DETECTED)))) == 0)
    if lab_st is not None:
        bg_ok &= lab_st == 0
    # Sorting once (NaN last) gives the median and the quartiles of each row's valid pixels.
    vals = np.sort(np.where(bg_ok, img_st, np.nan)[:, ann], axis=1)
    n_ok = np.sum(bg_ok[:, ann], axis=1)
    if n:
        rows = np.arange(n)

        def _quantile(q: float) -> npt.NDArray[np.float64]:
            pos = np.clip(q * (n_ok - 1), 0, None)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, np.maximum(n_ok - 1, 0))
            f = pos - lo
            return np.asarray(vals[rows, lo] * (1 - f) + vals[rows, hi] * f, float)

        med = _quantile(0.5)
        # Normal-equivalent sigma from the inter-quartile range.
        mad = (_quantile(0.75) - _quantile(0.25)) / 1.349
        med = np.where(n_ok > 0, med, np.nan)
        mad = np.where(n_ok > 1, mad, np.nan)
    else:
        med = mad = np.zeros(0)
    cat["base_LocalBackground_instFlux"] = u.Quantity(med, u.ct)
    cat["base_LocalBackground_instFluxErr"] = u.Quantity(mad, u.ct)

    # --- size-based extendedness -----------------------------------------------------
    t_src = mxx + myy
    t_psf = pm[:, 0] + pm[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = (t_src - t_psf) / np.sqrt(t_psf)
    ext = 1.0 - np.exp(-0.5 * chi * chi)
    ext_flag = ~np.isfinite(ext)
    cat["base_ClassificationSizeExtendedness_value"] = np.where(ext_flag, np.nan, ext)
    cat["base_ClassificationSizeExtendedness_flag"] = ext_flag

    # --- pixel flags: any pixel of the footprint, and the 3x3 centre ------------------
    if footprint_bits is not None:
        fp_flags = {key: (footprint_bits & np.uint32(int(plane))) != 0 for key, plane in _FOOTPRINT_FLAGS.items()}
    elif n:
        fp_flags = _footprint_flags(mask, labels, own_label, msk_st, inside, st, lab_st, footprint_npix)
    else:
        fp_flags = {k: np.zeros(0, bool) for k in _FOOTPRINT_FLAGS}
    kx = np.round(xl).astype(np.int64)
    ky = np.round(yl).astype(np.int64)
    cst = Stamps(exposure.shape, kx, ky, 1)
    c_st, c_inside = cst.cut(mask), cst.inside
    off_image = (kx < 0) | (kx >= nx) | (ky < 0) | (ky >= ny)
    for key in _FOOTPRINT_FLAGS:
        flag = fp_flags[key]
        if key == "edge":
            # Sources whose PSF stamp leaves the image are not fully measurable either.
            flag = flag | p_edge | off_image
        if key == "nodata":
            flag = flag | off_image
        cat[f"base_PixelFlags_flag_{key}"] = flag
    for key, plane in _CENTER_FLAGS.items():
        cat[f"base_PixelFlags_flag_{key}"] = np.any(((c_st & np.uint32(int(plane))) != 0) & c_inside, axis=(1, 2))
    cat["base_PixelFlags_flag_offimage"] = off_image

    own = valid | (~neighbour & inside)
    pmax = np.max(np.where(own, img_st, -np.inf), axis=(1, 2)) if n else np.zeros(0)
    cat["psf_max_value"] = u.Quantity(np.where(np.isfinite(pmax), pmax, np.nan).astype(np.float32), u.ct)
    return cat


def _aperture_columns(exposure: Exposure, xl: npt.NDArray[np.float64], yl: npt.NDArray[np.float64],
                      labels: npt.NDArray[np.int32] | None, own_label: npt.NDArray[np.int64],
                      config: MeasurementConfig) -> dict[str, Any]:
    """Circular apertures and the compensated top-hat (sep, exact overlap) at array positions."""
    n = xl.size
    cat: dict[str, Any] = {}
    sep_img = np.ascontiguousarray(exposure.image, dtype=np.float32)
    sep_var = np.ascontiguousarray(exposure.variance, dtype=np.float32)
    seg_kw: dict[str, object] = {}
    if labels is not None and config.replace_neighbours and n:
        # sep zeroes (does not rescale) pixels of other segments: neighbour flux is removed.
        seg_kw = {"segmap": np.ascontiguousarray(labels, dtype=np.int32),
                  "seg_id": np.ascontiguousarray(own_label, dtype=np.int32)}

    for r in config.aperture_radii_pix:
        if n == 0:
            s, e, trunc, neigh = np.zeros(0), np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)
        else:
            s, e, f = sep.sum_circle(sep_img, xl, yl, float(r), var=sep_var, subpix=0, **seg_kw)
            s, e, f = np.asarray(s, float), np.asarray(e, float), np.asarray(f)
            trunc = (f & sep.APER_TRUNC) != 0
            # With a segmentation map, sep flags apertures where other sources' pixels were zeroed.
            neigh = (f & sep.APER_HASMASKED) != 0
        stem = aperture_name(float(r))
        cat[f"{stem}_instFlux"] = u.Quantity(s, u.ct)
        cat[f"{stem}_instFluxErr"] = u.Quantity(e, u.ct)
        cat[f"{stem}_flag"] = trunc | ~np.isfinite(s)
        cat[f"{stem}_flag_apertureTruncated"] = trunc
        cat[f"{stem}_flag_neighbours"] = neigh

    rc = float(config.compensated_radius_pix)
    r_in = rc * config.compensated_annulus_inner_factor
    r_out = rc * config.compensated_annulus_outer_factor
    if n:
        # sep subtracts the mean of the annulus' unmasked pixels times the aperture area.
        comp, comp_err, f_c = sep.sum_circle(sep_img, xl, yl, rc, var=sep_var, subpix=0,
                                             bkgann=(r_in, r_out), **seg_kw)
        comp = np.asarray(comp, float)
        comp_err = np.asarray(comp_err, float)
        comp_flag = ((np.asarray(f_c) & sep.APER_TRUNC) != 0) | ~np.isfinite(comp)
    else:
        comp = comp_err = np.zeros(0)
        comp_flag = np.zeros(0, bool)
    stem = compensated_name(rc)
    cat[f"{stem}_instFlux"] = u.Quantity(comp, u.ct)
    cat[f"{stem}_instFluxErr"] = u.Quantity(comp_err, u.ct)
    cat[f"{stem}_flag"] = comp_flag
    # Normalised by the aperture-correction step; starts equal to the raw compensated flux.
    cat["base_NormalizedCompensatedTophatFlux_instFlux"] = u.Quantity(comp, u.ct)
    cat["base_NormalizedCompensatedTophatFlux_instFluxErr"] = u.Quantity(comp_err, u.ct)
    cat["base_NormalizedCompensatedTophatFlux_flag"] = comp_flag.copy()
    return cat


def _fixed_weight_moments(img: npt.NDArray[np.floating], var: npt.NDArray[np.floating],
                          valid: npt.NDArray[np.bool_], sigma_w: float, x0: npt.NDArray[np.float64],
                          y0: npt.NDArray[np.float64], n_iter: int = 8
                          ) -> tuple[npt.NDArray[np.float64], ...]:
    """Centroid and weighted trace with a fixed circular Gaussian weight (fallback for faint sources).

    Returns ``(x, y, x_err, y_err, trace)`` relative to the stamp centre; NaN where the weighted
    flux is not positive. The centre step is twice the weighted first moment (exact for a
    Gaussian source as wide as the weight).
    """
    m, ny, nx = img.shape
    gy, gx = np.mgrid[-(ny // 2):ny - ny // 2, -(nx // 2):nx - nx // 2]
    d = np.where(valid, img, 0.0).astype(float)
    v = np.where(valid, var, 0.0).astype(float)
    cx, cy = np.asarray(x0, float).copy(), np.asarray(y0, float).copy()
    ok = np.ones(m, bool)
    inv2 = 0.5 / sigma_w**2
    for _ in range(n_iter):
        dx = gx[None] - cx[:, None, None]
        dy = gy[None] - cy[:, None, None]
        w = np.exp(-(dx * dx + dy * dy) * inv2) * valid
        s0 = np.sum(w * d, axis=(1, 2))
        ok = s0 > 0
        s0 = np.where(ok, s0, 1.0)
        cx = cx + np.clip(2.0 * np.sum(w * d * dx, axis=(1, 2)) / s0, -1.0, 1.0)
        cy = cy + np.clip(2.0 * np.sum(w * d * dy, axis=(1, 2)) / s0, -1.0, 1.0)
    dx = gx[None] - cx[:, None, None]
    dy = gy[None] - cy[:, None, None]
    w = np.exp(-(dx * dx + dy * dy) * inv2) * valid
    s0 = np.sum(w * d, axis=(1, 2))
    ok &= s0 > 0
    s0 = np.where(ok, s0, np.nan)
    trace = np.sum(w * d * (dx * dx + dy * dy), axis=(1, 2)) / s0
    w2v = w * w * v
    x_err = 2.0 * np.sqrt(np.sum(w2v * dx * dx, axis=(1, 2))) / s0
    y_err = 2.0 * np.sqrt(np.sum(w2v * dy * dy, axis=(1, 2))) / s0
    ok &= np.isfinite(trace) & (trace > 0)
    nan = np.where(ok, 1.0, np.nan)
    return cx * nan, cy * nan, x_err * nan, y_err * nan, trace * nan


def _footprint_bits(mask: npt.NDArray[np.uint32], labels: npt.NDArray[np.int32],
                    labels_id: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """The footprint-flag planes set anywhere in each footprint, indexed by label, from one pass over the mask."""
    any_bits = np.uint32(0)
    for plane in _FOOTPRINT_FLAGS.values():
        any_bits |= np.uint32(int(plane))
    flat = mask.reshape(-1)
    # Pixels carrying none of the planes cannot set a flag (a boolean first: nonzero on it is 2x faster).
    hit = np.flatnonzero((flat & any_bits) != 0)
    pix_lab = labels.reshape(-1)[hit]
    bits = np.zeros(max(int(pix_lab.max(initial=0)), int(labels_id.max(initial=0))) + 1, np.uint32)
    np.bitwise_or.at(bits, pix_lab, flat[hit] & any_bits)
    bits[0] = 0  # label 0 is the background, not a footprint
    return bits


def _footprint_flags(mask: npt.NDArray[np.uint32], labels: npt.NDArray[np.int32] | None,
                     own_label: npt.NDArray[np.int64], msk_st: npt.NDArray[np.uint32],
                     inside: npt.NDArray[np.bool_], st: Stamps, lab_st: npt.NDArray[np.int32] | None,
                     footprint_npix: npt.NDArray[np.int64] | None) -> dict[str, npt.NDArray[np.bool_]]:
    """Planes set anywhere in each footprint (label pixels; the stamp when there are no labels).

    With footprint sizes known, a footprint whose pixels all lie in its stamp (>99 % of
    sources) is read from the stamps; the others from stamps grown until they hold the whole
    footprint, or, past ``_MAX_FOOTPRINT_HALF_PIX``, from one pass over the image.
    """
    planes = {key: np.uint32(int(plane)) for key, plane in _FOOTPRINT_FLAGS.items()}
    if labels is None:
        bits = np.bitwise_or.reduce(np.where(inside, msk_st, np.uint32(0)), axis=(1, 2))
        return {key: (bits & plane) != 0 for key, plane in planes.items()}
    n = own_label.size
    bits = np.zeros(n, np.uint32)
    todo = np.arange(n)
    if footprint_npix is not None:
        half, ix, iy = st.half, st.ix, st.iy
        lab, msk, ins = (lab_st if lab_st is not None else st.cut(labels)), msk_st, inside
        while todo.size:
            own = (lab == own_label[todo, None, None].astype(np.int32)) & ins
            whole = own.sum(axis=(1, 2)) == footprint_npix[todo]
            bits[todo[whole]] = np.bitwise_or.reduce(np.where(own[whole], msk[whole], np.uint32(0)), axis=(1, 2))
            todo = todo[~whole]
            half = 2 * half + 1
            if not todo.size or half > _MAX_FOOTPRINT_HALF_PIX:
                break
            grown = Stamps(mask.shape, ix[todo], iy[todo], half)
            lab, msk, ins = grown.cut(labels), grown.cut(mask), grown.inside
    if todo.size:  # footprints larger than the grown stamps: one pass over the mask
        bits[todo] = _footprint_bits(mask, labels, own_label)[own_label[todo]]
    return {key: (bits & plane) != 0 for key, plane in planes.items()}
