"""Helpers for the adapter tests: LoRA state dicts shaped for a given pipeline, and a cheap model output."""

from __future__ import annotations

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora(pipe, *, rank: int = 4, seed: int = 0, components=("unet", "text_encoder"), std: float = 0.5,
              only: str | None = None) -> dict[str, torch.Tensor]:
    """Random non-zero LoRA factors in our key format for every attention projection of `pipe`.

    `only`: keep modules whose path contains this text (e.g. 'attn2' or 'mid_block').
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for comp in components:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        targets = UNET_TARGETS if comp == "unet" else TEXT_TARGETS
        for name, mod in model.named_modules():
            mod = getattr(mod, "base_layer", mod)
            if not isinstance(mod, torch.nn.Linear) or not name.endswith(targets) or "lora_" in name:
                continue
            if name.endswith(".base_layer") or (only and only not in name):
                continue
            key = f"{comp}.{name}" if comp == "unet" else f"{comp}.text_model.{name.removeprefix('text_model.')}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * std / mod.in_features ** 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * std / rank ** 0.5
    return sd


def latents(pipe, prompt: str = "a red circle", steps: int = 2, seed: int = 0) -> torch.Tensor:
    """The pipeline's final latents for a fixed prompt and seed: text encoder(s) and UNet both count."""
    with torch.inference_mode():
        out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
                   generator=torch.Generator().manual_seed(seed))
    return out.images.clone()


def assert_resumes_exactly(cfg, stop_at: int = 3) -> dict[str, torch.Tensor]:
    """`cfg(sub, **changes)` makes a run's config in its own folder `sub` (checkpoint every step): the run stopped
    at `stop_at` and resumed from its latest checkpoint ends with the same weights as an uninterrupted one.
    Returns those weights; the uninterrupted run's library is `cfg("a")`'s, the resumed run's `cfg("b")`'s."""
    import threading

    from pipelines.weights_io import load_safetensors
    from training.trainer import train

    full = train(cfg("a"))
    stop = threading.Event()
    part = train(cfg("b"), on_progress=lambda p: stop.set() if p.step == stop_at and p.loss is not None else None,
                 stop=stop)
    assert part.stopped and part.steps == stop_at
    resumed = train(cfg("b", resume="latest"))
    a, _ = load_safetensors(full.adapter_path)
    b, _ = load_safetensors(resumed.adapter_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    return a
