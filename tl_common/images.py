"""Image files as TensorFlow reads them, and the check that finds the ones it cannot read.

The Keras reference decodes with ``tf.image.decode_image(channels=3, expand_animations=False)``;
the port decodes with :func:`decode_rgb` here, whose rules were read from TensorFlow's decoders
(``decode_image_op.cc``, ``jpeg_mem.cc``) and checked against them file by file
(``tests/test_reliability_images.py``): a file that :func:`decode_rgb` accepts is one TensorFlow
decodes too, to the same pixels, and a file it refuses is one TensorFlow cannot read, reads
differently, or reads as something other than the picture. Those are "bad" for both trainers:
:func:`scan_images` finds them all before training starts, so neither framework crashes mid-epoch
and both train on the same list.

What TensorFlow reads, and how (all come out RGB, uint8):
- the format is told by the first bytes, not the name: JPEG, PNG, GIF, BMP, WebP; anything else
  (TIFF, text, an empty file) is refused;
- JPEG: libjpeg-turbo, fast integer IDCT, fancy upsampling (simplejpeg here: the same pixels);
  a file whose data ends early is refused, one with recoverable damage is decoded through it;
  CMYK/YCCK converted by TensorFlow's own formula; grayscale replicated;
- PNG: 16-bit samples keep their high byte, alpha is dropped (not blended), palettes expanded;
- GIF: the first frame, transparent pixels black; a first frame smaller than the canvas is
  refused (TensorFlow returns it without its canvas);
- BMP: TensorFlow's own reader takes 8, 24 and 32 bits per pixel, ignores the palette and the
  compression: the file is accepted only where that gives the picture (Pillow's reading);
- WebP: still images without alpha only (TensorFlow refuses alpha or animation with 3 channels).

Pillow's own decoders refuse truncated files (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image
from tqdm import tqdm

#: Pixels (width x height) above which a file is refused in both frameworks. Pillow refuses
#: images over twice ``Image.MAX_IMAGE_PIXELS`` (89,478,485) as decompression bombs, and
#: TensorFlow's JPEG decoder refuses RGB images of 2**29 bytes or more: the same bound, 178,956,970
#: pixels (about 13,377 x 13,377; a photo of 8000 x 6000 is 48 Mpx). One bound for every format,
#: so the list of files never depends on which decoder would have choked first.
MAX_PIXELS = 178_956_970
#: TensorFlow's JPEG decoder refuses an output of this many samples (height x width x components).
TF_JPEG_MAX_SAMPLES = 1 << 29
#: The formats ``tf.image.decode_image`` reads, by their first bytes (``ClassifyFileFormat``).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")
TRUNCATED_JPEG = "truncated JPEG (the data ends before the image does)"
#: Lists this long get a progress bar while they are checked (shorter ones are done at once).
PROGRESS_MIN_FILES = 1000


class UnreadableImage(ValueError):
    """A file neither framework can read (the same way): ``reason`` says why, in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BadImage:
    """A file :func:`scan_images` refused: its path (relative to the data root) and why."""

    path: str
    reason: str


def sniff_format(data: bytes) -> str | None:
    """The format TensorFlow would decode ``data`` as, from its first bytes; None if none."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"GIF8"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith(b"RIFF") and len(data) > 12 and data[8:12] == b"WEBP":
        return "WebP"
    return None


def decode_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """A file's pixels as uint8 (H, W, 3), as ``tf.image.decode_image(channels=3,
    expand_animations=False)`` gives them; :class:`UnreadableImage` if it is a bad file."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_bytes(data)


