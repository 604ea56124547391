"""The app's server-side state: folders, the training queue, loaded base models and their adapter stacks.

No Gradio here. The browser sends names (adapter, base model, sample set, dataset, image file); each is
resolved inside one of the app's own folders and refused if it would leave it.

    $LORA_STUDIO_HOME/
        loras/      the adapter library (and loras/runs/<name>/ with samples, checkpoints, log)
        outputs/    generated images and comparison grids
        datasets/   training images staged from uploads or sample sets, one folder per upload
        models/     extra base models: diffusers folders and single-file .safetensors checkpoints
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipelines.base_models import DEFAULT_BASE, ROOT, BaseModel, family_from_configs, load_base
from pipelines.errors import ConfigError, UnsafeNameError
from pipelines.generation import GeneratedImage, GenerationRequest, save_png
from pipelines.library import AdapterLibrary, check_name, default_home
from pipelines.embeddings import embedding_files, use_embeddings
from pipelines.vae import AUTOMATIC, use_vae, vae_files
from pipelines.stack import AdapterStack, StackEntry, clip_skip_warnings, parse_lora_tags, range_warnings
from training.config import PRESETS, TrainConfig
from training.dataset import ScanResult, scan_folder
from training.jobs import Job, JobQueue

SAMPLE_DATA = ROOT / "sample_data"
SAMPLE_SET_TRIGGERS = {"concept-star": ("sks", "concept"), "style-outline": ("ohwx", "style")}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
_UNSAFE_FILE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')

_QUEUES: dict[Path, JobQueue] = {}
_QUEUE_LOCK = threading.Lock()


def job_queue(home: str | Path | None = None) -> JobQueue:
    """The process-wide training queue of a home folder (its jobs.sqlite): one worker, so never two trainings
    on the device at once.

    Jobs run as their own processes and the queue is kept in the home folder: closing the tab does not stop
    a job, a reopened page finds it again, and a restarted app lists the queue and the history.
    """
    key = Path(home if home is not None else default_home()).expanduser().resolve()
    with _QUEUE_LOCK:
        if key not in _QUEUES:
            _QUEUES[key] = JobQueue(key)
        return _QUEUES[key]


def safe_file_name(name: str) -> str:
    """A browser-supplied file name reduced to a plain name (no folders, no control characters)."""
    name = Path(str(name).replace("\\", "/")).name
    name = _UNSAFE_FILE_CHARS.sub("_", name).strip()
    if name in ("", ".", ".."):
        name = "file"
    return name[:150]


MAX_ZIP_BYTES = 4 << 30  # what a dataset .zip may unpack to (a zip bomb is refused before anything is written)
MAX_ZIP_FILES = 20_000


def _zip_members(zf, zip_name: str) -> list[tuple[Any, tuple[str, ...]]]:
    """The members of a dataset .zip worth unpacking (images, captions), each with its safe relative path: a
    single top folder around everything is dropped (a zipped dataset folder), unless it is a kohya folder
    (`10_ohwx woman`) itself."""
    from training.dataset import CAPTION_EXTS, IMAGE_EXTS, KOHYA_FOLDER

    out = []
    for info in zf.infolist():
        name = info.filename
        if not info.flag_bits & 0x800:  # no UTF-8 flag: Python read cp437, but most zip tools wrote UTF-8
            try:
                name = name.encode("cp437").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                pass
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if info.is_dir() or not parts or ".." in parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue
        if Path(parts[-1]).suffix.lower() not in IMAGE_EXTS | CAPTION_EXTS | {".tags"}:
            continue
        out.append((info, tuple(safe_file_name(p) for p in parts)))
    if not out:
        raise ConfigError(f"images: {zip_name} holds no images")
    if len(out) > MAX_ZIP_FILES:
        raise ConfigError(f"images: {zip_name} holds {len(out)} files; at most {MAX_ZIP_FILES} are unpacked")
    total = sum(info.file_size for info, _ in out)
    if total > MAX_ZIP_BYTES:
        raise ConfigError(f"images: {zip_name} unpacks to {total / 2**30:.1f} GiB; at most "
                          f"{MAX_ZIP_BYTES / 2**30:.0f} GiB")
    while True:  # folders around everything dropped (a zipped dataset folder, or a folder of it)
        tops = {parts[0] for _, parts in out}
        if len(tops) != 1 or not all(len(parts) > 1 for _, parts in out) or KOHYA_FOLDER.match(next(iter(tops))):
            break
        out = [(info, parts[1:]) for info, parts in out]
    # a kohya_ss GUI project (img/10_ohwx man, reg/1_man, model/, log/): its training images are those in img/
    img = [(info, parts[1:]) for info, parts in out if parts[0] == "img" and len(parts) > 2]
    if img and any(KOHYA_FOLDER.match(parts[0]) for _, parts in img):
        out = img
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def folder_family(folder: Path) -> str | None:
    """sd1 / sd2 / sdxl of a diffusers folder from its configs, without loading weights (None: unknown)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        te_path = folder / "text_encoder" / "config.json"
        te = json.loads(te_path.read_text()) if te_path.is_file() else None
    except (OSError, ValueError):
        return None
    return family_from_configs(unet, te, (folder / "text_encoder_2").is_dir())


