"""The survey simulator and the Rubin-like test scene are self-consistent."""

from __future__ import annotations

import dataclasses
import math

import galsim
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from singleframe.errors import ConfigError
from singleframe.masks import MaskPlane, any_set
from singleframe.sim import (
    SimulationConfig,
    VisitSpec,
    benchmark_config,
    iter_survey,
    make_camera,
    make_reference_catalog,
    rubin_test_scene,
    simulate_detector,
    two_snap_version,
)


def _small_config(**changes: object) -> SimulationConfig:
    """Two 512x384 detectors (non-square), a two-snap r visit and a one-snap i visit."""
    base = SimulationConfig()
    visits = (
        dataclasses.replace(base.visits[0]),
        dataclasses.replace(base.visits[1], boresight_ra_deg=150.004, boresight_dec_deg=2.203),
    )
    # Small detectors hold few objects: raise the saturated-star and cosmic-ray rates so each
    # detector has some, and keep stars bright and sparse so isolated ones are easy to find.
    kw: dict[str, object] = dict(n_side=2, nx=512, ny=384, visits=visits, bright_star_density_per_deg2=8000.0,
                                 star_density_per_deg2=6.0e4, star_mag_range=(17.0, 22.0),
                                 galaxy_density_per_deg2=2.0e4, cr_density_per_snap_per_mpix=80.0,
                                 distortion_k3_per_mm2=1e-5, seed=3)
    kw.update(changes)
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def config() -> SimulationConfig:
    return _small_config()


@pytest.fixture(scope="module")
def refcat(config: SimulationConfig):
    return make_reference_catalog(config)


@pytest.fixture(scope="module")
def two_snap(config: SimulationConfig, refcat):
    return simulate_detector(config, config.visits[0], 1, refcat=refcat)


@pytest.fixture(scope="module")
def one_snap(config: SimulationConfig, refcat):
    return simulate_detector(config, config.visits[1], 2, refcat=refcat)


# -- config ------------------------------------------------------------------------------


def test_config_validation_names_the_problem() -> None:
    SimulationConfig().validate()
    with pytest.raises(ConfigError, match="band 'z'"):
        dataclasses.replace(SimulationConfig(), visits=(VisitSpec(1, "z", 60000.0, 10.0, 0.0),)).validate()
    with pytest.raises(ConfigError, match="n_snaps"):
        VisitSpec(1, "r", 60000.0, 10.0, 0.0, n_snaps=3).validate()
    with pytest.raises(ConfigError, match="more than 2°"):
        dataclasses.replace(SimulationConfig(), visits=(VisitSpec(1, "r", 6e4, 10.0, 0.0),
                                                         VisitSpec(2, "r", 6e4, 20.0, 0.0))).validate()
    with pytest.raises(ConfigError, match="unknown benchmark field"):
        benchmark_config(512, "dense")


def test_benchmark_config_is_one_detector() -> None:
    cfg = benchmark_config(1024, "crowded", 0.9)
    assert (cfg.n_side, cfg.nx, cfg.ny, len(cfg.visits)) == (1, 1024, 1024, 1)
    assert cfg.visits[0].seeing_fwhm_arcsec == 0.9
    assert cfg.star_density_per_deg2 == pytest.approx(5 * SimulationConfig().star_density_per_deg2)


def test_camera_has_the_configured_pixel_scale(config: SimulationConfig) -> None:
    cam = make_camera(config)
    assert len(cam.detectors) == 4
    assert cam.pixel_scale_arcsec(0) == pytest.approx(0.2)


# -- reference catalogue -------------------------------------------------------------------


