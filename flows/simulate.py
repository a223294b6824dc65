"""Write a simulated survey (inputs, reference catalogue, truth) into an artifact store."""

from __future__ import annotations

from collections.abc import Callable

from ..io.refcat import write_refcat
from ..io.store import ArtifactStore
from ..sim.config import SimulationConfig
from ..sim.survey import iter_survey, make_camera, make_reference_catalog


def write_simulated_survey(store: ArtifactStore, config: SimulationConfig, *, run: str = "raw",
                           refcat: str = "refcat", progress: Callable[[str], None] | None = None) -> int:
    """Simulate every visit × detector of ``config`` into ``store``; returns the number of detectors."""
    config.validate()
    camera = make_camera(config)
    store.put("camera", camera.to_dict(), run=run, instrument=config.instrument)
    write_refcat(store.root, refcat, make_reference_catalog(config))
    n = 0
    for visit, detector_id, sim in iter_survey(config):
        where = {"run": run, "instrument": config.instrument, "visit": visit.visit, "detector": detector_id}
        for snap, exposure in enumerate(sim.snaps):
            store.put("post_isr_image", exposure, snap=snap, provenance={"band": exposure.visit_info.band}, **where)
            store.put("truth_cr_mask", sim.truth.cr_masks[snap].astype("uint8"), snap=snap, **where)
        t = sim.truth
        store.put("truth_sources", t.sources, **where)
        store.put("truth_psf", t.psf_grid, **where)
        store.put("truth_wcs", {"wcs_header": t.wcs.to_header(relax=True).tostring(sep="\n"),
                                "header_wcs_header": t.header_wcs.to_header(relax=True).tostring(sep="\n")}, **where)
        store.put("truth_calib", {"calibration_njy_per_count": t.calibration_njy_per_count,
                                  "psf_sigma_center_pix": t.psf_sigma_center_pix,
                                  "sky_counts_per_pixel": t.sky_counts_per_pixel,
                                  "shape": list(t.shape), "origin": list(t.origin),
                                  "bad_columns": list(t.bad_columns)}, **where)
        n += 1
        if progress:
            progress(f"simulated visit {visit.visit} detector {detector_id} ({len(sim.snaps)} snap(s), "
                     f"{len(t.sources)} sources)")
    return n
