"""Prompt styles as AUTOMATIC1111 keeps them: `styles.csv`, one style per row (name, prompt, negative_prompt).

A style is a saved piece of prompt: quality words, a look, a LoRA tag with its trigger (`<lora:outline:0.8> ohwx
style`). Applying one merges it into the prompt and the negative prompt as A1111 does: a style text that holds
`{prompt}` takes the prompt in that place; any other is added after it, joined by ", ". Several styles apply in
order. A1111 users copy their `styles.csv` into `$LORA_STUDIO_HOME/styles.csv` (its own folder holds one beside
webui.py); the app's *Save as a style* adds rows to the same file.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .weights_io import atomic_write

STYLES_FILE = "styles.csv"
FIELDS = ("name", "prompt", "negative_prompt")  # A1111's header


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: str | os.PathLike) -> dict[str, Style]:
    """The styles of an A1111 `styles.csv` by name ({} when there is no such file). A file without A1111's `name`
    column is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"styles: cannot read {path} ({e})") from None
    rows = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    if rows.fieldnames is None:
        return {}
    if "name" not in rows.fieldnames:
        raise ConfigError(f"styles: {path} is not AUTOMATIC1111's styles.csv (its first row must name the columns "
                          f"name, prompt, negative_prompt; got {', '.join(rows.fieldnames)})")
    out = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            out[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return out


def _named(styles: dict[str, Style], name: str) -> str | None:
    """The key of the style called `name` in any case, or None."""
    return name if name in styles else next((k for k in styles if k.casefold() == str(name).casefold()), None)


def merge(text: str, style_text: str) -> str:
    """A1111's merge of a style's text into a prompt."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(p for p in (text.strip(), style_text.strip()) if p)


def apply_styles(prompt: str, negative: str, names, styles: dict[str, Style],
                 where: str | os.PathLike = STYLES_FILE) -> tuple[str, str]:
    """`prompt` and `negative` with the styles `names` merged in, in order; an unknown name is an error that names
    the file and the styles it has."""
    for name in names:
        key = _named(styles, name)
        if key is None:
            have = ", ".join(styles) or "none"
            raise ConfigError(f"style: no style '{name}' in {where} (it has: {have})")
        prompt = merge(prompt, styles[key].prompt)
        negative = merge(negative, styles[key].negative_prompt)
    return prompt, negative


def save_style(path: str | os.PathLike, style: Style, overwrite: bool = False) -> dict[str, Style]:
    """Add (or with `overwrite` replace) a style in `styles.csv`, written whole and atomically; returns the styles."""
    name = style.name.strip()
    if not name:
        raise ConfigError("style name: type a name for the style")
    if not (style.prompt.strip() or style.negative_prompt.strip()):
        raise ConfigError("style: the prompt and the negative prompt are both empty; nothing to save")
    path = Path(path)
    styles = read_styles(path)
    known = _named(styles, name)
    if known is not None and not overwrite:
        raise ConfigError(f"style name: a style called '{known}' already exists in {path}")
    styles.pop(known, None)
    styles[name] = Style(name, style.prompt, style.negative_prompt)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for s in styles.values():
        w.writerow((s.name, s.prompt, s.negative_prompt))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))
    return styles


__all__ = ["Style", "read_styles", "apply_styles", "merge", "save_style", "STYLES_FILE"]
