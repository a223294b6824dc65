"""Prefect artifacts of a calibration run: per-visit tables, progress and plot links.

Artifacts are a convenience for the UI: publishing one never fails the run
(a warning is logged instead). Keys are lowercase letters, digits and dashes,
so the Artifacts page shows each visit's history across runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect import get_run_logger

__all__ = ["VisitProgress", "artifact_key", "publish_visit_artifacts", "summary_rows"]

#: Per-detector summary statistics shown in the visit table (names of ``detector_summary`` keys).
SUMMARY_KEYS = ("psfSigma", "zeroPoint", "nPsfStar", "astromOffsetMean", "magLim", "skyBg")


def artifact_key(*parts: Any) -> str:
    """A valid artifact key (lowercase letters, digits, dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(str(p) for p in parts).lower())).strip("-")


def summary_rows(outcomes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per detector: status, wall time, summary statistics or the failure."""
    rows = []
    for o in sorted(outcomes, key=lambda o: (o["data_id"]["visit"], o["data_id"]["detector"])):
        row: dict[str, Any] = {"visit": o["data_id"]["visit"], "detector": o["data_id"]["detector"],
                               "status": o["status"],
                               "wall_s": None if o.get("wall_s") is None else round(float(o["wall_s"]), 2)}
        if o["status"] == "ok":
            row.update({k: (None if v is None else round(float(v), 4)) for k, v in o["summary"].items()})
            row["warnings"] = "; ".join(o.get("warnings", []))[:200]
        else:
            row.update({"stage": o["stage"], "error": o["error"].rsplit(".", 1)[-1], "message": o["message"][:200]})
        rows.append(row)
    return rows


def _warn(what: str, exc: Exception) -> None:
    try:
        get_run_logger().warning("could not publish %s: %s", what, exc)
    except Exception:  # outside a run context there is no run logger; nothing else to tell
        pass


class VisitProgress:
    """A progress artifact per visit, updated as its detectors finish."""

    def __init__(self, output_run: str, n_per_visit: Mapping[int, int]) -> None:
        self.total = dict(n_per_visit)
        self.done = dict.fromkeys(n_per_visit, 0)
        self.failed = dict.fromkeys(n_per_visit, 0)
        self._ids: dict[int, UUID] = {}
        try:
            from prefect.artifacts import create_progress_artifact

            for visit in self.total:
                self._ids[visit] = create_progress_artifact(
                    progress=0.0, key=artifact_key("progress", output_run, "visit", visit),
                    description=f"visit {visit}: detectors done (of {self.total[visit]})")
        except Exception as exc:  # the UI bar is a convenience; never fail the run on it
            _warn("the progress artifacts", exc)

    def update(self, visit: int, ok: bool) -> None:
        self.done[visit] += 1
        self.failed[visit] += int(not ok)
        if visit not in self._ids:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self._ids[visit],
                                     progress=100.0 * self.done[visit] / self.total[visit])
        except Exception as exc:
            _warn(f"the progress of visit {visit}", exc)


def publish_visit_artifacts(output_run: str, visit: int, outcomes: Sequence[Mapping[str, Any]]) -> None:
    """Table of per-detector statistics and failures, and links to the diagnostic plots, for one visit."""
    rows = summary_rows(outcomes)
    n_failed = sum(r["status"] != "ok" for r in rows)
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(key=artifact_key("calibration", output_run, "visit", visit), table=rows,
                              description=f"visit {visit}: {len(rows) - n_failed} of {len(rows)} detectors "
                                          f"calibrated, {n_failed} failed")
        lines = [f"# Diagnostics of visit {visit} (run {output_run})", "",
                 "| detector | status | diagnostic plot |", "|---|---|---|"]
        for o in sorted(outcomes, key=lambda o: o["data_id"]["detector"]):
            det = o["data_id"]["detector"]
            link = f"[PSF, astrometry, photometry, background]({o['plot']})" if o.get("plot") else "-"
            status = o["status"] if o["status"] == "ok" else f"failed in {o['stage']}: {o['error'].rsplit('.', 1)[-1]}"
            lines.append(f"| {det} | {status} | {link} |")
        create_markdown_artifact(key=artifact_key("diagnostics", output_run, "visit", visit),
                                 markdown="\n".join(lines),
                                 description=f"visit {visit}: links to per-detector diagnostic plots in the store")
    except Exception as exc:
        _warn(f"the artifacts of visit {visit}", exc)
