"""AUTOMATIC1111's prompt syntax: attention weights, prompts longer than 75 tokens, BREAK.

Prompts copied from model pages and from A1111's PNG Info use it almost always: `(masterpiece:1.2)`,
`((detailed))`, `[blurry]`, and more than CLIP's 75 tokens. diffusers reads the brackets as text and cuts a
long prompt at 77 tokens, so such a prompt gives another picture. Here, as in A1111:

- `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by 1.1, `(text:1.5)` sets 1.5;
  they nest and multiply; `\\(` `\\)` `\\[` `\\]` are the characters themselves; an unclosed bracket acts to the
  end of the prompt.
- The prompt is cut into chunks of 75 tokens (at the last comma of a chunk when it is within its last 20
  tokens), `BREAK` starts a new chunk, each chunk is encoded on its own (with BOS/EOS, padded to 77) and the
  chunks are joined along the sequence; the negative prompt is padded with empty chunks to the same count.
- Each token's embedding is multiplied by its weight, then the whole is scaled back to its unweighted mean.

Plain prompts of up to 75 tokens never come here: they keep diffusers' own encoding, bit for bit.
"""

from __future__ import annotations

import re

import torch

from .embeddings import expand

CHUNK = 75  # tokens of a chunk between its BOS and EOS
COMMA_BACKTRACK = 20  # a full chunk is cut after its last comma when that is among its last 20 tokens
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_SYNTAX = re.compile(r"[()\[\]]|\bBREAK\b")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (fragment, weight) pairs in order; ("BREAK", -1) where a BREAK stands. Neighbours of the same
    weight are merged."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, by: float) -> None:
        for item in out[start:]:
            if item[1] >= 0:
                item[1] *= by

    for m in _TOKENS.finditer(text):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif number is not None and round_open and _is_number(number):
            scale(round_open.pop(), float(number))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append(["BREAK", -1.0])
                out.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for item in out:
        if item[0] == "" and item[1] >= 0:
            continue
        if merged and merged[-1][1] == item[1] and item[1] >= 0:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:  # "(a:1.2.3)": the text stays as it is
        return False


def needs_syntax(tokenizer, prompt: str) -> bool:
    """Whether `prompt` reads differently under A1111's rules than as plain text: brackets, BREAK, or more
    tokens than one chunk holds."""
    if _SYNTAX.search(prompt or ""):
        return True
    return len(tokenizer(prompt or "", add_special_tokens=False, verbose=False).input_ids) > CHUNK


def chunks(tokenizer, prompt: str, convert=None) -> list[tuple[list[int], list[float]]]:
    """`prompt` as chunks of (77 token ids, 77 weights): BOS, up to 75 tokens, EOS, padding. `convert` rewrites
    each fragment's text before it is tokenized (an embedding's word into its tokens)."""
    comma = tokenizer(",", add_special_tokens=False).input_ids
    comma_id = comma[0] if len(comma) == 1 else None
    done: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    ws: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, ws, last_comma
        done.append((ids, ws))
        ids, ws, last_comma = [], [], -1

    for text, weight in parse_attention(prompt):
        if weight < 0:  # BREAK
            close()
            continue
        text = convert(text) if convert is not None else text
        for unit in _units(tokenizer, tokenizer(text, add_special_tokens=False, verbose=False).input_ids):
            if len(unit) > 1:  # an embedding's vectors stay in one chunk (as A1111 keeps them)
                if len(ids) + len(unit) > CHUNK:
                    close()
                ids += unit
                ws += [weight] * len(unit)
                continue
            tok = unit[0]
            if tok == comma_id:
                last_comma = len(ids)
            elif len(ids) == CHUNK and 0 <= last_comma and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the full chunk ends after its last comma; the rest opens the next
                rest_ids, rest_ws = ids[cut:], ws[cut:]
                ids, ws = ids[:cut], ws[:cut]
                close()
                ids, ws = rest_ids, rest_ws
            if len(ids) == CHUNK:
                close()
            ids.append(tok)
            ws.append(weight)
    if ids or not done:
        close()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for ids, ws in done:
        n = CHUNK - len(ids)
        out.append(([bos, *ids, eos] + [pad] * n, [1.0, *ws, 1.0] + [1.0] * n))
    return out


def token_count(tokenizer, prompt: str, steps: int = 20, model=None) -> tuple[int, int]:
    """(tokens, room) of a prompt as AUTOMATIC1111's counter shows it ("12/75", "80/150"): the prompt without its
    `<lora:…>` tags, each text its prompt editing gives (the longest), cut into chunks as it is encoded (an
    embedding in use counts its vectors when `model` is given); room is 75 a chunk."""
    from .prompt_editing import schedule
    from .stack import parse_lora_tags

    clean, _ = parse_lora_tags(prompt or "")
    convert = (lambda f: expand(model, f)) if model is not None else None
    eos = tokenizer.eos_token_id
    best = (0, CHUNK)
    for _, text in schedule(clean, steps):
        parts = chunks(tokenizer, text, convert)
        n = sum(ids[1:].index(eos) for ids, _ in parts)
        best = max(best, (n, CHUNK * len(parts)))
    return best


