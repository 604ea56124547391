"""Textual-inversion embeddings by name in the prompt, as AUTOMATIC1111 and ComfyUI use them.

Prompts from model pages name embeddings as words: `EasyNegative`, `badhandv4` in the negative prompt. A1111
takes every file of its `embeddings` folder as a word (the file's name without suffix); here the files of
`<home>/models/embeddings` are, loaded when a prompt names one (whole word, any case; ComfyUI's
`embedding:name` works too). A file holds one or more vectors: A1111's `.safetensors` (`emb_params`), SDXL's
(`clip_l` and `clip_g`), a diffusers file (one key), or A1111's `.pt` (`string_to_param`, only with pickles
allowed). Each vector becomes a token of its own in the tokenizer (`<ti:name:0>`, `<ti:name:1>`…), so the word
never changes how other words split; the prompt encoder (pipelines.prompts) puts the tokens in the word's place.
An embedding of another width (made for another family) is refused with a warning naming it, and the prompt
keeps the word as text.

LoRA files may carry embeddings of their own (AUTOMATIC1111's bundled embeddings: `bundle_emb.<word>.<key>`, as
kohya's tools and pivotal-tuning trainers write them, and as this app's `--pivotal` training does): such a word
works while its adapter is in the stack (pipelines.stack fills `bundled(model)`), whatever the embeddings folder
holds, as in A1111.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, CorruptWeightsError, LoraStudioError
from .weights_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_safetensors, refuse_pickle

EMBEDDING_SUFFIXES = (SAFETENSORS_SUFFIX, ".pt", ".bin")


def embedding_files(folder: str | os.PathLike | None) -> dict[str, Path]:
    """The embeddings in a folder by prompt word (the file name without suffix, lower case)."""
    if not folder or not Path(folder).is_dir():
        return {}
    return {p.stem.lower(): p for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES and not p.name.startswith(".")}


def _word(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-])(?:embedding:)?{re.escape(name)}(?![\w-])", re.IGNORECASE)


def loaded(model) -> dict[str, dict[str, list[str]]]:
    """The embeddings folder's words loaded into `model`: word -> {tokenizer attribute: its tokens}."""
    return model.__dict__.setdefault("_embeddings", {})


def bundled(model) -> dict[str, dict[str, list[str]]]:
    """The words of the embeddings that the adapters in use carry: word -> {tokenizer attribute: its tokens}."""
    return model.__dict__.setdefault("_bundled_in_use", {})


def _words(model) -> dict[str, dict[str, list[str]]]:
    return {**loaded(model), **bundled(model)}  # an adapter's own word wins over a file's, as in A1111


def mentions(model, text: str) -> bool:
    return any(_word(name).search(text or "") for name in _words(model))


def expand(model, text: str, tokenizer_attr: str = "tokenizer") -> str:
    """`text` with each embedding word in use replaced by its tokens for that tokenizer."""
    for name, tokens in _words(model).items():
        if tokenizer_attr in tokens:
            joined = " ".join(tokens[tokenizer_attr])
            text = _word(name).sub(lambda _m: joined, text)
    return text


def _vectors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """{'': (n, D)} for one text encoder, or {'clip_l': …, 'clip_g': …} for SDXL."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling raises many types
            raise CorruptWeightsError(f"{path.name}: not an embedding file ({type(e).__name__})") from None
    else:
        data, _ = load_safetensors(path, check_finite=True)
    return _normalised(data, path.name)


def read_embedding(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """An embedding file's vectors: {'': (n, D)} for one text encoder, {'clip_l': …, 'clip_g': …} for SDXL."""
    path = Path(path)
    if not path.is_file():
        raise CorruptWeightsError(f"{path}: no such embedding file")
    return _vectors(path, allow_pickle)


def _normalised(data, where: str) -> dict[str, torch.Tensor]:
    """An embedding's tensors as {'': (n, D)} or {'clip_l': …, 'clip_g': …}; anything else is refused naming
    `where`."""
    if not isinstance(data, dict):
        data = {"": data}
    if isinstance(data.get("string_to_param"), dict):
        data = dict(data["string_to_param"])
    if "clip_l" in data and "clip_g" in data:
        out = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif "emb_params" in data:
        out = {"": data["emb_params"]}
    elif len(data) == 1:
        out = {"": next(iter(data.values()))}
    else:
        raise CorruptWeightsError(f"{where}: not an embedding (keys {sorted(data)[:4]})")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2) or not torch.isfinite(v).all():
            raise CorruptWeightsError(f"{where}: not an embedding (its vectors are not a finite (n, D) tensor)")
        out[k] = v.reshape(-1, v.shape[-1]) if v.ndim == 2 else v[None]
    return out


