"""Real-world checks on images nobody here wrote (../shared/data/real; skipped when absent)."""

from __future__ import annotations

import glob
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import ascii, fits

from singleframe.errors import PsfFitError
from singleframe.exposure import DetectorInfo, Exposure, VisitInfo
from singleframe.masks import MASK_DTYPE, MaskPlane
from singleframe.psf import GaussianPsf
from singleframe.steps.background import BackgroundConfig, estimate_background
from singleframe.steps.config import load_calibrate_config
from singleframe.steps.detection import DetectionConfig, detect_sources
from singleframe.steps.measurement import MeasurementConfig, measure_sources
from singleframe.steps.pipeline import characterize

pytestmark = pytest.mark.real_data


def _open(path: Path) -> fits.HDUList:
    with warnings.catch_warnings():
        # Old ESO/NOIRLab headers carry non-standard cards; astropy warns and reads them fine.
        warnings.simplefilter("ignore")
        hdul = fits.open(path)
        hdul.verify("silentfix")
        return hdul


@pytest.fixture(scope="module")
def emmi(real_data: Path) -> dict:
    d = real_data / "sep-emmi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = fits.getdata(d / "image.fits").astype(np.float32)
        back = fits.getdata(d / "back.fits")
        rms = fits.getdata(d / "rms.fits")
    cat = ascii.read(d / "image.cat")
    return {"image": image, "back": back, "rms": rms, "cat": cat}


def test_background_matches_sextractor_on_emmi(emmi: dict) -> None:
    # SExtractor ran with its defaults: 64-px meshes, a mode estimator and a 3x3 median filter.
    mask = np.zeros(emmi["image"].shape, MASK_DTYPE)
    res = estimate_background(emmi["image"], mask, config=BackgroundConfig(bin_size_pix=64))
    diff = (res.model.image() - emmi["back"]) / emmi["rms"]
    # Both are smooth interpolations of 4x4 mesh statistics: they agree to a small fraction of the
    # noise (measured: median 0.0003 sigma, max 0.18 sigma at the corners where splines differ).
    assert abs(float(np.median(diff))) < 0.01
    assert float(np.abs(diff).max()) < 0.25
    # The sky noise agrees with SExtractor's RMS map to 1 % (measured 0.1 %).
    assert res.sky_rms == pytest.approx(float(np.median(emmi["rms"])), rel=0.01)


def test_centroids_and_aperture_fluxes_match_sextractor_on_emmi(emmi: dict) -> None:
    image = emmi["image"]
    mask = np.zeros(image.shape, MASK_DTYPE)
    bg = estimate_background(image, mask, config=BackgroundConfig(bin_size_pix=64))
    sub = image - bg.model.image()
    gain = 2.1  # ESO AD_VALUE (e-/ADU) in the header
    var = (np.full(image.shape, bg.sky_rms**2) + np.clip(sub, 0, None) / gain).astype(np.float32)
    # A faint-galaxy field with two stars: the PSF cannot be fitted, so a Gaussian of the
    # header seeing (~2 px sigma) serves detection and the centroid weights.
    psf = GaussianPsf(2.0)
    det = detect_sources(sub, var, mask, psf_sigma_pix=2.0,
                         config=DetectionConfig(threshold_snr=3.0, peak_threshold_snr=10.0))
    visit = VisitInfo(1, 1200.0, 48921.63, "R", "R", 5.64817, -30.18297, 0.0)
    exposure = Exposure(sub, det.mask, var, visit, DetectorInfo(0, gain_e_per_count=gain), psf=psf)
    # SExtractor's PHOT_APERTURES was a 10-px diameter: measure a 5-px radius too.
    cat = measure_sources(exposure, det.detections, config=MeasurementConfig(aperture_radii_pix=(5.0, 12.0))).catalog
    sx = emmi["cat"]
    x, y = np.asarray(sx["XWIN_IMAGE"]) - 1.0, np.asarray(sx["YWIN_IMAGE"]) - 1.0  # FITS 1-based
    d = np.hypot(np.asarray(cat["base_SdssCentroid_x"])[:, None] - x[None, :],
                 np.asarray(cat["base_SdssCentroid_y"])[:, None] - y[None, :])
    j, dist = d.argmin(axis=1), d.min(axis=1)
    snr = np.asarray(sx["FLUX_APER"])[j] / np.asarray(sx["FLUXERR_APER"])[j]
    good = (dist < 1.0) & (snr > 50) & (np.asarray(sx["FLAGS"])[j] == 0)
    assert good.sum() >= 5
    # Both are Gaussian-windowed centroids; at S/N > 50 they agree to a few hundredths of a pixel.
    assert float(np.median(dist[good])) < 0.05
    ratio = np.asarray(cat["base_CircularApertureFlux_5_0_instFlux"])[good] / np.asarray(sx["FLUX_APER"])[j][good]
    # Same aperture on the same pixels; the backgrounds differ by < 0.2 sigma per pixel (above):
    # fluxes agree to 1 % (measured median 1.0004, scatter 0.4 %).
    assert float(np.median(ratio)) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(ratio - 1) < 0.02)


