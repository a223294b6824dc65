"""Prefect flow: calibrate every detector of the chosen visits.

The flow reads like the processing summary: for each (visit, detector) the
six stages of :data:`singleframe.flows.stages.STAGES` run in order, each a
Prefect task that reads its input datasets from the artifact store, calls
the pure steps and writes its outputs atomically with provenance.

Caching is keyed on our own identifiers, not on Prefect's result records:
a stage is skipped when every output exists in the store and its provenance
carries the same cache key (stage, data id, checksums of the inputs, resolved
config hash, code version). A deleted or changed product is therefore always
recomputed, and a finished run recomputes nothing.

Prefect persists no results of its own (``persist_result=False``,
``NO_CACHE``): the artifact store is the only cache and the only record of
products, so nothing of Prefect's is ever written beside the datasets.

Retries apply only to :class:`~singleframe.errors.TransientIOError`, with
growing, jittered delays; algorithmic failures are recorded once as
``detector_failure`` and the rest of the visit goes on.

Fan-out: detectors run on a bounded thread pool (default), or on Dask
(:func:`make_task_runner`). Tasks exchange only data ids and small dicts;
pixels go through the store.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.metadata
import itertools
import json
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import (
    ConfigError,
    DatasetNotFoundError,
    SingleframeError,
    StepFailedError,
    TransientIOError,
    error_type,
    failure_metadata,
)
from ..exposure import Exposure
from ..ids import DataId
from ..io.refcat import refcat_version
from ..io.refs import DatasetRef
from ..io.store import ArtifactStore
from ..provenance import code_fingerprint
from ..runtime import WORKER_PRELOAD, start_worker_forkserver
from ..steps.config import CalibrateImageConfig, calibrate_config_from_dict, load_calibrate_config
from .artifacts import SUMMARY_KEYS, VisitProgress, publish_visit_artifacts
from .diagnostics import diagnostics_path, plot_detector_diagnostics
from .stages import STAGES, Stage, StageContext, persisted_outputs

#: Delays before the 1st, 2nd and 3rd retry of a transient I/O failure (s), each +/- 50 % jitter.
RETRY_DELAYS_S = [1.0, 4.0, 16.0]
RETRY_JITTER = 0.5

#: Called as ``progress(done, total, failed)`` each time a detector finishes (the CLI's progress line).
ProgressCallback = Callable[[int, int, int], None]
_progress_callback: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar(
    "singleframe_progress_callback", default=None)


class CalibrateParams(BaseModel):
    """Parameters of :func:`calibrate_visits` (rendered as a form in the Prefect UI)."""

    store: str = Field("demo_store", description="Artifact store root: a local path or an fsspec URL (s3://...)")
    input_run: str = Field("raw", description="Run holding the post_isr_image inputs")
    output_run: str = Field("calib", description="Run the outputs are written to")
    instrument: str | None = Field(None, description="Instrument name (default: every instrument in the input run)")
    visits: list[int] | None = Field(None, description="Visits to process (default: all)")
    detectors: list[int] | None = Field(None, description="Detectors to process (default: all)")
    config_file: str | None = Field(None, description="YAML/JSON pipeline config (default: built-in defaults)")
    refcat: str = Field("refcat", description="Reference catalogue name in the store")
    max_workers: int = Field(2, ge=1, description="Detectors processed at once on threads (a Dask runner's "
                                                  "workers set their own pace)")
    rerun: bool = Field(False, description="Recompute every stage even when its outputs are current")
    max_failed_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Fraction of detectors that may fail with the run still Completed (default 0: any failed "
                    "detector makes the run Failed, after every other detector is calibrated, so alerts fire)")


class RunContext(BaseModel):
    """Small, JSON-serialisable context handed to every task (never pixels)."""

    store: str
    input_run: str
    output_run: str
    refcat: str
    config: dict[str, Any]
    config_hash: str
    rerun: bool = False
    #: :func:`~singleframe.io.refcat.refcat_version` of ``refcat``: in the cache key of the stages
    #: that read it, so a re-ingested catalogue recomputes them (and everything downstream).
    refcat_version: str = ""
    #: :func:`code_version` of the process that started the run: a worker running other code (a
    #: long-lived Dask cluster started before an edit or upgrade) refuses to compute with it.
    code_version: str = ""


def run_context(params: CalibrateParams, config: CalibrateImageConfig, store: ArtifactStore) -> RunContext:
    """The context of a run; raises :class:`ConfigError` before any pixel is read if the refcat is missing."""
    try:
        version = refcat_version(store, params.refcat)
    except DatasetNotFoundError:
        raise ConfigError(
            f"reference catalogue {params.refcat!r} is not in the store {store.root} (no "
            f"refcats/{params.refcat}/manifest.json); ingest one with `singleframe ingest-refcat --name "
            f"{params.refcat}`, or name an existing one with --refcat NAME (refcat=... in the flow "
            "parameters)") from None
    return RunContext(store=params.store, input_run=params.input_run, output_run=params.output_run,
                      refcat=params.refcat, config=config.to_dict(), config_hash=config.hash, rerun=params.rerun,
                      refcat_version=version, code_version=code_version())


#: Libraries whose numerics the calibration depends on: an upgrade recomputes (it may change results).
_NUMERIC_DEPENDENCIES = ("numpy", "scipy", "astropy", "sep", "photutils", "pyarrow", "opencv-python-headless")


def code_version() -> str:
    """The release, the fingerprint of the calibration source and the versions of the numeric libraries."""
    return f"{__version__}+{code_fingerprint()};{_dependency_versions()}"


@functools.cache
def _dependency_versions() -> str:
    """``name=version`` of each numeric library, read once per process (~1 ms each)."""
    found = []
    for name in _NUMERIC_DEPENDENCIES:
        try:
            found.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name}=absent")
    return ",".join(found)


def _only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only transient I/O errors are worth another try."""
    try:
        state.result()
    except TransientIOError:
        return True
    except Exception:  # any other failure is deterministic: do not retry
        return False
    return False