@dataclass
class Loaded:
    """One loaded base model and the adapter stack that lives on it."""

    name: str
    base: BaseModel
    stack: AdapterStack


@dataclass
class RunState:
    """What the app knows of a training run's name."""

    name: str
    in_library: bool  # a finished adapter of that name (up to case)
    job: Job | None  # a queued or training job of that name
    checkpoint: Path | None  # the run's latest checkpoint
    step: int  # its step (0: no checkpoint)
    total: int | None  # the run's max_steps, where its options are known
    known: bool  # its options are known (a job of it, or job.toml in the run folder)

    @property
    def in_use(self) -> bool:
        """A new training may not take this name."""
        return self.in_library or self.job is not None

    @property
    def resumable(self) -> bool:
        """Stopped or interrupted with a checkpoint: `Studio.resume(name)` continues it."""
        return not self.in_use and self.checkpoint is not None and self.known


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    paths: list[Path]
    warnings: list[str]  # stacked adapters that fight (interference)
    entries: tuple[StackEntry, ...]
    range_warnings: list[str] = field(default_factory=list)  # step ranges that start past the last step
    clip_skip_warnings: list[str] = field(default_factory=list)  # adapters trained with another Clip skip
    embedding_warnings: list[str] = field(default_factory=list)  # embeddings named that cannot be used
    notes: list[str] = field(default_factory=list)  # dynamic prompts: combinations left out
    interrupted: str | None = None  # what an Interrupt left: how far the images got, what was not made


def _free_path(dst: Path) -> Path:
    """`dst`, or dst-1, dst-2…: a name not yet taken."""
    stem, suffix, k = dst.stem, dst.suffix, 1
    while dst.exists():
        dst = dst.with_name(f"{stem}-{k}{suffix}")
        k += 1
    return dst


