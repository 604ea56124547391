"""Build a real CLIP BPE tokenizer (vocab.json + merges.txt) offline for the toy base model.

The vocabulary follows CLIP's layout: the 256 byte-level characters, the same with the
end-of-word marker `</w>`, one merge chain per known word, then the two special tokens. Words
outside the list (trigger words such as "sks") still tokenize, as byte-level pieces, exactly as
they would with SD's real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from .toy_world import COLORS, DRAWABLE_SHAPES, DRAWABLE_STYLES, FILLER

WORDS = sorted(
    set(COLORS)
    | set(DRAWABLE_SHAPES)
    | set(DRAWABLE_STYLES)
    | set(FILLER)
    | {
        "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "drawing",
        "image", "style", "shape", "background", "small", "large", "big", "grey", "centered",
        "left", "right", "top", "bottom", "sks", "ohwx", "toy", "art", "painting", "by",
        "lowres", "blurry", "bad", "quality", "outlined", "filled", "solid", "thing", "object",
    }
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(words: list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    base = list(bytes_to_unicode().values())
    vocab_tokens = base + [c + "</w>" for c in base]
    # Learn merges as BPE does (most frequent adjacent pair first) until every word is one
    # token; applying merges by rank then reproduces exactly this segmentation.
    merges: list[str] = []
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    seen = set(vocab_tokens)
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in segs.values():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=lambda p: counts[p])
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        if joined not in seen:
            vocab_tokens.append(joined)
            seen.add(joined)
        for w, parts in segs.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            segs[w] = out
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_tokens)}, merges


def write_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs that diffusers expects."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )


def vocab_size() -> int:
    return len(build_vocab()[0])
