"""Unit tests of tl_torch.augment: Keras' RandomFlip("horizontal") + RandomRotation, torch only.

The numbers marked "recorded from Keras" were printed by Keras 3.15 / TensorFlow 2.21 on CPU
(``_compute_affine_matrix`` on a batch of 8); the cross-framework comparison itself lives in the
parity suite.

Run: python -m pytest tests/test_torch_augment.py -q
"""

from __future__ import annotations

import pytest
import torch

from tl_torch.augment import (
    RandomFlipRotation,
    affine_transform,
    augment,
    flip_horizontal,
    keras_rotation_transform,
)

#: cos(90°) in float32 is -4.4e-8, not 0: a 90° rotation samples up to ~1e-5 pixel away from the
#: integer grid, which moves a 0..255 value by at most 255 · 1e-5.
ROT90_TOLERANCE = 255 * 1e-5
#: torch's float32 sin/cos may differ from TF's by an ulp (~6e-8 for values up to 1); a2 and b2
#: (up to ~160) inherit it times ~160, plus an ulp of their own: 2e-5 covers both.
TRANSFORM_ATOL = 2e-5
#: The identity through normalised coordinates, (2x + 1)/w − 1 and back, is off by ~1e-6 pixel
#: in float32: at most ~255 · 1e-6 on random 0..255 pixels.
IDENTITY_ATOL = 1e-3
#: Sampling through normalised coordinates moves a sample by ~1e-6 pixel on these tiny images;
#: with neighbouring values 10..80 apart that is below 1e-4.
FILL_ATOL = 1e-4

KERAS_ANGLES = [-72.0, -45.0, -13.699999809265137, 0.0, 5.0, 30.0, 72.0, 89.9000015258789]
# a0, a1, a2, b0, b1, b2 for a 160×160 image, recorded from Keras (c0 = c1 = 0).
KERAS_TRANSFORMS_160 = [
    [0.30901697278022766, 0.9510565400123596, -20.67584228515625,
     -0.9510565400123596, 0.30901697278022766, 130.54214477539062],
    [0.7071067094802856, 0.7071067690849304, -32.92997360229492,
     -0.7071067690849304, 0.7071067094802856, 79.50001525878906],
    [0.9715490937232971, 0.23683813214302063, -16.566783905029297,
     -0.23683813214302063, 0.9715490937232971, 21.090476989746094],
    [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
    [0.9961947202682495, -0.08715573698282242, 7.2314019203186035,
     0.08715573698282242, 0.9961947202682495, -6.6263580322265625],
    [0.8660253882408142, -0.5, 50.400978088378906, 0.5, 0.8660253882408142, -29.099021911621094],
    [0.30901697278022766, -0.9510565400123596, 130.54214477539062,
     0.9510565400123596, 0.30901697278022766, -20.67584228515625],
    [0.0017452986212447286, -0.9999984502792358, 158.8611297607422,
     0.9999984502792358, 0.0017452986212447286, -0.13862916827201843],
]
def images(n: int = 2, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.float32)


def translation(tx: float, ty: float = 0.0) -> torch.Tensor:
    """Output pixel (x, y) reads input (x + tx, y + ty)."""
    return torch.tensor([[1.0, 0.0, tx, 0.0, 1.0, ty, 0.0, 0.0]])


def close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=FILL_ATOL, rtol=0)


def row_image(values: list[float]) -> torch.Tensor:
    """A 1×1×4×4 image whose every row is ``values`` (a b c d)."""
    return torch.tensor(values, dtype=torch.float32).expand(4, 4).reshape(1, 1, 4, 4).clone()


# --- flip ---------------------------------------------------------------------------------------

def test_flip_reverses_columns_only_where_asked() -> None:
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    out = flip_horizontal(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert torch.equal(out[1], x[1])


def test_flip_rejects_wrong_flags() -> None:
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2,\)"):
        flip_horizontal(images(2), torch.tensor([1, 0]))


# --- transform numbers --------------------------------------------------------------------------

