"""The calibration stages, each a pure function composing the steps.

The stages follow the brief's processing summary; the flows persist each
stage's products as datasets and the in-memory :func:`calibrate_image` runs
them back to back (used by benchmarks and tests).

1. :func:`characterize` — combine snaps; subtract background; estimate the
   initial PSF from the data; one pass (two with ``n_psf_passes: 2``) of
   repair / detect (S/N ≥ 50) / measure / fit PSF; final repair with
   interpolation and re-measurement.
2. :func:`correct_apertures` — normalise the calibration flux and fit
   aperture corrections.
3. :func:`calibrate_astrometry` — fit the WCS to the reference catalogue
   using the PSF stars.
4. :func:`find_stars` — detect (peaks 7σ, footprints 5σ: every star of S/N ≥ 10), deblend, measure, search the
   PSF-subtracted residual of bright stars for merged faint ones, select
   unresolved stars, measure their apertures, re-measure the calibration-flux normalisation on them
   (neighbours masked), aperture correct, add sky sources, propagate PSF and
   astrometry flags (``psf_id``).
5. :func:`calibrate_photometry` — fit the zero point to the reference catalogue.
6. :func:`finalize` — calibrate image, background and catalogue to nJy and
   compute the summary statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Column, MaskedColumn, Table, vstack
from astropy.wcs import WCS

from ..background import BackgroundList
from ..errors import AllCentroidsFlaggedError, AstrometryError, PsfFitError
from ..exposure import Exposure
from ..fields import ChebyshevField
from ..footprints import Detections, labels_to_spans
from ..ids import packed_source_ids
from ..masks import DEFECT_PLANES, MASK_DTYPE, MaskPlane
from ..photo_calib import PhotoCalib
from ..psf import GaussianPsf, PsfModel
from .aperture_correction import (
    BAD_NORMALIZATION_FLAGS,
    CALIB_FLUX,
    apply_normalization,
    measure_aperture_correction,
    measure_normalization,
)
from .astrometry import compute_coordinates, fit_astrometry
from .background import subtract_background
from .calibration import calibrate_catalog, calibrate_exposure
from .config import CalibrateImageConfig
from .cosmic_rays import repair_cosmic_rays
from .detection import detect_sources
from .flag_propagation import match_psf_stars
from .initial_psf import estimate_initial_psf
from .interpolation import interpolate_masked
from .measurement import (
    apply_aperture_corrections,
    measure_aperture_fluxes,
    measure_at_positions,
    measure_sources,
)
from .photometry import fit_photometry
from .psf_determination import fit_psf, select_psf_candidates
from .residual_detection import detect_residual_sources
from .snap_combination import combine_snaps
from .star_selection import ReferencePrior, place_sky_sources, reference_prior, select_stars
from .summary import compute_summary_stats, quality_warnings

PSF_CATALOG = 0
STAR_CATALOG = 1


# --------------------------------------------------------------------------------------
# 1. PSF characterization
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CharacterizeResult:
    exposure: Exposure  #: background-subtracted, repaired, with the fitted PSF
    background: BackgroundList
    psf_stars: Table  #: PSF-pass catalogue with calib_psf_* flags (no sky coordinates)
    footprints: Table  #: run-length spans (id, y, x_start, x_end) of psf_stars
    diagnostics: Mapping[str, Any]


def _psf_center_sigma(psf: PsfModel, exposure: Exposure) -> float:
    return psf.sigma(*exposure.center_pix)


def characterize(snaps: Sequence[Exposure], *, config: CalibrateImageConfig) -> CharacterizeResult:
    """Brief steps 1–2: snaps → background-subtracted exposure with a fitted PSF and PSF stars."""
    combined = combine_snaps(snaps, config=config.snap_combine)
    exposure = combined.exposure
    if exposure.background is None:
        exposure = exposure.replace(background=BackgroundList())
    diag: dict[str, Any] = {"n_snaps": combined.n_snaps, "n_cr_pixels_snap_difference": combined.n_cr_pixels_from_difference}

    exposure = subtract_background(exposure, config=config.background).exposure
    del combined  # every superseded full-frame array is released as soon as possible (peak RSS)
    # Defects (BAD columns, SAT bleed trails, NO_DATA) are interpolated once for measurement.
    try:
        initial = estimate_initial_psf(exposure.image, exposure.variance, exposure.mask,
                                       config=config.initial_psf, origin=exposure.origin)
        initial_sigma, diag["initial_psf_n_stars"] = initial.sigma_pix, initial.n_stars
    except PsfFitError as exc:
        initial_sigma = _seeing_fallback_sigma(exposure, config, exc)
        diag["initial_psf_n_stars"] = 0
        diag["initial_psf_fallback"] = "seeing"  # the final PSF may still be fitted (then not flagged)
    diag["initial_psf_sigma_pix"] = initial_sigma
    psf: PsfModel = GaussianPsf(initial_sigma)
    exposure = _interpolate_defects(exposure, psf_sigma_pix=initial_sigma, config=config)

    for pass_index in range(config.n_psf_passes):  # 1 or 2 (validated)
        # A pass keeps only the PSF of the previous one: its frame-sized products (repaired
        # image and mask, footprint labels) are released before this pass allocates its own.
        repaired = exposure
        catalog = detections = None
        sigma = _psf_center_sigma(psf, exposure)
        repaired = repair_cosmic_rays(exposure.replace(psf=psf), psf_sigma_pix=sigma,
                                      config=config.cosmic_rays, interpolate=False).exposure
        det = detect_sources(repaired.image, repaired.variance, repaired.mask, psf_sigma_pix=sigma,
                             config=config.psf_detection, origin=repaired.origin)
        # det.mask is the repair's mask plus DETECTED: the repair's own mask is released here.
        repaired = repaired.replace(mask=det.mask)
        if config.reestimate_background:
            # Cosmic rays are not interpolated in the passes, so the repaired pixels are the
            # exposure's: the subtracted image is then shared, not computed (and held) twice. Either
            # way this stage owns them (the first subtraction's output, or the repair's): in place.
            same_pixels = repaired.image is exposure.image
            repaired = subtract_background(repaired, config=config.background, overwrite_image=True).exposure
            image = (repaired.image if same_pixels
                     else repaired.background.components[-1].subtract_from(exposure.image))
            exposure = exposure.replace(image=image, background=repaired.background)
            del image
        detections = det.detections
        del det
        # Candidates and the fit need centroids, shapes and PSF fluxes; apertures come with the
        # final measurement below.
        catalog = measure_sources(repaired, detections, config=config.measurement, aperture_fluxes=False).catalog
        candidates = select_psf_candidates(catalog, config=config.psf_star_selector)
        try:
            fit = fit_psf(repaired, catalog, candidates.candidate, config=config.psf_fit)
            fitted, used, reserved = fit.psf, fit.used, fit.reserved
            # What the final PSF is goes into the flags below: the last pass decides.
            diag.pop("psf_fallback", None)
            diag.pop("psf_fallback_reason", None)
            diag.pop("psf_fit_fallback", None)
            if fit.fallback:  # 2 to min_stars - 1 stars: a Gaussian of their moments
                diag["psf_fit_fallback"] = f"gaussian of the moments of {fit.n_used} star(s)"
        except PsfFitError as exc:
            if config.psf_fallback != "seeing" or "initial_psf_fallback" not in diag:
                raise
            # Too few stars even for the Gaussian fallback of fit_psf: the seeing Gaussian.
            fitted = GaussianPsf(initial_sigma)
            used, reserved = np.zeros(len(catalog), bool), np.zeros(len(catalog), bool)
            diag.pop("psf_fit_fallback", None)
            diag["psf_fallback"] = "seeing"
            diag["psf_fallback_reason"] = str(exc)
        diag[f"pass{pass_index + 1}_n_detections"] = len(detections)
        # The thresholds used: above the configured ones when psf_detection.max_peaks raised them.
        diag[f"pass{pass_index + 1}_threshold_snr"] = float(detections.threshold_snr)
        diag[f"pass{pass_index + 1}_peak_threshold_snr"] = float(detections.peak_threshold_snr)
        diag[f"pass{pass_index + 1}_n_psf_candidates"] = int(candidates.n_candidates)
        diag[f"pass{pass_index + 1}_n_psf_used"] = int(np.sum(used))
        if pass_index + 1 < config.n_psf_passes:
            # Install a Gaussian of the fitted size to start the next pass (reduces noise).
            psf = GaussianPsf(float(fitted.sigma(*exposure.center_pix)))
        else:
            psf = fitted
    assert catalog is not None and detections is not None

    # Final repair with the fitted PSF, interpolating cosmic rays, then re-measure.
    sigma = _psf_center_sigma(psf, exposure)
    # In place and in MASK_DTYPE (a Python-int operand would promote 4k² masks to int64).
    detected_mask = np.bitwise_and(repaired.mask, MASK_DTYPE(int(MaskPlane.DETECTED)))
    np.bitwise_or(detected_mask, exposure.mask, out=detected_mask)
    exposure = exposure.replace(psf=psf, mask=detected_mask)  # the mask without DETECTED is released
    del repaired, detected_mask
    # This stage owns the image (subtracted in place above) and the mask just built: repaired in place.
    final = repair_cosmic_rays(exposure, psf_sigma_pix=sigma, config=config.cosmic_rays, interpolate=True,
                               overwrite_mask=True, overwrite_image=True)
    exposure = final.exposure.replace(psf=psf)
    diag["n_cosmic_rays"] = int(final.n_cosmic_rays)
    diag["psf_sigma_pix"] = float(sigma)
    # The pass measured the same detections on the same pixels but the repaired cosmic rays: its
    # centroids and moments start the iteration (same values within the tolerance, half the cost).
    catalog = measure_sources(exposure, detections, config=config.psf_measurement, start=catalog).catalog
    catalog["calib_psf_candidate"] = np.asarray(candidates.candidate, bool)
    catalog["calib_psf_used"] = np.asarray(used, bool)
    catalog["calib_psf_reserved"] = np.asarray(reserved, bool)
    # The flag describes this PSF only (an input that is an output of ours may carry an old one).
    exposure = exposure.replace(metadata={k: v for k, v in exposure.metadata.items() if k != "PSF_FALLBACK"})
    if "psf_fallback" in diag:
        exposure = exposure.with_metadata(PSF_FALLBACK="seeing")
    elif "psf_fit_fallback" in diag:
        exposure = exposure.with_metadata(PSF_FALLBACK="moments")
    require_good_centroids(catalog)
    ids = packed_source_ids(exposure.visit_info.visit, exposure.detector.id, len(catalog), catalog=PSF_CATALOG)
    catalog["id"] = ids
    footprints = labels_to_spans(detections.labels, ids, origin=exposure.origin)
    return CharacterizeResult(exposure, exposure.background or BackgroundList(), catalog, footprints, diag)


def _seeing_fallback_sigma(exposure: Exposure, config: CalibrateImageConfig, exc: PsfFitError) -> float:
    """Gaussian sigma (px) of the seeing in the metadata, when ``psf_fallback`` allows it; else re-raise."""
    if config.psf_fallback != "seeing":
        raise PsfFitError(
            f"{exc}. If the frame is usable otherwise, psf_fallback: seeing calibrates it with a Gaussian of "
            "the header seeing (flagged PSF_FALLBACK)", metadata=dict(exc.metadata),
        ) from exc
    fwhm = exposure.metadata.get("seeing_fwhm_pix")
    try:
        fwhm = float(fwhm) if fwhm is not None else float("nan")
    except (TypeError, ValueError):
        fwhm = float("nan")
    if not (math.isfinite(fwhm) and fwhm > 0):
        raise PsfFitError(
            f"{exc} and psf_fallback='seeing' needs the exposure metadata 'seeing_fwhm_pix' (from the header's "
            "FWHM/SEEING keywords at ingest); it is missing or not positive", metadata=dict(exc.metadata),
        ) from exc
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def require_good_centroids(catalog: Table) -> None:
    """Raise AllCentroidsFlaggedError when every source of a non-empty catalogue has a flagged
    centroid (Rubin's check after the PSF pass: astrometry and photometry would be garbage)."""
    flags = np.asarray(catalog["base_SdssCentroid_flag"], bool) if len(catalog) else np.zeros(0, bool)
    if flags.size and flags.all():
        raise AllCentroidsFlaggedError(
            f"all {flags.size} PSF-pass source centroids (out of {flags.size}) are flagged; the PSF or the "
            "image is unusable: check the PSF model (psf_fit), saturation and the mask planes",
            metadata={"n_sources": int(flags.size), "n_flagged": int(flags.sum())},
        )


def _interpolate_defects(exposure: Exposure, *, psf_sigma_pix: float, config: CalibrateImageConfig) -> Exposure:
    """Interpolate the defects of ``exposure`` **in its image**: only for an image this stage owns
    (the background-subtracted frame of :func:`characterize`); the mask is copied."""
    bits = MASK_DTYPE(int(DEFECT_PLANES))
    # Band by band: a full-frame ``mask & bits`` would be a 64 MB temporary on a 4k x 4k frame.
    if not any(np.any(exposure.mask[y: y + 256] & bits) for y in range(0, exposure.shape[0], 256)):
        return exposure
    res = interpolate_masked(exposure.image, exposure.mask, planes=DEFECT_PLANES,
                             psf_sigma_pix=psf_sigma_pix, config=config.interpolation, overwrite_image=True)
    return exposure.replace(image=res.image, mask=res.mask)


# --------------------------------------------------------------------------------------
# 2. Aperture corrections
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ApertureCorrectionStage:
    psf_stars: Table
    ap_corr: Mapping[str, ChebyshevField]
    normalization: float
    fallback: bool
    #: Relative flux-scale error of each corrected flux (to total flux), for the zero-point error.
    scale_err: Mapping[str, float]
    #: No star measured the curve of growth: the normalisation omits it (flagged, error widened).
    cog_fallback: bool = False


def correct_apertures(exposure: Exposure, psf_stars: Table, *, config: CalibrateImageConfig) -> ApertureCorrectionStage:
    """Brief step 3: calibration-flux normalisation and aperture-correction fields.

    Without a single PSF star (the header-seeing PSF of ``psf_fallback: seeing``), they are those
    of a noiseless star drawn from the installed PSF model, measured as the PSF stars are: constant
    fields, flagged as fallbacks, with ``aperture_correction.model_star_err`` added to every flux
    scale error. The star pass re-measures the normalisation on its stars (:func:`find_stars`).
    """
    bbox = tuple(float(v) for v in exposure.bbox)
    ac_config = config.psf_aperture_correction
    if len(psf_stars) and np.any(np.asarray(psf_stars["calib_psf_used"], bool)):
        res = measure_aperture_correction(psf_stars, bbox=bbox, config=ac_config)  # type: ignore[arg-type]
        return ApertureCorrectionStage(res.catalog, dict(res.ap_corr), float(res.normalization), bool(res.fallback),
                                       dict(res.scale_err), bool(res.cog_fallback))
    res = measure_aperture_correction(_model_star(exposure, config), bbox=bbox, config=ac_config)  # type: ignore[arg-type]
    stars = apply_normalization(psf_stars, res.normalization, raw_calib_flux=ac_config.raw_calib_flux)
    for name in res.ap_corr:
        stars[f"apcorr_{name}_used"] = np.zeros(len(stars), bool)
    ap_corr = {name: dataclasses.replace(f, error=float(np.hypot(f.error, ac_config.model_star_err)),
                                         flagged_fallback=True) for name, f in res.ap_corr.items()}
    scale_err = {name: float(np.hypot(err, ac_config.model_star_err)) for name, err in res.scale_err.items()}
    return ApertureCorrectionStage(stars, ap_corr, float(res.normalization), True, scale_err, bool(res.cog_fallback))


def _model_star(exposure: Exposure, config: CalibrateImageConfig) -> Table:
    """The PSF-pass measurement of a noiseless star of the installed PSF at the detector's centre."""
    assert exposure.psf is not None
    m = config.psf_measurement
    reach = max(max(m.aperture_radii_pix), m.compensated_radius_pix * m.compensated_annulus_outer_factor)
    half = int(math.ceil(reach)) + 3
    xc, yc = (float(round(v)) for v in exposure.center_pix)
    flux = 1.0e6  # counts, on a variance of 1: the measured S/N passes every threshold
    image = (flux * exposure.psf.image(xc, yc, size=2 * half + 1)).astype(np.float32)
    model = exposure.replace(image=image, mask=np.zeros(image.shape, MASK_DTYPE),
                             variance=np.ones(image.shape, np.float32), background=None,
                             origin=(int(xc) - half, int(yc) - half))
    star = measure_at_positions(model, [xc], [yc], config=m)
    star["calib_psf_candidate"] = star["calib_psf_used"] = [True]
    star["calib_psf_reserved"] = [False]
    return star


# --------------------------------------------------------------------------------------
# 3. Astrometry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AstrometryStage:
    wcs: WCS
    psf_stars: Table
    matches: Table
    quality: Mapping[str, Any]


def calibrate_astrometry(exposure: Exposure, psf_stars: Table, refcat: Table, *,
                         config: CalibrateImageConfig) -> AstrometryStage:
    """Brief step 4: fit the WCS on the PSF-star catalogue."""
    if exposure.wcs is None:
        raise AstrometryError("the exposure has no initial WCS; ingest it with a header WCS or a camera model")
    res = fit_astrometry(psf_stars, refcat, initial_wcs=exposure.wcs, origin=exposure.origin,
                         shape=exposure.shape, config=config.astrometry)
    stars = compute_coordinates(psf_stars, res.wcs, exposure.origin)
    stars["calib_astrometry_used"] = np.asarray(res.used, bool)
    quality = {
        "n_matches": int(res.n_matches),
        "rms_arcsec": float(res.rms_arcsec),
        "offset_mean_arcsec": float(res.offset_mean_arcsec),
        "offset_std_arcsec": float(res.offset_std_arcsec),
        "match_confidence": float(res.match_confidence),
        "n_iterations": int(res.n_iterations),
        "required_flags_dropped": bool(res.required_flags_dropped),
    }
    return AstrometryStage(res.wcs, stars, res.matches, quality)


# --------------------------------------------------------------------------------------
# 4. Stars
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FindStarsStage:
    stars: Table
    detections: Detections
    diagnostics: Mapping[str, Any]
    #: Compensated → total flux factor measured on the star pass (used for ``stars``).
    normalization: float = 1.0
    #: The aperture-correction fields as applied to ``stars``: the PSF-pass fields rescaled by
    #: the star-pass / PSF-pass normalisation ratio.
    ap_corr: Mapping[str, ChebyshevField] = dataclasses.field(default_factory=dict)
    #: Relative flux-scale error of each corrected flux (star-pass normalisation ⊕ field level).
    scale_err: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: With ``keep_candidates``: every first-pass detection, measured, before the star selection
    #: (what :func:`.star_selection.select_stars` chose from; no aperture fluxes, no sky sources).
    candidates: Table | None = None


def find_stars(exposure: Exposure, psf_stars: Table, *, wcs: WCS, ap_corr: Mapping[str, ChebyshevField],
               normalization: float, config: CalibrateImageConfig,
               scale_err: Mapping[str, float] | None = None, keep_candidates: bool = False,
               refcat: Table | None = None) -> FindStarsStage:
    """Brief steps 5–6: detect at S/N ≥ 10, deblend, measure, select, propagate flags.

    With ``refcat`` (and ``star_selector.use_reference_catalog``), the reference stars vouch for
    the sources they match, and unmatched sources in the catalogue's complete range face a
    stricter size test (:func:`.star_selection.reference_prior`).

    With ``residual_search`` the PSF-subtracted residual around bright stars is searched for
    faint stars the deblender merged into them (:func:`.residual_detection.detect_residual_sources`).

    The calibration-flux normalisation (compensated → total flux) is re-measured here on the
    selected stars: this pass detects to S/N 10, so fainter neighbours are masked (zeroed) in
    the apertures instead of adding their light to the curve of growth as in the S/N ≥ 50 PSF
    pass (+37 mmag in the 25-px aperture of bright crowded stars). ``normalization``,
    ``ap_corr`` and ``scale_err`` are the PSF-pass products of :func:`correct_apertures`; the
    fields are rescaled by the ratio of the two normalisations (their shape over the detector
    and the calibration / model flux ratio stay the PSF-pass fits, as Rubin).
    """
    assert exposure.psf is not None
    sigma = exposure.psf.sigma(*exposure.center_pix)
    det = detect_sources(exposure.image, exposure.variance, exposure.mask, psf_sigma_pix=sigma,
                         config=config.star_detection, origin=exposure.origin)
    exp = exposure.replace(mask=det.mask)
    # Selection needs no aperture fluxes: they are measured on the selected stars only (a sixth
    # of the detections of the typical 4096² frame are not stars).
    catalog = measure_sources(exp, det.detections, config=config.measurement, aperture_fluxes=False).catalog
    residual = None
    if config.residual_search:
        residual = detect_residual_sources(exp, catalog, det.detections, config=config.residual_detection,
                                           measurement_config=config.measurement).catalog
        residual["sky_source"] = np.zeros(len(residual), bool)
    n_residual = 0 if residual is None else len(residual)
    catalog["sky_source"] = np.zeros(len(catalog), bool)
    use_ref = refcat is not None and config.star_selector.use_reference_catalog

    def prior_of(cat: Table, like: ReferencePrior | None = None) -> ReferencePrior | None:
        if not use_ref:
            return None
        assert refcat is not None
        return reference_prior(cat, refcat, wcs=wcs, origin=exposure.origin, shape=exposure.shape,
                               band=exposure.visit_info.band, config=config.star_selector, like=like)

    prior = prior_of(catalog)
    selection = select_stars(catalog, config=config.star_selector, prior=prior)
    stars = measure_aperture_fluxes(exp, catalog[np.asarray(selection.selected, bool)], det.detections,
                                    config=config.measurement)
    candidates = catalog if keep_candidates else None
    del catalog
    # The calibration-flux normalisation is measured on first-pass stars only: the residual-pass
    # stars sit on subtracted bright neighbours, whose model errors would enter their apertures
    # (crowded 4096²: aperture-correction error 0.25 -> 0.86 mmag if they are included).
    n_first = len(stars)
    if residual is not None and n_residual:
        extra_sel = select_stars(residual, config=config.star_selector, prior=prior_of(residual, like=prior))
        extra = residual[np.asarray(extra_sel.selected, bool)]
        stars = _stack_rows([stars, extra])
    norm_stars = ~np.asarray(stars["sky_source"], bool)
    norm_stars[n_first:] = False
    for flag in BAD_NORMALIZATION_FLAGS:
        if flag in stars.colnames:
            norm_stars &= ~np.asarray(stars[flag], bool)
    norm = measure_normalization(stars, norm_stars, config=config.aperture_correction)
    rescale = norm.normalization / normalization
    star_ap_corr = {k: _scale_field(v, rescale) for k, v in ap_corr.items()}
    psf_scale_err = dict(scale_err or {})
    psf_norm_err = float(psf_scale_err.get(CALIB_FLUX, 0.0))
    star_scale_err = {CALIB_FLUX: norm.normalization_err}
    for name in ap_corr:
        # The field level error (its mean over the PSF stars) stays; the normalisation error is replaced.
        level_sq = max(float(psf_scale_err.get(name, psf_norm_err)) ** 2 - psf_norm_err**2, 0.0)
        star_scale_err[name] = float(math.sqrt(level_sq + norm.normalization_err**2))
    stars = apply_normalization(stars, norm.normalization)
    stars = apply_aperture_corrections(stars, star_ap_corr)
    n_real = len(stars)
    if config.n_sky_sources:
        sky = place_sky_sources(det.mask, n_sources=config.n_sky_sources, radius_pix=8.0,
                                seed=int(exposure.visit_info.visit) * 1000 + exposure.detector.id,
                                origin=exposure.origin)
        stars = _append_sky_sources(stars, sky, exp, config)
    stars["id"] = packed_source_ids(exposure.visit_info.visit, exposure.detector.id, len(stars), catalog=STAR_CATALOG)
    radius = max(config.psf_star_match_radius_pix, sigma)
    prop = match_psf_stars(psf_stars, stars, radius_pix=radius)
    stars = compute_coordinates(prop.stars, wcs, exposure.origin)
    diag = {"n_detections": len(det.detections), "n_residual_detections": n_residual, "n_stars": n_real,
            "n_psf_matched": int(prop.n_matched),
            "n_psf_matched_multiple": int(prop.n_multiple), "normalization": float(norm.normalization),
            "normalization_err": float(norm.normalization_err), "normalization_n_stars": int(norm.n_stars),
            "curve_of_growth": float(norm.curve_of_growth), "curve_of_growth_n_stars": int(norm.curve_of_growth_n_stars),
            "curve_of_growth_fallback": bool(norm.cog_fallback),
            "normalization_ratio_to_psf_pass": float(rescale),
            "n_rejected_resolved": int(selection.n_rejected_resolved),
            "n_rejected_unmatched": int(selection.n_rejected_unmatched)}
    if prior is not None:
        diag.update({f"reference_prior.{k}": v for k, v in prior.diagnostics().items()})
    diag.update({f"scale_err.{k}": float(v) for k, v in star_scale_err.items()})
    return FindStarsStage(stars, det.detections, diag, float(norm.normalization), star_ap_corr, star_scale_err,
                          candidates)


def _scale_field(field: ChebyshevField, factor: float) -> ChebyshevField:
    return dataclasses.replace(field, coefficients=field.coefficients * factor, error=field.error * abs(factor))


def _append_sky_sources(stars: Table, sky: Table, exposure: Exposure, config: CalibrateImageConfig) -> Table:
    """Sky sources: apertures in empty regions, measured like the stars, flagged ``sky_source``."""
    if len(sky) == 0:
        return stars
    from .measurement import measure_at_positions

    sky_cat = measure_at_positions(exposure, np.asarray(sky["x"], float), np.asarray(sky["y"], float),
                                   config=config.measurement)
    sky_cat["sky_source"] = np.ones(len(sky_cat), bool)
    # A sky source's position is placed, not measured: its centroid error is undefined (NaN). The
    # measurement returns inf on blank sky, and inf - inf in the sky-coordinate covariance warns.
    for col in ("base_SdssCentroid_xErr", "base_SdssCentroid_yErr"):
        if col in sky_cat.colnames:
            unit = sky_cat[col].unit
            vals = np.asarray(sky_cat[col], float)
            sky_cat[col] = np.where(np.isfinite(vals), vals, np.nan)
            sky_cat[col].unit = unit
    for name in stars.colnames:
        if name not in sky_cat.colnames:
            col = stars[name]
            fill = False if col.dtype == bool else (0 if col.dtype.kind in "iu" else np.nan)
            sky_cat[name] = np.full(len(sky_cat), fill, dtype=col.dtype)
            if getattr(col, "unit", None) is not None:
                sky_cat[name].unit = col.unit
    return _stack_rows([stars, sky_cat])


def _stack_rows(tables: list[Table]) -> Table:
    """The rows of ``tables`` (the same column names) one after another, in the first's column order.

    As ``vstack(join_type="exact")``, but column by column: vstack merges the attributes of each
    of ~190 columns and cost ~25 ms per call on the star catalogues. Column attributes and table
    metadata are the first table's; values of other units are converted to them.
    """
    first = tables[0]
    names = first.colnames
    if any(sorted(t.colnames) != sorted(names) for t in tables[1:]) \
            or any(isinstance(t[c], MaskedColumn) for t in tables for c in t.colnames):
        return vstack([t[names] for t in tables], join_type="exact", metadata_conflicts="silent")
    columns = []
    for name in names:
        col = first[name]
        parts = [np.asarray(col)]
        for t in tables[1:]:
            other = t[name]
            same_unit = other.unit == col.unit or col.unit is None or other.unit is None
            parts.append(np.asarray(other) if same_unit else other.quantity.to_value(col.unit))
        columns.append(Column(np.concatenate(parts), name=name, unit=col.unit, description=col.description,
                              format=col.format, meta=col.meta))
    return Table(columns, meta=first.meta, copy=False)


# --------------------------------------------------------------------------------------
# 5. Photometry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PhotometryStage:
    photo_calib: PhotoCalib
    matches: Table
    quality: Mapping[str, Any]


def calibrate_photometry(stars: Table, refcat: Table, *, band: str, config: CalibrateImageConfig,
                         scale_err: Mapping[str, float] | None = None) -> PhotometryStage:
    """Brief step 8 (fit): the zero point against the reference catalogue.

    ``scale_err`` (relative, per flux, from :func:`correct_apertures`) is the error of the
    aperture correction to total flux; it adds to the zero-point error in quadrature.
    """
    real = stars[~np.asarray(stars["sky_source"], bool)]
    rel = float((scale_err or {}).get(config.photometry.flux_field, 0.0))
    res = fit_photometry(real, refcat, band=band, config=config.photometry,
                         scale_err_mag=2.5 / math.log(10) * rel)
    matches = res.matches
    used_ids = set(np.asarray(real["id"])[np.asarray(res.used, bool)].tolist())
    reserved_ids = set(np.asarray(real["id"])[np.asarray(res.reserved, bool)].tolist())
    matches["calib_photometry_used"] = np.array([int(i) in used_ids for i in matches["src_id"]], bool)
    matches["calib_photometry_reserved"] = np.array([int(i) in reserved_ids for i in matches["src_id"]], bool)
    quality = {
        "n_matches": int(res.n_matches),
        "zero_point_mag": float(res.zero_point_mag),
        "zero_point_err_mag": float(res.zero_point_err_mag),
        "intrinsic_scatter_mag": float(res.intrinsic_scatter_mag),
        "colour_term": None if res.colour_term is None else float(res.colour_term),
        "colour_term_used": bool(res.colour_term_used),
        "reserved_rms_mag": float(res.reserved_rms_mag),
    }
    return PhotometryStage(res.photo_calib, matches, quality)


# --------------------------------------------------------------------------------------
# 6. Calibrated outputs and summary statistics
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FinalizeResult:
    exposure: Exposure
    background: BackgroundList
    stars: Table
    summary: Mapping[str, Any]
    #: :func:`~singleframe.steps.summary.quality_warnings` of the summary (also in the image's
    #: ``metadata["quality.warnings"]``).
    warnings: tuple[str, ...] = ()


def finalize(exposure: Exposure, background: BackgroundList, stars: Table, psf_stars: Table, *,
             wcs: WCS, ap_corr: Mapping[str, ChebyshevField], photo_calib: PhotoCalib,
             astrometry_matches: Table | None, photometry_matches: Table | None,
             config: CalibrateImageConfig) -> FinalizeResult:
    """Brief steps 7–9: nJy image, background and catalogue; summary statistics."""
    stars = stars.copy()
    flags_from = photometry_matches if photometry_matches is not None else Table()
    for flag in ("calib_photometry_used", "calib_photometry_reserved"):
        ids = np.zeros(0, np.int64)
        if flag in flags_from.colnames:
            ids = np.asarray(flags_from["src_id"], np.int64)[np.asarray(flags_from[flag], bool)]
        stars[flag] = np.isin(np.asarray(stars["id"], np.int64), ids)
    exposure = exposure.replace(wcs=wcs, ap_corr=dict(ap_corr), photo_calib=photo_calib, background=background)
    summary = compute_summary_stats(exposure, stars=stars, psf_stars=psf_stars, background=background,
                                    astrometry_matches=astrometry_matches, photo_calib=photo_calib,
                                    config=config.summary)
    stars = calibrate_catalog(stars, photo_calib)
    visit = exposure.visit_info
    stars["visit"] = np.full(len(stars), visit.visit, dtype=np.int64)
    stars["detector"] = np.full(len(stars), exposure.detector.id, dtype=np.int64)
    stars["band"] = np.full(len(stars), visit.band)
    if config.calibrate_pixels:
        cal = calibrate_exposure(exposure, photo_calib, background=background)
        exposure, background = cal.exposure, cal.background
    warnings = tuple(quality_warnings(summary, config.summary))
    exposure = exposure.replace(summary=dict(summary))
    if warnings:
        exposure = exposure.with_metadata(**{"quality.warnings": list(warnings)})
    return FinalizeResult(exposure, background, stars, summary, warnings)


# --------------------------------------------------------------------------------------
# All stages in memory
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CalibrateImageResult:
    """Every product of :func:`calibrate_image`, named as the output datasets."""

    preliminary_visit_image: Exposure
    preliminary_visit_image_background: BackgroundList
    single_visit_star_unstandardized: Table
    #: The four optional outputs are None when left out of ``config.optional_outputs``.
    single_visit_psf_star: Table | None
    single_visit_psf_star_footprints: Table | None
    initial_astrometry_match_detector: Table | None
    initial_photometry_match_detector: Table | None
    initial_photoCalib_detector: PhotoCalib
    timings_s: Mapping[str, float]


def calibrate_image(snaps: Sequence[Exposure], refcat: Table, *, config: CalibrateImageConfig) -> CalibrateImageResult:
    """Run all stages in memory (no store, no Prefect); times each stage."""
    import time

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ch = characterize(snaps, config=config)
    t["characterize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ap = correct_apertures(ch.exposure, ch.psf_stars, config=config)
    t["correct_apertures"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ast = calibrate_astrometry(ch.exposure, ap.psf_stars, refcat, config=config)
    t["calibrate_astrometry"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs = find_stars(ch.exposure, ast.psf_stars, wcs=ast.wcs, ap_corr=ap.ap_corr,
                    normalization=ap.normalization, config=config, scale_err=ap.scale_err, refcat=refcat)
    t["find_stars"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ph = calibrate_photometry(fs.stars, refcat, band=ch.exposure.visit_info.band, config=config,
                              scale_err=fs.scale_err)
    t["calibrate_photometry"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fin = finalize(ch.exposure, ch.background, fs.stars, ast.psf_stars, wcs=ast.wcs, ap_corr=fs.ap_corr,
                   photo_calib=ph.photo_calib, astrometry_matches=ast.matches,
                   photometry_matches=ph.matches, config=config)
    t["finalize"] = time.perf_counter() - t0
    wanted = set(config.optional_outputs)

    def optional(name: str, product: Table) -> Table | None:
        return product if name in wanted else None

    return CalibrateImageResult(
        fin.exposure, fin.background, fin.stars,
        optional("single_visit_psf_star", ast.psf_stars),
        optional("single_visit_psf_star_footprints", ch.footprints),
        optional("initial_astrometry_match_detector", ast.matches),
        optional("initial_photometry_match_detector", ph.matches),
        ph.photo_calib, t,
    )


def refcat_search_radius_deg(exposure: Exposure, margin_arcsec: float) -> tuple[float, float, float]:
    """(ra, dec, radius) in degrees of a circle covering the detector plus a margin."""
    if exposure.wcs is None:
        raise AstrometryError("the exposure has no WCS, so no reference stars can be loaded for it; give its "
                              "FITS file a celestial WCS (CTYPE/CRVAL/CD keywords) and ingest it again")
    x0, y0, x1, y1 = exposure.bbox
    cx, cy = exposure.center_pix
    ra_c, dec_c = exposure.pixel_to_sky(cx, cy)
    ra_k, dec_k = exposure.pixel_to_sky(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(float(ra_c), float(dec_c), unit="deg")
    r = float(np.max(c.separation(SkyCoord(ra_k, dec_k, unit="deg")).to_value(u.deg)))
    return float(ra_c), float(dec_c), r + margin_arcsec / 3600.0


__all__ = [
    "CalibrateImageResult", "calibrate_image", "characterize", "correct_apertures", "calibrate_astrometry",
    "find_stars", "calibrate_photometry", "finalize", "refcat_search_radius_deg", "require_good_centroids",
]
