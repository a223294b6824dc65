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
from singleframe.psf import distortion

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from singleframe.fields import ChebyshevField
    from singleframe.psf import PsfModel

    from .config import SimulationConfig, VisitSpec
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


@dataclass(frozen=True, eq=False)
class PsfTruthAtStars:
    """The true PSF (the simulator's own PSF field) at a set of true star positions.

    Attributes
    ----------
    x, y
        True star centres (parent px).
    sigma_pix, e1, e2
        HSM adaptive moments (determinant radius, distortion) of the true PSF
        drawn centred on the nearest pixel centre, as ``psf_grid`` is measured.
    stamps
        ``(n, 2 h + 1, 2 h + 1)``: a unit-flux star at ``(x, y)`` as the
        simulator draws it, on a stamp centred on pixel ``(rint(x), rint(y))``;
        each sums to the fraction of the full profile inside the stamp.
    """

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    sigma_pix: npt.NDArray[np.float64]
    e1: npt.NDArray[np.float64]
    e2: npt.NDArray[np.float64]
    stamps: npt.NDArray[np.float32]

    def __len__(self) -> int:
        return int(self.x.size)


def psf_truth_positions(sources: Table, *, snr_min: float = 50.0, edge_pix: float = 20.0, max_stars: int = 400,
                        seed: int = 0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """True star positions at which PSF models are judged.

    Unsaturated true stars with ``snr >= snr_min`` (the population a PSF model
    is built from) at least ``edge_pix`` inside ``sources.meta["bbox"]``; a
    seeded random subset of ``max_stars`` when there are more (keeps the HSM
    cost bounded on crowded frames while sampling the whole detector).
    """
    xmin, ymin, xmax, ymax = sources.meta["bbox"]
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    keep = (np.asarray(sources["is_star"], bool) & ~np.asarray(sources["saturated"], bool)
            & (np.asarray(sources["snr"], float) >= snr_min)
            & (x >= xmin + edge_pix) & (x <= xmax - edge_pix) & (y >= ymin + edge_pix) & (y <= ymax - edge_pix))
    idx = np.flatnonzero(keep)
    if idx.size > max_stars:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_stars, replace=False))
    return x[idx], y[idx]


def true_psf_at_stars(config: SimulationConfig, visit: VisitSpec, detector_id: int, x: npt.ArrayLike,
                      y: npt.ArrayLike, *, half_pix: int = 30) -> PsfTruthAtStars:
    """The simulator's true PSF at ``(x, y)`` (parent px) of one detector of one visit.

    Draws the same PSF field :func:`~singleframe.sim.simulate_detector` draws
    its stars from (a pure function of the configuration), so it needs no
    stored image. ``half_pix`` is the stamp half-width (30: the simulator's
    star stamps).
    """
    from .survey import _psf_field, make_camera

    xs = np.atleast_1d(np.asarray(x, float))
    ys = np.atleast_1d(np.asarray(y, float))
    field = _psf_field(config, make_camera(config), detector_id, visit)
    ix, iy = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
    stamps = field.stamps(xs, ys, half_pix, ix, iy)
    # Moments centred on the pixel, as the truth grid and PsfModel.image(x, y) (centred) are.
    centred = field.stamps(ix.astype(float), iy.astype(float), half_pix, ix, iy)
    mom = np.array([_adaptive_moments(st) for st in centred]).reshape(-1, 3)
    return PsfTruthAtStars(xs, ys, mom[:, 0], mom[:, 1], mom[:, 2], stamps)