def test_rotation_transform_equals_recorded_keras_numbers() -> None:
    got = keras_rotation_transform(torch.tensor(KERAS_ANGLES), 160, 160)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[:, :6], torch.tensor(KERAS_TRANSFORMS_160), atol=TRANSFORM_ATOL, rtol=0)
    assert torch.equal(got[:, 6:], torch.zeros(8, 2))


def test_rotation_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"1-D.*\(2, 1\)"):
        keras_rotation_transform(torch.zeros(2, 1), 8, 8)
    with pytest.raises(ValueError, match="height=0"):
        keras_rotation_transform(torch.zeros(2), 0, 8)


# --- rotation -----------------------------------------------------------------------------------

def test_angle_zero_without_flip_is_identity() -> None:
    x = images(3, h=12, w=20)
    out = augment(x, torch.zeros(3, dtype=torch.bool), torch.zeros(3))
    torch.testing.assert_close(out, x, atol=IDENTITY_ATOL, rtol=0)


def test_positive_90_degrees_turns_the_picture_counter_clockwise() -> None:
    # Keras: "A positive value means rotating counter clock-wise". torch.rot90 with k=1 turns the
    # first spatial axis towards the second: counter-clockwise on screen (y pointing down).
    x = images(2, h=17, w=17)
    no_flip = torch.zeros(2, dtype=torch.bool)
    ccw = augment(x, no_flip, torch.full((2,), 90.0))
    torch.testing.assert_close(ccw, torch.rot90(x, 1, dims=(-2, -1)), atol=ROT90_TOLERANCE, rtol=0)
    cw = augment(x, no_flip, torch.full((2,), -90.0))
    torch.testing.assert_close(cw, torch.rot90(x, -1, dims=(-2, -1)), atol=ROT90_TOLERANCE, rtol=0)


def test_augment_rejects_wrong_flags() -> None:
    with pytest.raises(ValueError, match="bool tensor of shape"):
        augment(images(2), torch.tensor([1, 0]), torch.zeros(2))


def test_flip_comes_before_rotation() -> None:
    x = images(1, h=9, w=9)
    flip = torch.ones(1, dtype=torch.bool)
    out = augment(x, flip, torch.full((1,), 90.0))
    expected = torch.rot90(x.flip(-1), 1, dims=(-2, -1))
    torch.testing.assert_close(out, expected, atol=ROT90_TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("tx", "expected"),
    [
        (-2.0, "b a a b"),  # x − 2 ∈ {−2, −1, 0, 1}: −x − 1 below 0
        (3.0, "d d c b"),  # x + 3 ∈ {3, 4, 5, 6}: 2·len − x − 1 above len − 1
        (-4.0, "d c b a"),  # the whole left mirror image
        (4.0, "d c b a"),  # the whole right mirror image
        (8.0, "a b c d"),  # a period (2·len) away
        (-12.0, "d c b a"),
    ],
)
def test_reflect_fill_whole_pixel_shifts(tx: float, expected: str) -> None:
    values = {"a": 10.0, "b": 20.0, "c": 40.0, "d": 80.0}
    out = affine_transform(row_image(list(values.values())), translation(tx), fill_mode="reflect")
    close(out[0, 0, 2], [values[k] for k in expected.split()])


def test_reflect_fill_half_pixel_is_clamped_not_mixed() -> None:
    # −0.5 reflects onto −0.5 and is clamped to 0: pure a; len − 0.5 likewise: pure d.
    out = affine_transform(row_image([10.0, 20.0, 40.0, 80.0]), translation(-0.5), fill_mode="reflect")
    close(out[0, 0, 0], [10.0, 15.0, 30.0, 60.0])
    out = affine_transform(row_image([10.0, 20.0, 40.0, 80.0]), translation(0.5), fill_mode="reflect")
    close(out[0, 0, 0], [15.0, 30.0, 60.0, 80.0])


def test_reflect_fill_vertical_and_fractional() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).reshape(1, 1, 4, 1).expand(1, 1, 4, 3).clone()
    out = affine_transform(x, translation(0.0, -1.25), fill_mode="reflect")
    # y − 1.25 = −1.25 → 0.25 (between rows 0 and 1), −0.25 → −0.75 → clamped 0, 0.75, 1.75
    close(out[0, 0, :, 1], [1.25, 1.0, 1.75, 3.5])


