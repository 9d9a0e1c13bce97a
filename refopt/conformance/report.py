"""What `refopt check` prints and writes: the summary table, a JSON report and JUnit XML."""
from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import refopt

STATUSES = ("passed", "failed", "skipped")


def summary_rows(results) -> list[dict]:
    """One row per target x optimizer x dtype."""
    groups = defaultdict(list)
    for r in results:
        groups[(r.target.name, r.vector.optimizer, r.vector.dtype)].append(r)
    rows = []
    for (target, opt, dtype), rs in sorted(groups.items()):
        counts = {s: sum(r.status == s for r in rs) for s in STATUSES}
        ran = [r for r in rs if r.status != "skipped"]
        compared = sum(r.compared for r in ran)
        rows.append(dict(target=target, optimizer=opt, dtype=dtype, **counts,
                         worst_budget_units=max((r.worst_budget_units for r in ran), default=0.0),
                         bitwise_fraction=(sum(r.bitwise for r in ran) / compared) if compared else None))
    return rows


def _fmt_units(x) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.3g}"


def summary_table(results, elapsed: float) -> str:
    head = ("target", "optimizer", "dtype", "passed", "failed", "skipped", "worst (budget units)", "bitwise")
    lines = [head]
    for r in summary_rows(results):
        bw = "-" if r["bitwise_fraction"] is None else f"{100 * r['bitwise_fraction']:.1f}%"
        lines.append((r["target"], r["optimizer"], r["dtype"], str(r["passed"]), str(r["failed"]),
                      str(r["skipped"]), _fmt_units(r["worst_budget_units"]), bw))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    out.append(f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped in {elapsed:.1f} s")
    return "\n".join(out)


def case_dict(r) -> dict:
    d = {"id": r.vector.id, "name": r.vector.name, "optimizer": r.vector.optimizer, "dtype": r.vector.dtype,
         "profile": r.vector.profile, "target": r.target.name, "status": r.status, "message": r.message,
         "worst_budget_units": r.worst_budget_units,
         "bitwise_fraction": r.bitwise_fraction, "first_bad": r.first_bad, "seconds": round(r.seconds, 4)}
    if r.diagnosis is not None:
        d["diagnosis"] = r.diagnosis.as_dict()
    return d


def json_report(results, elapsed: float, vectors_dir: str, extra: dict | None = None) -> dict:
    rows = summary_rows(results)
    return {"tool": "refopt check", "refopt_version": refopt.__version__, "spec_version": refopt.SPEC_VERSION,
            "vectors": str(vectors_dir), "elapsed_s": round(elapsed, 3),
            "totals": {s: sum(r.status == s for r in results) for s in STATUSES},
            "summary": rows, "cases": [case_dict(r) for r in results], **(extra or {})}


def _plain(x):
    """JSON has no NaN/inf: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write_json(path, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_plain(report), f, indent=1, allow_nan=False)
        f.write("\n")


def junit_xml(results, elapsed: float) -> bytes:
    """One <testcase> per vector x target (classname = target, name = vector id and name)."""
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    suites = ET.Element("testsuites", name="refopt check", tests=str(len(results)), failures=str(n["failed"]),
                        errors="0", skipped=str(n["skipped"]), time=f"{elapsed:.3f}")
    by_target = defaultdict(list)
    for r in results:
        by_target[r.target.name].append(r)
    for target, rs in by_target.items():
        suite = ET.SubElement(suites, "testsuite", name=target, tests=str(len(rs)),
                              failures=str(sum(r.status == "failed" for r in rs)), errors="0",
                              skipped=str(sum(r.status == "skipped" for r in rs)),
                              time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            case = ET.SubElement(suite, "testcase", classname=target, name=f"{r.vector.id} {r.vector.name}",
                                 time=f"{r.seconds:.4f}")
            if r.status == "failed":
                el = ET.SubElement(case, "failure", message=r.message[:500], type="ConformanceFailure")
                el.text = r.diagnosis.text() if r.diagnosis is not None else r.message
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=r.message)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, stream=None, min_total: int = 20):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_total = min_total

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.tty or total < self.min_total:
            return
        width = 30
        fill = int(width * done / total)
        self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label[:40]:<40}")
        if done == total:
            self.stream.write("\r" + " " * (width + 60) + "\r")
        self.stream.flush()
