"""Configuration of the survey simulator: camera, visits, sky populations, defects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from singleframe.errors import ConfigError

#: Bands for which the simulator knows stellar and galaxy colours.
SIM_BANDS = ("g", "r", "i")


@dataclass(frozen=True)
class VisitSpec:
    """One visit of the simulated survey.

    Attributes
    ----------
    visit
        Visit id (shared by its snaps).
    band
        One of :data:`SIM_BANDS`.
    mjd_tai
        Mid-point of the visit (MJD, TAI); snaps are centred around it.
    boresight_ra_deg, boresight_dec_deg, rotation_deg
        TRUE pointing and rotation (position angle of focal-plane +y, east of north).
    n_snaps
        1 or 2; each snap gets ``exposure_time_s / n_snaps``.
    exposure_time_s
        Total open-shutter time of the visit.
    seeing_fwhm_arcsec
        PSF FWHM at the reference field radius (varies slightly over the field).
    sky_counts_per_pixel
        Sky level of ONE snap at the optical axis (counts).
    calibration_njy_per_count
        Photometric calibration of the COMBINED visit image (nJy per count);
        each snap holds ``1 / n_snaps`` of the counts.
    pointing_error_arcsec
        ``(east, north)`` offset of the header boresight from the true one.
    rotation_error_deg
        Header rotation angle minus the true one.
    airmass
        Recorded in the visit info only.
    """

    visit: int
    band: str
    mjd_tai: float
    boresight_ra_deg: float
    boresight_dec_deg: float
    rotation_deg: float = 0.0
    n_snaps: int = 1
    exposure_time_s: float = 30.0
    seeing_fwhm_arcsec: float = 0.8
    sky_counts_per_pixel: float = 800.0
    calibration_njy_per_count: float = 2.0
    pointing_error_arcsec: tuple[float, float] = (2.0, -1.5)
    rotation_error_deg: float = 0.01
    airmass: float = 1.2

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the visit cannot be simulated."""
        if self.band not in SIM_BANDS:
            raise ConfigError(f"visit {self.visit}: band {self.band!r} is not simulated; use one of {SIM_BANDS}")
        if self.n_snaps not in (1, 2):
            raise ConfigError(f"visit {self.visit}: n_snaps must be 1 or 2, got {self.n_snaps}")
        for name in ("exposure_time_s", "seeing_fwhm_arcsec", "sky_counts_per_pixel", "calibration_njy_per_count"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"visit {self.visit}: {name} must be positive and finite, got {value}")
        if not -89.0 < self.boresight_dec_deg < 89.0:
            raise ConfigError(f"visit {self.visit}: boresight_dec_deg must lie within ±89°, got {self.boresight_dec_deg}")
        if len(self.pointing_error_arcsec) != 2:
            raise ConfigError(f"visit {self.visit}: pointing_error_arcsec must be (east, north)")

    @property
    def snap_time_s(self) -> float:
        """Exposure time of one snap."""
        return self.exposure_time_s / self.n_snaps


def _demo_visits() -> tuple[VisitSpec, ...]:
    # Visit 1: two 15 s snaps in r; visit 2: one 30 s snap in i, dithered by ~1'
    # and rotated, so a refcat shared by both must cover two different footprints.
    return (
        VisitSpec(visit=1, band="r", mjd_tai=60800.10, boresight_ra_deg=150.0, boresight_dec_deg=2.2,
                  rotation_deg=0.0, n_snaps=2, exposure_time_s=30.0, seeing_fwhm_arcsec=0.8,
                  sky_counts_per_pixel=400.0, calibration_njy_per_count=2.0,
                  pointing_error_arcsec=(2.0, -1.5), rotation_error_deg=0.01),
        VisitSpec(visit=2, band="i", mjd_tai=60801.15, boresight_ra_deg=150.012, boresight_dec_deg=2.215,
                  rotation_deg=12.0, n_snaps=1, exposure_time_s=30.0, seeing_fwhm_arcsec=0.7,
                  sky_counts_per_pixel=1000.0, calibration_njy_per_count=2.4,
                  pointing_error_arcsec=(-3.0, 2.5), rotation_error_deg=-0.02),
    )


