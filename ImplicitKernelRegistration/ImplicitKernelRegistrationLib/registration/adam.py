"""Adam for one tensor, as torch.optim.Adam computes it with its defaults, without torch.optim.

torch.optim's optimisers import torch's compiler (torch._dynamo) on their first use: 1.3 s of a
2-core machine, about a tenth of what a radiologist waits for a whole `ikr register`. The two
instance-optimisation stages (key_optimisation.py, residual.py) each fit one tensor for 20-25 steps,
so they use this update instead; its steps equal torch.optim.Adam's (betas 0.9 / 0.999, eps 1e-8,
no weight decay; checked in Testing/test_residual.py). Training keeps torch.optim.AdamW.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam on one tensor that requires grad: call step() after each backward."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        """Hold the tensor, its two moment estimates (zeros) and the settings."""
        self.param = param
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.mean = torch.zeros_like(param)
        self.square = torch.zeros_like(param)

    def step(self) -> None:
        """One bias-corrected Adam update from param.grad, in place; the gradient is then cleared."""
        grad = self.param.grad
        if grad is None:
            return
        self.steps += 1
        with torch.no_grad():
            self.mean.lerp_(grad, 1 - self.beta1)
            self.square.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            step_size = self.lr / (1 - self.beta1**self.steps)
            denom = (self.square.sqrt() / math.sqrt(1 - self.beta2**self.steps)).add_(self.eps)
            self.param.addcdiv_(self.mean, denom, value=-step_size)
        self.param.grad = None
