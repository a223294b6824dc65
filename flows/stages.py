"""Per-detector stages: which datasets each reads and writes, and how it computes.

Each stage is one Prefect task (see :mod:`singleframe.flows.calibrate`). The
granularity — six tasks per detector, one per group of steps in the brief —
keeps orchestration well under the compute time of a detector (Prefect costs
about 6 ms of client and 25 ms of server time per task run; a 4k×4k detector
takes seconds) while each stage's products are persisted, cached and
recomputed independently.

The compute functions here only unpack datasets, call the pure stage
functions of :mod:`singleframe.steps.pipeline`, and pack the products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ..fields import ChebyshevField
from ..ids import DataId
from ..photo_calib import PhotoCalib
from ..steps import pipeline
from ..steps.config import OPTIONAL_OUTPUTS, CalibrateImageConfig

#: Loads the reference stars for an exposure (the flow passes an io-backed loader).
RefcatLoader = Callable[[Any], Table]


@dataclass(frozen=True)
class StageContext:
    data_id: DataId
    config: CalibrateImageConfig
    load_refcat: RefcatLoader


@dataclass(frozen=True)
class Stage:
    """A group of steps with declared input and output datasets."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    compute: Callable[[Mapping[str, Any], StageContext], dict[str, Any]]
    doc: str
    #: Reads the reference catalogue (``StageContext.load_refcat``): its version is in the cache key.
    uses_refcat: bool = False


def wcs_to_record(wcs: WCS, quality: Mapping[str, Any]) -> dict[str, Any]:
    return {"wcs_header": wcs.to_header(relax=True).tostring(sep="\n"), "quality": dict(quality)}


def wcs_from_record(record: Mapping[str, Any]) -> WCS:
    return WCS(fits.Header.fromstring(record["wcs_header"], sep="\n"))


def ap_corr_to_record(ap_corr: Mapping[str, ChebyshevField], normalization: float, fallback: bool,
                      scale_err: Mapping[str, float], cog_fallback: bool = False) -> dict[str, Any]:
    return {"fields": {k: v.to_dict() for k, v in ap_corr.items()}, "normalization": normalization,
            "fallback": fallback, "scale_err": dict(scale_err), "curve_of_growth_fallback": cog_fallback}


def ap_corr_from_record(record: Mapping[str, Any]) -> tuple[dict[str, ChebyshevField], float]:
    return {k: ChebyshevField.from_dict(v) for k, v in record["fields"].items()}, float(record["normalization"])


