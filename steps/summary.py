"""Detector-level summary statistics (Rubin's ExposureSummaryStats).

Every field is defined once, in :data:`SUMMARY_FIELDS` (name → definition
and unit). Fields that cannot be computed (no WCS, no PSF, no photometric
calibration, no PSF stars, unknown band for the fiducials) are NaN; corner
lists are four NaNs.

Conventions: positions are parent pixels; "PSF stars" are the stars with
``calib_psf_used`` (taken from ``stars``; from ``psf_stars`` when ``stars``
lacks the flag or the HSM moments), further restricted, as Rubin does, to
S/N 50–1000 on ``base_PsfFlux`` and no shape / PSF-flux flag, for the
residual statistics. Ellipticities are e1 = (xx − yy)/(xx + yy),
e2 = 2xy/(xx + yy); size = sqrt((xx + yy)/2). Clipped statistics use
``clip_sigma`` (3) and ``clip_iterations`` (2) about the median.
The "unmasked grid" is a regular grid with spacing ``psf_grid_spacing_pix``
(96 px) of pixels without BAD, CR, EDGE, INTRP, NO_DATA, SAT, SUSPECT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from scipy.spatial import cKDTree

from ..background import BackgroundList
from ..errors import ConfigError
from ..exposure import Exposure, zenith_distance_deg
from ..masks import MaskPlane, any_set
from ..photo_calib import PhotoCalib
from ..psf import distortion

#: Name → one-line definition (with unit) of every summary field.
SUMMARY_FIELDS: dict[str, str] = {
    "psfSigma": "PSF determinant radius (Ixx Iyy − Ixy²)^¼ at the detector centre [pixel]",
    "psfArea": "PSF effective (noise-equivalent) area (ΣK)²/ΣK² of the kernel at the centre [pixel²]",
    "psfIxx": "PSF second moment Ixx at the centre [pixel²]",
    "psfIyy": "PSF second moment Iyy at the centre [pixel²]",
    "psfIxy": "PSF second moment Ixy at the centre [pixel²]",
    "ra": "RA of the detector centre [deg]",
    "dec": "Dec of the detector centre [deg]",
    "raCorners": "RA of the four outer pixel-edge corners (x_min, y_min), (x_max, y_min), (x_max, y_max), (x_min, y_max) [deg]",
    "decCorners": "Dec of the same four corners [deg]",
    "pixelScale": "sqrt(|det J|) of the WCS Jacobian at the centre [arcsec/pixel]",
    "zenithDistance": "90° − altitude of the detector centre at the exposure mid-time seen from the observatory "
                      "(astropy AltAz, no refraction); arccos(1/airmass) of the visit if that fails [deg]",
    "expTime": "exposure time [s]",
    "zeroPoint": "AB magnitude of a source giving 1 count (includes the exposure time) [mag]",
    "skyBg": "sum over background components of the median of the binned background values [count]",
    "skyNoise": "3σ-clipped (2 iterations) standard deviation of the background-subtracted image, "
                "NO_DATA and SUSPECT pixels excluded [count]",
    "meanVar": "3σ-clipped (2 iterations) mean of the variance plane, same pixels [count²]",
    "astromOffsetMean": "3σ-clipped mean of the astrometric match separations [arcsec]",
    "astromOffsetStd": "3σ-clipped standard deviation of the astrometric match separations [arcsec]",
    "nPsfStar": "number of stars with calib_psf_used [count]",
    "psfStarDeltaE1Median": "median of e1(star) − e1(PSF model) over PSF stars [dimensionless]",
    "psfStarDeltaE2Median": "median of e2(star) − e2(PSF model) over PSF stars [dimensionless]",
    "psfStarDeltaE1Scatter": "normal-scaled MAD of e1(star) − e1(PSF model) [dimensionless]",
    "psfStarDeltaE2Scatter": "normal-scaled MAD of e2(star) − e2(PSF model) [dimensionless]",
    "psfStarDeltaSizeMedian": "median of size(star) − size(PSF model) [pixel]",
    "psfStarDeltaSizeScatter": "normal-scaled MAD of size(star) − size(PSF model) [pixel]",
    "psfStarScaledDeltaSizeScatter": "psfStarDeltaSizeScatter / median star size [dimensionless]",
    "psfTraceRadiusDelta": "max − min of the PSF trace radius sqrt((Ixx+Iyy)/2) over the unmasked grid [pixel]",
    "psfApFluxDelta": "max − min over the unmasked grid of the PSF-model flux fraction within radius "
                      "max(2, 3 psfSigma); NaN if any is <= 0 (Rubin) [dimensionless]",
    "psfApCorrSigmaScaledDelta": "(max − min of the base_PsfFlux aperture correction over the unmasked grid) "
                                 "/ psfSigma [1/pixel]",
    "maxDistToNearestPsf": "largest distance from an unmasked pixel (8-pixel grid) to its nearest PSF star of the "
                           "statistics (used, S/N 50-1000, unflagged; Rubin) [pixel]",
    "magLim": "5σ point-source limit (SMTN-002): S/N = S/sqrt(S + psfArea (B + n_snaps RN²)) in electrons with "
              "B = skyBg·gain, solved for S, magLim = zeroPoint − 2.5 log10(S/gain) [mag]",
    "effTime": "10^(0.8 (magLim − fiducial magLim)) · fiducial exposure time: the exposure time giving the same "
               "point-source depth under fiducial conditions (Rubin HEAD definition) [s]",
    "effTimePsfSigmaScale": "(psfSigma / fiducial psfSigma)^−2 [dimensionless]",
    "effTimeSkyBgScale": "fiducial sky rate / (skyBg / expTime) [dimensionless]",
    "effTimeZeroPointScale": "10^(−0.8 ΔZP), ΔZP = fiducial ZP − (zeroPoint − 2.5 log10 expTime), capped at "
                             "max_effective_transparency [dimensionless]",
    "starEMedian": "median |e| = sqrt(e1² + e2²) of the PSF stars [dimensionless]",
    "starUnNormalizedEMedian": "median sqrt((xx − yy)² + (2xy)²) of the PSF stars [pixel²]",
}

_PSF_GRID_BAD = (MaskPlane.BAD | MaskPlane.CR | MaskPlane.EDGE | MaskPlane.INTRP | MaskPlane.NO_DATA
                 | MaskPlane.SAT | MaskPlane.SUSPECT)


def _lsst(values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip("ugrizy", values, strict=True))


@dataclass(frozen=True)
class SummaryConfig:
    """Configuration of :func:`compute_summary_stats` (fiducials: LSSTCam values from obs_lsst)."""

    #: Sigma clipping threshold and iterations for skyNoise, meanVar and astrometric offsets.
    clip_sigma: float = 3.0
    clip_iterations: int = 2
    #: Mask planes excluded from skyNoise/meanVar.
    sky_bad_planes: tuple[str, ...] = ("NO_DATA", "SUSPECT")
    #: Most pixels used for skyNoise/meanVar (a regular subsample keeps this fast on large detectors).
    max_sky_pixels: int = 1_000_000
    #: Grid spacing for the PSF-model variation fields (pixels).
    psf_grid_spacing_pix: int = 96
    #: Grid spacing for maxDistToNearestPsf (pixels).
    psf_distance_spacing_pix: int = 8
    #: S/N range on base_PsfFlux of the PSF stars entering the residual statistics.
    psf_star_min_snr: float = 50.0
    psf_star_max_snr: float = 1000.0
    #: S/N of the magnitude limit.
    mag_lim_snr: float = 5.0
    #: :func:`quality_warnings`: the PSF model misses its stars when |psfStarDeltaE1/E2Median| exceeds
    #: this (measured: <= 5e-4 on the simulated benchmark frames, <= 0.01 on the real SDSS g and i
    #: frames, 0.067 on SDSS r, whose faint stars are more elongated than its bright ones) ...
    warn_psf_delta_e: float = 0.02
    #: ... or |psfStarDeltaSizeMedian| exceeds this fraction of the PSF size (psfSigma).
    warn_psf_delta_size_frac: float = 0.02
    #: Fiducial PSF sigma per band (pixels).
    fiducial_psf_sigma_pix: dict[str, float] = field(
        default_factory=lambda: _lsst((1.72, 1.63, 1.56, 1.51, 1.47, 1.44)))
    #: Fiducial zero point per band for a 1 s exposure (mag).
    fiducial_zero_point_mag: dict[str, float] = field(
        default_factory=lambda: _lsst((26.56, 28.59, 28.50, 28.29, 27.90, 26.87)))
    #: Fiducial sky rate per band (counts/s).
    fiducial_sky_count_per_s: dict[str, float] = field(
        default_factory=lambda: _lsst((1.51, 15.45, 32.95, 52.94, 79.40, 90.57)))
    #: Fiducial 5σ limiting magnitude per band (mag).
    fiducial_mag_lim_mag: dict[str, float] = field(
        default_factory=lambda: _lsst((23.70, 24.97, 24.52, 24.13, 23.56, 22.55)))
    #: Fiducial exposure time (s) for effTime.
    fiducial_exp_time_s: float = 30.0
    #: Cap on effTimeZeroPointScale (inf: no cap).
    max_effective_transparency: float = float("inf")

    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid values."""
        if not self.clip_sigma > 0 or self.clip_iterations < 0:
            raise ConfigError("summary.clip_sigma must be > 0 and clip_iterations >= 0")
        if self.psf_grid_spacing_pix < 1 or self.psf_distance_spacing_pix < 1 or self.max_sky_pixels < 1:
            raise ConfigError("summary grid spacings and max_sky_pixels must be >= 1")
        if not 0 < self.psf_star_min_snr < self.psf_star_max_snr:
            raise ConfigError("summary needs 0 < psf_star_min_snr < psf_star_max_snr")
        unknown = [p for p in self.sky_bad_planes if p not in MaskPlane.__members__]
        if unknown:
            raise ConfigError(f"summary.sky_bad_planes has unknown planes {unknown}; valid: {list(MaskPlane.__members__)}")


