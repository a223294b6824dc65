"""Read a run's outputs and the simulator's truth from the store and compare them."""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ..errors import DatasetNotFoundError
from ..io.store import ArtifactStore


def evaluate_run(store_root: str, *, run: str = "calib", truth_run: str = "raw") -> list[dict[str, Any]]:
    """One evaluation row per calibrated detector that has truth (failed ones included, with NaNs and the reason).

    Detectors with truth but neither outputs nor a failure record in ``run`` were not part of it
    and get no row.
    """
    from ..sim.evaluation import evaluate_detector

    store = ArtifactStore(store_root)
    rows: list[dict[str, Any]] = []
    for tref in sorted(store.query("truth_calib", run=truth_run), key=lambda r: (r.visit, r.detector)):
        where_truth = {"run": truth_run, "instrument": tref.instrument, "visit": tref.visit, "detector": tref.detector}
        where_out = {**where_truth, "run": run}
        truth = _load_truth(store, where_truth)
        try:
            exposure = store.get("preliminary_visit_image", **where_out)
            stars = store.get("single_visit_star_unstandardized", **where_out)
            calib = store.get("initial_photoCalib_detector", **where_out)
        except DatasetNotFoundError:
            try:
                failure = store.get("detector_failure", **where_out)
            except DatasetNotFoundError:
                continue  # not calibrated in this run (e.g. left out by --visits): not a row
            row = evaluate_detector(visit=tref.visit, detector=tref.detector, wcs=None, psf=None,
                                    calibration_njy_per_count=None, stars=None, mask=None, truth=truth)
            row["failure"] = f"{failure.get('stage')}: {failure.get('failure.message')}"
            rows.append(row)
            continue
        stars = stars[~np.asarray(stars["sky_source"], bool)]
        row = evaluate_detector(visit=tref.visit, detector=tref.detector, wcs=exposure.wcs, psf=exposure.psf,
                                calibration_njy_per_count=float(calib["calibration_njy_per_count"]),
                                stars=stars, mask=exposure.mask, truth=truth)
        rows.append(row)
    return rows


def _load_truth(store: ArtifactStore, where: dict[str, Any]) -> Any:
    from ..sim.survey import DetectorTruth

    calib = store.get("truth_calib", **where)
    wcs_record = store.get("truth_wcs", **where)
    wcs = WCS(fits.Header.fromstring(wcs_record["wcs_header"], sep="\n"))
    header_wcs = WCS(fits.Header.fromstring(wcs_record["header_wcs_header"], sep="\n"))
    masks = []
    snap = 0
    while store.exists("truth_cr_mask", snap=snap, **where):
        masks.append(np.asarray(store.get("truth_cr_mask", snap=snap, **where), bool))
        snap += 1
    return DetectorTruth(
        wcs=wcs, sources=store.get("truth_sources", **where), psf_grid=store.get("truth_psf", **where),
        calibration_njy_per_count=float(calib["calibration_njy_per_count"]), cr_masks=tuple(masks),
        psf_sigma_center_pix=float(calib["psf_sigma_center_pix"]),
        sky_counts_per_pixel=float(calib["sky_counts_per_pixel"]),
        shape=tuple(calib["shape"]), origin=tuple(calib["origin"]), header_wcs=header_wcs,
        bad_columns=tuple(calib["bad_columns"]),
    )


__all__ = ["evaluate_run"]
