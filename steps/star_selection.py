"""Star selection for the final ("stars") catalogue, and placement of sky sources.

:func:`select_stars` is Rubin's science star selector (calibrateImage
``star_selector``): reject edge / no-data / saturated pixels and failed PSF
fluxes, keep unresolved sources with enough S/N, and always keep sky sources.

"Unresolved" is a significance test on the adaptive size excess over the
PSF, ``e = T_src / T_psf − 1`` (``T = xx + yy``): a point source has
``e ≈ 0`` with a noise ``σ_e ≈ size_noise_coeff / (S/N)`` (≈ 2.5/ν measured
on simulated Kolmogorov stars, 10 ≤ ν ≤ 200), so a source is resolved when
``e > max(max_size_excess_sigma σ_e, min_size_excess_frac)``. Rubin's fixed
cut ``base_ClassificationSizeExtendedness_value < 0.1`` (|e| ≲ 18 % of a
2-px-sigma PSF) is optional: at S/N 10–30 the moment noise is 8–25 %, so the
fixed cut drops ~10 % of real stars (measured: 80 of 732 detected S/N ≥ 10
stars on a demo detector), all of them faint.

:func:`place_sky_sources` is Rubin's ``SkyObjectsTask``: circular apertures of
a fixed radius in regions free of detections, bad pixels and missing data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table

from ..errors import ConfigError
from ..masks import MaskPlane, any_set

_BAD_FLAGS = (
    "base_PixelFlags_flag_edge",
    "base_PixelFlags_flag_nodata",
    "base_PixelFlags_flag_saturated",
    "base_PsfFlux_flag",
)

#: Mask planes a sky source must avoid (Rubin's SkyObjectsTask avoidMask).
SKY_AVOID_PLANES = MaskPlane.DETECTED | MaskPlane.DETECTED_NEGATIVE | MaskPlane.BAD | MaskPlane.NO_DATA


@dataclass(frozen=True)
class StarSelectorConfig:
    """Configuration of :func:`select_stars`."""

    #: Flag columns that reject a source (absent columns are ignored).
    bad_flags: tuple[str, ...] = _BAD_FLAGS
    #: Flux whose S/N is cut (``<flux_field>_instFlux`` / ``_instFluxErr``). Rubin cuts on the
    #: calibration flux (a 12-px compensated top-hat); for a point source its noise area is ~10x
    #: the PSF's, so a S/N >= 10 cut on it drops most stars of PSF S/N 10-30. The PSF flux is the
    #: optimal estimate for the unresolved sources we select.
    flux_field: str = "base_PsfFlux"
    #: Minimum S/N on ``flux_field``. Below 10 on purpose: a star of true PSF S/N 10 is measured
    #: at 10 ± 1, so a cut at 10 keeps only half of them; at 8 ~98 % of S/N >= 10 stars survive the
    #: noise (the ~1 % extra faint galaxies this admits are rejected by the size test).
    min_snr: float = 8.0
    #: Sources with ``base_ClassificationSizeExtendedness_value`` at or above this are resolved and
    #: rejected (Rubin: 0.1). ``None`` (default) disables this noise-blind cut in favour of the
    #: significance test below.
    max_extendedness: float | None = None
    #: Size-excess significance above which a source is resolved (``None`` disables the test).
    #: 3.5 keeps ~99.9 % of clean stars (the excess is Gaussian to ~3σ, with blend tails);
    #: 3 rejects ~20 % more faint galaxies but ~0.3 % more stars (measured on demo detectors).
    max_size_excess_sigma: float | None = 3.5
    #: σ of the size excess ``T/T_psf − 1`` of a point source times its S/N (measured ~2.4–2.6
    #: for adaptive moments of Kolmogorov stars at S/N 10–200).
    size_noise_coeff: float = 2.5
    #: Floor of the size-excess threshold (fraction): bright stars are not rejected for PSF-model
    #: size errors (≲ 1 %) or blending with a faint neighbour (measured up to ~7 %).
    min_size_excess_frac: float = 0.08
    #: Sky sources (``sky_source`` True) are always kept, whatever the cuts.
    keep_sky_sources: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` on invalid values."""
        if not self.min_snr >= 0:
            raise ConfigError(f"star_selector.min_snr must be >= 0, got {self.min_snr}")
        if self.max_extendedness is not None and not 0 < self.max_extendedness <= 1:
            raise ConfigError(f"star_selector.max_extendedness must be in (0, 1] or null, got {self.max_extendedness}")
        if self.max_size_excess_sigma is not None and not self.max_size_excess_sigma > 0:
            raise ConfigError(f"star_selector.max_size_excess_sigma must be > 0 or null, got {self.max_size_excess_sigma}")
        if not self.size_noise_coeff > 0 or not self.min_size_excess_frac >= 0:
            raise ConfigError("star_selector.size_noise_coeff must be > 0 and min_size_excess_frac >= 0")
        if not self.flux_field:
            raise ConfigError("star_selector.flux_field must name a flux (e.g. base_PsfFlux)")


