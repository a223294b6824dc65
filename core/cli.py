"""The ``singleframe`` command line: simulate, ingest, run, evaluate, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import SingleframeError


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="demo_store", help="artifact store root: a directory or an fsspec URL (default: %(default)s)")


def cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from .flows.simulate import write_simulated_survey
    from .io.store import ArtifactStore
    from .sim.config import SimulationConfig, benchmark_config

    config = SimulationConfig() if args.preset == "demo" else benchmark_config(size=args.size)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    store = ArtifactStore(args.store)
    n = write_simulated_survey(store, config, run=args.run, refcat=args.refcat,
                               progress=lambda msg: print(msg, flush=True))
    print(f"wrote {n} detectors and reference catalogue {args.refcat!r} to {store.root}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .io.ingest import ingest_files
    from .io.store import ArtifactStore

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key.strip().upper()] = _parse_value(value)
    report = ingest_files(ArtifactStore(args.store), args.files, run=args.run, instrument=args.instrument,
                          overrides=overrides)
    for ref in report.refs:
        print(f"ingested {ref.uri}")
    for path, message in report.failures:
        print(f"FAILED {path}: {message}", file=sys.stderr)
    return 1 if report.failures and not report.refs else (2 if report.failures else 0)


def cmd_ingest_refcat(args: argparse.Namespace) -> int:
    from astropy.table import Table

    from .io.refcat import refcat_from_table, write_refcat

    table = Table.read(args.table)
    column_map = dict(item.split("=", 1) for item in (args.column or []))
    bands = dict(item.split("=", 1) for item in (args.band or []))
    errs = dict(item.split("=", 1) for item in (args.band_err or []))
    ref = refcat_from_table(table, column_map=column_map, bands=bands, mag_err_columns=errs or None,
                            mag_columns=args.magnitudes, epoch_year=args.epoch)
    write_refcat(args.store, args.name, ref, nside=args.nside)
    print(f"wrote reference catalogue {args.name!r} with {len(ref)} stars to {args.store}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .flows.calibrate import CalibrateParams, make_task_runner, run_calibration

    params = CalibrateParams(store=args.store, input_run=args.input_run, output_run=args.output_run,
                             instrument=args.instrument, visits=args.visits, detectors=args.detectors,
                             config_file=args.config, refcat=args.refcat, max_workers=args.workers, rerun=args.rerun)
    runner = make_task_runner(max_workers=args.workers, dask_workers=args.dask_workers,
                              dask_address=args.dask_address)

    def progress(done: int, total: int, failed: int) -> None:
        # Plain text on stderr, one line per finished detector: readable in logs and terminals alike.
        sys.stderr.write(f"{done}/{total} detectors done, {failed} failed\n")
        sys.stderr.flush()

    state = run_calibration(params, task_runner=runner, progress=None if args.quiet else progress)
    outcomes = state.result(raise_on_failure=False) if state.is_completed() else None
    print(state.message or state.name)
    if isinstance(outcomes, list):
        for o in outcomes:
            if o["status"] != "ok":
                d = o["data_id"]
                print(f"  visit {d['visit']} detector {d['detector']}: failed in {o['stage']}: {o['message']}")
    return 0 if state.is_completed() else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .flows.evaluation import evaluate_run

    rows = evaluate_run(args.store, run=args.output_run, truth_run=args.input_run)
    if not rows:
        print(f"no calibrated detectors with simulator truth in run {args.output_run!r} of {args.store} "
              f"(truth run {args.input_run!r}); run `singleframe run --store {args.store}` first, or check "
              "--store, --output-run and --input-run", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1, default=lambda v: None))
    else:
        from .sim.evaluation import format_evaluation_table

        print(format_evaluation_table(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .deployments.serve import serve

    return serve(port=args.port, worker_limit=args.worker_limit)


def _parse_value(value: str) -> Any:
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="singleframe", description="Single-frame calibration of survey images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulate a survey (inputs, reference catalogue and truth) into a store")
    _add_store(p)
    p.add_argument("--preset", choices=["demo", "bench"], default="demo",
                   help="demo: 2 visits x 4 detectors of 2048x2048 (one visit with two snaps); bench: one detector")
    p.add_argument("--size", type=int, default=4096, help="detector size for --preset bench (pixels)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    p.add_argument("--run", default="raw", help="run name for the inputs (default: %(default)s)")
    p.add_argument("--refcat", default="refcat", help="reference catalogue name (default: %(default)s)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ingest", help="ingest post-ISR FITS files (multi-extension or plain single-HDU)")
    _add_store(p)
    p.add_argument("files", nargs="+", help="FITS files")
    p.add_argument("--run", default="raw")
    p.add_argument("--instrument", default=None, help="instrument name (default: INSTRUME keyword)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override or supply a header keyword, e.g. --set GAIN=1.4 --set FILTER=r")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ingest-refcat", help="build a HEALPix-partitioned reference catalogue from any table")
    _add_store(p)
    p.add_argument("table", help="FITS, Parquet, CSV or ECSV table")
    p.add_argument("--name", default="refcat")
    p.add_argument("--column", action="append", metavar="OURS=THEIRS",
                   help="column mapping, e.g. --column ra=RA_ICRS --column pm_ra=pmRA")
    p.add_argument("--band", action="append", metavar="BAND=COLUMN", help="flux or magnitude column per band")
    p.add_argument("--band-err", action="append", metavar="BAND=COLUMN", help="error column per band")
    p.add_argument("--magnitudes", action="store_true", help="band columns are AB magnitudes (converted to nJy)")
    p.add_argument("--epoch", type=float, default=2016.0, help="epoch of the positions (Julian year)")
    p.add_argument("--nside", type=int, default=32)
    p.set_defaults(func=cmd_ingest_refcat)

    p = sub.add_parser("run", help="calibrate detectors with the Prefect flow")
    _add_store(p)
    p.add_argument("--input-run", default="raw")
    p.add_argument("--output-run", default="calib")
    p.add_argument("--instrument", default=None)
    p.add_argument("--visits", type=int, nargs="*", default=None)
    p.add_argument("--detectors", type=int, nargs="*", default=None)
    p.add_argument("--config", default=None, help="YAML/JSON pipeline config")
    p.add_argument("--refcat", default="refcat")
    p.add_argument("--workers", type=int, default=int(os.environ.get("SINGLEFRAME_WORKERS", "2")))
    p.add_argument("--rerun", action="store_true", help="recompute every stage (ignore current outputs)")
    p.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="fan detectors out on a local Dask cluster of N worker processes (needs prefect-dask)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                   help="fan detectors out on an existing Dask scheduler (e.g. a dask-jobqueue SLURM cluster)")
    p.add_argument("--quiet", action="store_true", help="no per-detector progress lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="compare outputs with the simulator's truth")
    _add_store(p)
    p.add_argument("--input-run", default="raw")
    p.add_argument("--output-run", default="calib")
    p.add_argument("--json", action="store_true", help="print one JSON object per detector")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="start a local Prefect server, register deployments and a worker")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--worker-limit", type=int, default=2, help="flow runs the worker runs at once")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Offline-friendly defaults (before Prefect is imported): no usage telemetry from the client
    # or from the temporary server; set the variables yourself to change them.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a server, Prefect starts a temporary one; its default 20 s start-up limit is too
    # short on a loaded 2-core machine (observed: migrations alone take 10-20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SingleframeError as exc:
        print(f"singleframe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
