"""Dynamic prompts and wildcards, in the template language of AUTOMATIC1111's Dynamic Prompts extension.

A prompt may hold choices that are made anew for every image:

- `{red|green|blue}` one of the options; `{0.5::red|2::blue}` weighted (a missing weight is 1);
- `{2$$red|green|blue}` two different options joined by ", "; `{1-3$$ and $$a|b|c}` one to three joined by
  " and " (a bound left out is the least / most there is); `{2$$__colours__}` two different lines of a file;
- `__colours__` a line of `colours.txt` in the wildcards folder (`__people/names__` in a subfolder; `*`, `**` and
  `?` match several files; `.yaml` / `.json` files hold named lists, their keys the names). A line may itself
  hold choices and wildcards.
- `\\{`, `\\}` and `\\|` are the characters themselves.

Random mode draws image i's prompt from a generator seeded with its number in the batch, so a seed gives the same
prompts again; combinatorial mode makes every combination in turn (the extension's "Combinatorial generation"),
at most as many as images are asked for. The image records the prompt it was drawn with (so it can be made again
from its PNG) and the template (`Template`, as the extension's "Save template to metadata" writes it).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError

WILDCARDS_FOLDER = "wildcards"  # in the app's home, as the extension's WILDCARD_DIR
MAX_DEPTH = 20  # wildcards within wildcards: deeper is a file that names itself
_QUANTITY = re.compile(r"(\d*)(-?)(\d*)\$\$")
_WILDCARD = re.compile(r"__([~@]?)([\w\-./*?\[\]]+?)__")
_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)::")


# ---------------------------------------------------------------------------------------------- the template
@dataclass
class _Wildcard:
    pattern: str


@dataclass
class _Variant:
    options: list[tuple[float, list]]  # (weight, nodes)
    low: int = 1
    high: int | None = 1  # None: as many as there are
    sep: str = ", "


def has_syntax(text: str | None) -> bool:
    """Whether the text holds a choice or a wildcard (a prompt without either is used as it is)."""
    if not text:
        return False
    return any(not isinstance(n, str) for n in _parse(text))


def _parse(text: str) -> list:
    return _sequence(text, 0, top=True)[0]  # at the top a '|' or '}' is text


def _sequence(text: str, i: int, top: bool = False) -> tuple[list, int]:
    """Nodes from text[i:] up to an unescaped '|' or '}' of the enclosing variant (or the end)."""
    nodes: list = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            nodes.append("".join(buf))
            buf.clear()

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}|":
            buf.append(text[i + 1])
            i += 2
        elif c == "{":
            flush()
            node, i = _variant(text, i + 1)
            nodes.append(node)
        elif c in "|}" and not top:
            break
        elif c == "_" and (m := _WILDCARD.match(text, i)):
            flush()
            nodes.append(_Wildcard(m.group(2)))
            i = m.end()
        else:
            buf.append(c)
            i += 1
    flush()
    return nodes, i


def _variant(text: str, i: int) -> tuple[_Variant, int]:
    """A variant whose '{' ends at i: its quantity, separator and options, up to its '}'."""
    start = i
    low, high, sep = 1, 1, ", "
    if m := _QUANTITY.match(text, i):
        a, dash, b = m.groups()
        if a or b or dash:
            low = int(a) if a else 1
            high = (int(b) if b else None) if dash else low
            i = m.end()
            end = text.find("$$", i)
            brace = min((p for p in (text.find("|", i), text.find("}", i), text.find("{", i)) if p >= 0),
                        default=len(text))
            if 0 <= end < brace:  # {2$$ and $$a|b}: a separator of its own
                sep, i = text[i:end], end + 2
    options = []
    while True:
        weight = 1.0
        if w := _WEIGHT.match(text, i):
            weight, i = float(w.group(1)), w.end()
        nodes, i = _sequence(text, i)
        options.append((weight, nodes))
        if i >= len(text):
            raise ConfigError(f"prompt: the choice '{{{text[start:start + 40]}' has no closing '}}' (write \\{{ for "
                              "a brace itself)")
        if text[i] == "}":
            return _Variant(options, low, high, sep), i + 1
        i += 1  # '|'


# ---------------------------------------------------------------------------------------------- wildcard files
@dataclass
class Wildcards:
    """The wildcard files of a folder: `name` (its path without the extension, '/' between folders) → lines;
    a .yaml / .json file's named lists under their keys' path."""

    folder: Path | None
    _lists: dict[str, list[str]] | None = field(default=None, repr=False)

    @classmethod
    def at(cls, folder: str | os.PathLike | None) -> "Wildcards":
        return cls(Path(folder).expanduser() if folder is not None else None)

    def lists(self) -> dict[str, list[str]]:
        if self._lists is None:
            self._lists = _read_folder(self.folder) if self.folder is not None and self.folder.is_dir() else {}
        return self._lists

    def names(self) -> list[str]:
        return sorted(self.lists(), key=str.casefold)

    def values(self, pattern: str) -> list[str]:
        """The lines of every list the pattern names (exactly, else as a glob anywhere under the folder)."""
        lists = self.lists()
        want = pattern.strip("/").casefold()
        exact = [k for k in lists if k.casefold() == want]
        keys = exact or [k for k in sorted(lists) if fnmatch.fnmatchcase(k.casefold(), want)
                         or fnmatch.fnmatchcase(k.casefold(), "*/" + want)]
        if not keys:
            where = self.folder if self.folder is not None else "no wildcards folder"
            have = ", ".join(self.names()[:12]) or "none"
            raise ConfigError(f"prompt: no wildcard '__{pattern}__' in {where} (a file {pattern}.txt there, one "
                              f"choice a line; it has: {have})")
        out = [v for k in keys for v in lists[k]]
        if not out:
            raise ConfigError(f"prompt: the wildcard '__{pattern}__' has no lines ({', '.join(keys)})")
        return out


def _read_folder(folder: Path) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".txt", ".yaml", ".yml", ".json"):
            continue
        rel = path.relative_to(folder).with_suffix("").as_posix()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"wildcards: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
        if path.suffix.lower() == ".txt":
            lists[rel] = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            continue
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # the parsers' own errors: name the file
            raise ConfigError(f"wildcards: {path} is not valid {path.suffix[1:].upper()} ({e})") from None
        prefix = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
        _walk(data, prefix, lists)
    return lists


def _walk(data, prefix: str, lists: dict[str, list[str]]) -> None:
    """A structured file's lists under their keys' path (keys holding anything else are left out)."""
    if not isinstance(data, dict):
        return
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, list):
            lists.setdefault(name, []).extend(str(x).strip() for x in v if isinstance(x, (str, int, float))
                                              and str(x).strip())
        elif isinstance(v, dict):
            _walk(v, name + "/", lists)


# ---------------------------------------------------------------------------------------------- expanding
def _lines(wildcards: Wildcards, pattern: str, depth: int) -> list[str]:
    """A wildcard's lines, as written (each is parsed when it is used: a file may hold thousands)."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"prompt: wildcards nested more than {MAX_DEPTH} deep at '__{pattern}__' (a file that "
                          "names itself?)")
    return wildcards.values(pattern)


