"""Propagate PSF-star and astrometry flags from the PSF-star catalogue to the stars catalogue.

Rubin's ``_match_psf_stars`` matches by pixel position and silently discards
matches to deblended parents, so a PSF star that lies in a blend loses its
flags. Here every star is a candidate: a leaf (``deblend_nChild == 0``: an
isolated source or a deblended child) is preferred, a parent is used only
when no leaf lies within the radius, and both that fallback and stars matched
by more than one PSF star are counted in the result, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from scipy.spatial import cKDTree

from ..errors import ConfigError, NoPsfStarsToStarsMatchError

#: Boolean flags copied from the PSF stars (absent columns are copied as False).
PROPAGATED_FLAGS = (
    "calib_psf_candidate",
    "calib_psf_used",
    "calib_psf_reserved",
    "calib_astrometry_used",
    "apcorr_base_PsfFlux_used",
    "apcorr_base_GaussianFlux_used",
)


@dataclass(frozen=True, eq=False)
class FlagPropagationResult:
    """Stars with the propagated flags.

    Attributes
    ----------
    stars
        Copy of the stars with the flags of :data:`PROPAGATED_FLAGS`, ``psf_id``
        (0 if unmatched) and ``psf_max_value`` (NaN if unmatched).
    n_matched
        PSF stars matched to a star.
    n_multiple
        Stars matched by more than one PSF star (flags are OR-ed; ``psf_id`` and
        ``psf_max_value`` come from the closest).
    n_matched_to_parent
        PSF stars whose only star within the radius is a deblended parent.
    """

    stars: Table
    n_matched: int
    n_multiple: int
    n_matched_to_parent: int = 0


def match_psf_stars(psf_stars: Table, stars: Table, *, radius_pix: float) -> FlagPropagationResult:
    """Match PSF stars to stars by pixel position and copy their calibration flags.

    Parameters
    ----------
    psf_stars
        PSF-pass catalogue with ``base_SdssCentroid_x/_y``, ``id`` and the flags.
    stars
        Final star catalogue (``base_SdssCentroid_x/_y``; ``deblend_nChild`` optional).
    radius_pix
        Match radius in pixels (the caller uses max(3, PSF sigma)).

    Returns
    -------
    FlagPropagationResult

    Raises
    ------
    NoPsfStarsToStarsMatchError
        No PSF star has a star within ``radius_pix``.
    """
    if not radius_pix > 0:
        raise ConfigError(f"radius_pix must be > 0, got {radius_pix}")
    n_psf, n_star = len(psf_stars), len(stars)
    out = stars.copy(copy_data=True)
    psf_ids = (np.asarray(psf_stars["id"], np.int64) if "id" in psf_stars.colnames
               else np.arange(1, n_psf + 1, dtype=np.int64))

    px, py = _xy(psf_stars)
    sx, sy = _xy(stars)
    star_ok = np.isfinite(sx) & np.isfinite(sy)
    if "sky_source" in stars.colnames:
        star_ok &= ~np.asarray(stars["sky_source"], bool)
    is_parent = (np.asarray(stars["deblend_nChild"]) > 0 if "deblend_nChild" in stars.colnames
                 else np.zeros(n_star, bool))
    psf_ok = np.isfinite(px) & np.isfinite(py)
    q = np.column_stack([np.where(psf_ok, px, 0.0), np.where(psf_ok, py, 0.0)])

    match = np.full(n_psf, -1, np.int64)
    dist = np.full(n_psf, np.inf)
    # Leaves first, then parents for the PSF stars left without a leaf.
    for pool in (star_ok & ~is_parent, star_ok & is_parent):
        cand = np.flatnonzero(pool)
        todo = psf_ok & (match < 0)
        if len(cand) == 0 or not todo.any():
            continue
        d, j = cKDTree(np.column_stack([sx[cand], sy[cand]])).query(q[todo], k=1, distance_upper_bound=radius_pix)
        hit = np.isfinite(d)
        rows = np.flatnonzero(todo)[hit]
        match[rows] = cand[j[hit]]
        dist[rows] = d[hit]
    matched = match >= 0
    n_matched = int(matched.sum())
    if n_matched == 0:
        raise NoPsfStarsToStarsMatchError(
            f"none of {n_psf} PSF stars has a star within {radius_pix:.2f} px among {n_star} stars; "
            "check that both catalogues use parent pixel coordinates and that star detection found the PSF stars",
            {"n_psf_stars": n_psf, "n_stars": n_star, "radius_pix": float(radius_pix)})
    n_to_parent = int(np.sum(matched & is_parent[np.clip(match, 0, None)]))

    # Closest PSF star first, so that the first write per star is the closest one.
    order = np.flatnonzero(matched)[np.argsort(dist[matched], kind="stable")]
    star_rows = match[order]
    counts = np.bincount(star_rows, minlength=n_star)
    first = np.unique(star_rows, return_index=True)[1]
    closest_psf = order[first]
    closest_star = star_rows[first]

    for name in PROPAGATED_FLAGS:
        flag = np.zeros(n_star, bool)
        if name in psf_stars.colnames:
            src = np.asarray(psf_stars[name], bool)
            # OR over every PSF star matched to a star: a flag is never dropped.
            np.logical_or.at(flag, star_rows, src[order])
        out[name] = flag
    psf_id = np.zeros(n_star, np.int64)
    psf_id[closest_star] = psf_ids[closest_psf]
    out["psf_id"] = psf_id
    max_value = np.full(n_star, np.nan, np.float32)
    unit = None
    if "psf_max_value" in psf_stars.colnames:
        max_value[closest_star] = np.asarray(psf_stars["psf_max_value"], np.float32)[closest_psf]
        unit = psf_stars["psf_max_value"].unit  # the PSF pass's peak pixel (counts), calibrated catalogue or not
    out["psf_max_value"] = max_value
    out["psf_max_value"].unit = unit
    return FlagPropagationResult(out, n_matched, int(np.sum(counts > 1)), n_to_parent)


def _xy(table: Table) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    return (np.asarray(table["base_SdssCentroid_x"], float), np.asarray(table["base_SdssCentroid_y"], float))