@dataclass(frozen=True, eq=False)
class StarSelection:
    """Which sources are stars.

    Attributes
    ----------
    selected
        Boolean per input row.
    n_selected
        Number of selected rows (sky sources included).
    n_rejected_flags, n_rejected_resolved, n_rejected_snr
        Rows failing each cut (a row may fail several).
    """

    selected: npt.NDArray[np.bool_]
    n_selected: int
    n_rejected_flags: int = 0
    n_rejected_resolved: int = 0
    n_rejected_snr: int = 0


def select_stars(catalog: Table, *, config: StarSelectorConfig = StarSelectorConfig()) -> StarSelection:
    """Select unresolved, unflagged sources with enough S/N (plus every sky source).

    Parameters
    ----------
    catalog
        Measured sources (Rubin column names). Missing flag columns count as unset;
        a missing extendedness column disables the unresolved cut.
    config
        Step configuration.

    Returns
    -------
    StarSelection

    Raises
    ------
    ConfigError
        The configured flux field is not in the catalogue.
    """
    config.validate()
    n = len(catalog)
    flux_col = f"{config.flux_field}_instFlux"
    err_col = f"{config.flux_field}_instFluxErr"
    if n and (flux_col not in catalog.colnames or err_col not in catalog.colnames):
        raise ConfigError(f"star_selector.flux_field={config.flux_field!r}: the catalogue has no {flux_col}/{err_col}; "
                          "measure that flux or choose another field")
    flag_bad = np.zeros(n, bool)
    for name in config.bad_flags:
        if name in catalog.colnames:
            flag_bad |= np.asarray(catalog[name], bool)
    resolved = np.zeros(n, bool)
    ext_col = "base_ClassificationSizeExtendedness_value"
    if config.max_extendedness is not None and ext_col in catalog.colnames:
        ext = np.asarray(catalog[ext_col], float)
        # NaN extendedness (failed moments) fails the test, as in Rubin.
        resolved = ~(ext < config.max_extendedness)
    snr = np.zeros(0)
    if n:
        flux = np.asarray(catalog[flux_col], float)
        err = np.asarray(catalog[err_col], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = flux / err
        low_snr = ~(np.isfinite(snr) & (snr >= config.min_snr))
    else:
        low_snr = np.zeros(0, bool)
    if config.max_size_excess_sigma is not None and n and all(c in catalog.colnames for c in _SIZE_COLUMNS):
        resolved |= _significantly_extended(catalog, snr, config)
    selected = ~(flag_bad | resolved | low_snr)
    if config.keep_sky_sources and "sky_source" in catalog.colnames:
        selected |= np.asarray(catalog["sky_source"], bool)
    return StarSelection(selected, int(selected.sum()), int(flag_bad.sum()), int(resolved.sum()), int(low_snr.sum()))


_SIZE_COLUMNS = ("ext_shapeHSM_HsmSourceMoments_xx", "ext_shapeHSM_HsmSourceMoments_yy",
                 "ext_shapeHSM_HsmPsfMoments_xx", "ext_shapeHSM_HsmPsfMoments_yy")


def size_excess(catalog: Table) -> npt.NDArray[np.float64]:
    """``T / T_psf - 1`` of every source (HSM source and PSF moments; NaN where they failed)."""
    t_src = np.asarray(catalog[_SIZE_COLUMNS[0]], float) + np.asarray(catalog[_SIZE_COLUMNS[1]], float)
    t_psf = np.asarray(catalog[_SIZE_COLUMNS[2]], float) + np.asarray(catalog[_SIZE_COLUMNS[3]], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(t_src / t_psf - 1.0)


def _significantly_extended(catalog: Table, snr: npt.NDArray[np.float64],
                            config: StarSelectorConfig) -> npt.NDArray[np.bool_]:
    """Size excess over the PSF larger than its noise allows (NaN sizes count as resolved)."""
    excess = size_excess(catalog)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = config.size_noise_coeff / np.where(snr > 0, snr, np.nan)
    assert config.max_size_excess_sigma is not None
    limit = np.maximum(config.max_size_excess_sigma * sigma, config.min_size_excess_frac)
    # Failed moments (NaN) are not accepted as point sources, as Rubin's NaN extendedness.
    return ~(np.isfinite(excess) & np.isfinite(limit) & (excess <= limit))


def place_sky_sources(mask: npt.NDArray[np.integer], *, n_sources: int = 100, radius_pix: float = 8.0,
                      seed: int = 0, origin: tuple[int, int] = (0, 0), n_trials_factor: int = 5) -> Table:
    """Positions of up to ``n_sources`` source-free circular apertures.

    Random trial centres (``n_trials_factor × n_sources``, seeded) are kept
    when no pixel within ``radius_pix`` has DETECTED, DETECTED_NEGATIVE, BAD
    or NO_DATA set, the aperture lies inside the image, and it does not
    overlap an aperture already kept.

    Parameters
    ----------
    mask
        ``(ny, nx)`` mask plane array of the exposure.
    n_sources, radius_pix, seed
        Number wanted, aperture radius (pixels) and random seed.
    origin
        Parent coordinates of array pixel ``[0, 0]``.
    n_trials_factor
        Trial positions per wanted source (Rubin: 5).

    Returns
    -------
    Table
        Columns ``x``, ``y`` (parent pixels); possibly fewer rows than asked
        in crowded images, and none for an all-masked image.
    """
    if n_sources < 0 or not radius_pix > 0 or n_trials_factor < 1:
        raise ConfigError("place_sky_sources needs n_sources >= 0, radius_pix > 0 and n_trials_factor >= 1")
    ny, nx = mask.shape
    out = Table({"x": np.zeros(0), "y": np.zeros(0)})
    r = int(np.ceil(radius_pix))
    if n_sources == 0 or nx <= 2 * r or ny <= 2 * r:
        out["x"].unit = out["y"].unit = u.pix
        return out
    rng = np.random.default_rng(seed)
    n_trials = n_sources * n_trials_factor
    cx = rng.integers(r, nx - r, n_trials)
    cy = rng.integers(r, ny - r, n_trials)
    # Offsets inside the disc, tested for every trial at once (no full-image morphology needed).
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    disc = ox**2 + oy**2 <= radius_pix**2
    ox, oy = ox[disc], oy[disc]
    bad = any_set(mask[cy[:, None] + oy[None, :], cx[:, None] + ox[None, :]], SKY_AVOID_PLANES).any(axis=1)
    kept_x: list[int] = []
    kept_y: list[int] = []
    min_sep2 = (2.0 * radius_pix) ** 2
    for x, y in zip(cx[~bad], cy[~bad], strict=True):
        if len(kept_x) >= n_sources:
            break
        if kept_x and np.min((np.asarray(kept_x) - x) ** 2 + (np.asarray(kept_y) - y) ** 2) < min_sep2:
            continue
        kept_x.append(int(x))
        kept_y.append(int(y))
    out = Table({"x": np.asarray(kept_x, float) + origin[0], "y": np.asarray(kept_y, float) + origin[1]})
    out["x"].unit = out["y"].unit = u.pix
    return out