# -- compute functions -----------------------------------------------------------------------
def _characterize(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    res = pipeline.characterize(d["post_isr_image"], config=ctx.config)
    exposure = res.exposure.with_metadata(**{f"char.{k}": v for k, v in res.diagnostics.items()})
    return {
        "characterized_image": exposure,
        "characterized_background": res.background,
        "characterized_psf_stars": res.psf_stars,
        "single_visit_psf_star_footprints": res.footprints,
    }


def _correct_apertures(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    res = pipeline.correct_apertures(d["characterized_image"], d["characterized_psf_stars"], config=ctx.config)
    return {
        "aperture_correction": ap_corr_to_record(res.ap_corr, res.normalization, res.fallback, res.scale_err,
                                                 res.cog_fallback),
        "apcorr_psf_stars": res.psf_stars,
    }


def _calibrate_astrometry(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    exposure = d["characterized_image"]
    refcat = ctx.load_refcat(exposure)
    res = pipeline.calibrate_astrometry(exposure, d["apcorr_psf_stars"], refcat, config=ctx.config)
    return {
        "astrometric_solution": wcs_to_record(res.wcs, res.quality),
        "single_visit_psf_star": res.psf_stars,
        "initial_astrometry_match_detector": res.matches,
    }


def _find_stars(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    ap_corr, norm = ap_corr_from_record(d["aperture_correction"])
    exposure = d["characterized_image"]
    refcat = ctx.load_refcat(exposure) if ctx.config.star_selector.use_reference_catalog else None
    res = pipeline.find_stars(exposure, d["single_visit_psf_star"],
                              wcs=wcs_from_record(d["astrometric_solution"]), ap_corr=ap_corr,
                              normalization=norm, config=ctx.config,
                              scale_err=d["aperture_correction"].get("scale_err", {}), refcat=refcat)
    stars = res.stars
    stars.meta.update({f"find_stars.{k}": v for k, v in res.diagnostics.items()})
    return {"star_catalog": stars}


def _calibrate_photometry(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    exposure = d["characterized_image"]
    refcat = ctx.load_refcat(exposure)
    res = pipeline.calibrate_photometry(d["star_catalog"], refcat, band=exposure.visit_info.band, config=ctx.config,
                                        scale_err=_star_pass_scale_err(d["star_catalog"], d["aperture_correction"]))
    record = {**res.photo_calib.to_dict(), **res.quality}
    return {"initial_photoCalib_detector": record, "initial_photometry_match_detector": res.matches}


_STAR_META = "find_stars."


def _star_pass_scale_err(stars: Any, ap_record: Mapping[str, Any]) -> dict[str, float]:
    """Flux-scale errors of the star-pass normalisation (find_stars diagnostics), else the PSF pass's."""
    prefix = f"{_STAR_META}scale_err."
    found = {k[len(prefix):]: float(v) for k, v in stars.meta.items() if str(k).startswith(prefix)}
    return found or dict(ap_record.get("scale_err", {}))


def _star_pass_ap_corr(stars: Any, ap_record: Mapping[str, Any]) -> dict[str, ChebyshevField]:
    """The aperture-correction fields as find_stars applied them (PSF-pass fields x normalisation ratio)."""
    ap_corr, _ = ap_corr_from_record(ap_record)
    k = float(stars.meta.get(f"{_STAR_META}normalization_ratio_to_psf_pass", 1.0))
    return {n: dataclasses.replace(f, coefficients=f.coefficients * k, error=f.error * abs(k)) for n, f in ap_corr.items()}


def _finalize(d: Mapping[str, Any], ctx: StageContext) -> dict[str, Any]:
    ap_corr = _star_pass_ap_corr(d["star_catalog"], d["aperture_correction"])
    res = pipeline.finalize(
        d["characterized_image"], d["characterized_background"], d["star_catalog"], d["single_visit_psf_star"],
        wcs=wcs_from_record(d["astrometric_solution"]), ap_corr=ap_corr,
        photo_calib=PhotoCalib.from_dict(d["initial_photoCalib_detector"]),
        astrometry_matches=d["initial_astrometry_match_detector"],
        photometry_matches=d["initial_photometry_match_detector"], config=ctx.config,
    )
    return {
        "preliminary_visit_image": res.exposure,
        "preliminary_visit_image_background": res.background,
        "single_visit_star_unstandardized": res.stars,
        # The warnings ride with the statistics they are about (a list; every other value is a number).
        "detector_summary": {**res.summary, "quality_warnings": list(res.warnings)},
    }


#: The processing summary, in order (README and flows follow this list).
STAGES: tuple[Stage, ...] = (
    Stage("characterize", ("post_isr_image",),
          ("characterized_image", "characterized_background", "characterized_psf_stars", "single_visit_psf_star_footprints"),
          _characterize, "combine snaps; background; initial PSF; repair/detect(S/N>=50)/measure/fit PSF (1 or 2 passes)"),
    Stage("correct_apertures", ("characterized_image", "characterized_psf_stars"),
          ("aperture_correction", "apcorr_psf_stars"), _correct_apertures,
          "normalise the calibration flux; fit aperture-correction fields"),
    Stage("calibrate_astrometry", ("characterized_image", "apcorr_psf_stars"),
          ("astrometric_solution", "single_visit_psf_star", "initial_astrometry_match_detector"),
          _calibrate_astrometry, "match PSF stars to the refcat; affine fit on the camera model", uses_refcat=True),
    Stage("find_stars", ("characterized_image", "aperture_correction", "astrometric_solution", "single_visit_psf_star"),
          ("star_catalog",), _find_stars,
          "detect (peaks 7 sigma, footprints 5), deblend, measure, select stars (S/N>=8; refcat vouches), "
          "normalise (star pass), aperture-correct, propagate flags", uses_refcat=True),
    Stage("calibrate_photometry", ("characterized_image", "star_catalog", "aperture_correction"),
          ("initial_photoCalib_detector", "initial_photometry_match_detector"), _calibrate_photometry,
          "fit the zero point to the refcat", uses_refcat=True),
    Stage("finalize", ("characterized_image", "characterized_background", "star_catalog", "single_visit_psf_star",
                       "aperture_correction", "astrometric_solution", "initial_photoCalib_detector",
                       "initial_astrometry_match_detector", "initial_photometry_match_detector"),
          ("preliminary_visit_image", "preliminary_visit_image_background", "single_visit_star_unstandardized",
           "detector_summary"), _finalize, "calibrate image/background/catalogue to nJy; summary statistics"),
)

STAGE_BY_NAME = {s.name: s for s in STAGES}

#: Datasets some stage reads: the flow must persist them even when not wanted as outputs.
_READ_BY_A_STAGE = frozenset(name for s in STAGES for name in s.inputs)


def persisted_outputs(stage: Stage, config: CalibrateImageConfig) -> tuple[str, ...]:
    """The outputs of ``stage`` the flow writes: all but the optional outputs switched off
    in ``config`` that no later stage reads."""
    dropped = set(OPTIONAL_OUTPUTS) - set(config.optional_outputs) - _READ_BY_A_STAGE
    return tuple(name for name in stage.outputs if name not in dropped)