def compute_summary_stats(exposure: Exposure, *, stars: Table, psf_stars: Table, background: BackgroundList | None,
                          astrometry_matches: Table | None, photo_calib: PhotoCalib | None,
                          config: SummaryConfig = SummaryConfig()) -> dict[str, Any]:
    """Compute every field of :data:`SUMMARY_FIELDS`.

    Parameters
    ----------
    exposure
        Background-subtracted exposure in counts (with PSF, WCS, ap_corr when available).
    stars, psf_stars
        Star catalogue and PSF-star catalogue.
    background
        Background subtracted from ``exposure`` (counts).
    astrometry_matches
        Astrometric matches (``distance_arcsec`` or ``distance`` [rad]); None if no astrometry.
    photo_calib
        Fitted photometric calibration; None if none.
    config
        Step configuration.

    Returns
    -------
    dict
        Field name → float (``raCorners``/``decCorners``: list of 4 floats).
    """
    config.validate()
    nan = float("nan")
    out: dict[str, Any] = dict.fromkeys(SUMMARY_FIELDS, nan)
    out["raCorners"] = [nan] * 4
    out["decCorners"] = [nan] * 4
    visit = exposure.visit_info
    out["expTime"] = float(visit.exposure_time_s)
    cx, cy = exposure.center_pix

    _psf_stats(out, exposure, cx, cy, config)
    _wcs_stats(out, exposure, cx, cy)
    if photo_calib is not None and photo_calib.calibration_njy_per_count > 0:
        out["zeroPoint"] = float(photo_calib.zero_point_mag)
    if background is not None and len(background):
        out["skyBg"] = float(sum(float(np.median(c.values[np.isfinite(c.values)])) for c in background))
    _image_stats(out, exposure, config)
    if astrometry_matches is not None and len(astrometry_matches):
        if "distance_arcsec" in astrometry_matches.colnames:
            sep = np.asarray(astrometry_matches["distance_arcsec"], float)
        else:
            sep = np.asarray(astrometry_matches["distance"], float) * (180 / math.pi * 3600)
        m, s = _clipped_mean_std(sep[np.isfinite(sep)], config.clip_sigma, config.clip_iterations)
        out["astromOffsetMean"], out["astromOffsetStd"] = m, s
    _psf_star_stats(out, exposure, stars, psf_stars, config)
    _depth_stats(out, exposure, config)
    return out


