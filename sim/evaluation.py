"""Compare calibration outputs with the simulator's truth (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import galsim
import numpy as np
import numpy.typing as npt
from astropy.table import Table
from scipy.spatial import cKDTree

from singleframe.masks import MaskPlane, any_set

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from singleframe.psf import PsfModel

    from .survey import DetectorTruth

#: Keys of :func:`evaluate_detector`'s result, in table order.
EVALUATION_KEYS = ("visit", "detector", "wcs_rms_mas", "wcs_max_mas", "zp_err_mmag", "psf_size_err_pct",
                   "star_recovered_pct", "star_contaminant_pct", "cr_masked_pct")

_RAD_TO_MAS = math.degrees(1.0) * 3.6e6


def _separation_mas(ra1: npt.NDArray[np.float64], dec1: npt.NDArray[np.float64],
                    ra2: npt.NDArray[np.float64], dec2: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Great-circle separations (haversine, accurate for tiny angles)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(a, float)) for a in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))) * _RAD_TO_MAS


def wcs_error_mas(fitted_wcs: WCS, true_wcs: WCS, shape: tuple[int, int], *, origin: tuple[int, int] = (0, 0),
                  n_grid: int = 33) -> tuple[float, float]:
    """RMS and maximum on-sky distance between two WCSs over a detector.

    Parameters
    ----------
    fitted_wcs, true_wcs
        WCSs of the image array (as ``Exposure.wcs``: pixel ``[0, 0]`` is array index 0).
    shape
        ``(ny, nx)`` of the image.
    origin
        Parent coordinates of pixel ``[0, 0]``; the grid is laid in parent
        coordinates and shifted by it, as ``Exposure.pixel_to_sky`` does.
    n_grid
        Grid points per axis (corners included).

    Returns
    -------
    (rms_mas, max_mas)
    """
    ny, nx = shape
    x0, y0 = origin
    gx, gy = np.meshgrid(np.linspace(x0, x0 + nx - 1, n_grid), np.linspace(y0, y0 + ny - 1, n_grid))
    u, v = gx.ravel() - x0, gy.ravel() - y0
    ra1, dec1 = fitted_wcs.all_pix2world(u, v, 0)
    ra2, dec2 = true_wcs.all_pix2world(u, v, 0)
    sep = _separation_mas(ra1, dec1, ra2, dec2)
    return float(np.sqrt(np.mean(sep**2))), float(np.max(sep))


def _adaptive_moments(image: npt.NDArray[np.floating]) -> tuple[float, float, float]:
    """(sigma, e1, e2) of GalSim HSM adaptive moments; NaN if HSM fails."""
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(image, np.float64), scale=1.0), strict=False)
    if res.moments_status != 0:
        return float("nan"), float("nan"), float("nan")
    return float(res.moments_sigma), float(res.observed_shape.e1), float(res.observed_shape.e2)


def _model_moments(psf_model: PsfModel, psf_grid: Table) -> npt.NDArray[np.float64]:
    return np.array([_adaptive_moments(psf_model.image(float(x), float(y)))
                     for x, y in zip(psf_grid["x"], psf_grid["y"], strict=True)])


def psf_size_error_pct(psf_model: PsfModel, psf_grid: Table) -> float:
    """Median of ``100 (σ_model / σ_true − 1)`` over the truth grid.

    σ is the determinant radius of HSM adaptive moments, measured on
    ``psf_model.image(x, y)`` exactly as the truth was measured on the drawn
    PSF. Positive: the model is too wide.
    """
    sig = _model_moments(psf_model, psf_grid)[:, 0]
    return float(np.nanmedian(100.0 * (sig / np.asarray(psf_grid["sigma_pix"], float) - 1.0)))


@dataclass(frozen=True)
class PsfEllipticityResiduals:
    """Model minus true PSF ellipticity (distortion convention) on the truth grid."""

    de1: npt.NDArray[np.float64]
    de2: npt.NDArray[np.float64]
    rms: float
    max_abs: float


def psf_ellipticity_residuals(psf_model: PsfModel, psf_grid: Table) -> PsfEllipticityResiduals:
    """Ellipticity residuals ``e_model − e_true`` (HSM adaptive moments) at the truth grid positions."""
    mom = _model_moments(psf_model, psf_grid)
    de1 = mom[:, 1] - np.asarray(psf_grid["e1"], float)
    de2 = mom[:, 2] - np.asarray(psf_grid["e2"], float)
    amp = np.hypot(de1, de2)
    return PsfEllipticityResiduals(de1, de2, float(np.sqrt(np.nanmean(amp**2))), float(np.nanmax(amp)))


def zero_point_error_mmag(fitted_calibration_njy_per_count: float, true_calibration: float) -> float:
    """``1000 · 2.5 log10(fitted / true)`` in mmag.

    Positive when the fitted calibration is too large, i.e. calibrated fluxes
    come out too bright (the AB zero point, ``31.4 − 2.5 log10(c)``, is then
    too small by this amount).
    """
    return float(1000.0 * 2.5 * math.log10(fitted_calibration_njy_per_count / true_calibration))


def _xy_columns(stars: Table) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    for xname, yname in (("base_SdssCentroid_x", "base_SdssCentroid_y"), ("x", "y")):
        if xname in stars.colnames and yname in stars.colnames:
            return np.asarray(stars[xname], float), np.asarray(stars[yname], float)
    raise KeyError(f"star table needs base_SdssCentroid_x/_y or x/y columns; it has {stars.colnames}")


def star_recovery(stars_table: Table, truth_sources: Table, *, match_radius_pix: float = 2.0,
                  snr_min: float = 10.0, edge_pix: float = 20.0, isolation_pix: float = 10.0,
                  neighbour_flux_ratio: float = 0.1,
                  bbox: tuple[int, int, int, int] | None = None) -> tuple[float, float]:
    """Completeness and purity of a star selection.

    Parameters
    ----------
    stars_table
        Selected stars (``base_SdssCentroid_x/_y`` or ``x/y``, parent px).
    truth_sources
        ``DetectorTruth.sources``.
    match_radius_pix
        Largest centroid distance of a match.
    snr_min
        Only true stars with truth ``snr`` ≥ this count for completeness.
    edge_pix
        ... and only those at least this far from the detector edge.
    isolation_pix, neighbour_flux_ratio
        ... and only those with no other true source brighter than
        ``neighbour_flux_ratio`` × their flux within ``isolation_pix``.
    bbox
        ``(x_min, y_min, x_max, y_max)``; default ``truth_sources.meta["bbox"]``.

    Returns
    -------
    (recovered_pct, contaminant_pct)
        % of eligible true stars (unsaturated, isolated, S/N ≥ ``snr_min``,
        away from edges) matched by a selected star; % of selected stars with
        no true star (of any brightness) within ``match_radius_pix``. NaN
        when a denominator is zero.
    """
    tx, ty = np.asarray(truth_sources["x"], float), np.asarray(truth_sources["y"], float)
    flux = np.asarray(truth_sources["instflux"], float)
    is_star = np.asarray(truth_sources["is_star"], bool)
    if bbox is None:
        bbox = truth_sources.meta.get("bbox")
    if bbox is None:
        raise KeyError("truth_sources.meta has no 'bbox'; pass bbox=(x_min, y_min, x_max, y_max)")
    xmin, ymin, xmax, ymax = bbox
    sx, sy = _xy_columns(stars_table)

    isolated = np.ones(len(tx), bool)
    if len(tx) > 1:
        tree = cKDTree(np.column_stack([tx, ty]))
        for i, j in tree.query_pairs(isolation_pix, output_type="ndarray"):
            if flux[j] > neighbour_flux_ratio * flux[i]:
                isolated[i] = False
            if flux[i] > neighbour_flux_ratio * flux[j]:
                isolated[j] = False
    eligible = (is_star & ~np.asarray(truth_sources["saturated"], bool) & isolated
                & (np.asarray(truth_sources["snr"], float) >= snr_min)
                & (tx >= xmin + edge_pix) & (tx <= xmax - edge_pix)
                & (ty >= ymin + edge_pix) & (ty <= ymax - edge_pix))

    if len(sx):
        d_truth, _ = cKDTree(np.column_stack([sx, sy])).query(np.column_stack([tx, ty]))
    else:
        d_truth = np.full(len(tx), np.inf)
    n_elig = int(eligible.sum())
    recovered = 100.0 * float(np.sum(d_truth[eligible] <= match_radius_pix)) / n_elig if n_elig else float("nan")

    if len(sx) and is_star.any():
        d_sel, _ = cKDTree(np.column_stack([tx[is_star], ty[is_star]])).query(np.column_stack([sx, sy]))
        contaminant = 100.0 * float(np.mean(d_sel > match_radius_pix))
    elif len(sx):
        contaminant = 100.0
    else:
        contaminant = float("nan")
    return recovered, contaminant


def cr_masked_pct(mask: npt.NDArray[np.integer], cr_truth: npt.NDArray[np.bool_] | Sequence[npt.NDArray[np.bool_]], *,
                  image: npt.NDArray[np.floating] | None = None, variance: npt.NDArray[np.floating] | None = None,
                  nsigma: float = 5.0) -> float:
    """% of injected cosmic-ray pixels that carry the CR bit in ``mask``.

    Parameters
    ----------
    mask
        Output mask of the (combined) image.
    cr_truth
        Injected CR pixels: one boolean array or a sequence (per snap, OR-ed).
        ``DetectorTruth.cr_masks`` already holds only pixels above
        ``cr_truth_nsigma`` of the visit noise.
    image, variance
        Optional: keep only truth pixels where the background-subtracted
        ``image − median(image)`` exceeds ``nsigma √variance`` (the CR is
        visible in this image).
    nsigma
        Threshold for that test.

    Returns
    -------
    float
        Percentage; NaN when no truth pixel remains.
    """
    truth = np.asarray(cr_truth, bool)
    if truth.ndim == 3:
        truth = truth.any(axis=0)
    if truth.shape != mask.shape:
        raise ValueError(f"cr_truth shape {truth.shape} differs from mask shape {mask.shape}")
    if image is not None and variance is not None:
        img = np.asarray(image, float)
        truth = truth & (img - np.median(img) >= nsigma * np.sqrt(np.maximum(np.asarray(variance, float), 0)))
    n = int(truth.sum())
    if n == 0:
        return float("nan")
    return 100.0 * float(np.sum(any_set(mask, MaskPlane.CR) & truth)) / n


def evaluate_detector(*, visit: int, detector: int, wcs: WCS | None, psf: PsfModel | None,
                      calibration_njy_per_count: float | None, stars: Table | None,
                      mask: npt.NDArray[np.integer] | None, truth: DetectorTruth) -> dict[str, Any]:
    """All metrics of one calibrated detector against its truth (NaN where an input is None).

    Returns
    -------
    dict
        Exactly the keys of :data:`EVALUATION_KEYS`.
    """
    nan = float("nan")
    rms, mx = wcs_error_mas(wcs, truth.wcs, truth.shape, origin=truth.origin) if wcs is not None else (nan, nan)
    zp = (zero_point_error_mmag(calibration_njy_per_count, truth.calibration_njy_per_count)
          if calibration_njy_per_count is not None else nan)
    psf_err = psf_size_error_pct(psf, truth.psf_grid) if psf is not None else nan
    rec, con = star_recovery(stars, truth.sources) if stars is not None else (nan, nan)
    cr = cr_masked_pct(mask, truth.cr_masks) if mask is not None else nan
    return {"visit": int(visit), "detector": int(detector), "wcs_rms_mas": rms, "wcs_max_mas": mx,
            "zp_err_mmag": zp, "psf_size_err_pct": psf_err, "star_recovered_pct": rec,
            "star_contaminant_pct": con, "cr_masked_pct": cr}


def format_evaluation_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Right-aligned text table of :func:`evaluate_detector` rows (floats with 2 decimals)."""
    header = list(EVALUATION_KEYS)
    cells = [[_fmt(row.get(k, float("nan"))) for k in header] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.2f}"
    return str(value)