def _options(v: _Variant, wildcards: Wildcards, depth: int) -> list[tuple[float, list]]:
    """A variant's options; `{2$$__name__}` takes the wildcard's lines as its options (different lines)."""
    if len(v.options) == 1 and (v.low, v.high) != (1, 1):
        nodes = v.options[0][1]
        if len(nodes) == 1 and isinstance(nodes[0], _Wildcard):
            return [(1.0, _parse(line)) for line in _lines(wildcards, nodes[0].pattern, depth + 1)]
    return v.options


def _count_range(v: _Variant, n: int) -> tuple[int, int]:
    high = n if v.high is None else min(v.high, n)
    return min(v.low, high), high


def _draw(nodes: list, rng: random.Random, wildcards: Wildcards, depth: int = 0) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Wildcard):
            out.append(_draw(_parse(rng.choice(_lines(wildcards, node.pattern, depth + 1))), rng, wildcards,
                             depth + 1))
        else:
            options = list(_options(node, wildcards, depth))
            low, high = _count_range(node, len(options))
            picked = []
            for _ in range(rng.randint(low, high)):  # weighted, without putting back
                total = sum(w for w, _ in options)
                if total <= 0:
                    break
                x, acc = rng.uniform(0, total), 0.0
                k = len(options) - 1
                for j, (w, _) in enumerate(options):
                    acc += w
                    if x < acc:
                        k = j
                        break
                picked.append(_draw(options.pop(k)[1], rng, wildcards, depth))
            out.append(node.sep.join(picked))
    return "".join(out)