# --------------------------------------------------------------------------------------
def _psf_stats(out: dict[str, Any], exposure: Exposure, cx: float, cy: float, config: SummaryConfig) -> None:
    psf = exposure.psf
    if psf is None:
        return
    ixx, iyy, ixy = psf.moments(cx, cy)
    out["psfIxx"], out["psfIyy"], out["psfIxy"] = float(ixx), float(iyy), float(ixy)
    out["psfSigma"] = float(psf.sigma(cx, cy))
    out["psfArea"] = float(psf.area(cx, cy))
    xs, ys = _unmasked_grid(exposure, config.psf_grid_spacing_pix)
    if len(xs) == 0:
        return
    m = psf.moments_many(xs, ys)  # vectorised (interpolated for pixel models)
    trace = np.sqrt(0.5 * (m[:, 0] + m[:, 1]))
    out["psfTraceRadiusDelta"] = float(trace.max() - trace.min())
    radius = max(2.0, 3.0 * out["psfSigma"])
    size = int(2 * math.ceil(radius) + 3)
    oy, ox = np.mgrid[: size, : size] - size // 2
    inside = np.hypot(ox, oy) <= radius
    apflux = psf.images(xs, ys, size=size)[:, inside].sum(axis=1)
    # A non-positive aperture flux anywhere is a broken model, not a spread: NaN (as Rubin).
    if np.all(np.isfinite(apflux) & (apflux > 0)):
        out["psfApFluxDelta"] = float(apflux.max() - apflux.min())
    apc = exposure.ap_corr.get("base_PsfFlux", exposure.ap_corr.get("base_PsfFlux_instFlux"))
    if apc is not None and out["psfSigma"] > 0:
        v = np.asarray(apc.evaluate(xs, ys), float)
        out["psfApCorrSigmaScaledDelta"] = float((v.max() - v.min()) / out["psfSigma"])


