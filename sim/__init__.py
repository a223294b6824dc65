"""The survey simulator (GalSim) and the evaluation of outputs against its truth.

Pure: functions return in-memory exposures, tables and truth; the caller
writes them to the artifact store.
"""

from .config import SIM_BANDS, SimulationConfig, VisitSpec, benchmark_config
from .evaluation import (
    EVALUATION_KEYS,
    PsfEllipticityResiduals,
    cr_masked_pct,
    evaluate_detector,
    format_evaluation_table,
    psf_ellipticity_residuals,
    psf_size_error_pct,
    star_recovery,
    wcs_error_mas,
    zero_point_error_mmag,
)
from .scenes import RubinTestScene, rubin_test_scene, two_snap_version
from .survey import (
    DetectorTruth,
    SimulatedDetector,
    iter_survey,
    make_camera,
    make_reference_catalog,
    simulate_detector,
)

__all__ = [
    "EVALUATION_KEYS",
    "SIM_BANDS",
    "DetectorTruth",
    "PsfEllipticityResiduals",
    "RubinTestScene",
    "SimulatedDetector",
    "SimulationConfig",
    "VisitSpec",
    "benchmark_config",
    "cr_masked_pct",
    "evaluate_detector",
    "format_evaluation_table",
    "iter_survey",
    "make_camera",
    "make_reference_catalog",
    "psf_ellipticity_residuals",
    "psf_size_error_pct",
    "rubin_test_scene",
    "simulate_detector",
    "star_recovery",
    "two_snap_version",
    "wcs_error_mas",
    "zero_point_error_mmag",
]
