"""Calibration-flux normalisation and aperture-correction fields.

1. The compensated top-hat flux (``base_CompensatedTophatFlux_12``) is scaled
   to the total flux with one constant measured on bright PSF stars; the
   result is the calibration flux ``base_NormalizedCompensatedTophatFlux``
   (Rubin's ``slot_CalibFlux``). The constant is the product of
   (a) compensated → 12-px aperture (mean ratio, as Rubin) and
   (b) a curve-of-growth factor 12-px → ``total_aperture`` (the largest
   aperture, 25 px): Rubin stops at (a), so its zero point absorbs the
   ~1 % of a star's light outside 12 px (−10 mmag on the simulated
   Kolmogorov PSF) and calibrated fluxes are 12-px, not total, fluxes.
   (b) is the intercept of the weighted fit ``f_tot/f_12 − 1 = g + c / f_12``:
   light of undetected sources and background errors add a constant ``c``
   counts to the large aperture, which a plain mean turns into a bias of
   ~+5 mmag for stars of 10⁴–10⁵ counts; extrapolating to infinite flux removes it.
   ``f_tot`` is the 25-px flux plus a power-law wing beyond it fitted through
   the 17- and 25-px apertures (``tail_aperture``; Kolmogorov ``r^-5/3``
   enclosed-flux deficit): the 25-px aperture alone misses 3–7 mmag at
   0.6–1.0" seeing. :func:`measure_normalization` does (a)+(b) on any star
   selection; the pipeline re-measures it on the deblended star pass
   (``find_stars``), whose apertures hold no light of neighbours fainter
   than the PSF pass's S/N ≥ 50 threshold.
2. For each model flux (PSF, Gaussian) the ratio calibration flux / model flux
   is fitted over the detector with a 2-D Chebyshev field. With too few bright
   stars the field is a flagged constant instead of a fatal error (Rubin's
   ``MeasureApCorrError`` weakness).

   The calibration flux is noisy (12-px aperture plus annulus: ~8 mmag per
   S/N-200 star), so a direct order-2 fit of calib / PSF flux on the few
   dozen bright stars of a detector carried 3-7 mmag of fit noise at the star
   positions (benchmark 2048² frames), while the true calibration / total ratio
   is flat to 0.4 mmag rms. The shape that matters is the PSF flux's: a PSF-model
   size error ε biases the PSF flux by ~ε (0.5 % → 5 mmag), and that error
   varies over the detector with the model. Hence a *bridge* flux
   (``bridge_flux``, the adaptive Gaussian flux): its weight follows each star's
   own shape, so its fraction of the total flux is invariant under the dilation
   and shear of the PSF across the detector (constant to 1e-6 on the simulated
   PSF field). Each other field is ``field(bridge) × (bridge / flux)``: the
   first (calibration / bridge, noisy) with the lowest order the stars support
   (BIC, usually a constant), the second (bridge / flux, two fluxes of the same
   pixels, ~1 mmag per star) at full order on every PSF star with S/N ≥
   ``bridge_min_snr``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from scipy.spatial import cKDTree

from ..errors import ApertureCorrectionError, ConfigError
from ..fields import ChebyshevField
from .measurement import AP_CORR_FIELDS, compensated_name

CALIB_FLUX = "base_NormalizedCompensatedTophatFlux"
#: Flags that exclude a star from the normalisation and the aperture corrections.
BAD_NORMALIZATION_FLAGS = _BAD_FLAGS = (
    "base_PixelFlags_flag_edge", "base_PixelFlags_flag_nodata", "base_PixelFlags_flag_saturatedCenter",
    "base_PixelFlags_flag_interpolatedCenter", "base_PixelFlags_flag_crCenter", "base_PixelFlags_flag_bad",
    "base_SdssCentroid_flag",
)


@dataclass(frozen=True)
class ApertureCorrectionConfig:
    """Configuration of :func:`measure_aperture_correction`."""

    #: Fluxes to correct (each needs ``<name>_instFlux``/``_instFluxErr``/``_flag`` columns).
    fields: tuple[str, ...] = AP_CORR_FIELDS
    #: Raw calibration flux stem and the aperture it is normalised to.
    raw_calib_flux: str = "base_CompensatedTophatFlux_12"
    reference_aperture: str = "base_CircularApertureFlux_12_0"
    #: Aperture holding the total flux (``None``: calibration flux = ``reference_aperture`` flux, as Rubin).
    total_aperture: str | None = "base_CircularApertureFlux_25_0"
    #: Light beyond ``total_aperture``: a power-law wing, enclosed flux ``F(r) = F_inf - A r^-p``,
    #: fitted through this smaller aperture and ``total_aperture`` (``None``: no extrapolation, total =
    #: ``total_aperture`` flux). A Kolmogorov PSF has ``p = 5/3`` (surface brightness ~ r^-11/3): the
    #: 25-px aperture misses 3-7 mmag at 0.6-1.0" and the extrapolation recovers it to 0.1-0.7 mmag.
    #: At 17-25 px the wing is not yet asymptotic (effective index 1.74 at 0.8", 1.84 at 1.3" on the
    #: true benchmark PSFs), so 5/3 over-extrapolates by 0.3 and 1.6 mmag there (the mean aperture-
    #: correction errors of those frames); a larger total aperture would cut this at +75 % aperture time.
    tail_aperture: str | None = "base_CircularApertureFlux_17_0"
    tail_power_index: float = 5.0 / 3.0
    #: Stars for the curve of growth: clean stars with ``reference_aperture`` S/N at least this. The
    #: faint ones carry little weight on the factor but pin the constant ``c`` (light of undetected
    #: sources, background error) of the extrapolation; 20 rather than 10 avoids the detection
    #: threshold, where selection biases the 12-px flux bright. On the 21 test detectors 50 gave a
    #: pull std of 1.32 (c poorly constrained), 20 gives 1.01.
    cog_min_snr: float = 20.0
    #: Fewer curve-of-growth stars: the factor is the weighted mean ratio (no extrapolation);
    #: fewer than 2: no factor (1.0 ± ``cog_fallback_err``) and ``cog_fallback`` is set.
    cog_min_stars: int = 10
    #: Relative error of the factor when no star measures it: the light beyond the reference
    #: aperture that the calibration then leaves out (1-2 % for a 12-px aperture at 0.6-1.3"
    #: seeing on the simulated Kolmogorov PSF, more in bad seeing), so fluxes are then low by about
    #: that much (the flag says so). It enters the flux-scale and zero-point errors, which a
    #: missing factor must widen, never narrow.
    cog_fallback_err: float = 0.02
    #: When fewer than ``cog_min_stars`` stars have a reference aperture free of zeroed neighbour
    #: pixels (the stars used first, see :func:`_curve_of_growth`), use those whose nearest other
    #: catalogue source is farther than this (pixels) instead of all (0: use all).
    cog_isolation_pix: float = 20.0
    #: S/N thresholds tried in turn for the normalisation stars (first with >= min_norm_stars).
    normalization_snr_thresholds: tuple[float, ...] = (200.0, 100.0, 50.0, 20.0)
    min_norm_stars: int = 3
    #: Minimum S/N of base_PsfFlux for aperture-correction stars. With fewer than ``min_stars`` above
    #: it, the thresholds of ``normalization_snr_thresholds`` below it are tried in turn (when none
    #: reaches ``min_stars``, the first that holds any star): a short or sparse exposure whose PSF
    #: stars are all below S/N 200 gets its corrections from them instead of failing (Rubin's
    #: ``MeasureApCorrError``).
    min_snr: float = 200.0
    #: Below this many stars a field is a flagged constant (median ratio).
    min_stars: int = 8
    #: Chebyshev order of each field (reduced until dof >= min_dof).
    order: int = 2
    min_dof: int = 1
    #: Outlier clipping: iterations and threshold in robust sigmas.
    n_clip_iterations: int = 4
    clip_sigma: float = 4.0
    #: Bridge flux (one of ``fields``; ``None``: every field fits calibration / flux directly, as
    #: Rubin). Its own field's order is chosen by BIC in 0..``order``; every other field is the
    #: bridge field times a ``(bridge / flux)`` field of ``order`` (see the module docstring).
    bridge_flux: str | None = "base_GaussianFlux"
    #: Minimum S/N of the corrected flux for the PSF stars fitting its ``bridge / flux`` ratio field. 50 (the PSF
    #: pass threshold) rather than ``min_snr``: the ratio of two fluxes of the same pixels has
    #: ~1 mmag of noise at S/N 200, so 3x more stars cut the fit noise (2048-sparse: 3.6 → 1.9 mmag).
    bridge_min_snr: float = 50.0
    #: Relative error added in quadrature to each star's ratio error in the weighted fits (keeps
    #: the brightest stars from dominating through unmodelled per-star effects).
    ratio_error_floor: float = 0.001
    #: With no PSF star at all (``psf_fallback: seeing``), the normalisation and the (flagged, constant)
    #: corrections are those of a noiseless star drawn from the installed PSF model; this relative
    #: error is added to every flux scale: the header-seeing Gaussian is not the PSF (a Kolmogorov
    #: star of the same FWHM has ~3-5 % of its light in wings the Gaussian lacks).
    model_star_err: float = 0.05

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the fields are inconsistent."""
        if not self.fields:
            raise ConfigError("aperture_correction.fields must not be empty")
        if self.bridge_flux is not None and self.bridge_flux not in self.fields:
            raise ConfigError(f"aperture_correction.bridge_flux={self.bridge_flux!r} must be one of fields "
                              f"{self.fields} (or null to fit every field directly)")
        if self.bridge_min_snr < 0 or self.ratio_error_floor < 0:
            raise ConfigError("need bridge_min_snr >= 0 and ratio_error_floor >= 0")
        if self.order < 0 or self.min_dof < 1 or self.min_stars < 1 or self.min_norm_stars < 1:
            raise ConfigError("need order >= 0, min_dof >= 1, min_stars >= 1 and min_norm_stars >= 1")
        if self.clip_sigma <= 0 or self.n_clip_iterations < 0 or self.min_snr < 0:
            raise ConfigError("need clip_sigma > 0, n_clip_iterations >= 0 and min_snr >= 0")
        if self.cog_min_snr < 0 or self.cog_min_stars < 3 or self.cog_isolation_pix < 0:
            raise ConfigError("need cog_min_snr >= 0, cog_min_stars >= 3 and cog_isolation_pix >= 0")
        if not self.model_star_err >= 0:
            raise ConfigError(f"model_star_err must be >= 0, got {self.model_star_err}")
        if not self.cog_fallback_err >= 0:
            raise ConfigError(f"cog_fallback_err must be >= 0, got {self.cog_fallback_err}")
        if not self.normalization_snr_thresholds:
            raise ConfigError("normalization_snr_thresholds must not be empty")
        if not self.tail_power_index > 0:
            raise ConfigError(f"aperture_correction.tail_power_index must be > 0, got {self.tail_power_index}")
        if self.tail_aperture is not None and self.total_aperture is not None:
            if not aperture_radius(self.tail_aperture) < aperture_radius(self.total_aperture):
                raise ConfigError("aperture_correction.tail_aperture must be smaller than total_aperture, got "
                                  f"{self.tail_aperture!r} and {self.total_aperture!r}")