class Studio:
    """Everything the UI handlers call into; one per server process (tests make their own)."""

    def __init__(self, home: str | Path | None = None, base: str | None = None, library: str | Path | None = None,
                 *, queue: JobQueue | None = None, allow_pickle: bool = False, device: str | None = None,
                 max_loaded: int = 2) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self._interrupt = threading.Event()  # the Generate tab's Interrupt: asked after every sampler step
        self.library = AdapterLibrary(library if library is not None else self.home / "loras",
                                      allow_pickle=allow_pickle)
        self.outputs = self.home / "outputs"
        self.datasets = self.home / "datasets"
        self.models_dir = self.home / "models"
        for d in (self.library.root, self.outputs, self.datasets, self.models_dir, self.vae_dir, self.embeddings_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.default_base = str(base) if base else str(DEFAULT_BASE)
        self.allow_pickle = allow_pickle
        self.device = device
        self._queue = queue.bind(self.home) if queue is not None else None  # a queue without a home takes ours
        self.max_loaded = max_loaded
        self._loaded: dict[str, Loaded] = {}
        self._models_lock = threading.Lock()
        self._out_lock = threading.Lock()

    @property
    def queue(self) -> JobQueue:
        return self._queue if self._queue is not None else job_queue(self.home)

    def served_paths(self) -> list[str]:
        """The only folders the web server may serve files from (besides Gradio's own upload cache)."""
        return [str(p.resolve()) for p in (self.outputs, self.library.root, self.datasets)]

    # ------------------------------------------------------------------------------------------ base models
    @property
    def default_base_name(self) -> str:
        p = Path(self.default_base)
        if p.resolve() == Path(DEFAULT_BASE).resolve():
            return f"{p.name} (embedded toy model)"
        return p.name or self.default_base

    def base_choices(self) -> dict[str, str]:
        """Base model names shown in the picker -> where each is loaded from.

        The default base (the embedded toy model or `--base`) first, then diffusers folders and
        .safetensors checkpoints found in the models folder (links leaving it are ignored).
        """
        out = {self.default_base_name: self.default_base}
        if self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.name.startswith(".") or not _inside(p, self.models_dir):
                    continue
                if p.is_dir() and (p / "model_index.json").is_file():
                    out.setdefault(p.name, str(p))
                elif p.is_file() and p.suffix.lower() == ".safetensors":
                    out.setdefault(p.name, str(p))
        return out

    def base_source(self, name: str | None) -> str:
        """Resolve a picker name; anything not in the list (a path typed by hand, `..`) is refused."""
        if not name:
            return self.default_base
        choices = self.base_choices()
        if name not in choices:
            raise UnsafeNameError(f"base model: '{name}' is not one of the available models "
                                  f"(put models in {self.models_dir})")
        return choices[name]

    def base_named(self, recorded: str | None) -> str | None:
        """The picker name of the base model that `recorded` names (an image's "Model: …", a settings file's
        `base = …`): its picker name with or without the "(embedded toy model)" note, its folder or file name
        with or without the suffix, its path as given or as shared (`~/…`); None when no such model is here."""
        if not recorded:
            return None
        from training.export import shareable_path

        for name, src in self.base_choices().items():
            if recorded in (name, name.split(" (")[0], src, shareable_path(src), Path(src).name, Path(src).stem):
                return name
        return None

    @property
    def embeddings_dir(self) -> Path:
        """Textual-inversion embeddings go here (AUTOMATIC1111's embeddings folder): each file's name is a word."""
        return self.models_dir / "embeddings"

    @property
    def styles_file(self) -> Path:
        """Saved prompt styles (AUTOMATIC1111's styles.csv, which users copy here as it is)."""
        from pipelines.styles import STYLES_FILE

        return self.home / STYLES_FILE

    @property
    def wildcards_dir(self) -> Path:
        """Wildcard files (`__name__` in a prompt: a line of name.txt), the Dynamic Prompts extension's as they are."""
        from pipelines.wildcards import WILDCARDS_FOLDER

        return self.home / WILDCARDS_FOLDER

    def wildcards(self):
        from pipelines.wildcards import Wildcards

        return Wildcards.at(self.wildcards_dir)

    def wildcard_names(self) -> list[str]:
        try:
            return self.wildcards().names()
        except ConfigError:  # a file that cannot be read: said when it is used
            return []

    def style_names(self) -> list[str]:
        from pipelines.styles import read_styles

        try:
            return list(read_styles(self.styles_file))
        except ConfigError:  # said when a style is applied; the page still opens
            return []

    def embedding_names(self) -> list[str]:
        return [p.stem for p in embedding_files(self.embeddings_dir).values()]

    def embeddings(self):
        """The embeddings folder, each file read (pipelines.embeddings.EmbeddingInfo)."""
        from pipelines.embeddings import describe_embeddings

        return describe_embeddings(self.embeddings_dir, self.allow_pickle)

    def embedding_path(self, name: str) -> Path:
        from pipelines.embeddings import find_embedding

        return find_embedding(self.embeddings_dir, name)

    def rename_embedding(self, old: str, new: str) -> Path:
        from pipelines.embeddings import rename_embedding

        return rename_embedding(self.embeddings_dir, old, new)

    def delete_embedding(self, name: str) -> list[Path]:
        from pipelines.embeddings import delete_embedding

        return delete_embedding(self.embeddings_dir, name)

    @property
    def vae_dir(self) -> Path:
        """Separate VAE files go here (AUTOMATIC1111's models/VAE)."""
        return self.models_dir / "VAE"

    def vae_choices(self) -> list[str]:
        """The VAE picker: the model's own ("Automatic"), then the files in the VAE folder."""
        return [AUTOMATIC, *vae_files(self.vae_dir)]

    def vae_source(self, name: str | None) -> Path | None:
        """The file of a VAE picked by name; None for the model's own. A name not in the folder is refused."""
        if not name or name == AUTOMATIC:
            return None
        found = vae_files(self.vae_dir).get(name)
        if found is None:
            raise UnsafeNameError(f"vae: '{name}' is not in {self.vae_dir} (put VAE files there)")
        return found

    def base_family(self, name: str | None) -> str | None:
        """The family of a base model by name: from the loaded model, else from its configs (None: unknown)."""
        name = name or self.default_base_name
        with self._models_lock:
            if name in self._loaded:
                return self._loaded[name].base.family
        try:
            src = Path(self.base_source(name))
        except UnsafeNameError:
            return None
        return folder_family(src) if src.is_dir() else None

    def model(self, name: str | None) -> Loaded:
        """The loaded base model `name` with its adapter stack, loading it on first use (one copy each)."""
        name = name or self.default_base_name
        src = self.base_source(name)
        with self._models_lock:
            hit = self._loaded.get(name)
            if hit is not None:
                return hit
            base = load_base(src, allow_pickle=self.allow_pickle, device=self.device)
            loaded = Loaded(name, base, AdapterStack(base, self.library, allow_pickle=self.allow_pickle))
            while len(self._loaded) >= self.max_loaded:  # keep memory bounded: drop the oldest
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[name] = loaded
            return loaded

    def loaded_models(self) -> list[Loaded]:
        with self._models_lock:
            return list(self._loaded.values())

    def base_for_adapter(self, name: str):
        """A loaded base model of the adapter's family (its UNet layout names SDXL modules in kohya format),
        or None; never loads one."""
        fam = self.library.info(name).family
        return next((m.base for m in self.loaded_models() if fam and m.base.family == fam), None)

    def portable_file(self, name: str) -> Path:
        """The adapter as a user takes it out of the app: the library file when it already has kohya's key
        layout (everything trained here, and LyCORIS files, which AUTOMATIC1111 and ComfyUI apply natively),
        else a kohya-layout copy in <library>/exports/."""
        if self.library.info(name).format in ("kohya", "lycoris"):
            return self.library.path_for(name)
        return self.library.export(name, "kohya", base=self.base_for_adapter(name))

    def resize_adapter(self, name: str, rank: int | None, keep: float | None = None, new_name: str | None = None):
        """A smaller copy of library adapter `name` at `rank` (and/or keeping `keep` of each layer's ‖ΔW‖²), added
        to the library as `new_name` (default NAME-rN). Returns (its AdapterInfo, the FitReport)."""
        from pipelines.resize import check_rank_keep, resize_adapter, resized_name

        check_rank_keep(rank, keep)
        src = self.library.path_for(name)
        new_name = (new_name or "").strip() or resized_name(src.stem, rank, keep)
        report = None

        def write(path: Path) -> None:
            nonlocal report
            report = resize_adapter(src, path, rank=rank, keep=keep, base=self.base_for_adapter(name), name=new_name)

        info = self.library.create(new_name, write)
        return info, report

    def extract_adapter(self, tuned: str, base: str, name: str, rank: int | None, keep: float | None = None,
                        conv_rank: int | None = None):
        """A LoRA of the difference between base models `tuned` and `base` (names from the base picker), added to
        the library as `name`. Both are loaded afresh (a model in use may have adapters fused into it).
        Returns (its AdapterInfo, the FitReport)."""
        from pipelines.resize import check_rank_keep, extract_adapter

        check_rank_keep(rank, keep)
        if not tuned or not base:
            raise ConfigError("model: pick the fine-tuned model and the base it was tuned from")
        if tuned == base:
            raise ConfigError("model: the fine-tuned model and its base are the same model")
        name = (name or "").strip()
        if not name:
            raise ConfigError("name: type a name for the extracted adapter")
        if self.library.find(name) is not None:
            raise ConfigError(f"name: an adapter called '{name}' already exists in the library")
        # on the CPU, where the SVDs run: two more full models need not sit beside the one in use on a GPU
        b = load_base(self.base_source(base), allow_pickle=self.allow_pickle, device="cpu")
        t = load_base(self.base_source(tuned), allow_pickle=self.allow_pickle, device="cpu")
        if b.family != t.family:
            raise ConfigError(f"model: '{tuned}' is {t.family}, '{base}' is {b.family}; extract from the base it "
                              "was tuned from")
        report = None

        def write(path: Path) -> None:
            nonlocal report
            report = extract_adapter(b, t, path, rank=rank, keep=keep, conv_rank=conv_rank, name=name)

        info = self.library.create(name, write)
        return info, report

    def bake_stack(self, base_name: str | None, prompt: str, entries: Sequence[StackEntry], name: str,
                   rank: int | None = None):
        """The weighted stack (rows plus the prompt's `<lora:…>` tags) as ONE adapter in the library: exact (the
        ranks add up), or at `rank` (its best approximation). Returns (its AdapterInfo, the FitReport or None)."""
        from pipelines.resize import bake_resized, check_rank_keep

        if rank is not None:
            check_rank_keep(rank, None)
        name = (name or "").strip()
        if not name:
            raise ConfigError("name: type a name for the baked adapter")
        _, tagged = parse_lora_tags(prompt or "")
        combined = list(entries) + tagged
        if not combined:
            raise ConfigError("lora: enable an adapter (or tag one in the prompt) to bake")
        stack = self.model(base_name).stack
        report = None

        def write(path: Path) -> None:
            nonlocal report
            with stack.lock:
                if rank is None:
                    stack.bake(path, entries=combined)
                else:
                    report = bake_resized(stack, path, combined, rank=rank, name=name)

        info = self.library.create(name, write)
        return info, report

    def forget_adapter(self, name: str) -> None:
        """After a rename or delete: drop the adapter from every loaded stack."""
        for m in self.loaded_models():
            if any(n.casefold() == name.casefold() for n in m.stack.loaded):
                m.stack.unload([name])

    # ------------------------------------------------------------------------------------------ datasets
    def sample_sets(self) -> list[str]:
        return [n for n in SAMPLE_SET_TRIGGERS if (SAMPLE_DATA / n).is_dir()]

    def _new_dataset(self, hint: str) -> tuple[str, Path]:
        ds_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9-]', '', hint)[:30] or 'upload'}-" \
                f"{secrets.token_hex(3)}"
        folder = self.datasets / ds_id
        folder.mkdir(parents=True)
        return ds_id, folder

    def dataset_folder(self, ds_id: str) -> Path:
        if not isinstance(ds_id, str) or not _ID.match(ds_id) or ".." in ds_id:
            raise UnsafeNameError(f"dataset: '{ds_id}' is not a dataset name")
        folder = self.datasets / ds_id
        if not folder.is_dir() or not _inside(folder, self.datasets):
            raise ConfigError("images: no training images yet; upload some or pick a sample set")
        return folder

    def stage_files(self, files: Iterable[str | Path], names: Iterable[str] | None = None) -> str:
        """Copy uploaded files (Gradio's temporary copies) into a new dataset folder; returns its name.

        `names` are the browser's original file names; only their last component is kept.
        """
        files = [Path(f) for f in files]
        names = list(names) if names is not None else [f.name for f in files]
        if not files:
            raise ConfigError("images: no files uploaded")
        ds_id, folder = self._new_dataset("upload")
        try:
            for src, name in zip(files, names):
                if Path(str(name)).suffix.lower() == ".zip":
                    self._unzip(src, safe_file_name(name), folder)
                else:
                    shutil.copyfile(src, _free_path(folder / safe_file_name(name)))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return ds_id

    @staticmethod
    def _unzip(src: Path, name: str, folder: Path) -> None:
        """A dataset .zip (e.g. kohya_ss' layout: 10_ohwx woman/*.png) unpacked into `folder`, its folders kept."""
        import zipfile

        try:
            zf = zipfile.ZipFile(src)
        except (zipfile.BadZipFile, OSError) as e:
            raise ConfigError(f"images: {name} is not a readable .zip ({e})") from None
        with zf:
            if len(zf.filelist) > 4 * MAX_ZIP_FILES:
                raise ConfigError(f"images: {name} holds {len(zf.filelist)} entries; at most {MAX_ZIP_FILES} files "
                                  "are unpacked")
            for info, parts in _zip_members(zf, name):
                dst = _free_path(folder.joinpath(*parts))
                if not _inside(dst, folder):
                    raise UnsafeNameError(f"images: {name} has a file outside its folder ({info.filename})")
                try:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as r, open(dst, "wb") as w:
                        shutil.copyfileobj(r, w)
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as e:
                    # RuntimeError: an encrypted member; NotImplementedError: a compression Python lacks (Deflate64)
                    raise ConfigError(f"images: {name}: {info.filename} cannot be unpacked ({e}); zip the folder "
                                      "again without a password, with ordinary (deflate) compression") from None

    def stage_sample_set(self, name: str) -> str:
        if name not in self.sample_sets():
            raise UnsafeNameError(f"sample set: '{name}' is not one of {', '.join(self.sample_sets())}")
        ds_id, folder = self._new_dataset(name)
        for p in sorted((SAMPLE_DATA / name).iterdir()):
            if p.is_file() and p.suffix.lower() != ".md":
                shutil.copyfile(p, folder / p.name)
        return ds_id

    def discard_dataset(self, ds_id: str | None) -> None:
        """Remove a staged folder the user replaced, unless a training job uses it (runs keep their images)."""
        if not ds_id:
            return
        try:
            folder = self.dataset_folder(ds_id)
        except (UnsafeNameError, ConfigError):
            return
        if any(Path(j.config.images).resolve() == folder.resolve() for j in self.queue.jobs()):
            return
        shutil.rmtree(folder, ignore_errors=True)

    def scan(self, ds_id: str, trigger: str, preset: str = "custom") -> ScanResult:
        template = PRESETS.get(preset, {}).get("instance_template", TrainConfig.instance_template)
        return scan_folder(self.dataset_folder(ds_id), trigger or "sks", template)

    def save_captions(self, ds_id: str, rows: Sequence[tuple[str, str]]) -> None:
        """Write the captions shown in the UI next to their images (file names only, inside the dataset)."""
        folder = self.dataset_folder(ds_id)
        for name, caption in rows:
            if not name:
                continue
            parts = str(name).split("/")  # a file in a folder of the dataset (kohya's 10_ohwx woman/1.png)
            if any(safe_file_name(p) != p or p.startswith(".") for p in parts):
                raise UnsafeNameError(f"caption: '{name}' is not a file name of this dataset")
            img = folder.joinpath(*parts)
            if not img.is_file() or not _inside(img, folder):
                raise UnsafeNameError(f"caption: no image '{name}' in this dataset")
            txt = img.with_suffix(".txt")
            tmp = txt.with_name(f".{txt.name}.tmp")
            tmp.write_text(str(caption or "").strip() + "\n", encoding="utf-8")
            tmp.replace(txt)

    # ------------------------------------------------------------------------------------------ training
    def check_new_adapter_name(self, name: str) -> str:
        name = check_name(name)
        if any(n.casefold() == name.casefold() for n in self.library.names()):
            raise ConfigError(f"name: an adapter called '{name}' is already in the library; pick another name "
                              "or delete it in the Library tab")
        for job in self.queue.jobs():
            if job.active and job.config.name.casefold() == name.casefold():
                raise ConfigError(f"name: a training called '{name}' is already queued or running")
        return name

    def submit(self, cfg: TrainConfig, num_processes: int | None = None) -> Job:
        """Queue a training; it runs as its own process (`lora-studio train --config ...`) when its turn comes."""
        return self.queue.submit(cfg, num_processes=num_processes)

    def _run_config(self, name: str) -> tuple[TrainConfig, int | None] | None:
        """The options a run of `name` in this library was trained with, and its process count: from its latest
        job, else the run folder's job.toml / launch.toml, else the adapter's library .toml (when its image
        folder is still there)."""
        root = self.library.root.resolve()
        for job in reversed(self.queue.jobs()):
            if job.config.name.casefold() == name.casefold() and job.config.library_dir.resolve() == root:
                return job.config, job.num_processes
        run = self.library.root / "runs" / name
        for f in (run / "job.toml", run / "launch.toml", self.library.root / f"{name}.toml"):
            if f.is_file() and _inside(f, self.library.root):
                try:
                    cfg = TrainConfig.from_toml(f)
                except ConfigError:
                    continue
                if Path(cfg.images).expanduser().is_dir():
                    return cfg.replace(output_dir=str(self.library.root)), None
        return None

    def run_state(self, name: str) -> "RunState":
        """Is `name` in use (a finished adapter, or a queued/training job), and can its run be resumed?"""
        from training.export import list_checkpoints

        name = check_name(name)
        job = self.queue.active_with_name(name)
        in_library = self.library.find(name) is not None or self.finished_embedding(name) is not None
        runs = self.library.root / "runs"
        cks = list_checkpoints(runs / name) if _inside(runs / name, self.library.root) else []
        ck = cks[-1] if cks else None
        known = self._run_config(name) if ck is not None and not in_library and job is None else None
        return RunState(name, in_library, job, ck, int(ck.name.split("-")[1]) if ck else 0,
                        known[0].max_steps if known else None, known is not None)

    def finished_embedding(self, name: str) -> Path | None:
        """The embeddings-folder file that the finished textual-inversion run `name` of this library wrote."""
        import tomllib

        path = embedding_files(self.embeddings_dir).get(name.lower())
        conf = self.library.root / "runs" / name / "config.toml"
        if path is None or not conf.is_file() or not _inside(conf, self.library.root):
            return None
        try:
            return path if tomllib.loads(conf.read_text(encoding="utf-8")).get("textual_inversion") else None
        except (OSError, ValueError):
            return None

    def resume(self, name: str) -> Job:
        """Queue the stopped or interrupted run `name` to continue from its latest checkpoint: it ends with the
        weights an uninterrupted run would have had."""
        st = self.run_state(name)
        if st.job is not None:
            raise ConfigError(f"resume: '{st.name}' is already {st.job.state} (job {st.job.id})")
        if st.in_library:
            raise ConfigError(f"resume: '{st.name}' already finished; train more steps from it instead")
        if st.checkpoint is None:
            raise ConfigError(f"resume: the run '{st.name}' has no checkpoint to continue from")
        known = self._run_config(st.name)
        if known is None:
            raise ConfigError(f"resume: the options of run '{st.name}' are unknown (no job of it and no job.toml "
                              "in its run folder), or its image folder is gone")
        cfg, nproc = known
        return self.queue.submit(cfg.replace(resume="latest"), num_processes=nproc, kind="resume")

    def start_over(self, name: str) -> None:
        """Before a run that overwrites `name` from step 1: remove its old run folder (checkpoints, samples, log),
        so the new run neither sits beside the old checkpoints nor is pruned in their favour. Refused while a job
        of that name is queued or training."""
        name = check_name(name)
        job = self.queue.active_with_name(name)
        if job is not None:
            raise ConfigError(f"name: '{job.name}' is {job.state} (job {job.id}); stop it first")
        runs = self.library.root / "runs"
        if not runs.is_dir():
            return
        for p in runs.iterdir():
            if p.name.casefold() != name.casefold():
                continue
            if p.is_symlink() or not p.is_dir():
                p.unlink()  # the link itself, never what it points to
            elif _inside(p, runs):
                shutil.rmtree(p)

    def train_more(self, name: str, steps: int, new_name: str | None = None, config: TrainConfig | None = None,
                   overwrite: bool = False) -> Job:
        """Queue a new run that starts from the finished adapter `name` and trains `steps` more steps, under
        `new_name` (default: a free '<name>-more'). Its options are the adapter's own run's unless `config`
        gives others (the images, for an imported adapter). A name in use is refused unless `overwrite`."""
        src = self.finished_embedding(name) or self.library.path_for(name)
        steps = int(steps)
        if steps < 1:
            raise ConfigError(f"steps: train at least 1 more step, got {steps}")
        if config is None:
            known = self._run_config(src.stem)
            if known is None:
                raise ConfigError(f"train more: the options '{src.stem}' was trained with are unknown, or its "
                                  "image folder is gone; give a config with the images to train on")
            config = known[0]
        if new_name is None:
            new_name, k = f"{src.stem}-more", 2
            while self.library.find(new_name) or self.queue.active_with_name(new_name) \
                    or (self.library.root / "runs" / new_name).exists() \
                    or embedding_files(self.embeddings_dir).get(new_name.lower()):
                new_name, k = f"{src.stem}-more-{k}", k + 1
        elif not overwrite:
            new_name = self.check_new_adapter_name(new_name)
        cfg = config.replace(name=check_name(new_name), init_adapter=str(src), max_steps=steps, resume=None,
                             overwrite=overwrite, output_dir=str(self.library.root),
                             embeddings_dir=str(self.embeddings_dir))
        return self.queue.submit(cfg, kind="more")

    def job(self, job_id: int | None) -> Job | None:
        if job_id is None:
            return None
        try:
            return self.queue.get(int(job_id))
        except (TypeError, ValueError):
            return None

    # ------------------------------------------------------------------------------------------ generation
    def _out_paths(self, n: int, stem: str | Sequence[str] = "") -> list[Path]:
        """n new numbered PNG paths in today's folder; `stem` is what follows the number (one for all, or one
        each: the image's own seed, as AUTOMATIC1111 names files)."""
        day = self.outputs / time.strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        stems = [stem] * n if isinstance(stem, str) else list(stem)
        with self._out_lock:
            nums = [int(m.group(1)) for p in day.glob("*.png") if (m := re.match(r"(\d{5})", p.name))]
            start = max(nums, default=-1) + 1
            paths = [day / f"{start + i:05d}{stems[i]}.png" for i in range(n)]
            for p in paths:  # reserve the names before the slow part
                p.touch()
        return paths

    def generate(self, base_name: str | None, req: GenerationRequest, entries: Sequence[StackEntry] = (),
                 fuse: bool = False, vae: str | None = None, combinatorial: bool = False,
                 fixed_seed: bool = False) -> GenerateResult:
        """Generate with the given stack (plus `<lora:...>` tags in the prompt); save PNGs with parameters.
        Choices and wildcards in the prompts are drawn for each image (pipelines.wildcards).

        The stack's lock is held from choosing the adapters to the last denoising step, so two requests
        with different stacks never see each other's weights.
        """
        from pipelines.wildcards import plan, run

        m = self.model(base_name)
        stack = m.stack
        drawn = plan(req, self.wildcards(), combinatorial=combinatorial, fixed_seed=fixed_seed)
        warnings: list[str] = []
        skips: list[str] = []
        ranges: list[str] = []
        applied: tuple = ()

        left: list[GenerationRequest] = []  # requests an Interrupt came before
        ran: list[GenerationRequest] = []

        def one(r: GenerationRequest) -> list[GeneratedImage]:
            nonlocal applied
            if self._interrupt.is_set() and ran:  # (the first request always runs: there is a picture to show)
                left.append(r)
                return []
            ran.append(r)
            _, tagged = parse_lora_tags(r.prompt)
            combined = list(entries) + tagged
            stack.set_stack(combined)
            if fuse and any(e.scheduled(r.steps) for e in stack.stack):
                raise ConfigError("fuse: an adapter with a step range (start=/stop=) switches on and off during "
                                  "sampling, which merged weights cannot; untick Fuse or clear its steps")
            if fuse and combined:
                stack.fuse()
            elif stack.fused:
                stack.unfuse()
            images = stack.generate(r, entries, interrupt=self._interrupt.is_set)
            for got, new in ((warnings, stack.interference().warnings if len(combined) >= 2 else []),
                             (skips, clip_skip_warnings(stack, r.clip_skip)),
                             (ranges, range_warnings(stack.stack, r.steps))):
                got += [w for w in new if w not in got]
            applied = stack.stack
            return images

        with stack.lock:
            self._interrupt.clear()  # once this Generate holds the model: an Interrupt before it was another's
            use_vae(m.base, self.vae_source(vae), self.allow_pickle)
            emb = use_embeddings(m.base, self.embeddings_dir, drawn.prompts, self.allow_pickle)
            images = run(drawn, one)
        paths = self._out_paths(len(images), [f"-{img.seed}" for img in images])
        for img, p in zip(images, paths):
            save_png(img, p)
        cut = next((img for img in images if img.interrupted is not None), None)
        said = None
        if cut is not None:
            from pipelines.generation import steps_of

            said = (f"interrupted after {cut.interrupted} of {steps_of(req)} sampler steps: the images are as far as "
                    "they got")
            if left:
                said += f"; {sum(r.num_images for r in left)} more were not started"
        notes = [*drawn.notes, *([m.base.schedule_note] if m.base.schedule_note else [])]  # a v-pred file, and why
        return GenerateResult(images, paths, warnings, applied, ranges, skips, emb, notes, said)

    def interrupt_generation(self) -> None:
        """AUTOMATIC1111's Interrupt: the running generation stops after its current sampler step and keeps its
        images as far as they got (no Hires pass); requests of the same Generate not yet started are left out."""
        self._interrupt.set()

    @staticmethod
    def _compare_rows(rows: str, values: Sequence, req: GenerationRequest, mode: str,
                      what: str = "rows") -> tuple[list, str]:
        """The grid's second axis (or with `what` 'z' its third): its values and its name (none for 'none')."""
        from pipelines.grid import settings_axis, weight_rows

        if rows in (None, "", "none"):
            return [], ""
        if rows == "weights":
            if mode == "weights":
                raise ConfigError(f"{what}: the columns vary the adapter's weight already; choose checkpoints, start "
                                  "steps or adapters across")
            return weight_rows(values), "weight"
        if axis := settings_axis(rows, values, req):
            return axis
        raise ConfigError(f"{what}: unknown {'second' if what == 'rows' else 'third'} axis '{rows}'")

    def runs(self) -> list[str]:
        """Training runs that have checkpoints (for comparing checkpoints)."""
        d = self.library.root / "runs"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "checkpoints").is_dir() and _inside(p, d))

    def compare(self, base_name: str | None, req: GenerationRequest, mode: str, *, adapter: str | None = None,
                weights: Sequence[float] = (), run: str | None = None, others: Sequence[StackEntry] = (),
                starts: Sequence[int] = (), vae: str | None = None, settings: Sequence = (), rows: str = "none",
                row_values: Sequence = (), z: str = "none", z_values: Sequence = ()) -> Path:
        """A labelled grid PNG: one prompt and seed across one adapter's `weights` (mode 'weights'), the
        sampler step it acts from (`starts`, mode 'starts'), the checkpoints of training `run`
        ('checkpoints'), the adapters in `others` one at a time ('adapters'), or a request setting across
        `settings` with `others` in every tile ('guidance', 'steps' or 'scheduler': A1111's X/Y plot axes), or
        words of the prompt swapped (`settings` the words, 'prompt_sr': A1111's Prompt S/R). `rows` adds a second
        axis over `row_values`: 'weights' (of the adapter each column compares), a setting or 'prompt_sr'."""
        from pipelines.grid import (GridColumn, checkpoint_columns, grid_prompts, make_grid, range_words,
                                    settings_axis, start_columns, weight_columns)

        from pipelines.generation import with_pairs
        from pipelines.wildcards import draw_once

        req, templates = draw_once(req, self.wildcards())  # one prompt for every tile
        m = self.model(base_name)
        with m.stack.lock:  # the whole grid on one consistent model; other requests wait
            self._interrupt.clear()  # once this grid holds the model: an Interrupt before it was another's
            use_vae(m.base, self.vae_source(vae), self.allow_pickle)
            if mode == "weights":
                if not adapter:
                    raise ConfigError("adapter: pick the adapter whose weight varies across the grid")
                adapter = check_name(adapter)
                cols = weight_columns(adapter, weights, others)
                axis = f"{adapter} weight{range_words(cols[0].entries[-1])}"
            elif mode == "starts":
                if not adapter:
                    raise ConfigError("adapter: pick the adapter whose start step varies across the grid")
                adapter = check_name(adapter)
                cols, axis = start_columns(adapter, starts, others), f"{adapter} acting"
            elif mode == "checkpoints":
                if not run:
                    raise ConfigError("run: pick a training run to compare its checkpoints")
                cols, axis = checkpoint_columns(m.stack, check_name(run), others=others), f"{run} checkpoint"
            elif mode == "adapters":
                if not others:
                    raise ConfigError("adapters: enable at least one adapter to compare")
                cols, axis = [GridColumn(f"{e.name} {e.weight:g}", (e,)) for e in others], "LoRA"
            elif axis_of := settings_axis(mode, settings, req, others):
                cols, axis = axis_of
            else:
                raise ConfigError(f"mode: unknown comparison '{mode}'")
            row_cols, row_axis = self._compare_rows(rows, row_values, req, mode)
            z_cols, z_axis = self._compare_rows(z, z_values, req, mode, "z")
            # every column's prompts: a word Prompt S/R swaps in may name an embedding
            use_embeddings(m.base, self.embeddings_dir, grid_prompts(req, [*cols, *row_cols, *z_cols]),
                           self.allow_pickle)
            if m.stack.fused:
                m.stack.unfuse()
            result = make_grid(m.stack, req, cols, axis=axis, rows=row_cols, row_axis=row_axis,
                               interrupt=self._interrupt.is_set, zs=z_cols, z_axis=z_axis)
        path = self._out_paths(1, "-grid")[0]
        save_png(result.image, path, with_pairs(result.parameters, templates))
        return path


def entries_from_rows(rows: Iterable[tuple]) -> list[StackEntry]:
    """UI adapter rows (name, enabled, weight, separate_te, te_weight, ranged, start_step, stop_step) ->
    stack entries. A stop step of 0 or blank: to the last step."""
    out = []
    for name, enabled, weight, sep_te, te_weight, ranged, start, stop in rows:
        if not enabled or not name:
            continue
        start = 0 if not ranged or start in (None, "") else start
        stop = None if not ranged or stop in (None, "", 0) else stop
        out.append(StackEntry(check_name(name), float(weight), float(te_weight) if sep_te else None, start, stop))
    return out


__all__ = ["Studio", "job_queue", "entries_from_rows", "safe_file_name", "GenerateResult", "RunState"]