def used_hashes(model, texts) -> str:
    """AUTOMATIC1111's `TI hashes` value for the loaded embeddings that `texts` name: 'Name: hash12, …' (the file's
    own name and the start of its SHA-256), or '' when none is named."""
    import hashlib

    out = []
    hashes = model.__dict__.setdefault("_embedding_hashes", {})
    for name, (path, mtime, size) in model.__dict__.get("_embedding_files", {}).items():
        if name in loaded(model) and any(_word(name).search(t or "") for t in texts):
            key = (path, mtime, size)
            if key not in hashes:
                hashes[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
            out.append(f"{Path(path).stem}: {hashes[key]}")
    return ", ".join(out)


def _signature(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def _add(tokenizer, encoder, name: str, vectors: torch.Tensor, stem: str = "ti") -> list[str]:
    emb = encoder.get_input_embeddings()
    if vectors.shape[-1] != emb.weight.shape[1]:
        raise LoraStudioError(f"its vectors are {vectors.shape[-1]} wide, this text encoder's are "
                              f"{emb.weight.shape[1]}: it was made for another kind of model")
    tokens = [f"<{stem}:{name}:{i}>" for i in range(vectors.shape[0])]
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        weight[ids] = vectors.to(weight.device, weight.dtype)
    return tokens


def use_embeddings(model, folder: str | os.PathLike | None, texts, allow_pickle: bool = False) -> list[str]:
    """Load the embeddings of `folder` that `texts` name and are not loaded yet; returns warnings for those that
    cannot be used here (the word then stays text)."""
    warnings = []
    have = loaded(model)
    seen = model.__dict__.setdefault("_embedding_files", {})  # word -> (file, mtime, size) when loaded
    files = embedding_files(folder)
    for name in list(have):  # a file deleted or replaced since: forgotten (a replaced one is read again)
        path = files.get(name)
        if path is None or seen.get(name) != _signature(path):
            del have[name]
    for name, path in files.items():
        if name in have or not any(_word(name).search(t or "") for t in texts):
            continue
        try:
            new = add_vectors(model, name, _vectors(path, allow_pickle), "ti")
        except LoraStudioError as e:  # said without the folder (the app's users see it)
            why = str(e).replace(f"{path}: ", "").replace(f"{path.name}: ", "").replace(str(path), path.name)
            warnings.append(f"embedding '{path.name}' is not used: {why}")
            continue
        have[name] = new  # the same tokens again for a replaced file: their vectors are overwritten
        seen[name] = _signature(path)
    return warnings


BUNDLE_PREFIX = "bundle_emb."


def split_bundled(sd: dict, where: str = "the adapter") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """An adapter file's tensors without its bundled embeddings, and those: {word: {'': (n, D)} or
    {'clip_l': …, 'clip_g': …}}. A1111's readers take `bundle_emb.<word>.<key>` with the key of an embedding
    file (`string_to_param.*`, `emb_params`, `clip_l` / `clip_g`, or any single one)."""
    rest, raw = {}, {}
    for k, v in sd.items():
        if not k.startswith(BUNDLE_PREFIX):
            rest[k] = v
            continue
        word, _, key = k[len(BUNDLE_PREFIX):].partition(".")
        if not word or not key:
            raise CorruptWeightsError(f"{where}: bundled embedding key '{k}' has no word or no vector name")
        raw.setdefault(word, {})[key] = v
    out = {}
    for word, data in raw.items():
        if not all(isinstance(v, torch.Tensor) for v in data.values()):  # shapes only (a header's view)
            out[word] = data
            continue
        if len(data) > 1 and not {"clip_l", "clip_g"} <= set(data):
            data = {k.removeprefix("string_to_param."): v for k, v in data.items()}
        out[word] = _normalised(data, f"{where}: bundled embedding '{word}'")
    return rest, out


def bundle_keys(word: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that carry embedding `word` inside an adapter file, as A1111 reads them: SD 1.x/2.x's one set
    as a textual-inversion file's `string_to_param.*`, SDXL's as `clip_l` and `clip_g`."""
    if set(vectors) == {""}:
        return {f"{BUNDLE_PREFIX}{word}.string_to_param.*": vectors[""].contiguous()}
    return {f"{BUNDLE_PREFIX}{word}.{k}": vectors[k].contiguous() for k in ("clip_l", "clip_g")}


def vector_count(vectors: dict) -> int:
    """How many vectors (tokens) an embedding has, from its tensors or their shapes."""
    first = next(iter(vectors.values()))
    shape = tuple(first.shape) if isinstance(first, torch.Tensor) else tuple(first)
    return 1 if len(shape) == 1 else int(shape[0])


def add_vectors(model, name: str, vectors: dict[str, torch.Tensor], stem: str) -> dict[str, list[str]]:
    """Put an embedding's vectors into the model's tokenizer(s) and text encoder(s) as tokens `<stem:name:i>`
    (the same names in both of SDXL's); returns {tokenizer attribute: tokens}. Raises LoraStudioError when the
    vectors do not fit this family or width."""
    pipe = model.pipe
    if model.family == "sdxl":
        if "clip_l" not in vectors:
            raise LoraStudioError("it has one set of vectors; SDXL needs clip_l and clip_g")
        return {"tokenizer": _add(pipe.tokenizer, pipe.text_encoder, name, vectors["clip_l"], stem),
                "tokenizer_2": _add(pipe.tokenizer_2, pipe.text_encoder_2, name, vectors["clip_g"], stem)}
    if "" not in vectors:
        raise LoraStudioError("it is an SDXL embedding (clip_l and clip_g)")
    return {"tokenizer": _add(pipe.tokenizer, pipe.text_encoder, name, vectors[""], stem)}


def token_stem(adapter: str) -> str:
    """The token names' stem for an adapter's bundled words (one per adapter name: reloading reuses them)."""
    return "lora-" + re.sub(r"[^\w-]", "_", adapter)


EMBEDDING_WIDTHS = {768: "sd1", 1024: "sd2"}  # a text encoder's width: SD 1.x CLIP-L, SD 2.x OpenCLIP-H
WORD = re.compile(r"[\w-]+")  # a name a prompt can hold as one word


@dataclass
class EmbeddingInfo:
    """One file of the embeddings folder, as the Library and `lora-studio embeddings` list it."""

    word: str  # the file's name without suffix: what a prompt writes
    path: Path
    size: int  # bytes
    hash: str  # A1111's TI hash: the first 12 hex digits of the file's sha256
    vectors: int = 0
    family: str = ""  # sd1, sd2, sdxl (or "width N")
    preview: Path | None = None  # NAME.preview.png beside it
    card: Path | None = None  # NAME.md beside it
    error: str | None = None  # why it cannot be read (then vectors and family are unknown)


def companions(path: Path) -> list[Path]:
    """The files that belong to an embedding file: its preview (`NAME.preview.png`, A1111's) and card (`NAME.md`)."""
    return [p for p in (path.with_name(f"{path.stem}.preview.png"), path.with_suffix(".md")) if p.is_file()]


def describe_embeddings(folder: str | os.PathLike | None, allow_pickle: bool = False) -> list[EmbeddingInfo]:
    """Every embedding file of `folder`, read: its vectors, family, size and A1111's hash."""
    import hashlib

    out = []
    for path in embedding_files(folder).values():
        info = EmbeddingInfo(path.stem, path, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
        for extra in companions(path):
            if extra.suffix == ".md":
                info.card = extra
            else:
                info.preview = extra
        try:
            vec = read_embedding(path, allow_pickle=allow_pickle)
        except LoraStudioError as e:
            info.error = str(e).replace(str(path) + ": ", "").replace(path.name + ": ", "")
        else:
            first = next(iter(vec.values()))
            info.vectors = int(first.shape[0])
            info.family = ("sdxl" if set(vec) == {"clip_l", "clip_g"}
                           else EMBEDDING_WIDTHS.get(first.shape[1], f"width {first.shape[1]}"))
        out.append(info)
    return out


def find_embedding(folder: str | os.PathLike | None, name: str) -> Path:
    """The file of the embedding called `name` (any case); an unknown name is an error that lists the folder."""
    path = embedding_files(folder).get((name or "").strip().lower())
    if path is None:
        have = ", ".join(p.stem for p in embedding_files(folder).values()) or "none"
        raise ConfigError(f"embedding: no embedding named '{name}' in {folder} (it has: {have})")
    return path


def rename_embedding(folder: str | os.PathLike, old: str, new: str) -> Path:
    """Renames an embedding and its preview and card: `new` is the word prompts write from now on. A name
    that is not one word, or that another embedding has, is refused; nothing is changed then."""
    path = find_embedding(folder, old)
    new = (new or "").strip()
    if not WORD.fullmatch(new):
        raise ConfigError(f"new name: an embedding is used by writing its name in a prompt, so it must be one word "
                          f"(letters, digits, _ or -); got {new!r}")
    taken = embedding_files(folder).get(new.lower())
    if taken is not None and taken != path:
        raise ConfigError(f"new name: {taken.name} is already in {folder}; delete it first or choose another name")
    moves = [(path, path.with_name(new + path.suffix))]
    moves += [(p, p.with_name(new + p.name[len(path.stem):])) for p in companions(path)]
    for src, dst in moves:
        if dst.exists() and dst.resolve() != src.resolve():
            raise ConfigError(f"new name: {dst} is in the way; move it first")
    for src, dst in moves:
        os.replace(src, dst)
    return moves[0][1]


def delete_embedding(folder: str | os.PathLike, name: str) -> list[Path]:
    """Deletes an embedding file with its preview and card; returns what was deleted."""
    path = find_embedding(folder, name)
    gone = [path, *companions(path)]
    for p in gone:
        p.unlink()
    return gone


__all__ = ["embedding_files", "use_embeddings", "expand", "mentions", "loaded", "used_hashes", "EMBEDDING_SUFFIXES",
           "bundled", "split_bundled", "bundle_keys", "add_vectors", "vector_count", "token_stem", "BUNDLE_PREFIX",
           "read_embedding", "EmbeddingInfo", "describe_embeddings", "rename_embedding", "delete_embedding",
           "companions", "EMBEDDING_WIDTHS", "find_embedding"]
