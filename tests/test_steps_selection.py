"""Star selection, sky-source placement and PSF-star flag propagation."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from singleframe.errors import ConfigError, NoPsfStarsToStarsMatchError
from singleframe.masks import MaskPlane
from singleframe.photo_calib import ab_mag_to_njy
from singleframe.steps.flag_propagation import match_psf_stars
from singleframe.steps.star_selection import (
    StarSelectorConfig,
    place_sky_sources,
    reference_complete_mag,
    reference_prior,
    select_stars,
)

CAL = "base_NormalizedCompensatedTophatFlux"


def _catalog() -> Table:
    t = Table()
    t[f"{CAL}_instFlux"] = [1000.0, 1000.0, 1000.0, 50.0, 1000.0, np.nan, 0.0]
    t[f"{CAL}_instFluxErr"] = [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 1.0]
    t["base_ClassificationSizeExtendedness_value"] = [0.0, 0.5, 0.05, 0.0, 0.0, 0.0, np.nan]
    t["base_PixelFlags_flag_edge"] = [False, False, False, False, True, False, False]
    t["base_PixelFlags_flag_saturated"] = np.zeros(7, bool)
    t["sky_source"] = [False, False, False, False, False, False, True]
    return t


def test_select_stars_cuts():
    # The synthetic catalogue carries the calibration flux only (Rubin's slot_CalibFlux cut).
    cfg = StarSelectorConfig(flux_field="base_NormalizedCompensatedTophatFlux", max_extendedness=0.1)
    sel = select_stars(_catalog(), config=cfg)
    # 0 good; 1 resolved; 2 good; 3 S/N 5; 4 edge; 5 NaN flux; 6 sky source (kept whatever its values).
    assert sel.selected.tolist() == [True, False, True, False, False, False, True]
    assert sel.n_selected == 3
    no_ext = select_stars(_catalog(), config=StarSelectorConfig(flux_field=cfg.flux_field, max_extendedness=None))
    assert no_ext.selected[1]


def _size_catalog(seed: int = 3) -> tuple[Table, np.ndarray]:
    """Point sources at S/N 8-500 with the measured size noise, and galaxies 40 % larger than the PSF."""
    rng = np.random.default_rng(seed)
    n_star, n_gal = 4000, 400
    snr = np.concatenate([10 ** rng.uniform(np.log10(8), np.log10(500), n_star), rng.uniform(30, 500, n_gal)])
    t_psf = np.full(snr.size, 6.5)  # px^2: sigma 1.8 px
    excess = np.concatenate([rng.normal(0, 2.5 / snr[:n_star]), np.full(n_gal, 0.4)])
    t = Table()
    t["base_PsfFlux_instFlux"] = snr * 100.0
    t["base_PsfFlux_instFluxErr"] = np.full(snr.size, 100.0)
    t["ext_shapeHSM_HsmPsfMoments_xx"] = t["ext_shapeHSM_HsmPsfMoments_yy"] = t_psf / 2
    t["ext_shapeHSM_HsmSourceMoments_xx"] = t["ext_shapeHSM_HsmSourceMoments_yy"] = t_psf * (1 + excess) / 2
    is_star = np.arange(snr.size) < n_star
    return t, is_star


def test_size_significance_keeps_faint_stars_and_rejects_resolved():
    t, is_star = _size_catalog()
    sel = select_stars(t, config=StarSelectorConfig())
    # 3.5 sigma one-sided on a Gaussian: 2e-4 of stars lost; 4000 stars -> <= 0.3 % with margin.
    assert sel.selected[is_star].mean() > 0.997
    assert not np.any(sel.selected[~is_star])  # 40 % larger than the PSF at S/N >= 30: > 3.5 sigma
    # Rubin's fixed cut on |excess| (extendedness < 0.1 <-> |dT| < 0.46 sqrt(T_psf)) loses faint stars.
    t_ext = t.copy()
    chi = (t["ext_shapeHSM_HsmSourceMoments_xx"] * 2 - 6.5) / np.sqrt(6.5)
    t_ext["base_ClassificationSizeExtendedness_value"] = 1 - np.exp(-0.5 * chi**2)
    rubin = select_stars(t_ext, config=StarSelectorConfig(max_extendedness=0.1, max_size_excess_sigma=None))
    assert rubin.selected[is_star].mean() < 0.95
    # NaN sizes (failed moments) are not accepted as point sources.
    t["ext_shapeHSM_HsmSourceMoments_xx"][0] = np.nan
    assert not select_stars(t).selected[0]


def _tan_wcs(scale_arcsec: float = 0.2, shape: tuple[int, int] = (1000, 1000)):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = np.array([[-scale_arcsec, 0.0], [0.0, scale_arcsec]]) / 3600.0
    return w


def _reference_scene(seed: int = 5, cut_mag: float = 22.0):
    """Stars (17-23 mag, counts x2 per mag) in a reference catalogue cut at ``cut_mag``, and
    compact galaxies (not in it) whose size excess is 2 sigma: they pass the 3.5-sigma size test.

    Instrumental zero point 30 (mag of 1 count); S/N = flux / 100 counts.
    """
    rng = np.random.default_rng(seed)
    wcs = _tan_wcs()
    n_star, n_gal = 1500, 300
    # Counts rising x2 per magnitude: inverse CDF of 2**m on [17, 23].
    u = rng.uniform(size=n_star)
    star_mag = np.log2(2**17 + u * (2**23 - 2**17))
    gal_mag = rng.uniform(19.0, 23.0, n_gal)
    mag = np.concatenate([star_mag, gal_mag])
    x, y = rng.uniform(20, 980, mag.size), rng.uniform(20, 980, mag.size)
    flux = 10 ** (-0.4 * (mag - 30.0))
    snr = flux / 100.0
    is_star = np.arange(mag.size) < n_star
    excess = np.where(is_star, 0.0, 2.0 * 2.5 / snr)
    t = Table()
    t["base_SdssCentroid_x"], t["base_SdssCentroid_y"] = x + rng.normal(0, 0.2, x.size), y + rng.normal(0, 0.2, y.size)
    t["base_PsfFlux_instFlux"] = flux
    t["base_PsfFlux_instFluxErr"] = np.full(mag.size, 100.0)
    t["ext_shapeHSM_HsmPsfMoments_xx"] = t["ext_shapeHSM_HsmPsfMoments_yy"] = np.full(mag.size, 10.0)
    t["ext_shapeHSM_HsmSourceMoments_xx"] = t["ext_shapeHSM_HsmSourceMoments_yy"] = 10.0 * (1 + excess)
    in_ref = is_star & (mag <= cut_mag)
    ra, dec = wcs.all_pix2world(x[in_ref], y[in_ref], 0)
    ref = Table({"id": np.arange(in_ref.sum()), "ra": ra, "dec": dec,
                 "r_flux": ab_mag_to_njy(mag[in_ref]), "r_fluxErr": np.ones(in_ref.sum())})
    return t, ref, wcs, is_star, mag


def test_reference_complete_mag_finds_the_cut():
    rng = np.random.default_rng(1)
    u = rng.uniform(size=3000)
    m = np.log2(2**15 + u * (2**22 - 2**15))
    # The turnover of a hard cut is the faintest bin: its bright edge, 0.25 mag above the faintest star.
    assert 21.7 <= reference_complete_mag(m) <= 22.0
    # A roll-off: keep stars with probability falling from 1 at 20 to 0 at 22; the counts peak
    # where the falling completeness beats the x2-per-mag rise, well before the faintest star.
    keep = rng.uniform(size=m.size) < np.clip((22.0 - m) / 2.0, 0, 1)
    assert 19.5 <= reference_complete_mag(m[keep]) <= 21.0 < m[keep].max()
    assert np.isnan(reference_complete_mag(np.array([np.nan])))


def test_reference_prior_rejects_unlisted_compact_galaxies_only():
    t, ref, wcs, is_star, mag = _reference_scene()
    cfg = StarSelectorConfig()
    size_only = select_stars(t, config=cfg).selected
    bright = mag < 21.5
    assert size_only[~is_star & bright].all()  # 2-sigma galaxies pass the size test alone
    prior = reference_prior(t, ref, wcs=wcs, origin=(0, 0), shape=(1000, 1000), band="r", config=cfg)
    assert prior.applied, prior.reason
    assert prior.zero_point_mag == pytest.approx(30.0, abs=1e-6)
    assert 21.7 <= prior.complete_mag <= 22.0
    sel = select_stars(t, config=cfg, prior=prior)
    # Every star the size test keeps is kept: those in the catalogue match it; fainter ones are
    # outside its complete range.
    assert size_only[is_star].sum() > 1200  # of 1500: the rest are below S/N 8
    assert (sel.selected[is_star] == size_only[is_star]).all()
    # Galaxies the catalogue would list if they were stars are held to 1 sigma and rejected, down
    # to the 8 % floor of the size test (2 sigma is 8 % at S/N 62.5, 20.5 mag); fainter ones
    # (beyond the completeness) face the size test alone.
    snr = np.asarray(t["base_PsfFlux_instFlux"]) / 100.0
    listed = ~is_star & (mag < prior.complete_mag - 0.05) & (snr < 60)
    assert not sel.selected[listed & ~prior.matched].any()
    # A galaxy within 0.4" of a reference star is vouched for: 761 stars on 1000² px of 0.2"
    # leave a 1 % chance of that.
    assert prior.matched[listed].mean() < 0.03
    assert sel.selected[~is_star & (snr > 65)].all()
    fainter = ~is_star & (mag > prior.complete_mag + 0.05)
    assert (sel.selected[fainter] == size_only[fainter]).all() and size_only[fainter].sum() > 20
    assert sel.n_rejected_unmatched == int(np.sum(~is_star & ~prior.matched & (mag < prior.complete_mag)
                                                  & (snr <= 62.5)))
    # A handful of sources (the residual search) cannot set the scale, but reuse the main pass's.
    few = np.flatnonzero(~is_star & (mag < 21))[:3].tolist() + np.flatnonzero(is_star & (mag < 21))[:3].tolist()
    alone = reference_prior(t[few], ref, wcs=wcs, origin=(0, 0), shape=(1000, 1000), band="r", config=cfg)
    assert not alone.applied
    reused = reference_prior(t[few], ref, wcs=wcs, origin=(0, 0), shape=(1000, 1000), band="r", config=cfg,
                             like=prior)
    assert reused.applied and reused.zero_point_mag == prior.zero_point_mag
    assert reused.match_sigma_arcsec == prior.match_sigma_arcsec < 0.1  # 0.2-px centroid noise: ~0.05"
    assert (reused.unmatched_complete == prior.unmatched_complete[few]).all()
    # A star missing from the catalogue (a variable, a mover) is still a star if it is point-like.
    drop = np.flatnonzero(is_star & (mag < 19))[:5]
    ref_lacking = ref[~np.isin(np.arange(len(ref)), np.searchsorted(np.flatnonzero(is_star & (mag <= 22.0)), drop))]
    p2 = reference_prior(t, ref_lacking, wcs=wcs, origin=(0, 0), shape=(1000, 1000), band="r", config=cfg)
    assert p2.applied and p2.unmatched_complete[drop].all()
    assert select_stars(t, config=cfg, prior=p2).selected[drop].all()


def test_reference_prior_steps_aside_when_the_catalogue_does_not_fit():
    t, ref, wcs, is_star, mag = _reference_scene()
    cfg = StarSelectorConfig()
    size_only = select_stars(t, config=cfg).selected
    shifted = ref.copy()
    shifted["dec"] = shifted["dec"] + 3.0 / 3600  # 3": a wrong WCS or epoch
    for table, band, why in ((shifted, "r", "match a reference"), (ref, "g", "no g_flux"),
                             (ref[:20], "r", "reference_min_stars")):
        prior = reference_prior(t, table, wcs=wcs, origin=(0, 0), shape=(1000, 1000), band=band, config=cfg)
        assert not prior.applied and why in prior.reason
        assert (select_stars(t, config=cfg, prior=prior).selected == size_only).all()
    # The parent origin moves the detector, not the answer.
    t2 = t.copy()
    t2["base_SdssCentroid_x"] += 2000
    prior = reference_prior(t2, ref, wcs=wcs, origin=(2000, 0), shape=(1000, 1000), band="r", config=cfg)
    assert prior.applied and prior.matched[is_star & (mag <= 22.0)].all()


def test_select_stars_missing_flux_raises():
    with pytest.raises(ConfigError, match="flux_field"):
        select_stars(_catalog(), config=StarSelectorConfig(flux_field="base_GaussianFlux"))


def test_place_sky_sources_avoids_masks():
    ny, nx = 300, 400
    mask = np.zeros((ny, nx), np.uint32)
    mask[:, :200] |= np.uint32(MaskPlane.DETECTED)  # left half covered by a detection
    mask[250:, :] |= np.uint32(MaskPlane.NO_DATA)
    origin = (1000, 2000)
    sky = place_sky_sources(mask, n_sources=30, radius_pix=8, seed=1, origin=origin)
    # 200 x 250 free pixels hold far more than 30 disjoint 8-px apertures: all 30 are placed.
    assert len(sky) == 30
    x = np.asarray(sky["x"]) - origin[0]
    y = np.asarray(sky["y"]) - origin[1]
    assert np.all(x >= 200 + 8) and np.all(y <= 250 - 8)  # whole aperture outside the masked regions
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(len(x)) * 1e9
    assert d.min() >= 16  # apertures do not overlap
    again = place_sky_sources(mask, n_sources=30, radius_pix=8, seed=1, origin=origin)
    np.testing.assert_array_equal(sky["x"], again["x"])  # seeded


def _psf_and_stars():
    psf = Table()
    psf["id"] = np.array([11, 12, 13, 14], np.int64)
    psf["base_SdssCentroid_x"] = [100.0, 200.0, 300.0, 300.6]
    psf["base_SdssCentroid_y"] = [50.0, 60.0, 70.0, 70.0]
    psf["calib_psf_candidate"] = [True, True, True, True]
    psf["calib_psf_used"] = [True, False, False, True]
    psf["calib_psf_reserved"] = [False, True, False, False]
    psf["calib_astrometry_used"] = [True, True, False, False]
    psf["apcorr_base_PsfFlux_used"] = [True, False, True, False]
    psf["psf_max_value"] = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    stars = Table()
    stars["base_SdssCentroid_x"] = [100.3, 199.8, 300.2, 500.0, 200.0]
    stars["base_SdssCentroid_y"] = [50.1, 60.0, 70.0, 500.0, 60.0]
    # Star 4 is the deblended parent of star 1: PSF star 12 must go to the child.
    stars["deblend_nChild"] = [0, 0, 0, 0, 2]
    return psf, stars


def test_flag_propagation():
    psf, stars = _psf_and_stars()
    res = match_psf_stars(psf, stars, radius_pix=3.0)
    out = res.stars
    assert res.n_matched == 4
    assert res.n_multiple == 1  # PSF stars 13 and 14 both land on star 2
    assert out["psf_id"].tolist() == [11, 12, 13, 0, 0]  # star 2 takes the closest (13)
    assert out["calib_psf_used"].tolist() == [True, False, True, False, False]  # OR over 13 and 14: kept
    assert out["calib_psf_reserved"].tolist() == [False, True, False, False, False]
    assert out["calib_astrometry_used"].tolist() == [True, True, False, False, False]
    assert out["apcorr_base_GaussianFlux_used"].tolist() == [False] * 5  # absent in PSF stars
    assert out["psf_max_value"][2] == 30.0 and np.isnan(out["psf_max_value"][3])
    assert "psf_id" not in stars.colnames  # input untouched


def test_flag_propagation_parent_fallback_counted():
    psf, stars = _psf_and_stars()
    stars = stars[[0, 2, 3, 4]]  # the child of PSF star 12 is gone: only its parent remains
    res = match_psf_stars(psf, stars, radius_pix=3.0)
    assert res.n_matched_to_parent == 1
    assert res.stars["psf_id"][3] == 12


def test_disjoint_catalogues_raise_with_counts():
    psf, stars = _psf_and_stars()
    stars["base_SdssCentroid_x"] = np.asarray(stars["base_SdssCentroid_x"]) + 1000.0
    with pytest.raises(NoPsfStarsToStarsMatchError) as info:
        match_psf_stars(psf, stars, radius_pix=3.0)
    assert info.value.metadata["n_psf_stars"] == 4
    assert info.value.metadata["n_stars"] == 5