def _input_version(store: ArtifactStore, ref: DatasetRef) -> str:
    """One stored version of an input (bytes and write time, :meth:`ArtifactStore.version`).

    A re-produced input is a new version even when its bytes come out the same, so deleting a
    dataset recomputes the stage that produces it *and* every stage downstream of it, while a
    finished run, whose inputs are untouched, recomputes nothing. An ingested image also
    carries its size on disk (one ``stat``): one truncated or replaced by hand outside the store
    is then a new version, whose stage reads it and says so, instead of a finished run that
    keeps reporting success.
    """
    # The dataset's identity within the store, not its URI: a store moved, copied or reached
    # through another path (a symlink, another mount point) keeps its caches.
    identity = json.dumps([ref.dataset_type, ref.run, ref.data_id], sort_keys=True)
    version = f"{identity}#" + store.version(ref.dataset_type, run=ref.run, **ref.data_id)
    if ref.dataset_type == "post_isr_image":
        version += f"#{store.stored_size(ref.dataset_type, run=ref.run, **ref.data_id)}"
    return version


def _cache_key(stage: Stage, data_id: DataId, input_refs: dict[str, list[DatasetRef]], ctx: RunContext,
               store: ArtifactStore) -> str:
    payload = {
        "stage": stage.name,
        "data_id": data_id.to_dict(),
        "inputs": {k: sorted(_input_version(store, r) for r in v) for k, v in sorted(input_refs.items())},
        "config_hash": ctx.config_hash,
        "code_version": code_version(),
    }
    if stage.uses_refcat:
        payload["refcat"] = {"name": ctx.refcat, "version": ctx.refcat_version}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _input_refs(store: ArtifactStore, stage: Stage, data_id: DataId, ctx: RunContext) -> dict[str, list[DatasetRef]]:
    refs: dict[str, list[DatasetRef]] = {}
    for name in stage.inputs:
        if name == "post_isr_image":
            found = store.query(name, run=ctx.input_run, instrument=data_id.instrument,
                                visit=data_id.visit, detector=data_id.detector)
            # Refs with checksums (from provenance): the cache key depends on the input bytes.
            refs[name] = [store.ref(name, run=ctx.input_run, instrument=data_id.instrument, visit=data_id.visit,
                                    detector=data_id.detector, snap=r.snap)
                          for r in sorted(found, key=lambda r: r.snap or 0)]
        else:
            refs[name] = [store.ref(name, run=ctx.output_run, instrument=data_id.instrument,
                                    visit=data_id.visit, detector=data_id.detector)]
    return refs


