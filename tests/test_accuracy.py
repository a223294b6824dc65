"""End-to-end accuracy against the simulator's truth on small detectors (star completeness, purity, zero point).

Each test simulates one 1024x768 detector of one demo visit (GalSim Kolmogorov PSF, galaxies, cosmic
rays, saturated stars, bad columns), runs the in-memory pipeline and scores it with the evaluator.

Regressions these catch (measured on the 8 demo detectors before the fixes):
* star completeness 80-86 %: the noise-blind extendedness cut (< 0.1) dropped faint stars, stars
  within ~15 px of a brighter star were not deblended, and S/N 10 stars fell below the S/N 10 cuts;
* zero point +3…+9 mmag: the calibration flux was normalised to a 12-px aperture, ~1 % short of
  the total flux the reference catalogue (and the truth) is on.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from singleframe.io.refcat import load_refcat, write_refcat
from singleframe.sim import (
    SimulationConfig,
    evaluate_detector,
    make_reference_catalog,
    simulate_detector,
)
from singleframe.steps.config import load_calibrate_config
from singleframe.steps.pipeline import calibrate_image, refcat_search_radius_deg

# Star detection peaks at S/N 7 (the star selector cuts at 8): a star of true S/N 10 is measured at
# ~9.1 +- 1 (the truth's S/N uses a Gaussian noise-equivalent area, 16 % smaller than the Kolmogorov
# PSF's), so a peak cut at 10 loses ~20 % of the S/N 10-12 stars. Proposed for steps/config.py.
OVERRIDES = {"star_detection": {"peak_threshold_snr": 7.0}}


def _run(visit_index: int, store: str) -> tuple[dict, float]:
    """Evaluation row and the reported zero-point error (mmag, flux-scale error included)."""
    base = SimulationConfig()
    cfg = replace(base, n_side=1, nx=1024, ny=768, visits=(base.visits[visit_index],))
    refcat = make_reference_catalog(cfg)
    sim = simulate_detector(cfg, cfg.visits[0], 0, refcat=refcat)
    epoch = 2000.0 + (cfg.visits[0].mjd_tai - 51544.5) / 365.25
    write_refcat(store, "refcat", refcat)
    ra, dec, radius = refcat_search_radius_deg(sim.snaps[0], 400.0)
    ref = load_refcat(store, "refcat", ra_deg=ra, dec_deg=dec, radius_deg=radius, epoch_year=epoch)
    conf = load_calibrate_config(None, OVERRIDES)
    res = calibrate_image(sim.snaps, ref, config=conf)
    stars = res.single_visit_star_unstandardized
    stars = stars[~np.asarray(stars["sky_source"], bool)]
    pc = res.initial_photoCalib_detector
    row = evaluate_detector(visit=cfg.visits[0].visit, detector=0, wcs=None, psf=None,
                            calibration_njy_per_count=pc.calibration_njy_per_count, stars=stars, mask=None,
                            truth=sim.truth)
    # The reported error includes the flux-scale (normalisation + curve of growth) error: the
    # pipeline measures it on the star pass and passes it to the photometric fit.
    fit_mmag = 1000 * 2.5 / math.log(10) * pc.calibration_err_njy_per_count / pc.calibration_njy_per_count
    return row, fit_mmag


@pytest.mark.parametrize("visit_index", [0, 1])
def test_star_selection_and_zero_point_against_truth(visit_index: int, tmp_path) -> None:
    row, zp_sigma_mmag = _run(visit_index, str(tmp_path))
    # ~150 eligible stars: the demo detectors give 97.9-99.5 %; one star is 0.7 %, and 96 % is ~3
    # binomial sigmas below the expected 98.8 % (the full-size bar is 98 % over 2048^2 detectors).
    assert row["star_recovered_pct"] >= 96.0, row
    # ~180 selected: demo detectors give 0.9-2.6 % (faint compact galaxies); 4 % is ~1.2 binomial sigma above the top.
    assert row["star_contaminant_pct"] <= 4.0, row
    # The zero point is unbiased within its (honest) error: 3 sigma. Sigma is 3.7 and 5.5 mmag on these
    # two detectors (errors +2.1 and -8.4 mmag).
    # The old 12-px normalisation was ~1 % (10 mmag) off; issue 5's 21-detector test
    # (test_photometry_accuracy.py) holds the bias and pull bars.
    assert abs(row["zp_err_mmag"]) <= 3 * zp_sigma_mmag, (row, zp_sigma_mmag)
    # A real, finite error (fit + flux scale), neither lost nor inflated away: 3.7 and 5.5 mmag measured.
    assert 2.5 < zp_sigma_mmag < 8.0
