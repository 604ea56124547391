"""AUTOMATIC1111's prompt editing and alternation: a prompt that changes during sampling.

- `[from:to:when]` reads `from` until step `when`, then `to`; `[to:when]` adds `to` at `when`; `[from::when]`
  removes `from` at `when`. `when` with a decimal point is a share of the steps (`0.5`: half of them), without
  one a step number (`10`). They nest (`a [b:[c:d:8]:4]`).
- `[a|b|c]` alternates: step 1 reads `a`, step 2 `b`, step 3 `c`, step 4 `a` again, … (`[fe|]male`).
- Everything else (emphasis, escapes, BREAK) stays as written, for pipelines.prompts to read in each text.

A1111's rules, read in its `modules/prompt_parser.py` (the grammar and the schedule, 1.6 and later): the prompt
of sampler step i (0-based) is the first entry whose end step is ≥ i; a prompt that does not parse is one text
for every step; in a Hires fix's second pass a number counts on from the first pass (`25` with 20 first-pass
steps is the 5th second-pass step, `1.5` half the second pass) and an edit of the first pass has happened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*$")
_SPECIAL = "[]():|"


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list = field(default_factory=list)


@dataclass
class _Raw:  # emphasis kept as written: the brackets and what they hold
    open: str
    parts: list
    close: str
    weight: list | None = None


class _Fail(Exception):
    pass


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def plain(self) -> str:
        start = self.i
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "\\":
                if self.i + 1 == len(self.s):  # a lone backslash at the end: A1111's grammar has no place for it
                    raise _Fail
                self.i += 2
            elif c in _SPECIAL:
                break
            else:
                self.i += 1
        return self.s[start:self.i]

    def prompt(self) -> list:
        """A run of text and bracket constructs, up to `:`, `|`, `]`, `)` or the end; a construct inside that
        does not close fails the whole."""
        out: list = []
        while True:
            text = self.plain()
            if text:
                out.append(text)
            c = self.peek()
            if c in ("[", "("):
                out.append(self.construct())
            else:
                return out

    def construct(self):
        opener = self.s[self.i]
        self.i += 1
        first = self.prompt()
        c = self.peek()
        if opener == "(":
            if c == ")":
                self.i += 1
                return _Raw("(", first, ")")
            if c == ":":
                self.i += 1
                weight = self.prompt()
                if self.peek() == ")":
                    self.i += 1
                    return _Raw("(", first, ")", weight)
            raise _Fail
        if c == "]":
            self.i += 1
            return _Raw("[", first, "]")
        if c == "|":
            options = [first]
            while self.peek() == "|":
                self.i += 1
                options.append(self.prompt())
            if self.peek() != "]":
                raise _Fail
            self.i += 1
            return _Alternate(options)
        if c != ":":
            raise _Fail
        self.i += 1
        second_start = self.i
        second = self.prompt()
        c = self.peek()
        if c == "]":  # [to:when]
            m = _NUMBER.match(self.s[second_start:self.i])
            if not m:
                raise _Fail
            self.i += 1
            return _Scheduled(None, first, m.group(1))
        if c != ":":
            raise _Fail
        self.i += 1
        end = self.s.find("]", self.i)
        m = _NUMBER.match(self.s[self.i:end]) if end >= 0 else None
        if not m:
            raise _Fail
        self.i = end + 1
        return _Scheduled(first, second, m.group(1))

    def top(self) -> list:
        """The whole prompt: where a bracket construct does not parse, its opening character is text (A1111's
        grammar lets stray brackets and colons stand at the top level) and reading goes on after it."""
        out: list = []
        while self.i < len(self.s):
            text = self.plain()
            if text:
                out.append(text)
            if self.i >= len(self.s):
                break
            c = self.s[self.i]
            if c in "[(":
                start = self.i
                try:
                    out.append(self.construct())
                    continue
                except _Fail:
                    self.i = start
            if c == "|":  # outside any bracket A1111's grammar has no place for it: the prompt is one text
                raise _Fail
            out.append(c)
            self.i += 1
        return out


def _nodes(parts: list):
    for p in parts:
        if isinstance(p, _Scheduled):
            yield p
            yield from _nodes(p.before or [])
            yield from _nodes(p.after)
        elif isinstance(p, _Alternate):
            yield p
            for o in p.options:
                yield from _nodes(o)
        elif isinstance(p, _Raw):
            yield from _nodes(p.parts)
            yield from _nodes(p.weight or [])


def _render(parts: list, step: int) -> str:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, _Scheduled):
            out.append(_render(p.before or [], step) if step <= p.when else _render(p.after, step))
        elif isinstance(p, _Alternate):
            out.append(_render(p.options[(step - 1) % len(p.options)], step))
        else:
            weight = "" if p.weight is None else ":" + _render(p.weight, step)
            out.append(p.open + _render(p.parts, step) + weight + p.close)
    return "".join(out)


def schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """`prompt` as [(end step, text)]: the text reads from the previous entry's end step to its own. With
    `hires_steps`, the schedule of a Hires fix's second pass of that many steps after `steps` first-pass ones."""
    prompt = prompt or ""
    base = steps
    if hires_steps is not None:
        steps, int_offset, flt_offset = hires_steps, base, 1.0
    else:
        int_offset, flt_offset = 0, 0.0
    if not any(c in prompt for c in "[|"):
        return [(steps, prompt)]
    try:
        tree = _Parser(prompt).top()
    except _Fail:  # (a stray `|` or a lone final backslash)
        return [(steps, prompt)]
    ends = {steps}
    for node in _nodes(tree):
        if isinstance(node, _Scheduled):
            v = float(node.number)
            v = (v - flt_offset) * steps if "." in node.number else v - int_offset
            node.when = int(min(steps, max(v, -1.0)))  # (a huge number is the last step, as A1111's min)
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))
    return [(t, _render(tree, t)) for t in sorted(ends)]


def at_step(entries: list[tuple[int, str]], step: int) -> str:
    """The text of sampler step `step` (0-based): the first entry whose end step is ≥ it (A1111's rule, so step
    0 and step 1 read the same entry)."""
    for end, text in entries:
        if step <= end:
            return text
    return entries[-1][1]


__all__ = ["schedule", "at_step"]
