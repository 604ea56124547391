"""Stacking adapters: weights, exact unload, fuse/unfuse, bake, interference, A1111 tags and PNG metadata."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from lora_helpers import latents, make_lora

from app.cli import main
from pipelines.adapters import lora_metadata, save_adapter, to_peft
from pipelines.base_models import load_base
from pipelines.errors import ConfigError
from pipelines.generation import (
    GenerationRequest,
    parse_parameters,
    read_png_parameters,
    request_from_parameters,
    save_png,
)
from pipelines.library import AdapterLibrary
from pipelines.stack import AdapterStack, StackEntry, parse_lora_arg, parse_lora_hashes, parse_lora_tags
from pipelines.weights_io import addnet_hash, load_safetensors, save_safetensors

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_LAYER = "encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


@pytest.fixture(scope="module")
def base_out(sd1):
    return latents(sd1.pipe)


@pytest.fixture(scope="module")
def lib(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack_lib")
    a = make_lora(sd1.pipe, rank=4, seed=1)
    save_adapter(a, root / "a.safetensors", lora_metadata(family="sd1", rank=4, alpha=8, name="a", trigger_word="sks"))
    save_adapter(a, root / "a_copy.safetensors", lora_metadata(family="sd1", rank=4, alpha=8))
    neg = {k: (-v if ".lora_B." in k else v) for k, v in a.items()}
    save_adapter(neg, root / "a_neg.safetensors", lora_metadata(family="sd1", rank=4, alpha=8))
    save_adapter(make_lora(sd1.pipe, rank=2, seed=2), root / "b.safetensors",
                 lora_metadata(family="sd1", rank=2, alpha=2))
    return AdapterLibrary(root)


@pytest.fixture
def stack(sd1, lib):
    st = AdapterStack(sd1, lib)
    yield st
    st.unload()


def test_parse_a1111_tags():
    assert parse_lora_tags("<lora:style:0.7> a cat") == ("a cat", [StackEntry("style", 0.7, 0.7)])
    clean, [e] = parse_lora_tags("a cat, <lora:style:0.7:0.5>")  # A1111: text encoder first, then UNet
    assert clean == "a cat" and (e.te_weight, e.weight) == (0.7, 0.5)
    _, [e1, e2] = parse_lora_tags("<lora:x> and <lora:y:te=0.2:unet=0.9>, z")
    assert (e1.weight, e1.text_weight) == (1.0, 1.0) and (e2.te_weight, e2.weight) == (0.2, 0.9)
    assert parse_lora_tags("no tags here") == ("no tags here", [])
    # civitai prompts for LyCORIS files carry the LyCORIS extension's <lyco:…> tag; AUTOMATIC1111 reads it as <lora:…>
    assert parse_lora_tags("a cat <lyco:loha-style:0.6>, <LORA:x>") == (
        "a cat", [StackEntry("loha-style", 0.6, 0.6), StackEntry("x", 1.0, 1.0)])
    # AUTOMATIC1111 takes any weight: prompts copied from it with 3 or -5 ("slider" LoRAs) work here too
    assert parse_lora_tags("<lora:slider:-5> a cat")[1] == [StackEntry("slider", -5.0, -5.0)]
    with pytest.raises(ConfigError, match="between -10 and 10"):
        parse_lora_tags("<lora:x:11>")
    with pytest.raises(ConfigError, match="not a number"):
        parse_lora_tags("<lora:x:lots>")


def test_parse_cli_lora_args():
    assert parse_lora_arg("style") == StackEntry("style")
    assert parse_lora_arg("style:0.8") == StackEntry("style", 0.8)
    e = parse_lora_arg("style:0.8:-0.5")  # ours: UNet weight, then text-encoder weight
    assert (e.weight, e.text_weight) == (0.8, -0.5)
    assert parse_lora_arg("v2:style:1").name == "v2:style"
    assert parse_lora_hashes("a: 0123456789ab, b c: ba9876543210") == {"a": "0123456789ab", "b c": "ba9876543210"}
    with pytest.raises(ConfigError, match="weight"):
        StackEntry("x", float("nan"))


def test_two_adapters_add_their_weighted_updates_on_a_layer(sd1, lib, stack):
    stack.set_stack([("a", 0.7, 0.3), ("b", -0.5)])
    fa, _ = load_safetensors(lib.path_for("a"))
    fb, _ = load_safetensors(lib.path_for("b"))

    def dw(f, comp, name, scale):
        return scale * f[f"{comp}.{name}.lora_B.weight"] @ f[f"{comp}.{name}.lora_A.weight"]

    layer = sd1.pipe.unet.get_submodule(LAYER)
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        delta = layer(x) - layer.get_base_layer()(x)
    expected = x @ (dw(fa, "unet", LAYER, 0.7 * 8 / 4) + dw(fb, "unet", LAYER, -0.5 * 2 / 2)).T
    assert torch.allclose(delta, expected, atol=1e-5)
    te = sd1.pipe.text_encoder.get_submodule(TE_LAYER)
    with torch.no_grad():
        delta = te(x) - te.get_base_layer()(x)
    tname = "text_model." + TE_LAYER
    expected = x @ (dw(fa, "text_encoder", tname, 0.3 * 8 / 4) + dw(fb, "text_encoder", tname, -0.5 * 2 / 2)).T
    assert torch.allclose(delta, expected, atol=1e-5)


def test_reweighting_never_rereads_and_clear_or_unload_give_the_base_exactly(sd1, lib, stack, base_out):
    unet_before = {k: v.clone() for k, v in sd1.pipe.unet.state_dict().items()}
    stack.set_stack([("a", 1.0), ("b", 1.0)])
    assert stack.reads == 2
    one = latents(sd1.pipe)
    for w in (0.2, -1.5, 2.0, 0.7):
        stack.set_stack([("a", w), ("B", w / 2, 0.0)])  # names match the library up to case
    stack.set_stack([("a", 1.0), ("b", 1.0)])
    assert stack.reads == 2 and torch.equal(latents(sd1.pipe), one)
    assert (one - base_out).abs().max() > 1e-3
    stack.clear()
    assert torch.equal(latents(sd1.pipe), base_out)
    stack.set_stack([("a", 1.0)])
    stack.unload()
    assert torch.equal(latents(sd1.pipe), base_out)
    after = sd1.pipe.unet.state_dict()
    assert after.keys() == unet_before.keys() and all(torch.equal(after[k], v) for k, v in unet_before.items())


def test_a_changed_file_is_read_again(sd1, lib, stack):
    p = lib.root / "changing.safetensors"
    save_adapter(make_lora(sd1.pipe, seed=5), p, lora_metadata(family="sd1", rank=4, alpha=4))
    stack.set_stack([("changing", 1.0)])
    first = latents(sd1.pipe)
    save_adapter(make_lora(sd1.pipe, seed=6), p, lora_metadata(family="sd1", rank=4, alpha=4))
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    stack.set_stack([("changing", 1.0)])
    assert stack.reads == 2 and not torch.equal(latents(sd1.pipe), first)
    stack.unload()
    p.unlink()


def test_fuse_matches_the_stack_and_unfuse_restores_exactly(sd1, stack, base_out):
    stack.set_stack([("a", 0.8, 0.4), ("b", -0.6)])
    unfused = latents(sd1.pipe)
    stack.fuse()
    assert stack.fused
    fused = latents(sd1.pipe)
    assert torch.allclose(fused, unfused, atol=1e-4, rtol=0) and not torch.equal(fused, base_out)
    stack.unfuse()
    assert torch.equal(latents(sd1.pipe), unfused)
    stack.fuse()
    stack.set_stack([("b", -0.6), ("a", 0.8, 0.4)])  # the same stack in another order stays fused
    assert stack.fused and torch.equal(latents(sd1.pipe), fused)
    stack.set_stack([("a", 0.5)])  # a different stack unfuses first
    assert not stack.fused
    stack.set_stack([("a", 0.8, 0.4), ("b", -0.6)])
    assert torch.equal(latents(sd1.pipe), unfused)
    stack.fuse()
    stack.unload()  # unload of a fused stack gives the base back bit for bit
    assert torch.equal(latents(sd1.pipe), base_out)


def test_bake_writes_one_file_that_reproduces_the_stack(sd1, stack, tmp_path):
    stack.set_stack([("a", 0.8, 0.4), ("b", -0.6)])
    want = latents(sd1.pipe)
    path = stack.bake(tmp_path / "baked.safetensors")
    stack.unload()
    sd, meta = load_safetensors(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)  # kohya's layout, like every file we hand out
    sd, _ = to_peft(sd, meta)
    assert sd[f"unet.{LAYER}.lora_A.weight"].shape[0] == 4 + 2  # rank = sum of ranks: exact, not an SVD
    assert "a" in meta["lora_studio.baked_from"] and meta["lora_studio.base_family"] == "sd1"
    sd1.pipe.load_lora_weights(str(path), adapter_name="baked")  # a plain diffusers load
    try:
        assert torch.allclose(latents(sd1.pipe), want, atol=1e-4, rtol=0)
    finally:
        sd1.pipe.unload_lora_weights()


def test_interference_flags_overlap_and_fights(stack):
    report = stack.interference(["a", "a_copy", "a_neg", "b"])
    by = {(p.a, p.b): p for p in report.pairs}
    assert len(by) == 6 and by[("a", "b")].shared == 40
    assert by[("a", "a_copy")].mean_cos == pytest.approx(1.0) and "overlap" in by[("a", "a_copy")].warning
    assert by[("a", "a_neg")].mean_cos == pytest.approx(-1.0) and "fight" in by[("a", "a_neg")].warning
    assert abs(by[("a", "b")].mean_cos) < 0.3 and by[("a", "b")].warning is None
    assert len(report.warnings) == 3 and "a × b" in report.summary()
    stack.set_stack([("a", 1.0), ("a_copy", -1.0)])  # a negative weight turns overlap into a fight
    [pair] = stack.interference().pairs
    assert pair.mean_cos == pytest.approx(-1.0) and "fight" in pair.warning


def test_generate_records_tags_and_lora_hashes_and_reproduces_from_png(sd1, lib, stack, tmp_path):
    req = GenerationRequest(prompt="<lora:a:0.8> a red circle", steps=2, seed=3, scheduler="DDIM")
    img = stack.generate(req, loras=[("b", 0.5)])[0]
    p = parse_parameters(img.parameters)
    assert p["Prompt"] == "<lora:a:0.8> a red circle <lora:b:0.5>"
    hashes = parse_lora_hashes(p["Lora hashes"])
    assert hashes == {"a": addnet_hash(lib.path_for("a"))[:12], "b": addnet_hash(lib.path_for("b"))[:12]}
    assert list(hashes) == ["a", "b"]
    base_img = stack.generate(GenerationRequest(prompt="a red circle", steps=2, seed=3, scheduler="DDIM"))[0]
    assert "Lora hashes" not in base_img.parameters
    assert not np.array_equal(np.asarray(img.image), np.asarray(base_img.image))
    path = save_png(img, tmp_path / "x.png")
    again = stack.generate(request_from_parameters(read_png_parameters(path)))[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(img.image))
    assert again.parameters == img.parameters


def test_concurrent_requests_with_different_stacks_do_not_cross_talk(stack):
    reqs = {"a": GenerationRequest(prompt="<lora:a:1> a blue square", steps=2, seed=1, scheduler="DDIM"),
            "b": GenerationRequest(prompt="<lora:b:-1.5> a blue square", steps=2, seed=1, scheduler="DDIM")}
    alone = {k: np.asarray(stack.generate(r)[0].image) for k, r in reqs.items()}
    got: dict[str, list] = {"a": [], "b": []}

    def run(k):
        for _ in range(3):
            got[k].append(np.asarray(stack.generate(reqs[k])[0].image))

    threads = [threading.Thread(target=run, args=(k,)) for k in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.array_equal(alone["a"], alone["b"])
    assert all(np.array_equal(x, alone[k]) for k in got for x in got[k])


def test_unknown_names_and_bad_weights(stack):
    with pytest.raises(FileNotFoundError, match="nope"):
        stack.set_stack([("nope", 1.0)])
    with pytest.raises(ConfigError, match="between -10 and 10"):
        stack.set_stack([("a", 12.5)])
    with pytest.raises(ConfigError, match="twice"):
        stack.set_stack([("a", 1.0), ("A", 0.5)])


def test_cli_generate_with_loras(tiny_sd1_dir, lib, tmp_path, capsys):
    out = tmp_path / "o.png"
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "<lora:a:0.5> a circle", "--lora", "b:0.7:0.2",
               "--library", str(lib.root), "--steps", "2", "--seed", "4", "--scheduler", "ddim", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    p = parse_parameters(read_png_parameters(out))
    assert p["Prompt"] == "<lora:a:0.5> a circle <lora:b:0.2:0.7>"
    assert set(parse_lora_hashes(p["Lora hashes"])) == {"a", "b"}
    assert main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "x", "--lora", "../a", "--library",
                 str(lib.root), "--steps", "1", "--out", str(out), "--device", "cpu"]) == 2
    assert "--lora ../a: no such file" in capsys.readouterr().err


def _layer_state(pipe, adapter: str) -> dict[str, tuple]:
    """Per LoRA layer: rank, alpha, scaling and both weights of `adapter`."""
    from pipelines.stack import COMPONENTS, _lora_layers

    out = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        for name, layer in _lora_layers(model) if model is not None else ():
            if adapter in layer.lora_A:
                out[f"{comp}.{name}"] = (layer.r[adapter], layer.lora_alpha[adapter], layer.scaling[adapter],
                                         layer.lora_A[adapter].weight.detach().clone(),
                                         layer.lora_B[adapter].weight.detach().clone())
    return out


def test_adding_to_existing_lora_layers_equals_a_fresh_load(sd1, tmp_path, monkeypatch):
    # A second adapter on layers that already carry LoRA skips peft's injection (the slow part of a
    # load): it must end exactly as the general path leaves it, for per-module alphas and mixed ranks.
    import pipelines.stack as stack_mod
    from pipelines.adapters import to_kohya

    first = make_lora(sd1.pipe, rank=4, seed=5)
    second = make_lora(sd1.pipe, rank=3, seed=6)
    second.update({k: v[:2] if ".lora_A." in k else v[:, :2]  # two modules of rank 2: a rank pattern
                   for k, v in list(second.items())[:4]})
    alphas = {k.rsplit(".lora_", 1)[0]: (1.5 if i % 3 else 6.0) for i, k in enumerate(second) if ".lora_A." in k}
    save_adapter(first, tmp_path / "first.safetensors", lora_metadata(family="sd1", rank=4, alpha=4))
    save_safetensors(to_kohya(second, alphas, family="sd1"), tmp_path / "second.safetensors",
                     {"ss_network_dim": "3"})
    save_adapter(second, tmp_path / "second_ours.safetensors", lora_metadata(family="sd1", rank=3, alpha=3))
    used = []
    real = stack_mod._add_to_lora_layers
    monkeypatch.setattr(stack_mod, "_add_to_lora_layers", lambda *a: used.append(real(*a)) or used[-1])
    lib = AdapterLibrary(tmp_path)
    for second_name in ("second", "second_ours"):
        fresh = AdapterStack(sd1, lib)
        fresh.set_stack([(second_name, 0.8)])
        assert not any(used), "a model without LoRA layers takes the general path"
        want = _layer_state(sd1.pipe, fresh._loaded[second_name].adapter)
        want_out = latents(sd1.pipe)
        fresh.unload()
        used.clear()

        st = AdapterStack(sd1, lib)
        st.set_stack([("first", 1.0)])
        st.set_stack([(second_name, 0.8)])
        assert used[-2:] == [True, True], "unet and text encoder both take the fast path"
        got = _layer_state(sd1.pipe, st._loaded[second_name].adapter)
        assert got.keys() == want.keys() and len(got) > 0
        for k in want:
            assert got[k][:3] == want[k][:3], k
            assert torch.equal(got[k][3], want[k][3]) and torch.equal(got[k][4], want[k][4]), k
        assert torch.allclose(latents(sd1.pipe), want_out, atol=1e-5)
        st.unload([second_name])  # the fast-added adapter deletes cleanly
        st.set_stack([("first", 1.0)])
        assert all(st._loaded["first"].adapter in layer.lora_A
                   for _, layer in stack_mod._lora_layers(sd1.pipe.unet))
        assert not any(a.startswith("lora") and second_name in a for a in sd1.pipe.unet.peft_config)
        st.unload()
        used.clear()


# --------------------------------------------------------------------------------------------------
# step ranges: an adapter's UNet part on for some of the sampler's steps only (LBW's start= / stop=)


def test_step_ranges_parse_from_tags_and_cli_and_round_trip():
    clean, [e] = parse_lora_tags('a cat <lora:style:0.7:start=10>')
    assert clean == "a cat" and (e.weight, e.start, e.stop) == (0.7, 10, None)
    _, [e] = parse_lora_tags("<lora:style:lbw=ALL:stop=8>")  # the LoRA Block Weight extension's form
    assert (e.weight, e.start, e.stop) == (1.0, 0, 8)
    _, [e] = parse_lora_tags("<lora:s:0.5:0.9:start=2:stop=6>")
    assert (e.te_weight, e.weight, e.start, e.stop) == (0.5, 0.9, 2, 6)
    assert parse_lora_tags(e.tag())[1] == [e]
    assert e.tag() == "<lora:s:0.5:0.9:start=2:stop=6>"
    assert StackEntry("s", 0.8).tag() == "<lora:s:0.8>"
    c = parse_lora_arg("v2:style:0.8:start=5:stop=12")
    assert (c.name, c.weight, c.start, c.stop) == ("v2:style", 0.8, 5, 12)
    assert parse_lora_arg("style:start=3") == StackEntry("style", 1.0, None, 3)
    assert [e.active_at(i) for i in range(8)] == [False, False, True, True, True, True, False, False]
    assert e.scheduled(20) and not StackEntry("s", stop=20).scheduled(20) and StackEntry("s", stop=20).scheduled(30)
    with pytest.raises(ConfigError, match="'s' stop: must be after start"):
        parse_lora_tags("<lora:s:start=5:stop=5>")
    # LoRA Block Weight's shares of the steps: stop=0.4 of 20 steps is step 8 (at least step 1)
    _, [f] = parse_lora_tags("<lora:s:1:start=0.25:stop=0.5>")
    assert (f.start, f.stop) == (0.25, 0.5) and f.fractional and parse_lora_tags(f.tag())[1] == [f]
    r = f.resolved(20)
    assert (r.start, r.stop) == (5, 10) and not r.fractional and f.scheduled(20)
    assert StackEntry("s", stop=0.01).resolved(20).stop == 1 and parse_lora_arg("s:0.5:stop=0.4").stop == 0.4
    with pytest.raises(ConfigError, match="'s' start.*whole number.*share of the steps"):
        parse_lora_tags("<lora:s:start=1.5>")
    with pytest.raises(ConfigError, match="'s' stop: must be after start"):
        parse_lora_tags("<lora:s:start=0.5:stop=0.5>")
    with pytest.raises(ConfigError, match="'s' start: must be a whole number"):
        StackEntry("s", start=-1)


def _unet_layer(stack):
    unet = stack.pipe.unet
    return unet.get_submodule(LAYER)


def test_a_step_range_switches_the_unet_part_per_step_and_restores_it(sd1, stack):
    """Each UNet call sees the adapter's scale at the steps of its range, none outside; the text encoder
    keeps its weight; afterwards the stack is whole again."""
    stack.set_stack([("a", 0.8)])
    layer = _unet_layer(stack)
    adapter = [a for a in layer.lora_A if layer.scaling.get(a)][0]
    full = layer.scaling[adapter]
    seen = []
    handle = stack.pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.append(None if layer.disable_adapters else layer.scaling[adapter]))
    req = GenerationRequest(prompt="<lora:a:0.8:start=1:stop=3> a red circle", steps=4, seed=3, scheduler="DDIM")
    try:
        img = stack.generate(req)[0]
    finally:
        handle.remove()
    assert seen == [None, full, full, None]
    assert layer.scaling[adapter] == full and not layer.disable_adapters
    assert "start=1:stop=3" in parse_parameters(img.parameters)["Prompt"]
    # a range outside the steps: the UNet runs as with UNet weight 0, the text encoder still at 0.8
    never = stack.generate(GenerationRequest(prompt="<lora:a:0.8:start=4> a red circle", steps=4, seed=3,
                                             scheduler="DDIM"))[0]
    te_only = stack.generate(GenerationRequest(prompt="<lora:a:0.8:0> a red circle", steps=4, seed=3,
                                               scheduler="DDIM"))[0]
    whole = stack.generate(GenerationRequest(prompt="<lora:a:0.8> a red circle", steps=4, seed=3,
                                             scheduler="DDIM"))[0]
    assert np.array_equal(np.asarray(never.image), np.asarray(te_only.image))
    assert not np.array_equal(np.asarray(img.image), np.asarray(whole.image))
    assert not np.array_equal(np.asarray(img.image), np.asarray(never.image))
    again = stack.generate(GenerationRequest(prompt="<lora:a:0.8> a red circle", steps=4, seed=3,
                                             scheduler="DDIM"))[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(whole.image))
    # the same range as shares of the steps (LoRA Block Weight's form): the same image, the share recorded
    share = stack.generate(GenerationRequest(prompt="<lora:a:0.8:start=0.25:stop=0.75> a red circle", steps=4,
                                             seed=3, scheduler="DDIM"))[0]
    assert np.array_equal(np.asarray(share.image), np.asarray(img.image))
    assert "start=0.25:stop=0.75" in parse_parameters(share.parameters)["Prompt"]
    with pytest.raises(ConfigError, match="leave no step"):
        stack.generate(GenerationRequest(prompt="<lora:a:1:start=0.3:stop=0.35> x", steps=4, seed=3))


def test_a_step_range_in_a_combined_stack_and_on_a_fused_one(sd1, stack):
    """Two adapters share one combined slot per layer; switching one off leaves the other at its weight.
    A fused stack is unfused to run a range."""
    req = GenerationRequest(prompt="a blue square", steps=3, seed=5, scheduler="DDIM")
    ref = np.asarray(stack.generate(req, [StackEntry("a", 0.0, 1.0), StackEntry("b", 0.7)])[0].image)
    got = np.asarray(stack.generate(req, [StackEntry("a", 1.0, start=3), StackEntry("b", 0.7)])[0].image)
    assert np.array_equal(got, ref)
    stack.set_stack([StackEntry("a", 1.0, start=1), StackEntry("b", 0.7)])
    stack.fuse()
    fused_run = np.asarray(stack.generate(req, [StackEntry("a", 1.0, start=1), StackEntry("b", 0.7)])[0].image)
    assert not stack.fused
    plain = np.asarray(stack.generate(req, [StackEntry("a", 1.0, start=1), StackEntry("b", 0.7)])[0].image)
    assert np.array_equal(fused_run, plain)


def test_cli_step_ranges_on_a_file_path_and_bake_refuses_them(tiny_sd1_dir, lib, tmp_path, capsys):
    out = tmp_path / "o.png"
    common = ["--base", str(tiny_sd1_dir), "--library", str(lib.root), "--device", "cpu"]
    rc = main(["generate", *common, "--prompt", "a circle", "--lora", f"{lib.root / 'a.safetensors'}:0.8:start=1",
               "--steps", "2", "--seed", "4", "--scheduler", "ddim", "--out", str(out)])
    assert rc == 0
    assert parse_parameters(read_png_parameters(out))["Prompt"] == "a circle <lora:a:0.8:start=1>"
    capsys.readouterr()
    rc = main(["loras", "bake", *common, "--lora", "a:0.8:stop=5", "--out", str(tmp_path / "baked.safetensors")])
    assert rc == 2 and not (tmp_path / "baked.safetensors").exists()
    assert "lora 'a': a step range (start=/stop=) acts during sampling and cannot be baked" in capsys.readouterr().err


def test_cli_names_the_start_the_model_card_suggests(sd1, tiny_sd1_dir, tmp_path, capsys):
    """An adapter used at every step whose card suggests a later start: the command says so with the tag and
    the option, scaled to the run's steps; used with a range, or without a suggestion, it says nothing."""
    from pipelines.adapters import SUGGESTED_START_KEY

    root = tmp_path / "lib"
    a = make_lora(sd1.pipe, rank=4, seed=1)
    save_adapter(a, root / "ranged.safetensors",
                 {**lora_metadata(family="sd1", rank=4, alpha=8, name="ranged"), SUGGESTED_START_KEY: "10/20"})
    save_adapter(a, root / "plain.safetensors", lora_metadata(family="sd1", rank=4, alpha=8, name="plain"))
    common = ["generate", "--base", str(tiny_sd1_dir), "--library", str(root), "--device", "cpu", "--steps", "4",
              "--seed", "4", "--scheduler", "ddim", "--out", str(tmp_path / "o.png"), "--prompt"]
    assert main([*common, "a circle", "--lora", "ranged:0.8", "--lora", "plain"]) == 0
    out = capsys.readouterr().out
    assert ("note: the model card of ranged suggests acting from step 2 of 4, which keeps more of the base: "
            "<lora:ranged:0.8:start=2> in the prompt, or --lora ranged:0.8:start=2") in out
    assert "of plain" not in out
    assert main([*common, "a circle <lora:ranged:1:start=1>"]) == 0
    assert "note:" not in capsys.readouterr().out
    # a start past the last step: the image is made (a grid may sweep there) and the command says what it means
    assert main([*common, "a circle <lora:ranged:1:start=4>"]) == 0
    out = capsys.readouterr().out
    assert ("warning: ranged: start=4 is past the last of the 4 sampler steps (0 to 3), so its UNet part acts at "
            "no step") in out


