"""Labelled image grids (AUTOMATIC1111's X/Y plot): one prompt across adapter weights or checkpoints."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError, UnsafeNameError
from .generation import GeneratedImage, GenerationRequest, format_parameters, steps_of
from .library import check_name
from .stack import AdapterStack, StackEntry, _coerce, parse_lora_tags

MIN_CELL = 128  # small images (the toy model's 64 px) are enlarged so the grid stays readable


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` px: broken between words, and inside a word only when the word
    alone is wider (names such as 'my-very-long-adapter@step-600')."""
    lines: list[str] = []
    for word in text.split():
        cur = f"{lines[-1]} {word}" if lines else word
        if lines and _text_size(draw, cur, font)[0] <= width:
            lines[-1] = cur
            continue
        piece = ""
        for ch in word:
            if piece and _text_size(draw, piece + ch, font)[0] > width:
                lines.append(piece)
                piece = ""
            piece += ch
        lines.append(piece)
    return lines or [""]


def image_grid(
    images: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    min_cell: int = MIN_CELL,
) -> Image.Image:
    """Rows of images -> one RGB image with column labels on top and row labels on the left.

    Every cell is resized to the first image's size (enlarged with nearest-neighbour to at least
    `min_cell` px a side, so tiny images stay crisp).
    """
    rows = [list(r) for r in images if len(r)]
    if not rows:
        raise ValueError("image_grid: no images")
    ncols = max(len(r) for r in rows)
    w0, h0 = rows[0][0].size
    scale = max(1, -(-min_cell // max(1, min(w0, h0))))  # ceil
    cw, ch = w0 * scale, h0 * scale
    font = _font(max(12, min(cw, ch) // 9))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6
    # column titles wrap inside their own column (a long adapter name never runs into the next title)
    wrapped = [_wrap(probe, t, font, cw - 2 * pad) for t in col_labels[:ncols]]
    line_h = _text_size(probe, "Ag", font)[1] + 2
    top = (max(len(w) for w in wrapped) * line_h + 2 * pad) if col_labels else 0
    left = (max((_text_size(probe, t, font)[0] for t in row_labels), default=0) + 2 * pad) if row_labels else 0
    title_lines = _wrap(probe, title, font, left + ncols * cw - 2 * pad) if title else []
    title_h = (len(title_lines) * line_h + 2 * pad) if title else 0
    grid = Image.new("RGB", (left + ncols * cw, title_h + top + len(rows) * ch), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title_lines):  # the title wraps across the whole width
        tw, _ = _text_size(draw, line, font)
        draw.text(((grid.width - tw) // 2, pad + k * line_h), line, fill="black", font=font)
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            tw, _ = _text_size(draw, line, font)
            draw.text((left + c * cw + (cw - tw) // 2, title_h + pad + k * line_h), line, fill="black", font=font)
    for r, row in enumerate(rows):
        y = title_h + top + r * ch
        if r < len(row_labels):
            _, th = _text_size(draw, row_labels[r], font)
            draw.text((pad, y + (ch - th) // 2), row_labels[r], fill="black", font=font)
        for c, img in enumerate(row):
            cell = img.convert("RGB").resize((cw, ch), Image.NEAREST if scale > 1 else Image.LANCZOS)
            grid.paste(cell, (left + c * cw, y))
    return grid


# --------------------------------------------------------------------------------------------------
# comparison grids: one request across several stacks


@dataclass(frozen=True)
class GridColumn:
    """One column of a comparison grid: its label and the adapters applied (on top of the prompt's tags)."""

    label: str
    entries: tuple[StackEntry, ...] = ()
    changes: tuple[tuple[str, object], ...] = ()  # request settings this column sets (CFG scale, steps, sampler)


@dataclass
class GridResult:
    image: Image.Image  # the labelled grid (carries `parameters` in .info)
    parameters: str  # A1111-style text describing the whole grid
    columns: list[GridColumn]
    tiles: list[list[GeneratedImage]]  # [column][image]: the tiles at full resolution, each with its own parameters
    drawn: int | None = None  # interrupted (A1111's Interrupt): the tiles drawn, the rest are blank; None: all


def _columns(columns: Sequence[GridColumn | tuple]) -> list[GridColumn]:
    out = []
    for c in columns:
        if not isinstance(c, GridColumn):
            label, entries = c
            c = GridColumn(str(label), tuple(entries))
        out.append(GridColumn(c.label, tuple(_coerce(c.entries)), tuple(c.changes)))
    if not out:
        raise ConfigError("grid: nothing to compare (no columns)")
    return out


def _quote_free(text: str) -> str:
    return text.replace('"', "'").replace("|", "/")


def weight_rows(weights: Sequence[float]) -> list[GridColumn]:
    """A second axis of weights: each row sets the weight of the adapter each column compares (its checkpoint, its
    start step, the adapter of an 'adapters' column)."""
    if not weights:
        raise ConfigError("rows: give at least one weight, e.g. 0.5, 1")
    return [GridColumn(f"weight {float(w):g}", (), (("weight", float(w)),)) for w in weights]


def _combine(col: GridColumn, row: GridColumn, what: str = "rows") -> GridColumn:
    """The tile of column `col` in row `row` (A1111's X/Y plot): both axes' settings; a weight row sets the weight
    of the adapter the column compares (its last entry). `what` names the other axis in errors ('rows', 'z')."""
    mine, theirs = dict(col.changes), dict(row.changes)
    both = sorted(set(mine) & set(theirs))
    if both:
        axis = "second" if what == "rows" else "third"
        raise ConfigError(f"{what}: the columns vary {both[0].replace('_', ' ')} already; choose another {axis} axis")
    entries = col.entries
    if "weight" in theirs:
        if not entries or col.changes:
            raise ConfigError(f"{what}: weights vary the adapter each column compares; choose columns of "
                              "checkpoints, start steps or adapters")
        w = theirs.pop("weight")
        entries = entries[:-1] + (replace(entries[-1], weight=w, te_weight=None),)
    return GridColumn(f"{col.label} / {row.label}", entries, tuple(mine.items()) + tuple(theirs.items()))


def make_grid(
    stack: AdapterStack,
    req: GenerationRequest,
    columns: Sequence[GridColumn | tuple[str, Sequence[StackEntry | tuple | str]]],
    *,
    axis: str = "LoRA",
    on_progress: Callable[[int, int], None] | None = None,
    rows: Sequence[GridColumn] | None = None,
    row_axis: str = "",
    interrupt: Callable[[], bool] | None = None,
    zs: Sequence[GridColumn] | None = None,
    z_axis: str = "",
) -> GridResult:
    """Generate `req` (same prompt, same seed) once per column and compose ONE labelled image.

    Each column applies its entries plus the prompt's own `<lora:...>` tags (a column's entry wins over
    a tag of the same adapter). With several images per request, rows are seeds. The grid's
    `parameters` text is the request's, plus `Lora hashes` of every adapter used and `Grid`/`Grid stacks`
    (the column labels and each column's tags, ' | '-separated) so every tile can be reproduced.
    `interrupt` (A1111's Interrupt): when it returns True the tile being drawn stops after its current sampler
    step and the tiles not yet started stay blank (`Grid interrupted` in the parameters says how many were drawn).
    """
    if zs:  # a third axis (A1111's X/Y/Z plot): one X/Y grid per value, one under the other
        return _xyz_grid(stack, req, _columns(columns), list(rows or []), list(zs), axis, row_axis, z_axis,
                         on_progress, interrupt)
    if rows:  # a second axis: one image a tile, row by row
        if req.num_images != 1:
            raise ConfigError("rows: with a second axis each tile is one image; set the number of images to 1")
        return _xy_grid(stack, req, _columns(columns), list(rows), axis, row_axis, on_progress, interrupt)
    cols = _columns(columns)
    col_reqs, col_tags = [], []  # each column's request (a bad setting is refused up front) and prompt tags
    for col in cols:
        changes = {k: v for k, v in col.changes if k != "prompt_sr"}
        prompt, negative = _column_prompts(col, req.prompt, req.negative_prompt)
        clean, tagged = parse_lora_tags(prompt)  # a swapped word may be in a <lora:…> tag: parsed per column
        col_reqs.append(replace(req, prompt=clean, negative_prompt=negative, **changes))
        col_tags.append(tagged)
    counts = [steps_of(r) for r in col_reqs]  # a Hires or img2img pass counts too
    total = sum(counts)
    tiles: list[list[GeneratedImage]] = []
    stacks: list[tuple[StackEntry, ...]] = []
    drawn: int | None = None  # interrupted: the tiles drawn (the last of them maybe in part)
    for i, (col, col_req, tagged) in enumerate(zip(cols, col_reqs, col_tags)):
        names = {e.name.casefold() for e in col.entries}
        entries = tuple(t for t in tagged if t.name.casefold() not in names) + col.entries

        def progress(step: int, _per_tile: int, before: int = sum(counts[:i])) -> None:
            if on_progress is not None:
                on_progress(before + step, total)

        stacks.append(entries)
        if tiles and interrupt is not None and interrupt():  # the first tile always starts: there is a picture
            drawn = drawn or len(tiles)
            tiles.append([replace(t, image=Image.new("RGB", t.image.size, UNDRAWN), interrupted=0) for t in tiles[0]])
            continue
        tiles.append(stack.generate(col_req, entries, on_progress=progress, interrupt=interrupt))
        if tiles[-1][0].interrupted is not None:
            drawn = len(tiles)
    rows = [[col[r].image for col in tiles] for r in range(len(tiles[0]))]
    labels = [c.label for c in cols]
    row_labels = [f"seed {img.seed}" for img in tiles[0]] if len(rows) > 1 else []
    # adapters that every column has alike are no column's label: the title names them
    common = [e for e in stacks[0] if all(e in s for s in stacks[1:])] if len(stacks) > 1 else []
    title = ("in every tile: " + " ".join(e.tag() for e in common)) if common else ""
    grid = image_grid(rows, labels, row_labels, title=title)

    used: dict[str, StackEntry] = {}
    for entries in stacks:
        for e in entries:
            used.setdefault(e.name.casefold(), e)
    extra = {}
    if used:
        extra["Lora hashes"] = stack.lora_hashes(list(used.values()))
    extra["Grid"] = f"{_quote_free(axis)}: " + " | ".join(_quote_free(lbl) for lbl in labels)
    extra["Grid stacks"] = " | ".join(" ".join(e.tag() for e in entries) or "none" for entries in stacks)
    settings = [[(k, v) for k, v in c.changes if k in SETTINGS] for c in cols]  # Prompt S/R: the labels say it
    if any(settings):  # each column's own settings, in the parameters' own words
        extra["Grid settings"] = " | ".join(
            "; ".join(f"{SETTINGS[k][0]} {v:g}" if isinstance(v, float) else f"{SETTINGS[k][0]} {v}"
                      for k, v in c) or "as above" for c in settings)
    if drawn is not None:
        extra["Grid interrupted"] = f"{drawn} of {len(cols)} tiles drawn"
    w, h = tiles[0][0].size or tiles[0][0].image.size  # the first pass's size (a Hires fix enlarges it)
    params = format_parameters(req, tiles[0][0].seed, w, h, stack.model, extra, subseed=tiles[0][0].subseed)
    grid.info["parameters"] = params
    return GridResult(grid, params, cols, tiles, drawn)


def _xy_grid(stack, req, cols: list[GridColumn], rows: list[GridColumn], axis: str, row_axis: str,
             on_progress, interrupt=None) -> GridResult:
    """Columns x rows: every combined tile drawn as one long row (its parameters name each tile's stack and
    settings, `Grid` labelling them "column, row"), then laid out row by row; `Grid rows` names the second axis."""
    from .generation import with_pairs

    flat = [_combine(c, r) for r in rows for c in cols]  # every combination checked before any is drawn
    g = make_grid(stack, req, flat, axis=f"{axis} / {row_axis}", on_progress=on_progress, interrupt=interrupt)
    n = len(cols)
    images = [[g.tiles[i * n + j][0].image for j in range(n)] for i in range(len(rows))]
    grid = image_grid(images, [c.label for c in cols], [r.label for r in rows])
    params = with_pairs(g.parameters, {"Grid rows": f"{_quote_free(row_axis)}: "
                                                    + " | ".join(_quote_free(r.label) for r in rows)})
    grid.info["parameters"] = params
    return GridResult(grid, params, flat, g.tiles, g.drawn)


def _xyz_grid(stack, req, cols: list[GridColumn], rows: list[GridColumn], zs: list[GridColumn], axis: str,
              row_axis: str, z_axis: str, on_progress, interrupt) -> GridResult:
    """A1111's X/Y/Z plot: for each value of the third axis, the X/Y grid of `cols` × `rows` with that value in
    every tile, the grids one under the other, each labelled with its value; `Grid z` names the third axis. Every
    combination is checked before any is drawn; after an Interrupt the later grids are left out."""
    from .generation import with_pairs

    plans = []  # per value: (columns, rows) of its X/Y grid, the value in every tile
    for z in zs:
        z_cols = [_combine(c, z, "z") for c in cols]  # (a setting the columns vary is refused here)
        if not rows:
            plans.append(([GridColumn(c.label, t.entries, t.changes) for c, t in zip(cols, z_cols)], None))
            continue
        z_rows = []
        for r in rows:  # the value joins each row (a weight from either then applies to the compared adapter)
            both = sorted(set(dict(r.changes)) & set(dict(z.changes)))
            if both:
                raise ConfigError(f"z: the rows vary {both[0].replace('_', ' ')} already; choose another third axis")
            z_rows.append(GridColumn(r.label, r.entries, r.changes + z.changes))
        for c in cols:
            for r in z_rows:
                _combine(c, r)  # every combination checked before any is drawn
        plans.append((cols, z_rows))
    grids: list[GridResult] = []
    for k, (plan, plan_rows) in enumerate(plans):
        progress = None if on_progress is None else (
            lambda done, total, k=k: on_progress(k * total + done, len(plans) * total))
        g = make_grid(stack, req, plan, axis=axis, rows=plan_rows, row_axis=row_axis, on_progress=progress,
                      interrupt=interrupt)
        grids.append(g)
        if g.drawn is not None or (interrupt is not None and k + 1 < len(plans) and interrupt()):
            break
    image = image_grid([[g.image] for g in grids], row_labels=[z.label for z in zs[:len(grids)]],
                       title=f"{z_axis}: " + ", ".join(z.label for z in zs))
    pairs = {"Grid z": f"{_quote_free(z_axis)}: " + " | ".join(_quote_free(z.label) for z in zs)}
    drawn = None
    if len(grids) < len(zs) or grids[-1].drawn is not None:
        drawn = sum(len(g.tiles) for g in grids[:-1]) + (grids[-1].drawn or len(grids[-1].tiles))
        pairs["Grid interrupted"] = f"{drawn} of {len(zs) * len(grids[0].tiles)} tiles drawn"
    first = re.sub(r", Grid interrupted: [^,\n]*", "", grids[0].parameters)  # counted over every grid below
    params = with_pairs(first, pairs)
    image.info["parameters"] = params
    columns = [replace(c, label=f"{c.label} / {z.label}") for g, z in zip(grids, zs) for c in g.columns]
    return GridResult(image, params, columns, [t for g in grids for t in g.tiles], drawn)


UNDRAWN = (64, 64, 64)  # the colour of a tile an Interrupt left out

# request settings a grid can vary (A1111's X/Y plot axes): field -> (its name in the parameters, column label)
SETTINGS = {"guidance": ("CFG scale", "CFG {:g}"), "steps": ("Steps", "{} steps"), "scheduler": ("Sampler", "{}")}


def setting_columns(field: str, values: Sequence, others: Sequence[StackEntry] = ()) -> list[GridColumn]:
    """One request setting across `values` (CFG scale, steps or sampler), the adapters in `others` in every
    column: A1111's X/Y plot with a settings axis."""
    if field not in SETTINGS:
        raise ConfigError(f"grid: cannot vary '{field}'; choose one of: {', '.join(SETTINGS)}")
    if not values:
        raise ConfigError(f"grid: give the {SETTINGS[field][0]} values to compare")
    from .generation import scheduler_name

    kind = {"guidance": float, "steps": int, "scheduler": scheduler_name}[field]
    fmt = SETTINGS[field][1]
    return [GridColumn(fmt.format(kind(v)), tuple(others), ((field, kind(v)),)) for v in values]


def settings_axis(kind: str, values: Sequence, req: GenerationRequest,
                  others: Sequence[StackEntry] = ()) -> tuple[list[GridColumn], str] | None:
    """A request-setting axis (SETTINGS) or Prompt S/R, as columns or as rows: its entries and its name; None for
    another kind of axis."""
    if kind in SETTINGS:
        return setting_columns(kind, values, others), SETTINGS[kind][0]
    if kind == "prompt_sr":
        return prompt_sr_columns(values, req.prompt, req.negative_prompt, others), "Prompt S/R"
    return None


def _column_prompts(col: GridColumn, prompt: str, negative: str) -> tuple[str, str]:
    """The prompt and negative prompt a column draws with: A1111's Prompt S/R swaps its word in both."""
    sr = dict(col.changes).get("prompt_sr")
    return (prompt.replace(*sr), negative.replace(*sr)) if sr else (prompt, negative)


def grid_prompts(req: GenerationRequest, columns: Sequence[GridColumn | tuple]) -> list[str]:
    """Every prompt and negative prompt the grid's columns draw with (the embeddings they name are loaded
    before the grid)."""
    return list(dict.fromkeys(t for col in _columns(columns) for t in _column_prompts(col, req.prompt,
                                                                                      req.negative_prompt)))


def split_values(text: str) -> list[str]:
    """A1111's comma-separated axis values: quotes keep a comma inside one ("red, glossy", blue)."""
    import csv

    try:
        return [v.strip() for v in next(csv.reader([text or ""], skipinitialspace=True), []) if v.strip()]
    except csv.Error as e:  # a line break typed into the box
        raise ConfigError(f"values: {e}; give them on one line, separated by commas") from None


def prompt_sr_columns(values: Sequence[str], prompt: str, negative: str = "",
                      others: Sequence[StackEntry] = ()) -> list[GridColumn]:
    """A1111's Prompt S/R axis: the first of `values` is found in the prompt (or the negative prompt) and each
    column swaps it for one of them (the first column is the prompt as it is); `others` in every column."""
    values = [str(v) for v in values if str(v)]
    if len(values) < 2:
        raise ConfigError("prompt S/R: give the word in the prompt, then what to swap it for, e.g. red, blue, green")
    if values[0] not in prompt and values[0] not in (negative or ""):
        raise ConfigError(f"prompt S/R: '{values[0]}' (the first value) is not in the prompt or the negative prompt")
    return [GridColumn(v, tuple(others), (("prompt_sr", (values[0], v)),)) for v in values]


def weight_columns(name: str, weights: Sequence[float], others: Sequence[StackEntry] = ()) -> list[GridColumn]:
    """One adapter across weights (other adapters fixed): columns labelled 'name w'. The adapter keeps its
    step range and a separately set text-encoder weight from `others` when it is there."""
    if not weights:
        raise ConfigError("weights: give at least one weight, e.g. 0,0.5,1")
    mine, rest = _split(name, others)
    return [GridColumn(f"{name} {float(w):g}", rest + (replace(mine, weight=float(w)),)) for w in weights]


def _split(name: str, others: Sequence[StackEntry], weight: float = 1.0) -> tuple[StackEntry, tuple]:
    """The entry of adapter `name` among `others` (or a new one at `weight`), and the others without it."""
    others = tuple(_coerce(others))
    mine = next((e for e in others if e.name.casefold() == name.casefold()), StackEntry(name, float(weight)))
    return mine, tuple(e for e in others if e is not mine)


def range_words(entry: StackEntry) -> str:
    """' acting from step 10' / ' acting up to step 8' / ' acting from step 2 to 8' / '' for every step (a share of
    the steps reads '40% of the steps')."""
    def at(v):
        return f"{v:.0%} of the steps" if isinstance(v, float) else f"step {v}"

    if entry.start and entry.stop is not None:
        if not entry.fractional:
            return f" acting from step {entry.start} to {entry.stop}"
        return f" acting from {at(entry.start)} to {at(entry.stop)}"
    if entry.start:
        return f" acting from {at(entry.start)}"
    return f" acting up to {at(entry.stop)}" if entry.stop is not None else ""


def start_columns(name: str, starts: Sequence[int], others: Sequence[StackEntry] = (),
                  weight: float = 1.0) -> list[GridColumn]:
    """One adapter acting from each of `starts` (sampler steps, 0 = every step) on, other adapters fixed:
    columns labelled 'from step N'. The adapter keeps its weights from `others` when it is there."""
    if not starts:
        raise ConfigError("starts: give at least one start step, e.g. 0, 5, 10")
    if len(starts) > 8:
        raise ConfigError("starts: at most 8 columns")
    mine, rest = _split(name, others, weight)
    return [GridColumn("every step" if int(n) == 0 else f"from step {int(n)}",
                       rest + (replace(mine, start=n, stop=None),)) for n in starts]


def adapter_columns(names: Sequence[str], weight: float = 1.0, others: Sequence[StackEntry] = ()) -> list[GridColumn]:
    """Several adapters, one at a time at the same weight: columns labelled by adapter name."""
    if not names:
        raise ConfigError("loras: give at least one adapter name")
    others = tuple(_coerce(others))
    out = []
    for n in names:
        rest = tuple(e for e in others if e.name.casefold() != n.casefold())
        out.append(GridColumn(n, rest + (StackEntry(n, float(weight)),)))
    return out


def run_checkpoints(library_root: str | os.PathLike, run: str) -> list[tuple[int, Path]]:
    """(step, adapter file) of every saved checkpoint of training run `run`, oldest first.

    Checkpoints live in <library>/runs/<run>/checkpoints/step-N/adapter.safetensors; the run name is
    checked like an adapter name, so it cannot escape the library.
    """
    run = check_name(run)
    root = Path(library_root).expanduser()
    run_dir = root / "runs" / run
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no training run called '{run}' in {root / 'runs'}")
    try:
        run_dir.resolve().relative_to(root.resolve())
    except ValueError:
        raise UnsafeNameError(f"run '{run}': links outside the library folder; refused") from None
    found = []
    for d in (run_dir / "checkpoints").glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / "adapter.safetensors").is_file():
            found.append((int(m.group(1)), d / "adapter.safetensors"))
    if not found:
        raise FileNotFoundError(f"run '{run}': no saved checkpoints in {run_dir / 'checkpoints'}")
    return sorted(found)


def checkpoint_columns(stack: AdapterStack, run: str, weight: float = 1.0, *, include_final: bool = True,
                       others: Sequence[StackEntry] = ()) -> list[GridColumn]:
    """The checkpoints of a training run (and its finished adapter, if in the library), loaded into `stack`.

    Each checkpoint is loaded under the name 'run@step-N' (once; a rewritten file is read again). When the run's
    adapter is among `others` (switched on in a row), its checkpoints take its place there, with its weights
    and step range.
    """
    if stack.library is None:
        raise ConfigError("checkpoints: no adapter library to find runs in")
    mine, rest = _split(run, others, weight)
    cols = []
    for step, path in run_checkpoints(stack.library.root, run):
        key = f"{run}@step-{step}"
        stack.load(key, path)
        cols.append(GridColumn(f"step {step}", rest + (replace(mine, name=key),)))
    if include_final and run.casefold() in {n.casefold() for n in stack.library.names()}:
        cols.append(GridColumn("final", rest + (replace(mine, name=run),)))
    return cols


__all__ = [
    "image_grid", "GridColumn", "GridResult", "make_grid", "weight_columns", "start_columns", "adapter_columns",
    "weight_rows", "settings_axis",
    "run_checkpoints",
    "checkpoint_columns",
]
