"""Small fixed test scenes in the spirit of Rubin's CalibrateImageTask unit-test fixture."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS

from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MASK_DTYPE
from singleframe.photo_calib import PhotoCalib

#: Scene geometry: 201 columns × 181 rows whose first pixel has parent centre (5, 4).
SCENE_NX, SCENE_NY = 201, 181
SCENE_ORIGIN = (5, 4)
SCENE_CALIBRATION_NJY_PER_COUNT = 12.3
SCENE_PSF_SIGMA_PIX = 2.0
SCENE_NOISE_SIGMA = 10.0
SCENE_BACKGROUND = 500.0
#: Target PSF-flux S/N of the six point sources.
SCENE_STAR_SNR = (6.0, 12.0, 45.0, 150.0, 400.0, 1000.0)
#: Their parent positions: well separated (> 45 px) and ≥ 25 px from every edge.
SCENE_STAR_XY = ((35.3, 30.7), (175.6, 32.2), (34.1, 158.4), (176.8, 160.9), (60.5, 94.1), (150.2, 96.6))
#: The extended source: parent centre, second moments (xx, yy, xy in px², PSF included), counts.
SCENE_GALAXY_XY = (105.0, 94.0)
SCENE_GALAXY_MOMENTS = (8.0, 9.0, 3.0)
SCENE_GALAXY_FLUX = 60000.0


@dataclass(frozen=True, eq=False)
class RubinTestScene:
    """A tiny calibrated scene with known truth.

    Attributes
    ----------
    exposure
        Image (counts, background included), variance, empty mask, TAN WCS and visit info.
    refcat
        Reference catalogue (format of docs/architecture.md) of the six stars.
    truth
        The seven sources: ``x``, ``y`` (parent px), ``flux`` (counts),
        ``flux_njy``, ``is_star``, ``snr``.
    calibration_njy_per_count
        True calibration.
    """

    exposure: Exposure
    refcat: Table
    truth: Table
    calibration_njy_per_count: float


def _gaussian_image(nx: int, ny: int, x0: int, y0: int, xc: float, yc: float,
                    cov: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    """Unit-flux elliptical Gaussian integrated over pixels with 5x5 sub-samples."""
    ixx, iyy, ixy = cov
    det = ixx * iyy - ixy * ixy
    sub = (np.arange(5) - 2) / 5.0
    xs = (np.arange(nx) + x0)[None, :, None, None] + sub[None, None, None, :] - xc
    ys = (np.arange(ny) + y0)[:, None, None, None] + sub[None, None, :, None] - yc
    q = (iyy * xs * xs - 2 * ixy * xs * ys + ixx * ys * ys) / det
    img = np.exp(-0.5 * q).mean(axis=(2, 3))
    return img / (2 * math.pi * math.sqrt(det))


def _scene_wcs(ra_deg: float, dec_deg: float, scale_arcsec: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    # CRPIX is 1-based on the array: the centre of the image.
    w.wcs.crpix = [(SCENE_NX - 1) / 2.0 + 1.0, (SCENE_NY - 1) / 2.0 + 1.0]
    s = scale_arcsec / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]  # north up, east left
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def rubin_test_scene(*, seed: int = 12345, ra_deg: float = 245.0, dec_deg: float = -45.0) -> RubinTestScene:
    """The Rubin-like unit-test scene: six stars of increasing S/N and one extended source.

    Parameters
    ----------
    seed
        Seed of the Gaussian noise (σ = 10 counts per pixel).
    ra_deg, dec_deg
        Sky position of the image centre.

    Returns
    -------
    RubinTestScene
        A 201x181 exposure with origin (5, 4), 0.2"/px TAN WCS, Gaussian PSF
        σ = 2 px, a flat +500 count background, variance 100 and no mask bits.

    Notes
    -----
    A PSF-fit flux on a Gaussian PSF of σ in white noise σ_n has
    S/N = F / (σ_n √(4π σ²)); the star fluxes are set from that.
    """
    rng = np.random.default_rng(seed)
    x0, y0 = SCENE_ORIGIN
    nea = 4 * math.pi * SCENE_PSF_SIGMA_PIX**2
    star_flux = np.array(SCENE_STAR_SNR) * SCENE_NOISE_SIGMA * math.sqrt(nea)
    psf_cov = (SCENE_PSF_SIGMA_PIX**2, SCENE_PSF_SIGMA_PIX**2, 0.0)
    model = np.zeros((SCENE_NY, SCENE_NX))
    for (xs, ys), f in zip(SCENE_STAR_XY, star_flux, strict=True):
        model += f * _gaussian_image(SCENE_NX, SCENE_NY, x0, y0, xs, ys, psf_cov)
    model += SCENE_GALAXY_FLUX * _gaussian_image(SCENE_NX, SCENE_NY, x0, y0, *SCENE_GALAXY_XY, SCENE_GALAXY_MOMENTS)
    image = model + SCENE_BACKGROUND + rng.normal(0.0, SCENE_NOISE_SIGMA, model.shape)

    wcs = _scene_wcs(ra_deg, dec_deg, 0.2)
    mjd = 60000.0
    visit_info = VisitInfo(visit=1, exposure_time_s=30.0, mjd_tai=mjd, band="r", physical_filter="r_sim",
                           boresight_ra_deg=ra_deg, boresight_dec_deg=dec_deg, rotation_angle_deg=0.0,
                           airmass=1.1, instrument="TestCam")
    detector = DetectorInfo(id=0, name="scene", gain_e_per_count=1.0, read_noise_e=SCENE_NOISE_SIGMA,
                            saturation_count=float("inf"))
    exposure = Exposure(image=image.astype(np.float32), mask=np.zeros(image.shape, MASK_DTYPE),
                        variance=np.full(image.shape, SCENE_NOISE_SIGMA**2, np.float32),
                        visit_info=visit_info, detector=detector, wcs=wcs, origin=SCENE_ORIGIN,
                        photo_calib=PhotoCalib(SCENE_CALIBRATION_NJY_PER_COUNT))

    xs = np.array([p[0] for p in SCENE_STAR_XY] + [SCENE_GALAXY_XY[0]])
    ys = np.array([p[1] for p in SCENE_STAR_XY] + [SCENE_GALAXY_XY[1]])
    flux = np.concatenate([star_flux, [SCENE_GALAXY_FLUX]])
    gal_nea = 4 * math.pi * math.sqrt(SCENE_GALAXY_MOMENTS[0] * SCENE_GALAXY_MOMENTS[1] - SCENE_GALAXY_MOMENTS[2] ** 2)
    truth = Table()
    truth["x"] = xs * u.pix
    truth["y"] = ys * u.pix
    truth["flux"] = flux * u.ct
    truth["flux_njy"] = flux * SCENE_CALIBRATION_NJY_PER_COUNT * u.nJy
    truth["is_star"] = np.array([True] * len(SCENE_STAR_XY) + [False])
    truth["snr"] = np.concatenate([SCENE_STAR_SNR, [SCENE_GALAXY_FLUX / (SCENE_NOISE_SIGMA * math.sqrt(gal_nea))]])

    ra, dec = exposure.pixel_to_sky(xs, ys)
    stars = np.asarray(truth["is_star"])
    refcat = _refcat_from_truth(ra[stars], dec[stars], flux[stars] * SCENE_CALIBRATION_NJY_PER_COUNT,
                                epoch_year=2000.0 + (mjd - 51544.5) / 365.25)
    return RubinTestScene(exposure=exposure, refcat=refcat, truth=truth,
                     calibration_njy_per_count=SCENE_CALIBRATION_NJY_PER_COUNT)


def _refcat_from_truth(ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64], r_flux: npt.NDArray[np.float64], *,
                       epoch_year: float) -> Table:
    """Exact reference catalogue (no errors, no proper motion) with g−r = 0.5 and r−i = 0.2."""
    n = len(ra)
    t = Table()
    t["id"] = np.arange(1, n + 1, dtype=np.int64)
    t["ra"] = ra * u.deg
    t["dec"] = dec * u.deg
    t["ra_err"] = np.full(n, 1.0) * u.mas
    t["dec_err"] = np.full(n, 1.0) * u.mas
    t["pm_ra"] = np.zeros(n) * u.mas / u.yr
    t["pm_dec"] = np.zeros(n) * u.mas / u.yr
    t["parallax"] = np.zeros(n) * u.mas
    t["epoch"] = np.full(n, epoch_year)
    for band, factor in (("g", 10 ** (-0.4 * 0.5)), ("r", 1.0), ("i", 10 ** (0.4 * 0.2))):
        t[f"{band}_flux"] = r_flux * factor * u.nJy
        t[f"{band}_fluxErr"] = 0.01 * r_flux * factor * u.nJy
    return t


def two_snap_version(scene: RubinTestScene) -> tuple[Exposure, Exposure]:
    """Two snaps whose sum is the scene's exposure: image/2 and variance/2 each, half the exposure time."""
    e = scene.exposure
    vi = e.visit_info
    half_t = vi.exposure_time_s / 2.0
    snaps = []
    for i, dt in enumerate((-half_t / 2.0, half_t / 2.0)):
        info = dataclasses.replace(vi, exposure_time_s=half_t, mjd_tai=vi.mjd_tai + dt / 86400.0)
        snaps.append(e.replace(image=e.image / np.float32(2), variance=e.variance / np.float32(2), visit_info=info,
                               photo_calib=PhotoCalib(scene.calibration_njy_per_count * 2.0),
                               mask=e.mask.copy(), metadata={**e.metadata, "snap": i, "n_snaps": 2}))
    return snaps[0], snaps[1]
