"""Diagnostic figures are freed as soon as they are drawn (singleframe.flows.diagnostics)."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import pytest

from singleframe.flows import diagnostics


def _draw(seed: int) -> tuple[bytes, weakref.ref]:
    """A small figure with the artists the diagnostic plot uses; returns its PNG and a weak reference to it."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(4, 3), layout="constrained")
    ax_scatter, ax_image = fig.subplots(1, 2)
    sc = ax_scatter.scatter(rng.normal(size=50), rng.normal(size=50), c=rng.normal(size=50), s=4)
    fig.colorbar(sc, ax=ax_scatter)
    ax_image.imshow(rng.normal(size=(32, 48)), origin="lower")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=30)
    return buf.getvalue(), weakref.ref(fig)


@pytest.fixture
def collector_state():
    was_enabled = gc.isenabled()
    yield
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


def test_figure_is_freed_on_leaving_the_context_without_a_full_collection(collector_state):
    gc.enable()
    with diagnostics._figure_garbage_collected():
        png, fig = _draw(1)
    assert png.startswith(b"\x89PNG")
    assert fig() is None  # freed by the youngest-generation pass, no gc.collect() needed
    assert gc.isenabled()


def test_figure_left_alone_is_kept_alive_by_its_reference_cycles(collector_state):
    # The reason for the context manager: without it the figure outlives its drawing.
    gc.disable()
    _, fig = _draw(2)
    assert fig() is not None
    gc.collect()
    assert fig() is None


def test_a_collector_disabled_by_the_application_stays_disabled(collector_state):
    gc.disable()
    with diagnostics._figure_garbage_collected():
        _, fig = _draw(3)
    assert fig() is None
    assert not gc.isenabled()


def test_collector_is_resumed_when_drawing_fails(collector_state):
    gc.enable()
    with pytest.raises(ValueError), diagnostics._figure_garbage_collected():
        raise ValueError("drawing failed")
    assert gc.isenabled()