def _decam_exposure(ooi: str) -> tuple[Exposure, float]:
    """A NOIRLab Community Pipeline cut-out: image (ooi), inverse variance (oow), data quality (ood)."""
    im, wt, dq = _open(Path(ooi)), _open(Path(ooi.replace("ooi", "oow"))), _open(Path(ooi.replace("ooi", "ood")))
    h0, h = im[0].header, im[1].header
    image = im[1].data.astype(np.float32)
    weight = wt[1].data.astype(np.float32)
    mask = np.zeros(image.shape, MASK_DTYPE)
    mask[dq[1].data != 0] |= MASK_DTYPE(MaskPlane.BAD)
    mask[weight <= 0] |= MASK_DTYPE(MaskPlane.NO_DATA)
    variance = np.where(weight > 0, 1.0 / np.maximum(weight, 1e-30), np.nanmedian(1.0 / weight[weight > 0]))
    visit = VisitInfo(int(h0["EXPNUM"]), float(h0["EXPTIME"]), float(h0["MJD-OBS"]), h0["FILTER"][0],
                      h0["FILTER"][0], 0.0, 0.0, 0.0)
    exposure = Exposure(image, mask, variance.astype(np.float32), visit,
                        DetectorInfo(int(h0.get("CCDNUM", 0)), gain_e_per_count=float(h.get("GAINA", 1.0))),
                        metadata={"seeing_fwhm_pix": float(h["FWHM"])})  # as ingest reads the CP's FWHM
    return exposure, float(h["FWHM"])


# The cut-outs are 100-375 px across with 0-8 stars: the minimums come down for them.
_TINY = {"initial_psf": {"min_stars": 2}, "psf_fit": {"min_stars": 2}, "background": {"bin_size_pix": 64}}


@pytest.mark.parametrize("testcase", ["testcase8", "testcase4"])
def test_decam_cutout_psf_fwhm_agrees_with_the_header(real_data: Path, testcase: str) -> None:
    (ooi,) = glob.glob(str(real_data / "legacypipe-decam" / testcase / "images" / "**" / "*ooi*"), recursive=True)
    exposure, fwhm_header = _decam_exposure(ooi)
    result = characterize([exposure], config=load_calibrate_config(None, _TINY))
    sigma = result.exposure.psf.sigma(*result.exposure.center_pix)
    # The CP's FWHM comes from its own PSF fit; the issue's bar is agreement within 10 %
    # (measured: testcase8 +7.5 %, testcase4 +1.3 %).
    assert 2.3548 * sigma == pytest.approx(fwhm_header, rel=0.10)


def _decam_cutouts(real_data: Path) -> list[str]:
    return sorted(glob.glob(str(real_data / "legacypipe-decam" / "testcase*" / "images" / "**" / "*ooi*"),
                            recursive=True))


def test_every_decam_cutout_characterizes_with_the_seeing_fallback(real_data: Path) -> None:
    # All 22 DECam cut-outs (41x51 to 280x375 px, 0-8 stars, masks, a saturated star with a bleed
    # trail) run to the end. Where no star can give a PSF the header seeing is installed and
    # flagged (PSF_FALLBACK), never silently; frames with stars measure their own PSF.
    fallback = {**_TINY, "psf_fallback": "seeing"}
    ooi = _decam_cutouts(real_data)
    assert len(ooi) == 22
    n_measured = 0
    for path in ooi:
        exposure, fwhm_header = _decam_exposure(path)
        result = characterize([exposure], config=load_calibrate_config(None, fallback))
        fwhm = 2.3548 * result.exposure.psf.sigma(*result.exposure.center_pix)
        # The issue's bar: PSF FWHM within 10 % of the header's (the CP's own PSF fit).
        assert fwhm == pytest.approx(fwhm_header, rel=0.10), path
        n_used = int(np.sum(result.psf_stars["calib_psf_used"]))
        flag = result.exposure.metadata.get("PSF_FALLBACK")
        if flag == "seeing":
            assert n_used == 0
        elif flag == "moments":  # a Gaussian of 2 to psf_fit.min_stars - 1 stars' moments
            assert 2 <= n_used < load_calibrate_config(None, fallback).psf_fit.min_stars
        else:
            assert flag is None and n_used >= load_calibrate_config(None, fallback).psf_fit.min_stars
            n_measured += 1
    assert n_measured >= 2  # testcase4 and testcase8 at least fit their own PSF