def test_refcat_format_and_coverage(config: SimulationConfig, refcat) -> None:
    for col in ("id", "ra", "dec", "ra_err", "dec_err", "pm_ra", "pm_dec", "parallax", "epoch",
                "g_flux", "g_fluxErr", "r_flux", "r_fluxErr", "i_flux", "i_fluxErr"):
        assert col in refcat.colnames
    assert refcat["id"].dtype == np.int64
    assert str(refcat["ra_err"].unit) == "mas" and str(refcat["r_flux"].unit) == "nJy"
    assert np.all(refcat["epoch"] == 2016.0)
    assert np.all((refcat["ra_err"] >= 1.0) & (refcat["ra_err"] <= 5.0))
    g_r = -2.5 * np.log10(refcat["g_flux"] / refcat["r_flux"])
    # Measurement noise (≤ 1 % per band) can push a colour ~0.05 mag outside the 0.2-1.5 locus.
    assert np.all((g_r > 0.1) & (g_r < 1.6))
    # Every corner of every detector of every visit has reference stars within 1 arcmin.
    cam = make_camera(config)
    tree = cKDTree(np.column_stack([np.radians(refcat["ra"]) * math.cos(math.radians(2.2)),
                                    np.radians(refcat["dec"])]))
    for v in config.visits:
        for d in cam.detectors:
            w = cam.initial_wcs(d.id, v.boresight_ra_deg, v.boresight_dec_deg, v.rotation_deg)
            ra, dec = w.all_pix2world([0, d.nx - 1, 0, d.nx - 1], [0, 0, d.ny - 1, d.ny - 1], 0)
            dist, _ = tree.query(np.column_stack([np.radians(ra) * math.cos(math.radians(2.2)), np.radians(dec)]))
            assert np.all(np.degrees(dist) * 3600 < 60.0)


def test_refcat_is_close_to_but_not_equal_to_truth(two_snap, refcat, config: SimulationConfig) -> None:
    truth = two_snap.truth.sources
    linked = truth[truth["refcat_id"] >= 0]
    assert len(linked) > 20
    ref = refcat[np.searchsorted(refcat["id"], linked["refcat_id"])]
    dt = 2000.0 + (config.visits[0].mjd_tai - 51544.5) / 365.25 - 2016.0
    ra = ref["ra"] + ref["pm_ra"] * dt / 3.6e6 / np.cos(np.radians(ref["dec"]))
    dec = ref["dec"] + ref["pm_dec"] * dt / 3.6e6
    sep = np.hypot((ra - linked["ra"]) * np.cos(np.radians(dec)), dec - linked["dec"]) * 3.6e6
    # Position errors 1-5 mas plus ≤ 0.5 mas/yr proper-motion errors over ~9 yr: a few mas, never 0.
    assert 0.5 < np.median(sep) < 10.0
    ratio = np.asarray(ref["r_flux"]) / np.asarray(linked["flux_njy"])
    # Flux errors are 0.5-1 %: the median ratio is 1 to 0.5 %, the scatter below 1.5 %, never exact.
    assert abs(np.median(ratio) - 1) < 0.005 and 0.002 < np.std(ratio) < 0.015


# -- detector ------------------------------------------------------------------------------------


def test_snap_structure_and_header_pointing_error(two_snap, config: SimulationConfig) -> None:
    v = config.visits[0]
    assert len(two_snap.snaps) == 2
    for s in two_snap.snaps:
        assert s.shape == (384, 512) and s.origin == (0, 0)
        assert s.visit_info.exposure_time_s == pytest.approx(15.0)
        assert s.visit_info.rotation_angle_deg == pytest.approx(v.rotation_deg + v.rotation_error_deg)
        assert s.wcs is two_snap.truth.header_wcs
        assert s.image.dtype == np.float32 and s.variance.dtype == np.float32
    # At the optical axis (CRPIX of both WCSs) the header and true WCS differ by exactly the pointing error.
    hw, tw = two_snap.truth.header_wcs, two_snap.truth.wcs
    px, py = hw.wcs.crpix - 1.0
    ra1, dec1 = hw.all_pix2world(px, py, 0)
    ra2, dec2 = tw.all_pix2world(px, py, 0)
    sep_arcsec = math.hypot((ra1 - ra2) * math.cos(math.radians(dec2)), dec1 - dec2) * 3600
    # 1e-4 arcsec: small-angle flat-sky approximation of a 2.5" offset.
    assert sep_arcsec == pytest.approx(math.hypot(*v.pointing_error_arcsec), abs=1e-4)


def test_truth_positions_follow_the_true_wcs(two_snap) -> None:
    t = two_snap.truth
    x, y = t.wcs.all_world2pix(t.sources["ra"], t.sources["dec"], 0)
    # 1e-5 px: the WCS inverse iteration tolerance.
    np.testing.assert_allclose(x, t.sources["x"], atol=1e-5)
    np.testing.assert_allclose(y, t.sources["y"], atol=1e-5)
    assert t.sources.meta["bbox"] == (0, 0, 511, 383)


