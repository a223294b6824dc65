"""The pipeline's configuration tree: one typed config per step, validated together.

Load with :func:`load_calibrate_config` (YAML/JSON, unknown keys rejected),
validate before touching any pixel, and save the resolved form with the
outputs (the flows write it as the ``calibrate_config`` dataset).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configuration import config_from_dict, config_hash, config_to_dict, load_config_file
from ..errors import ConfigError
from .aperture_correction import ApertureCorrectionConfig, aperture_radius
from .astrometry import AstrometryConfig
from .background import BackgroundConfig
from .cosmic_rays import CosmicRayConfig
from .detection import DetectionConfig
from .flag_propagation import PROPAGATED_FLAGS
from .initial_psf import InitialPsfConfig
from .interpolation import InterpolationConfig
from .measurement import MeasurementConfig, flag_columns
from .photometry import PhotometryConfig
from .psf_determination import PsfFitConfig, PsfStarSelectorConfig
from .residual_detection import ResidualDetectionConfig
from .snap_combination import SnapCombineConfig
from .star_selection import StarSelectorConfig
from .summary import SummaryConfig


def _psf_detection() -> DetectionConfig:
    # Rubin legacy path: footprints at 10 sigma, peaks at 50 sigma (S/N >= 50 PSF stars). In a
    # crowded field both rise so that about the 3000 brightest peaks are kept (Rubin's adaptive
    # detection caps the PSF pass at 3000 peaks per detector in u, g, r, y): the PSF fit uses at
    # most 300 stars and the brightest carry nearly all its information.
    # One sep call over the frame deblends the PSF pass's few bright footprints: per footprint
    # (``deblend_each_footprint``) it saves ~0.05 s, and sep's random hand-out of blend pixels,
    # drawn differently, moves the PSF stars' neighbour masks and so the model at its noise level
    # (poor-seeing frame: median δe1 -3.8e-4 -> -5.8e-4; over six reserve draws -3.8e-4 to -5.1e-4
    # with one call, -3.2e-4 to -5.8e-4 per footprint).
    return DetectionConfig(threshold_snr=10.0, peak_threshold_snr=50.0, max_peaks=3000, deblend_each_footprint=False)


def _star_detection() -> DetectionConfig:
    # Footprints at 5 sigma, peaks at 7 sigma of the PSF-matched image: a star of PSF S/N 10 is
    # measured at 9.1 +- 1 in the filtered image (its own Poisson noise and the non-Gaussian PSF
    # lower the matched-filter S/N), so a peak cut at 10 loses a third of the S/N 10-12 stars.
    # The S/N >= 10 selection is then made on the measured PSF flux (star_selector).
    # Deblending keeps SExtractor's 32 sub-thresholds: 16 would halve sep's cost on the crowded
    # 4096² frame (1.45 -> 0.85 s) at the same star recovery and contamination there, but moves
    # the zero point of the real SDSS frame (test_real_photometry) to +10.2 mmag, past its 10 mmag bar.
    return DetectionConfig(threshold_snr=5.0, peak_threshold_snr=7.0)


#: Outputs that may be switched off (the rest are always produced).
OPTIONAL_OUTPUTS: tuple[str, ...] = ("single_visit_psf_star", "single_visit_psf_star_footprints",
                                     "initial_astrometry_match_detector", "initial_photometry_match_detector")


#: Flags the pipeline adds to the measured catalogues (selection, calibration use, sky sources).
_PIPELINE_FLAGS = frozenset({"sky_source", "calib_photometry_used", "calib_photometry_reserved", *PROPAGATED_FLAGS})


@dataclass(frozen=True)
class CalibrateImageConfig:
    """Configuration of the whole single-frame calibration."""

    snap_combine: SnapCombineConfig = field(default_factory=SnapCombineConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    initial_psf: InitialPsfConfig = field(default_factory=InitialPsfConfig)
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    psf_detection: DetectionConfig = field(default_factory=_psf_detection)
    measurement: MeasurementConfig = field(default_factory=MeasurementConfig)
    psf_star_selector: PsfStarSelectorConfig = field(default_factory=PsfStarSelectorConfig)
    psf_fit: PsfFitConfig = field(default_factory=PsfFitConfig)
    #: Circular-aperture radii (pixels) of the PSF-pass catalogue (``single_visit_psf_star``): the
    #: calibration aperture alone, as Rubin's PSF-pass measurement. The other radii of
    #: ``measurement.aperture_radii_pix`` are measured on the stars, whose curve of growth sets the
    #: calibration flux (the PSF pass's is rescaled to it); all six radii on the 5679 PSF-pass
    #: sources of the crowded 4096² frame cost 0.3 s more. Must hold the reference aperture of
    #: ``aperture_correction``; holding its total and tail apertures too adds the curve of growth
    #: to the PSF pass's normalisation.
    psf_aperture_radii_pix: tuple[float, ...] = (12.0,)
    #: Number of repair/detect/measure/PSF passes (the brief's "twice"; 2 runs the second pass).
    #: One pass by default, from the numbers: the PSF is started from a Gaussian measured on the
    #: data (not Rubin's fixed 4 px), so the second pass changed the PSF size error by <= 0.05 %
    #: (typical 0.017 -> -0.026 %, crowded 0.048 -> 0.094 %, sparse 0.013 -> 0.013 %), WCS rms by
    #: <= 0.01 mas and the zero point by <= 0.3 mmag on the 4096² benchmark frames, for +45 %
    #: characterization time (Rubin's HEAD also drops it: "unnecessary, sometimes harmful").
    n_psf_passes: int = 1
    #: Re-estimate the background with detected sources masked after each detection pass.
    reestimate_background: bool = True
    #: A frame with too few stars for a PSF: ``error`` raises PsfFitError (the default: never a
    #: guessed PSF unannounced); ``seeing`` installs a Gaussian of the seeing FWHM in the exposure
    #: metadata ``seeing_fwhm_pix`` (ingest fills it from the header's FWHM/SEEING keywords), sets
    #: ``PSF_FALLBACK`` in the image metadata, no ``calib_psf_used`` star, and goes on. (With 2 to
    #: ``psf_fit.min_stars - 1`` stars the PSF is a Gaussian of their moments, ``PSF_FALLBACK = moments``.)
    psf_fallback: Literal["error", "seeing"] = "error"
    aperture_correction: ApertureCorrectionConfig = field(default_factory=ApertureCorrectionConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    #: Extra radius (arcsec) around the detector for loading reference stars (covers pointing errors).
    refcat_margin_arcsec: float = 400.0
    star_detection: DetectionConfig = field(default_factory=_star_detection)
    #: Search the PSF-subtracted residual around bright stars for faint stars the deblender merged
    #: into them (crowded 4096² frame: isolated S/N >= 10 stars recovered 97.88 -> 98.34 %, +0.3 s;
    #: typical +0.08 s, 98.72 -> 98.90 %).
    residual_search: bool = True
    residual_detection: ResidualDetectionConfig = field(default_factory=ResidualDetectionConfig)
    star_selector: StarSelectorConfig = field(default_factory=StarSelectorConfig)
    #: Number of sky sources placed in source-free regions of the star catalogue.
    n_sky_sources: int = 100
    #: PSF-star to star match radius (pixels): max(this, PSF determinant radius).
    psf_star_match_radius_pix: float = 3.0
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    #: Multiply image, variance and background by the calibration (pixels in nJy).
    calibrate_pixels: bool = True
    #: Optional outputs to produce (Rubin's ``optional_outputs``); any subset of OPTIONAL_OUTPUTS.
    #: A product left out is absent from :func:`calibrate_image`'s result; the flow does not
    #: write it unless a later stage reads it (the PSF stars and both match catalogues are read
    #: by later stages, so the flow keeps them as intermediates; the footprints are dropped).
    optional_outputs: tuple[str, ...] = OPTIONAL_OUTPUTS

    def validate(self) -> None:
        """Check every step config and the rules that span steps."""
        for name in self.__dataclass_fields__:
            sub = getattr(self, name)
            if hasattr(sub, "validate"):
                sub.validate()
        if self.n_psf_passes not in (1, 2):
            raise ConfigError(f"n_psf_passes must be 1 or 2, got {self.n_psf_passes}")
        if self.star_detection.peak_threshold_snr > self.psf_detection.peak_threshold_snr:
            raise ConfigError(
                "star_detection.peak_threshold_snr must not exceed psf_detection.peak_threshold_snr "
                "(the star catalogue must contain the PSF stars for flag propagation)"
            )
        ref_radius = aperture_radius(self.aperture_correction.reference_aperture)
        if ref_radius not in self.psf_aperture_radii_pix:
            raise ConfigError(
                f"psf_aperture_radii_pix {list(self.psf_aperture_radii_pix)} lacks {ref_radius:g}, the radius of "
                f"aperture_correction.reference_aperture ({self.aperture_correction.reference_aperture}) that "
                "normalises the PSF pass's calibration flux; add it"
            )
        if self.refcat_margin_arcsec < 0:
            raise ConfigError("refcat_margin_arcsec must be >= 0")
        if self.n_sky_sources < 0:
            raise ConfigError("n_sky_sources must be >= 0")
        unknown = sorted(set(self.optional_outputs) - set(OPTIONAL_OUTPUTS))
        if unknown:
            raise ConfigError(f"optional_outputs has unknown names {unknown}; choose from {list(OPTIONAL_OUTPUTS)}")
        known = self.flag_columns()
        # Every measured flux has a <flux>_flag column: a flux the star catalogue does not have is
        # refused here, not after the whole characterization (photometry is the last step).
        fluxes = sorted(name[: -len("_flag")] for name in flag_columns(self.measurement)
                        if "Flux" in name and name.endswith("_flag") and "_flag_" not in name)
        for owner, flux in (("photometry.flux_field", self.photometry.flux_field),
                            ("star_selector.flux_field", self.star_selector.flux_field)):
            if flux not in fluxes:
                near = difflib.get_close_matches(flux, fluxes, n=2)
                raise ConfigError(f"{owner}={flux!r} is not a flux the star catalogue has"
                                  + (f"; did you mean {' or '.join(map(repr, near))}?" if near
                                     else f"; the fluxes are {fluxes}"))
        for owner, names in (("astrometry.bad_flags", self.astrometry.bad_flags),
                             ("astrometry.required_flags", self.astrometry.required_flags),
                             ("photometry.bad_flags", self.photometry.bad_flags),
                             ("star_selector.bad_flags", self.star_selector.bad_flags)):
            for name in names:
                if name not in known:
                    near = difflib.get_close_matches(name, known, n=3)
                    raise ConfigError(f"{owner} names {name!r}, which no catalogue has"
                                      + (f"; did you mean {' or '.join(map(repr, near))}?" if near else
                                         f"; the flags are {sorted(known)}"))

    def flag_columns(self) -> frozenset[str]:
        """The boolean columns of the PSF-star and star catalogues this config makes."""
        measured = flag_columns(self.measurement) | flag_columns(self.psf_measurement)
        return measured | _PIPELINE_FLAGS

    @property
    def psf_measurement(self) -> MeasurementConfig:
        """``measurement`` with the PSF pass's aperture radii."""
        return dataclasses.replace(self.measurement, aperture_radii_pix=tuple(self.psf_aperture_radii_pix))

    @property
    def psf_aperture_correction(self) -> ApertureCorrectionConfig:
        """``aperture_correction`` for the PSF-pass catalogue: without the curve of growth unless
        the PSF pass measures its total and tail apertures."""
        ac = self.aperture_correction
        stems = [s for s in (ac.total_aperture, ac.tail_aperture) if s is not None]
        if all(aperture_radius(s) in self.psf_aperture_radii_pix for s in stems):
            return ac
        return dataclasses.replace(ac, total_aperture=None, tail_aperture=None)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def hash(self) -> str:
        return config_hash(self)


def load_calibrate_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CalibrateImageConfig:
    """Load, merge ``overrides`` (nested dict), and validate the pipeline config."""
    base = load_config_file(CalibrateImageConfig, path)
    if overrides:
        merged = _deep_merge(base.to_dict(), overrides)
        base = config_from_dict(CalibrateImageConfig, merged)
    try:
        base.validate()
    except ConfigError as exc:  # name the file the settings came from
        if path is None or Path(path).name in str(exc):
            raise
        raise ConfigError(f"{Path(path).name}: {exc}") from None
    return base


def calibrate_config_from_dict(data: dict[str, Any]) -> CalibrateImageConfig:
    cfg = config_from_dict(CalibrateImageConfig, data)
    cfg.validate()
    return cfg


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
