"""Keras' ``Adam`` and ``RMSprop`` update rules as torch optimizers (Keras 3.15, ``keras/src/optimizers``).

torch's own optimizers of the same names compute something else with the same arguments:
``torch.optim.Adam`` adds ε to √v̂ *after* bias correction (Keras adds it to √v before: with
ε = 1e-7 and small gradients the steps differ), and ``torch.optim.RMSprop`` defaults to α = 0.99
and puts ε outside the square root. These classes repeat Keras' ``update_step`` operation by
operation, in the parameters' dtype, with Keras' scalars rounded to that dtype as Keras rounds
them: from the same weights and gradients the weights after a step equal Keras' to the last bit
or two (torch's float32 CPU square root can differ from TF's by an ulp).

The state keeps Keras' variable names (``momentum``, ``velocity``) in ``self.state[p]``, so that
``state_dict()``/``load_state_dict()`` (and Lightning's checkpoints) carry it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as Keras turns a Python float into a tensor of the variable's dtype."""
    return torch.tensor(value, dtype=dtype).item()


def _sqrt(tensors: list[Tensor]) -> list[Tensor]:
    # torch's float32 CPU sqrt can be an ulp off the correctly rounded root TF computes: a 1e-7
    # relative difference, far inside the 1e-6 one-step tolerance, and cheaper than a float64 root.
    return torch._foreach_sqrt(tensors)


def _check_lr(lr: float) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"learning rate must be a number > 0; got lr={lr!r}")


def _check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {name}={value!r}")


def _check_epsilon(epsilon: float) -> None:
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0; got epsilon={epsilon!r}")


def _params_with_grad(group: dict[str, Any]) -> list[Tensor]:
    """The group's parameters that received a gradient; sparse ones are refused."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("sparse gradients are not supported (Keras' dense update rule)")
    return params


class KerasAdam(torch.optim.Optimizer):
    """``keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon)`` (``amsgrad=False``).

    Per step t (from 1), per parameter w with gradient g::

        alpha = lr · sqrt(1 − beta_2^t) / (1 − beta_1^t)
        m += (g − m) · (1 − beta_1)
        v += (g² − v) · (1 − beta_2)
        w −= (m · alpha) / (sqrt(v) + epsilon)

    Keras counts t per optimizer (``iterations``); here each parameter counts the steps in which it
    had a gradient, as torch's optimizers do. The two agree while every parameter gets a gradient
    at every step, as in the recipe's training.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
    ) -> None:
        _check_lr(lr)
        _check_unit_interval("beta_1", beta_1)
        _check_unit_interval("beta_2", beta_2)
        _check_epsilon(epsilon)
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # Parameters with the same dtype and step count share alpha: one foreach batch each.
            batches: dict[tuple[torch.dtype, float], list[Tensor]] = defaultdict(list)
            for p in _params_with_grad(group):
                state = self.state[p]
                if not state:
                    # float32 like torch's own step counters; exact up to 2^24 steps.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                batches[(p.dtype, state["step"].item())].append(p)
            for (dtype, local_step), params in batches.items():
                self._update(group, dtype, local_step, params)
        return loss

    def _update(
        self, group: dict[str, Any], dtype: torch.dtype, local_step: float, params: list[Tensor]
    ) -> None:
        # Keras: lr, beta and the step cast to the variable's dtype, beta ** step with ops.power.
        # torch's pow of 0-dim CPU tensors gives TF's float32 powers (checked for steps 1..3000;
        # TF flushes denormal powers to 0, which 1 - beta^t cannot tell apart).
        lr = torch.tensor(group["lr"], dtype=dtype)
        step = torch.tensor(local_step, dtype=dtype)
        beta_1_power = torch.pow(torch.tensor(group["beta_1"], dtype=dtype), step)
        beta_2_power = torch.pow(torch.tensor(group["beta_2"], dtype=dtype), step)
        alpha = (lr * _sqrt([1 - beta_2_power])[0] / (1 - beta_1_power)).item()
        # Python-side (1 - beta) is computed in float64, then rounded to the variable's dtype.
        one_minus_beta_1 = _rounded(1 - group["beta_1"], dtype)
        one_minus_beta_2 = _rounded(1 - group["beta_2"], dtype)
        epsilon = _rounded(group["epsilon"], dtype)

        grads = [p.grad for p in params]
        momentums = [self.state[p]["momentum"] for p in params]
        velocities = [self.state[p]["velocity"] for p in params]
        delta = torch._foreach_sub(grads, momentums)  # m += (g - m) * (1 - beta_1)
        torch._foreach_mul_(delta, one_minus_beta_1)
        torch._foreach_add_(momentums, delta)
        delta = torch._foreach_mul(grads, grads)  # v += (g² - v) * (1 - beta_2)
        torch._foreach_sub_(delta, velocities)
        torch._foreach_mul_(delta, one_minus_beta_2)
        torch._foreach_add_(velocities, delta)
        update = torch._foreach_mul(momentums, alpha)  # w -= (m * alpha) / (sqrt(v) + epsilon)
        denominator = _sqrt(velocities)
        torch._foreach_add_(denominator, epsilon)
        torch._foreach_div_(update, denominator)
        torch._foreach_sub_(params, update)


class KerasRMSprop(torch.optim.Optimizer):
    """``keras.optimizers.RMSprop(learning_rate, rho, epsilon)`` with ``momentum=0, centered=False``.

    Per step, per parameter w with gradient g::

        v = rho · v + (1 − rho) · g²
        w −= lr · g / sqrt(v + epsilon)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.001,
        rho: float = 0.9,
        epsilon: float = 1e-7,
        momentum: float = 0.0,
        centered: bool = False,
    ) -> None:
        _check_lr(lr)
        _check_unit_interval("rho", rho)
        _check_epsilon(epsilon)
        # Keras' momentum and centered variants are not ported: the recipe uses neither.
        if momentum != 0:
            raise ValueError(f"only momentum=0 is supported (the recipe's); got momentum={momentum!r}")
        if centered:
            raise ValueError(f"only centered=False is supported (the recipe's); got centered={centered!r}")
        super().__init__(params, {"lr": lr, "rho": rho, "epsilon": epsilon})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            batches: dict[torch.dtype, list[Tensor]] = defaultdict(list)
            for p in _params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                batches[p.dtype].append(p)
            for dtype, params in batches.items():
                self._update(group, dtype, params)
        return loss

    def _update(self, group: dict[str, Any], dtype: torch.dtype, params: list[Tensor]) -> None:
        lr = _rounded(group["lr"], dtype)
        rho = _rounded(group["rho"], dtype)
        one_minus_rho = _rounded(1 - group["rho"], dtype)
        epsilon = _rounded(group["epsilon"], dtype)

        grads = [p.grad for p in params]
        velocities = [self.state[p]["velocity"] for p in params]
        squares = torch._foreach_mul(grads, grads)  # v = rho * v + (1 - rho) * g²
        torch._foreach_mul_(squares, one_minus_rho)
        torch._foreach_mul_(velocities, rho)
        torch._foreach_add_(velocities, squares)
        # w -= lr * g / sqrt(v + epsilon)
        denominator = _sqrt(torch._foreach_add(velocities, epsilon))
        increment = torch._foreach_mul(grads, lr)
        torch._foreach_div_(increment, denominator)
        torch._foreach_sub_(params, increment)