def run_stage(stage: Stage, ctx: RunContext, data_id: DataId,
              refcat_loader: Callable[[Exposure], Any] | None = None) -> dict[str, DatasetRef]:
    """Run one stage for one detector, or return its cached outputs."""
    store = ArtifactStore(ctx.store)
    here = code_version()
    if ctx.code_version and ctx.code_version != here:
        raise ConfigError(
            f"this worker runs other code than the flow that started the run ({here} against "
            f"{ctx.code_version}): restart the workers (e.g. the Dask cluster) after installing the new version")
    input_refs = _input_refs(store, stage, data_id, ctx)
    key = _cache_key(stage, data_id, input_refs, ctx, store)
    where = {"run": ctx.output_run, "instrument": data_id.instrument, "visit": data_id.visit, "detector": data_id.detector}
    config = calibrate_config_from_dict(ctx.config)
    outputs = persisted_outputs(stage, config)
    if not ctx.rerun:
        cached = {}
        for name in outputs:
            # An output truncated or replaced outside the store is recomputed, not reported as finished.
            ref = store.cached_ref(name, cache_key=key, **where)
            if ref is None:
                break
            cached[name] = ref
        else:
            return cached
    loaded: dict[str, Any] = {}
    for name, refs in input_refs.items():
        # Every read checks the size the store wrote; the ingested inputs, the one kind of file
        # people replace by hand, are also checked byte for byte (~0.15 s per 4096² snap).
        objs = [store.get_ref(r, verify_checksum=name == "post_isr_image") for r in refs]
        loaded[name] = objs if name == "post_isr_image" else objs[0]
    loader = refcat_loader or _refcat_loader(store, ctx, config)
    try:
        products = stage.compute(loaded, StageContext(data_id, config, loader))
    except Exception as exc:
        if isinstance(exc, StepFailedError):
            # Name the files, so the failure record says which inputs could not be processed.
            exc.metadata.setdefault("input_uris", [r.uri for refs in input_refs.values() for r in refs])
        release_traceback_locals(exc)
        raise
    provenance = {
        "cache_key": key,
        "stage": stage.name,
        "config_hash": ctx.config_hash,
        "inputs": [{"dataset_type": k, "uri": r.uri, "checksum": r.checksum} for k, v in input_refs.items() for r in v],
    }
    written = {name: store.put(name, products[name], provenance=provenance, **where) for name in outputs}
    for name in stage.outputs:
        if name not in written and store.exists(name, **where):
            # Switched off in this config: an earlier config's product would pass for this one's.
            store.delete(name, **where)
    return written


def release_traceback_locals(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in ``exc``'s traceback (and its causes').

    Prefect keeps a failed task's exception in its state, and the traceback keeps every frame
    of the failed stage with its arrays: a reference cycle that only the cyclic garbage
    collector breaks, detectors later. Measured on a 40-detector run of 512² detectors: the
    flow process's in-use heap stayed +17 and +40 MB for 3-8 detectors after each failed
    astrometry. The message, type, metadata and the traceback's file and line numbers stay.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # frames still executing are left alone
        stack += [e.__cause__, e.__context__]


def _refcat_loader(store: ArtifactStore, ctx: RunContext, config: CalibrateImageConfig) -> Callable[[Exposure], Any]:
    from ..io.refcat import load_refcat
    from ..steps.pipeline import refcat_search_radius_deg

    def load(exposure: Exposure) -> Any:
        ra, dec, radius = refcat_search_radius_deg(exposure, config.refcat_margin_arcsec)
        epoch = 2000.0 + (exposure.visit_info.mjd_tai - 51544.5) / 365.25
        return load_refcat(store.root, ctx.refcat, ra_deg=ra, dec_deg=dec, radius_deg=radius, epoch_year=epoch)

    return load


#: Options shared by every task: our store is the cache, so Prefect keeps no result records.
_TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}
_RETRY_OPTIONS: dict[str, Any] = {"retries": len(RETRY_DELAYS_S), "retry_delay_seconds": RETRY_DELAYS_S,
                                  "retry_jitter_factor": RETRY_JITTER, "retry_condition_fn": _only_transient}


def _make_stage_task(stage: Stage) -> Any:
    @task(name=stage.name, task_run_name=f"{stage.name}:{{data_id.label}}", description=stage.doc,
          **_TASK_OPTIONS, **_RETRY_OPTIONS)
    def stage_task(ctx: RunContext, data_id: DataId) -> dict[str, DatasetRef]:
        return run_stage(stage, ctx, data_id)

    return stage_task


STAGE_TASKS = {stage.name: _make_stage_task(stage) for stage in STAGES}


@task(name="plot_diagnostics", task_run_name="plot:{data_id.label}", **_TASK_OPTIONS, **_RETRY_OPTIONS)
def plot_diagnostics(ctx: RunContext, data_id: DataId) -> str:
    """PSF, astrometric, photometric and background diagnostics of one detector, as a PNG in the store."""
    return plot_detector_diagnostics(ArtifactStore(ctx.store), run=ctx.output_run, data_id=data_id, force=ctx.rerun)


