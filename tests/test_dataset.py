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


def _kohya_set(root, folders: dict[str, int]):
    """root/<folder>/<i>.png for each folder and count (kohya_ss' dataset layout)."""
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / folder / f"{i}.png")


def test_kohya_folders_give_repeats_and_captions(tmp_path):
    """A dataset prepared for kohya_ss (`10_ohwx woman/`) trains as there: the number before the first "_" is the
    repeat count, the rest the caption of images without a caption file; files outside such folders are skipped
    and listed."""
    _kohya_set(tmp_path, {"10_ohwx woman": 2, "3_ohwx woman_closeup": 1, "0_unused": 1, "5_empty": 0})
    (tmp_path / "10_ohwx woman" / "1.txt").write_text("ohwx woman, smiling\n")
    res = scan_folder(tmp_path, trigger="ohwx", template="a photo of {trigger}")
    got = {str(i.path.relative_to(tmp_path)): (i.caption, i.repeats, i.source) for i in res.items}
    assert got == {"10_ohwx woman/0.png": ("ohwx woman", 10, "folder"),
                   "10_ohwx woman/1.png": ("ohwx woman, smiling", 10, "file"),
                   "3_ohwx woman_closeup/0.png": ("ohwx woman_closeup", 3, "folder")}  # kohya keeps later "_"
    why = {str(p.relative_to(tmp_path)): w for p, w in res.skipped}
    assert set(why) == {"0_unused/0.png", "5_empty"}
    assert "0 times" in why["0_unused/0.png"] and "no usable image" in why["5_empty"]
    report = res.report()
    assert "10_ohwx woman: 2 image(s) x 10 per epoch" in report and "3_ohwx woman_closeup: 1 image(s) x 3" in report
    # a trigger missing from the folder's caption is put first, as with caption files
    assert scan_folder(tmp_path, trigger="sks").items[0].caption == "sks, ohwx woman"


def test_a_folder_without_kohya_names_is_read_as_before(tmp_path):
    """Only a folder whose every image lies in `<repeats>_<caption>` folders is kohya's layout: an ordinary dataset
    with a folder named 2023_summer, or photo folders named by date, is read as it always was."""
    _kohya_set(tmp_path, {"summer": 1, "x_10": 1, "2023_beach": 1})
    res = scan_folder(tmp_path, trigger="sks", template="a photo of {trigger}")
    assert not res.subsets and len(res.items) == 3 and not res.skipped
    assert {i.caption for i in res.items} == {"a photo of sks"} and {i.repeats for i in res.items} == {1}
    assert "2023_beach" in res.note and "2 image(s) lie outside" in res.report()
    dates = tmp_path / "dates"
    _kohya_set(dates, {"20230615_beach": 1, "20230701_park": 1})  # a number above 10000 is no repeat count
    res = scan_folder(dates)
    assert not res.subsets and {i.repeats for i in res.items} == {1} and not res.note


def test_caption_extension_is_the_configured_one_first(tmp_path):
    """Both a .txt and a .caption file beside an image: caption_ext picks which one is the caption (it used to
    depend on the process's hash seed); an ending of its own (.tags) works too."""
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks, from txt")
    (tmp_path / "a.caption").write_text("sks, from caption")
    assert scan_folder(tmp_path).items[0].caption == "sks, from txt"
    assert scan_folder(tmp_path, caption_ext=".caption").items[0].caption == "sks, from caption"
    (tmp_path / "a.tags").write_text("sks, from tags")
    res = scan_folder(tmp_path, caption_ext="tags")
    assert res.items[0].caption == "sks, from tags" and not res.skipped  # the .tags file is no stray image


def test_every_caption_edited_at_once():
    from training.dataset import edit_captions, tag_counts

    caps = ["sks, red, square", "sks, Blue, circle, red", "a photo of sks"]
    assert edit_captions(caps, "front", "smiling, red", trigger="sks") == [
        "sks, smiling, red, square", "sks, smiling, Blue, circle, red", "a photo of sks, smiling, red"]
    assert edit_captions(caps, "end", "outdoors") == [c + ", outdoors" for c in caps]
    assert edit_captions(["ohwx woman, smiling"], "front", "outdoors", trigger="ohwx") == [
        "ohwx woman, outdoors, smiling"]  # a kohya folder's caption: the first tag holds the trigger
    assert edit_captions(caps, "remove", "RED, blue") == ["sks, square", "sks, circle", "a photo of sks"]
    assert edit_captions(caps, "replace", find="sks", replace="ohwx")[2] == "a photo of ohwx"
    with pytest.raises(ValueError, match="tags:"):
        edit_captions(caps, "front", " , ")
    with pytest.raises(ValueError, match="find:"):
        edit_captions(caps, "replace")
    assert tag_counts(caps + ["sks, red, red"]) == [("red", 3), ("sks", 3), ("Blue", 1), ("a photo of sks", 1),
                                                    ("circle", 1), ("square", 1)]


def test_a_mask_follows_its_photos_exif_rotation_and_must_have_its_shape(tmp_path):
    """A mask made from a phone photo's stored pixels (80x40, the photo says "turn 90°") is turned with it; a mask
    of another shape is refused naming both files; a 16-bit mask keeps its grey levels."""
    from training.dataset import load_mask

    img = Image.new("RGB", (80, 40), "red")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    stored = Image.new("L", (80, 40), 0)
    stored.paste(255, (0, 0, 20, 40))  # the left quarter of the stored pixels
    stored.save(tmp_path / "photo-masklabel.png")
    m = load_mask(tmp_path / "photo.jpg", tmp_path / "photo-masklabel.png")
    upright = load_rgb(tmp_path / "photo.jpg")
    assert m.size == upright.size == (40, 80)
    a = np.asarray(m)
    assert a[:20].min() == 255 and a[21:].max() == 0  # the stored left quarter is the upright top quarter
    Image.new("L", (50, 50), 255).save(tmp_path / "square.png")
    with pytest.raises(DatasetError, match=r"square.png: the mask of photo.jpg is 50x50, the image 40x80"):
        load_mask(tmp_path / "photo.jpg", tmp_path / "square.png")
    Image.new("RGB", (40, 80)).save(tmp_path / "plain.png")
    Image.fromarray(np.full((80, 40), 21845, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert abs(int(np.asarray(load_mask(tmp_path / "plain.png", tmp_path / "grey16.png")).mean()) - 85) <= 1
