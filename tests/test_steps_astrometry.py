"""Astrometric fit: recovery of a known TAN-SIP WCS from a wrong camera-model pointing."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from scenes import noisy_refcat

from singleframe.camera import square_mosaic
from singleframe.errors import AstrometryError
from singleframe.steps.astrometry import AstrometryConfig, compute_coordinates, fit_astrometry

NX, NY = 2048, 1500  # non-square detector
ORIGIN = (37, 51)  # non-zero parent origin
RA0, DEC0, ROT0 = 150.0, -30.0, 20.0
DETECTOR = 2  # off-axis detector of a 3x3 mosaic: rotation errors also shift it


def _camera(scale: float = 1.0):
    # Cubic radial distortion of ~0.1 % at the detector: the SIP terms matter at the mas level.
    return square_mosaic("test", n_side=3, nx=NX, ny=NY, distortion_k3_per_mm2=2e-5,
                         plate_scale_arcsec_per_mm=20.0 * scale)


def _scene(seed: int, *, n_ref: int = 1500, grow: float = 0.3, ref_noise_mas: float = 5.0):
    """Stars on the sky from the true WCS; sources are those on the detector, refs all of them."""
    rng = np.random.default_rng(seed)
    truth = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    x = rng.uniform(-grow * NX, (1 + grow) * NX, n_ref)
    y = rng.uniform(-grow * NY, (1 + grow) * NY, n_ref)
    flux = 10 ** rng.uniform(3, 6, n_ref)
    ra, dec = truth.all_pix2world(x, y, 0)
    on = np.flatnonzero((x > 2) & (x < NX - 3) & (y > 2) & (y < NY - 3))
    src = Table()
    src["id"] = np.arange(1, len(on) + 1, dtype=np.int64)
    src.meta["star_index"] = on  # source id k is star on[k - 1], reference id 10_000 + star index
    src["base_SdssCentroid_x"] = x[on] + ORIGIN[0]
    src["base_SdssCentroid_y"] = y[on] + ORIGIN[1]
    src["base_SdssCentroid_xErr"] = np.full(len(on), 0.01)
    src["base_SdssCentroid_yErr"] = np.full(len(on), 0.01)
    src["base_PsfFlux_instFlux"] = flux[on] * 0.5
    src["base_PsfFlux_instFluxErr"] = np.full(len(on), 5.0)
    src["base_PixelFlags_flag_saturated"] = np.zeros(len(on), bool)
    ref = noisy_refcat(rng, ra, dec, flux, noise_mas=ref_noise_mas, first_id=10_000)
    return truth, src, ref


def _grid_error_mas(truth, wcs) -> float:
    gx, gy = np.meshgrid(np.linspace(0, NX - 1, 25), np.linspace(0, NY - 1, 20))
    a = np.array(truth.all_pix2world(gx.ravel(), gy.ravel(), 0))
    b = np.array(wcs.all_pix2world(gx.ravel(), gy.ravel(), 0))
    d = np.hypot((a[0] - b[0]) * np.cos(np.radians(a[1])), a[1] - b[1]) * 3.6e6
    return float(np.sqrt(np.mean(d**2)))


@pytest.mark.parametrize(("d_ra_arcmin", "d_dec_arcmin", "d_rot_deg", "scale"), [
    (3.0, 0.0, 2.0, 1.0),     # brief: 3' and 2 deg
    (0.0, -1.0, 0.5, 1.01),   # brief: 1 % scale
    (4.0, 3.0, -3.0, 0.98),   # tolerance claim: 5' offset, 3 deg, 2 % scale at once
])
def test_recovers_known_wcs(d_ra_arcmin, d_dec_arcmin, d_rot_deg, scale):
    truth, src, ref = _scene(1)
    initial = _camera(scale).initial_wcs(DETECTOR, RA0 + d_ra_arcmin / 60 / np.cos(np.radians(DEC0)),
                                         DEC0 + d_dec_arcmin / 60, ROT0 + d_rot_deg)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    # 5 mas reference noise over ~300 matches: the fitted WCS is good to ~1 mas; 5 mas is the brief's bar.
    assert _grid_error_mas(truth, res.wcs) <= 5.0
    # The matched separations are the reference noise: ~5 mas x sqrt(2) rms, far below 0.05".
    assert res.rms_arcsec < 0.02
    assert res.match_confidence > 0.999
    assert res.n_matches >= 0.95 * len(src)  # 3-sigma clipping drops ~1 %
    assert res.used.shape == (len(src),) and res.used.sum() == res.n_matches
    for col in ("ref_id", "ref_coord_ra", "ref_coord_dec", "ref_r_flux", "ref_r_fluxErr", "src_id",
                "src_coord_ra", "src_coord_dec", "src_base_SdssCentroid_x", "src_base_SdssCentroid_y",
                "src_base_PsfFlux_instFlux", "distance", "distance_arcsec"):
        assert col in res.matches.colnames
    # Every match pairs a source with its own star: with 5 mas reference noise and stars ~10" apart
    # on average, a match to a neighbour would be a matcher bug, not noise.
    src_id = np.asarray(res.matches["src_id"], np.int64)
    ref_id = np.asarray(res.matches["ref_id"], np.int64)
    np.testing.assert_array_equal(ref_id - 10_000, src.meta["star_index"][src_id - 1])
    assert res.wcs.sip is not None  # the camera distortion is kept


def test_incomplete_and_scrambled_catalogues():
    """A third of the sources lack a reference and brightness ranks differ between the catalogues."""
    truth, src, ref = _scene(2, n_ref=2000)
    rng = np.random.default_rng(3)
    keep = rng.random(len(ref)) > 0.33
    ref = ref[keep]
    src["base_PsfFlux_instFlux"] = src["base_PsfFlux_instFlux"] * 10 ** rng.normal(0, 0.3, len(src))
    initial = _camera().initial_wcs(DETECTOR, RA0 - 0.05, DEC0 + 0.03, ROT0 - 1.5)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    assert _grid_error_mas(truth, res.wcs) <= 5.0  # same bar as above
    assert 0.55 * len(src) < res.n_matches < 0.75 * len(src)  # ~2/3 of the sources have a reference


def test_wrong_field_raises_with_metadata():
    _, src, _ = _scene(4)
    # References of an unrelated field, placed where the detector is supposed to be.
    _, _, other = _scene(5)
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    with pytest.raises(AstrometryError) as info:
        fit_astrometry(src, other, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    for key in ("n_sources", "n_refs", "n_matches", "rms_arcsec"):
        assert key in info.value.metadata
    assert info.value.metadata["n_sources"] == len(src)


def test_too_few_sources_raises():
    _, src, ref = _scene(6)
    src["base_PsfFlux_instFluxErr"] = src["base_PsfFlux_instFlux"]  # S/N = 1 everywhere
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    with pytest.raises(AstrometryError, match="usable for astrometry"):
        fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))


def test_2000_sources_against_3000_refs():
    """Accuracy with a realistic catalogue size (the speed is measured by make bench)."""
    truth, src, ref = _scene(7, n_ref=3000, grow=0.1)
    src = src[:2000]
    initial = _camera().initial_wcs(DETECTOR, RA0 + 0.04, DEC0, ROT0 + 2.0)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    assert _grid_error_mas(truth, res.wcs) <= 5.0


def test_compute_coordinates_and_errors():
    _, src, _ = _scene(8)
    # Distortion-free central detector: the local scale is the nominal 0.2"/px to < 0.1 %.
    truth = square_mosaic("flat", n_side=3, nx=NX, ny=NY).initial_wcs(4, RA0, DEC0, ROT0)
    out = compute_coordinates(src, truth, ORIGIN)
    assert "coord_ra" not in src.colnames  # input not mutated
    ra, dec = truth.all_pix2world(np.asarray(src["base_SdssCentroid_x"]) - ORIGIN[0],
                                  np.asarray(src["base_SdssCentroid_y"]) - ORIGIN[1], 0)
    np.testing.assert_allclose(np.asarray(out["coord_ra"]), np.radians(ra), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out["coord_dec"]), np.radians(dec), rtol=0, atol=1e-12)
    assert str(out["coord_ra"].unit) == "rad"
    # 0.01 px at 0.2"/px: 2 mas; the RA error is that angle divided by cos(dec). rtol 0.2 % covers the
    # gnomonic scale change across the detector and the one-pixel finite difference.
    scale_rad = 0.2 / 206264.806
    np.testing.assert_allclose(np.asarray(out["coord_decErr"]), 0.01 * scale_rad, rtol=0.002)
    np.testing.assert_allclose(np.asarray(out["coord_raErr"]) * np.cos(np.radians(dec)), 0.01 * scale_rad, rtol=0.002)
    none = compute_coordinates(src, None, ORIGIN)
    assert np.all(np.isnan(none["coord_ra"]))


def test_config_validation():
    from singleframe.errors import ConfigError

    with pytest.raises(ConfigError):
        AstrometryConfig(max_rms_arcsec=0).validate()


def test_pattern_false_alarm_probability_is_the_poisson_tail():
    # The match's false-alarm test needs log P(X > k) for a Poisson count; it is computed from
    # scipy.special (no scipy.stats import in workers) and must equal scipy.stats' value,
    # including k < 0 (probability 1) and the underflow to -inf.
    from scipy.stats import poisson

    from singleframe.steps.astrometry import _log_poisson_sf

    for k, lam in [(-1, 0.5), (-3, 1e-12), (0, 0.5), (4, 2.0), (49, 2.0), (300, 1e-3)]:
        assert _log_poisson_sf(k, lam) == float(poisson.logsf(k, lam))


def test_offset_vote_in_blocks_counts_every_pair_once():
    # The blocked vote must give exactly the histogram of the whole pair set at once.
    from singleframe.steps import astrometry

    rng = np.random.default_rng(3)
    tx, ty = rng.uniform(-300, 300, 700), rng.uniform(-300, 300, 700)
    r = rng.uniform(-320, 320, (400, 2))
    nb, max_off, bin_arcsec = 41, 20.0, 1.0
    hist, n_ok = astrometry._offset_votes(tx, ty, r, max_off=max_off, bin_arcsec=bin_arcsec, nb=nb)
    ix = np.floor((r[None, :, 0] - tx[:, None] + max_off) / bin_arcsec).astype(np.int64).ravel()
    iy = np.floor((r[None, :, 1] - ty[:, None] + max_off) / bin_arcsec).astype(np.int64).ravel()
    ok = (ix >= 0) & (ix < nb) & (iy >= 0) & (iy < nb)
    assert 700 * 400 > 4 * astrometry._VOTE_BLOCK_PAIRS  # the vote really runs in several blocks
    assert n_ok == int(ok.sum()) > 0
    np.testing.assert_array_equal(hist, np.bincount(iy[ok] * nb + ix[ok], minlength=nb * nb).reshape(nb, nb))


def test_only_psf_candidates_are_matched_unless_too_few():
    # Brief step 4.1: the astrometry uses the calib_psf_candidate sources. Every third source is
    # made a non-candidate (as a galaxy would be): none of them may be used.
    truth, src, ref = _scene(1)
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    src["calib_psf_candidate"] = np.arange(len(src)) % 3 != 0
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    assert res.used.any() and not np.any(res.used & ~np.asarray(src["calib_psf_candidate"]))
    assert not res.required_flags_dropped and _grid_error_mas(truth, res.wcs) <= 5.0
    # A frame with fewer candidates than min_matches (10) still solves, from all usable sources,
    # and says that it did.
    src["calib_psf_candidate"] = np.arange(len(src)) < 5
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
    assert res.required_flags_dropped and res.used.sum() > 5 and _grid_error_mas(truth, res.wcs) <= 5.0


def test_a_failed_solution_on_the_candidates_is_retried_on_every_usable_source():
    # The candidate flag is a preference: when the solution on the flagged sources fails (here 12
    # candidates whose centroids are each moved 20-60 px in a random direction, so no offset
    # gathers their votes), the fit is tried again on every usable source before any blind
    # search, and says so.
    truth, src, ref = _scene(1)
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    cand = np.arange(len(src)) < 12
    src["calib_psf_candidate"] = cand
    rng = np.random.default_rng(5)
    step, angle = rng.uniform(20.0, 60.0, 12), rng.uniform(0.0, 2 * np.pi, 12)
    for col, move in (("base_SdssCentroid_x", step * np.cos(angle)), ("base_SdssCentroid_y", step * np.sin(angle))):
        values = np.asarray(src[col], float).copy()
        values[:12] += move
        src[col] = values
    config = AstrometryConfig(blind_search_radius_deg=0.0)
    with pytest.raises(AstrometryError):
        _solve_candidates_only(src, ref, initial, config)
    res = fit_astrometry(src, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX), config=config)
    assert res.required_flags_dropped and _grid_error_mas(truth, res.wcs) <= 5.0
    assert np.any(res.used & ~cand)  # the other sources carried the solution,
    assert not np.any(res.used & cand)  # and the moved centroids were clipped


@pytest.mark.parametrize("detector_radius_pix", [362.0, 1448.0, 2896.0])  # 512², 2048², 4096² detectors
def test_pattern_grid_stays_within_the_configured_rotation_and_scale(detector_radius_pix):
    # Beyond the limits the pattern stage found false peaks on 512² detectors (1.9-2.2" fits).
    from singleframe.steps.astrometry import _similarity_grid

    config = AstrometryConfig()
    step = config.pattern_bin_pix / detector_radius_pix
    thetas, lscales = _similarity_grid(step, config)
    for grid, limit in ((thetas, np.radians(config.max_rotation_deg)), (lscales, np.log1p(config.max_scale_change))):
        assert grid.min() == pytest.approx(-limit) and grid.max() == pytest.approx(limit)
        assert np.any(grid == 0.0) and np.all(np.diff(grid) <= step + 1e-12)


def _solve_candidates_only(src, ref, initial, config):
    """The candidates alone (non-candidates made unusable): the solution must fail."""
    only = src.copy()
    only["base_SdssCentroid_flag"] = ~np.asarray(only["calib_psf_candidate"], bool)
    return fit_astrometry(only, ref, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX), config=config)


def test_nearest_neighbour_matching_with_no_pair_in_reach_is_empty():
    # Regression: with no source within the radius of any reference the one-to-one selection
    # used to be a length-1 mask (np.r_[True, empty]) and raised IndexError instead of letting
    # the fit say "only 0 matches" as an AstrometryError.
    from singleframe.steps.astrometry import _match_nn

    src = np.array([[0.0, 0.0], [50.0, 50.0]])
    for ref in (np.array([[10.0, 10.0], [30.0, -30.0]]), np.zeros((0, 2)), np.full((2, 2), np.nan)):
        si, ri, d = _match_nn(src, ref, radius=1.0)
        assert si.size == ri.size == d.size == 0
    # Two sources reaching one reference: the closer one keeps it.
    si, ri, d = _match_nn(np.array([[0.0, 0.4], [0.0, 0.1]]), np.array([[0.0, 0.0]]), radius=1.0)
    assert si.tolist() == [1] and ri.tolist() == [0] and d.tolist() == pytest.approx([0.1])


def test_a_catalogue_that_misses_the_field_is_named_with_its_cone():
    # The error must say the catalogue does not cover the field, not "load a larger region".
    _, src, ref = _scene(7)
    initial = _camera().initial_wcs(DETECTOR, RA0, DEC0, ROT0)
    empty = ref[:0]
    empty.meta.update({"refcat": "gaia_elsewhere", "ra_deg": RA0, "dec_deg": DEC0, "radius_deg": 0.25})
    with pytest.raises(AstrometryError, match=r"'gaia_elsewhere' has 0 stars within 0.25 deg of \(RA, Dec\) = "
                       r"\(150.00000, -30.00000\).*does not cover this field"):
        fit_astrometry(src, empty, initial_wcs=initial, origin=ORIGIN, shape=(NY, NX))