def calibrate_one_detector(ctx: RunContext, data_id: DataId) -> dict[str, Any]:
    """All stages of one detector; a failure is recorded, never raised to the visit."""
    store = ArtifactStore(ctx.store)
    where = {"run": ctx.output_run, "instrument": data_id.instrument, "visit": data_id.visit, "detector": data_id.detector}
    t0 = time.perf_counter()
    current = "setup"
    try:
        for stage in STAGES:
            current = stage.name
            STAGE_TASKS[stage.name](ctx, data_id)
    except Exception as exc:  # recorded with its type; unexpected errors are marked as bugs
        outcome = {"data_id": data_id.to_dict(), "status": "failed", "stage": current,
                   "error": error_type(exc), "message": str(exc),
                   "wall_s": time.perf_counter() - t0}
        record_failure(store, ctx, data_id, current, exc, outcome)
        return outcome
    try:
        if store.exists("detector_failure", **where):  # from an earlier run of this detector
            store.delete("detector_failure", **where)
    except Exception as exc:
        get_run_logger().error("%s: calibrated, but the earlier failure record could not be removed: %s: %s",
                               data_id.label, type(exc).__name__, exc)
    try:
        summary = store.get("detector_summary", **where)
    except Exception as exc:  # calibrated and stored, but the summary read failed: say so, go on
        get_run_logger().error("%s: outputs written but the summary could not be read: %s: %s", data_id.label,
                               type(exc).__name__, exc)
        return {"data_id": data_id.to_dict(), "status": "ok", "wall_s": time.perf_counter() - t0, "plot": None,
                "summary": {}, "record_error": f"summary not read: {type(exc).__name__}: {exc}"}
    try:
        plot_uri: str | None = plot_diagnostics(ctx, data_id)
    except Exception as exc:  # a missing plot is not a failed calibration; say so and go on
        get_run_logger().warning("%s: diagnostic plot failed: %s: %s", data_id.label, type(exc).__name__, exc)
        plot_uri = None
    warnings = list(summary.get("quality_warnings", []))
    for text in warnings:
        get_run_logger().warning("%s: %s", data_id.label, text)
    return {"data_id": data_id.to_dict(), "status": "ok", "wall_s": time.perf_counter() - t0, "plot": plot_uri,
            "summary": {k: summary.get(k) for k in SUMMARY_KEYS}, "warnings": warnings}


#: Frames of an unexpected error's traceback kept in its failure record.
_TRACEBACK_FRAMES = 12


def record_failure(store: ArtifactStore, ctx: RunContext, data_id: DataId, failed_stage: str, exc: BaseException,
                   outcome: dict[str, Any]) -> None:
    """Write the failure record and remove the products it makes stale; never raises.

    Outputs of an earlier run of this detector (another config with ``rerun``) that the failed
    stage and every later one would have replaced are stale: left next to the failure record, a
    reader globbing ``preliminary_visit_image`` would take them for this run's. They are removed,
    with the detector's diagnostic plot; the products of the stages that succeeded stay. Only a
    failure of the data (:class:`StepFailedError`) or a bug removes them: an I/O failure
    (:class:`DatasetError`: the store, not the data) removes nothing, as the products may be
    current and the next run checks them again; nor does a configuration or installation error
    (:class:`ConfigError`, e.g. a worker running other code). Problems writing the record or
    cleaning up are logged and added to ``outcome`` (``record_error``, ``cleanup_error``).
    """
    where = {"run": ctx.output_run, "instrument": data_id.instrument, "visit": data_id.visit,
             "detector": data_id.detector}
    record = {"data_id": data_id.to_dict(), "stage": failed_stage, "status": "failed",
              "expected": isinstance(exc, SingleframeError), **failure_metadata(exc)}
    if not isinstance(exc, StepFailedError) and exc.__traceback__ is not None:
        # The innermost frames, where the bug is (the outer ones are Prefect's task machinery).
        record["traceback"] = "".join(traceback.format_exception(exc, limit=-_TRACEBACK_FRAMES))
    logger = get_run_logger()
    try:
        store.put("detector_failure", record, **where)
    except Exception as book_exc:  # the store itself failed: the outcome still says what happened
        logger.error("%s: could not record the failure in the store: %s: %s", data_id.label,
                     type(book_exc).__name__, book_exc)
        outcome["record_error"] = f"{type(book_exc).__name__}: {book_exc}"
    if isinstance(exc, SingleframeError) and not isinstance(exc, StepFailedError):
        return  # the store, the configuration or the installation failed, not this detector's data
    names = [stage.name for stage in STAGES]
    first = names.index(failed_stage) if failed_stage in names else 0  # before the first stage: all
    try:
        for stage in STAGES[first:]:
            for name in stage.outputs:
                store.delete(name, **where)  # a no-op for outputs never written
        png = diagnostics_path(ctx.output_run, data_id)
        for path in (png + ".key.json", png):  # the key first: a plot without it is redrawn
            store.delete_path(path)
    except Exception as clean_exc:
        logger.error("%s: could not remove the stale products of the failed stages: %s: %s", data_id.label,
                     type(clean_exc).__name__, clean_exc)
        outcome["cleanup_error"] = f"{type(clean_exc).__name__}: {clean_exc}"


