"""Several active adapters run as one concatenated LoRA per layer: same output as peft's per-adapter path."""

from __future__ import annotations

import os

import pytest
import torch
from lora_helpers import latents, make_lora

from pipelines.adapters import lora_metadata, save_adapter
from pipelines.base_models import load_base
from pipelines.library import AdapterLibrary
from pipelines.stack import COMBINED_ADAPTER, AdapterStack

ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # adapted by a, b and c
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # adapted by a and b only


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


@pytest.fixture(scope="module")
def lib(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("combined_lib")
    save_adapter(make_lora(sd1.pipe, rank=4, seed=1), root / "a.safetensors",
                 lora_metadata(family="sd1", rank=4, alpha=8))
    save_adapter(make_lora(sd1.pipe, rank=2, seed=2), root / "b.safetensors",
                 lora_metadata(family="sd1", rank=2, alpha=2))
    save_adapter(make_lora(sd1.pipe, rank=4, seed=3, only="attn2", components=("unet",)), root / "c.safetensors",
                 lora_metadata(family="sd1", rank=4, alpha=4))
    return AdapterLibrary(root)


@pytest.fixture
def stack(sd1, lib):
    st = AdapterStack(sd1, lib)
    yield st
    st.unload()


def _reference(stack, entries) -> torch.Tensor:
    """The same stack through peft's own per-adapter forward (no combined slot active)."""
    stack.set_stack(entries)
    names = [stack._loaded[e[0]].adapter for e in entries]
    weights = [{c: (e[1] if c == "unet" else (e[2] if len(e) > 2 else e[1])) for c in stack._loaded[e[0]].components}
               for e in entries]
    stack.pipe.set_adapters(names, weights)
    out = latents(stack.pipe)
    stack.clear()  # the pipe was changed behind the stack's back: bypass, then apply the stack again
    stack.set_stack(entries)
    return out


def _active(sd1, name: str) -> list[str]:
    return list(sd1.pipe.unet.get_submodule(name).active_adapters)


def test_combined_slot_equals_the_per_adapter_sum(sd1, stack):
    entries = [("a", 0.7, 0.3), ("b", -0.5), ("c", 1.2)]
    stack.set_stack(entries)
    assert _active(sd1, ATTN2) == [COMBINED_ADAPTER] and _active(sd1, ATTN1) == [COMBINED_ADAPTER]
    assert sd1.pipe.unet.get_submodule(ATTN2).r[COMBINED_ADAPTER] == 4 + 2 + 4
    assert sd1.pipe.unet.get_submodule(ATTN1).r[COMBINED_ADAPTER] == 4 + 2
    got = latents(sd1.pipe)
    assert torch.allclose(got, _reference(stack, entries), atol=1e-3, rtol=1e-4)  # same sum, other summation order
    assert torch.equal(latents(sd1.pipe), got)  # deterministic: same stack, same bits

    reweighted = [("a", -1.1, 0.9), ("b", 0.25), ("c", 0.0)]
    stack.set_stack(reweighted)
    assert stack.reads == 3
    assert torch.allclose(latents(sd1.pipe), _reference(stack, reweighted), atol=1e-3, rtol=1e-4)  # same sum, other summation order
    stack.set_stack(entries)
    assert torch.equal(latents(sd1.pipe), got)

    stack.set_stack([("a", 0.7, 0.3)])  # one adapter: peft's own path again
    assert _active(sd1, ATTN2) == [stack._loaded["a"].adapter]


def test_combined_slot_follows_reloads_unloads_and_fusing(sd1, lib, stack):
    p = lib.root / "d.safetensors"
    save_adapter(make_lora(sd1.pipe, rank=3, seed=7), p, lora_metadata(family="sd1", rank=3, alpha=3))
    entries = [("a", 0.6), ("d", 0.8)]
    stack.set_stack(entries)
    first = latents(sd1.pipe)
    save_adapter(make_lora(sd1.pipe, rank=5, seed=8), p, lora_metadata(family="sd1", rank=5, alpha=5))
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    stack.set_stack(entries)  # the changed file is read again; the slot is rebuilt with the new rank
    assert sd1.pipe.unet.get_submodule(ATTN1).r[COMBINED_ADAPTER] == 4 + 5
    changed = latents(sd1.pipe)
    assert not torch.allclose(changed, first, atol=1e-4)
    assert torch.allclose(changed, _reference(stack, entries), atol=1e-3, rtol=1e-4)  # same sum, other summation order

    stack.fuse()
    assert torch.allclose(latents(sd1.pipe), changed, atol=1e-4, rtol=0)
    stack.unfuse()
    assert torch.equal(latents(sd1.pipe), changed)

    three = [("a", 0.6), ("b", -0.4), ("d", 0.8)]
    stack.set_stack(three)
    stack.unload(["d"])  # the remaining two stay combined, without d's factors
    assert [e.name for e in stack.stack] == ["a", "b"]
    assert torch.allclose(latents(sd1.pipe), _reference(stack, [("a", 0.6), ("b", -0.4)]), atol=1e-3, rtol=1e-4)  # same sum, other summation order
    p.unlink()


def test_fused_stack_runs_the_plain_base_modules(sd1, stack, tmp_path):
    from peft.tuners.lora import LoraLayer

    def wrapped() -> int:
        return sum(isinstance(m, LoraLayer) for c in (sd1.pipe.unet, sd1.pipe.text_encoder) for m in c.modules())

    entries = [("a", 0.7, 0.3), ("b", -0.5)]
    stack.set_stack(entries)
    unfused = latents(sd1.pipe)
    n = wrapped()
    report = stack.interference().summary()
    stack.fuse()
    assert wrapped() == 0 and type(sd1.pipe.unet.get_submodule(ATTN1)) is torch.nn.Linear
    fused = latents(sd1.pipe)
    assert torch.allclose(fused, unfused, atol=1e-4, rtol=0)
    # reading the factors (interference, bake) works while fused and leaves it fused
    assert stack.interference().summary() == report
    baked = stack.bake(tmp_path / "while_fused.safetensors")
    assert stack.fused and wrapped() == 0 and torch.equal(latents(sd1.pipe), fused)
    stack.set_stack(list(reversed(entries)))  # same stack reordered: stays fused
    assert stack.fused and torch.equal(latents(sd1.pipe), fused)
    stack.unfuse()
    assert wrapped() == n and [e.name for e in stack.stack] == ["b", "a"]
    assert torch.allclose(latents(sd1.pipe), unfused, atol=1e-3, rtol=1e-4)  # same sum, other summation order
    stack.load("baked", baked)
    stack.set_stack([("baked", 1.0)])
    assert torch.allclose(latents(sd1.pipe), unfused, atol=1e-4, rtol=0)
