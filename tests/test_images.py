"""Safe decoding on constructed bad inputs and on the real clip-art extremes."""

from __future__ import annotations

import io
import resource

import pytest
from PIL import Image

from vlp_core.corpus.images import DecodedImage, DecodeLimits, Rejected, decode_image, load_rgb


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def test_rejects_have_reasons():
    png = _encode(Image.new("RGB", (64, 64), "red"), "PNG")
    cases = {
        b"": "empty_file",
        b"hello, I am not an image\n" * 10: "not_an_image",
        png[: len(png) // 2]: "truncated",
        png[:8]: "truncated",  # the signature and nothing after it
        png[:20]: "truncated",  # cut inside the header chunk
        png[:33]: "truncated",  # a whole header chunk, then nothing
        png[:16] + b"\xff\xff\xff\xff" + png[20:]: "corrupt_image",  # a header chunk whose CRC fails
        b"BMW and Audi are car makers\n" * 4: "not_an_image",  # Pillow's BMP reader tries it ("BM")
        _encode(Image.new("RGB", (3, 2)), "PNG"): "too_small",
    }
    for data, reason in cases.items():
        out = decode_image(data)
        assert isinstance(out, Rejected), reason
        assert out.reason == reason, (reason, out)
        assert out.detail


def test_file_too_large():
    out = decode_image(b"x" * 2000, DecodeLimits(max_file_bytes=1000))
    assert isinstance(out, Rejected) and out.reason == "file_too_large"


def test_palette_alpha_composited_on_white():
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent
    im.paste((255, 0, 0, 255), (0, 0, 20, 40))
    for src in (im, im.convert("P")):
        out = decode_image(_encode(src, "PNG"))
        assert isinstance(out, DecodedImage)
        rgb = load_rgb(out.jpeg)
        assert rgb.mode == "RGB" and rgb.size == (40, 40)
        r, g, b = rgb.getpixel((30, 20))
        assert min(r, g, b) > 240  # transparent → white, not black
        r, g, b = rgb.getpixel((5, 20))
        assert r > 200 and g < 60 and b < 60


def test_grayscale_la_16bit_cmyk_become_rgb():
    gray = Image.linear_gradient("L").resize((64, 64))
    la = Image.merge("LA", [gray, Image.new("L", (64, 64), 128)])
    i16 = gray.convert("I").point(lambda v: v * 200).convert("I;16")
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))
    ycbcr = Image.new("RGB", (64, 64), "teal").convert("YCbCr")
    for im, fmt, flags in (
        (gray, "PNG", {"grayscale"}),
        (la, "PNG", {"grayscale", "alpha_composited"}),
        (i16, "PNG", {"high_bit_depth"}),
        (cmyk, "JPEG", {"cmyk"}),
        (ycbcr, "TIFF", {"converted_ycbcr"}),
    ):
        out = decode_image(_encode(im, fmt))
        assert isinstance(out, DecodedImage), (im.mode, out)
        assert load_rgb(out.jpeg).mode == "RGB"
        assert flags <= set(out.flags), (im.mode, out.flags)
    # 16-bit: scaled to the full 8-bit range, not clipped to white
    rgb = load_rgb(decode_image(_encode(i16, "PNG")).jpeg)
    assert rgb.getextrema()[0][0] < 30 and rgb.getextrema()[0][1] > 220


def test_exif_orientation_applied():
    im = Image.new("RGB", (80, 40), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    out = decode_image(_encode(im, "JPEG", exif=exif))
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (40, 80)
    assert "exif_rotated" in out.flags


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data)
    assert isinstance(out, DecodedImage) and "first_frame" in out.flags


def test_downscale_to_store_size():
    out = decode_image(
        _encode(Image.new("RGB", (1200, 300), "green"), "PNG"), DecodeLimits(store_max_side=256)
    )
    assert isinstance(out, DecodedImage)
    assert (out.width, out.height) == (256, 64) and (out.orig_width, out.orig_height) == (1200, 300)
    assert "downscaled" in out.flags


def test_pixel_limit_jpeg_draft_vs_png_bomb():
    big = Image.new("RGB", (4000, 3000), "white")
    limits = DecodeLimits(max_pixels=2_000_000)
    out = decode_image(_encode(big, "JPEG", quality=50), limits)
    assert isinstance(out, DecodedImage) and "draft_downscaled" in out.flags  # DCT-domain 1/4 decode
    out = decode_image(_encode(big, "PNG"), limits)
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    assert "12.0 MP" in out.detail and "max_pixels" in out.detail


def test_real_623_megapixel_clipart_is_rejected_without_decoding(real):
    path = real.openclipart / "png" / "signs_and_symbols" / "stop_sign_miguel_s_nchez_.png"
    if not path.exists():
        pytest.fail(f"{path} missing from the fetched Open Clip Art")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = decode_image(path.read_bytes())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    assert "20990x29700" in out.detail
    assert grown_mb < 500  # the 2.5 GB of RGBA pixels were never allocated