# The task wraps a module-level function so that Dask pickles it by reference (workers import
# this module) instead of by value with everything it refers to.
calibrate_detector = task(name="calibrate_detector", task_run_name="{data_id.label}",
                          **_TASK_OPTIONS)(calibrate_one_detector)


def discover_data_ids(store: ArtifactStore, params: CalibrateParams) -> list[DataId]:
    return _selected(_input_refs_of_run(store, params), params)


def _input_refs_of_run(store: ArtifactStore, params: CalibrateParams) -> list[DatasetRef]:
    return store.query("post_isr_image", run=params.input_run, instrument=params.instrument)


def _data_id(ref: DatasetRef) -> DataId:
    return DataId(ref.instrument, int(ref.visit), int(ref.detector))  # type: ignore[arg-type]


def _selected(refs: list[DatasetRef], params: CalibrateParams) -> list[DataId]:
    """The detectors of ``refs`` that ``params.visits`` / ``params.detectors`` select, sorted."""
    return sorted({_data_id(r) for r in refs if (params.visits is None or r.visit in params.visits)
                   and (params.detectors is None or r.detector in params.detectors)})


class NothingToCalibrateError(ConfigError):
    """The input run holds no detector the parameters select."""


def prepare_run(params: CalibrateParams) -> tuple[ArtifactStore, RunContext, list[DataId], list[str], list[str]]:
    """Everything a run checks before any pixel is read: config, inputs, refcat, the output run's record.

    Returns the store, the run context, the selected detectors, notes on what will fail
    (detectors of a band the reference catalogue lacks) and the instruments whose config record
    the output run does not hold yet (:func:`_check_config_record`).

    Raises
    ------
    ConfigError
        The config is invalid, the refcat is missing, or the output run was made with another
        config or refcat (:class:`NothingToCalibrateError` if no input matches the parameters).
    """
    config = load_calibrate_config(params.config_file)
    store = ArtifactStore(params.store)
    refs = _input_refs_of_run(store, params)
    data_ids = _selected(refs, params)
    if not data_ids:
        raise NothingToCalibrateError(_nothing_to_calibrate(store, params, refs))
    ctx = run_context(params, config, store)
    notes = _check_refcat_bands(store, params, refs, data_ids, config)
    to_record = [i for i in sorted({d.instrument for d in data_ids})
                 if _check_config_record(store, ctx, i, selected={d for d in data_ids if d.instrument == i})]
    return store, ctx, data_ids, notes, to_record


def _check_refcat_bands(store: ArtifactStore, params: CalibrateParams, refs: list[DatasetRef],
                        data_ids: list[DataId], config: CalibrateImageConfig) -> list[str]:
    """Compare the images' bands with the reference catalogue's, before any pixel.

    Returns a note per band the catalogue lacks (those detectors will fail in photometry, the
    others are calibrated); raises :class:`ConfigError` when it covers none of the selected
    detectors, or lacks a band of ``photometry.colour_band_pair``. The band is read from the
    provenance record of one input per visit (written by ingest and the simulator; inputs
    stored without it are not checked here, and their photometry says so later).
    """
    from ..io.refcat import read_refcat_info

    have = set(read_refcat_info(store, params.refcat).bands)
    for band in config.photometry.colour_band_pair:
        if band not in have:
            raise ConfigError(f"photometry.colour_band_pair needs band {band!r}, which reference catalogue "
                              f"{params.refcat!r} lacks (it has {sorted(have)})")
    selected = set(data_ids)
    first_ref: dict[tuple[str, int], DatasetRef] = {}
    for r in refs:
        if _data_id(r) in selected:
            first_ref.setdefault((r.instrument, int(r.visit)), r)  # type: ignore[arg-type]
    n_per_visit = Counter((d.instrument, d.visit) for d in data_ids)
    missing: dict[str, list[tuple[str, int]]] = {}
    for key, r in first_ref.items():
        band = store.provenance("post_isr_image", run=r.run, **r.data_id).get("band")
        if band and band not in have:
            missing.setdefault(str(band), []).append(key)
    notes = [f"reference catalogue {params.refcat!r} has no fluxes in band {b!r} (it has {sorted(have)}): the "
             f"{sum(n_per_visit[k] for k in keys)} detector(s) of visit(s) {_listed(sorted(v for _, v in keys))} will "
             "fail in photometry; ingest a catalogue with that band (singleframe ingest-refcat --band BAND=COLUMN)"
             for b, keys in sorted(missing.items())]
    if notes and sum(n_per_visit[k] for keys in missing.values() for k in keys) == len(data_ids):
        raise ConfigError("; ".join(notes).replace(" will fail in photometry", " cannot be calibrated") +
                          ", or select visits of a band it has (--visits)")
    return notes