@dataclass(frozen=True, eq=False)
class ApertureCorrectionResult:
    """Aperture-correction fields and the normalised catalogue.

    ``normalization`` multiplies the raw compensated flux to give the
    calibration flux (total flux); ``normalization_err`` is its relative
    one-sigma error (a systematic shared by every flux of the detector);
    ``curve_of_growth`` is the 12-px → total factor included in it;
    ``used[name]`` marks the stars kept for each field; ``fallback`` is True
    when any field is a flagged constant.
    """

    ap_corr: dict[str, ChebyshevField]
    normalization: float
    used: dict[str, npt.NDArray[np.bool_]]
    fallback: bool
    n_stars: int
    catalog: Table
    normalization_n_stars: int = 0
    normalization_snr: float = float("nan")
    normalization_err: float = 0.0
    curve_of_growth: float = 1.0
    curve_of_growth_err: float = 0.0
    curve_of_growth_n_stars: int = 0
    cog_fallback: bool = False
    #: Relative one-sigma error of the flux scale of each corrected flux (and of the calibration
    #: flux): the normalisation error and, for a field, the error of its mean level. Pass it to
    #: ``fit_photometry(scale_err_mag=1.0857 * scale_err[flux_field])``.
    scale_err: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The PSF-flux S/N the correction stars were selected at (``min_snr`` or a lower threshold).
    min_snr_used: float = float("nan")


