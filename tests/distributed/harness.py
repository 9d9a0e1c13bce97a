"""Run a file's ``cases(rank, world)`` on a gloo process group of local processes (127.0.0.1).

    python tests/distributed/harness.py CASES.py WORLD

starts ranks 1..WORLD-1 itself (refopt.conformance.sharded's launcher, as ``refopt check --shard``
does) and prints rank 0's return value, a JSON-able dict, as the last line of its standard output.
The test modules run it once each and check many cases inside: starting processes that import
torch is the expensive part.
"""
import argparse
import faulthandler
import importlib.util
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("world", type=int)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--store")
    args = parser.parse_args(argv)
    faulthandler.enable()
    faulthandler.dump_traceback_later(600, exit=True)  # never hang a CI job
    from refopt.conformance.sharded import end_ranks, join_group, leave_group, rendezvous, start_ranks

    children, store, finished = [], args.store, False
    if args.rank == 0:  # the others start now, importing torch while this one does
        store = rendezvous()
        argv0 = [sys.executable, __file__, args.cases, str(args.world)]
        children = start_ranks(args.world, lambda r: argv0 + ["--rank", str(r), "--store", store])
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        join_group(args.rank, args.world, store)
        spec = importlib.util.spec_from_file_location("cases", args.cases)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        report = module.cases(args.rank, args.world)
        dist.barrier()
        finished = True
    finally:
        leave_group(True, store if args.rank == 0 else None)
        end_ranks(children, wait=finished)
    if args.rank == 0:
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