# ------------------------------------------------------------------------------------------------ block weights
def test_lbw_tags_presets_and_lists_parse_and_round_trip():
    from pipelines.stack import LBW_26

    clean, [e] = parse_lora_tags("a cat <lora:x:0.8:lbw=INALL>")
    assert clean == "a cat" and e.lbw == "INALL" and e.weight == 0.8
    r = dict(zip(LBW_26, e.ratios))
    assert [b for b, v in r.items() if v] == ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"]
    # the extension's older form: the preset in place of a number; a 26-value list (LoCon) and SDXL's 12
    _, [old] = parse_lora_tags("<lora:x:1:OUTD>")
    assert old.lbw == "OUTD" and old.weight == 1.0
    _, [full] = parse_lora_tags("<lora:x:1:lbw=" + ",".join(["0"] * 14 + ["0.5"] * 12) + ">")
    assert dict(zip(LBW_26, full.ratios))["OUT00"] == 0.5 and dict(zip(LBW_26, full.ratios))["M00"] == 0
    _, [xl] = parse_lora_tags("<lora:x:1:lbw=1,0,0,0,1,1,0,0,0,0,0,0>")
    assert [b for b, v in zip(LBW_26, xl.ratios) if v] == ["BASE", "IN08", "M00"]
    assert parse_lora_tags(e.tag())[1] == [e] and parse_lora_arg("x:0.8:lbw=INALL") == StackEntry("x", 0.8, lbw="INALL")
    with pytest.raises(ConfigError, match=r"lora 'x' lbw: give a preset .* got '1,2,3'"):
        parse_lora_tags("<lora:x:1:lbw=1,2,3>")