def _isolated_bright_stars(truth, margin: float = 30.0, snr_min: float = 30.0):
    s = truth.sources
    xy = np.column_stack([s["x"], s["y"]])
    d, _ = cKDTree(xy).query(xy, k=2)
    ny, nx = truth.shape
    ok = (np.asarray(s["is_star"]) & ~np.asarray(s["saturated"]) & (d[:, 1] > 35) & (s["snr"] > snr_min)
          & (s["x"] > margin) & (s["x"] < nx - 1 - margin) & (s["y"] > margin) & (s["y"] < ny - 1 - margin))
    return s[ok]


def test_snaps_sum_to_the_expected_star_counts_and_centroids(two_snap, config: SimulationConfig) -> None:
    from singleframe.sim.survey import _psf_field

    truth = two_snap.truth
    psf = _psf_field(config, make_camera(config), 1, config.visits[0])
    total = two_snap.snaps[0].image.astype(float) + two_snap.snaps[1].image.astype(float)
    var = two_snap.snaps[0].variance.astype(float) + two_snap.snaps[1].variance.astype(float)
    cr = truth.cr_masks[0] | truth.cr_masks[1]
    stars = _isolated_bright_stars(truth)
    assert len(stars) >= 5
    pulls, dx = [], []
    for row in stars:
        ix, iy = int(round(row["x"])), int(round(row["y"]))
        box = np.s_[iy - 20:iy + 21, ix - 20:ix + 21]
        big = np.s_[iy - 28:iy + 29, ix - 28:ix + 29]
        if cr[big].any() or two_snap.snaps[0].mask[big].any():
            continue
        # Local sky: median of a ring just outside the 41x41 stamp (the sky has a gentle
        # gradient; the median ignores the wings of the odd bright neighbour).
        ring = np.ones((57, 57), bool)
        ring[8:49, 8:49] = False
        sky = np.median(total[big][ring])
        flux = total[box].sum() - sky * 41**2
        # Noise of the stamp sum plus that of the sky level (median: π/2 × the mean's variance).
        sky_var = math.pi / 2 * np.mean(var[big][ring]) / ring.sum() * 41**4
        # A star holds instflux × the PSF profile (no rescaling of its stamp): the 41x41 box misses
        # the wings (0.3-0.8 %) and the ring holds some of them, which the sky estimate removes.
        prof = psf.stamps(np.array([row["x"]]), np.array([row["y"]]), 28, np.array([ix]), np.array([iy]))[0]
        expected = row["instflux"] * (prof[8:49, 8:49].sum() - np.median(prof[ring]) * 41**2)
        pulls.append((flux - expected) / math.sqrt(var[box].sum() + sky_var))
        hsm = galsim.hsm.FindAdaptiveMom(galsim.Image(total[box] - sky, xmin=ix - 20, ymin=iy - 20, scale=1.0))
        # Adaptive-moment centroid noise is ~√2 σ_psf / (S/N); allow 4 of those.
        tol = 4 * math.sqrt(2) * truth.psf_sigma_center_pix / row["snr"]
        dx.append(max(abs(hsm.moments_centroid.x - row["x"]), abs(hsm.moments_centroid.y - row["y"])) / tol)
    pulls = np.array(pulls)
    # The expected box content is exact, so the pulls are pure noise: with n ≥ 3 the mean is within
    # 3/√n σ and every pull within 4σ.
    assert len(pulls) >= 3 and abs(pulls.mean()) < 3 / math.sqrt(len(pulls)) and np.all(np.abs(pulls) < 4)
    assert np.all(np.array(dx) < 1.0)


def test_cosmic_rays_are_in_one_snap_only(two_snap) -> None:
    t = two_snap.truth
    a, b = t.cr_masks
    assert a.sum() > 3 and b.sum() > 3
    assert not np.any(a & b)
    s0, s1 = two_snap.snaps
    diff = s0.image.astype(float) - s1.image.astype(float)
    sig = np.sqrt(s0.variance.astype(float) + s1.variance.astype(float))
    good = ~any_set(s0.mask, MaskPlane.SAT | MaskPlane.BAD)
    # Truth CR pixels exceed 5σ of the visit noise, so they stand out by > 3σ in the snap difference.
    assert np.all(diff[a & good] > 3 * sig[a & good])
    assert np.all(-diff[b & good] > 3 * sig[b & good])
    for s in two_snap.snaps:
        assert not any_set(s.mask, MaskPlane.CR).any()


