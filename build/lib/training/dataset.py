"""Training images: find, check, decode correctly, caption, bucket.

Every file is checked before training starts. Files that cannot be used are skipped and listed
with the reason; an empty result is a `DatasetError`. Images are decoded the way a user expects
to see them: EXIF rotation applied, 16-bit scaled (not clipped), transparency composited on white,
CMYK/palette/LA converted, the first frame of an animation.
"""

from __future__ import annotations

import errno
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.errors import DatasetError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTS = {".txt", ".caption"}
SIDE_FILES = {".toml", ".json", ".md", ".npz"}
MAX_SIDE = 16384
MAX_PIXELS = 64 * 1024 * 1024


@dataclass
class ImageItem:
    path: Path
    caption: str
    width: int
    height: int


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)

    def report(self) -> str:
        lines = [f"{len(self.items)} image(s) usable"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped:")
            lines += [f"  {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def check_image(path: Path) -> tuple[int, int]:
    """Open and fully decode once; return (width, height) or raise ValueError with the reason."""
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header only: nothing decoded yet
            if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
                raise ValueError(f"image too large ({w}x{h}); refused before decoding (limit {MAX_SIDE} px a side)")
            if w < 8 or h < 8:
                raise ValueError(f"image too small ({w}x{h})")
            im.load()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        with open(path, "rb") as f:
            w, h = _header_size(f.read(64))
        raise ValueError(f"image too large ({w}x{h}); refused before decoding (limit {MAX_SIDE} px a side)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"truncated or corrupt image ({e})") from None
    # EXIF rotation swaps the sides of a 90-degree-rotated photo
    with Image.open(path) as im:
        orient = im.getexif().get(0x0112, 1)
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def _header_size(head: bytes) -> tuple[int, int]:
    """(w, h) from a PNG/GIF/BMP header, for the message when Pillow refuses a decompression bomb."""
    import struct

    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", head[16:24])
    if head[:3] == b"GIF":
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM":
        w, h = struct.unpack("<ii", head[18:26])
        return w, abs(h)
    return (0, 0)


def load_rgb(path: Path) -> Image.Image:
    """Decode to 8-bit RGB as a viewer would show it."""
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im = ImageOps.exif_transpose(im)  # also copies: the file is closed after this block
        return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "CMYK":
        return im.convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im.copy()


def read_caption(image_path: Path) -> str | None:
    for ext in CAPTION_EXTS:
        cap = image_path.with_suffix(ext)
        if cap.is_file():
            try:
                return cap.read_text(encoding="utf-8").strip().replace("\n", " ")
            except UnicodeDecodeError:
                return cap.read_text(encoding="latin-1").strip().replace("\n", " ")
    return None


def build_caption(caption: str | None, trigger: str, template: str, prefix_trigger: bool) -> str:
    if not caption:
        return template.format(trigger=trigger)
    if prefix_trigger and trigger.lower() not in caption.lower().replace(",", " ").split():
        return f"{trigger}, {caption}"
    return caption


def vary_caption(caption: str, rng, shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0) -> str:
    """The caption one training row sees this step (kohya's caption_dropout_rate, shuffle_caption, keep_tokens).

    With probability `dropout` the empty caption (so the adapter also learns the unconditional prediction
    that classifier-free guidance uses); with `shuffle`, the comma-separated tags after the first
    `keep_tokens` in a new order, so no tag's meaning depends on its position. `rng`: a random.Random.
    """
    drop = rng.random() < dropout
    if drop:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def _broken_link(p: Path) -> str | None:
    """Why a symlink cannot be followed (a loop, a missing target), or None when it leads to a file."""
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"broken symlink (its target {target} does not exist)"
    return None


def scan_folder(folder: str | Path, trigger: str = "sks", template: str = "a photo of {trigger}",
                prefix_trigger: bool = True) -> ScanResult:
    folder = Path(folder)
    if not str(folder) or not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    res = ScanResult()
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        ext = p.suffix.lower()
        if ext in CAPTION_EXTS or ext in SIDE_FILES:
            continue
        if p.is_symlink() and (why := _broken_link(p)):
            res.skipped.append((p, why))
            continue
        if p.name.startswith(".") or ext not in IMAGE_EXTS:
            res.skipped.append((p, "not an image file"))
            continue
        try:
            w, h = check_image(p)
            caption = read_caption(p)
        except ValueError as e:
            res.skipped.append((p, str(e)))
            continue
        except OSError as e:  # unreadable (permissions, a caption that is a broken link, I/O error)
            res.skipped.append((p, f"cannot be read ({e.strerror or e})"))
            continue
        cap = build_caption(caption, trigger, template, prefix_trigger)
        res.items.append(ImageItem(p, cap, w, h))
    if not res.items:
        detail = f"; skipped: {', '.join(f'{p.name} ({why})' for p, why in res.skipped[:10])}" if res.skipped else ""
        raise DatasetError(f"{folder}: no usable training images{detail}")
    return res


def make_buckets(resolution: int, step: int = 8, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes with about resolution**2 pixels, sides multiples of `step`."""
    area = resolution * resolution
    out = set()
    w = step * math.ceil(resolution / max_ratio ** 0.5 / step)
    while w <= resolution * max_ratio ** 0.5:
        h = step * int(area / w / step)
        if h >= step and max(w / h, h / w) <= max_ratio + 1e-6:
            out.add((w, h))
            out.add((h, w))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def pick_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def resize_crop(img: Image.Image, size: tuple[int, int], crop: str = "center",
                rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `size`, then crop. Returns the image and the crop's top-left (y, x)."""
    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    img = img.resize((nw, nh), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    if crop == "random" and rng is not None:
        x, y = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        x, y = (nw - tw) // 2, (nh - th) // 2
    return img.crop((x, y, x + tw, y + th)), (y, x)


def to_tensor(img: Image.Image):
    """PIL RGB -> (3, H, W) float tensor in [-1, 1]."""
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