def _nothing_to_calibrate(store: ArtifactStore, params: CalibrateParams, refs: list[DatasetRef]) -> str:
    """Why no detector of ``refs`` (the input run's) is selected: none there, or not those visits/detectors."""
    where = f"run {params.input_run!r}" + (f" (instrument {params.instrument!r})" if params.instrument else "")
    if not refs and not store.fs.exists(store.root_path):
        return f"the store {params.store} does not exist; check --store (a directory or an fsspec URL)"
    if not refs:
        return (f"no post_isr_image datasets in {where} of {params.store}; ingest images with `singleframe "
                f"ingest --run {params.input_run}`, or name the input run with --input-run")
    visits = sorted({int(r.visit) for r in refs})  # type: ignore[arg-type]
    detectors = sorted({int(r.detector) for r in refs})  # type: ignore[arg-type]
    return (f"{where} of {params.store} has no detector with visits={params.visits} and "
            f"detectors={params.detectors}; it holds visits {_listed(visits)} and detectors {_listed(detectors)}")


def _listed(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# The default runner's pool has no fixed size: the flow itself keeps ``params.max_workers``
# detectors in flight on it, so the UI form's value holds for deployment runs too.
@flow(name="calibrate-visits", flow_run_name="calibrate-{params.output_run}", log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=None), persist_result=False)
def calibrate_visits(params: CalibrateParams = CalibrateParams()) -> Any:  # noqa: B008 - pydantic default renders in the UI
    """Calibrate every (visit, detector) of the input run; returns per-detector outcomes."""
    logger = get_run_logger()
    # The config is loaded and validated, and the inputs found, before any pixel is touched.
    try:
        store, ctx, data_ids, notes, to_record = prepare_run(params)
    except NothingToCalibrateError as exc:
        return Failed(message=str(exc))
    for note in notes:
        logger.warning(note)
    for instrument in to_record:  # the resolved config, saved with the outputs
        store.put("calibrate_config", _config_record(ctx), run=ctx.output_run, instrument=instrument)
    logger.info("calibrating %d detectors of %d visits with config %s", len(data_ids),
                len({d.visit for d in data_ids}), ctx.config_hash)
    # On threads, params.max_workers detectors at a time (each holds ~1 GB at 4096²); a Dask
    # runner gets every detector at once and its workers set the pace.
    in_flight_max = params.max_workers if isinstance(_current_task_runner(), ThreadPoolTaskRunner) else len(data_ids)
    queue = iter(data_ids)
    futures = {calibrate_detector.submit(ctx, d): d for d in itertools.islice(queue, in_flight_max)}
    visits = sorted({d.visit for d in data_ids})
    progress = VisitProgress(params.output_run, {v: sum(d.visit == v for d in data_ids) for v in visits})
    report = current_progress_callback()
    outcomes: list[dict[str, Any]] = []
    while futures:
        waiter = as_completed(list(futures))
        future = next(waiter)
        waiter.close()
        data_id = futures.pop(future)
        for d in itertools.islice(queue, 1):
            futures[calibrate_detector.submit(ctx, d)] = d
        try:
            outcome = future.result()
        except Exception as exc:  # the detector's task itself died (e.g. a Dask worker lost): not the visit
            logger.error("%s: the detector's task failed: %s: %s", data_id.label, type(exc).__name__, exc)
            outcome = {"data_id": data_id.to_dict(), "status": "failed", "stage": "orchestration",
                       "error": type(exc).__name__, "message": str(exc), "wall_s": None}
            # Which stage it reached is unknown: every stage's products may be stale.
            record_failure(store, ctx, data_id, "orchestration", exc, outcome)
        outcomes.append(outcome)
        visit = int(outcome["data_id"]["visit"])
        progress.update(visit, outcome["status"] == "ok")
        if report is not None:
            report(len(outcomes), len(data_ids), sum(o["status"] != "ok" for o in outcomes))
        if progress.done[visit] == progress.total[visit]:
            publish_visit_artifacts(params.output_run, visit,
                                    [o for o in outcomes if o["data_id"]["visit"] == visit])
    outcomes.sort(key=lambda o: (o["data_id"]["visit"], o["data_id"]["detector"]))
    n_failed = sum(o["status"] != "ok" for o in outcomes)
    message = f"{len(outcomes) - n_failed} of {len(outcomes)} detectors calibrated, {n_failed} failed"
    logger.info(message)
    if outcomes and n_failed / len(outcomes) > params.max_failed_fraction:
        # Every other detector is calibrated and stored; the state says the run is not whole.
        return Failed(message=message, data=outcomes)
    return Completed(message=message, data=outcomes)


