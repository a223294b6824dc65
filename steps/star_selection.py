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

Where a reference catalogue of stars is complete, it is a star list: a source
it does not hold, but would if the source were a star of that flux, is most
likely a compact galaxy (:func:`reference_prior`, on by default with
``use_reference_catalog``). Such sources face a stricter size test (1σ instead
of 3.5σ); the sources it holds, and everything fainter than its completeness,
face the size test alone. On the simulated 4096² poor-seeing frame, whose faint
galaxies are barely larger than the 1.3″ PSF, this takes the contaminants from
3.9 % to 1.4 % at the same recovery. Rubin's calibrateImage uses the reference
catalogue for astrometry and photometry only.

:func:`place_sky_sources` is Rubin's ``SkyObjectsTask``: circular apertures of
a fixed radius in regions free of detections, bad pixels and missing data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from ..errors import ConfigError
from ..masks import MaskPlane, any_set
from ..photo_calib import njy_to_ab_mag

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
    #: Use the reference catalogue as a star list where it is complete (:func:`reference_prior`):
    #: a source brighter than the catalogue's completeness magnitude that matches no reference
    #: star must pass the stricter ``unmatched_max_size_excess_sigma``. Off, or without a
    #: reference catalogue, the size test alone decides.
    use_reference_catalog: bool = True
    #: Smallest match radius (arcsec) between a source and the reference star that vouches for it.
    #: 0.4″ is ~5σ of a S/N 10 centroid in 1.4″ seeing and < the 2–5 px offset of the blends of
    #: two sources that pass the size test (measured on the poor-seeing frame).
    reference_match_radius_arcsec: float = 0.4
    #: The radius of each source is this many times its position error, where that is larger
    #: than the floor above: its centroid error and the scatter of the bright sources' matches
    #: (the WCS fit, proper motions), in quadrature; never beyond ``max(2″, 3 × floor)``. 5, not
    #: 3–4: the scatter has tails (LCO 1 m frame against Gaia DR2, affine WCS: 0.13″ per axis from
    #: the median, 95th percentile 0.56″), and a star beyond the radius faces the stricter test.
    reference_match_sigma: float = 5.0
    #: Magnitude (the reference catalogue's, in the exposure's band) to which the catalogue is
    #: taken as complete. ``None``: the turnover of its number counts on the detector
    #: (:func:`reference_complete_mag`).
    reference_complete_mag: float | None = None
    #: Size-excess significance above which an unmatched source in the complete range is
    #: resolved. 1.0 keeps 84 % of such point sources (variables, movers, stars the catalogue
    #: lacks) and rejects most compact galaxies, which the catalogue would not list as stars.
    unmatched_max_size_excess_sigma: float = 1.0
    #: The prior is applied only when at least this fraction of the S/N ≥ 50 sources in the
    #: complete range that pass the size test match a reference star (else the catalogue's
    #: positions or depth do not fit the image, and the size test alone decides). A wrong WCS
    #: or epoch matches a few % by chance; a fitting catalogue 99.9–100 % on the simulated
    #: frames, and less where compact galaxies pass the size test at S/N 50 (a floor of 8 %).
    reference_min_matched_fraction: float = 0.5
    #: ... and when the detector holds at least this many reference stars with a flux.
    reference_min_stars: int = 30

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
        if (not self.reference_match_radius_arcsec > 0 or not self.unmatched_max_size_excess_sigma > 0
                or not self.reference_match_sigma > 0):
            raise ConfigError("star_selector.reference_match_radius_arcsec, reference_match_sigma and "
                              "unmatched_max_size_excess_sigma must be > 0")
        if not 0 <= self.reference_min_matched_fraction <= 1 or self.reference_min_stars < 1:
            raise ConfigError("star_selector.reference_min_matched_fraction must be in [0, 1] and "
                              "reference_min_stars >= 1")
        if self.reference_complete_mag is not None and not math.isfinite(self.reference_complete_mag):
            raise ConfigError("star_selector.reference_complete_mag must be a finite magnitude or null")


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
    n_rejected_unmatched
        Rows that pass the size test but fail the stricter one of unmatched sources in the
        reference catalogue's complete range (part of ``n_rejected_resolved``).
    """

    selected: npt.NDArray[np.bool_]
    n_selected: int
    n_rejected_flags: int = 0
    n_rejected_resolved: int = 0
    n_rejected_snr: int = 0
    n_rejected_unmatched: int = 0


@dataclass(frozen=True, eq=False)
class ReferencePrior:
    """What the reference catalogue says of each source (:func:`reference_prior`).

    Attributes
    ----------
    matched
        Per row: a reference star lies within the match radius.
    unmatched_complete
        Per row: no reference star within the radius, and a point source of this flux would be
        brighter than ``complete_mag``: the catalogue would list it if it were a star.
    applied
        Whether :func:`select_stars` uses it (False: see ``reason``).
    complete_mag, zero_point_mag
        The catalogue's completeness magnitude and ``ref mag − instrumental PSF mag`` of the
        matched sources (NaN when not measured).
    matched_fraction
        Of the unflagged S/N ≥ 50 point sources in the complete range, the fraction matched.
    n_reference
        Reference stars with a flux on the detector.
    reason
        Why it is not applied ("" when it is).
    match_sigma_arcsec
        The systematic position scatter (per axis) of the matches, from the bright sources.
    """

    matched: npt.NDArray[np.bool_]
    unmatched_complete: npt.NDArray[np.bool_]
    applied: bool
    complete_mag: float = math.nan
    zero_point_mag: float = math.nan
    matched_fraction: float = math.nan
    n_reference: int = 0
    reason: str = ""
    match_sigma_arcsec: float = math.nan

    def diagnostics(self) -> dict[str, object]:
        """Scalars for the stage's metadata (``reference_prior.*``)."""
        return {"applied": bool(self.applied), "complete_mag": float(self.complete_mag),
                "zero_point_mag": float(self.zero_point_mag), "matched_fraction": float(self.matched_fraction),
                "n_reference": int(self.n_reference), "n_matched": int(np.count_nonzero(self.matched)),
                "n_unmatched_complete": int(np.count_nonzero(self.unmatched_complete)), "reason": self.reason,
                "match_sigma_arcsec": float(self.match_sigma_arcsec)}


