"""``make bench``: time each calibration stage on simulated detectors.

Each repetition runs in a fresh subprocess so that its peak memory (max RSS)
is its own. Reports median/min/max wall time per stage over the repetitions,
plus a "physical limit" floor: reading the input, writing the outputs and
one PSF-sized convolution over the frame. Results are printed and written as
Markdown and JSON under ``benchmarks/results/`` (``latest.json`` too).

    python -m singleframe.benchmarks --size 4096 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _worker(store_root: str, out_json: str) -> None:
    """One timed calibration of the benchmark detector (in its own process)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .io.refcat import load_refcat
    from .io.store import ArtifactStore
    from .steps.config import load_calibrate_config
    from .steps.pipeline import calibrate_image, refcat_search_radius_deg

    store = ArtifactStore(store_root)
    t0 = time.perf_counter()
    refs = sorted(store.query("post_isr_image", run="raw"), key=lambda r: r.snap or 0)
    snaps = [store.get_ref(r) for r in refs]
    t_read = time.perf_counter() - t0
    config = load_calibrate_config(None)
    ra, dec, radius = refcat_search_radius_deg(snaps[0], config.refcat_margin_arcsec)
    epoch = 2000.0 + (snaps[0].visit_info.mjd_tai - 51544.5) / 365.25
    refcat = load_refcat(store.root, "refcat", ra_deg=ra, dec_deg=dec, radius_deg=radius, epoch_year=epoch)
    t0 = time.perf_counter()
    result = calibrate_image(snaps, refcat, config=config)
    t_cal = time.perf_counter() - t0
    # Floor: write the image outputs once, and one PSF-sized convolution pass.
    from scipy.ndimage import gaussian_filter

    t0 = time.perf_counter()
    out = ArtifactStore(tempfile.mkdtemp(prefix="sf-bench-out-"))
    out.put("preliminary_visit_image", result.preliminary_visit_image, run="bench", instrument="b", visit=1, detector=0)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    gaussian_filter(snaps[0].image, 2.0, truncate=3.0)
    t_conv = time.perf_counter() - t0
    record = {
        "stages_s": dict(result.timings_s), "calibrate_s": t_cal, "read_s": t_read, "write_s": t_write,
        "convolution_s": t_conv, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "n_stars": len(result.single_visit_star_unstandardized),
        "n_psf_stars": len(result.single_visit_psf_star),
    }
    Path(out_json).write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m singleframe.benchmarks", description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", nargs=2, metavar=("STORE", "OUT_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    from .cli import main as cli_main

    work = Path(tempfile.mkdtemp(prefix="sf-bench-"))
    store = str(work / "store")
    t0 = time.perf_counter()
    cli_main(["simulate", "--store", store, "--preset", "bench", "--size", str(args.size)])
    print(f"simulated the benchmark frame in {time.perf_counter() - t0:.1f} s")
    runs = []
    for i in range(args.repeat):
        out_json = work / f"run{i}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "singleframe.benchmarks", "--worker", store, str(out_json)],
                       check=True, env=env)
        runs.append(json.loads(out_json.read_text()))
    rows = _summarise(runs)
    table = _markdown(rows, args.size, args.repeat)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    payload = {"machine": _machine(), "size": args.size, "repeat": args.repeat, "rows": rows}
    (out / f"bench-{args.size}-{stamp}.json").write_text(json.dumps(payload, indent=1))
    (out / f"bench-{args.size}-{stamp}.md").write_text(table)
    (out / "latest.json").write_text(json.dumps(payload, indent=1))
    (out / "latest.md").write_text(table)
    return 0


def _summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    stage_names = list(runs[0]["stages_s"])
    for name in [*stage_names, "calibrate_s", "read_s", "write_s", "convolution_s"]:
        vals = [r["stages_s"][name] if name in r["stages_s"] else r[name] for r in runs]
        rows.append({"step": name.removesuffix("_s"), "wall_s_median": statistics.median(vals),
                     "wall_s_min": min(vals), "wall_s_max": max(vals)})
    floor = statistics.median(r["read_s"] + r["write_s"] + r["convolution_s"] for r in runs)
    total = statistics.median(r["calibrate_s"] for r in runs)
    rows.append({"step": "ratio_to_physical_limit", "value": total / floor if floor else float("nan")})
    rows.append({"step": "peak_rss_mb", "value": max(r["peak_rss_mb"] for r in runs)})
    return rows


def _markdown(rows: list[dict[str, Any]], size: int, repeat: int) -> str:
    lines = [f"Calibration of one simulated {size}x{size} detector, {repeat} runs, single thread ({_machine()})", "",
             "| step | median s | min s | max s |", "|---|---|---|---|"]
    for r in rows:
        if "value" in r:
            lines.append(f"| {r['step']} | {r['value']:.2f} | | |")
        else:
            lines.append(f"| {r['step']} | {r['wall_s_median']:.3f} | {r['wall_s_min']:.3f} | {r['wall_s_max']:.3f} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    raise SystemExit(main())