def measure_aperture_correction(catalog: Table, *, bbox: tuple[float, float, float, float],
                                config: ApertureCorrectionConfig = ApertureCorrectionConfig()) -> ApertureCorrectionResult:
    """Normalise the calibration flux and fit aperture-correction fields on PSF stars.

    Parameters
    ----------
    catalog
        PSF-pass catalogue with ``calib_psf_used``.
    bbox
        ``(x_min, y_min, x_max, y_max)`` of the detector, parent pixels.
    config
        Options.

    Returns
    -------
    ApertureCorrectionResult
        ``catalog`` is a copy with ``base_NormalizedCompensatedTophatFlux_*``
        filled and ``apcorr_<name>_used`` columns added.

    Raises
    ------
    ApertureCorrectionError
        No usable star for the normalisation or for a field.

    Notes
    -----
    Each field fits ``z = calib / flux`` with 4 passes of 4×(normal-scaled
    MAD) clipping around the current fit (starting from the median), order
    reduced until the degrees of freedom reach ``min_dof``, then shifts the
    constant so the median residual is zero. Its ``error`` is the clipped
    robust scatter.
    """
    config.validate()
    if "calib_psf_used" not in catalog.colnames:
        raise ApertureCorrectionError("the catalogue has no calib_psf_used column; fit the PSF first")
    psf_used = np.asarray(catalog["calib_psf_used"], bool)
    clean = psf_used.copy()
    for name in _BAD_FLAGS:
        if name in catalog.colnames:
            clean &= ~np.asarray(catalog[name], bool)
    x = np.asarray(catalog["base_SdssCentroid_x"], float)
    y = np.asarray(catalog["base_SdssCentroid_y"], float)

    # --- 1. normalisation of the compensated flux to total flux -----------------------
    norm = measure_normalization(catalog, clean, config=config)
    normalization, normalization_err = norm.normalization, norm.normalization_err
    out = apply_normalization(catalog, normalization, raw_calib_flux=config.raw_calib_flux)

    # --- 2. aperture-correction fields -----------------------------------------------
    calib = np.asarray(out[f"{CALIB_FLUX}_instFlux"], float)
    calib_rel = np.asarray(out[f"{CALIB_FLUX}_instFluxErr"], float) / np.where(calib != 0, np.abs(calib), np.nan)
    calib_ok = ~np.asarray(out[f"{CALIB_FLUX}_flag"], bool) & np.isfinite(calib) & (calib > 0)
    psf_flux = np.asarray(catalog["base_PsfFlux_instFlux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        psf_snr = psf_flux / np.asarray(catalog["base_PsfFlux_instFluxErr"], float)
    usable = clean & calib_ok & np.isfinite(psf_snr)
    thresholds = [float(config.min_snr), *(float(t) for t in config.normalization_snr_thresholds if t < config.min_snr)]
    counts = [int(np.count_nonzero(usable & (psf_snr >= t))) for t in thresholds]
    # The first threshold with min_stars stars (a fitted field); failing that, the first with any
    # (a flagged constant from the brightest there are).
    pick = next((i for i, c in enumerate(counts) if c >= config.min_stars),
                next((i for i, c in enumerate(counts) if c), len(thresholds) - 1))
    min_snr_used = thresholds[pick]
    bright = usable & (psf_snr >= min_snr_used)
    bridge = config.bridge_flux
    if bridge is not None and not all(f"{bridge}_{c}" in catalog.colnames for c in ("instFlux", "instFluxErr", "flag")):
        bridge = None  # no bridge flux measured: every field is fitted directly
    names = sorted(config.fields, key=lambda n: n != bridge)  # the bridge field first
    ap_corr: dict[str, ChebyshevField] = {}
    used: dict[str, npt.NDArray[np.bool_]] = {}
    level_rel: dict[str, float] = {}
    scale_err: dict[str, float] = {CALIB_FLUX: normalization_err}
    fallback = False
    n_stars = 0
    for name in names:
        flux, flux_rel, flux_ok = _flux_columns(catalog, name)
        mask = np.zeros(len(catalog), bool)
        if bridge is None or name == bridge:
            sel = bright & flux_ok
            idx = np.nonzero(sel)[0]
            if idx.size == 0:
                raise ApertureCorrectionError(
                    f"no PSF star with S/N >= {min_snr_used:g} and a clean {name} for the aperture correction; "
                    "lower aperture_correction.min_snr and normalization_snr_thresholds",
                    metadata={"field": name, "n_psf_used": int(psf_used.sum()), "n_bright": int(bright.sum())})
            z = calib[idx] / flux[idx]
            if bridge is None:
                fld, keep = _fit_field(x[idx], y[idx], z, bbox, config)
            else:
                var = z**2 * (calib_rel[idx] ** 2 + flux_rel[idx] ** 2 + config.ratio_error_floor**2)
                fld, keep = _fit_field(x[idx], y[idx], z, bbox, config, weights=1.0 / var, select_order=True)
            n_keep = int(keep.sum())
            level_rel[name] = fld.error / float(np.median(z[keep])) / np.sqrt(n_keep) if n_keep > 1 else 0.0
        else:
            b_flux, b_rel, b_ok = _flux_columns(catalog, bridge)
            with np.errstate(divide="ignore", invalid="ignore"):
                snr = 1.0 / flux_rel
            bridge_snr = min(config.bridge_min_snr, min_snr_used)
            idx = np.nonzero(clean & flux_ok & b_ok & (snr >= bridge_snr))[0]
            if idx.size == 0:
                raise ApertureCorrectionError(
                    f"no PSF star with {name} S/N >= {bridge_snr:g} and a clean {bridge} for the "
                    f"aperture correction; lower aperture_correction.bridge_min_snr",
                    metadata={"field": name, "n_psf_used": int(psf_used.sum())})
            r = b_flux[idx] / flux[idx]
            var = r**2 * (b_rel[idx] ** 2 + flux_rel[idx] ** 2 + config.ratio_error_floor**2)
            ratio_fld, keep = _fit_field(x[idx], y[idx], r, bbox, config, weights=1.0 / var)
            fld = _product_field(ap_corr[bridge], ratio_fld)
            n_keep = int(keep.sum())
            r_level = ratio_fld.error / float(np.median(r[keep])) / np.sqrt(n_keep) if n_keep > 1 else 0.0
            level_rel[name] = float(np.hypot(level_rel[bridge], r_level))
            # Scatter of calibration / flux about the field on the bright stars, as for a direct fit.
            b_idx = np.nonzero(bright & flux_ok)[0]
            resid = calib[b_idx] / flux[b_idx] - fld.evaluate(x[b_idx], y[b_idx])
            err = _robust_sigma(resid[_clip_constant(resid, config)]) if b_idx.size > 1 else float("nan")
            fld = dataclasses.replace(fld, error=err if np.isfinite(err) else ap_corr[bridge].error)
        fallback |= fld.flagged_fallback
        mask[idx[keep]] = True
        used[name] = mask
        ap_corr[name] = fld
        out[f"apcorr_{name}_used"] = mask
        n_stars = max(n_stars, int(keep.sum()))
        scale_err[name] = float(np.hypot(normalization_err, level_rel[name]))
    ap_corr = {name: ap_corr[name] for name in config.fields}
    used = {name: used[name] for name in config.fields}
    return ApertureCorrectionResult(ap_corr, normalization, used, bool(fallback), n_stars, out,
                                    norm.n_stars, norm.snr, normalization_err, norm.curve_of_growth,
                                    norm.curve_of_growth_err, norm.curve_of_growth_n_stars, norm.cog_fallback,
                                    scale_err, min_snr_used)


@dataclass(frozen=True)
class NormalizationResult:
    """Compensated flux → total flux factor (see :func:`measure_normalization`).

    ``normalization`` = ``aperture_ratio`` (compensated → ``reference_aperture``) ×
    ``curve_of_growth`` (``reference_aperture`` → total); ``*_err`` are relative one-sigma errors.
    """

    normalization: float
    normalization_err: float
    aperture_ratio: float
    n_stars: int
    snr: float
    curve_of_growth: float = 1.0
    curve_of_growth_err: float = 0.0
    curve_of_growth_n_stars: int = 0
    cog_fallback: bool = False


def measure_normalization(catalog: Table, stars: npt.ArrayLike, *,
                          config: ApertureCorrectionConfig = ApertureCorrectionConfig()) -> NormalizationResult:
    """Factor turning the raw compensated flux into total flux, measured on point sources.

    Parameters
    ----------
    catalog
        Catalogue with the compensated, reference, tail and total aperture fluxes.
    stars
        Boolean mask of clean, unresolved, unsaturated stars to use (the PSF stars of the PSF pass,
        or better the deblended star pass, whose apertures hold less undetected neighbours' light).
    config
        Options.

    Raises
    ------
    ApertureCorrectionError
        No star with positive compensated and reference-aperture fluxes.
    """
    config.validate()
    clean = np.asarray(stars, bool)
    if clean.shape != (len(catalog),):
        raise ConfigError(f"stars mask has shape {clean.shape}, expected ({len(catalog)},)")
    raw = np.asarray(catalog[f"{config.raw_calib_flux}_instFlux"], float)
    raw_err = np.asarray(catalog[f"{config.raw_calib_flux}_instFluxErr"], float)
    ref = np.asarray(catalog[f"{config.reference_aperture}_instFlux"], float)
    ok = clean & ~np.asarray(catalog[f"{config.raw_calib_flux}_flag"], bool) \
        & ~np.asarray(catalog[f"{config.reference_aperture}_flag"], bool) \
        & np.isfinite(raw) & (raw > 0) & np.isfinite(ref) & (ref > 0) & (raw_err > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = raw / raw_err
    norm_sel = np.zeros(len(catalog), bool)
    norm_snr = float("nan")
    for thr in config.normalization_snr_thresholds:
        norm_sel = ok & (snr >= thr)
        norm_snr = float(thr)
        if norm_sel.sum() >= config.min_norm_stars:
            break
    if not norm_sel.any():
        norm_sel = ok
        norm_snr = 0.0
    if not norm_sel.any():
        raise ApertureCorrectionError(
            "no clean star with positive compensated and reference-aperture fluxes to normalise the calibration "
            "flux; check the PSF fit (calib_psf_used), the star selection and the measurement flags",
            metadata={"n_stars": int(clean.sum())})
    ratio = ref[norm_sel] / raw[norm_sel]
    kept = _clip_constant(ratio, config)
    norm12 = float(np.mean(ratio[kept]))
    norm12_err = (float(np.std(ratio[kept], ddof=1)) / np.sqrt(kept.sum()) / norm12) if kept.sum() > 1 else 0.0
    cog, cog_err, n_cog, cog_fallback = 1.0, 0.0, 0, False
    if config.total_aperture is not None:
        cog, cog_err, n_cog, cog_fallback = _curve_of_growth(catalog, clean, config)
    return NormalizationResult(norm12 * cog, float(np.hypot(norm12_err, cog_err)), norm12, int(norm_sel.sum()),
                               norm_snr, cog, cog_err, n_cog, cog_fallback)


def aperture_radius(stem: str) -> float:
    """Radius (pixels) of ``base_CircularApertureFlux_<whole>_<tenths>``."""
    parts = stem.rsplit("_", 2)
    try:
        return float(parts[-2]) + float(parts[-1]) / 10.0
    except (ValueError, IndexError):
        raise ConfigError(f"cannot read an aperture radius from {stem!r}; expected base_CircularApertureFlux_<r>_<t>") \
            from None


def _require_columns(catalog: Table, cols: list[str], *, knob: str, stem: str) -> None:
    """ConfigError naming the option whose aperture the catalogue lacks."""
    missing = [c for c in cols if c not in catalog.colnames]
    if missing:
        raise ConfigError(f"aperture_correction.{knob}={stem!r}: the catalogue has no {missing}; measure that "
                          f"aperture (measurement.aperture_radii_pix) or set {knob} to null")


def _curve_of_growth(catalog: Table, clean: npt.NDArray[np.bool_],
                     config: ApertureCorrectionConfig) -> tuple[float, float, int, bool]:
    """Factor ``f_total / f_ref`` for a point source, its error, stars used and a fallback flag.

    ``f_total`` is the ``total_aperture`` flux, extrapolated to infinity with the power-law wing
    through ``tail_aperture`` when that is set.

    Weighted fit of ``g_i = f_tot/f_ref − 1 = g + c / f_ref`` (weights from the annulus noise,
    3-sigma clipping on the normal-scaled MAD of the normalised residuals); the error is scaled by
    sqrt(χ²/dof) when above 1, because the contamination of the annulus is not in the pixel errors.
    (A relative intrinsic scatter instead, tried on the 21 test detectors, inflates the error to
    25-40 mmag: the faint stars' scatter is additive counts, which the χ² scaling represents.)

    The stars are those whose reference aperture holds no zeroed pixel of another footprint
    (sep's segmentation-map masking), when at least ``cog_min_stars`` remain. A neighbour's
    footprint reaching into the reference aperture also covers much of the annulus and removes
    the star's own wing light: those stars give 1.0120-1.0127 on the 4096² typical and crowded
    and 2048² crowded benchmark frames (true 1.0160), while the stars with zeroed pixels in the
    annulus only give 1.0161-1.0169. Requiring the whole total aperture to be free (the former
    rule) kept half as many stars (4096² typical: 345 against 745 fitted) and 9 on the 2048²
    crowded frame, too few, so it fell back to isolated stars (1.0133 there). With ``make bench``'s
    evaluator on its nine frames, the former rule gave aperture corrections of 0.25-5.93 mmag rms
    (sum of squares 54 mmag²), this one 0.16-2.88 mmag (22 mmag²): better on seven frames,
    0.1-0.3 mmag worse on the 2048² typical and sparse ones.
    """
    tot_stem, ref_stem = config.total_aperture, config.reference_aperture
    _require_columns(catalog, [f"{tot_stem}_instFlux", f"{tot_stem}_instFluxErr", f"{tot_stem}_flag",
                               f"{ref_stem}_instFluxErr"], knob="total_aperture", stem=tot_stem)
    f_ref = np.asarray(catalog[f"{ref_stem}_instFlux"], float)
    e_ref = np.asarray(catalog[f"{ref_stem}_instFluxErr"], float)
    f_tot = np.asarray(catalog[f"{tot_stem}_instFlux"], float)
    e_tot = np.asarray(catalog[f"{tot_stem}_instFluxErr"], float)
    # Noise of the annulus between the two apertures (the shared inner pixels cancel).
    e_ann = np.sqrt(np.maximum(e_tot**2 - e_ref**2, 0.0))
    ok = clean & ~np.asarray(catalog[f"{tot_stem}_flag"], bool) & ~np.asarray(catalog[f"{ref_stem}_flag"], bool) \
        & np.isfinite(f_ref) & np.isfinite(f_tot) & (f_ref > 0) & (e_ref > 0) & (e_ann > 0)
    tail_stem = config.tail_aperture
    if tail_stem is not None:
        _require_columns(catalog, [f"{tail_stem}_instFlux", f"{tail_stem}_instFluxErr", f"{tail_stem}_flag"],
                         knob="tail_aperture", stem=tail_stem)
        f_mid = np.asarray(catalog[f"{tail_stem}_instFlux"], float)
        e_mid = np.asarray(catalog[f"{tail_stem}_instFluxErr"], float)
        # F(r) = F_inf - A r^-p through (r_mid, F_mid) and (r_tot, F_tot): F_inf = F_tot + t (F_tot - F_mid).
        t = 1.0 / ((aperture_radius(tot_stem) / aperture_radius(tail_stem)) ** config.tail_power_index - 1.0)
        var_in = np.maximum(e_mid**2 - e_ref**2, 0.0)  # ref -> mid annulus
        var_out = np.maximum(e_tot**2 - e_mid**2, 0.0)  # mid -> tot annulus, weighted (1 + t)
        f_tot = f_tot + t * (f_tot - f_mid)
        e_ann = np.sqrt(var_in + (1.0 + t) ** 2 * var_out)
        ok &= ~np.asarray(catalog[f"{tail_stem}_flag"], bool) & np.isfinite(f_mid) & (e_ann > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok &= f_ref / e_ref >= config.cog_min_snr
    neigh_col = f"{ref_stem}_flag_neighbours"
    if neigh_col in catalog.colnames:
        # Other sources' pixels are zeroed in the reference aperture: drop those stars when enough
        # remain (see the docstring for why the reference aperture and not the total one).
        free = ok & ~np.asarray(catalog[neigh_col], bool)
        if free.sum() >= config.cog_min_stars:
            ok = free
        elif config.cog_isolation_pix > 0 and len(catalog) > 1:
            xy = np.column_stack([np.asarray(catalog["base_SdssCentroid_x"], float),
                                  np.asarray(catalog["base_SdssCentroid_y"], float)])
            fin = np.all(np.isfinite(xy), axis=1)
            nearest = np.full(len(catalog), np.inf)
            if fin.sum() > 1:
                nearest[fin] = cKDTree(xy[fin]).query(xy[fin], k=2)[0][:, 1]
            isolated = ok & (nearest > config.cog_isolation_pix)
            if isolated.sum() >= config.cog_min_stars:
                ok = isolated
    idx = np.flatnonzero(ok)
    if idx.size < 2:
        return 1.0, float(config.cog_fallback_err), int(idx.size), True
    g = f_tot[idx] / f_ref[idx] - 1.0
    sg = e_ann[idx] / f_ref[idx]
    inv = 1.0 / f_ref[idx]
    extrapolate = idx.size >= config.cog_min_stars
    design = np.column_stack([np.ones(idx.size), inv]) if extrapolate else np.ones((idx.size, 1))
    keep = np.ones(idx.size, bool)
    params, cov = _weighted_lstsq(design, g, sg**2)
    for _ in range(max(config.n_clip_iterations, 1)):
        params, cov = _weighted_lstsq(design[keep], g[keep], sg[keep] ** 2)
        z = (g - design @ params) / sg
        sig = 1.4826 * float(np.median(np.abs(z[keep] - np.median(z[keep]))))
        new = np.abs(z) <= 3.0 * max(sig, 1.0)
        if new.sum() < design.shape[1] + 1 or np.array_equal(new, keep):
            break
        keep = new
    dof = int(keep.sum()) - design.shape[1]
    chi2 = float(np.sum(((g - design @ params) / sg)[keep] ** 2)) / dof if dof > 0 else 1.0
    err = float(np.sqrt(cov[0, 0] * max(chi2, 1.0)))
    factor = 1.0 + float(params[0])
    return factor, err / factor, int(keep.sum()), not extrapolate


def _weighted_lstsq(design: npt.NDArray[np.float64], g: npt.NDArray[np.float64],
                    var: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    w = 1.0 / var
    cov = np.linalg.inv((design.T * w) @ design)
    return cov @ ((design.T * w) @ g), cov


def apply_normalization(catalog: Table, normalization: float, *,
                        raw_calib_flux: str = compensated_name(12.0)) -> Table:
    """Copy of ``catalog`` with ``base_NormalizedCompensatedTophatFlux_*`` = raw compensated flux × ``normalization``."""
    out = catalog.copy(copy_data=True)
    raw = np.asarray(catalog[f"{raw_calib_flux}_instFlux"], float)
    err = np.asarray(catalog[f"{raw_calib_flux}_instFluxErr"], float)
    unit = catalog[f"{raw_calib_flux}_instFlux"].unit
    out[f"{CALIB_FLUX}_instFlux"] = raw * normalization
    out[f"{CALIB_FLUX}_instFluxErr"] = err * abs(normalization)
    out[f"{CALIB_FLUX}_instFlux"].unit = unit
    out[f"{CALIB_FLUX}_instFluxErr"].unit = unit
    out[f"{CALIB_FLUX}_flag"] = np.asarray(catalog[f"{raw_calib_flux}_flag"], bool) | ~np.isfinite(raw)
    return out


def _robust_sigma(r: npt.NDArray[np.float64]) -> float:
    return float(np.median(np.abs(r - np.median(r)))) * 1.4826 if r.size else float("nan")


def _clip_constant(z: npt.NDArray[np.float64], config: ApertureCorrectionConfig) -> npt.NDArray[np.bool_]:
    keep = np.ones(z.size, bool)
    for _ in range(config.n_clip_iterations):
        centre = float(np.median(z[keep]))
        sig = _robust_sigma(z[keep])
        if not sig > 0:
            break
        new = np.abs(z - centre) <= config.clip_sigma * sig
        if np.array_equal(new, keep) or new.sum() == 0:
            break
        keep = new
    return keep


def _flux_columns(catalog: Table, name: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64],
                                                     npt.NDArray[np.bool_]]:
    """Flux, relative error and the usable mask (unflagged, finite, positive) of ``<name>``."""
    flux = np.asarray(catalog[f"{name}_instFlux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.asarray(catalog[f"{name}_instFluxErr"], float) / flux
    ok = ~np.asarray(catalog[f"{name}_flag"], bool) & np.isfinite(flux) & (flux > 0) & np.isfinite(rel) & (rel > 0)
    return flux, rel, ok


def _product_field(a: ChebyshevField, b: ChebyshevField) -> ChebyshevField:
    """The exact product of two Chebyshev fields on the same bbox (order ``a.order + b.order``).

    Uses ``T_i T_k = (T_{i+k} + T_{|i-k|}) / 2`` along each axis; flagged if either factor is.
    """
    ca, cb = a.coefficients, b.coefficients
    n = ca.shape[0] + cb.shape[0] - 1
    out = np.zeros((n, n))
    for i, j in zip(*np.nonzero(ca), strict=True):
        for k, m in zip(*np.nonzero(cb), strict=True):
            c = 0.25 * ca[i, j] * cb[k, m]
            for p in (i + k, abs(i - k)):
                for q in (j + m, abs(j - m)):
                    out[p, q] += c
    return ChebyshevField(out, a.bbox, 0.0, bool(a.flagged_fallback or b.flagged_fallback))


def _max_order(n: int, config: ApertureCorrectionConfig) -> int:
    order = config.order
    while order > 0 and n - (order + 1) * (order + 2) // 2 < config.min_dof:
        order -= 1
    return order


def _fit_field(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], z: npt.NDArray[np.float64],
               bbox: tuple[float, float, float, float], config: ApertureCorrectionConfig, *,
               weights: npt.NDArray[np.float64] | None = None,
               select_order: bool = False) -> tuple[ChebyshevField, npt.NDArray[np.bool_]]:
    """Clipped Chebyshev fit of ``z``; a flagged constant when the stars are too few.

    ``weights`` (inverse variances) make the fit weighted; without them the constant is shifted
    so that the median residual is zero (robust level, as before weights existed). With
    ``select_order`` the order is the BIC minimum over 0..``order`` (χ² rescaled by the reduced χ²
    of the highest order when above 1): a noisy ratio that is flat keeps a constant instead of
    fitting noise with 6 terms.
    """
    if z.size < config.min_stars:
        keep = _clip_constant(z, config)
        med = float(np.median(z[keep]))
        err = _robust_sigma(z[keep]) if keep.sum() > 1 else 0.0
        return ChebyshevField.constant(med, bbox, error=err, flagged_fallback=True), keep
    w = None if weights is None else np.asarray(weights, float)
    keep = np.ones(z.size, bool)
    model = np.full(z.size, float(np.median(z)))
    field = ChebyshevField.constant(float(np.median(z)), bbox)
    for _ in range(max(config.n_clip_iterations, 1)):
        if config.n_clip_iterations:
            # Clip on residuals in units of each star's error when weighted (faint stars scatter more).
            resid = z - model if w is None else (z - model) * np.sqrt(w)
            sig = _robust_sigma(resid[keep])
            if sig > 0:
                new = np.abs(resid - np.median(resid[keep])) <= config.clip_sigma * sig
                if new.sum() >= 1:
                    keep = new
        order = _max_order(int(keep.sum()), config)
        field = ChebyshevField.fit(x[keep], y[keep], z[keep], order=order, bbox=bbox,
                                   weights=None if w is None else w[keep])
        model = field.evaluate(x, y)
    if select_order and w is not None and field.order > 0:
        wk = w[keep]
        n_k = int(keep.sum())
        fits = [field if o == field.order else ChebyshevField.fit(x[keep], y[keep], z[keep], order=o, bbox=bbox,
                                                                  weights=wk)
                for o in range(field.order + 1)]
        chi2 = [float(np.sum(wk * (z[keep] - f.evaluate(x[keep], y[keep])) ** 2)) for f in fits]
        n_terms = [(o + 1) * (o + 2) // 2 for o in range(field.order + 1)]
        scale = max(chi2[-1] / max(n_k - n_terms[-1], 1), 1.0)
        bic = [c / scale + t * np.log(n_k) for c, t in zip(chi2, n_terms, strict=True)]
        field = fits[int(np.argmin(bic))]
        model = field.evaluate(x, y)
    resid = z - model
    coeffs = field.coefficients.copy()
    if w is None:
        shift = float(np.median(resid[keep]))
        coeffs[0, 0] += shift
        resid = resid - shift
    err = _robust_sigma(resid[keep])
    return ChebyshevField(coeffs, bbox, err if np.isfinite(err) else 0.0, False), keep