def select_stars(catalog: Table, *, config: StarSelectorConfig = StarSelectorConfig(),
                 prior: ReferencePrior | None = None) -> StarSelection:
    """Select unresolved, unflagged sources with enough S/N (plus every sky source).

    Parameters
    ----------
    catalog
        Measured sources (Rubin column names). Missing flag columns count as unset;
        a missing extendedness column disables the unresolved cut.
    config
        Step configuration.
    prior
        :func:`reference_prior` of ``catalog``: when applied, its ``unmatched_complete`` rows
        must pass the size test at ``config.unmatched_max_size_excess_sigma``.

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
    if prior is not None and len(prior.matched) != n:
        raise ValueError(f"the reference prior has {len(prior.matched)} rows, the catalogue {n}")
    flag_bad = _flagged(catalog, config)
    resolved = np.zeros(n, bool)
    ext_col = "base_ClassificationSizeExtendedness_value"
    if config.max_extendedness is not None and ext_col in catalog.colnames:
        ext = np.asarray(catalog[ext_col], float)
        # NaN extendedness (failed moments) fails the test, as in Rubin.
        resolved = ~(ext < config.max_extendedness)
    snr = _snr(catalog, config)
    low_snr = ~(np.isfinite(snr) & (snr >= config.min_snr))
    n_unmatched = 0
    if config.max_size_excess_sigma is not None and n and all(c in catalog.colnames for c in _SIZE_COLUMNS):
        extended = _significantly_extended(catalog, snr, config, config.max_size_excess_sigma)
        if prior is not None and prior.applied:
            strict = _significantly_extended(catalog, snr, config, config.unmatched_max_size_excess_sigma)
            unmatched = np.asarray(prior.unmatched_complete, bool) & strict & ~extended
            n_unmatched = int(np.count_nonzero(unmatched & ~flag_bad & ~low_snr))
            extended |= unmatched
        resolved |= extended
    selected = ~(flag_bad | resolved | low_snr)
    if config.keep_sky_sources and "sky_source" in catalog.colnames:
        selected |= np.asarray(catalog["sky_source"], bool)
    return StarSelection(selected, int(selected.sum()), int(flag_bad.sum()), int(resolved.sum()), int(low_snr.sum()),
                         n_unmatched)


def _flagged(catalog: Table, config: StarSelectorConfig) -> npt.NDArray[np.bool_]:
    """Rows with any of ``config.bad_flags`` set (absent columns count as unset)."""
    bad = np.zeros(len(catalog), bool)
    for name in config.bad_flags:
        if name in catalog.colnames:
            bad |= np.asarray(catalog[name], bool)
    return bad


def _snr(catalog: Table, config: StarSelectorConfig) -> npt.NDArray[np.float64]:
    """S/N of ``config.flux_field`` (NaN where undefined); :class:`ConfigError` if it is not measured."""
    flux_col = f"{config.flux_field}_instFlux"
    err_col = f"{config.flux_field}_instFluxErr"
    if not len(catalog):
        return np.zeros(0)
    if flux_col not in catalog.colnames or err_col not in catalog.colnames:
        raise ConfigError(f"star_selector.flux_field={config.flux_field!r}: the catalogue has no {flux_col}/{err_col}; "
                          "measure that flux or choose another field")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.asarray(catalog[flux_col], float) / np.asarray(catalog[err_col], float))


_SIZE_COLUMNS = ("ext_shapeHSM_HsmSourceMoments_xx", "ext_shapeHSM_HsmSourceMoments_yy",
                 "ext_shapeHSM_HsmPsfMoments_xx", "ext_shapeHSM_HsmPsfMoments_yy")


def size_excess(catalog: Table) -> npt.NDArray[np.float64]:
    """``T / T_psf - 1`` of every source (HSM source and PSF moments; NaN where they failed)."""
    t_src = np.asarray(catalog[_SIZE_COLUMNS[0]], float) + np.asarray(catalog[_SIZE_COLUMNS[1]], float)
    t_psf = np.asarray(catalog[_SIZE_COLUMNS[2]], float) + np.asarray(catalog[_SIZE_COLUMNS[3]], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(t_src / t_psf - 1.0)


def _significantly_extended(catalog: Table, snr: npt.NDArray[np.float64], config: StarSelectorConfig,
                            max_sigma: float) -> npt.NDArray[np.bool_]:
    """Size excess over the PSF above ``max_sigma`` times its noise (NaN sizes count as resolved)."""
    excess = size_excess(catalog)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = config.size_noise_coeff / np.where(snr > 0, snr, np.nan)
    limit = np.maximum(max_sigma * sigma, config.min_size_excess_frac)
    # Failed moments (NaN) are not accepted as point sources, as Rubin's NaN extendedness.
    return ~(np.isfinite(excess) & np.isfinite(limit) & (excess <= limit))


def reference_complete_mag(ref_mag: npt.NDArray[np.float64], *, bin_mag: float = 0.25) -> float:
    """The magnitude to which a reference catalogue is complete: the turnover of its counts.

    Star counts rise towards faint magnitudes until the catalogue's completeness falls; the
    bin (``bin_mag`` wide, counted from the faintest star) with the most stars holds the
    turnover, and its bright edge is returned. For a catalogue cut at magnitude *m* that is
    *m* − ``bin_mag``; for a catalogue whose completeness rolls off (Gaia near G ≈ 21) it is
    where the roll-off starts to win over the rising counts. NaN without finite magnitudes.
    """
    m = np.asarray(ref_mag, float)
    m = m[np.isfinite(m)]
    if not m.size:
        return math.nan
    # Bins counted down from the faintest star, so that a hard cut fills the last one.
    k = np.floor((m.max() - m) / bin_mag).astype(np.int64)
    counts = np.bincount(k)
    peak = int(np.flatnonzero(counts == counts.max()).min())  # the faintest of equal bins
    return float(m.max() - (peak + 1) * bin_mag)


def reference_prior(catalog: Table, refcat: Table, *, wcs: WCS, origin: tuple[int, int], shape: tuple[int, int],
                    band: str, config: StarSelectorConfig = StarSelectorConfig(),
                    like: ReferencePrior | None = None) -> ReferencePrior:
    """Match the sources to the reference stars and find those the catalogue should have listed.

    A reference catalogue of stars (Gaia, or any catalogue ingested as ``refcat``) is a star
    list down to its completeness magnitude. A source that matches none of its stars within
    ``config.reference_match_sigma`` times its position error (at least
    ``config.reference_match_radius_arcsec``) but would, as a point source, be brighter than that
    magnitude is most likely not a star: :func:`select_stars` holds it to a stricter size test.

    The instrumental PSF magnitudes are put on the catalogue's scale by the median offset of
    the matched S/N ≥ 20 sources; the completeness magnitude is
    ``config.reference_complete_mag`` or :func:`reference_complete_mag` of the reference stars
    on the detector. The prior is not applied (``applied`` False, with a ``reason``) when the
    catalogue has no flux in ``band``, holds fewer than ``config.reference_min_stars`` stars on
    the detector, too few sources match to set the scale, or fewer than
    ``config.reference_min_matched_fraction`` of the S/N ≥ 50 point sources in the complete
    range match (the positions or the depth do not fit this image).

    Parameters
    ----------
    catalog
        Measured sources (``base_SdssCentroid_x/_y`` in parent pixels, ``config.flux_field``).
    refcat
        ``ra``, ``dec`` (deg, at the epoch of the exposure) and ``<band>_flux`` (nJy).
    wcs, origin, shape
        The fitted WCS (array pixels), the parent coordinates of array pixel ``[0, 0]`` and
        the ``(ny, nx)`` shape of the detector.
    band
        The exposure's band.
    config
        Step configuration.
    like
        The prior of another catalogue of the same exposure (the main detection pass): its
        zero point, completeness and decision are reused, only the matches are new (for a few
        sources, e.g. the residual search around bright stars, that could not set them).
    """
    config.validate()
    n = len(catalog)
    none = np.zeros(n, bool)

    def skip(reason: str, **known: float) -> ReferencePrior:
        return ReferencePrior(none, none.copy(), False, reason=reason, **known)  # type: ignore[arg-type]

    flux_col = f"{band}_flux"
    if flux_col not in refcat.colnames:
        return skip(f"the reference catalogue has no {flux_col}")
    if not n:
        return skip("no sources")
    ref_flux = np.asarray(refcat[flux_col], float)
    rx, ry = wcs.all_world2pix(np.asarray(refcat["ra"], float), np.asarray(refcat["dec"], float), 0)
    ok = np.isfinite(rx) & np.isfinite(ry) & np.isfinite(ref_flux) & (ref_flux > 0)
    rx, ry, ref_flux = rx[ok] + origin[0], ry[ok] + origin[1], ref_flux[ok]
    ref_mag = njy_to_ab_mag(ref_flux)
    ny, nx = shape
    on = (rx >= origin[0] - 0.5) & (rx < origin[0] + nx - 0.5) & (ry >= origin[1] - 0.5) & (ry < origin[1] + ny - 0.5)
    n_ref = int(np.count_nonzero(on))
    if n_ref < config.reference_min_stars:
        return skip(f"{n_ref} reference stars on the detector (< reference_min_stars={config.reference_min_stars})",
                    n_reference=n_ref)
    snr = _snr(catalog, config)
    bad = _flagged(catalog, config)
    matched, j, match_sigma = _match_reference(catalog, snr, bad, rx, ry, wcs, config,
                                               None if like is None else like.match_sigma_arcsec)
    flux = np.asarray(catalog[f"{config.flux_field}_instFlux"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        inst_mag = -2.5 * np.log10(np.where(flux > 0, flux, np.nan))
    if like is not None:
        if not like.applied:
            return skip(like.reason, complete_mag=like.complete_mag, zero_point_mag=like.zero_point_mag,
                        n_reference=n_ref)
        in_complete = np.isfinite(inst_mag) & (inst_mag + like.zero_point_mag < like.complete_mag)
        return ReferencePrior(matched, in_complete & ~matched, True, like.complete_mag, like.zero_point_mag,
                              like.matched_fraction, n_ref, match_sigma_arcsec=match_sigma)
    complete = (float(config.reference_complete_mag) if config.reference_complete_mag is not None
                else reference_complete_mag(ref_mag[on]))
    scale_rows = matched & (snr >= 20) & np.isfinite(inst_mag) & (ref_mag[j] < complete)
    if np.count_nonzero(scale_rows) < 5:
        return skip(f"{int(np.count_nonzero(scale_rows))} matched S/N >= 20 sources (< 5) to put the fluxes on "
                    "the reference scale", complete_mag=complete, n_reference=n_ref)
    zp = float(np.median(ref_mag[j[scale_rows]] - inst_mag[scale_rows]))
    in_complete = np.isfinite(inst_mag) & (inst_mag + zp < complete)

    point_like = ~bad & (snr >= 50) & in_complete
    if config.max_size_excess_sigma is not None and all(c in catalog.colnames for c in _SIZE_COLUMNS):
        point_like &= ~_significantly_extended(catalog, snr, config, config.max_size_excess_sigma)
    known = {"complete_mag": complete, "zero_point_mag": zp, "n_reference": n_ref, "match_sigma_arcsec": match_sigma}
    if not point_like.any():
        return skip("no unflagged S/N >= 50 point source in the complete range to check the match on", **known)
    frac = float(np.mean(matched[point_like]))
    if frac < config.reference_min_matched_fraction:
        return skip(f"only {100 * frac:.0f} % of the S/N >= 50 point sources in the complete range match a reference "
                    f"star (< reference_min_matched_fraction={config.reference_min_matched_fraction}): the "
                    "catalogue's positions or depth do not fit this image", matched_fraction=frac, **known)
    return ReferencePrior(matched, in_complete & ~matched, True, complete, zp, frac, n_ref, match_sigma_arcsec=match_sigma)


def _match_reference(catalog: Table, snr: npt.NDArray[np.float64], bad: npt.NDArray[np.bool_],
                     rx: npt.NDArray[np.float64], ry: npt.NDArray[np.float64], wcs: WCS, config: StarSelectorConfig,
                     sys_sigma: float | None = None
                     ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], float]:
    """Whether each source lies within its match radius of its nearest reference star, that
    star's index, and the systematic scatter used.

    The radius is ``reference_match_sigma`` times the source's position error (centroid error
    and the systematic scatter, per axis, of the unflagged (not ``bad``) S/N ≥ 50 sources'
    nearest reference stars, in quadrature), clipped to ``[reference_match_radius_arcsec,
    max(2″, 3 × that)]``. A given
    ``sys_sigma`` (arcsec, e.g. the main pass's) replaces the scatter of this catalogue's sources.
    """
    n = len(catalog)
    scale_arcsec = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    floor = config.reference_match_radius_arcsec
    search = max(2.0, 3.0 * floor)
    x = np.asarray(catalog["base_SdssCentroid_x"], float)
    y = np.asarray(catalog["base_SdssCentroid_y"], float)
    good = np.isfinite(x) & np.isfinite(y)
    d_arcsec = np.full(n, np.inf)
    j = np.zeros(n, np.int64)
    if rx.size and good.any():
        d, jj = cKDTree(np.column_stack([rx, ry])).query(np.column_stack([x[good], y[good]]),
                                                          distance_upper_bound=search / scale_arcsec)
        d_arcsec[good] = d * scale_arcsec
        j[good] = np.where(np.isfinite(d), jj, 0)
    if sys_sigma is None or not math.isfinite(sys_sigma):
        bright = np.isfinite(d_arcsec) & (snr >= 50) & ~bad
        # Median of a 2-D Gaussian offset's length is 1.1774 sigma per axis.
        sys_sigma = float(np.median(d_arcsec[bright]) / 1.1774) if np.count_nonzero(bright) >= 5 else 0.0
    cen = np.zeros(n)
    if "base_SdssCentroid_xErr" in catalog.colnames and "base_SdssCentroid_yErr" in catalog.colnames:
        ex = np.asarray(catalog["base_SdssCentroid_xErr"], float)
        ey = np.asarray(catalog["base_SdssCentroid_yErr"], float)
        cen = np.nan_to_num(np.sqrt(0.5 * (ex**2 + ey**2)) * scale_arcsec, nan=0.0, posinf=0.0)
    radius = np.clip(config.reference_match_sigma * np.hypot(sys_sigma, cen), floor, search)
    return d_arcsec <= radius, j, sys_sigma


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
