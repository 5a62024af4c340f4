"""Safe image decoding: every input either becomes a normalised RGB image or a :class:`Rejected` reason.

Real collections hold 3×2-pixel images, 600-megapixel PNGs (decompression bombs), palette and alpha PNGs,
grayscale, CMYK, EXIF-rotated JPEGs, truncated and non-image files. The rules, in order:

1. zero bytes → ``empty_file``; more than ``max_file_bytes`` → ``file_too_large`` (never read whole).
2. Pillow cannot open it → ``not_an_image``, unless the file starts with an image format's signature (PNG,
   JPEG, GIF, TIFF, BMP, WebP, ...): then it is a damaged image, ``truncated`` when it ends inside its header
   or lacks its format's end marker (PNG, JPEG, GIF), else ``corrupt_image`` (e.g. a bad PNG header chunk).
3. shorter side below ``min_side`` → ``too_small``.
4. more than ``max_pixels`` pixels: JPEGs are decoded downscaled in the DCT domain (``draft``, 1/2–1/8) when
   that brings them under the limit; anything else → ``decompression_bomb``. Peak memory per decode is
   therefore bounded by about ``max_pixels`` × 8 bytes (the decoded buffer plus one RGBA copy; the image is
   downscaled before compositing).
5. decoding fails part-way → ``truncated`` (Pillow's "image file is truncated") or ``decode_error``.
6. EXIF orientation is applied; palette / alpha images are composited on white; grayscale, CMYK, 16-bit and
   bilevel images become 8-bit RGB; animated images keep their first frame. Every conversion is named in
   ``flags`` (``palette``, ``alpha_composited``, ``grayscale``, ``cmyk``, ``high_bit_depth``,
   ``converted_<mode>`` for other modes such as YCbCr or LAB, ``exif_rotated``, ``first_frame``, ...).
7. the result is downscaled (never upscaled) so its longer side is at most ``store_max_side`` and stored as
   JPEG (``jpeg_quality``), so later stages never touch the original file again.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb check raises at open() before we can read the size (and before a huge JPEG could be
# decoded downscaled); we enforce our own configurable limit (rule 4) before any pixel is decoded, so
# importing this module switches Pillow's process-wide check off. Documented in ARCHITECTURE.md.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodeLimits:
    """Limits and output format of :func:`decode_image` (units: pixels, bytes)."""

    max_pixels: int = 64_000_000
    max_file_bytes: int = 256 * 1024 * 1024
    min_side: int = 16
    store_max_side: int = 512
    jpeg_quality: int = 90


@dataclass
class DecodedImage:
    """A normalised RGB image, encoded as JPEG bytes."""

    jpeg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str
    orig_mode: str
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rejected:
    """Why an input was not accepted: a short machine code and a human-readable detail."""

    reason: str
    detail: str


# (format, signature, bytes its header needs, its end marker). A file that starts with an image format's
# signature and that Pillow cannot open is a damaged image, not a non-image: cut off when it ends inside its
# header or lacks its format's end marker, else corrupt.
_SIGNATURES = (
    ("PNG", b"\x89PNG\r\n\x1a\n", 8 + 25, b"IEND\xaeB`\x82"),  # signature + IHDR (length, type, 13 B, CRC)
    ("JPEG", b"\xff\xd8\xff", 4, b"\xff\xd9"),
    ("GIF", b"GIF87a", 13, b";"),  # + the logical screen descriptor
    ("GIF", b"GIF89a", 13, b";"),
    ("TIFF", b"II*\x00", 8, b""),  # + the first IFD's offset
    ("TIFF", b"MM\x00*", 8, b""),
    ("BMP", b"BM", 14 + 12, b""),  # only with its reserved bytes zero (see _signature)
    ("WebP", b"RIFF", 12 + 8, b""),  # only with "WEBP" at 8
    ("PSD", b"8BPS", 26, b""),
    ("ICO", b"\x00\x00\x01\x00", 6 + 16, b""),
    ("JPEG 2000", b"\x00\x00\x00\x0cjP  ", 12, b""),
    ("QOI", b"qoif", 14, b"\x00" * 7 + b"\x01"),
)


def _signature(data: bytes) -> tuple[str, int, bytes] | None:
    for fmt, sig, header, end in _SIGNATURES:
        if not data.startswith(sig):
            continue
        if fmt == "BMP" and data[6:10].strip(b"\x00"):  # "BM" alone starts too much text ("BMW ...")
            continue
        if fmt == "WebP" and data[8:12] != b"WEBP":
            continue
        return fmt, header, end
    return None


def _unopenable(data: bytes, exc: Exception) -> Rejected:
    """Why Pillow could not open ``data``: a non-image, or a damaged image of the format its signature
    names."""
    sig = _signature(data)
    if sig is None:
        why = "" if isinstance(exc, UnidentifiedImageError) else f"; {type(exc).__name__}: {exc}"
        return Rejected("not_an_image", f"not a recognised image format (first bytes {data[:8]!r}){why}")
    fmt, header, end = sig
    if len(data) < header:
        return Rejected(
            "truncated", f"{fmt} signature, but the file ends inside its header ({len(data)} bytes)"
        )
    if end and end not in data[-64:]:  # trailing junk after the marker is common; allow a little
        return Rejected("truncated", f"{fmt} signature, but no {fmt} end marker ({len(data)} bytes)")
    return Rejected(
        "corrupt_image", f"{fmt} signature, but not readable as {fmt}: {type(exc).__name__}: {exc}"
    )


def _to_resizable(im: Image.Image, flags: list[str]) -> Image.Image:
    """Bring any Pillow mode to RGB, RGBA or L (modes Pillow resamples correctly), without compositing."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        flags.append("palette")
    elif im.mode in ("LA", "PA", "La", "RGBa"):
        if im.mode in ("LA", "La"):
            flags.append("grayscale")
        elif im.mode == "PA":
            flags.append("palette")
        im = im.convert("RGBA")
    elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255.
        flags.append("high_bit_depth")
        lo, hi = im.getextrema()
        scale = 255.0 / max(hi - lo, 1)
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    elif im.mode not in ("RGB", "RGBA", "L"):
        named = {"1": "grayscale", "CMYK": "cmyk"}
        flags.append(named.get(im.mode, f"converted_{im.mode.lower().replace(';', '_')}"))
        im = im.convert("RGB")
    return im


