"""The survey simulator: camera, reference catalogue and post-ISR detector images with truth.

Everything here is pure: functions return in-memory objects and write nothing.

How a detector is drawn
-----------------------
1. One star and galaxy population covers all visits (fixed on the sky, cached
   per config); stars move with their proper motions from epoch 2016.0.
2. Sources are placed through the TRUE WCS (the camera WCS at the true
   pointing); the exposures carry the header WCS built from a pointing that is
   off by ``pointing_error_arcsec`` and ``rotation_error_deg``.
3. The PSF is a Kolmogorov profile convolved with the pixel, dilated and
   sheared smoothly over the focal plane. That pixelised PSF is drawn once per
   detector, 4x oversampled, with GalSim; each star is a cubic-spline resample
   of it on a 61x61 stamp (151x151 for stars near saturation). A stamp holds
   the star's true flux times the fraction of the FULL profile inside it (the
   light beyond the stamp is lost, never rescaled into it), so every star's
   core is exactly true flux x PSF whatever its stamp: apertures up to 25 px
   lie inside every stamp and only the far wings (< 1 mmag beyond 30 px at
   0.6-1.0") are missing from faint stars' images.
   Galaxies are GalSim exponential / de Vaucouleurs profiles convolved with
   the same local PSF object. Both go into one noiseless source image.
4. Each snap gets the sky (with a gentle gradient) plus ``1/n_snaps`` of the
   sources, bleed trails where a column saturates, Poisson and read noise,
   bad columns and its own cosmic rays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import galsim
import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from singleframe.camera import Camera, square_mosaic
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MASK_DTYPE, MaskPlane
from singleframe.photo_calib import AB_MAG_OF_ONE_NJY, ab_mag_to_njy

from .config import SIM_BANDS, SimulationConfig, VisitSpec

#: Oversampling of the drawn PSF that stars are resampled from.
_PSF_OVERSAMPLING = 4
#: Stamp half-widths (pixels): normal stars, stars that saturate. 30 px keeps the largest
#: measurement aperture (25 px) and the 17-25 px tail annulus inside every stamp.
_STAR_HALF_PIX = 30
_BRIGHT_HALF_PIX = 75
_STAR_ID_OFFSET = 1_000_000
_GALAXY_ID_OFFSET = 50_000_000
_MJD_J2000 = 51544.5


# --------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, eq=False)
class DetectorTruth:
    """What was really put into a simulated detector.

    Attributes
    ----------
    wcs
        TRUE WCS (array pixel -> sky), as an exposure's ``wcs`` is used.
    sources
        One row per source whose centre lies on the detector: ``id``, ``ra``,
        ``dec`` (deg, at the visit epoch), ``x``, ``y`` (parent px),
        ``flux_njy`` (in the camera's system), ``instflux`` (counts in the
        combined visit image), ``is_star``, ``is_galaxy``, ``saturated``
        (centre saturated in any snap), ``refcat_id`` (-1 if not in the
        reference catalogue), ``mag`` (AB, camera system) and ``snr`` (PSF-flux
        S/N in the combined image from the true flux and noise). ``meta`` holds
        ``bbox`` ``(x_min, y_min, x_max, y_max)``.
    psf_grid
        ``x``, ``y``, ``ixx``, ``iyy``, ``ixy`` (px²), ``sigma_pix``, ``e1``,
        ``e2``: HSM adaptive moments of the PSF as drawn on the pixel grid, on
        a 5x5 grid of positions.
    calibration_njy_per_count
        True calibration of the combined visit image.
    cr_masks
        Per snap, pixels whose cosmic-ray deposit exceeds
        ``config.cr_truth_nsigma`` times the combined-visit noise.
    psf_sigma_center_pix
        PSF determinant radius at the detector centre.
    sky_counts_per_pixel
        Sky level of the combined visit image at the detector centre.
    shape, origin
        ``(ny, nx)`` and parent coordinates of pixel ``[0, 0]``.
    header_wcs
        The (wrong) WCS written on the snaps.
    bad_columns
        Columns (parent x) flagged BAD.
    """

    wcs: WCS
    sources: Table
    psf_grid: Table
    calibration_njy_per_count: float
    cr_masks: tuple[npt.NDArray[np.bool_], ...]
    psf_sigma_center_pix: float
    sky_counts_per_pixel: float
    shape: tuple[int, int]
    origin: tuple[int, int]
    header_wcs: WCS
    bad_columns: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class SimulatedDetector:
    """The post-ISR snaps of one detector of one visit, with their truth."""

    snaps: tuple[Exposure, ...]
    truth: DetectorTruth


# --------------------------------------------------------------------------------------
# Camera and sky populations


@functools.lru_cache(maxsize=8)
def make_camera(config: SimulationConfig) -> Camera:
    """The simulated camera: ``n_side × n_side`` detectors with cubic radial distortion."""
    return square_mosaic(
        config.instrument, n_side=config.n_side, nx=config.nx, ny=config.ny,
        pixel_size_mm=config.pixel_size_mm, plate_scale_arcsec_per_mm=config.plate_scale_arcsec_per_mm,
        gap_mm=config.gap_mm, distortion_k3_per_mm2=config.distortion_k3_per_mm2,
        gain_e_per_count=config.gain_e_per_count, read_noise_e=config.read_noise_e,
        saturation_count=config.saturation_count,
    )


def _field_radius_mm(camera: Camera) -> float:
    """Largest focal-plane radius reached by any detector corner."""
    r = 0.0
    for d in camera.detectors:
        x, y = d.pixel_to_focal_plane(np.array([0, d.nx - 1, 0, d.nx - 1]), np.array([0, 0, d.ny - 1, d.ny - 1]))
        r = max(r, float(np.max(np.hypot(x, y))))
    return r


def _unit_vectors(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike) -> npt.NDArray[np.float64]:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _survey_cap(config: SimulationConfig) -> tuple[float, float, float]:
    """Centre (deg) and radius (deg) of a sky cap holding every visit's field plus margin."""
    cam = make_camera(config)
    r_mm = _field_radius_mm(cam)
    r_field_deg = cam.plate_scale_arcsec_per_mm * r_mm * (1 + cam.distortion_k3_per_mm2 * r_mm**2) / 3600.0
    vecs = _unit_vectors([v.boresight_ra_deg for v in config.visits], [v.boresight_dec_deg for v in config.visits])
    c = vecs.mean(axis=0)
    c /= np.linalg.norm(c)
    ra_c = math.degrees(math.atan2(c[1], c[0])) % 360.0
    dec_c = math.degrees(math.asin(c[2]))
    reach = max(math.degrees(math.acos(min(1.0, float(np.dot(c, v))))) for v in vecs)
    pointing = max(math.hypot(*v.pointing_error_arcsec) for v in config.visits) / 3600.0
    return ra_c, dec_c, reach + r_field_deg + pointing + config.refcat_margin_arcsec / 3600.0


