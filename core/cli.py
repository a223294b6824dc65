"""The ``singleframe`` command line: simulate, ingest, ingest-refcat, run, evaluate, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError, SingleframeError

#: Exit status of ``singleframe run``: the flow itself failed (no detector outcome is known).
EXIT_RUN_FAILED = 1
#: Exit status of every command for a usage, configuration or store error, found before any work.
EXIT_CONFIG_ERROR = 2
#: Exit status of ``singleframe run`` when it finished but one or more detectors failed (recorded
#: as ``detector_failure``; the others are calibrated).
EXIT_DETECTORS_FAILED = 3

_RUN_EPILOG = (f"exit status: 0 every detector calibrated; {EXIT_DETECTORS_FAILED} the run finished but some detectors "
               f"failed (each is listed, and recorded as detector_failure in the store); {EXIT_RUN_FAILED} the run "
               f"itself failed; {EXIT_CONFIG_ERROR} a configuration, input or store error found before any work")


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
    from astropy.io.registry import IORegistryError
    from astropy.table import Table

    from .io.refcat import refcat_from_table, write_refcat

    read_kw: dict[str, Any] = {}
    if args.format is not None:
        read_kw["format"] = args.format
    if args.hdu is not None:
        read_kw["hdu"] = int(args.hdu) if args.hdu.isdigit() else args.hdu
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = Table.read(args.table, **read_kw)
        for w in caught:  # e.g. "multiple tables are present, reading in the first": say it, go on
            hint = "; choose the table with --hdu" if "hdu=" in str(w.message) else ""
            print(f"note: {w.message}{hint}", file=sys.stderr)
    except IORegistryError:  # astropy cannot tell the format from the name (e.g. .txt, .csv.gz)
        raise ConfigError(f"cannot tell the table format of {args.table} from its name; name it with --format (e.g. "
                          "ascii.csv, ascii.ecsv, fits, parquet)") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ConfigError(f"cannot read {args.table} as a table ({type(exc).__name__}: {exc}); give a FITS, Parquet, "
                          "CSV or ECSV table (--format if its name does not say which), and for a FITS file with "
                          "several tables the one to read (--hdu)") from None
    pairs = {}
    for option, items in (("--column", args.column), ("--band", args.band), ("--band-err", args.band_err)):
        pairs[option] = {}
        for item in items or []:
            key, sep, value = item.partition("=")
            if not (sep and key.strip() and value.strip()):
                raise ConfigError(f"{option} {item!r}: expected NAME=COLUMN")
            pairs[option][key.strip()] = value.strip()
    ref = refcat_from_table(table, column_map=pairs["--column"], bands=pairs["--band"],
                            mag_err_columns=pairs["--band-err"] or None, mag_columns=args.magnitudes,
                            epoch_year=args.epoch, flux_unit=args.flux_unit)
    write_refcat(args.store, args.name, ref, nside=args.nside)
    mapping = ", ".join(f"{ours}<-{theirs}" for ours, theirs in ref.meta["column_map"].items())
    print(f"wrote reference catalogue {args.name!r} with {len(ref)} stars to {args.store} (columns {mapping}; "
          f"bands {', '.join(pairs['--band'])}; epoch {'from the table' if 'epoch' in ref.meta['column_map'] else args.epoch})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.dask_workers is not None:
        # The local cluster's fork server imports the calibration while this process imports Prefect.
        from .runtime import start_worker_forkserver

        start_worker_forkserver()
    from pydantic import ValidationError

    from .flows import calibrate
    from .flows.calibrate import CalibrateParams

    try:
        params = CalibrateParams(store=args.store, input_run=args.input_run, output_run=args.output_run,
                                 instrument=args.instrument, visits=args.visits, detectors=args.detectors,
                                 config_file=args.config, refcat=args.refcat, max_workers=args.workers,
                                 rerun=args.rerun, max_failed_fraction=args.max_failed_fraction)
    except ValidationError as exc:
        flag = {"max_workers": "--workers", "config_file": "--config"}
        problems = "; ".join(f"{flag.get(str(e['loc'][0]), '--' + str(e['loc'][0]).replace('_', '-'))}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"invalid option: {problems}") from None
    # The flow checks the same again; here a bad config, a missing refcat or an empty selection is
    # one line and exit status 2, before Prefect starts (and logs a traceback).
    for note in calibrate.prepare_run(params)[3]:
        print(f"note: {note}", file=sys.stderr)
    runner = calibrate.make_task_runner(max_workers=args.workers, dask_workers=args.dask_workers,
                                        dask_address=args.dask_address)

    def progress(done: int, total: int, failed: int) -> None:
        # Plain text on stderr, one line per finished detector: readable in logs and terminals alike.
        sys.stderr.write(f"{done}/{total} detectors done, {failed} failed\n")
        sys.stderr.flush()

    state = calibrate.run_calibration(params, task_runner=runner, progress=None if args.quiet else progress)
    try:  # a run with failed detectors is Failed and holds every detector's outcome
        outcomes = state.result(raise_on_failure=False)
    except Exception:  # a flow that failed before it had outcomes holds none
        outcomes = None
    print(state.message or state.name)
    if not isinstance(outcomes, list):
        return EXIT_RUN_FAILED
    n_failed = 0
    for o in outcomes:
        for text in o.get("warnings", []):
            d = o["data_id"]
            print(f"  visit {d['visit']} detector {d['detector']}: warning: {text}")
        if o["status"] != "ok":
            n_failed += 1
            d = o["data_id"]
            print(f"  visit {d['visit']} detector {d['detector']}: failed in {o['stage']}: {o['message']}")
    return EXIT_DETECTORS_FAILED if n_failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .flows.evaluation import evaluate_run

    rows = evaluate_run(args.store, run=args.output_run, truth_run=args.input_run)
    if not rows:
        from .io.store import ArtifactStore

        n_out = len(ArtifactStore(args.store).query("preliminary_visit_image", run=args.output_run))
        if n_out:
            print(f"run {args.output_run!r} of {args.store} has {n_out} calibrated detectors, but run "
                  f"{args.input_run!r} holds no simulator truth for them: evaluate compares simulated data with "
                  "its truth (real data has none; its quality is in each image's summary statistics and the "
                  "diagnostic plots)", file=sys.stderr)
        else:
            print(f"no calibrated detectors in run {args.output_run!r} of {args.store}; run `singleframe run "
                  f"--store {args.store}` first, or check --store and --output-run", file=sys.stderr)
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

    p = sub.add_parser("ingest", help="ingest post-ISR FITS files (multi-extension, or the first HDU holding a 2-D image)")
    _add_store(p)
    p.add_argument("files", nargs="+", help="FITS files")
    p.add_argument("--run", default="raw", help="run the images are written to (default: %(default)s)")
    p.add_argument("--instrument", default=None, help="instrument name (default: INSTRUME keyword)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override or supply a header keyword, e.g. --set GAIN=1.4 --set FILTER=r")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ingest-refcat", help="build a HEALPix-partitioned reference catalogue from any table")
    _add_store(p)
    p.add_argument("table", help="FITS, Parquet, CSV or ECSV table")
    p.add_argument("--format", default=None, metavar="FORMAT",
                   help="astropy table format when the file name does not tell it (e.g. ascii.csv for a .csv.gz "
                        "or .txt file, ascii.ecsv, fits, parquet)")
    p.add_argument("--hdu", default=None, help="FITS HDU holding the table, number or name (default: the first table; "
                   "2 for an LDAC catalogue)")
    p.add_argument("--name", default="refcat", help="catalogue name, as `run --refcat` takes it (default: %(default)s)")
    p.add_argument("--column", action="append", metavar="OURS=THEIRS",
                   help="column mapping, e.g. --column ra=RA_ICRS --column pm_ra=pmRA; columns of our names (ra, dec, "
                   "ra_err, dec_err, pm_ra, pm_dec, parallax, epoch, ...) are taken as they are")
    p.add_argument("--band", action="append", metavar="BAND=COLUMN", help="flux or magnitude column per band, e.g. "
                   "--band r=phot_r_flux")
    p.add_argument("--band-err", action="append", metavar="BAND=COLUMN",
                   help="error column per band: magnitudes with --magnitudes, else in the flux's unit")
    p.add_argument("--magnitudes", action="store_true",
                   help="band columns are AB magnitudes, converted to nJy (add the AB offset to Vega magnitudes "
                   "first); otherwise they are fluxes")
    p.add_argument("--flux-unit", default=None, metavar="UNIT",
                   help="unit of flux columns that carry none, e.g. nJy, uJy, Jy (required for them)")
    p.add_argument("--epoch", type=float, default=2016.0,
                   help="epoch of the positions (Julian year) unless an epoch column is mapped (default: %(default)s)")
    p.add_argument("--nside", type=int, default=32, help="HEALPix partitioning of the catalogue (default: %(default)s)")
    p.set_defaults(func=cmd_ingest_refcat)

    p = sub.add_parser("run", help="calibrate detectors with the Prefect flow", epilog=_RUN_EPILOG)
    _add_store(p)
    p.add_argument("--input-run", default="raw", help="run holding the ingested images (default: %(default)s)")
    p.add_argument("--output-run", default="calib", help="run the outputs are written to (default: %(default)s)")
    p.add_argument("--instrument", default=None, help="only this instrument's images (default: all)")
    p.add_argument("--visits", type=int, nargs="*", default=None, help="only these visits (default: all)")
    p.add_argument("--detectors", type=int, nargs="*", default=None, help="only these detectors (default: all)")
    p.add_argument("--config", default=None, help="YAML/JSON pipeline config (default: the built-in one)")
    p.add_argument("--refcat", default="refcat", help="reference catalogue name (default: %(default)s)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("SINGLEFRAME_WORKERS", "2")),
                   help="detectors calibrated at once in threads (default: %(default)s, or $SINGLEFRAME_WORKERS)")
    p.add_argument("--rerun", action="store_true", help="recompute every stage (ignore current outputs)")
    p.add_argument("--max-failed-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of detectors that may fail with the Prefect run still Completed (default: 0; "
                   "the exit status is 3 whenever one failed)")
    p.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="fan detectors out on a local Dask cluster of N worker processes (needs prefect-dask)")
    p.add_argument("--dask-address", default=None, metavar="tcp://HOST:PORT",
                   help="fan detectors out on an existing Dask scheduler (e.g. a dask-jobqueue SLURM cluster)")
    p.add_argument("--quiet", action="store_true", help="no per-detector progress lines")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="compare outputs with the simulator's truth")
    _add_store(p)
    p.add_argument("--input-run", default="raw", help="run holding the simulator's truth (default: %(default)s)")
    p.add_argument("--output-run", default="calib", help="run holding the outputs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows (one per detector) as a JSON list")
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
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
