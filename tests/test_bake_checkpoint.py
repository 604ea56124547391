"""Baking a weighted stack into a full single-file checkpoint: it loads back and leaves the live model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import latents, make_lora

from app.cli import main
from pipelines.adapters import lora_metadata, save_adapter
from pipelines.base_models import load_base
from pipelines.errors import ConfigError
from pipelines.library import AdapterLibrary
from pipelines.stack import AdapterStack, plain_state_dict
from pipelines.weights_io import load_safetensors, read_header

STACK = [("a", 0.8, 0.4), ("b", -0.6)]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request, tmp_path_factory):
    """(base folder, loaded base, library with adapters a and b) for SD 1.x (CLIP) and SD 2.x (OpenCLIP q/k/v)."""
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    base = load_base(folder, device="cpu")
    root = tmp_path_factory.mktemp(f"bake_lib_{request.param}")
    fam = request.param
    save_adapter(make_lora(base.pipe, rank=4, seed=1), root / "a.safetensors",
                 lora_metadata(family=fam, rank=4, alpha=8, trigger_word="sks"))
    save_adapter(make_lora(base.pipe, rank=2, seed=2), root / "b.safetensors",
                 lora_metadata(family=fam, rank=2, alpha=2))
    return folder, base, AdapterLibrary(root)


@pytest.fixture
def stack(case):
    _, base, lib = case
    st = AdapterStack(base, lib)
    yield st
    st.unload()


def test_baked_checkpoint_loads_back_as_the_stacked_model(case, stack, tmp_path):
    folder, base, _ = case
    base_out = latents(base.pipe)
    unet_before = {k: v.clone() for k, v in plain_state_dict(base.pipe.unet).items()}
    stack.set_stack(STACK)
    want = latents(base.pipe)
    path = stack.bake_checkpoint(tmp_path / "merged.safetensors")
    # the live model is untouched: same stack, unfused, same outputs, base weights bit for bit
    assert [e.name for e in stack.stack] == ["a", "b"] and not stack.fused
    assert torch.equal(latents(base.pipe), want)
    after = plain_state_dict(base.pipe.unet)
    assert after.keys() == unet_before.keys() and all(torch.equal(after[k], v) for k, v in unet_before.items())
    stack.clear()
    assert torch.equal(latents(base.pipe), base_out)

    header, _ = read_header(path)
    meta = header["__metadata__"]
    keys = [k for k in header if k != "__metadata__"]
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert [e["name"] for e in json.loads(meta["lora_studio.baked_from"])] == ["a", "b"]
    assert meta["modelspec.trigger_phrase"] == "sks"
    baked = load_base(path, device="cpu", config=str(folder))
    got = latents(baked.pipe)
    assert torch.allclose(got, want, atol=1e-4, rtol=0) and not torch.allclose(got, base_out, atol=1e-3)


def test_bake_checkpoint_of_another_stack_keeps_the_current_one(case, stack, tmp_path):
    folder, base, _ = case
    stack.set_stack([("b", 1.0)])
    stack.fuse()
    current = latents(base.pipe)
    path = stack.bake_checkpoint(tmp_path / "other.safetensors", entries=STACK)
    assert stack.fused and [e.name for e in stack.stack] == ["b"]
    assert torch.equal(latents(base.pipe), current)
    stack.set_stack(STACK)
    want = latents(base.pipe)
    assert torch.allclose(latents(load_base(path, device="cpu", config=str(folder)).pipe), want, atol=1e-4, rtol=0)


def test_bake_checkpoint_needs_a_stack(stack, tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        stack.bake_checkpoint(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("as_checkpoint", [False, True])
def test_cli_loras_bake(case, tmp_path, capsys, as_checkpoint):
    folder, base, lib = case
    out = tmp_path / "merged.safetensors"
    argv = ["loras", "--library", str(lib.root), "bake", "--base", str(folder), "--device", "cpu",
            "--lora", "a:0.8:0.4", "--lora", "b:-0.6", "--out", str(out)]
    assert main(argv + (["--checkpoint"] if as_checkpoint else [])) == 0
    assert str(out) in capsys.readouterr().out
    st = AdapterStack(base, lib)
    st.set_stack(STACK)
    want = latents(base.pipe)
    st.unload()
    if as_checkpoint:
        got = latents(load_base(out, device="cpu", config=str(folder)).pipe)
    else:
        sd, _ = load_safetensors(out)
        assert sd and all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
        st.load("merged", out)
        st.set_stack([("merged", 1.0)])
        got = latents(base.pipe)
        st.unload()
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


def test_cli_bake_at_a_rank_is_the_best_approximation_of_the_stack(case, tmp_path, capsys):
    """Two rank-4 adapters bake to rank 8; `--rank 8` keeps all of it, `--rank 3` the stack's best rank-3 part."""
    folder, base, lib = case
    common = ["loras", "--library", str(lib.root), "bake", "--base", str(folder), "--device", "cpu",
              "--lora", "a:0.8", "--lora", "b:-0.6"]
    assert main(common + ["--out", str(tmp_path / "full.safetensors")]) == 0
    assert main(common + ["--out", str(tmp_path / "r8.safetensors"), "--rank", "8"]) == 0
    assert main(common + ["--out", str(tmp_path / "r3.safetensors"), "--rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "at rank 3; each keeps at least" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bake-")]
    full, _ = load_safetensors(tmp_path / "full.safetensors")
    r8, _ = load_safetensors(tmp_path / "r8.safetensors")
    r3, _ = load_safetensors(tmp_path / "r3.safetensors")
    assert r3.keys() == full.keys() and all(v.shape[0] == 3 for k, v in r3.items() if k.endswith("lora_down.weight"))

    def delta(sd, module):
        down, up = sd[f"{module}.lora_down.weight"].float(), sd[f"{module}.lora_up.weight"].float()
        a = float(sd[f"{module}.alpha"]) / down.shape[0]
        return a * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)

    for module in {k.split(".")[0] for k in full}:
        d = delta(full, module)
        torch.testing.assert_close(delta(r8, module), d, rtol=1e-4, atol=1e-5)
        s = torch.linalg.svdvals(d.double())
        err = float(((delta(r3, module).double() - d.double()) ** 2).sum())
        assert err == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-3, abs=1e-9)
    assert main(common + ["--out", str(tmp_path / "c.safetensors"), "--checkpoint", "--rank", "3"]) != 0
    assert "--rank and --keep make a smaller adapter file" in capsys.readouterr().err
