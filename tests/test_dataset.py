"""Training-image checks: bad files skipped and listed, odd formats decoded as a viewer shows them."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import DatasetError
from training.dataset import load_rgb, make_buckets, pick_bucket, scan_folder, vary_caption


def _png_header_only(path, w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bad_files_are_skipped_and_listed(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "notes.pdf").write_text("hello")
    (tmp_path / "fake.png").write_text("this is text")
    _png_header_only(tmp_path / "huge.png", 30000, 30000)
    res = scan_folder(tmp_path)
    assert [i.path.name for i in res.items] == ["good.png"]
    why = {p.name: reason for p, reason in res.skipped}
    assert set(why) == {"truncated.jpg", "zero.png", ".DS_Store", "notes.pdf", "fake.png", "huge.png"}
    assert "empty" in why["zero.png"]
    assert "truncated" in why["truncated.jpg"]
    assert "30000x30000" in why["huge.png"] and "before decoding" in why["huge.png"]
    assert "huge.png" in res.report()


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path.name)):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        scan_folder(tmp_path / "missing")


def test_subfolders_and_captions(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "a" / "b" / "x.webp")
    (tmp_path / "a" / "b" / "x.txt").write_text("a red star\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "y.bmp")
    res = scan_folder(tmp_path, trigger="sks", template="in the style of {trigger}")
    caps = {i.path.name: i.caption for i in res.items}
    assert caps == {"x.webp": "sks, a red star", "y.bmp": "in the style of sks"}


def test_cmyk_converted(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_on_white(tmp_path):
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 8, 16))
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    out = load_rgb(tmp_path / "p.png")
    assert out.getpixel((2, 2)) == (255, 0, 0)
    assert out.getpixel((12, 2)) == (255, 255, 255)  # transparent -> white, not black


def test_la_converted(tmp_path):
    Image.new("LA", (16, 16), (100, 255)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((1, 1)) == (100, 100, 100)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, :8] = 65535
    arr[:, 8:] = 32896  # 128 * 257
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((12, 2)) == (128, 128, 128)


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    res = scan_folder(tmp_path)
    assert (res.items[0].width, res.items[0].height) == (20, 40)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 3))  # the stripe is now on top
    assert r > 200 and g < 80


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 0, 255), (255, 0, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    r, g, b = load_rgb(tmp_path / "a.gif").getpixel((8, 8))
    assert b > 200 and r < 50


def test_buckets_cover_aspect_ratios():
    buckets = make_buckets(64, step=8)
    assert (64, 64) in buckets
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in buckets)
    assert pick_bucket(100, 100, buckets) == (64, 64)
    w, h = pick_bucket(200, 100, buckets)
    assert w > h and abs(w * h - 64 * 64) / (64 * 64) < 0.3


def test_tag_shuffling_keeps_the_leading_tags_and_every_tag():
    import random

    cap = "sks, red, circle, white background, photo"
    seen = set()
    for k in range(40):
        out = vary_caption(cap, random.Random(f"1:{k}:0"), shuffle=True, keep_tokens=1)
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(cap.split(", "))
        seen.add(out)
    assert len(seen) > 10  # the order really changes from step to step
    # the same (seed, step, row) gives the same caption: a resumed run sees what the first one did
    assert vary_caption(cap, random.Random("1:7:0"), True, 1) == vary_caption(cap, random.Random("1:7:0"), True, 1)
    assert vary_caption(cap, random.Random("x"), shuffle=True, keep_tokens=9) == cap  # all kept
    assert vary_caption(cap, random.Random("x"), shuffle=False) == cap
    assert vary_caption("a photo of sks", random.Random("x"), shuffle=True, keep_tokens=0) == "a photo of sks"


def test_caption_dropout_rate():
    import random

    rng = random.Random(0)
    outs = [vary_caption("sks, red", rng, dropout=0.25) for _ in range(4000)]
    assert abs(outs.count("") / len(outs) - 0.25) < 0.03
    assert set(outs) == {"", "sks, red"}
