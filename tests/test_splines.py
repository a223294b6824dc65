"""The numpy interpolating splines against FITPACK (scipy), and their own invariants."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from singleframe.background import BackgroundModel
from singleframe.splines import GridSpline, basis_matrix, interpolation_knots


@pytest.mark.parametrize("degree_u, degree_v", [(3, 3), (1, 3), (3, 2), (2, 1), (1, 1)])
@pytest.mark.parametrize("n_u, n_v", [(4, 9), (6, 5), (12, 17)])
def test_grid_spline_equals_scipy_rect_bivariate_spline(degree_u: int, degree_v: int, n_u: int, n_v: int) -> None:
    # The same knots (FITPACK's for s = 0) and an exact collocation solve give the same spline;
    # the tolerance is float64 rounding of values of order 1e3 through two small solves.
    from scipy.interpolate import RectBivariateSpline

    rng = np.random.default_rng(100 * n_u + n_v)
    u = np.cumsum(rng.uniform(1.0, 50.0, n_u))
    v = np.cumsum(rng.uniform(1.0, 50.0, n_v))
    z = 1000.0 + 30.0 * rng.normal(size=(n_u, n_v))
    ref = RectBivariateSpline(u, v, z, kx=degree_u, ky=degree_v)
    ours = GridSpline.fit(u, v, z, degree_u=degree_u, degree_v=degree_v)
    tu, tv = ref.get_knots()
    np.testing.assert_array_equal(ours.knots_u, tu)
    np.testing.assert_array_equal(ours.knots_v, tv)
    np.testing.assert_allclose(ours.coeffs.ravel(), ref.get_coeffs(), rtol=0, atol=1e-9)
    pu = np.concatenate([[u[0], u[-1], u[-1]], rng.uniform(u[0], u[-1], 300)])
    pv = np.concatenate([[v[0], v[-1], v[0]], rng.uniform(v[0], v[-1], 300)])
    np.testing.assert_allclose(ours.ev(pu, pv), ref.ev(pu, pv), rtol=0, atol=1e-9)
    # An interpolating spline passes through its data exactly.
    gu, gv = np.meshgrid(u, v, indexing="ij")
    np.testing.assert_allclose(ours.ev(gu, gv), z, rtol=0, atol=1e-9)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_basis_matrix_equals_scipy_design_matrix_and_sums_to_one(degree: int) -> None:
    from scipy.interpolate import BSpline

    x = np.array([0.0, 1.5, 3.0, 7.0, 8.0, 11.0, 20.0])
    knots = interpolation_knots(x, degree)
    pts = np.concatenate([x, np.linspace(0.0, 20.0, 401)])
    b = basis_matrix(pts, knots, degree)
    np.testing.assert_allclose(b, BSpline.design_matrix(pts, knots, degree).toarray(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(b.sum(axis=1), 1.0, rtol=0, atol=1e-13)  # partition of unity


def test_interpolation_knots_reject_too_few_or_unsorted_points() -> None:
    with pytest.raises(ValueError, match="at least 4 points"):
        interpolation_knots([0.0, 1.0, 2.0], 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        interpolation_knots([0.0, 2.0, 1.0, 3.0], 3)


def test_background_model_reproduces_a_bilinear_sky_exactly() -> None:
    # The edge knots extend the outer bins linearly and a cubic spline reproduces polynomials, so
    # a bilinear sky is reproduced everywhere: the model to float64 rounding, the float32 image
    # and the band-wise subtraction to float32 rounding (values ~1e3: 1e-3 absolute is a few ulp).
    def sky(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return 1000.0 + 0.02 * x - 0.01 * y + 3e-5 * x * y

    xc = np.arange(64.0, 512.0, 128.0)
    yc = np.arange(32.0, 384.0, 64.0)
    model = BackgroundModel(sky(xc[None, :], yc[:, None]), xc, yc, (384, 512))
    gy, gx = np.mgrid[0:384, 0:512].astype(float)
    np.testing.assert_allclose(model.evaluate(gx, gy), sky(gx, gy), rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.image(), sky(gx, gy), rtol=0, atol=1e-3)
    sub = model.subtract_from(np.full((384, 512), 1000.0, np.float32), band_rows=100)
    np.testing.assert_allclose(sub, 1000.0 - sky(gx, gy), rtol=0, atol=1e-3)


def test_calibration_imports_neither_scipy_interpolate_nor_optimize() -> None:
    # Each costs 0.1-0.2 s of a fresh worker's start-up; the pipeline needs neither.
    code = ("import sys\n"
            "import singleframe.steps.pipeline, singleframe.io.formats, singleframe.flows.stages\n"
            "print(sorted(m for m in ('scipy.interpolate', 'scipy.optimize') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_grid_evaluation_equals_pointwise_evaluation() -> None:
    # The separable product and the point-by-point sum are the same sums in another order.
    rng = np.random.default_rng(7)
    xc = np.arange(64.0, 1024.0, 128.0)
    yc = np.arange(32.0, 768.0, 64.0)
    model = BackgroundModel(1000.0 + rng.normal(size=(yc.size, xc.size)), xc, yc, (768, 1024))
    xs = np.concatenate([[-5.0], np.arange(0.0, 1024.0, 8.0), [2000.0]])  # beyond the edges: clipped
    ys = np.arange(0.0, 768.0, 8.0)
    np.testing.assert_allclose(model.grid(xs, ys), model.evaluate(xs[None, :], ys[:, None]), rtol=0, atol=1e-9)
    spline = GridSpline.fit(yc, xc, model.values)
    np.testing.assert_allclose(spline.grid(ys, xs[1:-1]), spline.ev(ys[:, None], xs[None, 1:-1]), rtol=0, atol=1e-9)
