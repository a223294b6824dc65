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

Retries apply only to :class:`~singleframe.errors.TransientIOError`;
algorithmic failures are recorded once as ``detector_failure`` and the rest
of the visit goes on.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import (
    ConfigError,
    SingleframeError,
    StepFailedError,
    TransientIOError,
    failure_metadata,
)
from ..exposure import Exposure
from ..ids import DataId
from ..io.refs import DatasetRef
from ..io.store import ArtifactStore
from ..steps.config import CalibrateImageConfig, calibrate_config_from_dict, load_calibrate_config
from .stages import STAGES, Stage, StageContext


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
    max_workers: int = Field(2, ge=1, description="Detectors processed concurrently")
    rerun: bool = Field(False, description="Recompute every stage even when its outputs are current")


class RunContext(BaseModel):
    """Small, JSON-serialisable context handed to every task (never pixels)."""

    store: str
    input_run: str
    output_run: str
    refcat: str
    config: dict[str, Any]
    config_hash: str
    rerun: bool = False


def _only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only transient I/O errors are worth another try."""
    try:
        state.result()
    except TransientIOError:
        return True
    except Exception:  # any other failure is deterministic: do not retry
        return False
    return False


def _cache_key(stage: Stage, data_id: DataId, input_refs: dict[str, list[DatasetRef]], ctx: RunContext) -> str:
    payload = {
        "stage": stage.name,
        "data_id": data_id.to_dict(),
        "inputs": {k: sorted(f"{r.uri}#{r.checksum}" for r in v) for k, v in sorted(input_refs.items())},
        "config_hash": ctx.config_hash,
        "code_version": __version__,
    }
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
    input_refs = _input_refs(store, stage, data_id, ctx)
    key = _cache_key(stage, data_id, input_refs, ctx)
    where = {"run": ctx.output_run, "instrument": data_id.instrument, "visit": data_id.visit, "detector": data_id.detector}
    if not ctx.rerun:
        cached = {}
        for name in stage.outputs:
            if not store.exists(name, **where):
                break
            if store.provenance(name, **where).get("cache_key") != key:
                break
            cached[name] = store.ref(name, **where)
        else:
            return cached
    loaded: dict[str, Any] = {}
    for name, refs in input_refs.items():
        objs = [store.get_ref(r) for r in refs]
        loaded[name] = objs if name == "post_isr_image" else objs[0]
    config = calibrate_config_from_dict(ctx.config)
    loader = refcat_loader or _refcat_loader(store, ctx, config)
    try:
        products = stage.compute(loaded, StageContext(data_id, config, loader))
    except StepFailedError as exc:
        # Name the files, so the failure record says which inputs could not be processed.
        exc.metadata.setdefault("input_uris", [r.uri for refs in input_refs.values() for r in refs])
        raise
    provenance = {
        "cache_key": key,
        "stage": stage.name,
        "config_hash": ctx.config_hash,
        "inputs": [{"dataset_type": k, "uri": r.uri, "checksum": r.checksum} for k, v in input_refs.items() for r in v],
    }
    return {name: store.put(name, products[name], provenance=provenance, **where) for name in stage.outputs}


def _refcat_loader(store: ArtifactStore, ctx: RunContext, config: CalibrateImageConfig) -> Callable[[Exposure], Any]:
    from ..io.refcat import load_refcat
    from ..steps.pipeline import refcat_search_radius_deg

    def load(exposure: Exposure) -> Any:
        ra, dec, radius = refcat_search_radius_deg(exposure, config.refcat_margin_arcsec)
        epoch = 2000.0 + (exposure.visit_info.mjd_tai - 51544.5) / 365.25
        return load_refcat(store.root, ctx.refcat, ra_deg=ra, dec_deg=dec, radius_deg=radius, epoch_year=epoch)

    return load


def _make_stage_task(stage: Stage) -> Any:
    @task(name=stage.name, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=_only_transient,
          task_run_name=f"{stage.name}:{{data_id.label}}", description=stage.doc)
    def stage_task(ctx: RunContext, data_id: DataId) -> dict[str, DatasetRef]:
        return run_stage(stage, ctx, data_id)

    return stage_task


STAGE_TASKS = {stage.name: _make_stage_task(stage) for stage in STAGES}


@task(name="calibrate_detector", task_run_name="{data_id.label}")
def calibrate_detector(ctx: RunContext, data_id: DataId) -> dict[str, Any]:
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
        record = {
            "data_id": data_id.to_dict(), "stage": current, "status": "failed",
            "expected": isinstance(exc, SingleframeError), **failure_metadata(exc),
        }
        if not isinstance(exc, StepFailedError):
            record["traceback"] = traceback.format_exc(limit=8)
        store.put("detector_failure", record, **where)
        return {"data_id": data_id.to_dict(), "status": "failed", "stage": current,
                "error": record["failure.type"], "message": str(exc), "wall_s": time.perf_counter() - t0}
    if store.exists("detector_failure", **where):
        store.delete("detector_failure", **where)
    summary = store.get("detector_summary", **where)
    return {"data_id": data_id.to_dict(), "status": "ok", "wall_s": time.perf_counter() - t0,
            "summary": {k: summary.get(k) for k in ("psfSigma", "zeroPoint", "nPsfStar", "astromOffsetMean", "magLim")}}


def discover_data_ids(store: ArtifactStore, params: CalibrateParams) -> list[DataId]:
    refs = store.query("post_isr_image", run=params.input_run, instrument=params.instrument)
    ids = sorted({DataId(r.instrument, int(r.visit), int(r.detector)) for r in refs  # type: ignore[arg-type]
                  if (params.visits is None or r.visit in params.visits)
                  and (params.detectors is None or r.detector in params.detectors)})
    return ids


def _summary_table(outcomes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        row = {"visit": o["data_id"]["visit"], "detector": o["data_id"]["detector"], "status": o["status"],
               "wall_s": round(float(o.get("wall_s", 0.0)), 2)}
        if o["status"] == "ok":
            row.update({k: (None if v is None else round(float(v), 4)) for k, v in o["summary"].items()})
        else:
            row.update({"stage": o["stage"], "error": o["error"].rsplit(".", 1)[-1], "message": o["message"][:200]})
        rows.append(row)
    return rows


@flow(name="calibrate-visits", flow_run_name="calibrate-{params.output_run}", log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=2))
def calibrate_visits(params: CalibrateParams = CalibrateParams()) -> Any:  # noqa: B008 - pydantic default renders in the UI
    """Calibrate every (visit, detector) of the input run; returns per-detector outcomes."""
    logger = get_run_logger()
    # The config is loaded and validated before any pixel is touched.
    config = load_calibrate_config(params.config_file)
    store = ArtifactStore(params.store)
    data_ids = discover_data_ids(store, params)
    if not data_ids:
        return Failed(message=f"no post_isr_image datasets in run {params.input_run!r} of {params.store}")
    ctx = RunContext(store=params.store, input_run=params.input_run, output_run=params.output_run,
                     refcat=params.refcat, config=config.to_dict(), config_hash=config.hash, rerun=params.rerun)
    for instrument in sorted({d.instrument for d in data_ids}):
        _record_config(store, ctx, instrument)
    logger.info("calibrating %d detectors of %d visits with config %s", len(data_ids),
                len({d.visit for d in data_ids}), ctx.config_hash)
    futures = [calibrate_detector.submit(ctx, d) for d in data_ids]
    wait(futures)
    outcomes = [f.result() for f in futures]
    rows = _summary_table(outcomes)
    _publish_artifacts(rows, params)
    n_failed = sum(o["status"] != "ok" for o in outcomes)
    message = f"{len(outcomes) - n_failed} of {len(outcomes)} detectors calibrated, {n_failed} failed"
    logger.info(message)
    return Completed(message=message, data=outcomes)


def _record_config(store: ArtifactStore, ctx: RunContext, instrument: str) -> None:
    """Save the resolved config with the outputs; one run holds the products of one config."""
    where = {"run": ctx.output_run, "instrument": instrument}
    if store.exists("calibrate_config", **where):
        previous = store.get("calibrate_config", **where)
        if previous.get("config_hash") == ctx.config_hash:
            return
        if not ctx.rerun:
            raise ConfigError(
                f"output run {ctx.output_run!r} was made with config {previous.get('config_hash')}, not "
                f"{ctx.config_hash}; write to a new output run, or pass rerun to recompute it with this config"
            )
    store.put("calibrate_config", {"config": ctx.config, "config_hash": ctx.config_hash,
                                   "code_version": __version__}, **where)


def run_calibration(params: CalibrateParams, *, task_runner: Any = None) -> Any:
    """Run :func:`calibrate_visits` with ``params.max_workers`` threads (or the given task runner)."""
    runner = task_runner or ThreadPoolTaskRunner(max_workers=params.max_workers)
    return calibrate_visits.with_options(task_runner=runner)(params, return_state=True)


def _publish_artifacts(rows: list[dict[str, Any]], params: CalibrateParams) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        key = f"calibration-{params.output_run}".lower().replace("_", "-")
        create_table_artifact(key=key, table=rows, description="Per-detector outcome and summary statistics")
    except Exception as exc:  # the UI table is a convenience; never fail the run on it
        get_run_logger().warning("could not publish the summary artifact: %s", exc)