def _current_task_runner() -> Any:
    """The task runner of the flow run in progress (None outside one)."""
    ctx = FlowRunContext.get()
    return None if ctx is None else ctx.task_runner


def _config_record(ctx: RunContext) -> dict[str, Any]:
    return {"config": ctx.config, "config_hash": ctx.config_hash, "refcat": ctx.refcat,
            "code_version": ctx.code_version or code_version()}


def _check_config_record(store: ArtifactStore, ctx: RunContext, instrument: str,
                         selected: set[DataId] | None = None) -> bool:
    """Whether the output run's record must be (re)written; raises if the run must not be touched.

    One output run holds the products of one config and one refcat: another config, or a
    reference catalogue of another name, is refused unless ``rerun``, because recalibrating
    would replace the run's products (and delete them where the new setting fails). With
    ``rerun`` it is still refused while the run holds products of detectors outside ``selected``
    (the detectors of this run; None: not checked): the record would then relabel them as made
    with the new config. A new version of the *same* catalogue is not refused: its checksum is
    in the cache keys of the stages that read it, which recompute.
    """
    where = {"run": ctx.output_run, "instrument": instrument}
    if not store.exists("calibrate_config", **where):
        return True
    previous, record = store.get("calibrate_config", **where), _config_record(ctx)
    if all(previous.get(k) == record[k] for k in ("config_hash", "code_version", "refcat")):
        return False
    differing = _config_differences(previous.get("config"), ctx.config)
    new_config = previous.get("config_hash") != ctx.config_hash and bool(differing)
    # Records written before the refcat was recorded hold none: nothing to compare with.
    new_refcat = previous.get("refcat", ctx.refcat) != ctx.refcat
    if ctx.rerun and (new_config or new_refcat) and selected is not None:
        others = sorted(_detectors_with_products(store, ctx.output_run, instrument)
                        - {(d.visit, d.detector) for d in selected})
        if others:
            what = "config" if new_config else "reference catalogue"
            raise ConfigError(
                f"output run {ctx.output_run!r} holds products of {len(others)} detector(s) outside this selection "
                f"(visit, detector {others[0]}{', ...' if len(others) > 1 else ''}) made with another {what}: "
                f"a --rerun of part of it would label them as made with this one. Rerun all of it (drop "
                "--visits/--detectors), or write to a new output run (--output-run NAME)")
    if not ctx.rerun:
        if new_config:
            raise ConfigError(
                f"output run {ctx.output_run!r} was made with config {previous.get('config_hash')}, not "
                f"{ctx.config_hash} (they differ in {', '.join(differing[:8])}"
                f"{', ...' if len(differing) > 8 else ''}); write to a new output run (--output-run NAME), or "
                "pass --rerun (rerun=True) to recompute it with this config")
        if new_refcat:
            raise ConfigError(
                f"output run {ctx.output_run!r} was calibrated against reference catalogue "
                f"{previous['refcat']!r}, not {ctx.refcat!r}; write to a new output run (--output-run NAME), "
                f"or pass --rerun (rerun=True) to recalibrate it against {ctx.refcat!r}")
    return True


def _detectors_with_products(store: ArtifactStore, run: str, instrument: str) -> set[tuple[int, int]]:
    """``(visit, detector)`` of every detector of ``run`` that holds a stage's output or a failure record."""
    names = {name for stage in STAGES for name in stage.outputs} | {"detector_failure"}
    found: set[tuple[int, int]] = set()
    for name in sorted(names):
        found |= {(int(r.visit), int(r.detector)) for r in store.query(name, run=run, instrument=instrument)  # type: ignore[arg-type]
                  if r.visit is not None and r.detector is not None}
    return found