def _sample_cap(rng: np.random.Generator, n: int, ra_c: float, dec_c: float,
                radius_deg: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``n`` points uniform on the sphere inside a cap."""
    cos_t = rng.uniform(math.cos(math.radians(radius_deg)), 1.0, n)
    sin_t = np.sqrt(1.0 - cos_t**2)
    phi = rng.uniform(0.0, 2 * math.pi, n)
    ra0, dec0 = math.radians(ra_c), math.radians(dec_c)
    centre = np.array([math.cos(dec0) * math.cos(ra0), math.cos(dec0) * math.sin(ra0), math.sin(dec0)])
    east = np.array([-math.sin(ra0), math.cos(ra0), 0.0])
    north = np.cross(centre, east)
    v = (sin_t * np.cos(phi))[:, None] * east + (sin_t * np.sin(phi))[:, None] * north + cos_t[:, None] * centre
    ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
    return ra, dec


def _power_law_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> npt.NDArray[np.float64]:
    """Magnitudes with dN/dm ∝ 10^(slope m) between ``lo`` and ``hi`` (inverse CDF)."""
    if slope == 0 or hi == lo:
        return rng.uniform(lo, hi, n)
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.uniform(0, 1, n) * (b - a)) / slope


def _cap_area_deg2(radius_deg: float) -> float:
    return 2 * math.pi * (1 - math.cos(math.radians(radius_deg))) * (180 / math.pi) ** 2


@dataclass(frozen=True, eq=False)
class _Population:
    stars: Table
    galaxies: Table


@functools.lru_cache(maxsize=2)
def _population(config: SimulationConfig) -> _Population:
    """The true stars and galaxies of the survey (standard-system fluxes, epoch 2016)."""
    rng = np.random.default_rng([config.seed, 1])
    ra_c, dec_c, radius = _survey_cap(config)
    area = _cap_area_deg2(radius)
    n_faint = rng.poisson(config.star_density_per_deg2 * area)
    n_bright = rng.poisson(config.bright_star_density_per_deg2 * area)
    n = n_faint + n_bright
    ra, dec = _sample_cap(rng, n, ra_c, dec_c, radius)
    r_mag = np.concatenate([
        _power_law_mags(rng, n_faint, *config.star_mag_range, config.star_count_slope_dex_per_mag),
        rng.uniform(*config.bright_star_mag_range, n_bright),
    ])
    # Stellar locus: g-r spans 0.2-1.5, r-i follows it with a little scatter.
    g_r = np.clip(0.2 + 1.3 * rng.beta(2.0, 2.5, n), 0.2, 1.5)
    r_i = np.clip(-0.05 + 0.45 * g_r + rng.normal(0, 0.03, n), -0.1, 1.0)
    pm = rng.normal(0.0, config.pm_sigma_mas_per_yr, (n, 2))
    fast = rng.uniform(0, 1, n) < config.fast_pm_fraction
    speed = rng.uniform(0.3, 1.0, int(fast.sum())) * config.fast_pm_max_mas_per_yr
    angle = rng.uniform(0, 2 * math.pi, int(fast.sum()))
    pm[fast] = np.column_stack([speed * np.sin(angle), speed * np.cos(angle)])
    stars = Table()
    stars["id"] = np.arange(n, dtype=np.int64) + _STAR_ID_OFFSET
    stars["ra"], stars["dec"] = ra, dec
    stars["pm_ra"], stars["pm_dec"] = pm[:, 0], pm[:, 1]
    stars["parallax"] = rng.uniform(0.1, 3.0, n)
    stars["r_mag"] = r_mag
    stars["g_mag"] = r_mag + g_r
    stars["i_mag"] = r_mag - r_i

    ng = rng.poisson(config.galaxy_density_per_deg2 * area)
    gra, gdec = _sample_cap(rng, ng, ra_c, dec_c, radius)
    gr_mag = _power_law_mags(rng, ng, *config.galaxy_mag_range, config.galaxy_count_slope_dex_per_mag)
    gal = Table()
    gal["id"] = np.arange(ng, dtype=np.int64) + _GALAXY_ID_OFFSET
    gal["ra"], gal["dec"] = gra, gdec
    gal["r_mag"] = gr_mag
    gal["g_mag"] = gr_mag + rng.uniform(0.3, 1.2, ng)
    gal["i_mag"] = gr_mag - rng.uniform(0.2, 0.6, ng)
    # Fainter galaxies are smaller; 0.25"-2" half-light radii.
    gal["hlr_arcsec"] = np.clip(0.7 * 10 ** (-0.1 * (gr_mag - 20.0)) * rng.lognormal(0, 0.35, ng), 0.25, 2.0)
    gal["ellipticity"] = np.clip(np.abs(rng.normal(0, 0.3, ng)), 0, 0.7)
    gal["pa_deg"] = rng.uniform(0, 180, ng)
    gal["is_dev"] = rng.uniform(0, 1, ng) < config.galaxy_devaucouleurs_fraction
    return _Population(stars, gal)


def _system_mag(config: SimulationConfig, table: Table, band: str) -> npt.NDArray[np.float64]:
    """Magnitude in the camera's own bandpass (reference system plus the colour term)."""
    g_r = np.asarray(table["g_mag"] - table["r_mag"], float)
    return np.asarray(table[f"{band}_mag"], float) + config.color_term_mag_per_mag * (g_r - config.color_term_pivot_g_r)


def make_reference_catalog(config: SimulationConfig) -> Table:
    """Reference catalogue covering every visit's field plus ``refcat_margin_arcsec``.

    Stars with r ≤ ``refcat_mag_limit``, positions at epoch ``refcat_epoch_year``
    with 1–5 mas errors, proper motions with ~0.3 mas/yr errors and fluxes with
    0.5–1 % errors: close to the truth but not equal to it.

    Returns
    -------
    astropy.table.Table
        Columns ``id, ra, dec, ra_err, dec_err, pm_ra, pm_dec, parallax, epoch``
        and ``<band>_flux, <band>_fluxErr`` (nJy) for g, r, i.

    Raises
    ------
    ConfigError
        If ``config`` is invalid.
    """
    config.validate()
    pop = _population(config).stars
    keep = np.asarray(pop["r_mag"]) <= config.refcat_mag_limit
    s = pop[keep]
    n = len(s)
    rng = np.random.default_rng([config.seed, 2])
    lo, hi = config.refcat_position_err_mas
    r_mag = np.asarray(s["r_mag"], float)
    # Brighter stars have smaller astrometric errors.
    frac = np.clip((r_mag - 16.0) / 6.5, 0, 1)
    pos_err = lo + (hi - lo) * frac
    flo, fhi = config.refcat_flux_err_frac
    flux_err_frac = flo + (fhi - flo) * frac
    dec0 = np.asarray(s["dec"], float)
    dra = rng.normal(0, 1, n) * pos_err
    ddec = rng.normal(0, 1, n) * pos_err
    out = Table()
    out["id"] = np.asarray(s["id"], np.int64)
    out["ra"] = (np.asarray(s["ra"], float) + dra / 3.6e6 / np.cos(np.radians(dec0))) % 360.0
    out["dec"] = dec0 + ddec / 3.6e6
    out["ra"].unit = out["dec"].unit = u.deg
    out["ra_err"] = pos_err
    out["dec_err"] = pos_err
    out["ra_err"].unit = out["dec_err"].unit = u.mas
    pm_err = 0.1 + 0.4 * frac
    out["pm_ra"] = np.asarray(s["pm_ra"], float) + rng.normal(0, 1, n) * pm_err
    out["pm_dec"] = np.asarray(s["pm_dec"], float) + rng.normal(0, 1, n) * pm_err
    out["pm_ra"].unit = out["pm_dec"].unit = u.mas / u.yr
    out["parallax"] = np.asarray(s["parallax"], float) + rng.normal(0, 1, n) * pm_err
    out["parallax"].unit = u.mas
    out["epoch"] = np.full(n, config.refcat_epoch_year)
    for band in SIM_BANDS:
        flux = ab_mag_to_njy(np.asarray(s[f"{band}_mag"], float))
        out[f"{band}_flux"] = flux * (1 + rng.normal(0, 1, n) * flux_err_frac)
        out[f"{band}_fluxErr"] = flux * flux_err_frac
        out[f"{band}_flux"].unit = out[f"{band}_fluxErr"].unit = u.nJy
    out.meta["epoch"] = config.refcat_epoch_year
    return out


# --------------------------------------------------------------------------------------
# PSF


def _shear_inverse(s: npt.NDArray[np.float64], e1: npt.NDArray[np.float64],
                   e2: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Inverse of (dilation ``s`` × GalSim shear with distortion (e1, e2)), shape (N, 2, 2)."""
    e = np.hypot(e1, e2)
    g = e / (1 + np.sqrt(1 - e * e))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(e > 0, g / e, 0.5)
    g1, g2 = e1 * ratio, e2 * ratio
    k = 1.0 / (np.sqrt(1 - g * g) * s)
    out = np.empty((len(s), 2, 2))
    out[:, 0, 0] = k * (1 - g1)
    out[:, 0, 1] = -k * g2
    out[:, 1, 0] = -k * g2
    out[:, 1, 1] = k * (1 + g1)
    return out


@dataclass(frozen=True, eq=False)
class _PsfField:
    """The PSF over one detector: a pixelised base profile dilated and sheared with position."""

    base: galsim.GSObject  # Kolmogorov ⊗ pixel, in pixel units
    coeffs: npt.NDArray[np.float64]  # spline coefficients of the oversampled base image
    centre: float  # index of the base image centre
    fp: tuple[float, float, float, float, float]  # (cx_mm, cy_mm, cos, sin, pixel_mm) of the detector
    r_max_mm: float
    fwhm_variation: float
    e_max: float
    det_rotation_deg: float

    def params(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], ...]:
        """Dilation and pixel-frame distortion (s, e1, e2) at array positions."""
        cx, cy, c, s_, p = self.fp
        du, dv = np.asarray(x, float), np.asarray(y, float)
        xf = cx + (c * du - s_ * dv) * p
        yf = cy + (s_ * du + c * dv) * p
        rho2 = (xf**2 + yf**2) / self.r_max_mm**2
        dil = 1.0 + self.fwhm_variation * (rho2 - 0.5)
        phi2 = 2 * np.arctan2(yf, xf)
        # A constant component plus a pattern growing with field radius (like defocus/coma).
        e1f = 0.2 * self.e_max + 0.8 * self.e_max * rho2 * np.cos(phi2)
        e2f = 0.8 * self.e_max * rho2 * np.sin(phi2)
        # Focal-plane ellipticity rotated into the detector frame (spin 2).
        a = -2 * math.radians(self.det_rotation_deg)
        e1 = e1f * math.cos(a) - e2f * math.sin(a)
        e2 = e1f * math.sin(a) + e2f * math.cos(a)
        return dil, e1, e2

    def stamps(self, x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], half: int,
               ix: npt.NDArray[np.int64], iy: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """PSF stamps ``(N, 2 half + 1, 2 half + 1)`` centred on pixels (ix, iy), each summing to the
        fraction of the unit-flux profile inside the stamp (not rescaled to 1: a truncated stamp must
        not move wing light into the core)."""
        n = 2 * half + 1
        out = np.empty((len(x), n, n), np.float32)
        grid = np.arange(-half, half + 1, dtype=float)
        chunk = max(1, 400_000 // (n * n))
        for i0 in range(0, len(x), chunk):
            sl = slice(i0, i0 + chunk)
            dil, e1, e2 = self.params(x[sl], y[sl])
            minv = _shear_inverse(dil, e1, e2)
            dx = grid[None, None, :] - (x[sl] - ix[sl])[:, None, None]
            dy = grid[None, :, None] - (y[sl] - iy[sl])[:, None, None]
            bx = minv[:, 0, 0, None, None] * dx + minv[:, 0, 1, None, None] * dy
            by = minv[:, 1, 0, None, None] * dx + minv[:, 1, 1, None, None] * dy
            coords = np.stack([self.centre + _PSF_OVERSAMPLING * by, self.centre + _PSF_OVERSAMPLING * bx])
            vals = ndimage.map_coordinates(self.coeffs, coords.reshape(2, -1), order=3,
                                           prefilter=False, mode="constant", cval=0.0)
            vals = vals.reshape(-1, n, n)
            # The oversampled base holds surface brightness x (1/OS)^2 of a unit-flux profile; a
            # unit-grid sample of the transformed profile is that times OS^2 |det M^-1|.
            det = np.abs(minv[:, 0, 0] * minv[:, 1, 1] - minv[:, 0, 1] * minv[:, 1, 0])
            vals *= (_PSF_OVERSAMPLING**2 * det)[:, None, None]
            out[sl] = vals
        return out

    def galsim_psf(self, x: float, y: float) -> galsim.GSObject:
        """The same local PSF as a GalSim object (pixel already included)."""
        dil, e1, e2 = (float(v) for v in self.params(x, y))
        return self.base.dilate(dil).shear(galsim.Shear(e1=e1, e2=e2))


#: GalSim accuracy of the galaxy drawings.
GALAXY_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3)


def galaxy_profile(row: Any, visit: VisitSpec, detector_rotation_deg: float, pixel_scale_arcsec: float, *,
                   flux: float = 1.0, min_half_pix: int = 15) -> tuple[galsim.GSObject, int]:
    """A population galaxy (``_population(...).galaxies`` row) on a detector, in pixels, before the PSF.

    Returns the sheared profile of total ``flux`` and the half-width (pixels) of the stamp it is
    drawn on: 5 (exponential) or 8 (de Vaucouleurs) half-light radii, within
    ``[min_half_pix, 50]``.
    """
    hlr = float(row["hlr_arcsec"]) / pixel_scale_arcsec
    if row["is_dev"]:
        prof = galsim.DeVaucouleurs(half_light_radius=hlr, flux=flux, trunc=8 * hlr, gsparams=GALAXY_GSPARAMS)
    else:
        prof = galsim.Exponential(half_light_radius=hlr, flux=flux, gsparams=GALAXY_GSPARAMS)
    angle_offset = 90.0 - visit.rotation_deg - detector_rotation_deg
    prof = prof.shear(e=float(row["ellipticity"]), beta=(float(row["pa_deg"]) + angle_offset) * galsim.degrees)
    half = int(min(max(math.ceil((8 if row["is_dev"] else 5) * hlr), min_half_pix), 50))
    return prof, half


def _psf_field(config: SimulationConfig, camera: Camera, detector_id: int, visit: VisitSpec) -> _PsfField:
    det = camera.detector(detector_id)
    fwhm_pix = visit.seeing_fwhm_arcsec / (camera.plate_scale_arcsec_per_mm * det.pixel_size_mm)
    base = galsim.Convolve(galsim.Kolmogorov(fwhm=fwhm_pix), galsim.Pixel(1.0))
    # Wide enough for the bright-star stamps after the largest dilation/shear.
    half = int(math.ceil((_BRIGHT_HALF_PIX * math.sqrt(2) * 1.15 + 4) * _PSF_OVERSAMPLING))
    img = base.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=1.0 / _PSF_OVERSAMPLING, method="no_pixel")
    coeffs = ndimage.spline_filter(img.array.astype(np.float64), order=3, mode="constant")
    cu, cv = det.center_pixel
    c, s = math.cos(math.radians(det.rotation_deg)), math.sin(math.radians(det.rotation_deg))
    cx = det.center_x_mm + (-c * cu + s * cv) * det.pixel_size_mm
    cy = det.center_y_mm + (-s * cu - c * cv) * det.pixel_size_mm
    return _PsfField(base, coeffs, float(half), (cx, cy, c, s, det.pixel_size_mm), _field_radius_mm(camera),
                     config.psf_fwhm_variation_frac, config.psf_ellipticity_max, det.rotation_deg)


def _hsm_moments(stamp: npt.NDArray[np.floating]) -> tuple[float, float, float, float, float, float]:
    """(ixx, iyy, ixy, sigma, e1, e2) from GalSim HSM adaptive moments."""
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(stamp, np.float64), scale=1.0))
    sig = float(res.moments_sigma)
    e1, e2 = float(res.observed_shape.e1), float(res.observed_shape.e2)
    f = sig * sig / math.sqrt(max(1 - e1 * e1 - e2 * e2, 1e-12))
    return f * (1 + e1), f * (1 - e1), f * e2, sig, e1, e2


# --------------------------------------------------------------------------------------
# Detector


def _epoch_year(mjd: float) -> float:
    return 2000.0 + (mjd - _MJD_J2000) / 365.25


def _header_pointing(visit: VisitSpec) -> tuple[float, float, float]:
    de, dn = visit.pointing_error_arcsec
    ra = (visit.boresight_ra_deg + de / 3600.0 / math.cos(math.radians(visit.boresight_dec_deg))) % 360.0
    return ra, visit.boresight_dec_deg + dn / 3600.0, visit.rotation_deg + visit.rotation_error_deg


def _on_detector(wcs: WCS, nx: int, ny: int, ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64],
                 margin_pix: float, scale_arcsec: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Indices and array positions of the points within ``margin_pix`` of the detector."""
    cra, cdec = wcs.all_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0)
    radius_deg = (math.hypot(nx, ny) / 2 + margin_pix) * scale_arcsec * 1.05 / 3600.0
    near = np.flatnonzero(_unit_vectors(ra, dec) @ _unit_vectors(float(cra), float(cdec))
                          > math.cos(math.radians(radius_deg)))
    if near.size == 0:
        return near, np.empty(0), np.empty(0)
    x, y = wcs.all_world2pix(ra[near], dec[near], 0, tolerance=1e-8, maxiter=50, quiet=True)
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > -margin_pix) & (x < nx - 1 + margin_pix) & (y > -margin_pix) & (y < ny - 1 + margin_pix)
    return near[ok], x[ok], y[ok]


