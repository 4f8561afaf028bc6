"""The shared image check against TensorFlow itself: every kind of file a real folder holds.

Each case is a file generated here (good images of every format and mode, and damaged,
truncated, mislabelled or unsupported ones). TensorFlow's ``tf.image.decode_image(channels=3,
expand_animations=False)`` (the Keras reference's decoder) and :func:`tl_common.images.decode_rgb`
(the port's decoder, and the scan before training) must
- both read it, to the very same pixels (``same``), or
- both refuse it (``refused``), or
- the scan refuses a file TensorFlow reads as something other than the picture, or reads in a
  way the port cannot reproduce (``refused, TF reads``): bad for both trainers, by design.
Never: TensorFlow fails where the port accepts (Keras would crash mid-epoch), or both read it
with different pixels. Then both input pipelines, end to end: RGB at the requested size.
Run: ``python -m pytest tests/test_reliability_images.py -q``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tl_common.images import (
    MAX_PIXELS,
    TF_JPEG_MAX_SAMPLES,
    UnreadableImage,
    decode_bytes,
    decode_rgb,
    sniff_format,
)

SAME, REFUSED, REFUSED_TF_READS = "same", "refused", "refused, TF reads"
#: Decoded pixels (uint8) must be equal, not close: the same libjpeg-turbo IDCT and upsampling for
#: JPEG, lossless formats otherwise.
PIXEL_ATOL = 0
SIZE = 40


# ---- the cases -------------------------------------------------------------------------------

def photo(w: int = 96, h: int = 72, seed: int = 0) -> np.ndarray:
    """A smooth gradient with blocky noise: compresses like a photo, not like random pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    noise = np.kron(rng.normal(0, 20, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (Pillow writes none): colour type 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type,
                                                                 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def bmp(bpp: int, w: int, h: int, rows: list[bytes], palette: bytes = b"", compression: int = 0,
        header: int = 40, top_down: bool = False) -> bytes:
    """A BMP with the given header fields and pixel rows (bottom-up unless ``top_down``)."""
    pixels = b"".join(rows)
    offset = 14 + header + len(palette)
    dib = struct.pack("<IiiHHIIiiII", header, w, -h if top_down else h, 1, bpp, compression,
                      len(pixels), 2835, 2835, len(palette) // 4, 0) + b"\0" * (header - 40)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + palette + pixels


def pad4(row: bytes) -> bytes:
    return row + b"\0" * (-len(row) % 4)


def jpeg_cases(rgb: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    jpg = encode(im, "JPEG", quality=90)
    prog = encode(im, "JPEG", quality=90, progressive=True)
    cmyk = encode(im.convert("CMYK"), "JPEG", quality=90)
    app14 = cmyk.find(b"\xff\xee")
    (app14_len,) = struct.unpack(">H", cmyk[app14 + 2:app14 + 4])
    mid = (jpg.find(b"\xff\xda") + len(jpg)) // 2
    prog_mid = (prog.find(b"\xff\xda") + len(prog)) // 2
    cases = {
        "baseline": (jpg, SAME),
        "progressive": (prog, SAME),
        "4:2:0 subsampling": (encode(im, "JPEG", quality=75, subsampling=2), SAME),
        "4:2:2 subsampling": (encode(im, "JPEG", quality=75, subsampling=1), SAME),
        "restart markers": (encode(im, "JPEG", quality=90, restart_marker_blocks=4), SAME),
        "grayscale": (encode(im.convert("L"), "JPEG", quality=90), SAME),
        "CMYK (Adobe, inverted)": (cmyk, SAME),
        "CMYK without Adobe marker": (cmyk[:app14] + cmyk[app14 + 2 + app14_len:], SAME),
        "odd size 37x23": (encode(Image.fromarray(photo(37, 23)), "JPEG", quality=85), SAME),
        "trailing garbage": (jpg + b"\0garbage" * 8, SAME),
        "stray bytes before EOI": (jpg[:-2] + b"\x00\x13\x37" + jpg[-2:], SAME),
        "damaged: 200 bytes cut from the scan": (jpg[:mid] + jpg[mid + 200:], SAME),
        "damaged: EOI in the middle of the scan": (jpg[:mid] + b"\xff\xd9", SAME),
        "truncated at 50%": (jpg[:len(jpg) // 2], REFUSED),
        "truncated at 90%": (jpg[:int(len(jpg) * 0.9)], REFUSED),
        "truncated: EOI missing": (jpg[:-2], REFUSED),
        "progressive, truncated": (prog[:prog_mid], REFUSED),
        # libjpeg-turbo in TensorFlow and in simplejpeg smooth the missing coefficients apart.
        "progressive, damaged: EOI in the middle": (prog[:prog_mid] + b"\xff\xd9",
                                                    REFUSED_TF_READS),
        "header only": (jpg[:jpg.find(b"\xff\xda")], REFUSED),
        "SOI only": (b"\xff\xd8\xff", REFUSED),
    }
    sos = jpg.find(b"\xff\xda")
    for k in range(6):  # random damage in the entropy-coded data: any safe outcome
        damaged = bytearray(jpg)
        pos = int(rng.integers(sos + 20, len(jpg) - 10))
        for j in range(pos, pos + int(rng.integers(1, 16))):
            damaged[j] = int(rng.integers(0, 256))
        cases[f"random damage {k}"] = (bytes(damaged), None)
    return cases


def png_cases(rgb: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    png = encode(im, "PNG")
    palette = im.convert("P", palette=Image.ADAPTIVE, colors=64)
    idat = png.find(b"IDAT")
    bad_data = bytearray(png)
    bad_data[idat + 40] ^= 0xFF
    bad_crc = bytearray(png)
    bad_crc[png.rfind(b"IEND") - 5] ^= 0xFF  # the last byte of IDAT's CRC
    frames = [Image.fromarray(photo(seed=s)) for s in range(3)]
    return {
        "RGB": (png, SAME),
        "RGBA (alpha dropped)": (encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), SAME),
        "grayscale": (encode(im.convert("L"), "PNG"), SAME),
        "grayscale + alpha": (encode(im.convert("LA"), "PNG"), SAME),
        "palette": (encode(palette, "PNG"), SAME),
        "palette with transparency": (encode(palette, "PNG", transparency=3), SAME),
        "RGB with a transparent colour": (encode(im, "PNG", transparency=(10, 20, 30)), SAME),
        "1-bit": (encode(im.convert("1"), "PNG"), SAME),
        "2-bit grayscale": (encode(im.convert("L"), "PNG", bits=2), SAME),
        "16-bit grayscale": (png16(rng.integers(0, 65536, (h, w)), 0), SAME),
        "16-bit RGB": (png16(rng.integers(0, 65536, (h, w, 3)), 2), SAME),
        "16-bit RGBA": (png16(rng.integers(0, 65536, (h, w, 4)), 6), SAME),
        "16-bit grayscale + alpha": (png16(rng.integers(0, 65536, (h, w, 2)), 4), SAME),
        "gamma chunk (ignored by both)": (png[:33] + png_chunk(b"gAMA", struct.pack(">I", 100000))
                                          + png[33:], SAME),
        "text chunk": (png[:33] + png_chunk(b"tEXt", b"Comment\0hi") + png[33:], SAME),
        "animated (APNG): the default image": (
            encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100), SAME),
        "trailing garbage": (png + b"garbage" * 8, SAME),
        "truncated at 50%": (png[:len(png) // 2], REFUSED),
        "truncated after the image data (no IEND)": (png[:-12], REFUSED),
        "damaged image data": (bytes(bad_data), REFUSED),
        "bad CRC of the image data": (bytes(bad_crc), REFUSED),
        # libpng only warns; Pillow refuses; one rule: refused.
        "bad CRC of a text chunk": (png[:33] + png_chunk(b"tEXt", b"Comment\0hi", crc=1234)
                                    + png[33:], REFUSED_TF_READS),
    }


def gif_cases(rgb: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    frames = [Image.fromarray(photo(seed=s)).convert("P", palette=Image.ADAPTIVE) for s in range(3)]
    still = encode(im.convert("P", palette=Image.ADAPTIVE), "GIF")
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    small = encode(Image.fromarray(photo(40, 30)).convert("P", palette=Image.ADAPTIVE), "GIF")
    return {
        "still": (still, SAME),
        "animated: the first frame": (animated, SAME),
        "animated, later frames optimised": (
            encode(Image.fromarray(photo(seed=0)), "GIF", save_all=True, optimize=True,
                   append_images=[Image.fromarray(photo(seed=1))] * 2, duration=100), SAME),
        "transparency (TensorFlow: black)": (
            encode(im.convert("P", palette=Image.ADAPTIVE, colors=32), "GIF", transparency=0), SAME),
        "animated, truncated in a later frame": (animated[:int(len(animated) * 0.85)], SAME),
        "no trailer": (still[:-1], SAME),
        "truncated in the first frame": (still[:len(still) // 2], REFUSED),
        # TensorFlow returns the frame without its canvas.
        "first frame smaller than the canvas": (small[:6] + struct.pack("<HH", 96, 72) + small[10:],
                                                REFUSED_TF_READS),
    }


def bmp_cases(rgb: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    bgr_top_down = [pad4(rgb[y, :, ::-1].tobytes()) for y in range(h)]
    bgra_bottom_up = [np.concatenate([rgb[y, :, ::-1], np.full((w, 1), 255, np.uint8)], 1).tobytes()
                      for y in range(h - 1, -1, -1)]
    v5 = bytearray(bmp(32, w, h, bgra_bottom_up, compression=3, header=124))
    struct.pack_into("<IIII", v5, 54, 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    v5_rgba = bytearray(v5)
    struct.pack_into("<IIII", v5_rgba, 54, 0x000000FF, 0x0000FF00, 0x00FF0000, 0xFF000000)
    index = rng.integers(0, 16, (h, w))
    palette16 = b"".join(bytes(rng.integers(0, 256, 3).tolist()) + b"\0" for _ in range(16))
    rows4 = [pad4(bytes((int(index[y, 2 * i]) << 4) | int(index[y, 2 * i + 1])
                        for i in range(w // 2))) for y in range(h - 1, -1, -1)]
    rows16 = [pad4(b"".join(struct.pack("<H", (int(r) >> 3 << 10) | (int(g) >> 3 << 5) | int(b) >> 3)
                            for r, g, b in rgb[y])) for y in range(h - 1, -1, -1)]
    grey = rng.integers(0, 256, (h, w)).astype(np.uint8)
    ramp = b"".join(bytes([i, i, i, 0]) for i in range(256))
    rle8 = b"".join(b"".join(bytes([1, int(v)]) for v in grey[y]) + b"\0\0"
                    for y in range(h - 1, -1, -1)) + b"\0\1"
    bgr = encode(im, "BMP")
    rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    return {
        "24-bit": (bgr, SAME),
        "24-bit, odd width (row padding)": (encode(Image.fromarray(photo(37, 23)), "BMP"), SAME),
        "32-bit (from RGBA)": (encode(Image.fromarray(rgba), "BMP"), SAME),
        "8-bit grayscale": (encode(im.convert("L"), "BMP"), SAME),
        "24-bit, top-down": (bmp(24, w, h, bgr_top_down, top_down=True), SAME),
        "32-bit bit fields BGRA (V5 header)": (bytes(v5), SAME),
        # TensorFlow ignores the palette and the bit fields: it reads other pixels.
        "8-bit with a colour palette": (encode(im.convert("P", palette=Image.ADAPTIVE), "BMP"),
                                        REFUSED_TF_READS),
        "32-bit bit fields RGBA": (bytes(v5_rgba), REFUSED_TF_READS),
        "1-bit": (encode(im.convert("1"), "BMP"), REFUSED),
        "4-bit": (bmp(4, w, h, rows4, palette16), REFUSED),
        "16-bit": (bmp(16, w, h, rows16), REFUSED),
        "RLE8-compressed": (bmp(8, w, h, [rle8], ramp, compression=1), REFUSED),
        "trailing bytes": (bgr + b"\0\0", REFUSED),
        "truncated": (bgr[:-100], REFUSED),
    }


def webp_cases(rgb: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    lossy = encode(im, "WEBP", quality=80)
    rgba = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)]))
    frames = [Image.fromarray(photo(seed=s)) for s in range(3)]
    return {
        "lossless": (encode(im, "WEBP", lossless=True), SAME),
        "lossy": (lossy, SAME),
        "with alpha": (encode(rgba, "WEBP", lossless=True), REFUSED),
        "animated": (encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                            duration=100, lossless=True), REFUSED),
        "truncated": (lossy[:len(lossy) // 2], REFUSED),
    }


def other_cases(rgb: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    im = Image.fromarray(rgb)
    return {
        "zero bytes": (b"", REFUSED),
        "text": (b"this is not an image\n", REFUSED),
        "HTML (an error page saved as .jpg)": (b"<html><body>403 Forbidden</body></html>", REFUSED),
        "TIFF": (encode(im, "TIFF"), REFUSED),
        "ICO": (encode(im, "ICO"), REFUSED),
        "PPM": (encode(im, "PPM"), REFUSED),
    }


def all_cases() -> dict[str, tuple[bytes, str | None]]:
    """``"FORMAT: description" -> (file bytes, expected outcome or None for any safe one)``."""
    rng = np.random.default_rng(0)
    rgb = photo()
    groups = {"JPEG": jpeg_cases(rgb, rng), "PNG": png_cases(rgb, rng), "GIF": gif_cases(rgb),
              "BMP": bmp_cases(rgb, rng), "WebP": webp_cases(rgb, rng), "other": other_cases(rgb)}
    return {f"{fmt}: {name}": case for fmt, cases in groups.items() for name, case in cases.items()}


CASES = all_cases()


def tf_decode(data: bytes) -> np.ndarray | None:
    import tensorflow as tf

    try:
        return tf.image.decode_image(data, channels=3, expand_animations=False).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError):
        return None


def port_decode(data: bytes) -> np.ndarray | None:
    try:
        return decode_bytes(data)
    except UnreadableImage:
        return None


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[str, np.ndarray | None, np.ndarray | None]]:
    """Per case: the observed outcome, TensorFlow's pixels and the port's."""
    import tl_keras  # noqa: F401  (TensorFlow's environment, before it is imported)

    found = {}
    for name, (data, _) in CASES.items():
        k, t = tf_decode(data), port_decode(data)
        if k is None and t is None:
            outcome = REFUSED
        elif k is None:
            outcome = "TF fails, the port reads it"
        elif t is None:
            outcome = REFUSED_TF_READS
        elif k.shape == t.shape and np.abs(k.astype(int) - t).max() <= PIXEL_ATOL:
            outcome = SAME
        else:
            outcome = (f"different pixels: max |diff| {np.abs(k.astype(int) - t).max()}"
                       if k.shape == t.shape else f"different shapes {k.shape} {t.shape}")
        found[name] = (outcome, k, t)
    return found


# ---- decoders against TensorFlow ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_decoder_agrees_with_tensorflow(outcomes, name):
    outcome, k, t = outcomes[name]
    expected = CASES[name][1]
    assert outcome in (SAME, REFUSED, REFUSED_TF_READS), f"{name}: {outcome}"
    if expected is not None:
        assert outcome == expected, f"{name}: expected {expected}, got {outcome}"
    if t is not None:
        assert t.dtype == np.uint8 and t.ndim == 3 and t.shape[2] == 3


def test_every_format_has_files_read_the_same(outcomes):
    """Not vacuous: each format TensorFlow reads is covered by files both decode identically."""
    same = {name.split(":")[0] for name, (outcome, _, _) in outcomes.items() if outcome == SAME}
    assert same == {"JPEG", "PNG", "GIF", "BMP", "WebP"}
    assert sum(outcome == SAME for outcome, _, _ in outcomes.values()) >= 45


def test_refusals_say_why():
    reasons = {}
    for name in ("other: zero bytes", "other: TIFF", "JPEG: truncated at 90%",
                 "BMP: 8-bit with a colour palette", "WebP: with alpha"):
        with pytest.raises(UnreadableImage) as err:
            decode_bytes(CASES[name][0])
        reasons[name] = err.value.reason
    assert reasons["other: zero bytes"] == "empty file (0 bytes)"
    assert reasons["other: TIFF"].startswith("not an image TensorFlow reads (JPEG, PNG, GIF, BMP")
    assert reasons["JPEG: truncated at 90%"].startswith("truncated JPEG")
    assert reasons["BMP: 8-bit with a colour palette"].startswith("8-bit BMP with a colour palette")
    assert reasons["WebP: with alpha"].startswith("WebP with alpha")
    assert all("\n" not in r for r in reasons.values())


def test_format_is_told_by_content_not_name(tmp_path):
    """A PNG named .jpg is read as a PNG by both; TensorFlow's magic numbers."""
    png = CASES["PNG: RGB"][0]
    (tmp_path / "really_a_png.jpg").write_bytes(png)
    assert sniff_format(png) == "PNG"
    assert np.array_equal(decode_rgb(tmp_path / "really_a_png.jpg"), decode_bytes(png))
    assert [sniff_format(CASES[n][0]) for n in ("JPEG: baseline", "GIF: still", "BMP: 24-bit",
                                                "WebP: lossy", "other: TIFF")] == [
        "JPEG", "GIF", "BMP", "WebP", None]


# ---- very large images -----------------------------------------------------------------------

def test_size_limit_is_pillows_and_tensorflows():
    """One bound for every format: Pillow's decompression-bomb error (over twice
    MAX_IMAGE_PIXELS) and TensorFlow's JPEG limit (RGB output of 2**29 bytes or more) coincide."""
    assert MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970
    assert MAX_PIXELS * 3 < TF_JPEG_MAX_SAMPLES <= (MAX_PIXELS + 1) * 3


def test_8000x6000_jpeg_decodes_alike(tmp_path):
    """A 48-megapixel photo is no bad file: both decoders, the same pixels."""
    big = np.kron(photo(80, 60), np.ones((100, 100, 1), np.uint8))    # 8000 x 6000
    data = encode(Image.fromarray(big), "JPEG", quality=80)
    k, t = tf_decode(data), port_decode(data)
    assert k is not None and t is not None and t.shape == (6000, 8000, 3)
    assert np.array_equal(k, t)


def test_too_large_jpeg_is_refused_by_both():
    """A JPEG header of 13400 x 13400 (179.6 Mpx > MAX_PIXELS): refused from the header alone."""
    data = bytearray(CASES["JPEG: baseline"][0])
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 13400, 13400)
    assert tf_decode(bytes(data)) is None
    with pytest.raises(UnreadableImage, match="too large: 13400 x 13400 = 179,560,000 pixels"):
        decode_bytes(bytes(data))


# ---- both input pipelines, end to end ----------------------------------------------------------

def test_both_pipelines_give_rgb_at_the_requested_size(outcomes, tmp_path):
    """Every file read the same comes out of both trainers' loaders as RGB SIZE x SIZE, and the
    port's resize is as close to the exact one (parity_tests.exact: TensorFlow's bilinear resize
    in float64) as TensorFlow's own, by the band of tl_common.bands."""
    from parity_tests import exact
    from tl_common import bands
    from tl_keras.data import load_image as keras_load
    from tl_torch.data import load_image as torch_load

    checked = 0
    for i, (name, (outcome, _, _)) in enumerate(outcomes.items()):
        if outcome != SAME:
            continue
        path = tmp_path / f"{i}.jpg"   # every file named .jpg: the content decides
        path.write_bytes(CASES[name][0])
        k = keras_load(str(path), SIZE).numpy()
        t = torch_load(str(path), SIZE).permute(1, 2, 0).numpy()
        assert k.shape == t.shape == (SIZE, SIZE, 3), name
        truth = exact.resize_bilinear(decode_rgb(path), SIZE)
        assert exact.sane(truth, k), name
        band = bands.against_exact(truth, k, t)
        assert band.passed, f"{name}: {band.port_error:.3g} > {band.describe()}"
        checked += 1
    assert checked >= 45
