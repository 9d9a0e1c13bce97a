"""Conformance suite: golden vectors (conformance/v1/), their loader, and the tolerance judge.

    from refopt.conformance import load, judge
    for vec in load(optimizer="dope", dtype="float32"):
        ...  # run the port from vec.param0 / vec.state0 through vec.steps[i].grad
        judge(vec, i, new_param)   # -> Judgement(passed, worst_budget_units, worst_ulps, ...)
"""
from .tolerance import Judgement, judge
from .vectors import Step, Vector, VectorFileError, default_dir, load

__all__ = ["load", "default_dir", "Vector", "Step", "VectorFileError", "judge", "Judgement"]