def test_lbw_blocks_are_where_the_released_unets_keep_their_attention():
    """The extension's 17-value list names exactly SD 1.5's blocks with attention (IN01 IN02 IN04 IN05 IN07 IN08,
    M00, OUT03-OUT11) and its 12-value list exactly SDXL's (IN04 IN05 IN07 IN08, M00, OUT00-OUT05): our block of
    every attention layer of the released architectures (built on the meta device) lands in those lists."""
    import sys
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from pipelines.single_file import unet_block_prefixes, unet_layout
    from pipelines.stack import LBW_26, LBW_LISTS, layer_block

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from adapter_size import UNETS

    for arch, n in (("sd15", 17), ("sdxl", 12)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNETS[arch])
        prefixes = unet_block_prefixes(unet_layout(unet))
        blocks = {LBW_26[layer_block("unet", name, prefixes)] for name, m in unet.named_modules()
                  if name.endswith("attn1.to_q")}
        assert blocks == set(LBW_LISTS[n]) - {"BASE"}, arch
    assert layer_block("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", {}) == 0
    assert layer_block("unet", "time_embedding.linear_1", prefixes) is None  # outside the blocks: kept


def test_lbw_weights_each_block_and_bakes_the_same(sd1, lib, stack, tmp_path):
    """A list with every input block at 1 and the rest 0, at weight 0.5: each UNet layer of down_blocks moves by
    half its ΔW, every other layer (mid, up, the text encoder: BASE 0) not at all; baking writes the same."""
    from pipelines.adapters import base_modules

    in_only = ",".join(["0"] + ["1"] * 12 + ["0"] * 13)
    mods = base_modules(sd1.pipe)
    before = {m: v.weight.detach().clone() for m, v in mods.items()}
    stack.set_stack([StackEntry("a", 1.0)])
    stack.fuse()
    full = {m: base_modules(sd1.pipe)[m].weight.detach() - before[m] for m in mods}
    stack.unfuse()
    stack.set_stack([StackEntry("a", 0.5, lbw=in_only)])
    stack.fuse()
    got = {m: base_modules(sd1.pipe)[m].weight.detach() - before[m] for m in mods}
    stack.unfuse()
    moved = [m for m in mods if full[m].abs().max() > 0]
    assert any(m.startswith("unet.down_blocks.") for m in moved) and any(m.startswith("text_encoder") for m in moved)
    for m in moved:
        want = 0.5 * full[m] if m.startswith("unet.down_blocks.") else torch.zeros_like(full[m])
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-6, msg=m)
    baked = stack.bake(tmp_path / "in.safetensors", entries=[StackEntry("a", 0.5, lbw=in_only)])
    keys = {k.split(".")[0] for k in load_safetensors(baked)[0]}
    assert keys and all(k.startswith("lora_unet_down_blocks_") for k in keys)