def test_decam_cutout_without_stars_fails_with_an_explanation(real_data: Path) -> None:
    ooi = sorted(glob.glob(str(real_data / "legacypipe-decam" / "testcase3" / "images" / "**" / "*ooi*"),
                           recursive=True))[0]
    exposure, _ = _decam_exposure(ooi)
    # A 41x51 cut-out holds no star bright enough for a PSF: a typed failure, never a guessed PSF.
    with pytest.raises(PsfFitError, match="too few bright stars"):
        characterize([exposure], config=load_calibrate_config(None, _TINY))


def test_lco_frame_with_placeholder_keywords_ingests(real_data: Path, tmp_path: Path) -> None:
    """A real BANZAI-reduced LCO frame (tile-compressed SCI extension, 'N/A' header values) ingests."""
    from singleframe.io.ingest import ingest_files
    from singleframe.io.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard cards in the observatory header
        report = ingest_files(store, [str(real_data / "lco-neox" / "banzai_test_frame.fits.fz")])
    assert not report.failures and len(report.refs) == 1
    exposure = store.get_ref(report.refs[0])
    assert exposure.shape == (1020, 1523)
    assert exposure.visit_info.exposure_time_s == pytest.approx(45.265)
    assert exposure.detector.read_noise_e == pytest.approx(16.4)
    # 'ROTANGLE = N/A' is a placeholder: the rotation comes from the WCS, as the position angle of
    # the detector's +y axis on the sky (the convention of singleframe.camera).
    from astropy.coordinates import SkyCoord

    c0 = SkyCoord(*exposure.pixel_to_sky(700.0, 500.0), unit="deg")
    c1 = SkyCoord(*exposure.pixel_to_sky(700.0, 600.0), unit="deg")
    assert exposure.visit_info.rotation_angle_deg == pytest.approx(c0.position_angle(c1).deg % 360, abs=0.1)


@pytest.mark.parametrize("path", [
    "lco-neox/banzai_test_frame.fits.fz",  # LONGITUD "[deg East]"
    "legacypipe-decam/mzlsbass/images/90prime/deep2g_ra352_1-ccd1.fits",  # SITELONG "degrees W"
    # OBS-LONG '111:36.0' with no direction: the sign that agrees with AIRMASS (west, Kitt Peak).
    "legacypipe-decam/mzlsbass3/images/90prime/CP20160202/ksb_160203_115029_ooi_r_v1-ccd2.fits",
])
def test_observatory_site_of_real_headers_agrees_with_their_airmass(real_data: Path, path: str) -> None:
    # Three conventions for the same quantity. The zenith distance our site, time and pointing
    # give must match the header's own AIRMASS: airmass quoted to 0.01 at ~1.1-1.2 is ~1 deg of
    # zenith distance, and the boresight is the detector centre (up to ~0.5 deg off the pointing).
    from singleframe.exposure import zenith_distance_deg
    from singleframe.io.ingest import read_raw_file

    overrides = {"BUNIT": "adu", "GAIN": 1.5, "RDNOISE": 5.0, "SATURATE": 60000.0}  # not what is tested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-standard header cards of these cameras
        vi = read_raw_file(str(real_data / path), overrides=overrides).exposure.visit_info
    lon, lat, _ = vi.observatory_lon_lat_height
    assert lon < 0  # both observatories are west of Greenwich
    zd = zenith_distance_deg(vi.boresight_ra_deg, vi.boresight_dec_deg, vi.mjd_tai, lon, lat)
    assert zd == pytest.approx(math.degrees(math.acos(1.0 / vi.airmass)), abs=1.5)
