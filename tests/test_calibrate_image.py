"""The whole calibration on a tiny scene, porting the spirit of Rubin's test_calibrateImage.py.

Scene (``singleframe.sim.scenes.rubin_test_scene``): 201x181 pixels with origin (5, 4) (catches
origin bugs), Gaussian PSF sigma = 2 px, noise 10 counts/px, +500 counts background, calibration
12.3 nJy/count, six point sources at S/N 6, 12, 45, 150, 400, 1000 and one bright extended source.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from singleframe.errors import AllCentroidsFlaggedError, ConfigError, NoPsfStarsToStarsMatchError
from singleframe.sim.scenes import rubin_test_scene, two_snap_version
from singleframe.steps.config import load_calibrate_config
from singleframe.steps.flag_propagation import match_psf_stars
from singleframe.steps.pipeline import (
    calibrate_image,
    characterize,
    correct_apertures,
    require_good_centroids,
)

# Like Rubin's test config: with only three S/N >= 50 stars the PSF and astrometry minimums come
# down, and two sky sources suffice; 64-px background bins fit a 201x181 image.
SMALL_SCENE = {
    "initial_psf": {"min_stars": 3}, "psf_fit": {"min_stars": 3}, "astrometry": {"min_matches": 3},
    "photometry": {"min_matches": 3}, "n_sky_sources": 2, "background": {"bin_size_pix": 64},
}


@pytest.fixture(scope="module")
def scene():
    return rubin_test_scene()


@pytest.fixture(scope="module")
def result(scene):
    return calibrate_image([scene.exposure], scene.refcat, config=load_calibrate_config(None, SMALL_SCENE))


def _match_truth(stars, truth):
    """Index of the nearest truth source for each star (parent pixel coordinates)."""
    d = np.hypot(np.asarray(stars["base_SdssCentroid_x"])[:, None] - np.asarray(truth["x"])[None, :],
                 np.asarray(stars["base_SdssCentroid_y"])[:, None] - np.asarray(truth["y"])[None, :])
    return d.argmin(axis=1), d.min(axis=1)


def test_calibration_and_psf(result) -> None:
    # Rubin's test: calibration within 1 %; three stars give a ~1 % statistical error.
    assert result.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(12.3, rel=0.01)
    # The PSF model is the pixelised Gaussian: HSM radius sqrt(sigma^2 + 1/12) for sigma = 2 px.
    assert result.preliminary_visit_image.summary["psfSigma"] == pytest.approx(math.sqrt(4 + 1 / 12), rel=0.01)
    # Exactly the three S/N >= 150 stars are PSF stars (the extended source is not).
    assert int(np.sum(result.single_visit_psf_star["calib_psf_used"])) == 3
    assert result.preliminary_visit_image.photo_calib.calibration_njy_per_count == 1.0
    # Initial background and one re-estimate per PSF pass (one pass by default).
    assert len(result.preliminary_visit_image_background) == 2


def test_the_propagated_psf_peak_keeps_its_unit(result) -> None:
    # psf_max_value is the PSF pass's peak pixel, in counts: copied onto the nJy star catalogue it
    # must still say so (a bare number beside nJy fluxes reads as nJy).
    stars, psf_stars = result.single_visit_star_unstandardized, result.single_visit_psf_star
    assert psf_stars["psf_max_value"].unit == "ct" and stars["psf_max_value"].unit == "ct"
    matched = np.asarray(stars["psf_id"]) > 0
    peak = dict(zip(np.asarray(psf_stars["id"]), np.asarray(psf_stars["psf_max_value"]), strict=True))
    assert matched.any()
    assert np.array_equal(np.asarray(stars["psf_max_value"])[matched],
                          np.array([peak[i] for i in np.asarray(stars["psf_id"])[matched]], np.float32))


def test_second_psf_pass_is_switchable(result, scene) -> None:
    # The brief's second pass (Rubin legacy) still runs on request: one more background
    # re-estimate, and the same calibration and PSF within the tolerances of the one-pass run
    # (three S/N >= 150 stars: ~1 % statistical error on each).
    two = calibrate_image([scene.exposure], scene.refcat,
                          config=load_calibrate_config(None, {**SMALL_SCENE, "n_psf_passes": 2}))
    assert len(two.preliminary_visit_image_background) == 3
    assert two.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(12.3, rel=0.01)
    assert two.preliminary_visit_image.summary["psfSigma"] == pytest.approx(
        result.preliminary_visit_image.summary["psfSigma"], rel=0.01)
    assert int(np.sum(two.single_visit_psf_star["calib_psf_used"])) == 3


def test_piff_determiner_calibrates_the_scene_alike(result, scene) -> None:
    # psf_fit.determiner = piff: Piff fits the model to the same three stars, stored as our pixel
    # model; calibration and PSF size agree with the default run within the same ~1 % (three stars).
    pytest.importorskip("piff")
    piff_run = calibrate_image([scene.exposure], scene.refcat,
                               config=load_calibrate_config(None, {**SMALL_SCENE, "psf_fit": {
                                   **SMALL_SCENE["psf_fit"], "determiner": "piff"}}))
    assert piff_run.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(12.3, rel=0.01)
    assert piff_run.preliminary_visit_image.summary["psfSigma"] == pytest.approx(math.sqrt(4 + 1 / 12), rel=0.01)
    np.testing.assert_array_equal(piff_run.single_visit_psf_star["calib_psf_used"],
                                  result.single_visit_psf_star["calib_psf_used"])


def test_residual_search_is_switchable_and_adds_nothing_without_hidden_stars(result, scene) -> None:
    # The scene's sources are well separated: the residual pass around its bright stars finds
    # no merged neighbour, so switching it off leaves the same star catalogue.
    off = calibrate_image([scene.exposure], scene.refcat,
                          config=load_calibrate_config(None, {**SMALL_SCENE, "residual_search": False}))
    on_stars, off_stars = result.single_visit_star_unstandardized, off.single_visit_star_unstandardized
    assert len(on_stars) == len(off_stars)
    np.testing.assert_array_equal(np.asarray(on_stars["base_SdssCentroid_x"]),
                                  np.asarray(off_stars["base_SdssCentroid_x"]))


def test_star_catalog_matches_truth_with_origin(result, scene) -> None:
    stars = result.single_visit_star_unstandardized
    real = stars[~stars["sky_source"]]
    assert int(np.sum(stars["sky_source"])) == 2
    idx, dist = _match_truth(real, scene.truth)
    # The five point sources with S/N >= 10 are found (S/N 6 is below threshold); the extended
    # source is rejected as resolved.
    assert sorted(scene.truth["snr"][idx].tolist()) == [12.0, 45.0, 150.0, 400.0, 1000.0]
    assert np.all(scene.truth["is_star"][idx])
    # Positions in parent coordinates (origin (5, 4) applied). A Gaussian PSF's centroid error
    # is sqrt(2) sigma / (S/N) per axis, i.e. 4 / (S/N) px radially for sigma = 2: allow 4 of those.
    assert np.all(dist < 16.0 / scene.truth["snr"][idx])
    # PSF fluxes in nJy: within 3 sigma of the photon noise (1/SNR) combined with a 0.5 % allowance
    # for the calibration fitted on three stars (Rubin's own bar is 10 %).
    snr = np.asarray(scene.truth["snr"][idx])
    rel = np.asarray(real["base_PsfFlux_flux"]) / np.asarray(scene.truth["flux_njy"][idx]) - 1
    assert np.all(np.abs(rel) < np.hypot(3.0 / snr, 0.005)), rel
    # Sky coordinates within 35 mas (Rubin's test_astrometry bar) of the true WCS at the measured
    # centroids: this isolates the fitted WCS from the centroid noise checked above.
    c = SkyCoord(np.asarray(real["coord_ra"]), np.asarray(real["coord_dec"]), unit="rad")
    x = np.asarray(real["base_SdssCentroid_x"]) - scene.exposure.origin[0]
    y = np.asarray(real["base_SdssCentroid_y"]) - scene.exposure.origin[1]
    ra, dec = scene.exposure.wcs.all_pix2world(x, y, 0)
    assert np.all(c.separation(SkyCoord(ra, dec, unit="deg")).mas < 35)


def test_psf_id_links_the_two_catalogs(result) -> None:
    stars, psf = result.single_visit_star_unstandardized, result.single_visit_psf_star
    linked = stars[stars["psf_id"] > 0]
    assert len(linked) >= 3
    rows = {int(i): k for k, i in enumerate(psf["id"])}
    k = np.array([rows[int(i)] for i in linked["psf_id"]])
    # The same objects measured twice: centroids agree to well below the S/N>=45 error (~0.02 px).
    np.testing.assert_allclose(linked["base_SdssCentroid_x"], psf["base_SdssCentroid_x"][k], atol=0.05)
    np.testing.assert_allclose(linked["base_SdssCentroid_y"], psf["base_SdssCentroid_y"][k], atol=0.05)
    # Astrometry matches refer to PSF-star ids, photometry matches carry them as src_psf_id.
    astrom, photom = result.initial_astrometry_match_detector, result.initial_photometry_match_detector
    assert set(np.asarray(astrom["src_id"])) <= set(np.asarray(psf["id"]))
    common = set(np.asarray(astrom["src_id"])) & set(np.asarray(photom["src_psf_id"]))
    assert len(common) >= 2


def test_image_is_in_njy_and_background_restores_the_input(result, scene) -> None:
    image = result.preliminary_visit_image
    restored = (image.image.astype(float) + result.preliminary_visit_image_background.image()) / 12.3
    good = image.mask == 0
    # Dividing by the fitted calibration (1 % off at most) recovers the counts: within 1 %.
    fitted = result.initial_photoCalib_detector.calibration_njy_per_count
    np.testing.assert_allclose(restored[good] * 12.3 / fitted, scene.exposure.image[good], rtol=0.0,
                               atol=1e-3 * float(np.abs(scene.exposure.image).max()))


def test_two_snaps_give_the_same_result(result, scene) -> None:
    snaps = two_snap_version(scene)
    two = calibrate_image(list(snaps), scene.refcat, config=load_calibrate_config(None, SMALL_SCENE))
    # The summed snaps equal the single exposure, so the answers agree to round-off in the fit.
    assert two.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(
        result.initial_photoCalib_detector.calibration_njy_per_count, rel=1e-3)
    assert len(two.single_visit_star_unstandardized) == len(result.single_visit_star_unstandardized)
    assert two.preliminary_visit_image.visit_info.exposure_time_s == scene.exposure.visit_info.exposure_time_s


def test_disjoint_psf_and_star_catalogs_raise_with_counts(result) -> None:
    psf = result.single_visit_psf_star[:2].copy()
    stars = result.single_visit_star_unstandardized.copy()
    psf["base_SdssCentroid_x"] += 1000.0  # nowhere near any star
    with pytest.raises(NoPsfStarsToStarsMatchError) as err:
        match_psf_stars(psf, stars, radius_pix=3.0)
    assert err.value.metadata["n_psf_stars"] == 2
    assert err.value.metadata["n_stars"] == len(stars)


def test_optional_outputs_switched_off(scene) -> None:
    # Rubin's test_run_no_optionals: the match catalogues (and the other optional outputs) are
    # absent from the result, while the calibration itself is unchanged.
    res = calibrate_image([scene.exposure], scene.refcat,
                          config=load_calibrate_config(None, {**SMALL_SCENE, "optional_outputs": []}))
    assert res.initial_astrometry_match_detector is None
    assert res.initial_photometry_match_detector is None
    assert res.single_visit_psf_star is None
    assert res.single_visit_psf_star_footprints is None
    assert res.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(12.3, rel=0.01)
    assert int(np.sum(res.single_visit_star_unstandardized["calib_psf_used"])) == 3


def test_psf_pass_measures_the_calibration_aperture_only_and_the_stars_do_not_depend_on_it(result, scene) -> None:
    # As Rubin's PSF pass, the PSF stars carry the 12-px calibration aperture only; the star pass
    # measures every radius and its curve of growth sets the calibration flux, to which the PSF
    # pass's fields are rescaled. Measuring all radii on the PSF pass (and so its own curve of
    # growth) must leave the stars and the zero point the same to rounding (1e-12: a few float
    # operations on each flux, versus ~1e-16 precision), and only the PSF pass richer.
    psf = result.single_visit_psf_star
    assert "base_CircularApertureFlux_12_0_instFlux" in psf.colnames
    assert not any(c.startswith(("base_CircularApertureFlux_3_0", "base_CircularApertureFlux_25_0")) for c in psf.colnames)
    assert "base_CircularApertureFlux_25_0_instFlux" in result.single_visit_star_unstandardized.colnames
    radii = list(load_calibrate_config(None).measurement.aperture_radii_pix)
    full = calibrate_image([scene.exposure], scene.refcat,
                           config=load_calibrate_config(None, {**SMALL_SCENE, "psf_aperture_radii_pix": radii}))
    assert "base_CircularApertureFlux_25_0_instFlux" in full.single_visit_psf_star.colnames
    assert full.initial_photoCalib_detector.calibration_njy_per_count == pytest.approx(
        result.initial_photoCalib_detector.calibration_njy_per_count, rel=1e-12)
    ours, theirs = result.single_visit_star_unstandardized, full.single_visit_star_unstandardized
    for col in ("base_PsfFlux_flux", "base_GaussianFlux_flux", "base_NormalizedCompensatedTophatFlux_flux",
                "base_PsfFlux_apCorr"):
        np.testing.assert_allclose(np.asarray(theirs[col]), np.asarray(ours[col]), rtol=1e-12)


def test_psf_pass_records_its_detection_thresholds(scene) -> None:
    # Four S/N >= 50 sources, far below the peak budget: the configured thresholds are used and recorded
    # (a budget below the count raises them: tests/test_steps_detection.py).
    ch = characterize([scene.exposure], config=load_calibrate_config(None, SMALL_SCENE))
    assert len(ch.psf_stars) == 4
    assert ch.diagnostics["pass1_threshold_snr"] == 10.0
    assert ch.diagnostics["pass1_peak_threshold_snr"] == 50.0


def test_psf_pass_apertures_must_hold_the_reference_aperture() -> None:
    from singleframe.errors import ConfigError

    with pytest.raises(ConfigError, match="psf_aperture_radii_pix .* lacks 12"):
        load_calibrate_config(None, {"psf_aperture_radii_pix": [6.0, 25.0]}).validate()


def test_unknown_optional_output_is_a_config_error() -> None:
    from singleframe.errors import ConfigError

    with pytest.raises(ConfigError, match="optional_outputs"):
        load_calibrate_config(None, {"optional_outputs": ["initial_astrometry_match"]}).validate()


def test_all_centroids_flagged_raise_with_counts(scene) -> None:
    # Rubin's test_compute_psf_bad_centroids: when every PSF-pass centroid is flagged the step
    # raises AllCentroidsFlaggedError with the counts instead of passing garbage positions on.
    ch = characterize([scene.exposure], config=load_calibrate_config(None, SMALL_SCENE))
    catalog = ch.psf_stars.copy()
    require_good_centroids(catalog)  # the real PSF pass: good centroids, no error
    catalog["base_SdssCentroid_flag"] = True
    with pytest.raises(AllCentroidsFlaggedError, match=f"out of {len(catalog)}") as err:
        require_good_centroids(catalog)
    assert err.value.metadata["n_sources"] == len(catalog) == err.value.metadata["n_flagged"]
    catalog["base_SdssCentroid_flag"][0] = False  # one usable source is enough to go on
    require_good_centroids(catalog)


def test_star_less_frame_fails_or_falls_back_to_the_header_seeing(scene) -> None:
    from singleframe.errors import PsfFitError

    rng = np.random.default_rng(5)
    blank = scene.exposure.replace(image=rng.normal(0.0, 10.0, scene.exposure.shape).astype(np.float32))
    # Default: a typed error, never a guessed PSF.
    with pytest.raises(PsfFitError, match="too few bright stars.*psf_fallback: seeing") as err:
        characterize([blank], config=load_calibrate_config(None, SMALL_SCENE))
    assert err.value.metadata["n_candidates"] == 0  # the step's diagnostics survive the hint
    fallback = load_calibrate_config(None, {**SMALL_SCENE, "psf_fallback": "seeing"})
    # The fallback needs the seeing in the metadata, and says so.
    with pytest.raises(PsfFitError, match="seeing_fwhm_pix"):
        characterize([blank], config=fallback)
    # With it, the Gaussian of that FWHM is installed and flagged; no star is a PSF star.
    res = characterize([blank.with_metadata(seeing_fwhm_pix=4.7)], config=fallback)
    assert res.exposure.metadata["PSF_FALLBACK"] == "seeing"
    # The Gaussian's sigma is FWHM / (2 sqrt(2 ln 2)) exactly; 2.3548 rounds that factor (2e-5).
    assert 2.3548 * res.exposure.psf.sigma(*res.exposure.center_pix) == pytest.approx(4.7, rel=1e-3)
    assert not np.any(np.asarray(res.psf_stars["calib_psf_used"], bool))


def test_the_seeing_fallback_calibrates_the_frame_with_flagged_model_star_corrections(scene) -> None:
    # psf_fallback: seeing promises a frame that goes on with the header seeing's Gaussian. With no
    # PSF star at all the aperture corrections cannot come from stars: they come from a noiseless
    # star of that Gaussian, flagged, with model_star_err in every scale error; the star pass then
    # normalises the calibration flux on its own stars, and the zero point is fitted as usual.
    cfg = load_calibrate_config(None, {**SMALL_SCENE, "psf_fit": {"min_stars": 5, "allow_gaussian_fallback": False},
                                       "initial_psf": {"min_stars": 5}, "psf_fallback": "seeing"})
    exposure = scene.exposure.with_metadata(seeing_fwhm_pix=4.7)  # the scene's PSF: sigma 2 px = 4.71 px FWHM
    ch = characterize([exposure], config=cfg)
    assert ch.exposure.metadata["PSF_FALLBACK"] == "seeing"
    assert not np.any(np.asarray(ch.psf_stars["calib_psf_used"], bool))
    stage = correct_apertures(ch.exposure, ch.psf_stars, config=cfg)
    model_err = cfg.psf_aperture_correction.model_star_err
    assert stage.fallback
    for name, field in stage.ap_corr.items():
        assert field.flagged_fallback and field.order == 0 and field.error >= model_err
        # A Gaussian star measured with its own Gaussian model: PSF flux = total flux, and the
        # calibration flux is normalised to the 12-px aperture, which holds all but 1e-8 of it.
        assert field.evaluate(*ch.exposure.center_pix) == pytest.approx(1.0, abs=0.01)
        assert stage.scale_err[name] >= model_err
        assert not np.any(np.asarray(stage.psf_stars[f"apcorr_{name}_used"], bool))

    res = calibrate_image([exposure], scene.refcat, config=cfg)
    assert res.preliminary_visit_image.metadata["PSF_FALLBACK"] == "seeing"
    calib = res.initial_photoCalib_detector
    # Truth 12.3 nJy/count; measured within 1.0 % with a 1.8 % error: 3 sigma of the fit's own error.
    assert calib.calibration_njy_per_count == pytest.approx(scene.calibration_njy_per_count,
                                                            abs=3 * calib.calibration_err_njy_per_count)


def test_the_few_stars_gaussian_psf_is_flagged(scene) -> None:
    # The scene has three S/N >= 50 stars; with the default psf_fit.min_stars (5) fit_psf falls back
    # to a Gaussian of their moments. That PSF is usable but not a fitted model: it must say so in
    # the image metadata (PSF_FALLBACK) and the persisted diagnostics, never pass as a pixel model.
    from singleframe.psf import GaussianPsf

    cfg = load_calibrate_config(None, {**SMALL_SCENE, "psf_fit": {}})
    assert cfg.psf_fit.min_stars == 5
    res = characterize([scene.exposure], config=cfg)
    assert isinstance(res.exposure.psf, GaussianPsf)
    assert res.exposure.metadata["PSF_FALLBACK"] == "moments"
    assert res.diagnostics["psf_fit_fallback"] == "gaussian of the moments of 3 star(s)"
    # The Gaussian has the stars' size: sigma 2 px in the scene, measured to the moments' noise.
    assert res.exposure.psf.sigma(*res.exposure.center_pix) == pytest.approx(2.0, rel=0.03)
    # With enough stars allowed (SMALL_SCENE: 3) the pixel model is fitted and nothing is flagged.
    fitted = characterize([scene.exposure], config=load_calibrate_config(None, SMALL_SCENE))
    assert "PSF_FALLBACK" not in fitted.exposure.metadata and "psf_fit_fallback" not in fitted.diagnostics


def test_an_exposure_without_a_wcs_is_an_astrometry_failure_with_the_fix(scene) -> None:
    from singleframe.errors import AstrometryError
    from singleframe.steps.pipeline import refcat_search_radius_deg

    with pytest.raises(AstrometryError, match="no WCS.*ingest it again"):
        refcat_search_radius_deg(scene.exposure.replace(wcs=None), 10.0)


def test_the_input_snaps_are_never_modified(scene) -> None:
    # The stage works in place on the frames it creates (background-subtracted image, final mask);
    # the caller's snaps must come out bit for bit as they went in, with one snap or two, and with a
    # defect to interpolate.
    from singleframe.masks import MaskPlane

    bad = scene.exposure.mask.copy()
    bad[:, 57] |= np.uint32(int(MaskPlane.BAD))
    one = [scene.exposure.replace(mask=bad)]
    for snaps in (one, list(two_snap_version(scene))):
        before = [(s.image.copy(), s.mask.copy(), s.variance.copy()) for s in snaps]
        calibrate_image(snaps, scene.refcat, config=load_calibrate_config(None, SMALL_SCENE))
        for s, (img, msk, var) in zip(snaps, before, strict=True):
            np.testing.assert_array_equal(s.image, img)
            np.testing.assert_array_equal(s.mask, msk)
            np.testing.assert_array_equal(s.variance, var)


def test_quality_warnings_flag_a_psf_model_that_misses_its_stars(result) -> None:
    # A model off its stars is not a failure (it is the best fit the data allow) but must not pass
    # unnoticed: the real SDSS r frame's faint stars are 0.067 more elongated (e2) than its model.
    import io

    from astropy.io import fits

    from singleframe.io.formats import exposure_from_fits_bytes, exposure_to_fits_bytes
    from singleframe.steps.summary import SummaryConfig, quality_warnings

    image = result.preliminary_visit_image
    assert "quality.warnings" not in image.metadata  # the clean scene: nothing to say
    summary = {**image.summary, "psfStarDeltaE1Median": 0.001, "psfStarDeltaE2Median": -0.067,
               "psfStarDeltaSizeMedian": 0.0}
    (text,) = quality_warnings(summary)
    assert "psfStarDeltaE2Median = -0.067" in text and "diagnostic plot" in text
    summary["psfStarDeltaSizeMedian"] = 0.03 * summary["psfSigma"]
    assert "+3.0 % of psfSigma" in quality_warnings(summary)[1]
    assert quality_warnings(summary, SummaryConfig(warn_psf_delta_e=0.1, warn_psf_delta_size_frac=0.05)) == []
    # Stored with the image: the texts in METADATA, a count in the primary header.
    flagged = image.replace(metadata={**image.metadata, "quality.warnings": [text]})
    data = exposure_to_fits_bytes(flagged)
    with fits.open(io.BytesIO(bytes(data))) as hdul:
        assert hdul[0].header["QAWARN"] == 1
    assert exposure_from_fits_bytes(bytes(data)).metadata["quality.warnings"] == [text]


def test_the_config_knows_every_flag_column_the_catalogues_have(result) -> None:
    # Flag names in bad_flags/required_flags are checked against CalibrateImageConfig.flag_columns:
    # that list must be exactly the boolean columns the pipeline writes, or a valid name would be
    # refused (or a misspelt one accepted). A typo is refused before any pixel, with the fix.
    config = load_calibrate_config(None, SMALL_SCENE)
    written = set()
    for table in (result.single_visit_star_unstandardized, result.single_visit_psf_star):
        written |= {c for c in table.colnames if table[c].dtype == bool}
    assert written == set(config.flag_columns())
    with pytest.raises(ConfigError, match="did you mean 'base_PixelFlags_flag_edge'"):
        load_calibrate_config(None, {"astrometry": {"bad_flags": ["base_PixelFlags_flag_edgee"]}})
    # The same for the fluxes photometry and star selection read: every one the config accepts is
    # a column of the star catalogue, and a typo is refused before any pixel.
    stars = result.single_visit_star_unstandardized
    for flux in ("base_PsfFlux", "base_NormalizedCompensatedTophatFlux", "base_CircularApertureFlux_12_0"):
        load_calibrate_config(None, {"photometry": {"flux_field": flux}})
        assert f"{flux}_instFlux" in stars.colnames
    with pytest.raises(ConfigError, match="photometry.flux_field='base_PSFFlux'.*did you mean 'base_PsfFlux'"):
        load_calibrate_config(None, {"photometry": {"flux_field": "base_PSFFlux"}})
    with pytest.raises(ConfigError, match="star_selector.flux_field"):
        load_calibrate_config(None, {"star_selector": {"flux_field": "base_CircularApertureFlux_50_0"}})
