"""A torch port right for one tensor and wrong for several: what the multi-tensor run is for.

``FirstGroupLrDOPE`` is refopt.torch.DOPE except that every param group steps with the first
group's learning rate, as a fused kernel that reads its hyperparameters from ``param_groups[0]``
does. With one parameter per optimizer (every single-tensor run) it is exact."""
from __future__ import annotations

import refopt.torch


class FirstGroupLrDOPE(refopt.torch.DOPE):
    def step(self, closure=None):
        own = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = own[0]
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, own):
                group["lr"] = lr