def test_constant_fill_mixes_with_zero() -> None:
    out = affine_transform(row_image([10.0, 20.0, 40.0, 80.0]), translation(-1.5), fill_mode="constant")
    # x − 1.5 = −1.5 (both neighbours outside), −0.5 (half a), 0.5, 1.5
    close(out[0, 0, 0], [0.0, 5.0, 15.0, 30.0])
    out = affine_transform(row_image([10.0, 20.0, 40.0, 80.0]), translation(100.0), fill_mode="constant")
    assert torch.equal(out, torch.zeros_like(out))


def test_nearest_fill_repeats_the_edge() -> None:
    out = affine_transform(row_image([10.0, 20.0, 40.0, 80.0]), translation(2.5), fill_mode="nearest")
    close(out[0, 0, 0], [60.0, 80.0, 80.0, 80.0])


def test_one_transform_for_the_whole_batch_and_dtype_kept() -> None:
    x = images(3).double()
    out = affine_transform(x, translation(1.0)[0])
    assert out.dtype == torch.float64
    assert torch.equal(out, affine_transform(x, translation(1.0).expand(3, 8)))


def test_affine_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'mirror'"):
        affine_transform(images(1), translation(0.0), fill_mode="mirror")
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        affine_transform(images(3), torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"NCHW.*\(3, 16, 16\)"):
        affine_transform(images(1)[0], translation(0.0))
    with pytest.raises(TypeError, match="torch.uint8"):
        affine_transform(images(1).to(torch.uint8), translation(0.0))


# --- the module ---------------------------------------------------------------------------------

def test_eval_mode_returns_the_input() -> None:
    layer = RandomFlipRotation().eval()
    x = images(4)
    assert layer(x) is x


def test_training_mode_equals_augment_with_the_drawn_values() -> None:
    layer = RandomFlipRotation().train()
    x = images(5)
    flips, angles = layer.draw(5, torch.Generator().manual_seed(7))
    out = layer(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, augment(x, flips, angles))
    assert not torch.equal(out, x)


def test_draws_have_keras_distribution() -> None:
    layer = RandomFlipRotation(0.2)
    flips, angles = layer.draw(20000, torch.Generator().manual_seed(0))
    assert flips.dtype == torch.bool and angles.dtype == torch.float32
    # binomial(20000, 1/2) has std 0.0035 in the fraction: 0.02 is over 5 std away
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    assert angles.min() >= -72.0 and angles.max() < 72.0
    assert angles.min() < -71.0 and angles.max() > 71.0  # the whole range is used
    assert abs(angles.mean().item()) < 1.5  # std of the mean: 41.6 / sqrt(20000) = 0.29


def test_draws_are_reproducible_with_a_seed() -> None:
    layer = RandomFlipRotation()
    first = layer.draw(64, torch.Generator().manual_seed(3))
    again = layer.draw(64, torch.Generator().manual_seed(3))
    other = layer.draw(64, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_factor_as_keras_accepts_it() -> None:
    assert RandomFlipRotation(-0.1).factor == (-0.1, 0.1)
    assert RandomFlipRotation((0.3, -0.2)).factor == (-0.2, 0.3)
    _, angles = RandomFlipRotation((0.0, 0.1)).draw(1000, torch.Generator().manual_seed(0))
    assert angles.min() >= 0.0 and angles.max() < 36.0
    for bad in (1.5, (0.1,), (-2.0, 0.1), "0.2"):
        with pytest.raises(ValueError, match="factor must be"):
            RandomFlipRotation(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'wrapped'"):
        RandomFlipRotation(fill_mode="wrapped")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_output_on_the_input_device_and_independent_of_it(device: str) -> None:
    layer = RandomFlipRotation().train()
    x = images(8, h=32, w=24)
    out = layer(x.to(device), torch.Generator().manual_seed(11))
    assert out.device.type == device
    # Draws are made on the CPU and the arithmetic is plain IEEE float32: same pixels anywhere.
    assert torch.equal(out.cpu(), layer(x, torch.Generator().manual_seed(11)))
