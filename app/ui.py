"""The browser app: Train, Generate and Library tabs (Gradio). Widgets and event wiring only.

Each handler builds a config or request, calls one function of `training/`, `pipelines/` or the app's
`Studio` (app/studio.py), and turns a domain error into a readable `gr.Error`, never a traceback.
The browser only ever sends names (adapter, base model, sample set, image file); `Studio` resolves them.

    lora-studio                       # http://127.0.0.1:7860 on the embedded toy model
    lora-studio ui --base /path/to/sd15 --port 7861
    lora-studio ui --share --auth user:password
"""

from __future__ import annotations

import functools
import html
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
import pandas as pd
from PIL import Image, ImageChops

from pipelines.adapters import adapter_facts
from pipelines.errors import ConfigError, LoraStudioError, UnsafeNameError
from pipelines.generation import (HIRES_UPSCALERS, SCHEDULERS, GenerationRequest, parse_parameters,
                                  read_png_parameters)
from pipelines.recall import for_family, read_parameters, recall
from pipelines.vae import AUTOMATIC
from pipelines.library import with_user_metadata
from pipelines.grid import split_values
from pipelines.stack import WEIGHT_MAX, WEIGHT_MIN
from training.config import (GROUPS, PRESET_KEYS, PRESETS, Option, TrainConfig, preset_family,
                             preset_values, train_options)
from training.dataset import check_masks, edit_captions, kohya_trigger, tag_counts
from training.jobs import Job
from training.optimizers import ADAPTIVE, ADAPTIVE_MIN_LR
from training.trainer import CHECKING

from .options import check_launch_options, parse_auth
from .studio import SAMPLE_SET_TRIGGERS, Studio, entries_from_rows, safe_file_name

log = logging.getLogger("lora_studio.ui")

# per file (an SDXL LoRA is up to ~900 MB, a zipped dataset as big); Gradio refuses bigger uploads (HTTP 413)
# and removes the partial file
MAX_UPLOAD = "1gb"
SLOTS = 4  # adapter rows on the Generate tab
SLIDER_MIN, SLIDER_MAX = -2.0, 2.0  # a row's weight sliders; a tag in the prompt takes WEIGHT_MIN..WEIGHT_MAX
START_LABEL = "acts from step (0 = first)"
SLOT_FIELDS = 8  # per row: name, on, weight, TE?, TE weight, steps?, from step, to step
# the Generate form's fields as `generate` takes them after the base model (then Fuse, the adapter rows; the
# Generate button also sends the dynamic-prompt boxes and the variation seed, see generate_event)
GENERATE_FORM = ("prompt", "negative", "steps", "guidance", "seed", "width", "height", "num_images", "scheduler",
                 "clip_skip", "hires_scale", "hires_steps", "hires_upscaler", "hires_denoise", "init_image",
                 "init_strength", "mask_blur", "vae")
POLL_S = 1.0  # training progress refresh
NO_SAMPLE_SET = "(upload your own images)"
# the Advanced section: every TrainConfig field the user sets that is not on the tab's own form ("main")
ADVANCED = tuple(o for o in train_options() if o.ui and not o.on_main_form)
# what a preset sets (rank, steps, learning rates, targets, caption template…): a preset change updates them all
PRESET_FIELDS = tuple(o.name for o in ADVANCED if o.name in PRESET_KEYS)
FORM_EXTRAS = ("captions", "last_trigger", "prior")  # form values that are no TrainConfig field
# what loading saved settings fills in: the adapter's own fields and every Advanced option (not the images)
SETTINGS_FIELDS = ("name", "trigger", "preset", "base", "prior", *(o.name for o in ADVANCED))
UNSET = "(unset)"  # a dropdown's choice for an optional field left unset
UNSET_CHOICES = {"quantize_base": "none (full precision)"}
OPEN_GROUPS = ("LoRA", "Optimisation")  # open when Advanced is opened; the others one click away
CAPTION_COLUMNS = ["image", "caption"]
MIN_IMAGES, MAX_IMAGES = 4, 30  # what the Train tab asks for
LIBRARY_COLUMNS = ["name", "trigger", "base", "rank", "size", "date", "format"]
EMBEDDING_COLUMNS = ["word", "vectors", "family", "size", "TI hash", "beside it"]
COMPARE_MODES = {"adapter weights": "weights", "adapter start step": "starts", "checkpoints of a run": "checkpoints",
                 "enabled adapters, one at a time": "adapters", "CFG scales": "guidance", "step counts": "steps",
                 "samplers": "scheduler", "prompt words (Prompt S/R)": "prompt_sr"}
# the comparison's second axis (rows): label -> kind ("weights": the weight of the adapter each column compares)
COMPARE_ROWS = {"none": "none", "weights of the compared adapter": "weights", "CFG scales": "guidance",
                "step counts": "steps", "samplers": "scheduler", "prompt words (Prompt S/R)": "prompt_sr"}
# the values box of the comparison, per mode: (label, default)
COMPARE_VALUES = {"weights": ("Weights", "0, 0.4, 0.8, 1.2"),
                  "starts": ("Start steps (0 = every step)", "0, 5, 10, 15"),
                  "guidance": ("CFG scales", "3, 5, 7, 9"), "steps": ("Step counts", "10, 20, 30"),
                  "scheduler": ("Samplers", "Euler a, DPM++ 2M Karras, DDIM"),
                  "prompt_sr": ("Words: the first is in the prompt, each column swaps it for one", "red, blue, green")}

CSS = """
.ls-progress {height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; margin: 4px 0 6px}
.ls-bar {height: 100%; background: var(--color-accent); transition: width .4s}
.ls-status {font-size: 0.95em}
.ls-warn {color: #b45309}
.ls-badge {display: inline-block; padding: 0 8px; border-radius: 9px; font-size: .85em; font-weight: 600; color: white}
.ls-queued {background: #64748b} .ls-running {background: #2563eb} .ls-done {background: #16a34a}
.ls-stopped {background: #a16207} .ls-failed {background: #dc2626} .ls-interrupted {background: #7c3aed}
.ls-queue-line {margin-top: 4px}
/* A1111's token counter: "12/75" at the right under a prompt box */
.ls-tokens {text-align: right; font-size: .8em; opacity: .75; min-height: 0 !important;
             padding: 0 10px 2px 0 !important; overflow: visible !important}
.ls-tokens p {margin: 0 !important; line-height: 1.5 !important}
/* Advanced: in a row of fields, each box sits at the bottom of its cell, whatever the length of the help above */
.ls-fields .form {align-items: stretch}
.ls-fields .form > .block {display: flex; flex-direction: column}
.ls-fields .form > .block > .container {display: flex; flex-direction: column; flex: 1 1 auto}
.ls-fields .form > .block > .container > input, .ls-fields .form > .block > .container > .wrap,
.ls-fields .form > .block > .container > .input-container {margin-top: auto}
/* galleries: the floating label above the first row of pictures, not over it; as many columns as fit */
#gen-gallery .grid-container, #train-samples .grid-container, #train-thumbs .grid-container,
#lib-cards .grid-container {padding-top: 40px}
#train-samples .grid-container, #train-thumbs .grid-container, #lib-cards .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(88px, 1fr)) !important}
#ls-header h1 {margin-bottom: 0}
/* galleries: the label under the picture, never over it; small (64 px) pictures enlarged without blur */
#gen-gallery .thumbnail-item, #train-samples .thumbnail-item, #train-thumbs .thumbnail-item,
#lib-cards .thumbnail-item {display: flex; flex-direction: column; align-items: stretch; height: auto}
#gen-gallery .thumbnail-item img, #train-samples .thumbnail-item img, #train-thumbs .thumbnail-item img,
#lib-cards .thumbnail-item img {flex: 1 1 auto; min-height: 0}
#gen-gallery .caption-label, #train-samples .caption-label, #train-thumbs .caption-label,
#lib-cards .caption-label {position: static; transform: none; max-width: 100%; margin: 2px 0 0; padding: 0 2px;
  background: none; border: none; box-shadow: none; white-space: normal; overflow-wrap: anywhere;
  text-align: center; font-size: .8em; line-height: 1.2}
#gen-gallery img, #train-samples img, #train-thumbs img, #lib-cards img, #cmp-image img {image-rendering: pixelated}
/* a result fits its box whole (a square picture is never cut at top and bottom); the comparison grid sits
   below its label and buttons */
#gen-gallery .thumbnail-item img {max-height: 290px; object-fit: contain !important}
#cmp-image img {padding-top: 40px; object-fit: contain}
/* trigger words are buttons that insert the word, not a choice of one: no radio circle, a "+" chip */
#gen-triggers input[type=radio] {display: none}
#gen-triggers label {border-radius: 999px; cursor: pointer}
#gen-triggers label::before {content: "+"; font-weight: 700; margin-right: 4px}
/* tables: headers break between words only */
#lib-table th, #lib-table th * , #train-captions th, #train-captions th * {word-break: keep-all;
  overflow-wrap: normal; hyphens: none}
#lib-details {overflow-wrap: anywhere}  /* a model card's long module list wraps instead of running off */
.ls-error {color: #991b1b; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px; padding: 6px 10px;
           margin: 4px 0}
"""


# ------------------------------------------------------------------------------------------------ errors
def error_html(message: str) -> str:
    """An error that stays on the page (a toast vanishes; a bare red 'Error' over the panes says nothing)."""
    return (f"<div class='ls-error' role='alert'><span class='ls-badge ls-failed'>error</span> "
            f"{html.escape(message)}</div>")


def ui_errors(fn: Callable) -> Callable:
    """Domain errors become a readable message in the browser; anything else too, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (LoraStudioError, FileNotFoundError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - a bug: log it on the server, show one line in the browser
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected error ({type(e).__name__}): {e}", print_exception=False) from None

    return wrapper


def shown_in(fn: Callable, outputs: Sequence[Any], message: Any) -> Callable:
    """Wire a handler so that its error stays on the page: the message goes into the `message` output, every
    other output keeps what it showed (nothing the user had is cleared, no bare red 'Error' over the panes),
    and a toast says it too. The handler itself still raises gr.Error (its Python API is unchanged)."""
    at = next(i for i, o in enumerate(outputs) if o is message)
    n = len(outputs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            msg = str(getattr(e, "message", e))
        gr.Warning(msg)
        out: list[Any] = [gr.skip()] * n
        out[at] = error_html(msg)
        return tuple(out)

    return wrapper


def _file_named(err: Exception, *paths: Path) -> ConfigError:
    """`err` with each path in it replaced by the file's name: an upload's server-side folder is nobody's
    business in the browser."""
    text = str(err)
    for p in paths:
        text = text.replace(str(p), p.name)
    return ConfigError(text)


def _on_slider(e) -> bool:
    """Whether a row's sliders can show this entry's weights."""
    return all(SLIDER_MIN <= w <= SLIDER_MAX for w in (e.weight, e.te_weight) if w is not None)


def by_name(fn: Callable, widgets: dict[str, Any]) -> Callable:
    """fn(form) wired with a set of components as its input: Gradio passes {component: value}; fn gets
    {field name: value} (one dict, not a long argument list)."""

    @functools.wraps(fn)
    def wrapper(values: dict):
        return fn({k: values[c] for k, c in widgets.items()})

    return wrapper


# ------------------------------------------------------------------------------------------------ small helpers
def _df(rows: Sequence[Sequence[Any]], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([list(r) for r in rows], columns=columns)


def _loss_df(losses: Sequence[tuple[int, float]]) -> pd.DataFrame:
    """(step, loss) pairs as numeric columns, also when empty (an untyped empty frame plots as categories)."""
    return pd.DataFrame({"step": pd.Series([int(s) for s, _ in losses], dtype="int64"),
                         "loss": pd.Series([float(v) for _, v in losses], dtype="float64")})


def _rows(df: Any) -> list[list[Any]]:
    if df is None:
        return []
    if isinstance(df, pd.DataFrame):
        return [list(r) for r in df.itertuples(index=False, name=None)]
    if isinstance(df, dict) and "data" in df:
        return [list(r) for r in df["data"]]
    return [list(r) for r in df]


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s")


def _replace_trigger(caption: str, old: str, new: str) -> str:
    """Swap the trigger word in one caption (whole words only); add it in front when it is missing."""
    caption = str(caption or "").strip()
    if old and old != new:
        caption = re.sub(rf"(?<![\w]){re.escape(old)}(?![\w])", new, caption)
    if new and not re.search(rf"(?<![\w]){re.escape(new)}(?![\w])", caption):
        caption = f"{new}, {caption}" if caption else new
    return caption


def _num(v: Any, what: str, cast=float):
    """A number widget's value as the field's type (Gradio gives floats, or None when emptied)."""
    try:
        return cast(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"{what}: '{v}' is not a number") from None


def _values(text: str, what: str, cast=float) -> list:
    """A comparison's values box ('0, 0.5, 1'; commas, spaces or semicolons) as numbers of `cast`."""
    return [_num(v, what, cast) for v in re.split(r"[,\s;]+", str(text or "").strip()) if v]


def _starts(text: str, steps: int) -> list[int]:
    out = _values(text, "start steps", int)
    for n in out:
        if not 0 <= n < steps:
            raise ConfigError(f"start steps: {n} is outside 0..{steps - 1} (the sampler runs {steps} steps)")
    if not out:
        raise ConfigError("start steps: give at least one step, e.g. 0, 5, 10")
    return out


def _settings(text: str, kind: str) -> list:
    """The values box of a settings grid: CFG scales, step counts (numbers) or sampler names."""
    what = COMPARE_VALUES[kind][0].lower() if kind != "prompt_sr" else "prompt S/R words"
    out = (split_values(text) if kind == "prompt_sr" else [t.strip() for t in (text or "").split(",") if t.strip()]
           if kind == "scheduler" else _values(text, what, int if kind == "steps" else float))
    if not out:
        raise ConfigError(f"{what}: give at least one, e.g. {COMPARE_VALUES[kind][1]}")
    if len(out) > 8:
        raise ConfigError(f"{what}: at most 8 columns")
    return out


def _weights(text: str) -> list[float]:
    out = _values(text, "weights")
    for w in out:
        if not WEIGHT_MIN <= w <= WEIGHT_MAX:
            raise ConfigError(f"weights: {w:g} is outside {WEIGHT_MIN:g}..{WEIGHT_MAX:g}")
    if not out:
        raise ConfigError("weights: give at least one weight, e.g. 0, 0.5, 1")
    if len(out) > 8:
        raise ConfigError("weights: at most 8 columns")
    return out


# ------------------------------------------------------------------------------------------------ options <-> widgets
def elem_id(o: Option) -> str:
    return "adv-" + o.name.replace("_", "-")


def unset_label(o: Option) -> str:
    return UNSET_CHOICES.get(o.name, UNSET)


def _n(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:g}"


def _range_text(o: Option) -> str:
    lo = f"≥ {_n(o.min)}" if o.min is not None else (f"> {_n(o.gt)}" if o.gt is not None else "")
    hi = f"≤ {_n(o.max)}" if o.max is not None else (f"< {_n(o.below)}" if o.below is not None else "")
    if o.min is not None and o.max is not None:
        return f"{_n(o.min)}–{_n(o.max)}"
    return ", ".join(t for t in (lo, hi) if t)


def zero_is_unset(o: Option) -> bool:
    """An optional number whose range excludes 0 (alpha, conv rank, resolution): 0 means unset. Gradio's number
    box shows an unset value as 0 and sends 0 until it is cleared, so 0 has to mean what the empty box means."""
    if not o.optional or o.kind not in (int, float):
        return False
    return (o.min is not None and o.min > 0) or (o.gt is not None and o.gt >= 0)


def widget_value(o: Option, v: Any) -> Any:
    """A field's value as its widget shows it (lists as text, an unset choice as its label, unset numbers 0 or
    empty)."""
    if o.kind is list:
        return ("\n" if o.list_style == "lines" else ", ").join(v or [])
    if v is None:
        if o.choices is not None:
            return unset_label(o)
        if o.kind in (int, float):
            return 0 if zero_is_unset(o) else None
        return ""
    return v