def _add_stamps(model: npt.NDArray[np.float32], stamps: npt.NDArray[np.float32], flux: npt.NDArray[np.float64],
                ix: npt.NDArray[np.int64], iy: npt.NDArray[np.int64]) -> None:
    """Add ``flux × stamp`` into ``model`` around (ix, iy), clipped at the edges (in place)."""
    ny, nx = model.shape
    half = stamps.shape[1] // 2
    for k in range(len(flux)):
        x0, y0 = ix[k] - half, iy[k] - half
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + 2 * half + 1, nx), min(y0 + 2 * half + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        model[ya:yb, xa:xb] += np.float32(flux[k]) * stamps[k, ya - y0:yb - y0, xa - x0:xb - x0]


def _bleed(model: npt.NDArray[np.float32], saturation: float) -> npt.NDArray[np.float32]:
    """Move charge above ``saturation`` along its column, filling neighbours up to saturation.

    Charge is conserved except what bleeds off the top or bottom of the detector.
    """
    cols = np.flatnonzero((model > saturation).any(axis=0))
    if cols.size == 0:
        return model
    out = model.copy()
    ny = model.shape[0]
    for col in cols:
        c = out[:, col].astype(np.float64)
        over = c > saturation
        # Runs of saturated pixels: each run's excess flows half up, half down.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], over.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            excess = float(np.sum(c[a:b] - saturation))
            c[a:b] = saturation
            for start, step in ((b, 1), (a - 1, -1)):
                left, i = excess / 2, start
                while left > 0 and 0 <= i < ny:
                    take = min(max(saturation - c[i], 0.0), left)
                    c[i] += take
                    left -= take
                    i += step
        out[:, col] = c
    return out


def _cosmic_rays(rng: np.random.Generator, config: SimulationConfig, nx: int,
                 ny: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Flat pixel indices and deposits (counts) of one snap's cosmic rays."""
    n = rng.poisson(config.cr_density_per_snap_per_mpix * nx * ny / 1e6)
    idx: list[npt.NDArray[np.int64]] = []
    dep: list[npt.NDArray[np.float64]] = []
    kinds = rng.choice(3, size=n, p=[0.35, 0.2, 0.45])
    for kind in kinds:
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        amp = rng.uniform(300.0, 3000.0)
        if kind == 0:  # single-pixel hit
            xs, ys, ws = np.array([x0]), np.array([y0]), np.array([amp])
        elif kind == 1:  # two adjacent pixels
            d = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(4))]
            xs, ys = np.array([x0, x0 + d[0]]), np.array([y0, y0 + d[1]])
            ws = np.array([amp, amp * rng.uniform(0.3, 1.0)])
        else:  # short track, sampled every 0.25 px
            length, theta = rng.uniform(3.0, 20.0), rng.uniform(0, math.pi)
            t = np.arange(0.0, length, 0.25)
            xs, ys = x0 + t * math.cos(theta), y0 + t * math.sin(theta)
            ws = np.full(t.size, amp * 0.25)
        ixs, iys = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
        ok = (ixs >= 0) & (ixs < nx) & (iys >= 0) & (iys < ny)
        idx.append(iys[ok] * nx + ixs[ok])
        dep.append(ws[ok])
    if not idx:
        return np.empty(0, np.int64), np.empty(0)
    flat, inv = np.unique(np.concatenate(idx), return_inverse=True)
    return flat, np.bincount(inv, weights=np.concatenate(dep))


