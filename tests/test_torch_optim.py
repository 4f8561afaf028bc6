"""Unit tests of tl_torch.optim: Keras' Adam and RMSprop update rules, torch only.

The "recorded from Keras" weights were printed by Keras 3.15 / TensorFlow 2.21 on CPU
(``opt.apply_gradients`` on a ``keras.Variable``); the step-by-step cross-framework comparison
lives in the parity suite.

Run: python -m pytest tests/test_torch_optim.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tl_torch.optim import KerasAdam, KerasRMSprop

#: Relative error allowed when the optimizer runs in float64 against the same formula in float64:
#: a dozen operations, each rounding by at most 2^-53.
FLOAT64_RTOL = 1e-12
#: Relative error allowed for a float32 weight of order 1 against the float64 formula: a few ulps
#: (2^-24 ≈ 6e-8 each) from rounding the weight and Keras' float32 constants (0.999 is 0.99900001).
FLOAT32_WEIGHT_RTOL = 1e-6

W0 = [0.5, -0.25, 0.0, 1.5]
GRADS = [[0.2, -1e-6, 3.0, 0.0], [-0.1, 2e-6, 2.5, 1e-3], [0.3, -1e-6, -4.0, 1e-3]]
# Weights after each step, recorded from Keras: Adam(learning_rate=1e-3), RMSprop(learning_rate=1e-4).
#: The contract's tolerance for one optimizer step from the same weights and gradients.
ONE_STEP_RTOL = 1e-6

KERAS_ADAM = [
    [0.49900001287460327, -0.2497597485780716, -0.0009999923640862107, 1.5],
    [0.49873366951942444, -0.2499113827943802, -0.0019911546260118484, 1.4992581605911255],
    [0.49809834361076355, -0.24991025030612946, -0.002068891189992428, 1.4984016418457031],
]
KERAS_RMSPROP = [
    [0.49968376755714417, -0.24999968707561493, -0.00031622772803530097, 1.5],
    [0.4998311996459961, -0.25000032782554626, -0.0005249236710369587, 1.4997763633728027],
    [0.49956947565078735, -0.25, -0.00028969059349037707, 1.4995906352996826],
]


def keras_adam_step(w: float, g: float, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-7) -> float:
    """One first Adam step (t = 1, m = v = 0) in float64, from Keras' formulas."""
    alpha = lr * math.sqrt(1 - b2**1) / (1 - b1**1)
    m = (g - 0.0) * (1 - b1)
    v = (g * g - 0.0) * (1 - b2)
    return w - (m * alpha) / (math.sqrt(v) + eps)


def keras_rmsprop_step(w: float, g: float, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7) -> float:
    """One first RMSprop step (v = 0) in float64, from Keras' formulas."""
    v = rho * 0.0 + (1 - rho) * g * g
    return w - lr * g / math.sqrt(v + eps)


def run(make: type[torch.optim.Optimizer], steps: list[list[float]], dtype: torch.dtype = torch.float32,
        **kwargs: float) -> list[list[float]]:
    p = torch.nn.Parameter(torch.tensor(W0, dtype=dtype))
    opt = make([p], **kwargs)
    out = []
    for g in steps:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(p.detach().tolist())
    return out


# --- the update rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("w0", [0.0, 0.5])  # 0: the weight is the update itself
@pytest.mark.parametrize("g", [0.2, -3.0, 1e-6, -2e-7])
def test_adam_first_step_closed_form(w0: float, g: float) -> None:
    p = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    p.grad = torch.tensor([g], dtype=torch.float64)
    KerasAdam([p], lr=1e-3).step()
    assert p.item() == pytest.approx(keras_adam_step(w0, g), rel=FLOAT64_RTOL, abs=0)


@pytest.mark.parametrize("w0", [0.0, 0.5])  # 0: the weight is the update itself
@pytest.mark.parametrize("g", [0.2, -3.0, 1e-6, -2e-7])
def test_rmsprop_first_step_closed_form(w0: float, g: float) -> None:
    p = torch.nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    p.grad = torch.tensor([g], dtype=torch.float64)
    KerasRMSprop([p], lr=1e-3).step()
    assert p.item() == pytest.approx(keras_rmsprop_step(w0, g), rel=FLOAT64_RTOL, abs=0)


def test_adam_float32_equals_recorded_keras_weights() -> None:
    assert run(KerasAdam, GRADS, lr=1e-3) == KERAS_ADAM


def test_rmsprop_float32_equals_recorded_keras_weights() -> None:
    assert run(KerasRMSprop, GRADS, lr=1e-4) == KERAS_RMSPROP


def test_float32_update_is_within_the_contract_of_the_exact_one() -> None:
    # torch's float32 CPU sqrt may be an ulp off TF's correctly rounded one: the update then
    # differs by ~1e-7 relative, inside the contract's 1e-6 for one step.
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-2
    p = torch.nn.Parameter(torch.zeros(4096))
    p.grad = g.clone()
    KerasRMSprop([p], lr=1e-3).step()
    exact = -(g.double() * 1e-3) / torch.sqrt(g.double() ** 2 * 0.1 + 1e-7)
    relative = ((p.detach().double() - exact).abs().max() / exact.abs().max()).item()
    assert relative <= ONE_STEP_RTOL


# --- differences from torch's optimizers --------------------------------------------------------