def decode_bytes(data: bytes) -> np.ndarray:
    """:func:`decode_rgb` on the bytes of a file."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnreadableImage(f"not an image TensorFlow reads ({', '.join(FORMATS)}): "
                              f"it starts with {data[:8]!r}")
    try:
        return _DECODERS[fmt](data)
    except (UnreadableImage, MemoryError):
        raise
    except Exception as err:  # Pillow's parsers raise many types on damaged files
        raise UnreadableImage(f"corrupt {fmt} ({_message(err)})") from None


def _message(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"too large: {width} x {height} = {width * height:,} pixels "
                              f"(at most {MAX_PIXELS:,})")


# ---- JPEG -----------------------------------------------------------------------------------

def _simplejpeg(data: bytes, colorspace: str, strict: bool) -> np.ndarray:
    # TensorFlow's defaults: dct_method="INTEGER_FAST" (fastdct), fancy upsampling.
    return simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=True, fastupsample=False,
                                  strict=strict)


def _decode_jpeg(data: bytes) -> np.ndarray:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        if b"\xff\xda" not in data:  # no scan: the file ends inside its header
            raise UnreadableImage(TRUNCATED_JPEG) from None
        raise UnreadableImage(f"corrupt JPEG ({_message(err)})") from None
    _check_size(width, height)
    components = {"Gray": 1, "CMYK": 4, "YCCK": 4}.get(colorspace, 3)
    if width * height * components >= TF_JPEG_MAX_SAMPLES:
        raise UnreadableImage(f"too large for TensorFlow's JPEG decoder: {width} x {height} x "
                              f"{components} components")
    cmyk = components == 4
    out = "CMYK" if cmyk else "RGB"
    try:
        pixels = _simplejpeg(data, out, strict=True)
    except ValueError as err:
        # libjpeg-turbo stops at the first warning in strict mode. TensorFlow fails where the data
        # runs out (its source manager makes that an error) and at libjpeg's fatal errors, and
        # decodes through every other warning (damaged entropy data, stray bytes...). Running
        # out is this warning; Pillow's libjpeg tells the rest apart, as TensorFlow's does.
        if "Premature end of JPEG file" in str(err):
            raise UnreadableImage(TRUNCATED_JPEG) from None
        if _is_progressive(data):
            # libjpeg-turbo's versions in TensorFlow and simplejpeg smooth the missing
            # coefficients of a damaged progressive JPEG differently (pixels 1 apart).
            raise UnreadableImage(f"damaged progressive JPEG ({_message(err)}), which TensorFlow "
                                  "decodes slightly differently") from None
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG", "MPO"]) as img:
                img.load()
        except Exception as pil_err:  # any failure of libjpeg (via Pillow) is a refusal
            raise UnreadableImage(f"corrupt JPEG ({_message(pil_err)})") from None
        pixels = _simplejpeg(data, out, strict=False)
    if cmyk:
        pixels = _cmyk_to_rgb(pixels, adobe=_has_adobe_marker(data))
    return pixels


def _cmyk_to_rgb(cmyk: np.ndarray, *, adobe: bool) -> np.ndarray:
    """TensorFlow's conversion (``jpeg_mem.cc``): Adobe files store inverted CMYK."""
    c = cmyk.astype(np.int32)
    k = c[..., 3:4]
    rgb = (k * c[..., :3]) // 255 if adobe else ((255 - k) * (255 - c[..., :3])) // 255
    return rgb.astype(np.uint8)


def _header_segments(data: bytes):
    """(marker, segment bytes) of the JPEG's header, up to its first scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        yield marker, data[pos + 4:pos + 2 + length]
        pos += 2 + length


def _has_adobe_marker(data: bytes) -> bool:
    """libjpeg's ``saw_Adobe_marker``: an APP14 segment of at least 12 bytes that starts "Adobe"."""
    return any(marker == 0xEE and len(segment) >= 12 and segment.startswith(b"Adobe")
               for marker, segment in _header_segments(data))


def _is_progressive(data: bytes) -> bool:
    """A progressive frame header (SOF2, or SOF6/10/14)."""
    return any(marker in (0xC2, 0xC6, 0xCA, 0xCE) for marker, _ in _header_segments(data))


# ---- PNG, GIF, WebP through Pillow ----------------------------------------------------------

def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: TensorFlow converts to uint8 by keeping the high byte.
        wide = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(wide.astype(np.uint8), mode="L")
    # Alpha is dropped, not blended, as TensorFlow does with channels=3.
    return np.array(img.convert("RGB"))  # a writable copy (torch warns on read-only arrays)


