"""The adapter library: a folder of LoRA `.safetensors` files with their previews, model cards and configs.

The UI and the CLI pass adapter *names*; a name is resolved inside the library folder only. Names with
path separators, `..`, absolute paths, NUL or control characters, and files (or symlinks) that would
resolve outside the folder are refused with UnsafeNameError (ComfyUI's `folder_paths` does the same).
Names are matched case-insensitively to an existing file, so 'Style' and 'style' can never be two
different adapters (they could not be on Windows or macOS either).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

from .adapters import FORMAT_EMBEDDING, FORMAT_KOHYA, FORMAT_PEFT, AdapterInfo, export_adapter, inspect_adapter
from .errors import ConfigError, UnsafeNameError
from .weights_io import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, atomic_write, load_safetensors, read_metadata,
                         save_safetensors, stale_temp_files)


# files that belong to an adapter: same stem, one of these endings (A1111 / civitai helper conventions)
SIDECAR_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp", ".md", ".toml", ".json", ".txt",
                    ".civitai.info")
PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".webp")  # in the order pipelines.adapters.preview_for takes them
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_BAD_CHARS_SHOWN = '< > : " / \\ | ? *'
# text-direction controls (Trojan Source, CVE-2021-42574): they reorder how a name is shown
_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
MAX_NAME_LEN = 150
# file names are at most 255 bytes (ext4, APFS, NTFS in UTF-16 units); a name's longest file is its temporary
# copy ".NAME.civitai.info.XXXXXXXX.tmp" (NAME + 27 bytes) or an export's ".NAME.kohya.safetensors.XXXXXXXX.tmp"
# (NAME + 32 bytes): 200 bytes leave room for every ending the library and atomic_write add
MAX_NAME_BYTES = 200


def default_home() -> Path:
    """$LORA_STUDIO_HOME, else the user's data folder (~/.local/share/lora-studio on Linux)."""
    home = os.environ.get("LORA_STUDIO_HOME")
    if home:
        return Path(home).expanduser()
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "lora-studio"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "lora-studio"


def default_library_root() -> Path:
    return default_home() / "loras"


def check_name(name: str) -> str:
    """Return the adapter name without a `.safetensors` suffix, or raise UnsafeNameError saying why."""
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError("adapter name: must be a non-empty text")
    if name.lower().endswith(SAFETENSORS_SUFFIX):
        name = name[: -len(SAFETENSORS_SUFFIX)]
    if "\x00" in name:
        raise UnsafeNameError(f"adapter name {name!r}: contains a NUL character")
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise UnsafeNameError(f"adapter name {name!r}: path separators are not allowed (an adapter is named as the "
                              "library lists it, not by a file path)")
    if Path(name).is_absolute():
        raise UnsafeNameError(f"adapter name {name!r}: absolute paths are not allowed")
    if name in (".", "..") or ".." in name:
        raise UnsafeNameError(f"adapter name {name!r}: '..' is not allowed")
    if name.startswith(".") or name != name.strip():
        raise UnsafeNameError(f"adapter name {name!r}: must not start with '.' or with/end in spaces")
    m = _BAD_CHARS.search(name)
    if m:
        c = m.group()
        what = f"the character {c!r}" if c.isprintable() else f"the control character U+{ord(c):04X}"
        raise UnsafeNameError(f"adapter name {name!r}: {what} is not allowed in file names; "
                              f"not allowed: {_BAD_CHARS_SHOWN} and control characters")
    for c in name:
        cat = unicodedata.category(c)
        if c in _BIDI_CONTROLS:
            raise UnsafeNameError(f"adapter name {name!r}: contains the text-direction control U+{ord(c):04X} "
                                  f"({unicodedata.name(c, 'bidi control')}), which makes a name display "
                                  "differently from what it is; type the name without it")
        if cat in ("Cf", "Cc", "Zl", "Zp"):
            raise UnsafeNameError(f"adapter name {name!r}: contains the invisible character U+{ord(c):04X} "
                                  f"({unicodedata.name(c, 'format or control character')}); type the name "
                                  "without it")
        if cat == "Cs":
            raise UnsafeNameError(f"adapter name {name!r}: is not valid text (a lone surrogate U+{ord(c):04X})")
    if len(name) > MAX_NAME_LEN:
        raise UnsafeNameError(f"adapter name: longer than {MAX_NAME_LEN} characters")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise UnsafeNameError(f"adapter name: {size} bytes in UTF-8, more than {MAX_NAME_BYTES} (file names are at "
                              f"most 255 bytes, and the library adds endings like '.preview.png' and "
                              f"'.safetensors'); use a shorter name")
    return name