def _every(nodes: list, wildcards: Wildcards, depth: int = 0) -> Iterator[str]:
    """Every text the nodes make, the last choice changing fastest."""
    if not nodes:
        yield ""
        return
    head, rest = nodes[0], nodes[1:]
    for a in _every_one(head, wildcards, depth):
        for b in _every(rest, wildcards, depth):
            yield a + b


def _every_one(node, wildcards: Wildcards, depth: int) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, _Wildcard):
        for line in _lines(wildcards, node.pattern, depth + 1):
            yield from _every(_parse(line), wildcards, depth + 1)
    else:
        options = _options(node, wildcards, depth)
        low, high = _count_range(node, len(options))
        for k in range(max(low, 0), high + 1):
            for chosen in itertools.combinations(options, k):
                for parts in itertools.product(*[list(_every(o[1], wildcards, depth)) for o in chosen]):
                    yield node.sep.join(parts)


def draw(template: str, seed: int, wildcards: Wildcards) -> str:
    """One prompt from the template, the same for the same seed."""
    return _draw(_parse(template), random.Random(seed), wildcards)


def every(template: str, wildcards: Wildcards, limit: int) -> tuple[list[str], bool]:
    """The template's combinations in order, at most `limit`; and whether there were more."""
    got = list(itertools.islice(_every(_parse(template), wildcards), limit + 1))
    return got[:limit], len(got) > limit


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Plan:
    """The requests that make a templated request's images, in order, and what to say about them."""

    requests: list  # GenerationRequest
    templates: dict[str, str]  # the `parameters` keys to add: Template / Negative Template
    notes: list[str]

    @property
    def prompts(self) -> list[str]:
        return [t for r in self.requests for t in (r.prompt, r.negative_prompt)]


def plan(req, wildcards: Wildcards, combinatorial: bool = False, fixed_seed: bool = False) -> Plan:
    """Split `req` into requests of one drawn prompt each (consecutive images with the same prompt and seeds
    in a row stay one request). Image i's choices are drawn with seed req.seed + i, its picture with the same
    seed (or req.seed for all with `fixed_seed`). Without any choice in either prompt: `req` itself (with
    `fixed_seed`, one request an image)."""
    pos, neg = has_syntax(req.prompt), has_syntax(req.negative_prompt)
    n, notes = req.num_images, []
    if combinatorial and pos:
        prompts, more = every(req.prompt, wildcards, n)
        if more:
            notes.append(f"the prompt makes more than {n} combinations: the first {n} were drawn (ask for more "
                         "images to draw more)")
        n = len(prompts)
    elif pos:
        prompts = [draw(req.prompt, req.seed + i, wildcards) for i in range(n)]
    else:
        prompts = [req.prompt] * n
    negatives = ([draw(req.negative_prompt, req.seed + i + 7_919, wildcards) for i in range(n)] if neg
                 else [req.negative_prompt] * n)
    variation = req.subseed_strength > 0  # the images share the seed; their variation seeds count up
    seeds = [req.seed if fixed_seed or variation else req.seed + i for i in range(n)]
    groups: list[list[int]] = []
    for i in range(n):
        if (groups and not fixed_seed and (prompts[i], negatives[i]) == (prompts[groups[-1][0]], negatives[groups[-1][0]])):
            groups[-1].append(i)
        else:
            groups.append([i])
    requests = [replace(req, prompt=prompts[g[0]], negative_prompt=negatives[g[0]], seed=seeds[g[0]],
                        num_images=len(g), subseed=req.subseed + (0 if fixed_seed else g[0]) if variation
                        else req.subseed) for g in groups]
    templates = {}
    if pos:
        templates["Template"] = req.prompt
    if neg:
        templates["Negative Template"] = req.negative_prompt
    return Plan(requests, templates, notes)


def draw_once(req, wildcards: Wildcards):
    """`req` with its prompts' choices drawn once, by its seed (a grid's tiles all show one prompt); and the
    templates for its parameters."""
    p = plan(replace(req, num_images=1), wildcards)
    return replace(p.requests[0], num_images=req.num_images, seed=req.seed), p.templates


def run(p: Plan, make: Callable) -> list:
    """The plan's images: `make(request)` for each of its requests, the template recorded in each image."""
    from .generation import add_parameters

    images = []
    for r in p.requests:
        for img in make(r):
            if p.templates:
                add_parameters(img, p.templates)
            images.append(img)
    return images


__all__ = ["Wildcards", "WILDCARDS_FOLDER", "Plan", "draw", "draw_once", "every", "has_syntax", "plan", "run"]
