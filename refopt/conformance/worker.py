"""Serve a Python port over the refopt port protocol (conformance/PROTOCOL.md).

    python -m refopt.conformance.worker [--optimizer dope] [--in-place] torch:my_package.optim:DOPE

`refopt check --port torch:...` (and ``optax:``, ``python:``) runs the port through this worker,
in its own process: an exit, a crash, a hang or a flood of output then costs one vector, never the
run. The worker keeps the protocol's channel to itself: what the port prints to standard output
(Python or C) goes to standard error, and the port reads end-of-file from standard input.
A port that cannot be loaded is reported as one line on standard error, exit status 2.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys

from . import protocol
from .targets import ConfigError, PortFailure, SkipVector

EXIT_CONFIG = 2


def claim_stdio():
    """(protocol out, protocol in): private copies of fds 1 and 0; fd 1 then points at standard
    error and fd 0 at /dev/null, so the port cannot write into or read from the channel."""
    out_fd, in_fd = os.dup(1), os.dup(0)
    sys.stdout.flush()
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return os.fdopen(out_fd, "wb"), os.fdopen(in_fd, "rb")


def serve(adapter, out, lines, answer=None) -> None:
    """Answer every case message read from ``lines`` on ``out``: with ``answer(case)``'s messages,
    by default ``run_case``'s."""
    answer = answer or (lambda case: run_case(adapter, case))

    def send(message):
        out.write(protocol.dumps(message))
        out.flush()

    send(protocol.hello_message(**adapter.hello()))
    for line in lines:
        if not line.strip():
            continue
        try:
            case = protocol.read_case(protocol.loads(line))
        except protocol.ProtocolError as exc:
            send({"type": "error", "message": f"worker: {exc}"})
            continue
        for message in answer(case):
            send(message)


def run_case(adapter, case):
    """The messages answering one case: a step per gradient, or an error/skip instead."""
    k = 0
    try:
        for result in adapter.run(case):
            k += 1
            try:
                message = protocol.step_message(k, result)
            except (ValueError, TypeError) as exc:
                yield {"type": "error", "message": f"step {k}: {adapter.name} returned an array that cannot "
                                                   f"be sent ({exc})"}
                return
            yield message
    except SkipVector as exc:
        yield {"type": "skip", "reason": str(exc)} if k == 0 else {"type": "error", "message": str(exc)}
    except PortFailure as exc:
        yield {"type": "error", "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - sys.exit, KeyboardInterrupt, ... in a port's step
        what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else \
            f"raised {type(exc).__name__}: {exc}"
        yield {"type": "error", "message": f"step {k + 1}: {adapter.name} {what}"}


def main(argv=None) -> int:
    out, lines = claim_stdio()
    faulthandler.enable()  # a crash in native code leaves its Python traceback on standard error
    parser = argparse.ArgumentParser(prog="python -m refopt.conformance.worker")
    parser.add_argument("port", help="KIND:MODULE:NAME, KIND:path/to/file.py:NAME, or MODULE:NAME")
    parser.add_argument("--optimizer", help="saveus, dope (comma list): what the port implements")
    parser.add_argument("--in-place", action="store_true",
                        help="a python port that updates param and state in place, as a torch optimizer does")
    args = parser.parse_args(argv)
    from .adapters import make_adapter

    try:
        adapter = make_adapter(args.port, in_place=args.in_place,
                               optimizers=args.optimizer.split(",") if args.optimizer else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        serve(adapter, out, lines)
    except BrokenPipeError:  # the runner has gone
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