def field_value(o: Option, v: Any) -> Any:
    """A widget's value as the field's type: an empty optional field is unset (None); TrainConfig checks the rest
    (range, choices) and names the field."""
    if o.kind is bool:
        return bool(v)
    if o.kind is list:
        text = str(v or "")
        parts = text.splitlines() if o.list_style == "lines" else re.split(r"[,\s]+", text)
        return [p.strip() for p in parts if p.strip()]
    if o.choices is not None:
        return None if o.optional and v in (None, "", unset_label(o)) else v
    if o.kind in (int, float):
        if v is None or (isinstance(v, str) and not v.strip()) or (v == 0 and zero_is_unset(o)):
            if o.optional:
                return None
            raise ConfigError(f"{o.name}: enter a number ({o.label})")
        if o.kind is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        x = _num(v, o.name)
        if o.kind is int:
            if not x.is_integer():
                raise ConfigError(f"{o.name}: must be a whole number, got {v}")
            return int(x)
        return x
    text = "" if v is None else str(v)
    return (text.strip() or None) if o.optional else text


def _no_bounds_check(*_: Any) -> None:
    """Gradio refuses a number outside minimum/maximum before the handler runs, with a message that names no
    field and does not stay on the page; TrainConfig checks the range instead and names the field."""


def option_widget(o: Option, value: Any) -> gr.components.Component:
    """The widget of one TrainConfig field, from its description (kind, choices, range, list style, help)."""
    rng = _range_text(o)
    if zero_is_unset(o):
        rng = f"{rng}; 0: unset" if rng else "0: unset"
    info = o.help + (f" ({rng})" if rng and o.kind in (int, float) else "")
    common = dict(label=o.label, info=info, elem_id=elem_id(o))
    value = widget_value(o, value)
    if o.kind is bool:
        return gr.Checkbox(bool(value), min_width=240, **common)
    if o.choices is not None:
        choices = ([unset_label(o)] if o.optional else []) + list(o.choices)
        wide = max(len(str(c)) for c in choices)  # the longest choice fits beside the arrow
        return gr.Dropdown(choices, value=value, min_width=max(200, 9 * wide + 70), **common)
    if o.kind in (int, float):
        lo = o.min if o.min is not None else o.gt
        hi = o.max if o.max is not None else o.below
        num = gr.Number(value, precision=0 if o.kind is int else None, minimum=lo, maximum=hi,
                        step=o.step or (1 if o.kind is int else 0.1), min_width=200,
                        placeholder="unset" if o.optional else None, **common)
        num.raise_if_out_of_bounds = _no_bounds_check  # the range is checked (field named) by TrainConfig
        return num
    if o.kind is list:
        lines = o.list_style == "lines"
        label = o.label + (" (one per line)" if lines else " (comma-separated)")
        return gr.Textbox(value, lines=3 if lines else 1, max_lines=12 if lines else 2,
                          **{**common, "label": label})
    return gr.Textbox(value, placeholder="unset" if o.optional else None, **common)


def preset_value(preset: str, o: Option, family: str = "toy") -> Any:
    """The value a preset gives a field for a base of this family (its own, else the field's form default)."""
    vals = preset_values(preset, family)
    return vals[o.name] if o.name in vals else o.ui_default


@functools.cache
def _options() -> dict[str, Option]:
    return {o.name: o for o in train_options()}


# Download in one click: once the files are listed, the browser is handed the adapter's (the first) link
DOWNLOAD_FIRST_FILE = """() => { setTimeout(() => {
  const a = document.querySelector('#lib-file a[download]');
  if (a) a.click();
}, 300); }"""


def _editor_parts(value):
    """The image editor's value as (starting picture, inpainting mask): its background, and the alpha of what
    was painted over it (None when nothing was); a plain picture or path is a starting picture alone."""
    if not isinstance(value, dict):
        return value or None, None
    start = value.get("background")
    if start is None:
        return None, None
    mask = None
    for layer in value.get("layers") or []:
        if isinstance(layer, Image.Image) and layer.mode in ("RGBA", "LA"):
            alpha = layer.getchannel("A")
            if alpha.getextrema()[1] > 0:
                mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if isinstance(start, Image.Image):
        start = start.convert("RGB")
    return start, mask


