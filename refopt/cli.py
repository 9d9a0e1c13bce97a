"""The ``refopt`` command: ``refopt check`` (conformance) and ``refopt vectors generate``.

Exit status: 0 every selected vector passed; 1 some vector failed; 2 usage, configuration or
vector-file error (one line on stderr, no traceback); 3 partial: every vector that ran passed, but
some could not be run because the port lacks a hyperparameter they need.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

from . import registry
from .conformance.targets import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_PARTIAL = 0, 1, 2, 3
OPTIMIZERS, DTYPES, PROFILES = tuple(registry.OPTIMIZERS), registry.DTYPES, registry.PROFILES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, status 2
        self.print_usage(sys.stderr)
        raise _Usage(f"{self.prog}: error: {message}")


class _Usage(Exception):
    pass


def _csv(choices):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return items
    return parse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"invalid time limit {text!r} (seconds, > 0)")
    return value


def _file(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("needs a file name")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="refopt", description="SAVEUS/DOPE reference: conformance checks and golden vectors.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("check", help="run the golden vectors on refopt's backends or on a port",
                       description="Run the golden vectors on every installed refopt backend, or on a port "
                                   "(--port). Exit 0 all passed, 1 some failed, 2 usage/configuration/vector error, "
                                   "3 partial (all that ran passed; some vectors need a hyperparameter the port "
                                   "lacks).")
    c.add_argument("--port", action="append", default=[], metavar="KIND:MODULE:NAME",
                   help="a port to check instead of refopt itself: torch:MODULE:CLASS (a torch.optim.Optimizer), "
                        "optax:MODULE:FACTORY (returns a GradientTransformation), python:MODULE:FUNCTION "
                        "(fn(optimizer, param, grad, state, hparams) -> (param, state)); MODULE may be "
                        "path/to/file.py; or exec:COMMAND, a program in any language speaking the port "
                        "protocol (conformance/PROTOCOL.md). Each runs in its own process; repeatable")
    c.add_argument("--hparam-map", metavar="OLD=NEW,...", help="rename reference hyperparameters for the port")
    c.add_argument("--quirks", metavar="NAME=on|off,...",
                   help="quirk overrides the port implements on top of its --profile (spec/quirks.md): it is "
                        "checked against the vectors of that configuration, and a port that takes quirks= gets them")
    c.add_argument("--in-place", action="store_true",
                   help="a python port that updates param and state in place (as a torch optimizer does) "
                        "instead of returning new arrays")
    c.add_argument("--no-multi-tensor", action="store_true",
                   help="skip the multi-tensor run of a torch port (its vectors' tensors together in one optimizer, "
                        "over param groups; by default run after the single-tensor one)")
    c.add_argument("--device", metavar="DEVICE",
                   help="the torch device a torch port's parameters live on (default cpu; e.g. cuda, cuda:1): "
                        "checks a port's GPU path. Sets REFOPT_TORCH_DEVICE for the run, which the workers read")
    c.add_argument("--in-process", action="store_true",
                   help="run a Python port in refopt's own process instead of a worker (to debug it with "
                        "breakpoints; an exit, crash or hang of the port then ends the run)")
    c.add_argument("--shard", type=_positive_int, metavar="N",
                   help="run a torch port with its parameter sharded as FSDP2's fully_shard shards it, in N CPU "
                        "processes (gloo on 127.0.0.1), and judge the gathered result; a failure that the "
                        "unsharded port does not have is diagnosed as such. 0-d vectors are skipped")
    c.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="time limit per vector for a port (default 60); a port over it is ended and the "
                        "vector fails")
    c.add_argument("--optimizer", type=_csv(OPTIMIZERS), help="saveus, dope (comma list)")
    c.add_argument("--dtype", type=_csv(DTYPES), help="float16, bfloat16, float32, float64 (comma list)")
    c.add_argument("--profile", type=_csv(PROFILES),
                   help="vectors of these profiles; a port is checked against one profile (default reference)")
    c.add_argument("--ids", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="ID,...",
                   help="only these vector ids")
    c.add_argument("--vectors", metavar="DIR", help="vector directory (default: the vectors shipped with refopt)")
    c.add_argument("--backend", action="append", default=[], metavar="NAME",
                   help="restrict refopt's own backends (numpy, array-api-strict, torch-cpu, torch-cuda, jax, "
                        "cupy); repeatable. Without it jax (jit-compiled, ~1 s per compilation) runs a sample "
                        "of the vectors; named here it runs all")
    c.add_argument("--report", type=_file, metavar="FILE.json", help="write a JSON report")
    c.add_argument("--junit", type=_file, metavar="FILE.xml",
                   help="write JUnit XML (one testcase per vector x target)")
    c.add_argument("--self-test", action="store_true",
                   help="check that every known porting mistake (refopt.builders.mutants) is rejected")
    c.add_argument("--no-diagnose", action="store_true", help="skip the verdict search for failing vectors")
    c.add_argument("--fuzz", type=_positive_int, metavar="N",
                   help="instead of the vector files, judge N random cases drawn by Hypothesis (budgets computed on "
                        "the fly); a failure is shrunk and written as a vector file (--fuzz-out)")
    c.add_argument("--seed", type=int, default=0, metavar="S", help="the fuzzer's seed (default 0)")
    c.add_argument("--fuzz-time", type=_seconds, metavar="SECONDS", help="stop drawing new cases after this long")
    c.add_argument("--fuzz-out", default="refopt-fuzz", metavar="DIR",
                   help="vector directory a failing fuzz case is written to (default ./refopt-fuzz)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="only the final line")
    g.add_argument("-v", "--verbose", action="store_true", help="every case, and full diagnoses")

    v = sub.add_parser("vectors", help="golden vector files")
    vsub = v.add_subparsers(dest="vectors_command", required=True, parser_class=_Parser)
    gen = vsub.add_parser("generate", help="regenerate the golden vectors")
    gen.add_argument("--out", metavar="DIR", help="output directory (default: the repository's conformance/v1)")
    gen.add_argument("--check", action="store_true", help="verify the committed files instead of writing")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _Usage as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command == "vectors":
        return _generate(args)
    from .conformance.vectors import VectorFileError

    with warnings.catch_warnings():
        # NaN/inf and one-element std in vectors are expected (A2, A5): no warnings about them
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        try:
            return check(args)
        except (ConfigError, VectorFileError) as exc:
            print(f"refopt check: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG


def _select(args):
    from .conformance import vectors

    return vectors.load(args.vectors, optimizer=args.optimizer, dtype=args.dtype, profile=args.profile,
                        ids=args.ids)


def _targets(args):
    from .conformance import backends, ports
    from .conformance.process import DEFAULT_TIMEOUT

    hmap = ports.parse_hparam_map(args.hparam_map)
    quirks = ports.parse_quirks(args.quirks)
    if args.port:
        if args.backend:
            raise ConfigError("--backend selects refopt's own backends; it cannot be combined with --port")
        if args.profile and len(args.profile) > 1:
            raise ConfigError("a port implements one profile: give one --profile with --port")
        profile = args.profile[0] if args.profile else "reference"
        targets = []
        try:
            for spec in args.port:
                targets.append(ports.make_port(
                    spec, hmap, args.optimizer, profile=profile, quirks=quirks,
                    configured=bool(args.profile or args.quirks), in_place=args.in_place,
                    timeout=args.timeout or DEFAULT_TIMEOUT, isolated=not args.in_process, shard=args.shard))
        except BaseException:
            for t in targets:
                t.close()
            raise
        if not args.no_multi_tensor and args.fuzz is None and not args.shard:  # (--shard: sharded runs only)
            from .conformance.multitensor import MultiTensorTarget

            targets += [MultiTensorTarget(t, timeout=args.timeout or DEFAULT_TIMEOUT) for t in targets
                        if t.kind == "torch"]
        return targets
    for option in ("hparam_map", "quirks", "timeout", "shard"):
        if getattr(args, option):
            raise ConfigError(f"--{option.replace('_', '-')} needs --port")
    for flag in ("in_place", "in_process"):
        if getattr(args, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} needs --port")
    avail = backends.available_backends()
    names = args.backend or list(avail)
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise ConfigError(f"--backend {unknown[0]!r} is not available here; available: {', '.join(avail)}")
    targets = []
    for n in names:
        try:
            # a compiled backend runs every vector only when named with --backend
            targets.append(backends.CoreTarget(avail[n](), sample=not args.backend and n in backends.COMPILED))
        except Exception as exc:  # noqa: BLE001 - e.g. a CUDA library without a device
            if args.backend:
                raise ConfigError(f"--backend {n}: cannot start ({exc})") from None
    return targets


def check(args) -> int:
    from .conformance import diagnose, report, runner

    t0 = time.perf_counter()
    if args.fuzz is not None:
        return _fuzz(args, t0)
    vecs = _select(args)
    if args.self_test:
        return _self_test(args, vecs, t0)
    with _torch_device(args):
        return _check(args, vecs, t0)


def _check(args, vecs, t0) -> int:
    from .conformance import diagnose, report, runner

    targets = _targets(args)
    try:
        pairs = runner.plan(vecs, targets)
        for t in targets:  # a multi-tensor run batches the vectors it will get
            if hasattr(t, "prepare"):
                t.prepare([v for v, target in pairs if target is t])
        if not pairs:
            raise ConfigError("no vector selected for the port: none of the configuration it implements "
                              "(--profile, --quirks) for the optimizer it implements (--optimizer)")
        results = []
        try:
            results = runner.run(pairs, progress=report.Progress())
            extra = _port_args(args)
            failed = [r for r in results if r.status == "failed"]
            for i, r in enumerate(failed):
                # the verdict search re-runs the vector ~30 times: bounded so a broken port stays quick
                r.diagnosis = diagnose.diagnose(r, extra, search=not args.no_diagnose and i < 50)
        finally:  # the reports and the summary are written whatever happened
            elapsed = time.perf_counter() - t0
            try:
                _write_reports(args, results, elapsed)
            finally:
                _print_results(args, results, elapsed)
    finally:
        for t in targets:
            if hasattr(t, "close"):
                t.close()
    if all(r.status == "skipped" for r in results):
        if any(r.unsupported for r in results):
            raise ConfigError("every selected vector needs a hyperparameter the port does not take: "
                              + report.partial_line(results))
        raise ConfigError("every selected vector was skipped; nothing was checked")
    if any(r.status == "failed" for r in results):
        return EXIT_FAIL
    return EXIT_PARTIAL if any(r.unsupported for r in results) else EXIT_OK


def _fuzz(args, t0) -> int:
    import pathlib

    from .conformance import diagnose, fuzz, report

    if args.self_test or args.ids or args.vectors:
        raise ConfigError("--fuzz draws its own cases: it cannot be combined with --self-test, --ids or --vectors")
    targets = _targets(args)
    out = pathlib.Path(args.fuzz_out)
    try:
        outcome = fuzz.run(targets, examples=args.fuzz, seed=args.seed, seconds=args.fuzz_time,
                           optimizers=args.optimizer, dtypes=args.dtype, out=out, progress=report.Progress())
        failed = [r for r in outcome.results if r.status == "failed"]
        replay = (*_port_args(args), "--vectors", str(out))
        for r in failed:
            r.diagnosis = diagnose.diagnose(r, replay, search=not args.no_diagnose)
            if not args.quiet:
                print("FAILED " + r.diagnosis.text(), file=sys.stdout)
    finally:
        for t in targets:
            if hasattr(t, "close"):
                t.close()
    elapsed = time.perf_counter() - t0
    stop = " (time limit reached)" if outcome.stopped_by_time else ""
    verdict = f"a failure, shrunk and written to {outcome.path}" if failed else "no failure"
    print(f"fuzz: {outcome.examples} case(s), seed {args.seed}{stop}: {verdict} in {elapsed:.1f} s", file=sys.stdout)
    _write_reports(args, outcome.results, elapsed, {"fuzz": {"examples": outcome.examples, "seed": args.seed,
                                                             "written": str(outcome.path) if failed else None}})
    return EXIT_FAIL if failed else EXIT_OK


@contextlib.contextmanager
def _torch_device(args):
    """``--device``: REFOPT_TORCH_DEVICE for the run (torch ports' workers inherit it), restored after."""
    if not args.device:
        yield
        return
    from .conformance.adapters import DEVICE_VARIABLE

    if not args.port or not all(spec.startswith("torch:") for spec in args.port):
        raise ConfigError("--device needs --port torch:MODULE:CLASS (the device of a torch port's parameters)")
    try:
        import torch

        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device here")
        torch.empty(0, device=device)
    except Exception as exc:  # noqa: BLE001 - not a device name, or not usable here
        raise ConfigError(f"--device {args.device}: {exc}") from None
    old = os.environ.get(DEVICE_VARIABLE)
    os.environ[DEVICE_VARIABLE] = args.device
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DEVICE_VARIABLE, None)
        else:
            os.environ[DEVICE_VARIABLE] = old


