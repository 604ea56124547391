"""Pivotal tuning: the trigger word as new token vectors, trained with the LoRA.

diffusers' advanced DreamBooth LoRA scripts (`--train_text_encoder_ti`) and kohya's textual inversion train new
token embeddings; together with a LoRA this is "pivotal tuning". Here the trigger word becomes `ti_vectors` new
tokens in each text encoder (`<pivotal:sks:0>`, …, the same names in both of SDXL's), put in the word's place in
every caption by the same mechanism that puts an embeddings-folder file in a prompt (pipelines.embeddings). Their
vectors are a small trainable tensor beside the frozen embedding table (`TrainedTokens`), so nothing else of the
table changes, whatever the optimizer's weight decay. They train for the first `ti_frac` of the steps, then stay.

The finished file carries them as AUTOMATIC1111's bundled embedding (`bundle_emb.<trigger>.…`): loaded with the
adapter, here and in A1111, the trigger word means what was trained.
"""

from __future__ import annotations

import torch

from pipelines.embeddings import add_vectors, bundled

TOKEN_STEM = "pivotal"


class TrainedTokens(torch.nn.Module):
    """A text encoder's input embedding whose rows `ids` come from the trainable `vectors` (n, D)."""

    def __init__(self, embedding: torch.nn.Embedding, ids: list[int]):
        super().__init__()
        self.embedding = embedding
        self.vectors = torch.nn.Parameter(embedding.weight[ids].detach().float().clone())
        lookup = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup.to(embedding.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight read (its rows are stale)
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.embedding(input_ids)
        pos = self.lookup[input_ids]
        hit = pos >= 0
        if not bool(hit.any()):
            return out
        return torch.where(hit[..., None], self.vectors.to(out.dtype)[pos.clamp(min=0)], out)


def _encoders(pipe) -> list[tuple[str, str, str]]:
    """(tokenizer attribute, text encoder attribute, bundle key) of each text encoder."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g")]
    return [("tokenizer", "text_encoder", "")]


def initial_vectors(pipe, n: int, init: str | None, seed: int) -> dict[str, torch.Tensor]:
    """The starting vectors per bundle key: the token embeddings of `init` repeated to n (kohya's init_word), or
    random ones with the vocabulary's spread (diffusers' pivotal-tuning example)."""
    gen = torch.Generator().manual_seed(seed + 17)
    out = {}
    for tok_attr, enc_attr, key in _encoders(pipe):
        table = getattr(pipe, enc_attr).get_input_embeddings().weight.detach().float().cpu()
        if init:
            tok = getattr(pipe, tok_attr)
            ids = tok(init, add_special_tokens=False).input_ids
            if not ids:
                from pipelines.errors import ConfigError

                raise ConfigError(f"ti_init: '{init}' gives no tokens")
            out[key] = table[[ids[i % len(ids)] for i in range(n)]].clone()
        else:
            out[key] = torch.randn(n, table.shape[1], generator=gen) * table.std()
    return out


class Pivotal:
    """The trigger's trainable vectors in a pipeline's text encoders (see the module's docstring)."""

    def __init__(self, base, word: str, vectors: dict[str, torch.Tensor]):
        self.base, self.word = base, word
        self.tokens = add_vectors(base, word, vectors, TOKEN_STEM)
        bundled(base)[word] = self.tokens  # the trigger in captions, samples and checks: these tokens
        self.modules: dict[str, TrainedTokens] = {}
        self.frozen = False
        pipe = base.pipe
        for tok_attr, enc_attr, key in _encoders(pipe):
            enc = getattr(pipe, enc_attr)
            ids = getattr(pipe, tok_attr).convert_tokens_to_ids(self.tokens[tok_attr])
            wrapped = TrainedTokens(enc.get_input_embeddings(), ids)
            enc.set_input_embeddings(wrapped)
            self.modules[key] = wrapped

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [m.vectors for m in self.modules.values()]

    def vectors(self) -> dict[str, torch.Tensor]:
        """The trained vectors per bundle key ('' for SD 1.x/2.x, clip_l / clip_g for SDXL), float32 on the CPU."""
        return {k: m.vectors.detach().float().cpu().clone() for k, m in self.modules.items()}

    def load(self, vectors: dict[str, torch.Tensor], source: str) -> None:
        """Put saved vectors back (resume, train more); they must be as many and as wide as this run's."""
        from pipelines.errors import IncompatibleAdapterError

        if set(vectors) != set(self.modules):
            raise IncompatibleAdapterError(f"{source}: its embedding of '{self.word}' is for another kind of model "
                                           f"({', '.join(sorted(vectors)) or 'one set'} vs this run's)")
        for k, m in self.modules.items():
            if tuple(vectors[k].shape) != tuple(m.vectors.shape):
                raise IncompatibleAdapterError(
                    f"{source}: its embedding of '{self.word}' has {tuple(vectors[k].shape)} vectors, this run "
                    f"{tuple(m.vectors.shape)}: continue it with ti_vectors = {vectors[k].shape[0]}")
            with torch.no_grad():
                m.vectors.copy_(vectors[k].to(m.vectors.device, m.vectors.dtype))

    def freeze(self) -> None:
        self.frozen = True
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None


def attach(base, cfg) -> Pivotal:
    """New tokens for `cfg.trigger` in the base's text encoders, trainable (see Pivotal)."""
    return Pivotal(base, cfg.trigger, initial_vectors(base.pipe, cfg.ti_vectors, cfg.ti_init, cfg.seed))


def training_steps(cfg) -> int:
    """How many of the run's steps the vectors train."""
    return max(1, round(cfg.ti_frac * cfg.max_steps))


__all__ = ["Pivotal", "TrainedTokens", "attach", "initial_vectors", "training_steps", "TOKEN_STEM"]