def _to_rgb(im: Image.Image, flags: list[str]) -> Image.Image:
    """RGB/RGBA/L → 8-bit RGB; transparent pixels become white."""
    if im.mode == "RGBA":
        if im.getextrema()[3][0] < 255:  # some pixel is not fully opaque
            flags.append("alpha_composited")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode == "L":
        flags.append("grayscale")
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> DecodedImage | Rejected:
    """Decode ``data`` (an encoded image file) under ``limits``; never raises on bad input."""
    if len(data) == 0:
        return Rejected("empty_file", "zero-byte file")
    if len(data) > limits.max_file_bytes:
        return Rejected("file_too_large", f"{len(data)} bytes > max_file_bytes={limits.max_file_bytes}")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any header parse failure is a bad record, not a crash
        return _unopenable(data, exc)
    flags: list[str] = []
    fmt = im.format or "unknown"
    w, h = im.size
    orig_mode = im.mode
    if min(w, h) < limits.min_side:
        return Rejected("too_small", f"{w}x{h} px, shorter side < min_side={limits.min_side}")
    if w * h > limits.max_pixels:
        if fmt == "JPEG":
            # draft() picks the largest DCT scale (1/2, 1/4, 1/8) whose output is >= the requested size,
            # so request exactly the power-of-two reduction that fits under the limit.
            r = 2 ** math.ceil(math.log2(math.sqrt(w * h / limits.max_pixels)))
            im.draft("RGB", (math.ceil(w / r), math.ceil(h / r)))
        if im.size[0] * im.size[1] > limits.max_pixels:
            return Rejected(
                "decompression_bomb",
                f"{w}x{h} = {w * h / 1e6:.1f} MP > max_pixels={limits.max_pixels / 1e6:.1f} MP "
                f"({fmt} cannot be decoded downscaled; raise max_pixels to accept it)",
            )
        flags.append("draft_downscaled")
    elif fmt == "JPEG" and max(w, h) > limits.store_max_side:
        # DCT-domain downscale straight to (at least) the stored size: faster and lighter.
        im.draft("RGB", (limits.store_max_side, limits.store_max_side))
    try:
        im.seek(0)
        im.load()
        if getattr(im, "n_frames", 1) > 1:
            flags.append("first_frame")
        if im.getexif().get(0x0112, 1) != 1:  # EXIF Orientation tag
            im = ImageOps.exif_transpose(im)
            flags.append("exif_rotated")
        # Downscale before compositing: only the decode buffer and one converted copy are ever full size.
        im = _to_resizable(im, flags)
        if max(im.size) > limits.store_max_side:
            im.thumbnail((limits.store_max_side, limits.store_max_side), Image.Resampling.LANCZOS, 2.0)
            flags.append("downscaled")
        im = _to_rgb(im, flags)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=limits.jpeg_quality)
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "unrecognized data stream" in msg:
            return Rejected("truncated", msg)
        return Rejected("decode_error", f"{type(exc).__name__}: {msg}")
    except Exception as exc:  # noqa: BLE001 - e.g. SyntaxError/ValueError from malformed chunks
        return Rejected("decode_error", f"{type(exc).__name__}: {exc}")
    return DecodedImage(
        jpeg=out.getvalue(),
        width=im.size[0],
        height=im.size[1],
        orig_width=w,
        orig_height=h,
        orig_format=fmt,
        orig_mode=orig_mode,
        flags=flags,
    )


def load_rgb(jpeg: bytes) -> Image.Image:
    """Open a stored (already normalised) image as RGB."""
    return Image.open(io.BytesIO(jpeg)).convert("RGB")