def test_differs_from_torch_adam_with_the_same_epsilon() -> None:
    # With |g| ~ 1e-6, Keras' ε (added to √v before bias correction) weighs sqrt(1/(1-β2)) ≈ 32 times
    # more than torch's: Keras moves lr·g/(|g| + 3.2e-6), torch lr·g/(|g| + 1e-7).
    lr = 1e-3
    keras_like = run(KerasAdam, [[1e-6, -1e-6, 0.0, 1e-6]], lr=lr)[0]
    torch_own = run(torch.optim.Adam, [[1e-6, -1e-6, 0.0, 1e-6]], lr=lr, eps=1e-7)[0]
    assert abs(keras_like[0] - torch_own[0]) > 0.5 * lr
    assert keras_like[0] == pytest.approx(keras_adam_step(0.5, 1e-6), rel=FLOAT32_WEIGHT_RTOL)


def test_differs_from_torch_rmsprop_with_the_same_rho_and_epsilon() -> None:
    # Keras: lr·g/√(v + ε) = lr·1e-6/3.2e-4; torch: lr·g/(√v + ε) = lr·1e-6/4.2e-7.
    lr = 1e-3
    keras_like = run(KerasRMSprop, [[1e-6, -1e-6, 0.0, 1e-6]], lr=lr)[0]
    torch_own = run(torch.optim.RMSprop, [[1e-6, -1e-6, 0.0, 1e-6]], lr=lr, alpha=0.9, eps=1e-7)[0]
    assert abs(keras_like[0] - torch_own[0]) > 1.0 * lr
    assert keras_like[0] == pytest.approx(keras_rmsprop_step(0.5, 1e-6), rel=FLOAT32_WEIGHT_RTOL)


# --- torch optimizer behaviour ------------------------------------------------------------------

@pytest.mark.parametrize(("make", "keys"), [(KerasAdam, {"step", "momentum", "velocity"}),
                                            (KerasRMSprop, {"velocity"})])
def test_state_dict_round_trip_continues_identically(
    make: type[torch.optim.Optimizer], keys: set[str]
) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = make(params, lr=1e-2)

    def step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()

    for k in range(3):
        step(opt, params, grads[k])
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == keys
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = make(resumed_params, lr=0.5)  # the saved lr must win
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 1e-2
    for k in range(3, 5):
        step(opt, params, grads[k])
        step(resumed, resumed_params, grads[k])
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [KerasAdam, KerasRMSprop])
def test_params_without_grad_are_untouched(make: type[torch.optim.Optimizer]) -> None:
    used = torch.nn.Parameter(torch.ones(3))
    unused = torch.nn.Parameter(torch.ones(3))
    opt = make([used, unused], lr=0.1)
    used.grad = torch.ones(3)
    opt.step()
    assert torch.equal(unused.detach(), torch.ones(3))
    assert unused not in opt.state
    assert not torch.equal(used.detach(), torch.ones(3))


def test_adam_counts_steps_per_parameter() -> None:
    # Keras counts optimizer iterations; here a parameter's count advances only with a gradient.
    a, b = (torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in range(2))
    opt = KerasAdam([a, b], lr=1e-3)
    a.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    b.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    assert opt.state[a]["step"].item() == 2.0 and opt.state[b]["step"].item() == 1.0
    # b's first step is a first step (t = 1), not a second one
    assert b.item() == pytest.approx(keras_adam_step(0.0, 1.0), rel=FLOAT64_RTOL)


def test_learning_rate_is_read_from_the_param_group_each_step() -> None:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = KerasRMSprop([p], lr=1e-3)
    opt.param_groups[0]["lr"] = 2e-3  # as an LR scheduler does
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(keras_rmsprop_step(0.0, 1.0, lr=2e-3), rel=FLOAT64_RTOL)


def test_step_returns_the_closure_loss() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = KerasAdam([p])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    assert (p.detach() < 1).all()


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (KerasAdam, {"lr": 0.0}, "lr=0.0"),
        (KerasAdam, {"lr": -1e-3}, "lr=-0.001"),
        (KerasAdam, {"beta_1": 1.0}, "beta_1=1.0"),
        (KerasAdam, {"beta_2": -0.1}, "beta_2=-0.1"),
        (KerasAdam, {"epsilon": -1e-7}, "epsilon=-1e-07"),
        (KerasRMSprop, {"lr": float("nan")}, "lr=nan"),
        (KerasRMSprop, {"rho": 1.5}, "rho=1.5"),
        (KerasRMSprop, {"epsilon": -1.0}, "epsilon=-1.0"),
        (KerasRMSprop, {"momentum": 0.9}, "momentum=0.9"),
        (KerasRMSprop, {"centered": True}, "centered=True"),
    ],
)
def test_bad_arguments_are_named(
    make: type[torch.optim.Optimizer], kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.zeros(1))], **kwargs)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("make", "lr", "expected"), [(KerasAdam, 1e-3, KERAS_ADAM),
                                                      (KerasRMSprop, 1e-4, KERAS_RMSPROP)])
def test_same_weights_on_any_device(device: str, make: type[torch.optim.Optimizer], lr: float,
                                    expected: list[list[float]]) -> None:
    p = torch.nn.Parameter(torch.tensor(W0, device=device))
    opt = make([p], lr=lr)
    for g, w in zip(GRADS, expected, strict=True):
        p.grad = torch.tensor(g, device=device)
        opt.step()
        assert p.device.type == device and opt.state[p]["velocity"].device.type == device
        assert p.detach().cpu().tolist() == w
