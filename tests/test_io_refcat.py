"""HEALPix-partitioned reference catalogues: ingest, partitioning, cone loads, proper motions."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import MaskedColumn, Table

from singleframe.errors import ConfigError, DatasetNotFoundError
from singleframe.io import (
    ArtifactStore,
    epoch_year_from_mjd,
    load_refcat,
    read_refcat_info,
    refcat_from_table,
    write_refcat,
)
from singleframe.photo_calib import AB_MAG_OF_ONE_NJY


def _gaia_like(n: int, seed: int) -> Table:
    """A Gaia-export-like table (Gaia column names and units) around RA 150, Dec 2."""
    rng = np.random.default_rng(seed)
    t = Table()
    t["source_id"] = np.arange(n, dtype=np.int64) + 10**15
    t["ra"] = rng.uniform(147.0, 153.0, n) * u.deg
    t["dec"] = rng.uniform(-1.0, 5.0, n) * u.deg
    t["ra_error"] = rng.uniform(0.05, 0.5, n) * u.mas
    t["dec_error"] = rng.uniform(0.05, 0.5, n) * u.mas
    t["pmra"] = MaskedColumn(rng.normal(0, 8, n), mask=rng.random(n) < 0.1, unit=u.mas / u.yr)
    t["pmdec"] = MaskedColumn(rng.normal(0, 8, n), mask=np.asarray(t["pmra"].mask), unit=u.mas / u.yr)
    t["pmra_error"] = rng.uniform(0.02, 0.2, n) * u.mas / u.yr
    t["pmdec_error"] = rng.uniform(0.02, 0.2, n) * u.mas / u.yr
    t["g_mag"] = rng.uniform(14, 20, n) * u.mag
    t["g_mag_err"] = np.full(n, 0.01) * u.mag
    t["r_mag"] = rng.uniform(14, 20, n)
    return t


GAIA_MAP = {"id": "source_id", "ra": "ra", "dec": "dec", "ra_err": "ra_error", "dec_err": "dec_error",
            "pm_ra": "pmra", "pm_dec": "pmdec", "pm_ra_err": "pmra_error", "pm_dec_err": "pmdec_error"}


def test_refcat_from_table_converts_magnitudes_and_fills_missing_motions() -> None:
    src = _gaia_like(200, seed=1)
    src["g_mag"][0] = AB_MAG_OF_ONE_NJY  # AB 31.4 is 1 nJy
    cat = refcat_from_table(src, column_map=GAIA_MAP, bands={"g": "g_mag", "r": "r_mag"},
                            mag_err_columns={"g": "g_mag_err"}, epoch_year=2016.0)
    assert cat["g_flux"][0] == pytest.approx(1.0, rel=1e-12)  # float round-off only
    expected = 3631e9 * 10 ** (-0.4 * np.asarray(src["g_mag"]))  # AB: 0 mag is 3631 Jy
    np.testing.assert_allclose(cat["g_flux"], expected, rtol=1e-12)  # float round-off only
    # fluxErr = flux * 0.4 ln10 * magErr.
    np.testing.assert_allclose(cat["g_fluxErr"], cat["g_flux"] * 0.01 * math.log(10) / 2.5, rtol=1e-12)
    assert np.all(np.isnan(cat["r_fluxErr"]))
    masked = np.asarray(src["pmra"].mask)
    assert np.all(cat["pm_ra"][masked] == 0) and np.all(np.isnan(cat["pm_ra_err"][masked]))
    assert np.all(np.isfinite(cat["pm_ra_err"][~masked]))
    assert np.all(cat["parallax"] == 0) and np.all(np.isnan(cat["parallax_err"]))  # not mapped
    assert cat["ra"].unit == u.deg and cat["pm_ra"].unit == u.mas / u.yr and cat["g_flux"].unit == u.nJy
    assert np.all(cat["epoch"] == 2016.0) and cat["id"].dtype == np.int64


def test_refcat_from_table_converts_units_and_epochs() -> None:
    t = Table({"RA": [np.radians(150.0)] * u.rad, "DEC": [np.radians(2.0)] * u.rad,
               "ERR": [1e-3] * u.arcsec, "EP": [51544.5] * u.day, "F": [3.631e-6] * u.Jy})
    cat = refcat_from_table(t, column_map={"ra": "RA", "dec": "DEC", "ra_err": "ERR", "epoch": "EP"},
                            bands={"i": "F"}, mag_columns=False)
    assert cat["ra"][0] == pytest.approx(150.0, abs=1e-12) and cat["ra_err"][0] == pytest.approx(1.0)
    assert cat["i_flux"][0] == pytest.approx(3631.0)  # 3.631 µJy = 3631 nJy
    # MJD 51544.5 TAI is J2000.0 to within 32 s (TT-TAI), i.e. 1e-6 yr.
    assert cat["epoch"][0] == pytest.approx(2000.0, abs=2e-6)
    assert cat["id"][0] == 1  # unmapped ids are 1..N
    with pytest.raises(ConfigError, match="epoch_year"):
        refcat_from_table(t, column_map={"ra": "RA", "dec": "DEC"}, bands={"i": "F"})
    with pytest.raises(ConfigError, match="absent"):
        refcat_from_table(t, column_map={"ra": "RA", "dec": "nope"}, bands={"i": "F"}, epoch_year=2000.0)


def test_cone_load_reads_only_overlapping_partitions_and_is_complete(tmp_path: Path) -> None:
    cat = refcat_from_table(_gaia_like(3000, seed=2), column_map=GAIA_MAP, bands={"g": "g_mag"}, epoch_year=2016.0)
    info = write_refcat(str(tmp_path), "gaia_test", cat, nside=32)
    assert info.n_stars == 3000 and len(info.pixels) > 10
    manifest = json.loads((tmp_path / "refcats/gaia_test/manifest.json").read_text())
    assert manifest["nside"] == 32 and manifest["bands"] == ["g"] and "g_flux" in manifest["columns"]
    assert len(list((tmp_path / "refcats/gaia_test/nside32").glob("*.parquet"))) == len(info.pixels)
    out = load_refcat(str(tmp_path), "gaia_test", ra_deg=150.0, dec_deg=2.0, radius_deg=0.7)
    truth = SkyCoord(cat["ra"], cat["dec"]).separation(SkyCoord(150.0 * u.deg, 2.0 * u.deg)).deg <= 0.7
    assert sorted(out["id"]) == sorted(cat["id"][truth])  # exactly the stars in the cone
    assert out.meta["n_partitions_read"] < len(info.pixels)
    assert out["g_flux"].unit == u.nJy and out["ra"].unit == u.deg
    empty = load_refcat(str(tmp_path), "gaia_test", ra_deg=20.0, dec_deg=-40.0, radius_deg=0.5)
    assert len(empty) == 0 and "g_flux" in empty.colnames


def test_proper_motion_moves_stars_by_the_expected_arc() -> None:
    store = ArtifactStore(f"memory://refcat-{uuid.uuid4().hex[:8]}")
    # 100 mas/yr over 10 yr is 1 arcsec; at Dec 60 the RA shift is 2 arcsec of RA (pm_ra includes cos δ).
    cat = Table({"id": np.array([1, 2, 3], np.int64), "ra": [150.0, 150.0, 10.0], "dec": [60.0, 60.0, 89.9999],
                 "pm_ra": [100.0, 0.0, 100.0], "pm_dec": [0.0, -100.0, 0.0], "pm_ra_err": [1.0, 1.0, np.nan],
                 "pm_dec_err": [1.0, 1.0, np.nan], "ra_err": [0.1, 0.1, 0.1], "dec_err": [0.1, 0.1, 0.1],
                 "epoch": [2016.0, 2016.0, 2016.0], "r_flux": [1e5, 1e5, 1e5]})
    write_refcat(store, "pm", cat, nside=8)
    moved = load_refcat(store, "pm", ra_deg=150.0, dec_deg=60.0, radius_deg=0.1, epoch_year=2026.0)
    moved.sort("id")
    start = SkyCoord([150.0, 150.0] * u.deg, [60.0, 60.0] * u.deg)
    end = SkyCoord(moved["ra"], moved["dec"])
    # The tangent-plane step renormalised on the sphere differs from a great-circle arc by ~θ³/6 ≈ 1e-17 rad.
    np.testing.assert_allclose(start.separation(end).arcsec, [1.0, 1.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(start.position_angle(end).deg, [90.0, 180.0], atol=1e-6)  # east, then south
    assert moved["ra"][0] - 150.0 == pytest.approx(2.0 / 3600.0, rel=1e-6)  # 1"/cos 60°
    # Position errors grow by Δt·pm_err in quadrature: hypot(0.1, 10·1.0) mas.
    assert moved["ra_err"][0] == pytest.approx(math.hypot(0.1, 10.0), rel=1e-12)
    assert np.all(moved["epoch"] == 2026.0) and moved.meta["epoch_year"] == 2026.0
    # Near the pole the propagation stays well defined and moves the star by 1 arcsec as well.
    polar = load_refcat(store, "pm", ra_deg=0.0, dec_deg=90.0, radius_deg=0.01, epoch_year=2026.0)
    sep = SkyCoord(10.0 * u.deg, 89.9999 * u.deg).separation(SkyCoord(polar["ra"], polar["dec"])).arcsec
    np.testing.assert_allclose(sep, [1.0], atol=1e-9)  # round-off of a 1" step 0.36" from the pole
    assert polar["ra_err"][0] == 0.1  # unknown motion error: the position error is kept
    # Without an epoch the stored positions are returned.
    still = load_refcat(store, "pm", ra_deg=150.0, dec_deg=60.0, radius_deg=0.1)
    assert set(still["ra"]) == {150.0}


def test_fast_mover_enters_cone_from_a_neighbouring_partition(tmp_path: Path) -> None:
    # A star 0.6 deg outside the cone moving 3600 mas/yr for 1000 yr (1 deg) ends inside it:
    # the pixel search must be widened by the largest motion.
    cat = Table({"id": np.array([1], np.int64), "ra": [0.0], "dec": [1.6], "pm_ra": [0.0], "pm_dec": [-3600.0],
                 "epoch": [1000.0], "g_flux": [1.0]})
    write_refcat(str(tmp_path), "fast", cat, nside=64)
    out = load_refcat(str(tmp_path), "fast", ra_deg=0.0, dec_deg=0.0, radius_deg=1.0, epoch_year=2000.0)
    # Linear space motion without radial velocity moves the star along a straight line, so the arc
    # on the sky is atan(1 deg in rad), 1e-4 deg short of 1 deg at this extreme displacement.
    expected = 1.6 - math.degrees(math.atan(math.radians(1.0)))
    assert list(out["id"]) == [1] and out["dec"][0] == pytest.approx(expected, abs=1e-12)


def test_epoch_from_mjd_and_errors(tmp_path: Path) -> None:
    # J2000.0 is 2000-01-01T12:00 TT = MJD 51544.5 TT; in TAI that is 32.184 s earlier (1e-6 yr).
    assert epoch_year_from_mjd(51544.5 - 32.184 / 86400) == pytest.approx(2000.0, abs=1e-9)
    with pytest.raises(DatasetNotFoundError, match="manifest"):
        read_refcat_info(str(tmp_path), "absent")
    with pytest.raises(ConfigError, match="power of two"):
        write_refcat(str(tmp_path), "x", Table({"id": [1], "ra": [0.0], "dec": [0.0], "epoch": [2000.0],
                                                 "g_flux": [1.0]}), nside=30)


def test_refcat_from_table_refuses_fluxes_of_unknown_unit_and_maps_our_own_names() -> None:
    # A flux column without a unit is ambiguous (µJy read as nJy moves every zero point by
    # 7.5 mag): refused unless flux_unit says which. Columns named as ours need no mapping.
    t = Table({"ra": [150.0, 150.1], "dec": [2.0, 2.1], "r_flux": [3.631, 36.31]})
    with pytest.raises(ConfigError, match="has no unit.*--flux-unit"):
        refcat_from_table(t, column_map={}, bands={"r": "r_flux"}, mag_columns=False, epoch_year=2016.0)
    cat = refcat_from_table(t, column_map={}, bands={"r": "r_flux"}, mag_columns=False, epoch_year=2016.0,
                            flux_unit="uJy")
    np.testing.assert_allclose(cat["r_flux"], [3631.0, 36310.0], rtol=1e-12)  # µJy -> nJy, round-off only
    assert cat.meta["column_map"] == {"ra": "ra", "dec": "dec"} and cat["ra"][1] == 150.1
    with pytest.raises(ConfigError, match="not a flux density unit"):
        refcat_from_table(t, column_map={}, bands={"r": "r_flux"}, mag_columns=False, epoch_year=2016.0,
                          flux_unit="deg")
    # A column's own unit contradicting --magnitudes is refused either way.
    t["f"] = [3.631, 36.31] * u.uJy
    t["m"] = [20.0, 21.0] * u.ABmag
    with pytest.raises(ConfigError, match="a flux, but the band columns are read as AB magnitudes"):
        refcat_from_table(t, column_map={}, bands={"r": "f"}, mag_columns=True, epoch_year=2016.0)
    with pytest.raises(ConfigError, match="magnitudes; pass --magnitudes"):
        refcat_from_table(t, column_map={}, bands={"r": "m"}, mag_columns=False, epoch_year=2016.0)
    cat = refcat_from_table(t, column_map={}, bands={"r": "m"}, mag_columns=True, epoch_year=2016.0)
    assert cat["r_flux"][0] == pytest.approx(10 ** (-0.4 * (20.0 - AB_MAG_OF_ONE_NJY)), rel=1e-12)
    with pytest.raises(ConfigError, match="no rows"):
        refcat_from_table(t[:0], column_map={}, bands={"r": "f"}, mag_columns=False, epoch_year=2016.0)
    with pytest.raises(ConfigError, match=r"no column 'ra'.*--column ra=COLUMN"):
        refcat_from_table(Table({"RA": [1.0], "dec": [2.0], "f": [1.0] * u.nJy}), column_map={}, bands={"r": "f"},
                          mag_columns=False, epoch_year=2016.0)


def test_same_name_columns_are_taken_only_when_unambiguous() -> None:
    # A text id is not an id (ids become 1..N); an epoch column is used only when mapped, and an
    # MJD given without a unit is refused rather than read as the year 59000.
    t = Table({"id": ["Gaia 1", "Gaia 2"], "ra": [150.0, 150.1], "dec": [2.0, 2.1], "epoch": [59000.0, 59000.0],
               "g": [18.0, 19.0]})
    cat = refcat_from_table(t, column_map={}, bands={"g": "g"}, epoch_year=2016.0)
    assert cat["id"].tolist() == [1, 2] and np.all(cat["epoch"] == 2016.0)
    with pytest.raises(ConfigError, match="gives years 59000 to 59000"):
        refcat_from_table(t, column_map={"epoch": "epoch"}, bands={"g": "g"})
    t["epoch"].unit = u.day  # an MJD, said so: converted
    cat = refcat_from_table(t, column_map={"epoch": "epoch"}, bands={"g": "g"})
    assert cat["epoch"][0] == pytest.approx(2020.41, abs=0.01)  # MJD 59000 = 2020 May 31
    with pytest.raises(ConfigError, match="give one or the other"):
        refcat_from_table(t, column_map={}, bands={"g": "g"}, epoch_year=2016.0, flux_unit="nJy")