def simulate_detector(config: SimulationConfig, visit: VisitSpec, detector_id: int, *,
                      refcat: Table | None = None) -> SimulatedDetector:
    """Simulate the post-ISR snaps of one detector of one visit.

    Parameters
    ----------
    config
        The survey.
    visit
        One of ``config.visits``.
    detector_id
        Detector of the camera.
    refcat
        Reference catalogue whose ``id`` column marks which true stars it holds
        (truth ``refcat_id``); default :func:`make_reference_catalog`.

    Returns
    -------
    SimulatedDetector
        Snaps in counts (image, variance from the noiseless model, BAD and SAT
        masks, header WCS) and the truth.

    Raises
    ------
    ConfigError
        If ``config`` is invalid or the detector does not exist.
    """
    config.validate()
    visit.validate()
    camera = make_camera(config)
    det = camera.detector(detector_id)
    nx, ny = det.nx, det.ny
    scale = camera.pixel_scale_arcsec(detector_id)
    gain, rn, sat = config.gain_e_per_count, config.read_noise_e, config.saturation_count
    calib = visit.calibration_njy_per_count
    rng = np.random.default_rng([config.seed, 3, visit.visit, detector_id])

    true_wcs = camera.initial_wcs(detector_id, visit.boresight_ra_deg, visit.boresight_dec_deg, visit.rotation_deg)
    hra, hdec, hrot = _header_pointing(visit)
    header_wcs = camera.initial_wcs(detector_id, hra, hdec, hrot)
    psf = _psf_field(config, camera, detector_id, visit)

    # -- stars at the visit epoch -------------------------------------------------------
    pop = _population(config)
    stars = pop.stars
    dt = _epoch_year(visit.mjd_tai) - config.refcat_epoch_year
    sdec0 = np.asarray(stars["dec"], float)
    sra = np.asarray(stars["ra"], float) + np.asarray(stars["pm_ra"]) * dt / 3.6e6 / np.cos(np.radians(sdec0))
    sdec = sdec0 + np.asarray(stars["pm_dec"]) * dt / 3.6e6
    si, sx, sy = _on_detector(true_wcs, nx, ny, sra % 360.0, sdec, _BRIGHT_HALF_PIX, scale)
    s_mag = _system_mag(config, stars[si], visit.band)
    s_flux_njy = ab_mag_to_njy(s_mag)
    s_inst = s_flux_njy / calib
    six, siy = np.rint(sx).astype(np.int64), np.rint(sy).astype(np.int64)

    model = np.zeros((ny, nx), np.float32)
    # A star whose peak may approach saturation in one snap gets a wide stamp for its halo.
    sigma_guess = visit.seeing_fwhm_arcsec / scale / 2.355
    bright = s_inst / visit.n_snaps / (2 * math.pi * sigma_guess**2) > 0.2 * sat
    for sel, half in ((~bright, _STAR_HALF_PIX), (bright, _BRIGHT_HALF_PIX)):
        k = np.flatnonzero(sel)
        if k.size:
            st = psf.stamps(sx[k], sy[k], half, six[k], siy[k])
            _add_stamps(model, st, s_inst[k], six[k], siy[k])

    # -- galaxies ----------------------------------------------------------------------
    gals = pop.galaxies
    gi, gx, gy = _on_detector(true_wcs, nx, ny, np.asarray(gals["ra"], float), np.asarray(gals["dec"], float),
                              30.0, scale)
    g_mag = _system_mag(config, gals[gi], visit.band)
    g_flux_njy = ab_mag_to_njy(g_mag)
    g_inst = np.empty(gi.size)
    for k, row in enumerate(gals[gi]):
        prof, half = galaxy_profile(row, visit, det.rotation_deg, scale, flux=float(g_flux_njy[k] / calib))
        ix, iy = int(round(gx[k])), int(round(gy[k]))
        img = galsim.Convolve(prof, psf.galsim_psf(gx[k], gy[k]), gsparams=GALAXY_GSPARAMS).drawImage(
            nx=2 * half + 1, ny=2 * half + 1, scale=1.0, offset=(gx[k] - ix, gy[k] - iy), method="no_pixel")
        arr = img.array.astype(np.float32)
        g_inst[k] = float(arr.sum(dtype=np.float64))
        _add_stamps(model, arr[None], np.array([1.0]), np.array([ix]), np.array([iy]))

    # -- sky, defects, snaps -----------------------------------------------------------
    cx, cy, c, s_, p = psf.fp
    xfp_col = (cx + c * np.arange(nx) * p).astype(np.float32)
    xfp_row = (-s_ * np.arange(ny) * p).astype(np.float32)
    sky_shape = 1.0 + config.sky_gradient_frac_per_mm * (xfp_row[:, None] + xfp_col[None, :])
    brng = np.random.default_rng([config.seed, 4, detector_id])
    bad_cols = tuple(int(v) for v in brng.choice(np.arange(8, nx - 8), size=min(config.n_bad_columns, nx - 16),
                                                 replace=False))
    bad_start = [0 if brng.uniform() < 0.5 else int(brng.integers(0, ny // 2)) for _ in bad_cols]

    snap_variances: list[npt.NDArray[np.float32]] = []
    snaps: list[Exposure] = []
    cr_list: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = []
    saturated_any = np.zeros((ny, nx), bool)
    t_snap = visit.snap_time_s
    for i in range(visit.n_snaps):
        m = (visit.sky_counts_per_pixel * sky_shape + model / np.float32(visit.n_snaps)).astype(np.float32)
        m = _bleed(m, sat)
        sat_mask = m >= sat
        saturated_any |= sat_mask
        image = (rng.poisson(np.maximum(m, 0).astype(np.float64) * gain) / gain
                 + rng.normal(0.0, rn / gain, m.shape)).astype(np.float32)
        mask = np.zeros((ny, nx), MASK_DTYPE)
        for col, start in zip(bad_cols, bad_start, strict=True):
            # Dead column: 5 % response, still noisy.
            image[start:, col] = 0.05 * m[start:, col] + rng.normal(0, rn / gain, ny - start)
            mask[start:, col] |= MASK_DTYPE(MaskPlane.BAD)
        flat, dep = _cosmic_rays(rng, config, nx, ny)
        cr_list.append((flat, dep))
        image.ravel()[flat] += dep.astype(np.float32)
        image[sat_mask] = sat
        mask[sat_mask] |= MASK_DTYPE(MaskPlane.SAT)
        variance = (m / np.float32(gain) + np.float32((rn / gain) ** 2)).astype(np.float32)
        mjd = visit.mjd_tai + ((i + 0.5) * t_snap - visit.exposure_time_s / 2) / 86400.0
        vi = VisitInfo(visit=visit.visit, exposure_time_s=t_snap, mjd_tai=mjd, band=visit.band,
                       physical_filter=f"{visit.band}_sim", boresight_ra_deg=hra, boresight_dec_deg=hdec,
                       rotation_angle_deg=hrot, airmass=visit.airmass, instrument=config.instrument)
        di = DetectorInfo(id=detector_id, name=det.name, gain_e_per_count=gain, read_noise_e=rn,
                          saturation_count=sat)
        snaps.append(Exposure(image=image, mask=mask, variance=variance, visit_info=vi, detector=di,
                              wcs=header_wcs, origin=(0, 0),
                              metadata={"snap": i, "n_snaps": visit.n_snaps, "simulated": True}))
        snap_variances.append(variance)

    # CR truth: deposits significant in the combined visit image.
    noise_visit = np.sqrt(np.sum(snap_variances, axis=0, dtype=np.float32))
    cr_masks = []
    for flat, dep in cr_list:
        mk = np.zeros(nx * ny, bool)
        mk[flat[dep >= config.cr_truth_nsigma * noise_visit.ravel()[flat]]] = True
        cr_masks.append(mk.reshape(ny, nx))

    # -- truth -------------------------------------------------------------------------
    # Whole-pixel positions: the truth PSF is drawn centred on a pixel, as PsfModel.image(x, y) is.
    grid_x = np.rint(np.linspace(0.1, 0.9, 5) * (nx - 1))
    grid_y = np.rint(np.linspace(0.1, 0.9, 5) * (ny - 1))
    gxx, gyy = (a.ravel() for a in np.meshgrid(grid_x, grid_y))
    grid_stamps = psf.stamps(gxx, gyy, _STAR_HALF_PIX, np.rint(gxx).astype(np.int64), np.rint(gyy).astype(np.int64))
    mom = np.array([_hsm_moments(st) for st in grid_stamps])
    psf_grid = Table({"x": gxx, "y": gyy, "ixx": mom[:, 0], "iyy": mom[:, 1], "ixy": mom[:, 2],
                      "sigma_pix": mom[:, 3], "e1": mom[:, 4], "e2": mom[:, 5]})
    ccx, ccy = float(nx // 2), float(ny // 2)
    centre_stamp = psf.stamps(np.array([ccx]), np.array([ccy]), _STAR_HALF_PIX,
                              np.array([round(ccx)]), np.array([round(ccy)]))[0]
    sigma_c = _hsm_moments(centre_stamp)[3]

    if refcat is None:
        in_ref = np.asarray(stars["r_mag"][si]) <= config.refcat_mag_limit
    else:
        in_ref = np.isin(np.asarray(stars["id"])[si], np.asarray(refcat["id"]))
    src_x = np.concatenate([sx, gx])
    src_y = np.concatenate([sy, gy])
    inst = np.concatenate([s_inst, g_inst])
    gra = np.asarray(gals["ra"], float)[gi]
    gdec = np.asarray(gals["dec"], float)[gi]
    is_star = np.concatenate([np.ones(si.size, bool), np.zeros(gi.size, bool)])
    sky_visit = visit.sky_counts_per_pixel * visit.n_snaps
    # PSF-flux S/N: sky + read noise of all snaps over the noise-equivalent area 1 / Σ p² of the
    # local PSF (the centre's, scaled by the local dilation). 4πσ² of its HSM σ holds for a Gaussian
    # only: this Kolmogorov PSF's area is 1.22x that (its wings), and S/N came out 10 % high.
    dil = psf.params(src_x, src_y)[0]
    profile = centre_stamp / centre_stamp.sum()
    nea = dil**2 / float(np.sum(profile * profile))
    snr = inst / np.sqrt(np.maximum(inst, 0) / gain + nea * (sky_visit / gain + visit.n_snaps * (rn / gain) ** 2))
    on = (src_x >= -0.5) & (src_x < nx - 0.5) & (src_y >= -0.5) & (src_y < ny - 0.5)
    rx = np.clip(np.rint(src_x).astype(np.int64), 0, nx - 1)
    ry = np.clip(np.rint(src_y).astype(np.int64), 0, ny - 1)
    flux_njy = np.concatenate([s_flux_njy, g_flux_njy])
    sources = Table()
    sources["id"] = np.concatenate([np.asarray(stars["id"])[si], np.asarray(gals["id"])[gi]]).astype(np.int64)
    sources["ra"] = np.concatenate([sra[si] % 360.0, gra]) * u.deg
    sources["dec"] = np.concatenate([sdec[si], gdec]) * u.deg
    sources["x"] = src_x * u.pix
    sources["y"] = src_y * u.pix
    sources["flux_njy"] = flux_njy * u.nJy
    sources["instflux"] = inst * u.ct
    sources["is_star"] = is_star
    sources["is_galaxy"] = ~is_star
    sources["saturated"] = saturated_any[ry, rx]
    sources["refcat_id"] = np.concatenate([np.where(in_ref, np.asarray(stars["id"])[si], -1),
                                           np.full(gi.size, -1)]).astype(np.int64)
    sources["mag"] = (AB_MAG_OF_ONE_NJY - 2.5 * np.log10(flux_njy)) * u.mag
    sources["snr"] = snr
    sources = sources[on]
    sources.meta["bbox"] = (0, 0, nx - 1, ny - 1)
    sources.meta["visit"] = visit.visit
    sources.meta["detector"] = detector_id

    truth = DetectorTruth(
        wcs=true_wcs, sources=sources, psf_grid=psf_grid, calibration_njy_per_count=calib,
        cr_masks=tuple(cr_masks), psf_sigma_center_pix=float(sigma_c),
        sky_counts_per_pixel=float(sky_visit * sky_shape[ny // 2, nx // 2]), shape=(ny, nx), origin=(0, 0),
        header_wcs=header_wcs, bad_columns=bad_cols,
    )
    return SimulatedDetector(snaps=tuple(snaps), truth=truth)


def iter_survey(config: SimulationConfig) -> Iterator[tuple[VisitSpec, int, SimulatedDetector]]:
    """Yield ``(visit, detector_id, SimulatedDetector)`` for every visit × detector, one at a time."""
    config.validate()
    refcat = make_reference_catalog(config)
    for visit in config.visits:
        for det in make_camera(config).detectors:
            yield visit, det.id, simulate_detector(config, visit, det.id, refcat=refcat)