def _units(tokenizer, ids: list[int]) -> list[list[int]]:
    """Token ids grouped: an embedding's tokens (`<ti:name:i>`, pipelines.embeddings) together, others alone."""
    names = tokenizer.convert_ids_to_tokens(ids)
    out: list[list[int]] = []
    prev = None
    for i, name in zip(ids, names):
        word = name.rsplit(":", 1)[0] if isinstance(name, str) and name.startswith("<ti:") else None
        if word is not None and word == prev and not name.endswith(":0>"):
            out[-1].append(i)
        else:
            out.append([i])
        prev = word
    return out


def _weighted(z: torch.Tensor, ws: list[float]) -> torch.Tensor:
    """Each token's embedding times its weight, the whole scaled back to its unweighted mean (A1111). Unweighted
    tokens are left exactly as they are, and a mean of 0 (a layer norm without bias) is not divided by."""
    if all(w == 1.0 for w in ws):
        return z
    w = torch.tensor(ws, device=z.device, dtype=z.dtype)[None, :, None]
    before = z.mean()
    z = z * w
    after = z.mean()
    return z * (before / after) if after != 0 else z


def encoder_hidden(encoder, ids: torch.Tensor, layer: int, final_norm: bool, mask=None) -> torch.Tensor:
    """A CLIP text encoder's hidden states at `layer` (-1 the last), through its final norm if asked (how SD
    1.x/2.x take them; SDXL takes its penultimate layer without)."""
    out = encoder(ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if final_norm:
        hidden = next(m for n, m in encoder.named_modules() if n.endswith("final_layer_norm"))(hidden)
    return hidden


def encode(model, prompt: str, negative: str, skip: int | None) -> dict[str, torch.Tensor]:
    """The pipeline's embedding arguments for `prompt` and `negative` under A1111's rules, with `skip` layers
    left out after the last (SD 1.x/2.x; SDXL takes its penultimate layers, as its pipeline does)."""
    pipe, device = model.pipe, model.device
    xl = model.family == "sdxl"
    # SDXL's two tokenizers share the vocabulary but pad differently: each encoder gets its own ids
    toks = ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]

    def parts_of(text: str) -> list[list[tuple[list[int], list[float]]]]:
        return [list(z) for z in zip(*(chunks(getattr(pipe, t), text, lambda f, t=t: expand(model, f, t))
                                       for t in toks))]

    pos, neg, empty = parts_of(prompt), parts_of(negative or ""), parts_of("")[0]
    n = max(len(pos), len(neg))
    pos += [empty] * (n - len(pos))
    neg += [empty] * (n - len(neg))
    zero_negative = xl and not negative and pipe.config.get("force_zeros_for_empty_prompt", False)

    def run(parts) -> tuple[torch.Tensor, torch.Tensor | None]:
        zs, pooled = [], None
        for per_tok in parts:
            ids, ws = per_tok[0]
            t = torch.tensor([ids], device=device)
            if xl:  # each encoder weighted on its own, then joined (as A1111 does)
                z1 = _weighted(encoder_hidden(pipe.text_encoder, t, -2, False), ws)
                ids2 = per_tok[1][0]
                te2 = pipe.text_encoder_2
                out2 = te2(torch.tensor([ids2], device=device), output_hidden_states=True)
                z = torch.cat([z1, _weighted(out2.hidden_states[-2], ws)], dim=-1)
                if pooled is None:  # the first chunk's, at its end-of-text token (as A1111 and the pipeline)
                    # (SDXL's text_encoder_2 config finds that token as the highest id, which an embedding's
                    # added tokens would beat: its position is taken here instead)
                    eos = ids2.index(pipe.tokenizer_2.eos_token_id)
                    pooled = te2.text_projection(out2.last_hidden_state[:, eos])
            else:
                z = _weighted(encoder_hidden(pipe.text_encoder, t, -((skip or 0) + 1), True), ws)
            zs.append(z)
        return torch.cat(zs, dim=1), pooled

    pe, pooled = run(pos)
    if zero_negative:
        ne, npooled = torch.zeros_like(pe), torch.zeros_like(pooled)
    else:
        ne, npooled = run(neg)
    dtype = (pipe.text_encoder_2 if xl else pipe.text_encoder).dtype
    out = {"prompt_embeds": pe.to(dtype), "negative_prompt_embeds": ne.to(dtype)}
    if xl:
        out.update(pooled_prompt_embeds=pooled.to(dtype), negative_pooled_prompt_embeds=npooled.to(dtype))
    return out


__all__ = ["parse_attention", "needs_syntax", "chunks", "encode", "token_count", "CHUNK"]