class StudioUI:
    """The Gradio Blocks app over one `Studio`. Handlers are plain methods, callable from tests."""

    def __init__(self, studio: Studio | None = None) -> None:
        self.studio = studio or Studio()

    # ============================================================================================ Train tab
    def _dataset_view(self, ds_id: str, trigger: str, preset: str):
        scan = self.studio.scan(ds_id, trigger, preset)
        folder = self.studio.dataset_folder(ds_id)
        rel = [it.path.relative_to(folder).as_posix() for it in scan.items]  # 10_ohwx woman/1.png in kohya's layout
        thumbs = [(str(it.path), r) for it, r in zip(scan.items, rel)]
        caps = _df(list(zip(rel, (it.caption for it in scan.items))), CAPTION_COLUMNS)
        return thumbs, self._skipped_md(scan, folder), caps

    @staticmethod
    def _skipped_md(scan, folder: Path | None = None) -> str:
        head = f"**{len(scan.items)} image(s) will be trained on.**"
        if scan.subsets:
            head += " In kohya's folder layout; each folder's images count as often as its number says:\n"
            head += "\n".join(f"- `{s.folder.name}`: {s.images} image(s) × {s.repeats}"
                               + (f", caption “{s.tokens}” where an image has no caption file" if s.tokens else "")
                               for s in scan.subsets) + "\n"
        if scan.note:
            head += f"\n\n{scan.note}."
        if scan.masks:
            head += (f"\n\n{scan.masks} mask file(s) (`…-masklabel.png`): with *Masked loss* on (Advanced), only "
                     "the white part of each image counts.")
        if len(scan.items) < MIN_IMAGES:
            head += (f"\n\n<span class='ls-warn'>⚠ Only {len(scan.items)} usable image(s): {MIN_IMAGES}–"
                     f"{MAX_IMAGES} work best. With so few the adapter tends to copy them (same pose, colours, "
                     "background) instead of learning the concept; add more varied images if you can.</span>")
        elif len(scan.items) > MAX_IMAGES:
            head += (f"\n\n<span class='ls-warn'>⚠ {len(scan.items)} images: more than the {MAX_IMAGES} a preset "
                     "is tuned for; raise Steps so that each image is seen several times.</span>")
        if not scan.skipped:
            return head + " No file was skipped."
        lines = [head, f"**{len(scan.skipped)} file(s) skipped:**"]
        shown = [p.relative_to(folder).as_posix() if folder and p.is_relative_to(folder) else p.name
                 for p, _ in scan.skipped]
        lines += [f"- `{n.replace('`', chr(39))}`: {why}" for n, (_, why) in zip(shown, scan.skipped)]
        return "\n".join(lines)

    @ui_errors
    def stage_upload(self, files, trigger: str, preset: str, old_ds: str | None):
        """Uploaded files -> a new dataset folder; thumbnails, skipped files with reasons, captions."""
        files = [files] if isinstance(files, str) else list(files or [])
        if not files:
            return None, [], "", _df([], CAPTION_COLUMNS), trigger, gr.skip(), gr.skip()
        paths = [Path(getattr(f, "name", f)) for f in files]
        ds_id = self.studio.stage_files(paths, [p.name for p in paths])
        try:  # the trigger word the replaced dataset's folder names gave, if any: the new one's replaces it
            before = kohya_trigger(self.studio.dataset_folder(old_ds)) if old_ds else None
        except LoraStudioError:
            before = None
        self.studio.discard_dataset(old_ds)
        named = kohya_trigger(self.studio.dataset_folder(ds_id))  # a zipped kohya dataset: 10_ohwx woman -> ohwx
        if named and (trigger or "").strip() in ("", TrainConfig.trigger, before):
            trigger = named
        try:
            thumbs, skipped, caps = self._dataset_view(ds_id, trigger, preset)
        except LoraStudioError as e:  # nothing usable: still list what was skipped
            self.studio.discard_dataset(ds_id)
            raise gr.Error(str(e).replace(str(self.studio.datasets) + "/", ""), print_exception=False) from None
        return ds_id, thumbs, skipped, caps, trigger, NO_SAMPLE_SET, trigger

    @ui_errors
    def pick_sample_set(self, name: str, old_ds: str | None):
        """A shipped sample set -> staged like an upload; trigger word, preset and a name filled in."""
        if not name or name == NO_SAMPLE_SET:
            return (gr.skip(),) * (9 + len(PRESET_FIELDS))
        trigger, preset = SAMPLE_SET_TRIGGERS[name] if name in SAMPLE_SET_TRIGGERS else ("sks", "custom")
        ds_id = self.studio.stage_sample_set(name)
        self.studio.discard_dataset(old_ds)
        thumbs, skipped, caps = self._dataset_view(ds_id, trigger, preset)
        adapter_name = self._free_name(f"{name}-lora")
        # the preset's defaults come in this same response: a second event chained on the preset's change
        # could land after the user has started typing in the Advanced fields and overwrite them
        return (ds_id, thumbs, skipped, caps, trigger, trigger, preset, adapter_name, None,
                *self.preset_defaults(preset))

    def _free_name(self, stem: str) -> str:
        """`stem`, or `stem-2`, `stem-3`…: not in the library, not queued or training, no run folder of that name."""
        taken = {n.casefold() for n in self.studio.library.names()}
        taken |= {j.config.name.casefold() for j in self.studio.queue.jobs() if j.active}
        runs = self.studio.library.root / "runs"
        if runs.is_dir():
            taken |= {p.name.casefold() for p in runs.iterdir()}
        name, k = stem, 2
        while name.casefold() in taken:
            name, k = f"{stem}-{k}", k + 1
        return name

    @staticmethod
    def recaption_for_preset(captions, preset: str, trigger: str):
        """The preset changed: captions that are a preset's generated prompt ("a photo of sks") become the new
        preset's ("in the style of sks"); captions from .txt files and the user's own edits are kept."""
        trigger = (trigger or "").strip() or "sks"
        templates = {v.get("instance_template", TrainConfig.instance_template) for v in PRESETS.values()}
        generated = {t.format(trigger=trigger) for t in templates}
        new = PRESETS.get(preset, {}).get("instance_template", TrainConfig.instance_template).format(trigger=trigger)
        rows = [[r[0], new if str(r[1]).strip() in generated else r[1]] for r in _rows(captions) if r and r[0]]
        return _df(rows, CAPTION_COLUMNS)

    @ui_errors
    def edit_all_captions(self, op: str, captions, tags: str, find: str, replace: str, trigger: str):
        """The captions table with every caption edited at once (op: front, end, remove, replace; see
        `training.dataset.edit_captions`), and the new tag counts."""
        rows = [r for r in _rows(captions) if r and r[0]]
        try:
            new = edit_captions([str(r[1] or "") for r in rows], op, tags or "", find or "", replace or "",
                                (trigger or "").strip())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        table = _df([[r[0], c] for r, c in zip(rows, new)], CAPTION_COLUMNS)
        return table, self.caption_tags(table)

    @staticmethod
    def caption_tags(captions) -> str:
        """The captions' most frequent tags, with the number of captions that have each."""
        rows = [r for r in _rows(captions) if r and r[0]]
        counts = tag_counts([str(r[1] or "") for r in rows])
        if not counts:
            return ""
        return (f"Most frequent tags ({len(rows)} captions): "
                + " · ".join(f"`{t.replace('`', chr(39))}` {k}" for t, k in counts))

    @staticmethod
    def retrigger(captions, old: str, new: str):
        """The trigger word changed: swap it in every caption (user edits kept)."""
        new = (new or "").strip()
        if not new:
            return gr.skip(), old
        rows = [[r[0], _replace_trigger(r[1], old, new)] for r in _rows(captions) if r and r[0]]
        return _df(rows, CAPTION_COLUMNS), new

    def preset_defaults(self, preset: str, base: str | None = None):
        """Every field a preset sets (rank, steps, learning rates, text encoder, UNet modules, caption template…),
        as its widget shows it: the preset's value for the chosen base's family (the toy's own, or published
        SD 1.x/2.x/XL values), else the field's default, so nothing of the previous preset stays behind.
        'custom' leaves the fields as they are."""
        if not PRESETS.get(preset):
            return (gr.skip(),) * len(PRESET_FIELDS)
        opts = _options()
        family = self.base_preset_family(base)
        return tuple(widget_value(opts[f], preset_value(preset, opts[f], family)) for f in PRESET_FIELDS)

    def optimizer_rates(self, optimizer: str, preset: str, base: str | None, lr_unet: float | None,
                        lr_text: float | None):
        """The learning rates an optimizer change asks for: Prodigy's are multipliers of its own step size (1.0);
        back to another optimizer, rates that size go back to the preset's (an AdamW rate of 1.0 would blow up)."""
        if optimizer in ADAPTIVE:
            return 1.0, 1.0
        if (lr_unet or 0) >= ADAPTIVE_MIN_LR or (lr_text or 0) >= ADAPTIVE_MIN_LR:
            opts, family = _options(), self.base_preset_family(base)
            return tuple(widget_value(opts[f], preset_value(preset, opts[f], family)) for f in ("lr_unet", "lr_text"))
        return gr.skip(), gr.skip()

    def base_preset_family(self, base: str | None) -> str:
        try:
            return preset_family(self.studio.base_source(base))
        except Exception:  # noqa: BLE001 - a name not in the list: its error comes on Start
            return "sd1"

    def train_config(self, form: dict[str, Any], *, overwrite: bool = False, check_images: bool = True,
                     check_device: bool = True) -> TrainConfig:
        """The Train tab's form -> a TrainConfig (captions written next to the staged images first).

        `form` maps field names to widget values ("images" is the staged dataset, "base" a base model's name),
        plus the captions table, the last trigger word and the prior-preservation toggle (FORM_EXTRAS). A field
        left out takes the preset's value or its default; every field is checked before anything is written.
        """
        opts = _options()
        unknown = sorted(k for k in form if k not in FORM_EXTRAS and (k not in opts or not opts[k].ui))
        if unknown:
            raise ConfigError(f"form: unknown or app-set field(s) {', '.join(unknown)}")
        ds_id = form.get("images")
        if not ds_id and check_images:
            raise ConfigError("images: upload some images or pick a sample set first")
        data = {k: field_value(opts[k], v) for k, v in form.items() if k in opts and k not in ("images", "base")}
        for k in ("name", "trigger"):
            if k in data:
                data[k] = (data[k] or "").strip()
        if "prior" in form:  # the toggle decides; the class prompt it had stays in its box
            if not form["prior"]:
                data["class_prompt"] = None
            elif not data.get("class_prompt"):
                raise ConfigError("class_prompt: prior preservation needs a class prompt, e.g. 'a shape'")
        data.update(images=str(self.studio.dataset_folder(ds_id)) if ds_id else ".",
                    base=self.studio.base_source(form.get("base")),
                    output_dir=str(self.studio.library.root), device=self.studio.device, overwrite=overwrite,
                    embeddings_dir=str(self.studio.embeddings_dir))
        cfg = TrainConfig.from_dict(data, source="form")  # every field checked before anything is written
        if cfg.quantize_base and check_device:  # fail here, not minutes later in the job: nf4 needs CUDA
            from pipelines.base_models import default_device
            from pipelines.quantize import check_available

            check_available(cfg.quantize_base, cfg.device or default_device())
        if cfg.masked_loss and ds_id and check_images:  # said at Start, not when the job has loaded the base
            try:
                check_masks(self.studio.scan(ds_id, cfg.trigger).items, self.studio.dataset_folder(ds_id))
            except LoraStudioError as e:  # the staged folder's server path is no business of the page
                raise type(e)(str(e).replace(f"in {self.studio.dataset_folder(ds_id)} ", "uploaded ")) from None
        if "captions" in form:
            last = (form.get("last_trigger") or "").strip() or cfg.trigger
            rows = [[r[0], _replace_trigger(r[1], last, cfg.trigger)] for r in _rows(form["captions"]) if r and r[0]]
            self.studio.save_captions(ds_id, rows)
        return cfg

    # ---------------------------------------------------------------------------------------- saved settings
    def settings_sources(self) -> list[str]:
        """Library adapters whose training settings (NAME.toml, written beside every trained adapter) can be
        loaded into the form."""
        lib = self.studio.library
        return [n for n in lib.names() if any(p.suffix == ".toml" for p in lib.sidecars(n))]

    def settings_choices(self):
        return gr.update(choices=self.settings_sources())

    @ui_errors
    def load_settings(self, name, current_base):
        """An earlier adapter's settings (its NAME.toml in the library) into the Train form: every option, the
        trigger word, preset and base model, and a free name from the file's (the images stay as they are).
        Returns the SETTINGS_FIELDS widgets' values, then a message."""
        if not name:
            raise ConfigError("settings: pick an adapter whose settings to load, or load a .toml file")
        path = next((p for p in self.studio.library.sidecars(str(name)) if p.suffix == ".toml"), None)
        if path is None:
            raise ConfigError(f"settings: '{name}' has no saved settings ({name}.toml) in the library")
        return self._settings_from(path, current_base)

    @ui_errors
    def load_settings_file(self, file, current_base):
        """An uploaded .toml (saved here, written for `lora-studio train --config`) or a kohya_ss GUI .json into
        the Train form."""
        if not file:
            return (gr.skip(),) * (len(SETTINGS_FIELDS) + 1)
        path = Path(getattr(file, "name", file))
        try:
            return self._settings_from(path, current_base)
        except LoraStudioError as e:
            raise _file_named(e, path) from None

    def _settings_from(self, path: Path, current_base):
        cfg = TrainConfig.from_toml(path, {"images": "."})  # checked like `train --config`; images stay
        opts = _options()
        values = {f: widget_value(opts[f], getattr(cfg, f)) for f in SETTINGS_FIELDS if f in opts}
        values["name"] = self._free_name(cfg.name)
        values["prior"] = cfg.class_prompt is not None
        notes = []
        if path.suffix.lower() == ".json":  # a kohya_ss config: what was not taken, and how steps were counted
            from training.kohya_gui import read_kohya_gui

            kohya = read_kohya_gui(path)
            notes += kohya.notes
            if folder := kohya.options.get("images"):  # kohya names the trigger in its folders: 10_ohwx woman
                if trigger := kohya_trigger(folder):
                    values["trigger"] = trigger
                notes.append(f"the images of its train_data_dir ({folder}) are not loaded here: drop them, or a .zip "
                             "of the folder, above" + (f"; trigger word '{trigger}' from its folder names"
                                                       if trigger else ""))
        match = self.base_names()[0] if cfg.base is None else self.studio.base_named(cfg.base)
        values["base"] = gr.update(value=match or current_base, choices=self.base_names())
        if match is None:
            notes.append(f"its base model '{cfg.base}' is not here, so '{current_base}' stays")
        msg = (f"Loaded the settings of <b>{html.escape(path.stem)}</b> (preset {cfg.preset}, {cfg.max_steps} "
               f"steps, rank {cfg.rank}); the name is <b>{html.escape(values['name'])}</b>.")
        if notes:
            said = "; ".join(html.escape(n) for n in notes)
            msg += " " + said[:1].upper() + said[1:] + "."
        return (*[values[f] for f in SETTINGS_FIELDS], f"<div class='ls-status'>{msg}</div>")

    @ui_errors
    def save_settings(self, form: dict[str, Any]):
        """The form's settings as a .toml to download (what `lora-studio train --config` reads on this
        computer: the images and base model by their full paths); the images are in it when some are staged."""
        staged = form.get("images")
        cfg = self.train_config({k: v for k, v in form.items() if k != "captions"}, check_images=False,
                                check_device=False)  # saved for any machine: nf4 on a CPU server is fine
        from pipelines.weights_io import atomic_write
        from training.export import config_toml

        # this app's own folders are no setting: a terminal run writes to its own library, on its own device
        text = config_toml(cfg, ("output_dir", "device", "overwrite", "embeddings_dir") + (() if staged else ("images",)),
                           shareable=False)
        out = self.studio.outputs / "settings" / f"{safe_file_name(cfg.name)}.toml"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return gr.update(value=str(out), visible=True), (
            f"<div class='ls-status'>Settings saved as <b>{html.escape(out.name)}</b>: load it here again, or "
            f"train with it from a terminal: <code>lora-studio train --config {html.escape(out.name)}"
            f"{'' if staged else ' --images FOLDER'}</code>.</div>")

    # ---------------------------------------------------------------------------------------- start, name in use
    # every start handler answers [job id, status, message, choice box, choice text, its Resume button, its
    # new-name button, the form waiting for the choice, the name box]
    def _started(self, job: Job, name: Any = None) -> tuple:
        return (job.id, self.status_for(job.id), "", gr.update(visible=False), "", gr.skip(), gr.skip(), None,
                name if name is not None else gr.skip())

    def _ask_about_name(self, st, form: dict[str, Any]) -> tuple:
        free = self._free_name(st.name)
        name = f"<b>{html.escape(st.name)}</b>"
        if st.in_library:
            what = f"An adapter called {name} is already in the library."
            over = "Overwrite replaces it (and removes its old run folder)."
        else:
            at = f"step {st.step}/{st.total}" if st.total else f"step {st.step}"
            what = f"A run called {name} stopped (or was interrupted) with a checkpoint at {at}."
            over = "Overwrite starts it again from step 1 (its checkpoints are removed)."
        resume = " Resume continues it from its checkpoint with its own options." if st.resumable else ""
        msg = (f"<div class='ls-status' role='alert'><span class='ls-badge ls-stopped'>name in use</span> {what}"
               f"{resume} {over} Or start this one as <b>{html.escape(free)}</b>.</div>")
        return (gr.skip(), gr.skip(), "", gr.update(visible=True), msg, gr.update(visible=st.resumable),
                gr.update(value=f"Start as '{free}'"), {"form": dict(form), "free": free}, gr.skip())

    @ui_errors
    def start_training(self, form: dict[str, Any]):
        """Start: queue the job (one trains at a time). A name in use (a finished adapter, or a stopped run with a
        checkpoint) is never silently overwritten: the choice box asks to resume, overwrite or take a free name."""
        cfg = self.train_config(form)
        st = self.studio.run_state(cfg.name)
        if st.job is not None:
            raise ConfigError(f"name: a training called '{st.job.name}' is already queued or running "
                              f"(job {st.job.id}); pick another name")
        if st.in_library or st.checkpoint is not None:
            return self._ask_about_name(st, form)
        return self._started(self.studio.submit(cfg))

    @staticmethod
    def _pending_form(pending: dict | None) -> dict[str, Any]:
        if not pending or "form" not in pending:
            raise ConfigError("nothing is waiting to start; press Start training again")
        return dict(pending["form"])

    @ui_errors
    def choose_resume(self, pending: dict | None):
        """Name in use -> Resume: the stopped run continues from its latest checkpoint."""
        form = self._pending_form(pending)
        return self._started(self.studio.resume(str(form.get("name") or "").strip()))

    @ui_errors
    def choose_overwrite(self, pending: dict | None):
        """Name in use -> Overwrite: a new run from step 1 that replaces the adapter; the old run folder goes."""
        cfg = self.train_config(self._pending_form(pending), overwrite=True)
        self.studio.start_over(cfg.name)
        return self._started(self.studio.submit(cfg))

    @ui_errors
    def choose_new_name(self, pending: dict | None):
        """Name in use -> start under the free name offered (the name box follows)."""
        form = {**self._pending_form(pending), "name": pending.get("free")}
        cfg = self.train_config(form)
        st = self.studio.run_state(cfg.name)
        if st.in_use or st.checkpoint is not None:  # taken since it was offered
            return self._ask_about_name(st, form)
        return self._started(self.studio.submit(cfg), name=cfg.name)

    @staticmethod
    def cancel_choice():
        return "", gr.update(visible=False), "", None

    # ---------------------------------------------------------------------------------------- stop, continue
    def _shown(self, job_id, seen: dict | None) -> Job | None:
        """The job the page shows (the poll's), else the session's."""
        shown = (seen or {}).get("job")
        return self.studio.job(shown if shown is not None else job_id)

    @ui_errors
    def stop_training(self, job_id, seen: dict | None = None):
        """Stop this page's own job: out of the queue while it waits, after the current step while it trains.
        Only when the page's job has ended does Stop act on the run the page shows (one started elsewhere, the
        CLI's or another tab's): a queued job of yours is never the reason someone else's run stops."""
        job = self.studio.job(job_id)
        if job is None or not job.active:
            job = self._shown(job_id, seen)
        if job is None or not job.active:
            raise gr.Error("No training is running.", print_exception=False)
        queued = job.state == "queued"
        self.studio.queue.stop(job.id)
        gr.Info(f"Took '{job.config.name}' out of the queue." if queued else
                f"Stopping '{job.config.name}' after the current step; a checkpoint is kept.")
        return self.status_for(job_id), ""

    @ui_errors
    def resume_shown(self, job_id, seen: dict | None):
        """The shown run stopped or was interrupted: continue it from its latest checkpoint."""
        job = self._shown(job_id, seen)
        if job is None:
            raise ConfigError("resume: no run to resume")
        new = self.studio.resume(job.name)
        return new.id, self.status_for(new.id), "", *self._continue_buttons(None)

    @ui_errors
    def train_more_shown(self, job_id, seen: dict | None, steps):
        """The shown run finished: train N more steps from its adapter (a new adapter '<name>-more')."""
        job = self._shown(job_id, seen)
        if job is None:
            raise ConfigError("train more: no finished run to continue")
        new = self.studio.train_more(job.name, _num(steps, "steps", int))
        return new.id, self.status_for(new.id), "", *self._continue_buttons(None)

    @staticmethod
    def more_label(steps) -> str:
        try:
            return f"Train {int(steps)} more steps"
        except (TypeError, ValueError, OverflowError):
            return "Train N more steps"

    def _continue_buttons(self, job: Job | None) -> tuple:
        """Resume (a stopped or interrupted run with a checkpoint) and Train N more steps (a finished adapter)."""
        resumable = more = False
        if job is not None and not job.active:
            try:
                st = self.studio.run_state(job.name)
                resumable, more = st.resumable, st.in_library
            except LoraStudioError:
                pass
        return gr.update(visible=resumable), gr.update(visible=more), gr.update(visible=more)

    # ---------------------------------------------------------------------------------------- the Advanced section
    @staticmethod
    def _advanced_widgets(preset: str, family: str = "toy") -> tuple[dict[str, gr.components.Component],
                                                                     gr.components.Component]:
        """The Advanced section, generated from TrainConfig's field descriptions: a section per group (GROUPS
        order), a widget per field the user sets (numbers, toggles and choices first, then text); the values are
        the preset's, else the field's form default. Returns the widgets by field name and the prior-preservation
        toggle (which decides whether the class prompt is used)."""
        widgets: dict[str, gr.components.Component] = {}
        prior = None
        for group in GROUPS:
            opts = [o for o in ADVANCED if o.group == group]
            if not opts:
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-")
            with gr.Accordion(group, open=group in OPEN_GROUPS, elem_id=f"adv-group-{slug}"):
                if group == "Preservation":
                    prior = gr.Checkbox(False, label="Prior preservation (DreamBooth class images)",
                                        info="also train on base-model images of the class prompt, so that the "
                                             "class keeps its look", elem_id="adv-prior")
                fields = [o for o in opts if o.kind in (int, float) or o.choices is not None]
                toggles = [o for o in opts if o.kind is bool]
                texts = [o for o in opts if o not in fields and o not in toggles]
                for row in (fields, toggles):
                    if row:
                        with gr.Row(equal_height=True, elem_classes=["ls-fields"]):
                            for o in row:
                                widgets[o.name] = option_widget(o, preset_value(preset, o, family))
                for o in texts:
                    widgets[o.name] = option_widget(o, preset_value(preset, o, family))
        if prior is None:
            prior = gr.Checkbox(False, visible=False, elem_id="adv-prior")
        return widgets, prior

    # ---------------------------------------------------------------------------------------- status
    def status_html(self, job: Job | None) -> str:
        """One line of status (with a badge) and a progress bar for a training job."""
        if job is None:
            return "<div class='ls-status'>No training yet. Pick images, then press <b>Start training</b>.</div>"

        def line(kind: str, badge: str, body: str, pct: float | None = None) -> str:
            out = f"<div class='ls-status'><span class='ls-badge ls-{kind}'>{badge}</span> {body}</div>"
            if pct is not None:
                out += f"<div class='ls-progress'><div class='ls-bar' style='width:{pct:.1f}%'></div></div>"
            return out

        name = f"<b>{html.escape(job.config.name)}</b>"
        p = job.progress
        total = p.total if p else job.config.max_steps
        step = p.step if p else 0
        pct = 100.0 * step / max(1, total)
        if job.state == "queued":
            pos = self.studio.queue.position(job)
            return line("queued", "queued", f"{name} is waiting in the queue: position {pos} ({pos} job(s) ahead; "
                                            "one training runs at a time).")
        if job.state == "running":
            if p is None or (p.loss is None and step == 0) or (p.loss is None and "resumed" in (p.message or "")):
                what = "resuming from its checkpoint" if job.kind == "resume" else \
                    "loading the base model, checking and encoding the images"
                return line("running", "preparing", f"{name}: {what}…", pct)
            if p.message == CHECKING:
                return line("running", "checking", f"{name}: all {total} steps trained; {CHECKING}…", 100.0)
            loss = f"{p.loss:.4f}" if p.loss is not None else "–"
            # a progress line without timing (a message: stopping, saving) shows none rather than "0s elapsed"
            left = (f" · {_duration(p.elapsed_s)} elapsed · about {_duration(p.eta_s)} left"
                    if p.elapsed_s and p.eta_s is not None else "")
            return line("running", "training", f"{name}: step {step}/{total} · loss {loss}{left}", pct)
        if job.state == "done" and job.result is not None:
            r = job.result
            loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "–"
            if job.config.textual_inversion:
                word = html.escape(job.config.name)
                return line("done", "done", f"{name} is ready: {r.steps} steps in {_duration(r.seconds)}, final "
                                            f"loss {loss}. It is an embedding: in the <b>Generate</b> tab's "
                                            f"<b>Embeddings</b> picker; write <code>{word}</code> in a prompt.", 100.0)
            return line("done", "done", f"{name} is ready: {r.steps} steps in {_duration(r.seconds)}, final loss "
                                        f"{loss}. It is in the <b>Library</b> and in the <b>Generate</b> tab's adapter "
                                        f"picker (trigger word <code>{html.escape(job.config.trigger)}</code>).", 100.0)
        if job.state == "stopped" and job.started is None:
            return line("stopped", "stopped", f"{name} was taken out of the queue before it started.")
        if job.state == "stopped":
            kept = ("its checkpoint is kept: <b>Resume</b> continues it" if job.result is not None
                    and job.result.checkpoint else "no checkpoint had been written yet")
            return line("stopped", "stopped", f"{name} stopped at step {step}/{total}; {kept}.", pct)
        if job.state == "interrupted":
            at = f" at step {step}/{total}" if step else ""
            return line("interrupted", "interrupted",
                        f"{name} was interrupted{at} (the app or its training process ended before it finished). "
                        "<b>Resume</b> continues it from its latest checkpoint, if it wrote one.", pct if step else None)
        return line("failed", "failed", f"{name} failed: {html.escape(job.error or 'unknown error')}")

    def _view(self, job_id) -> tuple[Job | None, list[Job], list[Job]]:
        """The job to show, the other queued jobs, and all jobs. The session's job is shown, except while it
        waits in the queue (or was taken out before it ran): then the running job is, so that its progress, loss
        and samples stay in view."""
        jobs = self.studio.queue.jobs()
        try:
            want = int(job_id) if job_id is not None else None
        except (TypeError, ValueError):
            want = None
        mine = next((j for j in jobs if j.id == want), None)
        running = next((j for j in jobs if j.state == "running"), None)
        waiting = mine is None or mine.state == "queued" or (mine.state == "stopped" and mine.started is None)
        show = running if running is not None and waiting else mine
        queued = [j for j in jobs if j.state == "queued" and j is not show]
        return show, queued, jobs

    def _status(self, show: Job | None, queued: Sequence[Job]) -> str:
        head = self.status_html(show) if show is not None or not queued else ""
        return head + "".join(f"<div class='ls-queue-line'>{self.status_html(q)}</div>" for q in queued)

    def status_for(self, job_id) -> str:
        """The status pane: the shown job, then a line per queued job with its position."""
        show, queued, _ = self._view(job_id)
        return self._status(show, queued)

    def poll(self, job_id, seen: dict | None, view_id=None):
        """Timer tick: status, loss plot and samples of the shown job (the run picked to view, else the page's
        own), a line per queued job, the Resume / Train more buttons of a run that ended; only what changed is
        sent."""
        show, queued, jobs = self._view(view_id if view_id is not None else job_id)
        seen = dict(seen or {})
        status = self._status(show, queued)
        plot = samples = done = gr.skip()
        nl = ns = None
        if show is not None:
            same = seen.get("job") == show.id
            nl, ns = len(show.losses), len(show.samples)
            if not same or seen.get("nloss") != nl:
                plot = _loss_df(list(show.losses))
            if not same or seen.get("nsamples") != ns:
                samples = [(str(s), s.stem.replace("step-", "step ")) for s in list(show.samples)]
        ended = [j for j in jobs if not j.active]
        last = max(ended, key=lambda j: (j.finished or 0.0, j.id), default=None)
        finished = f"{last.id}:{last.state}" if last is not None else None
        if finished and seen.get("finished") != finished:
            done = finished  # a job ended: the library and the pickers are refreshed
        cont_key = f"{show.id}:{show.state}" if show is not None else None
        cont = self._continue_buttons(show) if cont_key != seen.get("cont", "") else (gr.skip(),) * 3
        now = {"job": show.id if show else None, "nloss": nl, "nsamples": ns, "status": status,
               "finished": finished or seen.get("finished"), "cont": cont_key}
        return (status if seen.get("status") != status else gr.skip(), plot, samples,
                now if now != seen else gr.skip(), done, *cont)

    def latest_job_id(self):
        """The job a reopened page shows: the one training, else the latest that ran (a job taken out of the
        queue before it started has nothing to show), else the latest."""
        jobs = self.studio.queue.jobs()
        for pick in (lambda j: j.state == "running", lambda j: j.started is not None, lambda j: True):
            found = max((j for j in jobs if pick(j)), key=lambda j: j.id, default=None)
            if found is not None:
                return found.id
        return None

    def run_choices(self, job_id, view_id=None):
        """The Train tab's run picker: every job, newest first, as 'id · name · state'; the shown one picked (the
        run picked to view, else the page's own). Picking one only shows it: the page's own job stays what
        Stop acts on."""
        jobs = sorted(self.studio.queue.jobs(), key=lambda j: j.id, reverse=True)
        shown = view_id if view_id is not None else job_id
        try:
            want = int(shown) if shown is not None else None
        except (TypeError, ValueError):
            want = None
        return gr.update(choices=[(f"{j.id} · {j.config.name} · {j.state}", j.id) for j in jobs],
                         value=want if any(j.id == want for j in jobs) else None)

    # ============================================================================================ adapters view
    def adapter_names(self) -> list[str]:
        return self.studio.library.names()

    def library_view(self, base_name: str | None):
        """Cards (preview + name) and the details table; a badge where an adapter does not fit the base."""
        base_fam = self.studio.base_family(base_name)
        cards, rows = [], []
        placeholder = self._placeholder()
        for info in self.studio.library.list():
            fam = info.family_label
            if info.family and base_fam and info.family != base_fam:
                from pipelines.adapters import FAMILY_LABELS

                fam = f"{fam} ⚠ not for the selected base ({FAMILY_LABELS.get(base_fam, base_fam)})"
            preview = str(info.preview) if info.preview else placeholder
            trig = info.trigger_word or "–"
            cards.append((preview, info.name))
            rows.append([info.name, trig, fam, info.rank_text, _human_size(info.size),
                         info.date[:16].replace("T", " "), info.format])
        return cards, _df(rows, LIBRARY_COLUMNS)

    def _placeholder(self) -> str:
        """The card picture of an adapter without a preview: "no preview", readable at the card's size."""
        p = self.studio.outputs / ".no-preview-v2.png"
        if not p.is_file():
            from PIL import Image, ImageDraw, ImageFont

            img = Image.new("RGB", (256, 256), (226, 232, 240))
            draw = ImageDraw.Draw(img)
            try:
                font = ImageFont.load_default(size=34)
            except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
                font = ImageFont.load_default()
            box = draw.textbbox((0, 0), "no preview", font=font)
            draw.text(((256 - box[2] + box[0]) // 2, (256 - box[3] + box[1]) // 2), "no preview",
                      fill=(71, 85, 105), font=font)
            img.save(p)
        return str(p)

    @ui_errors
    def refresh_adapters(self, base_name, lib_sel, cmp_adapter, cmp_run, *slot_names, keep_picks: bool = False):
        """Everything that lists adapters: library cards/table/picker, the Generate tab's pickers.

        A picked name that left the library is cleared. With `keep_picks` (the page's first refresh) only the
        lists change: the values sent with the request are from before the user could pick anything, and writing
        them back would undo a pick made while the request ran."""
        names = self.adapter_names()
        runs = self.studio.runs()

        def pick(choices, v):
            if keep_picks:
                return gr.update(choices=choices)
            return gr.update(choices=choices, value=v if v in choices else None)

        cards, table = self.library_view(base_name)
        hint = (f"{len(names)} adapter(s) in the library." if names else
                "No adapters yet: train one on the **Train** tab, or import a `.safetensors` file below.")
        return (cards, table, hint, pick(names, lib_sel), pick(names, cmp_adapter), pick(runs, cmp_run),
                *[pick(names, v) for v in slot_names])

    def first_refresh(self, base_name, *values):
        """The page's first refresh (a reopened page shows the current library); see `refresh_adapters`."""
        return self.refresh_adapters(base_name, *values, keep_picks=True)

    # ============================================================================================ Generate tab
    def base_names(self) -> list[str]:
        return list(self.studio.base_choices())

    def refresh_bases(self, current, current_train):
        """Base model pickers (Generate and Train tabs): the default model and what is in the models folder."""
        names = self.base_names()
        return (gr.update(choices=names, value=current if current in names else names[0]),
                gr.update(choices=names, value=current_train if current_train in names else names[0]))

    def refresh_extract_models(self, tuned, base):
        """The extraction's two model pickers: the same models as the base pickers."""
        names = self.base_names()
        return (gr.update(choices=names, value=tuned if tuned in names else None),
                gr.update(choices=names, value=base if base in names else names[0]))

    def refresh_vaes(self, current):
        """The VAE picker: the model's own, then the files in the models/VAE folder."""
        names = self.studio.vae_choices()
        return gr.update(choices=names, value=current if current in names else AUTOMATIC)

    def _card_start(self, name, steps) -> int | None:
        if not name:
            return None
        try:
            return self.studio.library.info(name).suggested_start(int(steps or 0))
        except (LoraStudioError, FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _start_update(start: int, steps) -> dict:
        return gr.update(value=start, label=f"acts from step (model card: {start} of {int(steps)})")

    def slot_picked(self, name, steps):
        """A user picked an adapter for a row: the row's step range follows its model card. With a suggested
        start (scaled to the current step count) *steps* is ticked and the start filled in; without one the
        range is cleared, so a range set for the row's previous adapter does not carry over. The last value
        is the start the card gave (kept in the row's state, so a new step count can rescale it)."""
        start = self._card_start(name, steps)
        if start is None:
            return gr.update(value=False), gr.update(value=0, label=START_LABEL), gr.update(value=0), None
        return gr.update(value=True), self._start_update(start, steps), gr.update(value=0), start

    @staticmethod
    def compare_default(name, current):
        """The comparison grid's adapter, while none is chosen there, is the one the user just picked in a row."""
        return name if name and not current else gr.skip()

    def steps_changed(self, steps, *rows):
        """The step count changed: each row whose start is still the one its model card gave (not edited
        since) gets the card's start for the new count. `rows`: (name, ranged, start, card start) per row."""
        out = []
        for i in range(0, len(rows), 4):
            name, ranged, start, card = rows[i:i + 4]
            new = self._card_start(name, steps) if ranged and card is not None and start == card else None
            out += [gr.skip(), gr.skip()] if new is None else [self._start_update(new, steps), new]
        return out

    @ui_errors
    def trigger_choices(self, *slot_values):
        """Trigger words of the enabled adapters (click one to insert it into the prompt)."""
        choices = []
        for i in range(0, len(slot_values), 2):
            name, enabled = slot_values[i], slot_values[i + 1]
            if not name or not enabled:
                continue
            try:
                info = self.studio.library.info(name)
            except (LoraStudioError, FileNotFoundError):
                continue
            words = [t.strip() for t in info.trigger_word.split(",") if t.strip()]
            # its bundled embeddings' words (pivotal tuning) mean what was trained: offered whatever the metadata says
            words += [w for w in info.embeddings if w not in words]
            # none recorded (a file from elsewhere): its most frequent training tags, as A1111's card lists them
            tags = [] if words else [t for t, _ in info.training_tags(3)]
            for t in words + tags:
                if t not in [c[1] for c in choices]:
                    kind = ", a training tag" if t in tags else ", its trained embedding" if t in info.embeddings else ""
                    choices.append((f"{t}  ({name}{kind})", t))
        return gr.update(choices=choices, value=None)

    @staticmethod
    def _with_word(prompt: str, word: str) -> str:
        """`prompt` with `word` added at its end, unless it is there already."""
        prompt = prompt or ""
        if word and not re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", prompt, re.I):
            head = prompt.rstrip()
            # a sentence left open ("... in", "a photo of") takes the word; a finished one or tags take ", word"
            joint = " " if re.search(r"(?:^|\s)(?:in|of|by|a|an|the|with|like|and|as)$|,$", head, re.I) else ", "
            prompt = f"{head}{joint}{word}" if head else word
        return prompt

    @classmethod
    def insert_trigger(cls, prompt: str, evt: gr.SelectData):
        trig = evt.value if isinstance(evt.value, str) else str(evt.value)
        trig = re.sub(r"\s+\(.*\)$", "", trig).strip()
        return cls._with_word(prompt, trig), gr.update(value=None)

    @classmethod
    def insert_embedding(cls, text: str, name: str | None):
        """An embedding's word added to the prompt or the negative prompt (A1111's Textual Inversion cards)."""
        return cls._with_word(text, name) if name else gr.skip()

    @classmethod
    def insert_wildcard(cls, text: str, name: str | None):
        """A wildcard's `__name__` added to the prompt (drawn anew for each image)."""
        return cls._with_word(text, f"__{name}__") if name else gr.skip()

    @ui_errors
    def apply_styles(self, prompt: str, negative: str, names):
        """The chosen styles merged into the prompt boxes, as AUTOMATIC1111's "apply styles" button does; the choice
        is cleared (applied once)."""
        from pipelines.styles import apply_styles, read_styles

        if not names:
            raise ConfigError("styles: pick one or more styles to apply")
        path = self.studio.styles_file
        p, n = apply_styles(prompt or "", negative or "", names, read_styles(path), path)
        return p, n, gr.update(value=[])

    @ui_errors
    def save_style(self, name: str, prompt: str, negative: str, chosen):
        """The prompt boxes saved as a new style in styles.csv (A1111's "save style")."""
        from pipelines.styles import Style, save_style

        styles = save_style(self.studio.styles_file, Style((name or "").strip(), prompt or "", negative or ""))
        gr.Info(f"Saved the style '{name.strip()}' in {self.studio.styles_file.name}.")
        return gr.update(choices=list(styles), value=list(chosen or [])), ""

    def refresh_styles(self, current):
        names = self.studio.style_names()
        return gr.update(choices=names, value=[c for c in (current or []) if c in names])

    def refresh_wildcards(self, current):
        names = self.studio.wildcard_names()
        return gr.update(choices=names, value=current if current in names else None)

    def refresh_embeddings(self, current):
        names = self.studio.embedding_names()
        return gr.update(choices=names, value=current if current in names else None)

    @staticmethod
    def _request(prompt, negative, steps, guidance, seed, width, height, num_images, scheduler,
                 clip_skip=1, hires_scale=1.0, hires_steps=0, hires_upscaler="Latent", hires_denoise=0.7,
                 init_image=None, init_strength=0.75, mask_blur=4) -> GenerationRequest:
        if not (prompt or "").strip():
            raise ConfigError("prompt: write what you want to see (the trigger word brings in the adapter)")
        w, h = _num(width or 0, "width", int), _num(height or 0, "height", int)
        start, mask = _editor_parts(init_image)
        return GenerationRequest(
            prompt=prompt, negative_prompt=negative or "", steps=_num(steps, "steps", int),
            guidance=_num(guidance, "guidance"), seed=_num(seed if seed not in (None, "") else -1, "seed", int),
            width=w or None, height=h or None, num_images=_num(num_images, "num_images", int), scheduler=scheduler,
            clip_skip=_num(clip_skip if clip_skip not in (None, "") else 1, "clip_skip", int),
            hires_scale=_num(hires_scale or 1, "hires_scale"), hires_steps=_num(hires_steps or 0, "hires_steps", int),
            hires_upscaler=hires_upscaler or "Latent", init_image=start, mask_image=mask,
            mask_blur=_num(mask_blur if mask_blur not in (None, "") else 4, "mask_blur", int),
            denoising_strength=_num(init_strength if start is not None else hires_denoise, "denoising_strength"))

    @staticmethod
    def _with_boxes(req: GenerationRequest, tiling, cfg_rescale, zero_terminal_snr) -> GenerationRequest:
        """The request with the Generate tab's Tiling, CFG rescale and Zero terminal SNR boxes (unticked: the
        model's own schedule), for Generate and its Compare grid alike."""
        return replace(req, tiling=bool(tiling), cfg_rescale=_num(cfg_rescale or 0, "cfg_rescale"),
                       zero_terminal_snr=True if zero_terminal_snr else None)

    @staticmethod
    def _slot_rows(slot_values: Sequence[Any]) -> list[tuple]:
        return [tuple(slot_values[i:i + SLOT_FIELDS]) for i in range(0, len(slot_values), SLOT_FIELDS)]

    @ui_errors
    def generate(self, base_name, prompt, negative, steps, guidance, seed, width, height, num_images, scheduler,
                 clip_skip, hires_scale, hires_steps, hires_upscaler, hires_denoise, init_image, init_strength,
                 mask_blur, vae, fuse, *slot_values, combinatorial=False, fixed_seed=False, subseed=-1,
                 subseed_strength=0.0, tiling=False, cfg_rescale=0.0, zero_terminal_snr=False, batch_size=0):
        """Generate: gallery, PNG downloads (with their parameters), parameters text, interference warning.
        Choices and wildcards in the prompts are drawn for each image (every combination with `combinatorial`;
        one seed for all with `fixed_seed`)."""
        req = self._request(prompt, negative, steps, guidance, seed, width, height, num_images, scheduler, clip_skip,
                            hires_scale, hires_steps, hires_upscaler, hires_denoise, init_image, init_strength,
                            mask_blur)
        if subseed_strength:  # A1111's variation seed
            req = replace(req, subseed=_num(subseed if subseed not in (None, "") else -1, "subseed", int),
                          subseed_strength=_num(subseed_strength, "subseed_strength"))
        req = self._with_boxes(req, tiling, cfg_rescale, zero_terminal_snr)
        if batch_size:
            req = replace(req, batch_size=_num(batch_size, "batch_size", int))
        entries = entries_from_rows(self._slot_rows(slot_values))
        res = self.studio.generate(base_name, req, entries, fuse=bool(fuse), vae=vae,
                                   combinatorial=bool(combinatorial), fixed_seed=bool(fixed_seed))
        gallery = [(str(p), f"seed {img.seed}" + (f", variation {img.subseed}" if img.subseed is not None else ""))
                   for p, img in zip(res.paths, res.images)]
        notes = ([("Interference", w) for w in res.warnings] + [("Step range", w) for w in res.range_warnings]
                 + [("Clip skip", w) for w in res.clip_skip_warnings]
                 + [("Embedding", w) for w in res.embedding_warnings])
        warn = "\n".join(f"⚠ **{kind}:** {html.escape(w)}" for kind, w in notes)
        if notes:
            gr.Warning(notes[0][1])
        used = ", ".join(f"`{e.tag()}`" for e in res.entries) or "no adapter"
        info = f"{len(res.images)} image(s) with {used}" + (" (fused)" if fuse and res.entries else "")
        prompts = list(dict.fromkeys(img.parameters.split("\n")[0] for img in res.images))
        if "Template: " in res.images[0].parameters:  # drawn from a template: say what was drawn
            info += f"; {len(prompts)} prompt(s) drawn" + "".join(f"\n- {html.escape(p)}" for p in prompts[:8])
        info += "".join(f"\n\nNote: {html.escape(n)}" for n in res.notes)
        if res.interrupted:
            info = f"⏹ **{html.escape(res.interrupted[0].upper() + res.interrupted[1:])}.**\n\n" + info
        return (gallery, [str(p) for p in res.paths], res.images[0].parameters, res.images[0].seed,
                [str(p) for p in res.paths], warn, info)

    def generate_event(self, base_name, *values):
        """The Generate button's inputs (the form, Fuse, the two dynamic-prompt boxes, the variation seed and its
        strength, Tiling, CFG rescale, Zero terminal SNR, Batch size, then the adapter rows) into `generate`."""
        k = len(GENERATE_FORM) + 1  # the form's fields and Fuse
        return self.generate(base_name, *values[:k], *values[k + 8:], combinatorial=values[k],
                             fixed_seed=values[k + 1], subseed=values[k + 2], subseed_strength=values[k + 3],
                             tiling=values[k + 4], cfg_rescale=values[k + 5], zero_terminal_snr=values[k + 6],
                             batch_size=values[k + 7])

    def token_counter(self, base_name: str | None, text: str | None, steps=20) -> str:
        """AUTOMATIC1111's counter under a prompt box ("12/75", "80/150": tokens, and the room of the chunks they
        take), with the base model's tokenizer: the loaded model's (its embeddings counted as their vectors), else
        a diffusers folder's own tokenizer; nothing for a model not loaded yet that has none to read alone."""
        from pipelines.prompts import token_count

        try:
            src = self.studio.base_source(base_name)
        except UnsafeNameError:
            return ""
        loaded = next((m for m in self.studio.loaded_models() if m.base.source == src), None)
        if loaded is not None:
            tokenizer, model = loaded.base.pipe.tokenizer, loaded.base
        else:
            tokenizer, model = self._folder_tokenizer(src), None
            if tokenizer is None:
                return ""
        try:
            n, room = token_count(tokenizer, text or "", int(steps or 20), model)
        except Exception:  # noqa: BLE001 - a half-typed prompt: no count rather than an error while typing
            return ""
        return f"{n}/{room}"

    def _folder_tokenizer(self, src: str):
        cache = self.__dict__.setdefault("_tokenizers", {})
        if src not in cache:
            folder = Path(src) / "tokenizer"
            tok = None
            if folder.is_dir():
                from transformers import CLIPTokenizer

                try:
                    tok = CLIPTokenizer.from_pretrained(folder)
                except (OSError, ValueError):
                    tok = None
            cache[src] = tok
        return cache[src]

    @staticmethod
    def show_parameters(paths, evt: gr.SelectData):
        try:
            return read_png_parameters(paths[evt.index]) or ""
        except (IndexError, TypeError, OSError):
            return gr.skip()

    @staticmethod
    def picked_image(paths, evt: gr.SelectData):
        return evt.index if isinstance(evt.index, int) else 0

    @staticmethod
    def start_from(index, paths):
        """AUTOMATIC1111's "Send to img2img": the picked (else the first) result becomes the starting image."""
        if not paths:
            return gr.skip(), gr.skip(), "Generate an image first: it then becomes the starting image."
        path = paths[index if isinstance(index, int) and 0 <= index < len(paths) else 0]
        return ({"background": path, "layers": [], "composite": path}, gr.update(open=True),
                "Starting image set: **Generate** draws from it at the denoising strength under *Start from an "
                "image*.")

    @ui_errors
    def read_image_parameters(self, file):
        """An image the user opened: its generation parameters into the Parameters box."""
        if not file:
            return gr.skip(), ""
        text = read_parameters(getattr(file, "name", file))  # its errors name the file, not the upload folder
        return text, "Parameters read: **Use these parameters** puts them into the form."

    def _library_name(self, name: str) -> str | None:
        """The library's own spelling of adapter `name` (names match up to case), or None when it is not there."""
        try:
            found = self.studio.library.find(name)
        except UnsafeNameError:  # a name no library file can have (e.g. from another tool's prompt)
            return None
        return found.stem if found is not None else None

    @ui_errors
    def recall_form(self, text, base_name):
        """AUTOMATIC1111's "Send to txt2img": the parameters in the box fill the form (prompt without its
        adapter tags, which go into the rows, up to one per row; the rest stay tags in the prompt), picking the
        recorded base model where one of that name is here. Returns the form's values, the rows' widgets,
        their card starts (cleared) and a line saying what was filled and what cannot be the same."""
        got = recall(text, self.studio.library, embeddings=self.studio.embeddings_dir)
        entries = list(got.entries)
        known = {e.name: self._library_name(e.name) for e in entries}
        # a row shows a library adapter at a weight its sliders reach (and without block weights or a range in
        # shares of the steps, which a row has no field for): the others stay tags in the prompt
        rows = [e for e in entries if known[e.name] is not None and _on_slider(e) and e.lbw is None
                and not e.fractional][:SLOTS]
        extra = [e for e in entries if e not in rows]
        r = got.request
        prompt = " ".join([r.prompt] + [e.tag() for e in extra]).strip()
        notes = list(got.notes)
        base_update, picked = gr.skip(), base_name
        if got.model:
            match = self.studio.base_named(got.model)
            if match is not None:
                base_update, picked = gr.update(value=match, choices=self.base_names()), match
            else:
                notes.append(f"the image was made with the base model '{got.model}', which is not here; "
                             f"'{base_name}' stays (put the model into the models folder to use it)")
        r = for_family(r, self.studio.base_family(picked), notes, a1111=got.a1111)
        vae_update = AUTOMATIC
        if got.vae:
            if got.vae in self.studio.vae_choices():
                vae_update = got.vae
            else:
                notes.append(f"the image was decoded with the VAE '{got.vae}', which is not in "
                             f"{self.studio.vae_dir}: the model's own is used (colours may differ)")
        slots, names = [], self.adapter_names()
        for i in range(SLOTS):
            if i < len(rows):
                e = rows[i]
                sep = e.te_weight is not None and e.te_weight != e.weight
                ranged = bool(e.start or e.stop is not None)
                slots += [gr.update(value=known[e.name], choices=names), True, e.weight, sep,
                          e.te_weight if sep else e.weight, ranged, e.start, e.stop or 0]
            else:
                slots += [gr.update(value=None, choices=names), True, 1.0, False, 1.0, False, 0, 0]
        used = ", ".join(f"`{e.tag()}`" for e in entries) or "no adapter"
        msg = f"Form filled from the parameters (seed {r.seed}, {used})."
        if notes:
            msg += "\n\n" + "\n\n".join(f"⚠ {html.escape(n, quote=False)}" for n in notes)
            gr.Warning(notes[0])
        hires = r.hires_scale > 1
        return (prompt, r.negative_prompt, r.steps, r.guidance, r.scheduler, r.seed, r.width or 0, r.height or 0,
                r.clip_skip, r.hires_scale, r.hires_steps, r.hires_upscaler,
                r.denoising_strength if hires else gr.skip(), gr.update(open=True) if hires else gr.skip(),
                vae_update, base_update, *slots, *[None] * SLOTS, r.subseed if r.subseed_strength else -1,
                r.subseed_strength, gr.update(open=True) if r.subseed_strength else gr.skip(), r.tiling,
                r.cfg_rescale, bool(r.zero_terminal_snr),
                gr.update(open=True) if r.cfg_rescale or r.zero_terminal_snr else gr.skip(), msg)

    @ui_errors
    def compare(self, mode, base_name, prompt, negative, steps, guidance, seed, width, height, num_images, scheduler,
                clip_skip, hires_scale, hires_steps, hires_upscaler, hires_denoise, init_image, init_strength,
                 mask_blur, vae,
                cmp_adapter, cmp_weights, cmp_run, *slot_values, rows="none", row_values="", tiling=False,
                cfg_rescale=0.0, zero_terminal_snr=False, z="none", z_values=""):
        """Comparison grid: one prompt and seed across an adapter's weights, a run's checkpoints, or the
        enabled adapters one at a time; `rows` a second axis (COMPARE_ROWS) over `row_values`."""
        req = self._request(prompt, negative, steps, guidance, seed, width, height, num_images, scheduler, clip_skip,
                            hires_scale, hires_steps, hires_upscaler, hires_denoise, init_image, init_strength,
                            mask_blur)
        req = self._with_boxes(req, tiling, cfg_rescale, zero_terminal_snr)
        enabled = entries_from_rows(self._slot_rows(slot_values))
        kind = COMPARE_MODES.get(mode)
        if kind is None:
            raise ConfigError(f"mode: unknown comparison '{mode}'")
        weights = _weights(cmp_weights) if kind == "weights" else ()
        starts = _starts(cmp_weights, req.steps) if kind == "starts" else ()
        settings = _settings(cmp_weights, kind) if kind in ("guidance", "steps", "scheduler", "prompt_sr") else ()
        row_kind = COMPARE_ROWS.get(rows or "none")
        if row_kind is None:
            raise ConfigError(f"rows: unknown second axis '{rows}'")
        row_vals = (() if row_kind == "none" else
                    _weights(row_values) if row_kind == "weights" else _settings(row_values, row_kind))
        z_kind = COMPARE_ROWS.get(z or "none")
        if z_kind is None:
            raise ConfigError(f"z: unknown third axis '{z}'")
        z_vals = (() if z_kind == "none" else _weights(z_values) if z_kind == "weights" else
                  _settings(z_values, z_kind))
        path = self.studio.compare(base_name, req, kind, adapter=cmp_adapter, weights=weights, run=cmp_run,
                                   others=enabled, starts=starts, vae=vae, settings=settings,
                                   rows=row_kind, row_values=row_vals, z=z_kind, z_values=z_vals)
        return str(path), str(path), req.seed

    @staticmethod
    def compare_values_box(mode: str, current: str):
        """The values box follows the mode: weights for 'adapter weights', steps for 'adapter start step'
        (weights are no steps, nor the other way round: it starts from the mode's own example); the other
        modes do not use it and leave it as it is."""
        kind = COMPARE_MODES.get(mode)
        if kind not in COMPARE_VALUES:
            return gr.update()
        label, default = COMPARE_VALUES[kind]
        return gr.update(label=label, value=default)

    def compare_shown(self, *args):
        """`compare` for the page (its inputs: the mode, the form, the adapter, values and run, the second axis and
        its values, Tiling, CFG rescale, Zero terminal SNR, the third axis and its values, then the adapter rows): the
        grid, its file, the seed, and a status line (where an error stays, or what an Interrupt left out)."""
        k = 2 + len(GENERATE_FORM) + 3
        grid, file, seed = self.compare(*args[:k], *args[k + 7:], rows=args[k], row_values=args[k + 1],
                                        tiling=args[k + 2], cfg_rescale=args[k + 3], zero_terminal_snr=args[k + 4],
                                        z=args[k + 5], z_values=args[k + 6])
        cut = parse_parameters(read_png_parameters(file) or "").get("Grid interrupted")
        return grid, file, seed, f"⏹ **Interrupted:** {cut}; the others are left blank." if cut else ""

    # ============================================================================================ Library tab
    @ui_errors
    def import_adapter(self, files, name: str):
        """Import one adapter file; files uploaded with it whose names start with its own (its preview image,
        AUTOMATIC1111's `.json`, a `.civitai.info`, a model card) come along, as they do from a folder."""
        import shutil
        import tempfile

        from pipelines.library import SIDECAR_SUFFIXES
        from pipelines.weights_io import PICKLE_SUFFIXES

        paths = [Path(getattr(f, "name", f)) for f in (files if isinstance(files, (list, tuple)) else [files]) if f]
        adapters = [p for p in paths if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)]
        if not adapters:
            raise ConfigError("file: choose a .safetensors LoRA file to import (its preview image and .json may "
                              "come with it)")
        if len(adapters) > 1:
            raise ConfigError(f"file: one adapter at a time (got {', '.join(p.name for p in adapters)})")
        src = adapters[0]
        side = [p for p in paths if p is not src and p.name.startswith(src.stem + ".")
                and p.name[len(src.stem):].lower() in SIDECAR_SUFFIXES]
        left = [p.name for p in paths if p is not src and p not in side]
        stage = Path(tempfile.mkdtemp(prefix=".import-", dir=self.studio.home))  # the files side by side
        try:
            for p in (src, *side):
                shutil.copyfile(p, stage / p.name)
            try:
                info = self.studio.library.import_file(stage / src.name, (name or "").strip() or None)
            except (LoraStudioError, FileNotFoundError) as e:
                raise _file_named(e, stage / src.name, src) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        fam = info.family_label
        gr.Info(f"Imported '{info.name}' ({info.format} format, {fam}, rank {info.rank_text}).")
        msg = f"Imported **{html.escape(info.name)}** ({info.format} format, {fam}, rank {info.rank_text})"
        if side:
            msg += " with " + ", ".join(f"`{html.escape(p.name)}`" for p in side)
        msg += "."
        if left:
            msg += (" Not taken (a file goes along when its name starts with the adapter's, "
                    f"`{html.escape(src.stem)}.`): " + ", ".join(f"`{html.escape(n)}`" for n in left) + ".")
        return msg, gr.update(value=info.name, choices=self.adapter_names()), None, ""

    @ui_errors
    def select_card(self, evt: gr.SelectData):
        names = [i.name for i in self.studio.library.list()]
        if evt.index is None or not 0 <= int(evt.index) < len(names):
            return gr.skip()
        return gr.update(value=names[int(evt.index)], choices=self.adapter_names())

    @ui_errors
    def adapter_details(self, name: str):
        """The selected adapter's model card (or its metadata), shown under the table."""
        if not name:
            return ""
        lib = self.studio.library
        card = lib.model_card(name)  # a regular file only: a symlinked card is never read
        if card is not None:
            return card
        info = lib.info(name)  # no card (an adapter from another tool): what its file says
        rows = [("format", f"{info.format} keys, {info.size / 1024:.1f} KB"), *adapter_facts(info)]
        return (f"### {html.escape(info.name)}\n\nNo model card: what the file says.\n\n"
                + "\n".join(f"- **{k}**: {html.escape(v, quote=False)}" for k, v in rows))

    @ui_errors
    def rename_adapter(self, old: str, new: str):
        if not old:
            raise ConfigError("adapter: pick the adapter to rename")
        new = (new or "").strip()
        if not new:
            raise ConfigError("new name: type the adapter's new name")
        if new == old:
            raise ConfigError(f"new name: '{new}' is already this adapter's name")
        info = self.studio.library.rename(old, new)
        self.studio.forget_adapter(old)
        gr.Info(f"Renamed '{old}' to '{info.name}'.")
        return f"Renamed **{html.escape(old)}** to **{html.escape(info.name)}**.", \
            gr.update(value=info.name, choices=self.adapter_names()), ""

    @ui_errors
    def ask_delete(self, name: str):
        if not name:
            raise ConfigError("adapter: pick the adapter to delete")
        self.studio.library.path_for(name)  # exists and is inside the library
        msg = (f"Delete **{html.escape(name)}** and its preview, model card and config from the library? "
               "This cannot be undone.")
        return gr.update(visible=True), msg

    @ui_errors
    def confirm_delete(self, name: str):
        gone = self.studio.library.delete(name)
        self.studio.forget_adapter(name)
        gr.Info(f"Deleted '{name}'.")
        return (f"Deleted **{html.escape(name)}** ({', '.join(html.escape(p.name) for p in gone)}).",
                gr.update(visible=False), gr.update(value=None, choices=self.adapter_names()))

    @staticmethod
    def cancel_delete():
        return gr.update(visible=False), "Nothing deleted."

    def embedding_rows(self) -> list[list]:
        rows = []
        for e in self.studio.embeddings():
            beside = ", ".join(w for w, p in (("preview", e.preview), ("card", e.card)) if p) or "-"
            rows.append([e.word, e.vectors or "?", e.family or f"unreadable: {e.error}", _human_size(e.size), e.hash,
                         beside])
        return rows

    def embeddings_shown(self, value: str | None = None):
        """The Library's embeddings table and picker, and the Generate tab's Embeddings picker, as the folder is."""
        return (_df(self.embedding_rows(), EMBEDDING_COLUMNS), self.refresh_embeddings(value),
                self.refresh_embeddings(None))

    @ui_errors
    def rename_embedding(self, old: str, new: str):
        if not old:
            raise ConfigError("embedding: pick the embedding to rename")
        path = self.studio.rename_embedding(old, new)
        gr.Info(f"Renamed '{old}' to '{path.stem}'.")
        return (f"Renamed **{html.escape(old)}** to **{html.escape(path.stem)}**: prompts write "
                f"`{html.escape(path.stem)}` from now on (pictures made before name `{html.escape(old)}`).",
                *self.embeddings_shown(path.stem), "")

    @ui_errors
    def ask_delete_embedding(self, name: str):
        if not name:
            raise ConfigError("embedding: pick the embedding to delete")
        self.studio.embedding_path(name)  # it is there
        return gr.update(visible=True), (f"Delete the embedding **{html.escape(name)}** with its preview and card? "
                                         "This cannot be undone."), ""

    @ui_errors
    def delete_embedding(self, name: str):
        gone = self.studio.delete_embedding(name)
        gr.Info(f"Deleted '{name}'.")
        return (f"Deleted **{html.escape(name)}** ({', '.join(html.escape(p.name) for p in gone)}).",
                gr.update(visible=False), *self.embeddings_shown())

    @ui_errors
    def export_kohya(self, name: str):
        if not name:
            raise ConfigError("adapter: pick the adapter to export")
        out = self.studio.library.export(name, "kohya", base=self.studio.base_for_adapter(name))
        files, note = self._with_embedding(name, with_user_metadata(out))
        return (gr.update(value=[str(p) for p in files], visible=True),
                f"Exported **{html.escape(name)}** in kohya format (AUTOMATIC1111, ComfyUI, kohya_ss). " + note)

    @ui_errors
    def resize_adapter(self, name: str, rank, keep, new: str):
        if not name:
            raise ConfigError("adapter: pick the adapter to resize")
        rank = int(rank) if rank else None
        keep = float(keep) / 100 if keep else None
        info, report = self.studio.resize_adapter(name, rank, keep, new)
        before = self.studio.library.info(name).size
        gr.Info(f"Wrote '{info.name}'.")
        return (f"Wrote **{html.escape(info.name)}** ({before / 1024:.1f} KB → {info.size / 1024:.1f} KB): "
                f"{html.escape(report.summary())}. Compare them in *Generate → Compare*.",
                gr.update(value=info.name, choices=self.adapter_names()))

    @ui_errors
    def extract_adapter(self, tuned: str, base: str, rank, keep, conv_rank, name: str):
        info, report = self.studio.extract_adapter(tuned, base, name, int(rank) if rank else None,
                                                   float(keep) / 100 if keep else None,
                                                   int(conv_rank) if conv_rank else None)
        gr.Info(f"Extracted '{info.name}'.")
        left = [s for s in report.skipped if " " in s]
        return (f"Extracted **{html.escape(info.name)}** ({info.size / 1024:.1f} KB) from "
                f"{html.escape(tuned)} against {html.escape(base)}: {html.escape(report.summary())}."
                + (f" Left out: {html.escape('; '.join(left))}." if left else ""),
                gr.update(value=info.name, choices=self.adapter_names()))

    @ui_errors
    def set_preview(self, name: str, index, paths):
        """AUTOMATIC1111's "replace preview": the Generate tab's picked (else first) result becomes the card."""
        if not name:
            raise ConfigError("adapter: pick the adapter whose preview to set")
        if not paths:
            raise ConfigError("image: generate an image first (Generate tab); the one picked there becomes the "
                              "preview")
        path = paths[index if isinstance(index, int) and 0 <= index < len(paths) else 0]
        self.studio.library.set_preview(name, path)
        gr.Info(f"Preview of '{name}' set.")
        return (f"Preview of **{html.escape(name)}** set from the picked result ({html.escape(Path(path).name)}).",
                gr.skip())

    @ui_errors
    def bake_stack(self, base_name, prompt, name, rank, *slot_values):
        """The Generate tab's stack (rows and the prompt's tags, at their weights) saved as one adapter."""
        entries = entries_from_rows(self._slot_rows(slot_values))
        info, report = self.studio.bake_stack(base_name, prompt, entries, name, int(rank) if rank else None)
        gr.Info(f"Saved '{info.name}'.")
        how = html.escape(report.summary()) if report is not None else f"exact, rank {info.rank}"
        return (f"Saved the stack as **{html.escape(info.name)}** ({info.size / 1024:.1f} KB; {how}). It is in the "
                "library: use it as one adapter here, or take it to AUTOMATIC1111 / ComfyUI.", gr.skip())

    @ui_errors
    def download_adapter(self, name: str):
        if not name:
            raise ConfigError("adapter: pick the adapter to download")
        out = self.studio.portable_file(name)
        files, note = self._with_embedding(name, with_user_metadata(out))
        return gr.update(value=[str(p) for p in files], visible=True), note

    def _with_embedding(self, name: str, files: list) -> tuple[list, str]:
        """A pivotal-tuned adapter's files plus its trigger's embedding alone (ComfyUI reads no bundled embedding),
        and a line saying what that file is for."""
        if not self.studio.library.info(name).embeddings:
            return files, ""
        emb = self.studio.library.export(name, "embedding")
        return [*files, emb], (f"`{html.escape(emb.name)}` is its trained trigger word, for ComfyUI's "
                               f"`models/embeddings` (write `embedding:{html.escape(emb.stem)}` in the prompt); "
                               "AUTOMATIC1111 reads it from the adapter file itself.")

    # ============================================================================================ layout
    def build(self) -> gr.Blocks:
        st = self.studio
        bases = self.base_names()
        names = self.adapter_names()
        with gr.Blocks(title="LoRA Studio", analytics_enabled=False) as demo:
            gr.Markdown(
                "# LoRA Studio\nTrain a LoRA adapter on a few images, then generate with it. "
                f"Base model: **{html.escape(bases[0])}** · adapters in `{html.escape(str(st.library.root))}`",
                elem_id="ls-header")
            job_id = gr.State(None)  # the page's own job (Stop acts on it)
            view_id = gr.State(None)  # a run picked to view instead (None: the page's own)
            seen = gr.State({})
            done_marker = gr.State(None)
            ds_id = gr.State(None)
            pending = gr.State(None)  # a form waiting for the name-in-use choice
            last_trigger = gr.State("sks")
            gen_paths = gr.State([])
            picked = gr.State(0)  # the gallery image last clicked
            last_seed = gr.State(None)

            # ---------------------------------------------------------------------------------- Train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=3, min_width=420):
                        gr.Markdown("**1. Images** — drop 4–30 images of one concept or style (captions in "
                                    "same-named `.txt` files are read) or a `.zip` of a dataset folder (kohya's "
                                    "`10_name` folders count 10 times), or start from a shipped sample set.")
                        sample_set = gr.Dropdown([NO_SAMPLE_SET] + st.sample_sets(), value=NO_SAMPLE_SET,
                                                 label="Sample set", elem_id="sample-set")
                        uploads = gr.File(file_count="multiple",
                                          label="Upload images (and .txt captions), or a .zip of a dataset folder",
                                          elem_id="train-upload", height=140)
                        thumbs = gr.Gallery(label="Will be trained on", columns=6, height=230,
                                            object_fit="contain", elem_id="train-thumbs", allow_preview=True)
                        skipped = gr.Markdown("", elem_id="train-skipped")
                        captions = gr.Dataframe(headers=CAPTION_COLUMNS, value=_df([], CAPTION_COLUMNS),
                                                label="Captions (editable; the trigger word is inserted)",
                                                interactive=True, static_columns=[0], wrap=True, max_height=260,
                                                column_widths=["22%", "78%"], elem_id="train-captions")
                        with gr.Accordion("Edit every caption (add, remove or replace tags)", open=False,
                                          elem_id="caption-tools"):
                            with gr.Row(equal_height=True):
                                cap_tags = gr.Textbox(label="Tags (comma-separated)", scale=3,
                                                      placeholder="e.g. smiling, outdoors", elem_id="cap-tags")
                                cap_front = gr.Button("Add after the trigger", scale=1, elem_id="cap-front")
                                cap_end = gr.Button("Add at the end", scale=1, elem_id="cap-end")
                                cap_remove = gr.Button("Remove", scale=1, elem_id="cap-remove")
                            with gr.Row(equal_height=True):
                                cap_find = gr.Textbox(label="Find", scale=2, elem_id="cap-find")
                                cap_repl = gr.Textbox(label="Replace with", scale=2, elem_id="cap-replace-with")
                                cap_replace = gr.Button("Replace", scale=1, elem_id="cap-replace")
                            cap_counts = gr.Markdown("", elem_id="cap-counts")
                    with gr.Column(scale=2, min_width=360):
                        gr.Markdown("**2. Adapter**")
                        with gr.Row(equal_height=True, elem_classes=["ls-fields"]):
                            name = gr.Textbox("my-lora", label="Name", elem_id="train-name")
                            trigger = gr.Textbox("sks", label="Trigger word", elem_id="train-trigger",
                                                 info="a rare word that will mean your concept/style")
                        preset = gr.Radio(list(PRESETS), value="concept", label="Preset", elem_id="train-preset",
                                          info="concept: a thing (text encoder and UNet convolutions too) · "
                                               "style: a look (attention only) · embedding: the trigger word "
                                               "alone (textual inversion, no LoRA) · custom: your own values")
                        train_base = gr.Dropdown(bases, value=bases[0], label="Base model", elem_id="train-base")
                        gr.Markdown("Every other option is in **Advanced**, further down the page.",
                                    elem_id="train-advanced-hint")
                        with gr.Accordion("Saved settings: load an earlier adapter's, or save these", open=False,
                                          elem_id="train-settings"):
                            with gr.Row(equal_height=True):
                                settings_src = gr.Dropdown(self.settings_sources(), value=None, scale=3,
                                                           label="Settings of an earlier adapter",
                                                           elem_id="train-settings-from")
                                settings_load = gr.Button("Load", scale=1, min_width=80, elem_id="train-settings-load")
                            with gr.Row():
                                settings_up = gr.UploadButton("Load a .toml (or kohya_ss .json) file…",
                                                              file_types=[".toml", ".json"], size="sm",
                                                              elem_id="train-settings-file")
                                settings_save = gr.Button("Save these settings (.toml)", size="sm",
                                                          elem_id="train-settings-save")
                            settings_file = gr.File(label="Settings file", visible=False, interactive=False,
                                                    elem_id="train-settings-download")
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="train-start")
                            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                        train_msg = gr.HTML("", elem_id="train-message")
                        with gr.Group(visible=False, elem_id="train-name-choice") as choice_box:
                            choice_md = gr.HTML("", elem_id="train-choice-text")
                            with gr.Row():
                                choice_resume = gr.Button("Resume it", variant="primary", min_width=100,
                                                          elem_id="train-choice-resume")
                                choice_over = gr.Button("Overwrite", variant="stop", min_width=100,
                                                        elem_id="train-choice-overwrite")
                                choice_new = gr.Button("Start under a new name", min_width=140,
                                                       elem_id="train-choice-new")
                                choice_cancel = gr.Button("Cancel", min_width=80, elem_id="train-choice-cancel")
                        run_pick = gr.Dropdown([], value=None, label="Run (pick an earlier one to see its loss and "
                                               "samples again)", elem_id="train-run-pick")
                        status = gr.HTML(self.status_html(None), elem_id="train-status")
                        with gr.Row(equal_height=True, elem_id="train-continue"):
                            resume_btn = gr.Button("Resume", variant="primary", visible=False, min_width=100,
                                                   elem_id="train-resume")
                            more_steps = gr.Number(100, precision=0, label="More steps", visible=False, min_width=100,
                                                   elem_id="train-more-steps")
                            more_btn = gr.Button("Train 100 more steps", visible=False, min_width=160,
                                                 elem_id="train-more")
                        loss_plot = gr.LinePlot(_loss_df([]), x="step", y="loss", title="Loss",
                                                x_axis_format="d",
                                                height=200, elem_id="train-loss")
                        samples = gr.Gallery(label="Samples", columns=4, height=180, object_fit="contain",
                                             elem_id="train-samples")
                # the whole width: a section per group of options, several fields side by side
                with gr.Accordion("Advanced: every training option", open=False, elem_id="train-advanced"):
                    gr.Markdown("An empty box means *unset* (each field's help says what that means; for a number "
                                "that cannot be 0, 0 means unset too). The preset fills the values it sets.",
                                elem_id="adv-hint")
                    adv, prior = self._advanced_widgets("concept", self.base_preset_family(None))
                timer = gr.Timer(POLL_S)

            # ---------------------------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row(equal_height=True):
                            base = gr.Dropdown(bases, value=bases[0], label="Base model", scale=4, min_width=240,
                                               elem_id="gen-base")
                            vae = gr.Dropdown(st.vae_choices(), value=AUTOMATIC, label="VAE", scale=2, min_width=150,
                                              elem_id="gen-vae")
                            refresh_btn = gr.Button("↻ Refresh lists", scale=1, size="sm", min_width=120,
                                                    elem_id="gen-refresh")
                        gr.Markdown("**Adapters** — enable, weight −2…2; tick *TE* for a separate text-encoder "
                                    "weight, *steps* to let the adapter act on part of the sampler's steps only "
                                    "(from step N, counting from 0; e.g. a style from the middle on keeps the "
                                    "base's layout; an adapter whose model card suggests a start comes with it "
                                    "ticked). `<lora:name:w>` and `<lora:name:w:start=N:stop=M>` in the "
                                    "prompt work too, with weights −10…10, and block weights as the LoRA Block "
                                    "Weight extension takes them: `<lora:name:1:lbw=OUTALL>` (a preset, or 17 "
                                    "numbers; SDXL 12).")
                        slot_widgets: list[gr.components.Component] = []
                        name_dds, enable_cbs, slot_pickers = [], [], []
                        for i in range(SLOTS):
                            with gr.Row(equal_height=True):
                                # min widths make a narrow window wrap a row onto two lines instead of
                                # clipping its controls
                                dd = gr.Dropdown(names, value=None, label=f"Adapter {i + 1}", scale=3, min_width=180,
                                                 elem_id=f"slot-{i}-name")
                                en = gr.Checkbox(True, label="on", scale=0, min_width=70, elem_id=f"slot-{i}-on")
                                wt = gr.Slider(SLIDER_MIN, SLIDER_MAX, value=1.0, step=0.05, label="weight", scale=3,
                                               min_width=200, elem_id=f"slot-{i}-weight")
                                sep = gr.Checkbox(False, label="TE", scale=0, min_width=70, elem_id=f"slot-{i}-sep")
                                tw = gr.Slider(SLIDER_MIN, SLIDER_MAX, value=1.0, step=0.05,
                                               label="text-encoder weight", scale=3, min_width=200, visible=False,
                                               elem_id=f"slot-{i}-te")
                                rng = gr.Checkbox(False, label="steps", scale=0, min_width=80,
                                                  elem_id=f"slot-{i}-ranged")
                            # the step range on a line of its own: the row above keeps its width
                            with gr.Row(equal_height=True, visible=False, elem_id=f"slot-{i}-steps") as step_row:
                                step_from = gr.Number(0, precision=0, minimum=0, label=START_LABEL,
                                                      scale=1, min_width=140, elem_id=f"slot-{i}-start")
                                step_to = gr.Number(0, precision=0, minimum=0, label="up to step (0 = last)",
                                                    scale=1, min_width=140, elem_id=f"slot-{i}-stop")
                            card_start = gr.State(None)  # the start the adapter's model card gave this row
                            slot_pickers.append((dd, rng, step_from, step_to, card_start))
                            sep.change(lambda v: gr.update(visible=bool(v)), sep, tw, show_progress="hidden")
                            rng.change(lambda v: gr.update(visible=bool(v)), rng, step_row, show_progress="hidden")
                            slot_widgets += [dd, en, wt, sep, tw, rng, step_from, step_to]
                            name_dds.append(dd)
                            enable_cbs.append(en)
                        triggers = gr.Radio([], label="Trigger words of the selected adapters (click to insert)",
                                            interactive=True,
                                            elem_id="gen-triggers")
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt",
                                            placeholder="a red sks on a white background   (red:1.3), [red:blue:0.5], "
                                                        "[red|blue], BREAK and <lora:name:0.8> work as in "
                                                        "AUTOMATIC1111; {a|b} and "
                                                        "__wildcard__ as in its Dynamic Prompts")
                        prompt_tokens = gr.Markdown("", elem_id="gen-prompt-tokens", elem_classes=["ls-tokens"])
                        negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
                        negative_tokens = gr.Markdown("", elem_id="gen-negative-tokens", elem_classes=["ls-tokens"])
                        with gr.Row():
                            emb_pick = gr.Dropdown(st.embedding_names(), value=None, scale=3, min_width=200,
                                                   label="Embeddings (textual inversion)",
                                                   info=f"files in {st.embeddings_dir}; their names work in "
                                                        "either prompt", elem_id="gen-emb")
                            with gr.Column(scale=1, min_width=130):
                                emb_to_prompt = gr.Button("Add to prompt", size="sm", elem_id="gen-emb-prompt")
                                emb_to_negative = gr.Button("Add to negative", size="sm", elem_id="gen-emb-negative")
                        with gr.Row():
                            style_pick = gr.Dropdown(st.style_names(), value=[], multiselect=True, scale=3,
                                                     min_width=200, label="Styles",
                                                     info=f"saved prompts in {st.styles_file} (AUTOMATIC1111's "
                                                          "styles.csv works as it is)", elem_id="gen-styles")
                            with gr.Column(scale=1, min_width=130):
                                style_apply = gr.Button("Apply to the prompts", size="sm", elem_id="gen-style-apply")
                        with gr.Row():
                            wc_pick = gr.Dropdown(st.wildcard_names(), value=None, scale=3, min_width=200,
                                                  label="Wildcards (dynamic prompts)",
                                                  info=f"files in {st.wildcards_dir}, a choice a line; Add puts the "
                                                       "file's word in the prompt, drawn for each image, as {a|b|c} "
                                                       "is",
                                                  elem_id="gen-wildcards")
                            with gr.Column(scale=1, min_width=130):
                                wc_add = gr.Button("Add to prompt", size="sm", elem_id="gen-wildcard-add")
                                combinatorial = gr.Checkbox(False, label="Every combination",
                                                            info="one image each, up to Images",
                                                            elem_id="gen-combinatorial")
                                fixed_seed = gr.Checkbox(False, label="Same seed for all", elem_id="gen-fixed-seed")
                        with gr.Accordion("Save the prompts as a style", open=False, elem_id="gen-style-box"):
                            with gr.Row():
                                style_name = gr.Textbox(label="Style name", scale=3, elem_id="gen-style-name",
                                                        placeholder="e.g. outline look")
                                style_save = gr.Button("Save as a style", size="sm", scale=1,
                                                       elem_id="gen-style-save")
                        with gr.Row():
                            steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                            guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance (CFG)",
                                                 elem_id="gen-guidance")
                            scheduler = gr.Dropdown(list(SCHEDULERS), value="DPM++ 2M Karras", label="Sampler",
                                                    min_width=180, elem_id="gen-scheduler")
                            clip_skip = gr.Number(1, precision=0, minimum=1, maximum=12, label="Clip skip",
                                                  info="2 for anime models", min_width=100, elem_id="gen-clip-skip")
                        with gr.Row():
                            seed = gr.Number(-1, label="Seed (−1 = random)", precision=0, scale=2, elem_id="gen-seed")
                            with gr.Column(scale=1, min_width=120):
                                reuse = gr.Button("♻ Reuse last seed", size="sm", elem_id="gen-reuse-seed")
                                rand = gr.Button("Random seed", size="sm", elem_id="gen-random-seed")
                        with gr.Accordion("Variation seed: variations of one picture", open=False,
                                          elem_id="gen-variation") as var_acc:
                            with gr.Row():
                                subseed = gr.Number(-1, label="Variation seed (−1 = random)", precision=0,
                                                    elem_id="gen-subseed")
                                subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                                             info="0: off; the images share the seed and take "
                                                                  "variation seeds N, N+1… (A1111's Extra)",
                                                             elem_id="gen-subseed-strength")
                        with gr.Accordion("CFG rescale, noise schedule: for v-prediction models", open=False,
                                          elem_id="gen-vpred") as vpred_acc:
                            with gr.Row():
                                cfg_rescale = gr.Slider(0, 1, value=0, step=0.05, label="CFG rescale",
                                                        info="0: off; about 0.7 keeps v-prediction and zero-terminal-"
                                                             "SNR models from burning at high CFG",
                                                        elem_id="gen-cfg-rescale")
                                zsnr = gr.Checkbox(False, label="Zero terminal SNR",
                                                   info="sample on the zero-SNR schedule (A1111's Noise schedule); "
                                                        "a model marked ztsnr does anyway", elem_id="gen-zsnr")
                        with gr.Row():
                            width = gr.Number(0, label="Width (0 = model's)", precision=0, step=8, minimum=0,
                                              elem_id="gen-width")
                            height = gr.Number(0, label="Height (0 = model's)", precision=0, step=8, minimum=0,
                                               elem_id="gen-height")
                            num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-n")
                            batch_size = gr.Number(0, label="Batch size (0 = all at once)", precision=0, minimum=0,
                                                   maximum=64, min_width=110, elem_id="gen-batch-size",
                                                   info="fewer at a time: less GPU memory")
                            with gr.Column(min_width=120):
                                fuse = gr.Checkbox(False, label="Fuse adapters (faster)", elem_id="gen-fuse")
                                tiling = gr.Checkbox(False, label="Tiling (seamless)", elem_id="gen-tiling")
                        with gr.Accordion("Hires fix: draw it again larger", open=False, elem_id="gen-hires") as hires_acc:
                            with gr.Row():
                                hires_scale = gr.Slider(1, 4, value=1, step=0.25, label="Upscale by (1 = off)",
                                                        elem_id="gen-hires-scale")
                                hires_upscaler = gr.Dropdown(list(HIRES_UPSCALERS), value="Latent", label="Upscaler",
                                                             elem_id="gen-hires-upscaler")
                            with gr.Row():
                                hires_steps = gr.Number(0, precision=0, minimum=0, label="Hires steps (0 = as Steps)",
                                                        elem_id="gen-hires-steps")
                                hires_denoise = gr.Slider(0.05, 1, value=0.7, step=0.05, label="Denoising strength",
                                                          elem_id="gen-hires-denoise")
                        with gr.Accordion("Start from an image (img2img)", open=False, elem_id="gen-img2img") as i2i_acc:
                            with gr.Row():
                                init_image = gr.ImageEditor(
                                    type="pil", label="Starting image", sources=["upload", "clipboard"], height=320,
                                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                                    transforms=(), layers=False, elem_id="gen-init-image")
                                with gr.Column(min_width=160):
                                    init_strength = gr.Slider(0.05, 1, value=0.75, step=0.05,
                                                              label="Denoising strength",
                                                              info="how much is drawn anew (the picture is "
                                                                   "stretched to the width and height); paint "
                                                                   "over a part with the brush to draw only "
                                                                   "that anew (inpainting)",
                                                              elem_id="gen-init-strength")
                                    mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur (px)",
                                                          info="softens the painted area's edge",
                                                          elem_id="gen-mask-blur")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="gen-go", scale=4)
                            interrupt_btn = gr.Button("Interrupt", elem_id="gen-interrupt", scale=1, min_width=100)
                        with gr.Accordion("Save the stack as one adapter", open=False, elem_id="gen-bake-acc"):
                            gr.Markdown("The enabled rows and the prompt's `<lora:…>` tags, at their weights (and "
                                        "block weights), merged into ONE adapter file in the library: exact (the "
                                        "ranks add up), or at a rank of your choosing (its best approximation).")
                            with gr.Row(equal_height=True):
                                bake_name = gr.Textbox(label="Name", scale=3, elem_id="gen-bake-name")
                                bake_rank = gr.Number(0, label="Rank (0: exact)", precision=0, minimum=0, scale=1,
                                                      elem_id="gen-bake-rank")
                            bake_btn = gr.Button("Save as one adapter", size="sm", elem_id="gen-bake")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(label="Results", columns=2, height=360, object_fit="contain",
                                             format="png", elem_id="gen-gallery")
                        gen_info = gr.Markdown("", elem_id="gen-info")
                        warn = gr.Markdown("", elem_id="gen-warning")
                        downloads = gr.File(label="Download PNGs (with their generation parameters)",
                                            file_count="multiple", interactive=False, elem_id="gen-files")
                        params = gr.Textbox(label="Parameters (AUTOMATIC1111 format)", lines=4, interactive=True,
                                            buttons=["copy"], elem_id="gen-params",
                                            placeholder="an image's generation parameters: paste them here, or "
                                                        "read them from the image")
                        with gr.Row():
                            open_png = gr.UploadButton("Read from an image…", size="sm", elem_id="gen-open-png",
                                                       file_types=[".png", ".jpg", ".jpeg", ".webp"])
                            recall_btn = gr.Button("Use these parameters", size="sm", elem_id="gen-recall")
                            to_init = gr.Button("Start from this image (img2img)", size="sm", elem_id="gen-to-init")
                        recall_info = gr.Markdown("", elem_id="gen-recall-info")
                with gr.Accordion("Compare: one prompt across adapter weights, start steps, checkpoints, CFG, "
                                  "steps, samplers or prompt words (grid)",
                                  open=False, elem_id="gen-compare"):
                    with gr.Row():
                        cmp_mode = gr.Radio(list(COMPARE_MODES), value="adapter weights", label="Across",
                                            elem_id="cmp-mode")
                        cmp_adapter = gr.Dropdown(names, value=None, label="Adapter", elem_id="cmp-adapter")
                        cmp_weights = gr.Textbox("0, 0.4, 0.8, 1.2", label="Weights", elem_id="cmp-weights")
                        cmp_run = gr.Dropdown(st.runs(), value=None, label="Run (checkpoints)", elem_id="cmp-run")
                    with gr.Row():
                        cmp_rows = gr.Dropdown(list(COMPARE_ROWS), value="none", label="Rows (a second axis)",
                                               info="A1111's X/Y plot: e.g. checkpoints across, weights down",
                                               elem_id="cmp-rows")
                        cmp_row_values = gr.Textbox("0.5, 1", label="Row values", elem_id="cmp-row-values")
                    with gr.Row():
                        cmp_z = gr.Dropdown(list(COMPARE_ROWS), value="none", label="Grids (a third axis)",
                                            info="A1111's X/Y/Z plot: one grid per value, one under the other",
                                            elem_id="cmp-z")
                        cmp_z_values = gr.Textbox("Euler a, DDIM", label="Third-axis values", elem_id="cmp-z-values")
                    cmp_go = gr.Button("Make grid", elem_id="cmp-go")
                    cmp_mode.change(self.compare_values_box, [cmp_mode, cmp_weights], cmp_weights,
                                    show_progress="hidden")
                    cmp_status = gr.Markdown("", elem_id="cmp-status")
                    with gr.Row():
                        cmp_image = gr.Image(label="Grid", type="filepath", interactive=False, format="png",
                                             elem_id="cmp-image")
                        cmp_file = gr.File(label="Download grid", interactive=False, elem_id="cmp-file")

            # ---------------------------------------------------------------------------------- Library
            with gr.Tab("Library", id="library"):
                with gr.Row():
                    with gr.Column(scale=3, min_width=520):
                        lib_hint = gr.Markdown("", elem_id="lib-hint")
                        cards = gr.Gallery(label="Adapters (click a card to select it)", columns=5, height=240,
                                           object_fit="contain", allow_preview=False, fit_columns=False,
                                           elem_id="lib-cards")
                        table = gr.Dataframe(headers=LIBRARY_COLUMNS, value=_df([], LIBRARY_COLUMNS),
                                             interactive=False, wrap=True, elem_id="lib-table")
                        details = gr.Markdown("", elem_id="lib-details")
                    with gr.Column(scale=2):
                        lib_pick = gr.Dropdown(names, value=None, label="Selected adapter", elem_id="lib-pick")
                        with gr.Row(equal_height=True):
                            new_name = gr.Textbox(label="New name", scale=3, elem_id="lib-new-name")
                            rename_btn = gr.Button("Rename", scale=1, elem_id="lib-rename")
                        with gr.Row():
                            export_btn = gr.Button("Export to kohya format", elem_id="lib-export")
                            download_btn = gr.Button("Download", elem_id="lib-download")
                            delete_btn = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
                        preview_btn = gr.Button("Use the picked Generate result as its preview", size="sm",
                                                elem_id="lib-preview")
                        with gr.Group(visible=False, elem_id="lib-confirm") as confirm_box:
                            confirm_md = gr.Markdown("")
                            with gr.Row():
                                confirm_yes = gr.Button("Yes, delete", variant="stop", elem_id="lib-delete-yes")
                                confirm_no = gr.Button("Cancel", elem_id="lib-delete-no")
                        with gr.Accordion("Make it smaller: resize to a lower rank", open=False,
                                          elem_id="lib-resize-acc"):
                            gr.Markdown("Each layer keeps its best approximation of the new rank (SVD, as kohya_ss' "
                                        "*Resize LoRA*). A share to keep picks per layer the fewest ranks that hold it "
                                        "(the rank is then the most). The copy goes into the library beside it.")
                            with gr.Row(equal_height=True):
                                resize_rank = gr.Number(8, label="New rank", precision=0, minimum=0, scale=1,
                                                        elem_id="lib-resize-rank")
                                resize_keep = gr.Number(0, label="or keep % of ‖ΔW‖² (0: off)", minimum=0,
                                                        maximum=100, scale=1, elem_id="lib-resize-keep")
                                resize_name = gr.Textbox(label="Name (default: NAME-rN)", scale=2,
                                                         elem_id="lib-resize-name")
                            resize_btn = gr.Button("Resize", elem_id="lib-resize")
                        with gr.Accordion("Extract a LoRA from a fine-tuned model", open=False,
                                          elem_id="lib-extract-acc"):
                            gr.Markdown("The difference between a fine-tuned checkpoint and the base it was tuned from, "
                                        "as a LoRA (kohya_ss' *Extract LoRA*): the UNet's transformer layers, its ResNet "
                                        "blocks with a conv rank, the text encoder when it changed. Both models "
                                        "come from the base model picker (put checkpoints in the models folder).")
                            with gr.Row():
                                extract_tuned = gr.Dropdown(bases, value=None, label="Fine-tuned model",
                                                            elem_id="lib-extract-tuned")
                                extract_base = gr.Dropdown(bases, value=bases[0], label="Its base model",
                                                           elem_id="lib-extract-base")
                            with gr.Row(equal_height=True):
                                extract_rank = gr.Number(32, label="Rank", precision=0, minimum=1,
                                                         elem_id="lib-extract-rank")
                                extract_keep = gr.Number(0, label="or keep % of ‖ΔW‖² (0: off)", minimum=0,
                                                         maximum=100, elem_id="lib-extract-keep")
                                extract_conv = gr.Number(0, label="Conv rank (0: off)", precision=0, minimum=0,
                                                         elem_id="lib-extract-conv")
                            with gr.Row(equal_height=True):
                                extract_name = gr.Textbox(label="Name", scale=3, elem_id="lib-extract-name")
                                extract_btn = gr.Button("Extract", scale=1, elem_id="lib-extract")
                        lib_file = gr.File(label="Files (the adapter; AUTOMATIC1111's .json with its trigger where "
                                                 "it has one)",
                                           file_count="multiple", interactive=False, visible=False, elem_id="lib-file")
                        lib_status = gr.Markdown("", elem_id="lib-status")
                        gr.Markdown("**Import** a LoRA from another tool (kohya_ss, AUTOMATIC1111, ComfyUI, "
                                    "diffusers): `.safetensors`, checked before it is added.")
                        import_file = gr.File(label="LoRA file (and its preview image, .json, .civitai.info if "
                                                    "you have them)", file_count="multiple",
                                              file_types=[".safetensors", ".pt", ".bin", ".ckpt", ".png", ".jpg",
                                                          ".jpeg", ".webp", ".json", ".info", ".md", ".txt"],
                                              height=120, elem_id="lib-import-file")
                        with gr.Row(equal_height=True):
                            import_name = gr.Textbox(label="Name (default: the file name)", scale=3,
                                                     elem_id="lib-import-name")
                            import_btn = gr.Button("Import", variant="primary", scale=1, elem_id="lib-import")
                with gr.Accordion("Embeddings (textual inversion): the words a prompt can name", open=False,
                                  elem_id="lib-emb-acc"):
                    gr.Markdown(f"The files of `{st.embeddings_dir}` (AUTOMATIC1111's `embeddings` folder, "
                                "ComfyUI's `models/embeddings`): a file's name is the word. Trained ones come with a "
                                "preview and a card.")
                    emb_table = gr.Dataframe(headers=EMBEDDING_COLUMNS, value=_df(self.embedding_rows(),
                                                                                   EMBEDDING_COLUMNS),
                                             interactive=False, wrap=True, elem_id="lib-emb-table")
                    with gr.Row(equal_height=True):
                        emb_lib_pick = gr.Dropdown(st.embedding_names(), value=None, label="Embedding", scale=2,
                                                   elem_id="lib-emb-pick")
                        emb_new_name = gr.Textbox(label="New name (one word)", scale=2, elem_id="lib-emb-new-name")
                        emb_rename_btn = gr.Button("Rename", scale=1, elem_id="lib-emb-rename")
                        emb_delete_btn = gr.Button("Delete…", variant="stop", scale=1, elem_id="lib-emb-delete")
                        emb_refresh_btn = gr.Button("Refresh", scale=1, elem_id="lib-emb-refresh")
                    with gr.Group(visible=False, elem_id="lib-emb-confirm") as emb_confirm_box:
                        emb_confirm_md = gr.Markdown("")
                        with gr.Row():
                            emb_confirm_yes = gr.Button("Yes, delete", variant="stop", elem_id="lib-emb-delete-yes")
                            emb_confirm_no = gr.Button("Cancel", elem_id="lib-emb-delete-no")
                    emb_status = gr.Markdown("", elem_id="lib-emb-status")

            # ---------------------------------------------------------------------------------- wiring
            refresh_inputs = [base, lib_pick, cmp_adapter, cmp_run, *name_dds]
            refresh_outputs = [cards, table, lib_hint, lib_pick, cmp_adapter, cmp_run, *name_dds]
            quiet = dict(show_progress="hidden")

            # train
            ds_outputs = [ds_id, thumbs, skipped, captions]
            upload_outputs = ds_outputs + [last_trigger, sample_set, trigger]
            uploads.upload(shown_in(self.stage_upload, upload_outputs, skipped), [uploads, trigger, preset, ds_id],
                           upload_outputs)
            preset_fields = [adv[f] for f in PRESET_FIELDS]
            sample_outputs = ds_outputs + [last_trigger, trigger, preset, name, uploads, *preset_fields]
            sample_set.input(shown_in(self.pick_sample_set, sample_outputs, skipped), [sample_set, ds_id],
                             sample_outputs)
            cap_inputs = [captions, cap_tags, cap_find, cap_repl, trigger]
            for btn, op in ((cap_front, "front"), (cap_end, "end"), (cap_remove, "remove"), (cap_replace, "replace")):
                btn.click(shown_in(functools.partial(self.edit_all_captions, op), [captions, cap_counts],
                                   cap_counts), cap_inputs, [captions, cap_counts])
            captions.change(self.caption_tags, captions, cap_counts, **quiet)
            trigger.blur(self.retrigger, [captions, last_trigger, trigger], [captions, last_trigger], **quiet)
            trigger.submit(self.retrigger, [captions, last_trigger, trigger], [captions, last_trigger], **quiet)
            rates = [adv["optimizer"], preset, train_base, adv["lr_unet"], adv["lr_text"]]
            for src in (preset, train_base):  # the preset's rates, then Prodigy's multipliers if it is chosen
                src.input(self.preset_defaults, [preset, train_base], preset_fields, **quiet).then(
                    self.optimizer_rates, rates, [adv["lr_unet"], adv["lr_text"]], **quiet)
            adv["optimizer"].input(self.optimizer_rates, rates, [adv["lr_unet"], adv["lr_text"]], **quiet)
            preset.input(self.recaption_for_preset, [captions, preset, trigger], captions, **quiet)
            # the whole form as one dict (a set of components: Gradio passes {component: value})
            self.form_widgets = {"images": ds_id, "captions": captions, "last_trigger": last_trigger, "name": name,
                                 "trigger": trigger, "preset": preset, "base": train_base, "prior": prior, **adv}
            settings_outputs = [*[self.form_widgets[f] for f in SETTINGS_FIELDS], train_msg]
            settings_load.click(shown_in(self.load_settings, settings_outputs, train_msg), [settings_src, train_base],
                                settings_outputs)
            settings_up.upload(shown_in(self.load_settings_file, settings_outputs, train_msg),
                               [settings_up, train_base], settings_outputs)
            settings_save.click(shown_in(by_name(self.save_settings, self.form_widgets), [settings_file, train_msg],
                                         train_msg), set(self.form_widgets.values()), [settings_file, train_msg])
            start_outputs = [job_id, status, train_msg, choice_box, choice_md, choice_resume, choice_new, pending,
                             name]
            start.click(shown_in(by_name(self.start_training, self.form_widgets), start_outputs, train_msg),
                        set(self.form_widgets.values()), start_outputs)
            for btn, handler in ((choice_resume, self.choose_resume), (choice_over, self.choose_overwrite),
                                 (choice_new, self.choose_new_name)):
                btn.click(shown_in(handler, start_outputs, train_msg), pending, start_outputs)
            choice_cancel.click(self.cancel_choice, None, [train_msg, choice_box, choice_md, pending], **quiet)
            stop.click(shown_in(self.stop_training, [status, train_msg], train_msg), [job_id, seen],
                       [status, train_msg])
            cont_outputs = [job_id, status, train_msg, resume_btn, more_steps, more_btn]
            resume_btn.click(shown_in(self.resume_shown, cont_outputs, train_msg), [job_id, seen], cont_outputs)
            more_btn.click(shown_in(self.train_more_shown, cont_outputs, train_msg), [job_id, seen, more_steps],
                           cont_outputs)
            more_steps.change(self.more_label, more_steps, more_btn, **quiet)
            timer.tick(self.poll, [job_id, seen, view_id],
                       [status, loss_plot, samples, seen, done_marker, resume_btn, more_steps, more_btn], **quiet)
            done_marker.change(self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet).then(
                self.refresh_embeddings, emb_pick, emb_pick, **quiet)  # a finished embedding run

            # generate
            trig_inputs = [w for i in range(SLOTS) for w in (name_dds[i], enable_cbs[i])]
            for w in trig_inputs:
                w.change(self.trigger_choices, trig_inputs, triggers, **quiet)
            triggers.select(self.insert_trigger, prompt, [prompt, triggers], **quiet)
            emb_to_prompt.click(self.insert_embedding, [prompt, emb_pick], prompt, **quiet)
            emb_to_negative.click(self.insert_embedding, [negative, emb_pick], negative, **quiet)
            style_apply.click(self.apply_styles, [prompt, negative, style_pick], [prompt, negative, style_pick],
                              **quiet)
            wc_add.click(self.insert_wildcard, [prompt, wc_pick], prompt, **quiet)
            style_save.click(self.save_style, [style_name, prompt, negative, style_pick],
                             [style_pick, style_name], **quiet)
            for dd, rng, step_from, step_to, card_start in slot_pickers:  # .input: a user's pick, not a refresh
                dd.input(self.slot_picked, [dd, steps], [rng, step_from, step_to, card_start], **quiet)
                dd.input(self.compare_default, [dd, cmp_adapter], cmp_adapter, **quiet)
            steps.input(self.steps_changed, [steps, *[w for dd, rng, f, _, c in slot_pickers for w in (dd, rng, f, c)]],
                        [w for _, _, f, _, c in slot_pickers for w in (f, c)], **quiet)
            base.change(self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            refresh_btn.click(self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet).then(
                self.refresh_bases, [base, train_base], [base, train_base], **quiet).then(
                self.refresh_vaes, vae, vae, **quiet).then(self.refresh_embeddings, emb_pick, emb_pick, **quiet).then(
                self.refresh_styles, style_pick, style_pick, **quiet).then(
                self.refresh_wildcards, wc_pick, wc_pick, **quiet).then(
                self.refresh_extract_models, [extract_tuned, extract_base], [extract_tuned, extract_base], **quiet)
            req_inputs = [prompt, negative, steps, guidance, seed, width, height, num_images, scheduler, clip_skip,
                          hires_scale, hires_steps, hires_upscaler, hires_denoise, init_image, init_strength,
                          mask_blur, vae]
            gen_outputs = [gallery, downloads, params, last_seed, gen_paths, warn, gen_info]
            assert len(req_inputs) == len(GENERATE_FORM)
            gen_inputs = [base, *req_inputs, fuse, combinatorial, fixed_seed, subseed, subseed_strength, tiling,
                          cfg_rescale, zsnr, batch_size, *slot_widgets]
            go.click(shown_in(self.generate_event, gen_outputs, gen_info), gen_inputs, gen_outputs)
            for box, count in ((prompt, prompt_tokens), (negative, negative_tokens)):
                box.change(self.token_counter, [base, box, steps], count, queue=False, show_progress="hidden",
                           trigger_mode="always_last")
                base.change(self.token_counter, [base, box, steps], count, queue=False, show_progress="hidden")
            # outside the queue: it must act while Generate holds its place in it
            interrupt_btn.click(self.studio.interrupt_generation, None, None, queue=False)
            prompt.submit(shown_in(self.generate_event, gen_outputs, gen_info), gen_inputs, gen_outputs)
            gallery.select(self.show_parameters, gen_paths, params, **quiet)
            gallery.select(self.picked_image, gen_paths, picked, **quiet)
            gallery.change(lambda: 0, None, picked, **quiet)  # a new batch: its first image until one is clicked
            to_init.click(self.start_from, [picked, gen_paths], [init_image, i2i_acc, recall_info], **quiet)
            open_png.upload(shown_in(self.read_image_parameters, [params, recall_info], recall_info), open_png,
                            [params, recall_info])
            recall_outputs = [prompt, negative, steps, guidance, scheduler, seed, width, height, clip_skip,
                              hires_scale, hires_steps, hires_upscaler, hires_denoise, hires_acc, vae, base,
                              *slot_widgets,
                              *[c for *_, c in slot_pickers], subseed, subseed_strength, var_acc, tiling,
                              cfg_rescale, zsnr, vpred_acc, recall_info]
            recall_btn.click(shown_in(self.recall_form, recall_outputs, recall_info), [params, base], recall_outputs)
            reuse.click(lambda s: s if s is not None else gr.skip(), last_seed, seed, **quiet)
            rand.click(lambda: -1, None, seed, **quiet)
            cmp_outputs = [cmp_image, cmp_file, last_seed, cmp_status]
            cmp_go.click(shown_in(self.compare_shown, cmp_outputs, cmp_status),
                         [cmp_mode, base, *req_inputs, cmp_adapter, cmp_weights, cmp_run, cmp_rows, cmp_row_values,
                          tiling, cfg_rescale, zsnr, cmp_z, cmp_z_values, *slot_widgets], cmp_outputs)

            # library
            lib_pick.change(self.adapter_details, lib_pick, details, **quiet)
            cards.select(self.select_card, None, lib_pick, **quiet)
            import_outputs = [lib_status, lib_pick, import_file, import_name]
            import_btn.click(shown_in(self.import_adapter, import_outputs, lib_status), [import_file, import_name],
                             import_outputs).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            rename_btn.click(shown_in(self.rename_adapter, [lib_status, lib_pick, new_name], lib_status),
                             [lib_pick, new_name], [lib_status, lib_pick, new_name]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            delete_btn.click(self.ask_delete, lib_pick, [confirm_box, confirm_md], **quiet)
            confirm_yes.click(shown_in(self.confirm_delete, [lib_status, confirm_box, lib_pick], lib_status),
                              lib_pick, [lib_status, confirm_box, lib_pick]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            confirm_no.click(self.cancel_delete, None, [confirm_box, lib_status], **quiet)
            emb_shown = [emb_table, emb_lib_pick, emb_pick]
            emb_rename_btn.click(shown_in(self.rename_embedding, [emb_status, *emb_shown, emb_new_name], emb_status),
                                 [emb_lib_pick, emb_new_name], [emb_status, *emb_shown, emb_new_name])
            emb_delete_btn.click(shown_in(self.ask_delete_embedding, [emb_confirm_box, emb_confirm_md, emb_status],
                                          emb_status), emb_lib_pick, [emb_confirm_box, emb_confirm_md, emb_status],
                                 **quiet)
            emb_confirm_yes.click(shown_in(self.delete_embedding, [emb_status, emb_confirm_box, *emb_shown],
                                           emb_status), emb_lib_pick, [emb_status, emb_confirm_box, *emb_shown])
            emb_confirm_no.click(lambda: (gr.update(visible=False), "Nothing deleted."), None,
                                 [emb_confirm_box, emb_status], **quiet)
            emb_refresh_btn.click(self.embeddings_shown, emb_lib_pick, emb_shown, **quiet)
            extract_btn.click(shown_in(self.extract_adapter, [lib_status, lib_pick], lib_status),
                              [extract_tuned, extract_base, extract_rank, extract_keep, extract_conv, extract_name],
                              [lib_status, lib_pick]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            preview_btn.click(shown_in(self.set_preview, [lib_status, lib_pick], lib_status),
                              [lib_pick, picked, gen_paths], [lib_status, lib_pick]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            bake_btn.click(shown_in(self.bake_stack, [gen_info, warn], gen_info),
                           [base, prompt, bake_name, bake_rank, *slot_widgets], [gen_info, warn]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            resize_btn.click(shown_in(self.resize_adapter, [lib_status, lib_pick], lib_status),
                             [lib_pick, resize_rank, resize_keep, resize_name], [lib_status, lib_pick]).success(
                self.refresh_adapters, refresh_inputs, refresh_outputs, **quiet)
            export_btn.click(shown_in(self.export_kohya, [lib_file, lib_status], lib_status), lib_pick,
                             [lib_file, lib_status])
            download_btn.click(shown_in(self.download_adapter, [lib_file, lib_status], lib_status), lib_pick,
                               [lib_file, lib_status]).success(None, None, None, js=DOWNLOAD_FIRST_FILE)

            # a reopened page shows the latest job and the current library
            demo.load(self.latest_job_id, None, job_id, **quiet).then(
                self.first_refresh, refresh_inputs, refresh_outputs, **quiet).then(
                self.settings_choices, None, settings_src, **quiet)
            done_marker.change(self.settings_choices, None, settings_src, **quiet)
            # a new job of the page's own (started, resumed, a reload's latest) is shown; a picked run only viewed
            job_id.change(lambda j: (None, self.run_choices(j)), job_id, [view_id, run_pick], **quiet)
            done_marker.change(self.run_choices, [job_id, view_id], run_pick, **quiet)
            run_pick.input(lambda v: v, run_pick, view_id, **quiet).then(
                lambda j, v: self.status_for(v if v is not None else j), [job_id, view_id], status, **quiet)
        self.demo = demo
        return demo


# ------------------------------------------------------------------------------------------------ launch
def theme():
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the app works offline
    return gr.themes.Soft(font=system, font_mono=["ui-monospace", "monospace"])


def import_pipelines() -> None:
    """diffusers' lazy imports are not thread-safe: the page's first refresh and a Generate clicked at once could
    see a half-imported module ("cannot import name 'StableDiffusionPipeline'"). What the handlers import is
    imported once, here, before the app serves."""
    from diffusers import (AutoencoderKL, AutoPipelineForImage2Image, AutoPipelineForInpainting,  # noqa: F401
                           StableDiffusionPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def launch(studio: Studio | None = None, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           auth: str | None = None, max_file_size: str | int = MAX_UPLOAD, prevent_thread_lock: bool = False,
           quiet: bool = False, inbrowser: bool = False) -> gr.Blocks:
    """Build and serve the app. Only the app's own output, library and dataset folders are served."""
    creds = check_launch_options(share, auth)
    studio = studio or Studio()
    import_pipelines()
    demo = StudioUI(studio).build()
    demo.queue(default_concurrency_limit=2)
    if host not in ("127.0.0.1", "localhost", "::1") and creds is None:
        log.warning("serving on %s without --auth: anyone on the network can use this app", host)
    demo.launch(
        server_name=host, server_port=port, share=share, auth=creds, max_file_size=max_file_size,
        allowed_paths=studio.served_paths(), show_error=False, ssr_mode=False, prevent_thread_lock=prevent_thread_lock,
        quiet=quiet, inbrowser=inbrowser, theme=theme(), css=CSS, footer_links=["gradio"],
    )
    return demo  # with prevent_thread_lock: demo.local_url, demo.close()


def main_ui(base: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
            auth: str | None = None, library: str | None = None, allow_pickle: bool = False,
            device: str | None = None) -> int:
    """`lora-studio ui ...` (and `lora-studio` with no arguments)."""
    check_launch_options(share, auth)  # refuse before loading anything
    studio = Studio(base=base, library=library, allow_pickle=allow_pickle, device=device)
    print(f"LoRA Studio: base model {studio.default_base_name}; adapters in {studio.library.root}; "
          f"outputs in {studio.outputs}")
    try:
        # quiet: gradio's own banner tells the user to edit `launch()`; ours names the command-line options
        demo = launch(studio, host=host, port=port, share=share, auth=auth, prevent_thread_lock=True, quiet=True)
    except OSError as e:  # e.g. the port is taken
        raise ConfigError(f"could not serve on {host}:{port} ({e}); pick another --port") from None
    print(f"Open {demo.local_url} in a browser (Ctrl-C stops the app)")
    if share:
        print(f"Public link: {demo.share_url}")
    elif host in ("127.0.0.1", "localhost", "::1"):
        print("Only this computer can reach it: --host 0.0.0.0 --auth user:password serves your network, "
              "--share --auth user:password a public link")
    import signal

    def _terminate(signum, frame):  # `kill`, systemd, docker stop: close as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    demo.block_thread()
    return 0


__all__ = ["StudioUI", "launch", "main_ui", "check_launch_options", "parse_auth", "ui_errors", "MAX_UPLOAD"]
