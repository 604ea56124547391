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
import re
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
    repeats: int = 1  # times per epoch, from a kohya folder name (10_sks dog: 10)
    source: str = "template"  # where the caption came from: "file", "folder" (kohya's tokens) or "template"
    subset: str | None = None  # its kohya folder's (or dataset config subset's) folder name


@dataclass
class Subset:
    """One folder of kohya's DreamBooth layout: `<repeats>_<tokens>`, e.g. `10_sks dog`."""

    folder: Path
    repeats: int
    tokens: str  # the caption of its images that have no caption file (kohya's class_tokens)
    images: int = 0
    prefix: str = ""  # kohya's caption_prefix / caption_suffix (a dataset config's subset): around each caption
    suffix: str = ""


# kohya's rule (sd-scripts, config_util): the name up to the first "_" is the repeat count, the rest verbatim
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$", re.S)


MAX_REPEATS = 10_000  # the repeats option's own limit: a larger number is a date (20230615_beach), not repeats


def _inside_any(p: Path, dirs) -> bool:
    return any(d is not None and p.is_relative_to(d) for d in dirs)


def _kohya_layout(folder: Path, exclude: Path | None = None) -> tuple[list[Subset], int]:
    """The `<repeats>_<tokens>` subfolders of `folder`, and how many images lie outside them."""
    try:
        dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        return [], 0
    subs = []
    for d in dirs:
        m = KOHYA_FOLDER.match(d.name)
        if m and int(m.group(1)) <= MAX_REPEATS and not _inside_any(d, [exclude]):
            subs.append(Subset(d, int(m.group(1)), m.group(2).strip()))
    if not subs:
        return [], 0
    names = {s.folder.name for s in subs}
    outside = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
                  and not is_mask_file(p) and p.relative_to(folder).parts[0] not in names
                  and not _inside_any(p, [exclude]))
    return subs, outside


def kohya_subsets(folder: str | Path, exclude: str | Path | None = None) -> list[Subset]:
    """The `<repeats>_<tokens>` subfolders of `folder` (kohya_ss' dataset layout), sorted; [] when it has none,
    or when images lie outside them too (an ordinary dataset with a folder that happens to be named
    `2023_summer` stays an ordinary one)."""
    subs, outside = _kohya_layout(Path(folder), Path(exclude) if exclude else None)
    return [] if outside else subs


def kohya_trigger(folder: str | Path) -> str | None:
    """The trigger word a kohya-layout folder implies: the first word of its first folder's tokens that is not
    an article or a word like "photo" (`10_ohwx woman` -> ohwx, `10_a photo of zwx` -> zwx); None for another
    layout."""
    return trigger_of(kohya_subsets(os.path.expanduser(str(folder))))


def trigger_of(subsets: list[Subset]) -> str | None:
    """The first word of the first subset's caption that is not an article or a word like "photo"."""
    for sub in subsets:
        words = [w.strip(",.") for w in sub.tokens.split()]
        words = [w for w in words if w and w.lower() not in _NOT_A_TRIGGER]  # "10_a photo of ohwx": ohwx
        if sub.repeats >= 1 and words:
            return words[0]
    return None


_NOT_A_TRIGGER = {"a", "an", "the", "photo", "picture", "image", "drawing", "painting", "of", "in", "by", "style",
                  "art", "with", "and"}


# OneTrainer's name for a mask beside its image (x.png: x-masklabel.png); white is what the loss counts
MASK_SUFFIX = "-masklabel"


def is_mask_file(p: Path) -> bool:
    return p.stem.endswith(MASK_SUFFIX) and p.suffix.lower() in IMAGE_EXTS


def find_mask(image: Path, root: Path | None, mask_dir: str | Path | None = None) -> Path | None:
    """The mask of a training image: in `mask_dir` under the image's own relative path and stem (kohya's
    conditioning_data_dir; any image ending), else `<stem>-masklabel.png` beside it (OneTrainer's), else None."""
    places = []
    if mask_dir:
        rel = image.relative_to(root) if root is not None and image.is_relative_to(root) else Path(image.name)
        places.append(Path(mask_dir) / rel.parent / rel.stem)
    places.append(image.parent / f"{image.stem}{MASK_SUFFIX}")
    for stem in places:
        for ext in (".png", *sorted(IMAGE_EXTS - {".png"})):
            cand = stem.with_name(stem.name + ext)
            if cand.is_file():
                return cand
    return None