def test_masks_bad_columns_and_bleed_trails(two_snap, one_snap, config: SimulationConfig) -> None:
    for sim in (two_snap, one_snap):
        bad = any_set(sim.snaps[0].mask, MaskPlane.BAD)
        assert sorted(set(np.nonzero(bad)[1])) == sorted(sim.truth.bad_columns)
    # The one-snap visit (30 s) saturates its bright stars; trails run along columns.
    s = one_snap.snaps[0]
    sat = any_set(s.mask, MaskPlane.SAT)
    assert sat.any() and np.all(s.image[sat] == config.saturation_count)
    # Each saturated region (a star's core and its trail) is taller than wide: the excess charge
    # runs up and down its columns, never along the rows.
    labels, n = ndimage.label(sat)
    trails = 0
    for sl in ndimage.find_objects(labels):
        height, width = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if height * width >= 10:
            assert height >= 2 * width, (height, width)
            trails += 1
    assert trails >= 1
    assert one_snap.truth.sources["saturated"].sum() >= 1


def test_variance_matches_the_noise(one_snap) -> None:
    s = one_snap.snaps[0]
    rng = np.random.default_rng(0)
    # Sky-only pixels far from any source: difference of neighbouring pixels cancels the smooth sky.
    src = one_snap.truth.sources
    far = np.ones(s.shape, bool)
    for x, y in zip(np.rint(src["x"]).astype(int), np.rint(src["y"]).astype(int), strict=True):
        far[max(y - 15, 0):y + 16, max(x - 15, 0):x + 16] = False
    far &= s.mask == 0
    far[:, 1:] &= far[:, :-1]
    far &= ~np.roll(one_snap.truth.cr_masks[0], 1, axis=1) & ~one_snap.truth.cr_masks[0]
    ys, xs = np.nonzero(far[:, 1:])
    pick = rng.choice(len(ys), size=min(20000, len(ys)), replace=False)
    d = s.image[ys[pick], xs[pick] + 1].astype(float) - s.image[ys[pick], xs[pick]].astype(float)
    expected = s.variance[ys[pick], xs[pick] + 1].astype(float) + s.variance[ys[pick], xs[pick]].astype(float)
    # Robust (MAD) variance ignores the wings of saturated stars and sub-threshold CR pixels;
    # with ~20000 samples it is known to ~2 %.
    robust_var = (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2
    assert robust_var / np.mean(expected) == pytest.approx(1.0, abs=0.05)


def test_psf_grid_is_near_the_seeing(two_snap, config: SimulationConfig) -> None:
    grid = two_snap.truth.psf_grid
    assert len(grid) == 25
    sigma_gauss = config.visits[0].seeing_fwhm_arcsec / 0.2 / (2 * math.sqrt(2 * math.log(2)))
    # A Kolmogorov profile convolved with the pixel has an adaptive-moment sigma 0-15 % above FWHM/2.355.
    assert np.all((grid["sigma_pix"] > sigma_gauss) & (grid["sigma_pix"] < 1.15 * sigma_gauss))
    # FWHM varies by a few per cent; ellipticity stays below psf_ellipticity_max (plus HSM noise 0.005).
    assert np.ptp(grid["sigma_pix"]) / np.median(grid["sigma_pix"]) < config.psf_fwhm_variation_frac
    assert np.all(np.hypot(grid["e1"], grid["e2"]) < config.psf_ellipticity_max + 0.005)
    np.testing.assert_allclose(grid["ixx"] * grid["iyy"] - grid["ixy"] ** 2, grid["sigma_pix"] ** 4, rtol=1e-9)


def test_truth_calibration_and_sky(two_snap, one_snap, config: SimulationConfig) -> None:
    assert two_snap.truth.calibration_njy_per_count == config.visits[0].calibration_njy_per_count
    s = two_snap.truth.sources
    np.testing.assert_allclose(s["instflux"][s["is_star"]] * 2.0, s["flux_njy"][s["is_star"]], rtol=1e-12)
    # The combined visit holds two snaps of sky; the gradient is ~1 % across the focal plane.
    assert two_snap.truth.sky_counts_per_pixel == pytest.approx(2 * 400.0, rel=0.03)
    assert one_snap.truth.sky_counts_per_pixel == pytest.approx(1000.0, rel=0.03)
    assert np.median(one_snap.snaps[0].image) == pytest.approx(1000.0, rel=0.03)


def test_simulation_is_deterministic_and_iter_survey_is_lazy() -> None:
    cfg = _small_config(nx=200, ny=150, n_side=1, seed=11)
    gen = iter_survey(cfg)
    first = next(gen)
    rest = list(gen)
    assert [(v.visit, d) for v, d, _ in [first, *rest]] == [(1, 0), (2, 0)]
    again = simulate_detector(cfg, cfg.visits[0], 0)
    np.testing.assert_array_equal(first[2].snaps[1].image, again.snaps[1].image)


def test_color_term_changes_fluxes_by_colour() -> None:
    cfg = _small_config(nx=200, ny=150, n_side=1, seed=11)
    tilted = dataclasses.replace(cfg, color_term_mag_per_mag=0.1)
    a = simulate_detector(cfg, cfg.visits[1], 0).truth.sources
    b = simulate_detector(tilted, tilted.visits[1], 0).truth.sources
    stars = np.asarray(a["is_star"])
    dmag = np.asarray(b["mag"] - a["mag"])[stars]
    # Δm = 0.1 ((g-r) - 0.7) with g-r in 0.2-1.5.
    assert np.all((dmag >= -0.05 - 1e-9) & (dmag <= 0.08 + 1e-9)) and np.ptp(dmag) > 0.05


# -- the Rubin-like scene ------------------------------------------------------------------


def test_rubin_scene_geometry_and_truth() -> None:
    scene = rubin_test_scene(seed=1)
    e = scene.exposure
    assert e.shape == (181, 201) and e.origin == (5, 4)
    ra, dec = e.pixel_to_sky(*e.center_pix)
    assert (float(ra), float(dec)) == pytest.approx((245.0, -45.0), abs=1e-9)
    assert np.all(e.variance == 100.0) and not e.mask.any()
    assert e.photo_calib.calibration_njy_per_count == 12.3
    assert len(scene.truth) == 7 and scene.truth["is_star"].sum() == 6 and len(scene.refcat) == 6
    # Refcat positions go back to the truth pixels through the WCS (1e-6 px: inverse TAN round-off).
    x, y = e.sky_to_pixel(scene.refcat["ra"], scene.refcat["dec"])
    np.testing.assert_allclose(x, scene.truth["x"][:6], atol=1e-6)
    np.testing.assert_allclose(y, scene.truth["y"][:6], atol=1e-6)
    # Aperture sums of the brightest star and the extended source give their fluxes within 3σ of the noise.
    for k, r in ((5, 8), (6, 20)):
        xi, yi = int(round(scene.truth["x"][k])) - 5, int(round(scene.truth["y"][k])) - 4
        box = e.image[yi - r:yi + r + 1, xi - r:xi + r + 1].astype(float) - 500.0
        assert box.sum() == pytest.approx(scene.truth["flux"][k], abs=3 * 10.0 * (2 * r + 1) + 0.01 * scene.truth["flux"][k])


def test_two_snap_version_sums_to_the_scene() -> None:
    scene = rubin_test_scene(seed=2)
    a, b = two_snap_version(scene)
    np.testing.assert_array_equal(a.image + b.image, scene.exposure.image)
    np.testing.assert_array_equal(a.variance + b.variance, scene.exposure.variance)
    assert a.visit_info.exposure_time_s == 15.0 and a.origin == (5, 4)


def test_star_stamps_hold_the_profile_fraction_not_a_rescaled_flux(config: SimulationConfig) -> None:
    from singleframe.sim.survey import _psf_field

    psf = _psf_field(config, make_camera(config), 1, config.visits[0])
    x, y = np.array([100.3, 400.6]), np.array([50.2, 300.9])
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    small = psf.stamps(x, y, 20, ix, iy)
    large = psf.stamps(x, y, 75, ix, iy)
    # Same core whatever the stamp (bright and faint stars share the profile); only the wings go.
    np.testing.assert_allclose(small, large[:, 55:96, 55:96], rtol=1e-6, atol=1e-9)
    frac_small, frac_large = small.sum(axis=(1, 2)), large.sum(axis=(1, 2))
    assert np.all((0.985 < frac_small) & (frac_small < 0.998))  # Kolmogorov wings beyond 20 px: 3-13 mmag
    assert np.all((0.997 < frac_large) & (frac_large <= 1.0 + 1e-4))  # < 1.5 mmag beyond 75 px
