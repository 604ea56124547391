"""All weight-file I/O of LoRA Studio: safetensors only, validated on read, atomic on write.

Pickle formats (.ckpt, .pt, .pth, .bin) can run code when loaded; they are refused unless the
caller passes allow_pickle=True explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from .errors import CorruptWeightsError, PickleRefusedError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


# dtypes an adapter file can be written in (`save_precision`, `loras export --precision`)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast_weights(sd: dict[str, torch.Tensor], precision: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """`sd` cast to `precision` (a PRECISIONS key), and the first tensor that does not fit in it (it became
    inf or NaN: fp16 tops out at 65504), else None. The caller decides what to do with a misfit."""
    out = {k: v.to(PRECISIONS[precision]) for k, v in sd.items()}
    return out, next((k for k, v in out.items() if not torch.isfinite(v).all()), None)


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Raise PickleRefusedError for a pickle-format file unless explicitly allowed."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise PickleRefusedError(
            f"{path}: '{Path(path).suffix}' files are pickles that can run code when loaded; "
            "only .safetensors is accepted unless --allow-pickle is given"
        )


def read_header(path: Path) -> tuple[dict, int]:
    """Read and check a safetensors header without loading any tensor.

    Returns (header dict without __metadata__ removed, data offset). Every claim of the header is
    checked against the real file size, so a hostile header cannot make us allocate memory.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptWeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptWeightsError(
                f"{path}: not a valid safetensors file (header claims {n} bytes, file has {size});"
                " is it truncated, or a pickle renamed to .safetensors?"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptWeightsError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                raise CorruptWeightsError(f"{path}: __metadata__ is not a JSON object")
            continue
        try:
            start, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            itemsize = _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptWeightsError(f"{path}: tensor '{key}' has a malformed header entry") from None
        if not (0 <= start <= end <= data_len) or end - start != numel * itemsize:
            raise CorruptWeightsError(
                f"{path}: tensor '{key}' claims bytes {start}..{end} but the file holds {data_len};"
                " the file is truncated or corrupt"
            )
    return header, 8 + n


def read_metadata(path: Path) -> dict[str, str]:
    header, _ = read_header(path)
    return dict(header.get("__metadata__", {}) or {})


def load_pickle(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors of a .ckpt/.pt/.pth/.bin file, unpickled weights-only (the caller has allowed pickles).

    A checkpoint's {"state_dict": {...}} is unwrapped. An empty, truncated or corrupt file, one that holds
    something other than a dict of tensors, or Python objects a weights-only load refuses, raises
    CorruptWeightsError naming the file and what was wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CorruptWeightsError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a damaged or foreign file to the user
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6: a zip archive
        raise CorruptWeightsError(f"{path}: not a readable weights file: {_pickle_problem(e, size, zipped)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CorruptWeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of named tensors)")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise CorruptWeightsError(f"{path}: holds no tensors (a dict with keys {keys})")
    return sd


def _pickle_problem(e: BaseException, size: int, zipped: bool) -> str:
    """What torch.load's error means to a user, in one line (its own messages run to paragraphs)."""
    import pickle
    import zipfile

    text = str(e)
    if isinstance(e, EOFError) or "Ran out of input" in text:
        return f"it ends too early; truncated at {size} bytes?"
    if zipped or "PytorchStreamReader" in text or isinstance(e, zipfile.BadZipFile):
        return "a damaged zip archive; truncated, or not saved completely?"
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0].strip() if detail and "WeightsUnpickler error:" in text else ""
        if m := re.search(r"Unsupported global: GLOBAL (\S+)", detail):
            return (f"it holds Python objects other than tensors ({m.group(1)}), which a weights-only load refuses "
                    "because unpickling them can run code")
        if detail.startswith("Unsupported operand"):
            return f"its data is malformed ({detail.lower()}); damaged, or not a PyTorch weights file?"
        return f"a weights-only load refused it ({detail or 'not a tensors-only pickle'})"
    first = text.splitlines()[0] if text else ""
    what = f"{type(e).__name__}: {first}" if first and not isinstance(e, pickle.UnpicklingError) else first
    return f"its data is malformed ({what or type(e).__name__}); damaged, or not a PyTorch weights file?"


def load_safetensors(
    path: str | os.PathLike, device: str = "cpu", allow_pickle: bool = False, check_finite: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a weights file: returns (state_dict, metadata). Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        sd = load_pickle(path, device)
        meta: dict[str, str] = {}
    else:
        header, _ = read_header(path)
        meta = dict(header.get("__metadata__", {}) or {})
        try:
            sd = load_file(str(path), device=device)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CorruptWeightsError(f"{path}: could not be read as safetensors ({e})") from None
    if check_finite:
        for k, v in sd.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CorruptWeightsError(f"{path}: tensor '{k}' contains NaN or infinite values")
    return sd, meta


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then os.replace.

    A crash at any point leaves either the old file or the new one under `path`, never a mix.
    Non-finite tensors are refused so a broken run can never overwrite a good file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    for k, v in state_dict.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CorruptWeightsError(f"{path}: refusing to save, tensor '{k}' contains NaN or infinite values")
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# the temporary files atomic_write makes: ".<name>.<8 random characters of mkstemp>.tmp" beside <name>
TEMP_FILE_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
STALE_TEMP_SECONDS = 15 * 60


def stale_temp_files(folder: str | os.PathLike, endings: tuple[str, ...],
                     older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Temporary files of atomic_write in `folder` that a killed process left behind.

    Only regular files named exactly as atomic_write names them, for a target ending in one of `endings`,
    and not written to for `older_than` seconds: a write in progress keeps its file's mtime fresh (every
    chunk written updates it), so a concurrent save is never taken for a leftover.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now = time.time()
    out = []
    for p in folder.iterdir():
        m = TEMP_FILE_RE.match(p.name)
        if not m or not m.group("target").lower().endswith(endings) or p.is_symlink():
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than:
            out.append(p)
    return sorted(out)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, fsync it, then os.replace it into place.

    A crash at any point leaves either the old file or the new one under `path`, never a mix, and
    no temporary file is left behind by an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # see TEMP_FILE_RE
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensor data (after the header), as AUTOMATIC1111 hashes LoRAs."""
    _, offset = read_header(Path(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
