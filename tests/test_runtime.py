"""Process-level tuning of calibration workers (singleframe.runtime)."""

from __future__ import annotations

import platform

import pytest

from singleframe import runtime


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("SINGLEFRAME_MALLOC_TUNING", "0")
    assert runtime._apply() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuning_applies_on_glibc_and_is_idempotent(monkeypatch):
    monkeypatch.delenv("SINGLEFRAME_MALLOC_TUNING", raising=False)
    assert runtime._apply() is True  # mallopt accepted the threshold
    first = runtime.tune_memory_allocator()
    assert runtime.tune_memory_allocator() is first  # decided once per process
