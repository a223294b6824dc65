"""singleframe: single-frame calibration of astronomical survey images.

The package is laid out in three layers whose dependencies point one way:

``singleframe.steps``
    pure functions on in-memory arrays and tables (no Prefect, no files);
``singleframe.io``
    every byte on disk or on the wire (artifact store, FITS, Parquet, JSON);
``singleframe.flows``
    Prefect tasks and flows that wire steps to datasets.

The data model shared by all three (exposures, mask planes, PSF and background
models, photometric calibration, camera geometry, errors, configuration) lives
at the top level of the package.

Importing the package tunes the process for frame-sized arrays
(:mod:`singleframe.runtime`): glibc's allocator keeps freed memory in one
heap, and numpy stops advising huge pages where the kernel would stall to
provide them. Both are process-wide; ``SINGLEFRAME_MALLOC_TUNING=0`` leaves
the process as it was.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("singleframe")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from .runtime import tune_memory_allocator, tune_numpy_hugepages

# Before any worker thread exists: a thread that allocates before the tuning keeps an arena of
# its own, whose 64 MB heaps cannot hold a frame, and pays the page faults of every frame-sized
# temporary again (a 4096² detector in a Prefect worker thread: 8.4 s instead of 6.4 s).
tune_memory_allocator()
# Before the first frame is allocated: where the kernel compacts memory to serve numpy's huge-page
# advice, every first touch of a frame waits (a 4096² detector read, calibrated and written in a
# fresh process: 5.28 s with the advice, 3.85 s without; see singleframe.runtime).
tune_numpy_hugepages()

__all__ = ["__version__"]
