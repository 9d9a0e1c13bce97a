"""What `refopt check` prints and writes: the summary table, a JSON report and JUnit XML."""
from __future__ import annotations

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

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


def cause(r) -> str:
    """What made a case fail, in words shared by every vector that failed the same way."""
    d = r.diagnosis
    if r.faults:
        text = r.faults[0]
    elif d is not None and d.matches:
        return f"matches {d.matches[0]}"
    elif d is not None and getattr(d, "narrowed", ""):
        return d.narrowed
    else:
        text = r.message
    text = re.sub(r"^step \d+: ", "", text)
    text = re.sub(r"; last line on its standard error: .*", "", text)
    return re.sub(r"(?<![\w.])[-+]?\d[\d.eE+-]*", "#", text)  # numbers differ between vectors, not causes


def failure_groups(results) -> list[tuple[str, list]]:
    """(cause, failing results) per target and cause, in the order they first failed."""
    groups: dict = {}
    for r in results:
        if r.status == "failed":
            groups.setdefault((r.target.name, cause(r)), []).append(r)
    return [(c, rs) for (_, c), rs in groups.items()]


def partial_counts(results) -> dict:
    """target -> {reference hyperparameter: number of vectors not run for want of it}."""
    out: dict = defaultdict(Counter)
    for r in results:
        for name in r.unsupported:
            out[r.target.name][name] += 1
    return {t: dict(c) for t, c in out.items()}


def partial_line(results) -> str:
    parts = []
    for target, counts in partial_counts(results).items():
        need = ", ".join(f"{name!r} ({n} vector{'s' if n != 1 else ''})" for name, n in sorted(counts.items()))
        parts.append(f"{target} takes no {need}")
    return "; ".join(parts)


def note_groups(results) -> list[tuple[str, str, int]]:
    """(target, note, number of vectors) for every note, the same note counted once per vector."""
    counts: Counter = Counter()
    for r in results:
        for n in {re.sub(r"^step \d+: ", "", n) for n in r.notes}:
            counts[(r.target.name, n)] += 1
    return [(t, n, c) for (t, n), c in counts.items()]


def case_dict(r) -> dict:
    d = {"id": r.vector.id, "name": r.vector.name, "optimizer": r.vector.optimizer, "dtype": r.vector.dtype,
         "profile": r.vector.profile, "target": r.target.name, "status": r.status, "message": r.message,
         "worst_budget_units": r.worst_budget_units,
         "bitwise_fraction": r.bitwise_fraction, "first_bad": r.first_bad, "seconds": round(r.seconds, 4),
         "notes": list(r.notes), "faults": list(r.faults), "unsupported": list(r.unsupported)}
    if r.status == "failed":
        d["cause"] = cause(r)
    if r.diagnosis is not None:
        d["diagnosis"] = r.diagnosis.as_dict()
    return d


def json_report(results, elapsed: float, vectors_dir: str, extra: dict | None = None) -> dict:
    rows = summary_rows(results)
    return {"tool": "refopt check", "refopt_version": refopt.__version__, "spec_version": refopt.SPEC_VERSION,
            "vectors": str(vectors_dir), "elapsed_s": round(elapsed, 3),
            "totals": {s: sum(r.status == s for r in results) for s in STATUSES},
            "partial": partial_counts(results),
            "failure_groups": [{"cause": c, "target": rs[0].target.name, "vectors": [r.vector.id for r in rs]}
                               for c, rs in failure_groups(results)],
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


#: Characters XML 1.0 does not allow (control characters, surrogates, U+FFFE/U+FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text, limit: int = 20000) -> str:
    """``text`` as XML 1.0 accepts it: forbidden characters replaced by U+FFFD, cut at ``limit``."""
    text = _NOT_XML.sub("\ufffd", str(text))
    return text if len(text) <= limit else text[:limit] + " ..."


def junit_xml(results, elapsed: float) -> bytes:
    """One <testcase> per vector x target (classname = target, name = vector id and name). Every
    text from a port or a vector file is cleaned of what XML 1.0 forbids, so the file always parses."""
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    suites = ET.Element("testsuites", name="refopt check", tests=str(len(results)), failures=str(n["failed"]),
                        errors="0", skipped=str(n["skipped"]), time=f"{elapsed:.3f}")
    by_target = defaultdict(list)
    for r in results:
        by_target[r.target.name].append(r)
    for target, rs in by_target.items():
        suite = ET.SubElement(suites, "testsuite", name=xml_text(target), tests=str(len(rs)),
                              failures=str(sum(r.status == "failed" for r in rs)), errors="0",
                              skipped=str(sum(r.status == "skipped" for r in rs)),
                              time=f"{sum(r.seconds for r in rs):.3f}")
        for r in rs:
            case = ET.SubElement(suite, "testcase", classname=xml_text(target),
                                 name=xml_text(f"{r.vector.id} {r.vector.name}"), time=f"{r.seconds:.4f}")
            if r.status == "failed":
                el = ET.SubElement(case, "failure", message=xml_text(r.message, 500), type="ConformanceFailure")
                el.text = xml_text(r.diagnosis.text() if r.diagnosis is not None else r.message)
            elif r.status == "skipped":
                ET.SubElement(case, "skipped", message=xml_text(r.message, 500))
            if r.notes:
                ET.SubElement(case, "system-out").text = xml_text("\n".join(r.notes))
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