def _config_differences(previous: Any, current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, the earlier config read with today's defaults.

    A setting added by an upgrade (with its default) is no difference: the user changed
    nothing, and the code version in the cache keys recomputes what the upgrade changes.
    A record that no longer reads as a config differs everywhere (``["<whole config>"]``).
    """
    if not isinstance(previous, dict):
        return ["<whole config>"]
    try:
        then = calibrate_config_from_dict(previous).to_dict()
    except ConfigError:
        return ["<whole config>"]

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = flat(then), flat(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


#: Set in Dask worker processes that a LocalCluster of ours starts (see :mod:`singleframe.runtime`).
_DASK_WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def make_task_runner(*, max_workers: int = 2, dask_workers: int | None = None,
                     dask_address: str | None = None) -> Any:
    """The task runner that fans detectors out.

    Parameters
    ----------
    max_workers
        Threads of the default :class:`~prefect.task_runners.ThreadPoolTaskRunner`.
    dask_workers
        Start a Dask ``LocalCluster`` with this many single-threaded worker processes.
    dask_address
        Use the existing Dask scheduler at this address (``tcp://host:8786``);
        its workers need ``PREFECT_API_URL`` and access to the store.

    Raises
    ------
    ConfigError
        If both Dask options are given, or prefect-dask is not installed.
    """
    if dask_workers is None and dask_address is None:
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if dask_workers is not None and dask_address is not None:
        raise ConfigError("give either --dask-workers (a local cluster) or --dask-address (an existing "
                          "scheduler), not both")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(f"Dask fan-out needs prefect-dask ({exc}); install it with "
                          f"`pip install 'singleframe[dask]'`") from exc
    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    if dask_workers is not None and dask_workers < 1:
        raise ConfigError(f"--dask-workers must be >= 1, got {dask_workers}")
    # Dask runs tasks in a worker thread that may allocate before singleframe is imported there,
    # and its nanny trims the heap at 64 kB (MALLOC_TRIM_THRESHOLD_); both return the frame-sized
    # temporaries of a detector to the kernel, to be page-faulted again by the next one. One
    # arena and a heap that is kept: 6 x 4096² detectors on a 2-process LocalCluster took
    # 31-34 s with Dask's defaults, 29-30 s with one arena, 25.4-25.7 s with both (2 runs each).
    # Workers forked from the warm fork server inherit that tuning from its `import singleframe`;
    # spawned workers (no fork server) need it in the environment before they start: the nanny's
    # pre-spawn variables. A worker's RSS therefore stays at its high-water mark (~1.1 GB per
    # 4096² worker).
    import dask

    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in _DASK_WORKER_ENV.items()})
    _start_warm_forkserver()
    # One thread per worker process: the steps hold the GIL in per-source loops.
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def _start_warm_forkserver() -> bool:
    """Fork a local cluster's workers from a server that has already imported the calibration.

    With Dask's default (``spawn``) each worker process starts a new interpreter and imports
    distributed, Prefect, singleframe and their dependencies (~3-4 s of CPU each) before its
    first detector, after the flow has started. Here the fork server
    (:func:`~singleframe.runtime.start_worker_forkserver`) imports those modules once and forks
    each worker ready to run (Python's ``forkserver`` start method, also used when the nanny
    restarts a worker). The allocator tuning that ``import singleframe`` applies is inherited
    with the fork; that is also why the nanny's pre-spawn variables, which a forked worker does
    not read, are no longer needed there. Measured, 8 x 4096² detectors on 2 workers (2 runs
    each): first detectors done 12.7-12.8 s -> 10.6 s after the flow process started, 33-35 ->
    30-32 s in all. ``singleframe run --dask-workers`` starts the server before it imports this
    module, so that the server's imports and the flow's run side by side; a server already
    running is kept as it is.

    Returns False (Dask's default stays) where ``forkserver`` does not exist (Windows).
    """
    import multiprocessing

    import dask

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"})
    from distributed.utils import get_mp_context

    # distributed sets its own preload list on its first call, once per process; ours replaces it
    # (read when the server starts: here, or at a restart if the server has died).
    get_mp_context()
    return start_worker_forkserver(WORKER_PRELOAD)


def current_progress_callback() -> ProgressCallback | None:
    """The callback set by :func:`reporting_progress`, if any.

    The flow calls this function rather than reading the context variable: Dask
    pickles the flow's function by value, and a context variable cannot be pickled.
    """
    return _progress_callback.get()


@contextmanager
def reporting_progress(callback: ProgressCallback | None) -> Iterator[None]:
    """Call ``callback(done, total, failed)`` as detectors finish in flows run in this context."""
    token = _progress_callback.set(callback)
    try:
        yield
    finally:
        _progress_callback.reset(token)


def run_calibration(params: CalibrateParams, *, task_runner: Any = None,
                    progress: ProgressCallback | None = None) -> Any:
    """Run :func:`calibrate_visits` with ``params.max_workers`` threads (or the given task runner).

    Returns the final flow-run state; ``progress(done, total, failed)`` is called as detectors finish.
    """
    runner = task_runner or make_task_runner(max_workers=params.max_workers)
    with reporting_progress(progress):
        return calibrate_visits.with_options(task_runner=runner)(params, return_state=True)
