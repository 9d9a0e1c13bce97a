"""refopt.torch with ``fused=True``, as ports for ``refopt check --device cuda`` (gpu_check.sh):
every parameter goes through the Triton kernels, and a configuration they cannot take raises
instead of falling back to the eager kernels, so the check is the Triton path's.

    refopt check --port torch:backends/triton_ports.py:DOPEFused --device cuda

``REFOPT_TRITON_ON_CPU=1`` (gpu_check.sh's dry run, with ``TRITON_INTERPRET=1``) sends CPU
parameters through the same kernels under Triton's interpreter.
"""
import functools
import os

import refopt.torch
from refopt.torch import _triton

if os.environ.get("REFOPT_TRITON_ON_CPU") == "1":
    _triton.ON_CPU = True


class DOPEFused(refopt.torch.DOPE):
    __init__ = functools.partialmethod(refopt.torch.DOPE.__init__, fused=True)


class SAVEUSFused(refopt.torch.SAVEUS):
    __init__ = functools.partialmethod(refopt.torch.SAVEUS.__init__, fused=True)