def _plain_file(p: Path) -> bool:
    """A regular file, not a symlink (to one)."""
    return not p.is_symlink() and p.is_file()


def with_user_metadata(path: Path) -> list[Path]:
    """The adapter file, and AUTOMATIC1111's user metadata beside it (`name.json`) when there is one."""
    side = Path(path).with_suffix(".json")
    return [Path(path), side] if _plain_file(side) else [Path(path)]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


class AdapterLibrary:
    """A folder of adapters. All names are resolved inside `root`."""

    def __init__(self, root: str | os.PathLike | None = None, *, allow_pickle: bool = False) -> None:
        self.root = Path(root).expanduser() if root is not None else default_library_root()
        self.allow_pickle = allow_pickle
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.problems: dict[str, str] = {}  # files the last list() could not describe, with the reason

    # ---------------------------------------------------------------------------------- resolution
    def _real_root(self) -> Path:
        return self.root.resolve()

    def _inside(self, p: Path) -> bool:
        try:
            p.resolve().relative_to(self._real_root())
            return True
        except ValueError:
            return False

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.suffix.lower() == SAFETENSORS_SUFFIX and not p.name.startswith(".") and p.is_file())

    def names(self) -> list[str]:
        """Names of the adapters in the library (files that resolve outside it are left out)."""
        self.remove_stale_temp_files()
        return [p.stem for p in self._files() if self._inside(p)]

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete what a killed save left: atomic_write's hidden temporary files of adapters and sidecars
        (`.NAME.safetensors.XXXXXXXX.tmp`) not written to for STALE_TEMP_SECONDS; returns them. A save in
        progress keeps its temporary file fresh, so it is never touched."""
        gone = []
        for p in stale_temp_files(self.root, (SAFETENSORS_SUFFIX, *SIDECAR_SUFFIXES)):
            try:
                p.unlink()
                gone.append(p)
            except OSError:
                pass
        return gone

    def _existing(self, name: str) -> Path | None:
        """The file for `name`: the exact spelling if present, else the one equal up to case."""
        exact = self.root / f"{name}{SAFETENSORS_SUFFIX}"
        if exact.is_file() and not exact.name.startswith("."):
            return exact
        folded = name.casefold()
        hits = [p for p in self._files() if p.stem.casefold() == folded]
        return hits[0] if hits else None

    def find(self, name: str) -> Path | None:
        """The file of the adapter called `name` (up to case), or None: is the name in use?"""
        return self._existing(check_name(name))

    def in_the_way(self, name: str, keep: tuple[Path, ...] = ()) -> Path | None:
        """A file that a new adapter `name` would overwrite or adopt although it is no adapter's:
        `name.md`, `name.png`, ... (SIDECAR_SUFFIXES) left without `name.safetensors`. Files in `keep`
        (an adapter being renamed, and its own sidecars) do not count."""
        name = check_name(name)
        for s in SIDECAR_SUFFIXES:
            q = self.root / f"{name}{s}"
            if not (q.exists() or q.is_symlink()):
                continue
            if any(q == k or _same_file(q, k) for k in keep):
                continue
            return q
        return None

    def _refuse_orphans(self, name: str, keep: tuple[Path, ...] = ()) -> None:
        blocker = self.in_the_way(name, keep)
        if blocker is not None:
            raise ConfigError(f"name: '{blocker.name}' is already in the library {self.root} without an adapter "
                              f"'{name}'; it would be overwritten or taken for {name}'s. Move or delete it first, "
                              "or pick another name")

    def path_for(self, name: str) -> Path:
        """The file of an existing adapter. UnsafeNameError for names or links that escape the library;
        FileNotFoundError when there is no such adapter."""
        name = check_name(name)
        p = self._existing(name)
        if p is None:
            import difflib

            names = {n.casefold(): n for n in self.names()}
            close = difflib.get_close_matches(name.casefold(), names, n=1, cutoff=0.75)
            hint = f"; did you mean '{names[close[0]]}'?" if close else ""
            raise FileNotFoundError(f"no adapter named '{name}' in the library {self.root}{hint}")
        if not self._inside(p):
            raise UnsafeNameError(f"adapter '{name}': {p.name} links outside the library folder; refused")
        return p

    def _new_path(self, name: str, replacing: Path | None = None) -> Path:
        """Where a new adapter called `name` goes; refuses a name already taken (up to case)."""
        name = check_name(name)
        existing = self._existing(name)
        if existing is not None and (replacing is None or existing.resolve() != replacing.resolve()):
            raise ConfigError(f"name: an adapter called '{existing.stem}' already exists in the library")
        p = self.root / f"{name}{SAFETENSORS_SUFFIX}"
        if p.is_symlink() or not self._inside(p.parent):
            raise UnsafeNameError(f"adapter name '{name}': resolves outside the library folder; refused")
        return p

    def sidecars(self, name: str) -> list[Path]:
        """Preview images, model card and config files that belong to adapter `name`: regular files only.

        A sidecar that is a symlink is ignored (never read, served or copied): a link could show any file
        of the computer as a model card or preview in the browser."""
        p = self.path_for(name)
        return [q for s in SIDECAR_SUFFIXES if _plain_file(q := p.with_name(p.stem + s))]

    def _sidecar_links(self, p: Path) -> list[Path]:
        """Sidecar names of adapter file `p` that are symlinks: never followed, but renamed and deleted with it."""
        return [q for s in SIDECAR_SUFFIXES if (q := p.with_name(p.stem + s)).is_symlink()]

    def preview(self, name: str) -> Path | None:
        """The adapter's preview image (A1111: name.png or name.preview.png), a regular file, or None."""
        p = self.path_for(name)
        return next((q for s in PREVIEW_SUFFIXES if _plain_file(q := p.with_name(p.stem + s))), None)

    def model_card(self, name: str) -> str | None:
        """The text of the adapter's model card (name.md), a regular file, or None."""
        p = self.path_for(name)
        card = p.with_name(p.stem + ".md")
        return card.read_text(encoding="utf-8", errors="replace") if _plain_file(card) else None

    # ---------------------------------------------------------------------------------- reading
    def _hash(self, p: Path) -> str:
        from .weights_io import addnet_hash

        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        if key not in self._hashes:
            self._hashes[key] = addnet_hash(p)
        return self._hashes[key]

    def info(self, name: str, *, check_tensors: bool = False) -> AdapterInfo:
        p = self.path_for(name)
        info = inspect_adapter(p, name=p.stem, check_tensors=check_tensors, compute_hash=False)
        info.hash = self._hash(p)
        info.preview = self.preview(p.stem)  # a symlinked preview is never shown
        return info

    def list(self) -> list[AdapterInfo]:
        """Every adapter with its name, family, trigger word, rank, size, preview and date.

        Reads headers only (and kohya alpha scalars). A file that cannot be described does not fail the
        whole listing: it is left out and its problem recorded in `self.problems` ({name: message}).
        """
        from .errors import LoraStudioError

        out = []
        self.problems = {}
        for name in self.names():
            try:
                out.append(self.info(name))
            except (LoraStudioError, OSError) as e:
                self.problems[name] = str(e)
        return out

    # ---------------------------------------------------------------------------------- changing
    def create(self, name: str, write: Callable[[Path], object], *, overwrite: bool = False) -> AdapterInfo:
        """A new adapter made by `write(path)` (a resize, an extraction), checked and added as `name`. The name is
        checked before the work; nothing is left behind when it fails."""
        name = check_name(name)
        existing = self._existing(name)
        if existing is not None and not overwrite:
            raise ConfigError(f"name: an adapter called '{existing.stem}' already exists in the library")
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".new-", dir=self.root) as tmp:
            path = Path(tmp) / f"{name}{SAFETENSORS_SUFFIX}"
            write(path)
            return self.import_file(path, name, overwrite=overwrite)

    def import_file(self, src: str | os.PathLike, name: str | None = None, *, overwrite: bool = False,
                    allow_pickle: bool | None = None) -> AdapterInfo:
        """Copy an adapter file into the library after checking it is a loadable LoRA.

        The copy is atomic; same-named previews, model cards and configs next to `src` come along. A
        pickle (.pt/.bin/.ckpt) is refused unless allowed, and is then stored as .safetensors.
        """
        src = Path(src).expanduser()
        allow = self.allow_pickle if allow_pickle is None else allow_pickle
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such file")
        # full check: readable, finite, a LoRA in a supported format
        inspect_adapter(src, allow_pickle=allow, check_tensors=True, compute_hash=False)
        name = check_name(name if name is not None else src.stem)
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self._existing(name)
        if existing is not None:
            if not overwrite:
                raise ConfigError(f"name: an adapter called '{existing.stem}' already exists in the library")
            dst = existing
            if not self._inside(dst):
                raise UnsafeNameError(f"adapter '{name}': {dst.name} links outside the library folder; refused")
        else:
            dst = self._new_path(name)
            if not overwrite:
                self._refuse_orphans(dst.stem)
        if src.suffix.lower() in PICKLE_SUFFIXES:
            sd, meta = load_safetensors(src, allow_pickle=allow, check_finite=True)
            save_safetensors(sd, dst, meta)
        else:
            _atomic_copy(src, dst)
        for s in SIDECAR_SUFFIXES:
            side = src.with_name(src.stem + s)
            if _plain_file(side) and side.resolve() != src.resolve():  # a symlinked sidecar is not copied
                _atomic_copy(side, dst.with_name(dst.stem + s))
        return self.info(dst.stem)

    def set_preview(self, name: str, image) -> Path:
        """Make `image` (a picture file or a PIL image) adapter `name`'s preview: `NAME.png` beside it, as
        AUTOMATIC1111's "replace preview" writes it (the first preview file every tool looks for), atomically.
        A symlinked `NAME.png` is never written through."""
        from PIL import Image, UnidentifiedImageError

        src = self.path_for(name)
        dst = src.with_name(src.stem + ".png")
        if dst.is_symlink():
            raise UnsafeNameError(f"adapter '{src.stem}': {dst.name} is a link; not written through")
        if isinstance(image, Image.Image):
            picture = image
        else:
            try:
                with Image.open(image) as f:
                    f.load()
                    picture = f.copy()
            except (OSError, UnidentifiedImageError):
                raise ConfigError(f"image: {Path(image).name}: not a picture this app can read") from None
        picture = picture.convert("RGBA" if "A" in picture.getbands() else "RGB")
        atomic_write(dst, lambda tmp: picture.save(tmp, format="PNG"))
        return dst

    def rename(self, old: str, new: str) -> AdapterInfo:
        """Rename an adapter and everything that carries its name: its sidecar files (preview, card, config),
        the name in its metadata (`lora_studio.name`, kohya's `ss_output_name`, `modelspec.title`), in its
        model card and config, and its training run folder (runs/<name>: checkpoints, samples, log).
        A change of case only is allowed."""
        src = self.path_for(old)
        dst = self._new_path(new, replacing=src)
        own = self.sidecars(src.stem) + self._sidecar_links(src)
        self._refuse_orphans(dst.stem, keep=(src, *own))
        run_src, run_dst = self.root / "runs" / src.stem, self.root / "runs" / dst.stem
        move_run = run_src.is_dir() and not run_src.is_symlink() and run_src != run_dst
        if move_run and run_dst.exists() and run_src.name.casefold() != run_dst.name.casefold():
            raise ConfigError(f"name: a training run folder '{run_dst.name}' already exists in {run_dst.parent}; "
                              "pick another name")
        moves = [(src, dst)] + [(q, dst.with_name(dst.stem + q.name[len(src.stem):])) for q in own]
        if move_run:
            moves.append((run_src, run_dst))
        for a, b in moves:
            if a == b:
                continue
            if a.name.casefold() == b.name.casefold():  # case-only rename on a case-insensitive file system
                tmp = a.with_name(f".{a.name}.rename")
                os.replace(a, tmp)
                os.replace(tmp, b)
            else:
                os.replace(a, b)
        if dst.stem != src.stem:
            self._rename_inside(dst, src.stem)
        return self.info(dst.stem)

    def _rename_inside(self, path: Path, old: str) -> None:
        """The new name in the file's metadata, its model card's title and commands, its config, and the tag in
        AUTOMATIC1111's user metadata."""
        new = path.stem
        meta = read_metadata(path)
        keys = [k for k in ("lora_studio.name", "ss_output_name", "modelspec.title") if meta.get(k) == old]
        if keys:
            sd, meta = load_safetensors(path)
            save_safetensors(sd, path, {**meta, **{k: new for k in keys}})
        card = path.with_name(new + ".md")
        if card.is_file() and not card.is_symlink():
            text = card.read_text(encoding="utf-8", errors="replace")
            text = re.sub(rf"^# {re.escape(old)}$", f"# {new}", text, count=1, flags=re.M)
            text = re.sub(rf"(--lora \"?|loras export |<lora:){re.escape(old)}(?=[:\s`>\"])", rf"\g<1>{new}", text)
            text = text.replace(f"`{old}.json`", f"`{new}.json`")
            atomic_write(card, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        user = path.with_name(new + ".json")  # AUTOMATIC1111's user metadata: its notes give the <lora:...> tag
        if user.is_file() and not user.is_symlink():
            _retag_user_metadata(user, user, old, new)
        cfg = path.with_name(new + ".toml")
        if cfg.is_file() and not cfg.is_symlink():
            text = cfg.read_text(encoding="utf-8", errors="replace")
            text = re.sub(rf'^name = "{re.escape(old)}"$', f'name = "{new}"', text, count=1, flags=re.M)
            atomic_write(cfg, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def delete(self, name: str) -> list[Path]:
        """Delete an adapter and its sidecar files; returns what was removed."""
        p = self.path_for(name)
        gone = self.sidecars(p.stem) + self._sidecar_links(p) + [p]  # a link is removed, never its target
        for q in gone:
            q.unlink()
        return gone

    def export(self, name: str, fmt: str = FORMAT_KOHYA, dst: str | os.PathLike | None = None, *,
               base=None, precision: str | None = None) -> Path:
        """Write adapter `name` in format 'kohya' (A1111/ComfyUI), 'peft' (diffusers) or 'embedding' (its bundled
        embedding alone, for an embeddings folder) to `dst`.

        `dst` may be a folder (the file is named after the adapter) or a file path; default:
        <library>/exports/<name>.<fmt>.safetensors.
        """
        if fmt not in (FORMAT_KOHYA, FORMAT_PEFT, FORMAT_EMBEDDING):
            raise ConfigError(f"format: unknown export format '{fmt}' (choose 'kohya', 'peft' or 'embedding')")
        src = self.path_for(name)
        stem = src.stem
        if fmt == FORMAT_EMBEDDING:  # named after its word: AUTOMATIC1111 and ComfyUI take a file's name as the word
            words = inspect_adapter(src, check_tensors=False, compute_hash=False).embeddings
            stem = next(iter(words), stem)
        if dst is None:
            out = self.root / "exports" / (f"{stem}{SAFETENSORS_SUFFIX}" if fmt == FORMAT_EMBEDDING
                                           else f"{stem}.{fmt}{SAFETENSORS_SUFFIX}")
        else:
            out = Path(dst).expanduser()
            if out.is_dir():
                out = out / f"{stem}{SAFETENSORS_SUFFIX}"
        if out.resolve() == src.resolve():
            raise ConfigError("out: the export would overwrite the adapter itself")
        written = export_adapter(src, out, fmt, base=base, allow_pickle=False, precision=precision)
        side = src.with_suffix(".json")
        if fmt == FORMAT_KOHYA and _plain_file(side):  # A1111's user metadata (trigger word) goes with the file
            # under the exported file's name (A1111 names an adapter after its file): the notes' tag follows it
            if not _retag_user_metadata(side, written.with_suffix(".json"), src.stem, written.stem):
                atomic_write(written.with_suffix(".json"), lambda tmp: shutil.copyfile(side, tmp))
        return written


def _retag_user_metadata(src: Path, dst: Path, old: str, new: str) -> bool:
    """Write AUTOMATIC1111 user metadata `src` to `dst` with the `<lora:old…>` tags of its notes naming `new`;
    False (nothing written) when `src` is not such JSON or has no such tag: not ours to change."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    notes = data.get("notes") if isinstance(data, dict) else None
    if not isinstance(notes, str) or f"<lora:{old}" not in notes:
        return False
    data["notes"] = re.sub(rf"<lora:{re.escape(old)}(?=[:>])", f"<lora:{new}", notes)
    text = json.dumps(data, indent=4, ensure_ascii=False) + "\n"
    atomic_write(dst, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return True


__all__ = ["AdapterLibrary", "check_name", "with_user_metadata", "default_home", "default_library_root", "SIDECAR_SUFFIXES"]