@dataclass(frozen=True)
class SimulationConfig:
    """A small simulated survey (defaults: 2x2 detectors of 2048², two visits).

    Densities are per square degree on the sky; magnitudes are AB in r.
    Every random draw derives from ``seed`` (and visit/detector ids), so the
    same config always produces the same pixels.
    """

    instrument: str = "SimCam"
    #: Detectors per side of the square mosaic.
    n_side: int = 2
    #: Detector width and height (pixels).
    nx: int = 2048
    ny: int = 2048
    pixel_size_mm: float = 0.01
    #: 20 arcsec/mm × 0.01 mm = 0.2 arcsec/pixel.
    plate_scale_arcsec_per_mm: float = 20.0
    gap_mm: float = 1.0
    #: Cubic radial distortion; 8e-7/mm² moves the 2x2 mosaic's corners (r ≈ 30 mm) by ~2 px.
    distortion_k3_per_mm2: float = 8.0e-7
    gain_e_per_count: float = 1.5
    read_noise_e: float = 5.0
    saturation_count: float = 50000.0
    visits: tuple[VisitSpec, ...] = field(default_factory=_demo_visits)
    #: ~2000 stars with r = 16–24 on a 2048² detector at 0.2"/px (0.0129 deg²).
    star_density_per_deg2: float = 1.55e5
    star_mag_range: tuple[float, float] = (16.0, 24.0)
    #: Slope of log10 dN/dm of the star counts.
    star_count_slope_dex_per_mag: float = 0.25
    #: ~3 saturated stars (with bleed trails) per 2048² detector.
    bright_star_density_per_deg2: float = 230.0
    bright_star_mag_range: tuple[float, float] = (13.0, 14.0)
    galaxy_density_per_deg2: float = 4.0e4
    galaxy_mag_range: tuple[float, float] = (19.0, 24.5)
    galaxy_count_slope_dex_per_mag: float = 0.35
    #: Fraction of galaxies drawn with a de Vaucouleurs profile (the rest exponential).
    galaxy_devaucouleurs_fraction: float = 0.3
    #: Cosmic rays per snap per million pixels (~30 per 2048² snap).
    cr_density_per_snap_per_mpix: float = 7.0
    #: Truth CR pixels are those whose deposit exceeds this many sigma of the visit noise.
    cr_truth_nsigma: float = 5.0
    n_bad_columns: int = 2
    #: Peak-to-peak fractional PSF FWHM change from the optical axis to the field edge.
    psf_fwhm_variation_frac: float = 0.04
    #: Largest PSF ellipticity (distortion, (a²-b²)/(a²+b²)) at the field edge.
    psf_ellipticity_max: float = 0.05
    #: Sky level change per mm of focal-plane x (fraction of the level at the axis).
    sky_gradient_frac_per_mm: float = 0.001
    #: Faintest r magnitude in the reference catalogue.
    refcat_mag_limit: float = 22.5
    #: Sky margin around every visit's field covered by the reference catalogue.
    refcat_margin_arcsec: float = 60.0
    refcat_epoch_year: float = 2016.0
    refcat_position_err_mas: tuple[float, float] = (1.0, 5.0)
    refcat_flux_err_frac: tuple[float, float] = (0.005, 0.01)
    #: Proper-motion scatter per axis; a ``fast_pm_fraction`` of stars move up to 50 mas/yr.
    pm_sigma_mas_per_yr: float = 4.0
    fast_pm_fraction: float = 0.02
    fast_pm_max_mas_per_yr: float = 50.0
    #: Bandpass mismatch: in-system mag = refcat mag + term × ((g−r) − pivot). 0 = off.
    color_term_mag_per_mag: float = 0.0
    color_term_pivot_g_r: float = 0.7
    seed: int = 42

    def validate(self) -> None:
        """Raise :class:`ConfigError` if the survey cannot be simulated."""
        for name in ("n_side", "nx", "ny"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if min(self.nx, self.ny) < 64:
            raise ConfigError(f"detectors must be at least 64x64 pixels, got {self.nx}x{self.ny}")
        for name in ("pixel_size_mm", "plate_scale_arcsec_per_mm", "gain_e_per_count", "saturation_count"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.read_noise_e < 0:
            raise ConfigError(f"read_noise_e must be ≥ 0, got {self.read_noise_e}")
        if not self.visits:
            raise ConfigError("visits is empty: give at least one VisitSpec")
        ids = [v.visit for v in self.visits]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"visit ids must be unique, got {ids}")
        for v in self.visits:
            v.validate()
        for name in ("star_mag_range", "bright_star_mag_range", "galaxy_mag_range",
                     "refcat_position_err_mas", "refcat_flux_err_frac"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ConfigError(f"{name} must be (low, high) with low ≤ high, got {(lo, hi)}")
        for name in ("star_density_per_deg2", "bright_star_density_per_deg2", "galaxy_density_per_deg2",
                     "cr_density_per_snap_per_mpix", "n_bad_columns", "psf_fwhm_variation_frac",
                     "psf_ellipticity_max", "pm_sigma_mas_per_yr", "fast_pm_max_mas_per_yr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.galaxy_devaucouleurs_fraction <= 1 or not 0 <= self.fast_pm_fraction <= 1:
            raise ConfigError("galaxy_devaucouleurs_fraction and fast_pm_fraction must lie in [0, 1]")
        if self.psf_ellipticity_max >= 0.5:
            raise ConfigError(f"psf_ellipticity_max must be < 0.5, got {self.psf_ellipticity_max}")
        if self.psf_fwhm_variation_frac >= 0.5:
            raise ConfigError(f"psf_fwhm_variation_frac must be < 0.5, got {self.psf_fwhm_variation_frac}")
        # One star population covers all visits: keep the fields together on the sky.
        ra0, dec0 = self.visits[0].boresight_ra_deg, self.visits[0].boresight_dec_deg
        for v in self.visits[1:]:
            if _separation_deg(ra0, dec0, v.boresight_ra_deg, v.boresight_dec_deg) > 2.0:
                raise ConfigError(
                    f"visit {v.visit} is more than 2° from visit {self.visits[0].visit}; "
                    "simulate widely separated fields as separate surveys"
                )

    def visit(self, visit_id: int) -> VisitSpec:
        """The :class:`VisitSpec` with id ``visit_id``."""
        for v in self.visits:
            if v.visit == visit_id:
                return v
        raise ConfigError(f"no visit {visit_id} in the simulation; visits are {[v.visit for v in self.visits]}")

    @property
    def pixel_scale_arcsec(self) -> float:
        """Nominal pixel scale (no distortion)."""
        return self.plate_scale_arcsec_per_mm * self.pixel_size_mm


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


_FIELD_DENSITY_FACTORS = {"typical": 1.0, "sparse": 0.2, "crowded": 5.0}


def benchmark_config(size: int = 4096, field: str = "typical", seeing_arcsec: float = 0.8, *,
                     seed: int = 7) -> SimulationConfig:
    """A one-detector, one-visit, one-snap survey for timing the pipeline.

    Parameters
    ----------
    size
        Detector width and height (pixels).
    field
        ``"typical"`` (the demo densities), ``"sparse"`` (×0.2) or ``"crowded"`` (×5).
    seeing_arcsec
        PSF FWHM.
    seed
        Random seed.

    Raises
    ------
    ConfigError
        For an unknown ``field``.
    """
    if field not in _FIELD_DENSITY_FACTORS:
        raise ConfigError(f"unknown benchmark field {field!r}; choose one of {sorted(_FIELD_DENSITY_FACTORS)}")
    if size < 64:
        raise ConfigError(f"benchmark detectors must be at least 64 pixels on a side, got {size}")
    f = _FIELD_DENSITY_FACTORS[field]
    base = SimulationConfig()
    visit = VisitSpec(visit=100, band="r", mjd_tai=60800.2, boresight_ra_deg=210.0, boresight_dec_deg=-12.0,
                      rotation_deg=5.0, n_snaps=1, exposure_time_s=30.0, seeing_fwhm_arcsec=seeing_arcsec,
                      sky_counts_per_pixel=800.0, calibration_njy_per_count=2.0,
                      pointing_error_arcsec=(2.5, -2.0), rotation_error_deg=0.015)
    cfg = replace(base, n_side=1, nx=size, ny=size, visits=(visit,), seed=seed,
                  star_density_per_deg2=base.star_density_per_deg2 * f,
                  galaxy_density_per_deg2=base.galaxy_density_per_deg2 * f,
                  # A single detector sits on the axis: scale k3 so its corners move by ~2 px at any size.
                  distortion_k3_per_mm2=8.0e-7 * (4096.0 / size) ** 3)
    cfg.validate()
    return cfg