def _unmasked_grid(exposure: Exposure, spacing: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    sub = exposure.mask[::spacing, ::spacing]
    good = ~any_set(sub, _PSF_GRID_BAD)
    iy, ix = np.nonzero(good)
    return ix * float(spacing) + exposure.origin[0], iy * float(spacing) + exposure.origin[1]


def _wcs_stats(out: dict[str, Any], exposure: Exposure, cx: float, cy: float) -> None:
    if exposure.wcs is None:
        return
    x_min, y_min, x_max, y_max = exposure.bbox
    xc = np.array([x_min - 0.5, x_max + 0.5, x_max + 0.5, x_min - 0.5])
    yc = np.array([y_min - 0.5, y_min - 0.5, y_max + 0.5, y_max + 0.5])
    ra_c, dec_c = exposure.pixel_to_sky(xc, yc)
    out["raCorners"] = [float(v) for v in ra_c]
    out["decCorners"] = [float(v) for v in dec_c]
    ra, dec = exposure.pixel_to_sky(np.array([cx, cx + 1.0, cx]), np.array([cy, cy, cy + 1.0]))
    out["ra"], out["dec"] = float(ra[0]), float(dec[0])
    cosd = math.cos(math.radians(dec[0]))
    dra = (ra[1:] - ra[0] + 180.0) % 360.0 - 180.0
    jac = np.array([[dra[0] * cosd, dra[1] * cosd], [dec[1] - dec[0], dec[2] - dec[0]]]) * 3600.0
    out["pixelScale"] = float(math.sqrt(abs(np.linalg.det(jac))))
    out["zenithDistance"] = _zenith_distance(out["ra"], out["dec"], exposure)


def _zenith_distance(ra: float, dec: float, exposure: Exposure) -> float:
    """Zenith distance (deg) of (ra, dec) at the visit's site and mid-point; from its airmass if no site."""
    visit = exposure.visit_info
    lon, lat, _height = visit.observatory_lon_lat_height
    zd = zenith_distance_deg(ra, dec, float(visit.mjd_tai), lon, lat)
    if math.isfinite(zd):
        return zd
    am = float(visit.airmass)
    return float(math.degrees(math.acos(1.0 / am))) if math.isfinite(am) and am >= 1.0 else float("nan")


def _image_stats(out: dict[str, Any], exposure: Exposure, config: SummaryConfig) -> None:
    planes = MaskPlane(0)
    for p in config.sky_bad_planes:
        planes |= MaskPlane[p]
    ny, nx = exposure.shape
    step = max(1, int(math.ceil(math.sqrt(ny * nx / config.max_sky_pixels))))
    img = exposure.image[::step, ::step]
    var = exposure.variance[::step, ::step]
    good = ~any_set(exposure.mask[::step, ::step], planes) & np.isfinite(img) & np.isfinite(var)
    if not good.any():
        return
    _, out["skyNoise"] = _clipped_mean_std(img[good].astype(np.float64), config.clip_sigma, config.clip_iterations)
    out["meanVar"], _ = _clipped_mean_std(var[good].astype(np.float64), config.clip_sigma, config.clip_iterations)


def _clipped_mean_std(v: npt.NDArray[np.float64], nsig: float, n_iter: int) -> tuple[float, float]:
    if len(v) == 0:
        return float("nan"), float("nan")
    keep = np.ones(len(v), bool)
    for _ in range(n_iter):
        centre = float(np.median(v[keep]))
        std = float(np.std(v[keep]))
        new = np.abs(v - centre) <= nsig * std
        if new.sum() == 0 or np.array_equal(new, keep):
            break
        keep = new
    std = float(np.std(v[keep], ddof=1)) if keep.sum() > 1 else float("nan")
    return float(np.mean(v[keep])), std


def _moments(table: Table, prefix: str) -> tuple[npt.NDArray[np.float64], ...] | None:
    cols = [f"{prefix}_xx", f"{prefix}_yy", f"{prefix}_xy"]
    if not all(c in table.colnames for c in cols):
        return None
    return tuple(np.asarray(table[c], float) for c in cols)


def _psf_star_stats(out: dict[str, Any], exposure: Exposure, stars: Table, psf_stars: Table,
                    config: SummaryConfig) -> None:
    src_m = "ext_shapeHSM_HsmSourceMoments"
    cat = stars
    if "calib_psf_used" not in stars.colnames or _moments(stars, src_m) is None:
        cat = psf_stars
    if "calib_psf_used" not in cat.colnames:
        return
    used = np.asarray(cat["calib_psf_used"], bool)
    out["nPsfStar"] = int(used.sum())
    # The stars of the statistics (Rubin's starSelector): used, S/N in [min, max], shape and PSF
    # flux unflagged. maxDistToNearestPsf is measured to them too, as in Rubin.
    sel = used.copy()
    if "base_PsfFlux_instFlux" in cat.colnames and "base_PsfFlux_instFluxErr" in cat.colnames:
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.asarray(cat["base_PsfFlux_instFlux"], float) / np.asarray(cat["base_PsfFlux_instFluxErr"], float)
        sel &= (snr >= config.psf_star_min_snr) & (snr <= config.psf_star_max_snr)
    for flag in (f"{src_m}_flag", "base_PsfFlux_flag"):
        if flag in cat.colnames:
            sel &= ~np.asarray(cat[flag], bool)
    if sel.any() and "base_SdssCentroid_x" in cat.colnames:
        px = np.asarray(cat["base_SdssCentroid_x"], float)[sel]
        py = np.asarray(cat["base_SdssCentroid_y"], float)[sel]
        ok = np.isfinite(px) & np.isfinite(py)
        gx, gy = _grid_for_distance(exposure, config.psf_distance_spacing_pix)
        if ok.any() and len(gx):
            d, _ = cKDTree(np.column_stack([px[ok], py[ok]])).query(np.column_stack([gx, gy]), k=1)
            out["maxDistToNearestPsf"] = float(d.max())
    mom = _moments(cat, src_m)
    if mom is None:
        return
    xx, yy, xy = (m[sel] for m in mom)
    pm = _moments(cat, "ext_shapeHSM_HsmPsfMoments")
    if pm is not None:
        pxx, pyy, pxy = (m[sel] for m in pm)
    elif exposure.psf is not None and "base_SdssCentroid_x" in cat.colnames:
        xs = np.asarray(cat["base_SdssCentroid_x"], float)[sel]
        ys = np.asarray(cat["base_SdssCentroid_y"], float)[sel]
        arr = np.array([exposure.psf.moments(x, y) for x, y in zip(xs, ys, strict=True)]).reshape(-1, 3)
        pxx, pyy, pxy = arr[:, 0], arr[:, 1], arr[:, 2]
    else:
        pxx = pyy = pxy = None
    good = np.isfinite(xx) & np.isfinite(yy) & np.isfinite(xy) & (xx + yy > 0)
    if not good.any():
        return
    xx, yy, xy = xx[good], yy[good], xy[good]
    t = xx + yy
    e1, e2 = distortion(xx, yy, xy)
    size = np.sqrt(0.5 * t)
    out["starEMedian"] = float(np.median(np.hypot(e1, e2)))
    out["starUnNormalizedEMedian"] = float(np.median(np.hypot(xx - yy, 2 * xy)))
    if pxx is None:
        return
    pxx, pyy, pxy = pxx[good], pyy[good], pxy[good]
    pt = pxx + pyy
    ok = np.isfinite(pt) & (pt > 0)
    if not ok.any():
        return
    pe1, pe2 = distortion(pxx, pyy, pxy)
    de1 = (e1 - pe1)[ok]
    de2 = (e2 - pe2)[ok]
    dsize = (size - np.sqrt(0.5 * pt))[ok]
    out["psfStarDeltaE1Median"] = float(np.median(de1))
    out["psfStarDeltaE2Median"] = float(np.median(de2))
    out["psfStarDeltaE1Scatter"] = _sigma_mad(de1)
    out["psfStarDeltaE2Scatter"] = _sigma_mad(de2)
    out["psfStarDeltaSizeMedian"] = float(np.median(dsize))
    out["psfStarDeltaSizeScatter"] = _sigma_mad(dsize)
    out["psfStarScaledDeltaSizeScatter"] = float(out["psfStarDeltaSizeScatter"] / np.median(size[ok]))


def _grid_for_distance(exposure: Exposure, spacing: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    return _unmasked_grid(exposure, spacing)


def _sigma_mad(v: npt.NDArray[np.float64]) -> float:
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _depth_stats(out: dict[str, Any], exposure: Exposure, config: SummaryConfig) -> None:
    band = exposure.visit_info.band
    exptime = out["expTime"]
    gain = float(exposure.detector.gain_e_per_count)
    read_noise = float(exposure.detector.read_noise_e)
    area, sky, zp = out["psfArea"], out["skyBg"], out["zeroPoint"]
    if all(math.isfinite(v) for v in (area, sky, zp, gain)) and gain > 0:
        snr = config.mag_lim_snr
        # A sum of n snaps carries n read-noise variances per pixel.
        n_snaps = int(exposure.metadata.get("n_snaps", 1) or 1)
        noise2 = area * (max(sky, 0.0) * gain + n_snaps * (read_noise if math.isfinite(read_noise) else 0.0) ** 2)
        signal_e = 0.5 * (snr**2 + math.sqrt(snr**4 + 4 * snr**2 * noise2))
        out["magLim"] = float(zp - 2.5 * math.log10(signal_e / gain))
    f_eff = _lookup(config.fiducial_psf_sigma_pix, band)
    if math.isfinite(f_eff) and math.isfinite(out["psfSigma"]) and out["psfSigma"] > 0:
        out["effTimePsfSigmaScale"] = float((out["psfSigma"] / f_eff) ** -2)
    f_zp = _lookup(config.fiducial_zero_point_mag, band)
    if math.isfinite(f_zp) and math.isfinite(zp) and exptime > 0:
        dzp = f_zp - (zp - 2.5 * math.log10(exptime))
        out["effTimeZeroPointScale"] = float(min(10 ** (-0.8 * dzp), config.max_effective_transparency))
    f_sky = _lookup(config.fiducial_sky_count_per_s, band)
    if math.isfinite(f_sky) and math.isfinite(sky) and sky > 0 and exptime > 0:
        out["effTimeSkyBgScale"] = float(f_sky / (sky / exptime))
    f_lim = _lookup(config.fiducial_mag_lim_mag, band)
    if math.isfinite(f_lim) and math.isfinite(out["magLim"]):
        out["effTime"] = float(10 ** (0.8 * (out["magLim"] - f_lim)) * config.fiducial_exp_time_s)


def _lookup(table: Mapping[str, float], band: str) -> float:
    v = table.get(band)
    return float(v) if v is not None else float("nan")


def quality_warnings(summary: Mapping[str, Any], config: SummaryConfig | None = None) -> list[str]:
    """What in ``summary`` says the calibration, though it succeeded, deserves a look (empty if nothing).

    A PSF model whose stars' median shape or size departs from it by more than the
    ``warn_*`` limits of ``config`` is flagged: photometry and shapes measured with it carry
    that bias. It is not a failure (the model is the best fit the data allow), so it is
    reported, not raised.
    """
    config = config or SummaryConfig()
    out = []
    for comp in ("E1", "E2"):
        v = float(summary.get(f"psfStarDelta{comp}Median", math.nan))
        if math.isfinite(v) and abs(v) > config.warn_psf_delta_e:
            out.append(f"PSF model misses its stars' shapes: psfStarDelta{comp}Median = {v:+.3f} (limit "
                       f"{config.warn_psf_delta_e:g}); the stars' shapes may vary with brightness, or across the "
                       "detector faster than psf_fit.spatial_order follows: see the diagnostic plot")
    size, sigma = float(summary.get("psfStarDeltaSizeMedian", math.nan)), float(summary.get("psfSigma", math.nan))
    if math.isfinite(size) and sigma > 0 and abs(size) > config.warn_psf_delta_size_frac * sigma:
        out.append(f"PSF model misses its stars' size: psfStarDeltaSizeMedian = {size:+.3f} px, "
                   f"{100 * size / sigma:+.1f} % of psfSigma (limit {100 * config.warn_psf_delta_size_frac:g} %)")
    return out