def _port_args(args) -> tuple:
    out = ["--device", args.device] if args.device else []
    if args.optimizer and args.port:
        out += ["--optimizer", ",".join(args.optimizer)]
    if args.hparam_map:
        out += ["--hparam-map", args.hparam_map]
    if args.quirks:
        out += ["--quirks", args.quirks]
    if args.in_place:
        out += ["--in-place"]
    if args.shard:
        out += ["--shard", str(args.shard)]
    if args.vectors:
        out += ["--vectors", args.vectors]
    if args.profile:
        out += ["--profile", ",".join(args.profile)]
    return tuple(out)


def _print_results(args, results, elapsed):
    from .conformance import report

    out = sys.stdout
    if args.verbose:
        for r in results:
            line = f"{r.status.upper():7s} {r.target.name}  {r.vector.id} {r.vector.name}"
            print(line + (f"  ({r.message})" if r.message and r.status != "failed" else ""), file=out)
    groups = report.failure_groups(results)
    if not args.quiet:
        for cause, rs in groups[: None if args.verbose else 10]:
            first = rs[0]
            print("FAILED " + (first.diagnosis.text() if first.diagnosis else f"{first.vector.id}: {first.message}"),
                  file=out)
            if len(rs) > 1:
                ids = [r.vector.id for r in rs[1:]]
                shown = ids if args.verbose else ids[:6]
                more = f", ... ({len(ids) - len(shown)} more; -v lists all)" if len(shown) < len(ids) else ""
                print(f"  the same cause in {len(ids)} more vector(s): {', '.join(shown)}{more}", file=out)
        if len(groups) > 10 and not args.verbose:
            rest = sum(len(rs) for _, rs in groups[10:])
            print(f"... and {len(groups) - 10} more causes of failure in {rest} vector(s) (-v lists all)", file=out)
        for target, note, n in report.note_groups(results):
            print(f"NOTE {target}: {note} ({n} vector{'s' if n != 1 else ''})", file=out)
        print(report.summary_table(results, elapsed), file=out)
    else:
        n = {s: sum(r.status == s for r in results) for s in report.STATUSES}
        print(f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped in {elapsed:.1f} s", file=out)
    if any(r.unsupported for r in results):
        print(f"PARTIAL: {report.partial_line(results)}; those vectors were not run", file=out)


def _write_reports(args, results, elapsed, extra=None):
    from .conformance import report, vectors

    vdir = args.vectors or str(vectors.default_dir())
    try:
        if args.report:
            report.write_json(args.report, report.json_report(results, elapsed, vdir, extra))
        if args.junit:
            with open(args.junit, "wb") as f:
                f.write(report.junit_xml(results, elapsed))
    except OSError as exc:
        raise ConfigError(f"cannot write report: {exc}") from None


def _self_test(args, vecs, t0) -> int:
    from .builders import mutants
    from .conformance import ports, report, runner

    if args.port or args.backend or args.shard:
        raise ConfigError("--self-test checks refopt's own mistake catalogue; drop --port/--backend/--shard")
    rows, all_results = [], []
    for m in mutants.CATALOGUE:
        target = ports.PythonPort(f"refopt.builders.mutants:{m.name}", fn=mutants.port_function(m.name))
        mine = [v for v in vecs if v.optimizer == m.optimizer]
        results = runner.run(runner.plan(mine, [target]))
        all_results += results
        caught = [r.vector.id for r in results if r.status == "failed"]
        rows.append({"mutant": m.name, "optimizer": m.optimizer, "clause": m.clause, "mistake": m.mistake,
                     "detected": bool(caught), "caught_by": caught})
    elapsed = time.perf_counter() - t0
    detected = sum(r["detected"] for r in rows)
    for r in rows:
        if args.verbose or not r["detected"]:
            state = f"caught by {len(r['caught_by'])} vector(s)" if r["detected"] else "SURVIVED"
            print(f"{r['mutant']:36s} {r['clause']:18s} {state}", file=sys.stdout)
    print(f"self-test: {detected}/{len(rows)} mutants detected in {elapsed:.1f} s", file=sys.stdout)
    _write_reports(args, all_results, elapsed, {"self_test": rows})
    return EXIT_OK if detected == len(rows) else EXIT_FAIL


def _generate(args) -> int:
    try:
        from .builders import generate
    except ImportError as exc:
        print(f"refopt vectors generate: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    argv = (["--out", args.out] if args.out else []) + (["--check"] if args.check else [])
    return int(generate.main(argv) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