_ORIENTATION = 0x0112  # EXIF orientation; how to turn stored pixels upright for each value
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                   7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def load_mask(image: Path, mask: Path | None) -> Image.Image | None:
    """The loss weights of an image as an "L" image of its size (255: counts fully): a mask file's red channel
    (as kohya reads its masks; a grey mask is the same), else the image's transparency, else None."""
    if mask is not None:
        try:
            with Image.open(mask) as m:
                own_exif = m.getexif().get(_ORIENTATION, 1) != 1
                m = to_rgb(ImageOps.exif_transpose(m)).getchannel("R")  # 16-bit and float masks scaled too
        except (OSError, ValueError, UnidentifiedImageError) as e:
            raise DatasetError(f"{mask}: the mask of {image.name} cannot be read ({e})") from None
        with Image.open(image) as im:
            raw, turn = im.size, im.getexif().get(_ORIENTATION, 1)
        size = raw if turn in (1, 2, 3, 4) else raw[::-1]
        if m.size == raw and size != raw and not own_exif:  # made from the photo's stored pixels: turn it too
            m = m.transpose(_EXIF_TRANSPOSE[turn])
        if abs(m.width / m.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
            raise DatasetError(f"{mask}: the mask of {image.name} is {m.width}x{m.height}, the image "
                               f"{size[0]}x{size[1]}: a mask must have the image's shape")
        return m if m.size == size else m.resize(size, Image.BILINEAR)
    with Image.open(image) as im:
        if not _transparent(im):
            return None
        im = ImageOps.exif_transpose(im)
        return im.convert("RGBA").getchannel("A")


def _transparent(im: Image.Image) -> bool:
    """Whether an opened image has transparency (its mode or palette; from the header alone)."""
    return im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info


def has_mask(image: Path, root: Path | None, mask_dir: str | Path | None = None) -> bool:
    """Whether masked loss finds a mask for `image` (a mask file, or transparency; read from the header only)."""
    if find_mask(image, root, mask_dir) is not None:
        return True
    with Image.open(image) as im:
        return _transparent(im)


def check_masks(items: list[ImageItem], root: str | Path | None, mask_dir: str | Path | None = None,
                where: str | None = None) -> int:
    """How many of `items` have a mask; none at all is an error that names the folder (`where`, else `root`)
    and where masks go. `root`: the images folder the mask folder mirrors (None: masks by file name)."""
    n = sum(has_mask(it.path, Path(root) if root else None, mask_dir) for it in items)
    if not n:
        place = f"in {mask_dir}, " if mask_dir else ""
        raise DatasetError(f"masked_loss: none of the {len(items)} images in {where or root} has a mask ({place}an "
                           f"IMAGE{MASK_SUFFIX}.png beside it, or transparency in the image); add masks or turn "
                           "masked loss off")
    return n


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    subsets: list[Subset] = field(default_factory=list)  # kohya folders, when the folder is in that layout
    masks: int = 0  # -masklabel files beside the images (not trained on; masked loss reads them)
    note: str = ""  # how the folder was read, where that may surprise (kohya-like names read as ordinary)

    def report(self) -> str:
        lines = [f"{len(self.items)} image(s) usable"]
        if self.subsets:
            lines.append("kohya folders (repeats_caption):")
            lines += [f"  {s.folder.name}: {s.images} image(s) x {s.repeats} per epoch"
                      + (f", caption '{s.tokens}' where an image has no caption file" if s.tokens else "")
                      for s in self.subsets]
        if self.masks:
            lines.append(f"{self.masks} mask file(s) ({MASK_SUFFIX}), for masked loss")
        if self.note:
            lines.append(self.note)
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


def caption_exts(caption_ext: str = ".txt") -> list[str]:
    """The caption endings looked for, in order: the configured one first (".txt", "caption" or ".tags"), then
    the others kohya knows."""
    ext = caption_ext.strip()
    ext = ext if ext.startswith(".") else f".{ext}"
    return [ext, *(e for e in (".txt", ".caption") if e != ext)]


def read_caption(image_path: Path, caption_ext: str = ".txt") -> str | None:
    for ext in caption_exts(caption_ext):
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
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def tag_counts(captions: list[str], n: int | None = 20) -> list[tuple[str, int]]:
    """The most frequent comma-separated tags of a dataset's captions (each caption counts a tag once); all
    of them with n None."""
    counts: dict[str, int] = {}
    for cap in captions:
        for tag in dict.fromkeys(split_tags(cap)):
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def edit_captions(captions: list[str], op: str, tags: str = "", find: str = "", replace: str = "",
                  trigger: str = "") -> list[str]:
    """Every caption edited at once, as kohya_ss' captioning tools do.

    op "front": `tags` (comma-separated) added after the first tag when it holds the trigger word ("ohwx woman"),
    else first; "end": added last; "remove": those tags taken out (whole tags, any case); "replace": the text
    `find` replaced by `replace` (as typed). A tag a caption has already is not added twice.
    """
    new = split_tags(tags)
    if op in ("front", "end", "remove") and not new:
        raise ValueError("tags: type the tag(s) to add or remove, separated by commas")
    if op == "replace" and not find:
        raise ValueError("find: type the text to replace")
    if op not in ("front", "end", "remove", "replace"):
        raise ValueError(f"op: one of front, end, remove, replace; got {op!r}")
    out = []
    for cap in captions:
        if op == "replace":
            out.append(cap.replace(find, replace))
            continue
        have = split_tags(cap)
        lower = {t.lower() for t in have}
        if op == "remove":
            gone = {t.lower() for t in new}
            out.append(", ".join(t for t in have if t.lower() not in gone))
            continue
        add = [t for t in new if t.lower() not in lower]
        if op == "end":
            out.append(", ".join(have + add))
        else:
            word = re.compile(rf"(?<![\w-]){re.escape(trigger.strip())}(?![\w-])", re.I) if trigger.strip() else None
            k = 1 if have and word and word.search(have[0]) else 0  # "ohwx woman, smiling": after "ohwx woman"
            out.append(", ".join(have[:k] + add + have[k:]))
    return out


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


def _subset_of(p: Path, folder: Path, subsets: list[Subset]) -> Subset | None:
    top = p.relative_to(folder).parts[0]
    return next((s for s in subsets if s.folder.name == top), None)


def scan_folder(folder: str | Path, trigger: str = "sks", template: str = "a photo of {trigger}",
                prefix_trigger: bool = True, caption_ext: str = ".txt",
                exclude: str | Path | None = None) -> ScanResult:
    """Every usable image under `folder` with its caption: its caption file, else (kohya's layout) its
    `<repeats>_<tokens>` folder's tokens, else `template`; the trigger word put first where it is missing.
    `exclude`: a folder inside `folder` that holds no training images (masked loss's mask folder)."""
    folder = Path(folder)
    if not str(folder) or not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    skip = Path(exclude) if exclude else None
    subs, outside = _kohya_layout(folder, skip)
    res = ScanResult(subsets=[] if outside else subs)
    if subs and outside:
        res.note = (f"folders named like kohya's ({', '.join(s.folder.name for s in subs[:3])}) are read as ordinary "
                    f"folders: {outside} image(s) lie outside them, and kohya's layout has every image in one")
    _scan_files(res, sorted(folder.rglob("*")), lambda p: _subset_of(p, folder, res.subsets) if res.subsets else None,
                trigger, template, prefix_trigger, caption_ext, skip)
    return _finished(res, folder)


def scan_subsets(subsets: list[Subset], trigger: str = "sks", template: str = "a photo of {trigger}",
                 prefix_trigger: bool = True, caption_ext: str = ".txt", exclude: str | Path | None = None,
                 name: str = "dataset config") -> ScanResult:
    """`scan_folder` over the folders of a kohya dataset config's subsets, each with its own repeats and
    caption (see training.kohya_dataset)."""
    res = ScanResult(subsets=subsets)
    for sub in subsets:
        sub.images = 0
        # the folder's own files, as kohya reads an image_dir (a class-image folder inside it is not trained on)
        _scan_files(res, sorted(sub.folder.iterdir()), lambda p, s=sub: s, trigger, template, prefix_trigger,
                    caption_ext, Path(exclude) if exclude else None)
    return _finished(res, name)


def _scan_files(res: ScanResult, files, subset_of, trigger: str, template: str, prefix_trigger: bool,
                caption_ext: str, skip: Path | None) -> None:
    exts = {e.lower() for e in caption_exts(caption_ext)} | CAPTION_EXTS
    for p in files:
        if p.is_dir() or _inside_any(p, [skip]):
            continue
        ext = p.suffix.lower()
        if ext in exts or ext in SIDE_FILES:
            continue
        if is_mask_file(p):
            res.masks += 1
            continue
        sub = subset_of(p)
        if sub is not None and sub.repeats < 1:
            if ext in IMAGE_EXTS:
                res.skipped.append((p, f"its folder repeats it 0 times (kohya's layout skips {sub.folder.name})"))
            continue
        if p.is_symlink() and (why := _broken_link(p)):
            res.skipped.append((p, why))
            continue
        if p.name.startswith(".") or ext not in IMAGE_EXTS:
            res.skipped.append((p, "not an image file"))
            continue
        try:
            w, h = check_image(p)
            caption = read_caption(p, caption_ext)
        except ValueError as e:
            res.skipped.append((p, str(e)))
            continue
        except OSError as e:  # unreadable (permissions, a caption that is a broken link, I/O error)
            res.skipped.append((p, f"cannot be read ({e.strerror or e})"))
            continue
        source = "file" if caption else "folder" if sub and sub.tokens else "template"
        if sub and (sub.prefix or sub.suffix):  # kohya: "prefix caption suffix", before the trigger rule
            inner = caption or sub.tokens or template.format(trigger=trigger)
            caption = " ".join(x for x in (sub.prefix, inner, sub.suffix) if x)
        cap = build_caption(caption or (sub.tokens if sub else None), trigger, template, prefix_trigger)
        res.items.append(ImageItem(p, cap, w, h, sub.repeats if sub else 1, source, sub.folder.name if sub else None))
        if sub:
            sub.images += 1


def _finished(res: ScanResult, where) -> ScanResult:
    """Empty subsets listed as skipped; no usable image at all is an error naming `where`."""
    for sub in res.subsets:
        if sub.repeats >= 1 and not sub.images:
            res.skipped.append((sub.folder, "no usable image in this folder" + (
                " (it is a link to a folder, which is not followed: copy the images in)" if sub.folder.is_symlink()
                else "")))
    if not res.items:
        detail = f"; skipped: {', '.join(f'{p.name} ({why})' for p, why in res.skipped[:10])}" if res.skipped else ""
        raise DatasetError(f"{where}: no usable training images{detail}")
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


def _cover(img: Image.Image, size: tuple[int, int], resample: int | None = None) -> Image.Image:
    """`img` resized to cover `size` (its aspect kept)."""
    tw, th = size
    scale = max(tw / img.width, th / img.height)
    nw, nh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    return img.resize((nw, nh), resample if resample is not None else Image.BICUBIC if scale > 1 else Image.LANCZOS)


def resize_crop(img: Image.Image, size: tuple[int, int], crop: str = "center",
                rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover `size`, then crop. Returns the image and the crop's top-left (y, x)."""
    tw, th = size
    img = _cover(img, size)
    nw, nh = img.size
    if crop == "random" and rng is not None:
        x, y = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    else:
        x, y = (nw - tw) // 2, (nh - th) // 2
    return img.crop((x, y, x + tw, y + th)), (y, x)


def resize_crop_at(img: Image.Image, size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """The crop `resize_crop` made of an image of the same size, at its top-left (y, x): for the image's mask
    (resampled bilinearly: no overshoot outside [0, 255] at a mask's edges)."""
    y, x = at
    return _cover(img, size, Image.BILINEAR).crop((x, y, x + size[0], y + size[1]))


def to_tensor(img: Image.Image):
    """PIL RGB -> (3, H, W) float tensor in [-1, 1]."""
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