def galaxy_point_source_distance(config: SimulationConfig, visit: VisitSpec, detector_id: int,
                                 galaxy_id: npt.ArrayLike, x: npt.ArrayLike, y: npt.ArrayLike,
                                 instflux: npt.ArrayLike, pixel_variance: npt.ArrayLike
                                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """How far, in noise sigmas, each true galaxy's image is from the nearest point source.

    The galaxy is drawn noise-free as the simulator draws it (profile, half-light radius,
    ellipticity and orientation of its ``galaxy_id``, convolved with the true PSF at
    ``(x, y)``, total ``instflux`` counts); the point source is the true PSF there with the
    flux that fits best. The result is ``d = ||G - a P|| / sigma`` with ``sigma² =
    pixel_variance`` (per galaxy; the sky's: the galaxy's own Poisson noise is left out).
    Returns ``(d, a)``: the distances and the fitted point-source fluxes (counts; the star a
    test must tell the galaxy from has flux ``a``, below the galaxy's).

    ``d`` is the separation of the two hypotheses in the most powerful test between them
    (Neyman–Pearson: the log-likelihood ratio is Gaussian with unit variance and means 0 and
    ``d``), so no test on the pixels can tell this galaxy from a star better than one that
    knows its exact profile, position and flux. Leaving out the galaxy's Poisson noise and a
    shift of the point source only makes ``d`` larger: a bound built on it stays a bound.
    """
    from .survey import GALAXY_GSPARAMS, _population, _psf_field, galaxy_profile, make_camera

    gid = np.atleast_1d(np.asarray(galaxy_id, np.int64))
    xs, ys = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    flux = np.atleast_1d(np.asarray(instflux, float))
    var = np.broadcast_to(np.asarray(pixel_variance, float), gid.shape)
    camera = make_camera(config)
    det = camera.detector(detector_id)
    field = _psf_field(config, camera, detector_id, visit)
    gals = _population(config).galaxies
    row_of = {int(v): k for k, v in enumerate(np.asarray(gals["id"], np.int64))}
    missing = [int(g) for g in gid if int(g) not in row_of]
    if missing:
        raise ValueError(f"galaxy ids {missing[:5]} are not in the simulated population")
    scale = camera.pixel_scale_arcsec(detector_id)
    out = np.empty(gid.size)
    point_flux = np.empty(gid.size)
    for k in range(gid.size):
        # The simulator's profile and stamp, at least 20 px: the point source's wings are in it too.
        prof, half = galaxy_profile(gals[row_of[int(gid[k])]], visit, det.rotation_deg, scale, min_half_pix=20)
        psf = field.galsim_psf(float(xs[k]), float(ys[k]))
        draw = {"nx": 2 * half + 1, "ny": 2 * half + 1, "scale": 1.0, "method": "no_pixel"}
        g = galsim.Convolve(prof, psf, gsparams=GALAXY_GSPARAMS).drawImage(**draw).array.astype(np.float64)
        p = psf.drawImage(**draw).array.astype(np.float64)
        g *= flux[k] / g.sum()
        a = float(np.sum(g * p) / np.sum(p * p))
        out[k] = math.sqrt(float(np.sum((g - a * p) ** 2)) / float(var[k]))
        point_flux[k] = a
    return out, point_flux


@dataclass(frozen=True)
class PsfStarResiduals:
    """PSF model minus truth at the star positions (HSM adaptive moments of both).

    ``size_err_pct`` is ``100 (σ_model / σ_true − 1)`` per star; ``de1``,
    ``de2`` the distortion residuals ``e_model − e_true``. The summary is
    their median, the standard deviation of ``size_err_pct`` (``scatter``)
    and the number of stars where both moments converged.
    """

    size_err_pct: npt.NDArray[np.float64]
    de1: npt.NDArray[np.float64]
    de2: npt.NDArray[np.float64]
    size_err_median_pct: float
    size_err_scatter_pct: float
    de1_median: float
    de2_median: float
    n_stars: int


def psf_residuals_at_stars(psf_model: PsfModel, truth: PsfTruthAtStars) -> PsfStarResiduals:
    """Size and ellipticity residuals of ``psf_model`` at the star positions of ``truth``.

    The model is drawn centred at the nearest pixel centre of each star and
    measured with the same HSM code as the truth (:class:`PsfTruthAtStars`).
    """
    ix, iy = np.rint(truth.x), np.rint(truth.y)
    mom = np.array([_adaptive_moments(psf_model.image(float(a), float(b)))
                    for a, b in zip(ix, iy, strict=True)]).reshape(-1, 3)
    size = 100.0 * (mom[:, 0] / truth.sigma_pix - 1.0)
    de1, de2 = mom[:, 1] - truth.e1, mom[:, 2] - truth.e2
    ok = np.isfinite(size) & np.isfinite(de1) & np.isfinite(de2)
    nan = float("nan")
    if not ok.any():
        return PsfStarResiduals(size, de1, de2, nan, nan, nan, nan, 0)
    return PsfStarResiduals(size, de1, de2, float(np.median(size[ok])), float(np.std(size[ok])),
                            float(np.median(de1[ok])), float(np.median(de2[ok])), int(ok.sum()))


@dataclass(frozen=True)
class ApertureCorrectionError:
    """Error of the aperture-corrected PSF flux of unit-flux true stars.

    ``err_mmag`` per star is ``2500 log10(apcorr · f_psf)``: positive when the
    corrected PSF flux comes out brighter than the total flux; ``rms_mmag`` is
    its root mean square about zero (the mean included), ``mean_mmag`` its mean.
    """

    err_mmag: npt.NDArray[np.float64]
    rms_mmag: float
    mean_mmag: float
    n_stars: int


def mean_ellipticity_floor(catalog: Any, psf: Any) -> dict[str, float]:
    """Statistical floor of the mean PSF ellipticity given the stars a fit used.

    Each ``calib_psf_used`` star's adaptive-moment ellipticity scatters about the model's at
    its position by ``a / (S/N)`` (PSF-flux S/N); ``a`` is estimated per component from the
    residuals, robustly (the median of a chi-square with one degree of freedom is 0.455).
    The inverse-variance mean of the stars is then known to ``a / sqrt(sum (S/N)^2)``:
    returned as ``de1_floor`` and ``de2_floor`` with ``a`` (``e1_noise_coeff``,
    ``e2_noise_coeff``) and the number of stars. NaN with fewer than three usable stars.
    """
    used = np.asarray(catalog["calib_psf_used"], bool)
    x = np.asarray(catalog["base_SdssCentroid_x"], float)[used]
    y = np.asarray(catalog["base_SdssCentroid_y"], float)[used]
    xx, yy, xy = (np.asarray(catalog[f"ext_shapeHSM_HsmSourceMoments_{c}"], float)[used] for c in ("xx", "yy", "xy"))
    snr = (np.asarray(catalog["base_PsfFlux_instFlux"], float)
           / np.asarray(catalog["base_PsfFlux_instFluxErr"], float))[used]
    out: dict[str, float] = {"n_stars": int(used.sum())}
    model = np.asarray(psf.moments_many(x, y), float).reshape(-1, 3) if x.size else np.zeros((0, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        (e1, e2), (m1, m2) = distortion(xx, yy, xy), distortion(model[:, 0], model[:, 1], model[:, 2])
    resid = {"e1": e1 - m1, "e2": e2 - m2}
    for comp, d in resid.items():
        ok = np.isfinite(d) & np.isfinite(snr) & (snr > 0)
        if ok.sum() < 3:
            out[f"{comp}_noise_coeff"] = out[f"d{comp}_floor"] = math.nan
            continue
        a = float(np.sqrt(np.median((d[ok] * snr[ok]) ** 2) / 0.455))
        out[f"{comp}_noise_coeff"] = a
        out[f"d{comp}_floor"] = a / float(np.sqrt(np.sum(snr[ok] ** 2)))
    return out


def aperture_correction_error_mmag(psf_model: PsfModel, ap_corr: ChebyshevField, truth: PsfTruthAtStars, *,
                                   max_kernel_size_pix: int = 41) -> ApertureCorrectionError:
    """Aperture-corrected PSF flux of the true PSF vs its total flux, at the star positions.

    At each star the PSF flux is measured as the pipeline measures it (linear
    fit of the model kernel, placed at the star's sub-pixel position, at fixed
    centroid over a ``min(default_size, max_kernel_size_pix)`` stamp) on the
    true unit-flux star, with uniform weights (the sky-limited regime of most
    stars); ``ap_corr`` (the applied ``base_PsfFlux`` field) should bring it to
    1, the total flux.
    """
    n = min(int(psf_model.default_size) | 1, int(max_kernel_size_pix) | 1, truth.stamps.shape[-1])
    kernels = psf_model.images(truth.x, truth.y, size=n, centered=False)
    c, h = truth.stamps.shape[-1] // 2, n // 2
    data = truth.stamps[:, c - h:c + h + 1, c - h:c + h + 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_psf = np.sum(kernels * data, axis=(1, 2)) / np.sum(kernels * kernels, axis=(1, 2))
        err = 2500.0 * np.log10(np.asarray(ap_corr.evaluate(truth.x, truth.y), float).reshape(-1) * f_psf)
    ok = np.isfinite(err)
    if not ok.any():
        return ApertureCorrectionError(err, float("nan"), float("nan"), 0)
    return ApertureCorrectionError(err, float(np.sqrt(np.mean(err[ok] ** 2))), float(np.mean(err[ok])),
                                   int(ok.sum()))


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


def true_psf_fwhm_pix(truth: DetectorTruth) -> float:
    """FWHM (pixels) of the true PSF: 2.3548 × the median HSM sigma over the truth grid."""
    return 2.3548 * float(np.median(np.asarray(truth.psf_grid["sigma_pix"], float)))


def eligible_stars(truth_sources: Table, *, snr_min: float = 10.0, edge_pix: float = 20.0,
                   isolation_pix: float = 10.0, neighbour_flux_ratio: float = 0.1,
                   psf_fwhm_pix: float | None = None, isolation_fwhm: float = 2.5,
                   bbox: tuple[int, int, int, int] | None = None) -> npt.NDArray[np.bool_]:
    """The true stars a star selection should recover (one flag per row of ``truth_sources``).

    Unsaturated point sources with truth ``snr`` ≥ ``snr_min``, at least ``edge_pix`` from the
    detector edge (``bbox`` ``(x_min, y_min, x_max, y_max)``, default
    ``truth_sources.meta["bbox"]``), with no other true source brighter than
    ``neighbour_flux_ratio`` × their flux within ``max(isolation_pix, isolation_fwhm ×
    psf_fwhm_pix)``: isolation is a matter of PSF overlap, so it scales with the seeing (10 px
    is 2.5 FWHM at 0.8″ and 0.2″/px; at 1.3″ a neighbour 10 px away is 1.5 FWHM off and merges
    with the star in the smoothed image, undetectable as a separate peak).
    """
    tx, ty = np.asarray(truth_sources["x"], float), np.asarray(truth_sources["y"], float)
    flux = np.asarray(truth_sources["instflux"], float)
    is_star = np.asarray(truth_sources["is_star"], bool)
    if bbox is None:
        bbox = truth_sources.meta.get("bbox")
    if bbox is None:
        raise KeyError("truth_sources.meta has no 'bbox'; pass bbox=(x_min, y_min, x_max, y_max)")
    xmin, ymin, xmax, ymax = bbox
    isolated = np.ones(len(tx), bool)
    radius = max(isolation_pix, isolation_fwhm * psf_fwhm_pix) if psf_fwhm_pix else isolation_pix
    if len(tx) > 1:
        tree = cKDTree(np.column_stack([tx, ty]))
        for i, j in tree.query_pairs(radius, output_type="ndarray"):
            if flux[j] > neighbour_flux_ratio * flux[i]:
                isolated[i] = False
            if flux[i] > neighbour_flux_ratio * flux[j]:
                isolated[j] = False
    return np.asarray(is_star & ~np.asarray(truth_sources["saturated"], bool) & isolated
                      & (np.asarray(truth_sources["snr"], float) >= snr_min)
                      & (tx >= xmin + edge_pix) & (tx <= xmax - edge_pix)
                      & (ty >= ymin + edge_pix) & (ty <= ymax - edge_pix))


def star_recovery(stars_table: Table, truth_sources: Table, *, match_radius_pix: float = 2.0,
                  snr_min: float = 10.0, edge_pix: float = 20.0, isolation_pix: float = 10.0,
                  neighbour_flux_ratio: float = 0.1, psf_fwhm_pix: float | None = None,
                  isolation_fwhm: float = 2.5,
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
    snr_min, edge_pix, isolation_pix, neighbour_flux_ratio, psf_fwhm_pix, isolation_fwhm, bbox
        Which true stars count for completeness: :func:`eligible_stars`.

    Returns
    -------
    (recovered_pct, contaminant_pct)
        % of eligible true stars (unsaturated, isolated, S/N ≥ ``snr_min``,
        away from edges) matched by a selected star; % of selected stars with
        no true star (of any brightness) within ``match_radius_pix``. NaN
        when a denominator is zero.
    """
    tx, ty = np.asarray(truth_sources["x"], float), np.asarray(truth_sources["y"], float)
    is_star = np.asarray(truth_sources["is_star"], bool)
    eligible = eligible_stars(truth_sources, snr_min=snr_min, edge_pix=edge_pix, isolation_pix=isolation_pix,
                              neighbour_flux_ratio=neighbour_flux_ratio, psf_fwhm_pix=psf_fwhm_pix,
                              isolation_fwhm=isolation_fwhm, bbox=bbox)
    sx, sy = _xy_columns(stars_table)
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


def _cr_truth_map(cr_truth: npt.NDArray[np.bool_] | Sequence[npt.NDArray[np.bool_]],
                  shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """Injected CR pixels as one map (per-snap masks OR-ed); ValueError if not of ``shape``."""
    truth = np.asarray(cr_truth, bool)
    if truth.ndim == 3:
        truth = truth.any(axis=0)
    if truth.shape != shape:
        raise ValueError(f"cr_truth shape {truth.shape} differs from mask shape {shape}")
    return truth


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
    truth = _cr_truth_map(cr_truth, mask.shape)
    if image is not None and variance is not None:
        img = np.asarray(image, float)
        truth = truth & (img - np.median(img) >= nsigma * np.sqrt(np.maximum(np.asarray(variance, float), 0)))
    n = int(truth.sum())
    if n == 0:
        return float("nan")
    return 100.0 * float(np.sum(any_set(mask, MaskPlane.CR) & truth)) / n


def cr_flagged_star_centres_pct(mask: npt.NDArray[np.integer], truth_sources: Table,
                                cr_truth: npt.NDArray[np.bool_] | Sequence[npt.NDArray[np.bool_]], *,
                                origin: tuple[int, int] = (0, 0)) -> float:
    """% of unsaturated true stars whose centre pixel carries the CR bit though no cosmic ray hit them.

    Issue 3's "<= 0.1 % of unsaturated stars get a CR-flagged centre": a star core taken for a
    cosmic ray. Stars with an injected CR pixel within 1 px of their centre (``cr_truth``, per
    snap or OR-ed) are left out, as are stars off the image. Positions are parent pixels
    (``origin`` = parent position of ``mask[0, 0]``). NaN when no star remains.
    """
    truth = _cr_truth_map(cr_truth, mask.shape)
    ny, nx = mask.shape
    x = np.rint(np.asarray(truth_sources["x"], float) - origin[0]).astype(np.int64)
    y = np.rint(np.asarray(truth_sources["y"], float) - origin[1]).astype(np.int64)
    keep = (np.asarray(truth_sources["is_star"], bool) & ~np.asarray(truth_sources["saturated"], bool)
            & (x >= 1) & (x < nx - 1) & (y >= 1) & (y < ny - 1))
    x, y = x[keep], y[keep]
    hit = np.zeros(x.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            hit |= truth[y + dy, x + dx]
    x, y = x[~hit], y[~hit]
    if x.size == 0:
        return float("nan")
    return 100.0 * float(np.mean(any_set(mask, MaskPlane.CR)[y, x]))


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
    rec, con = (star_recovery(stars, truth.sources, psf_fwhm_pix=true_psf_fwhm_pix(truth))
                if stars is not None else (nan, nan))
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
    # A failed detector's row is NaN: say why under the table.
    lines += [f"visit {row.get('visit')} detector {row.get('detector')}: failed in {row['failure']}"
              for row in rows if row.get("failure")]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "nan" if not math.isfinite(float(value)) else f"{float(value):.2f}"
    return str(value)