def _check_png_chunks(data: bytes) -> None:
    """libpng (TensorFlow) reads chunks up to IEND and checks their CRCs; Pillow stops after the
    image data and skips the IDAT CRCs. A file cut after its image data, or with a bad CRC, is
    refused (libpng only warns about ancillary chunks; refusing them too keeps one rule)."""
    pos = 8
    while True:
        if pos + 12 > len(data):
            raise UnreadableImage("truncated PNG (no IEND chunk: the file ends early)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            raise UnreadableImage(f"truncated PNG (its {kind.decode('latin-1')} chunk is cut short)")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            raise UnreadableImage(f"corrupt PNG (bad CRC in its {kind.decode('latin-1')} chunk)")
        if kind == b"IEND":
            return
        pos = end


def _decode_png(data: bytes) -> np.ndarray:
    _check_png_chunks(data)
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        _check_size(*img.size)
        img.load()
        return _to_rgb(img)


def _decode_gif(data: bytes) -> np.ndarray:
    """The first frame (TensorFlow reads no further with expand_animations=False)."""
    with Image.open(io.BytesIO(data), formats=["GIF"]) as img:
        _check_size(*img.size)
        x0, y0, x1, y1 = img.tile[0].extents if img.tile else (0, 0, 0, 0)
        if (x0, y0, x1, y1) != (0, 0, *img.size):
            # TensorFlow returns the frame alone, Pillow the frame on its canvas.
            raise UnreadableImage(f"GIF whose first frame ({x1 - x0} x {y1 - y0} at {x0}, {y0}) "
                                  f"does not fill its {img.size[0]} x {img.size[1]} canvas")
        img.load()
        rgb = _to_rgb(img)
        transparency = img.info.get("transparency")
        if img.mode in ("P", "L") and isinstance(transparency, int):
            # TensorFlow (giflib) paints the first frame's transparent pixels black.
            rgb = rgb.copy()
            rgb[np.asarray(img) == transparency] = 0
        return rgb


def _decode_webp(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["WEBP"]) as img:
        _check_size(*img.size)
        if getattr(img, "is_animated", False):
            raise UnreadableImage("animated WebP (TensorFlow reads those only as RGBA)")
        if img.mode != "RGB":
            raise UnreadableImage(f"WebP with alpha ({img.mode}; TensorFlow reads those only "
                                  "as RGBA)")
        img.load()
        return _to_rgb(img)


# ---- BMP ------------------------------------------------------------------------------------

def _decode_bmp(data: bytes) -> np.ndarray:
    """TensorFlow's own BMP reader (``DecodeBmpV2``), accepted where it gives Pillow's picture."""
    if len(data) < 32:
        raise UnreadableImage(f"corrupt BMP (header of {len(data)} bytes; at least 32 needed)")
    offset, = struct.unpack_from("<i", data, 10)
    width, height = struct.unpack_from("<ii", data, 18)
    bpp, = struct.unpack_from("<h", data, 28)
    channels = bpp // 8
    if bpp not in (8, 24, 32):
        raise UnreadableImage(f"BMP with {bpp} bits per pixel (TensorFlow reads 8, 24 or 32)")
    if width <= 0 or height == 0 or offset < 0:
        raise UnreadableImage(f"corrupt BMP (width {width}, height {height}, "
                              f"pixel data at {offset})")
    rows = abs(height)
    _check_size(width, rows)
    row_size = (channels * width + 3) // 4 * 4
    if len(data) != offset + row_size * rows:
        raise UnreadableImage(f"BMP of {len(data)} bytes where TensorFlow expects exactly "
                              f"{offset + row_size * rows} (header + {rows} rows of {row_size})")
    raw = np.frombuffer(data, np.uint8, row_size * rows, offset).reshape(rows, row_size)
    raw = raw[:, :width * channels].reshape(rows, width, channels)
    if height > 0:  # bottom-up
        raw = raw[::-1]
    tf_pixels = np.repeat(raw, 3, axis=2) if channels == 1 else raw[..., 2::-1]
    # What the file shows, for comparison: TensorFlow ignores the palette and the compression.
    with Image.open(io.BytesIO(data), formats=["BMP"]) as img:
        img.load()
        picture = _to_rgb(img)
    if picture.shape != tf_pixels.shape or not np.array_equal(picture, tf_pixels):
        kind = ("8-bit BMP with a colour palette" if channels == 1
                else "BMP with compressed or bit-field pixels")
        raise UnreadableImage(f"{kind}, which TensorFlow reads as other pixels than the picture "
                              "(save it as PNG or 24-bit BMP)")
    return np.ascontiguousarray(tf_pixels)


_DECODERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "JPEG": _decode_jpeg, "PNG": _decode_png, "GIF": _decode_gif, "BMP": _decode_bmp,
    "WebP": _decode_webp,
}


# ---- the check before training --------------------------------------------------------------

def unreadable_reason(err: UnreadableImage | OSError) -> str:
    """Why a file could not be read, in the words every command uses for it (the trainers'
    check before training, ``tl_torch.predict``)."""
    if isinstance(err, UnreadableImage):
        return err.reason
    return f"cannot be read ({err.strerror or err})"


def check_image(path: str | os.PathLike[str],
                keep: Callable[[str, np.ndarray], None] | None = None) -> str | None:
    """Why the file is bad, or None if both frameworks read it (to the same pixels). ``keep``:
    called with the path and the pixels of a good file, for a caller that needs them."""
    try:
        pixels = decode_rgb(path)
    except (UnreadableImage, OSError) as err:
        return unreadable_reason(err)
    if keep is not None:
        keep(str(path), pixels)
    return None


def scan_images(root: str | os.PathLike[str], paths: Sequence[str], *, workers: int | None = None,
                desc: str = "checking images",
                keep: Callable[[str, np.ndarray], None] | None = None) -> list[BadImage]:
    """Decode every file (``paths`` relative to ``root``) fully, in threads (the decoders release
    the GIL), with a progress bar for long lists; return the bad ones in the list's order.

    ``keep`` is called (in the threads) with each good file's full path and pixels: a caller
    that keeps something of every image (the port's image cache) then decodes each file once.
    """
    root, paths = Path(root), list(paths)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(lambda p: check_image(root / p, keep), paths),
                            total=len(paths), desc=desc, unit="file", leave=False,
                            disable=len(paths) < PROGRESS_MIN_FILES))
    return [BadImage(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]
