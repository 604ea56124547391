"""DoRA files (kohya/LyCORIS `dora_scale`, peft/diffusers `lora_magnitude_vector`) apply as A1111 and ComfyUI apply them.

The expected weights are computed here from the formula AUTOMATIC1111 (`apply_weight_decompose`) and ComfyUI
(`weight_decompose`) use, independently of the code under test: W' = (W + ΔW) · m / ‖W + ΔW‖ per input column
(per output row for LyCORIS ≥ 3.2's and peft's magnitudes), blended with the LoRA weight s as W + s · (W' − W).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_lycoris import _layers_by_kind

from app.cli import main
from pipelines.adapters import _strip_text_model, base_modules, export_adapter, inspect_adapter
from pipelines.base_models import load_base
from pipelines.errors import ConfigError, IncompatibleAdapterError
from pipelines.generation import GenerationRequest
from pipelines.library import AdapterLibrary
from pipelines.stack import AdapterStack, StackEntry
from pipelines.weights_io import load_safetensors, save_safetensors


def _dora_weight(w, delta, m, side):
    """AUTOMATIC1111's / ComfyUI's DoRA weight at strength 1 (side 'out': the row-wise form)."""
    merged = w + delta
    if side == "in":
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    else:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    return merged * (m.reshape(norm.shape) if side == "out" else m) / norm


def _dora_file(pipe, family: str, seed: int = 0):
    """A kohya-named DoRA file (LyCORIS' layout) and {our module: (ΔW incl. alpha/dim, magnitude, side)}."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    names, mods, lin, te, c3 = _layers_by_kind(pipe, family)
    sd, want = {}, {}

    def col_norm(w):  # per input channel, shaped (1, in[, 1, 1]) as LyCORIS stores it
        n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        return n.reshape(1, -1, *[1] * (w.dim() - 2))

    def lora(k, rank, alpha, side="in"):
        w = mods[names[k]].weight.detach().float()
        out_f, in_f = w.shape[0], w.shape[1]
        up = r(out_f, rank, *[1] * (w.dim() - 2))
        down = r(rank, in_f, *w.shape[2:])
        delta = (up.reshape(out_f, -1) @ down.reshape(rank, -1)).reshape(w.shape) * (alpha / rank)
        if side == "in":  # a trained magnitude: the base's column lengths, moved
            m = col_norm(w) * (1 + r(*col_norm(w).shape, s=0.2))
        else:
            m = w.reshape(out_f, -1).norm(dim=1).reshape(out_f, *[1] * (w.dim() - 1)) * (1 + r(out_f, 1, s=0.2)
                                                                                        ).reshape(out_f, *[1] * (w.dim() - 1))
        sd.update({f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(float(alpha)),
                   f"{k}.dora_scale": m})
        want[names[k]] = (delta, m, side)

    lora(lin[0], 4, 2)  # A1111's / ComfyUI's form: per input column
    lora(te[0], 2, 2)  # a text-encoder projection
    lora(c3[0], 3, 1.5)  # a 3x3 convolution: dora_scale (1, in, 1, 1)
    lora(lin[1], 2, 1, side="out")  # LyCORIS >= 3.2 (wd_on_output): (out, 1)
    # a LoHa with a magnitude (LyCORIS' dora_wd on LoHa), dim 2, alpha 2
    k = lin[2]
    w = mods[names[k]].weight.detach().float()
    w1a, w1b, w2a, w2b = r(w.shape[0], 2), r(2, w.shape[1]), r(w.shape[0], 2), r(2, w.shape[1])
    m = col_norm(w) * 1.1
    sd.update({f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b,
               f"{k}.alpha": torch.tensor(2.0), f"{k}.dora_scale": m})
    want[names[k]] = ((w1a @ w1b) * (w2a @ w2b), m, "in")
    # and a plain LoRA module without a magnitude beside them
    k = lin[3]
    w = mods[names[k]].weight.detach().float()
    up, down = r(w.shape[0], 2), r(2, w.shape[1])
    sd.update({f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(2.0)})
    want[names[k]] = (up @ down, None, None)
    return sd, want


def _expected(base_w, want_entries):
    """W + Σ sᵢ (W'ᵢ − W) for [(weight, (ΔW, m, side)), ...] (A1111 sums each network's update)."""
    w = base_w.float()
    out = w.clone()
    for s, (delta, m, side) in want_entries:
        target = w + delta if m is None else _dora_weight(w, delta, m, side)
        out += s * (target - w)
    return out


def _module(pipe, ours: str):
    comp = ours.split(".")[0]
    model = getattr(pipe, comp)
    return next(mod for name, mod in model.named_modules() if _strip_text_model(f"{comp}.{name}") == ours)


def _run(mod, w, x):
    return F.linear(x, w, mod.bias) if w.dim() == 2 else F.conv2d(x, w, mod.bias, padding=mod.padding,
                                                                  stride=mod.stride)


def _inputs(w, g):
    return torch.randn(3, w.shape[1], generator=g) if w.dim() == 2 else torch.randn(1, w.shape[1], 6, 6, generator=g)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family_base(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


def test_dora_layers_compute_and_fuse_what_a1111_and_comfyui_apply(family_base, tmp_path):
    family, d = family_base
    base = load_base(str(d), device="cpu")
    sd, want = _dora_file(base.pipe, family)
    path = save_safetensors(sd, tmp_path / "dora.safetensors", {"ss_network_module": "lycoris.kohya",
                                                                "ss_network_args": '{"dora_wd": "True"}'})
    mods = base_modules(base.pipe)
    originals = {m: mods[m].weight.detach().clone() for m in want}
    g = torch.Generator().manual_seed(3)
    xs = {m: _inputs(originals[m], g) for m in want}
    with torch.no_grad():
        plain = {m: _module(base.pipe, m)(xs[m]) for m in want}
    stack = AdapterStack(base)
    info = stack.load("dora", path)
    assert info.network.startswith("LoHa + LoRA (DoRA)") and info.matched == info.total == len(want)
    assert stack.is_dora("dora")
    for weight in (1.0, 0.6, -0.5):
        stack.set_stack([StackEntry("dora", weight, weight)])
        for m, entry in want.items():
            exp = _expected(originals[m], [(weight, entry)])
            with torch.no_grad():
                got = _module(base.pipe, m)(xs[m])
            torch.testing.assert_close(got, _run(mods[m], exp, xs[m]), rtol=1e-4, atol=1e-5, msg=f"{m} at {weight}")
    # fused: the base weights hold exactly that weight
    stack.set_stack([("dora", 0.6)])
    stack.fuse()
    fused = base_modules(base.pipe)
    for m, entry in want.items():
        torch.testing.assert_close(fused[m].weight.float(), _expected(originals[m], [(0.6, entry)]),
                                   rtol=1e-4, atol=1e-5, msg=m)
    stack.unfuse()
    for m in want:  # unfused: the base weights back bit for bit, and the layers still compute the DoRA weight
        assert torch.equal(mods[m].weight, originals[m]), m
        with torch.no_grad():
            got = _module(base.pipe, m)(xs[m])
        torch.testing.assert_close(got, _run(mods[m], _expected(originals[m], [(0.6, want[m])]), xs[m]),
                                   rtol=1e-4, atol=1e-5, msg=m)
    # no adapter selected, then unloaded: the base model's own computation, bit for bit
    for clear in (stack.clear, stack.unload):
        clear()
        with torch.no_grad():
            for m in want:
                assert torch.equal(_module(base.pipe, m)(xs[m]), plain[m]), m
    assert all("forward" not in mod.__dict__ for mod in base_modules(base.pipe).values())


def test_two_dora_adapters_and_a_lora_stack_as_a1111_sums_them(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd1, want1 = _dora_file(base.pipe, "sd1", seed=1)
    sd2, want2 = _dora_file(base.pipe, "sd1", seed=2)
    a = save_safetensors(sd1, tmp_path / "a.safetensors")
    b = save_safetensors(sd2, tmp_path / "b.safetensors")
    mods = base_modules(base.pipe)
    originals = {m: mods[m].weight.detach().clone() for m in want1}
    stack = AdapterStack(base)
    stack.load("a", a)
    stack.load("b", b)
    stack.set_stack([StackEntry("a", 0.8, 0.8), StackEntry("b", 0.5, 0.5)])
    g = torch.Generator().manual_seed(4)
    for m in want1:
        x = _inputs(originals[m], g)
        exp = _expected(originals[m], [(0.8, want1[m]), (0.5, want2[m])])
        with torch.no_grad():
            got = _module(base.pipe, m)(x)
        torch.testing.assert_close(got, _run(mods[m], exp, x), rtol=1e-4, atol=1e-5, msg=m)
    # only the UNet's part at 0 (text-encoder weight kept): the UNet layers compute the base's weights
    stack.set_stack([StackEntry("a", 0.0, 1.0)])
    for m in want1:
        x = _inputs(originals[m], g)
        weight = 1.0 if m.startswith("text_encoder") else 0.0
        exp = _expected(originals[m], [(weight, want1[m])])
        with torch.no_grad():
            got = _module(base.pipe, m)(x)
        torch.testing.assert_close(got, _run(mods[m], exp, x), rtol=1e-4, atol=1e-5, msg=m)


def test_peft_named_dora_file_applies_its_magnitudes(tiny_sd1_dir, tmp_path):
    """diffusers / peft save a DoRA adapter as lora_A / lora_B plus `lora_magnitude_vector` (one length per
    output row); peft's `use_dora` in its metadata must not build DoRA layers again over the folded factors."""
    import json

    base = load_base(str(tiny_sd1_dir), device="cpu")
    mods = base_modules(base.pipe)
    target = next(m for m in sorted(mods) if m.startswith("unet.") and m.endswith("attn2.to_q"))
    w = mods[target].weight.detach().float()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 4, generator=g) * 0.3
    m = w.norm(dim=1) * 1.2  # (out,)
    sd = {f"{target}.lora_A.weight": a, f"{target}.lora_B.weight": b, f"{target}.lora_magnitude_vector": m}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_dora": True,
                                                 "unet.target_modules": [target[len("unet."):]]})}
    path = save_safetensors(sd, tmp_path / "peft-dora.safetensors", meta)
    info = inspect_adapter(path, base)
    assert info.network.startswith("DoRA dim 4") and info.format == "peft"
    stack = AdapterStack(base)
    stack.load("p", path)
    stack.set_stack([("p", 0.7)])
    x = torch.randn(2, w.shape[1], generator=g)
    exp = _expected(w, [(0.7, (b @ a, m, "out"))])
    with torch.no_grad():
        got = _module(base.pipe, target)(x)
    torch.testing.assert_close(got, _run(mods[target], exp, x), rtol=1e-4, atol=1e-5)


def test_generation_with_a_dora_adapter_runs_and_leaves_the_base_intact(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, _ = _dora_file(base.pipe, "sd1", seed=6)
    path = save_safetensors(sd, tmp_path / "dora.safetensors")
    stack = AdapterStack(base)
    req = GenerationRequest(prompt="a red circle", steps=4, width=64, height=64, seed=1)
    before = stack.generate(req)[0].image
    stack.load("dora", path)
    fused_and_not = []
    for entry in ("dora", StackEntry("dora", 1.0, 1.0, start=2)):  # whole run; and acting from step 2 on
        img = stack.generate(req, [entry])[0].image
        assert img.tobytes() != before.tobytes()
        fused_and_not.append(img)
    stack.set_stack(["dora"])
    stack.fuse()
    fused = stack.generate(req, ["dora"])[0].image
    assert stack.fused
    diff = (torch.tensor(list(fused.getdata()), dtype=torch.float32)
            - torch.tensor(list(fused_and_not[0].getdata()), dtype=torch.float32)).abs().max()
    assert float(diff) <= 2.0  # fused and unfused compute the same weights (float rounding only)
    stack.unfuse()
    stack.clear()
    assert stack.generate(req)[0].image.tobytes() == before.tobytes()


def test_dora_files_are_refused_where_a_plain_lora_must_come_out(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, want = _dora_file(base.pipe, "sd1", seed=7)
    path = save_safetensors(sd, tmp_path / "civitai-dora.safetensors")
    # diffusers' format has no place for A1111's DoRA lengths; kohya's has, but not for per-output ones
    with pytest.raises(IncompatibleAdapterError, match="civitai-dora.safetensors: it is a DoRA adapter"):
        export_adapter(path, tmp_path / "p.safetensors", "peft", base=base)
    out_side = next(k for k, v in sd.items() if k.endswith(".dora_scale") and v.shape[1] == 1)
    with pytest.raises(IncompatibleAdapterError, match=rf"module '{out_side.split('.')[0]}': .*per output channel"):
        export_adapter(path, tmp_path / "k.safetensors", "kohya", base=base)
    stack = AdapterStack(base)
    stack.load("civitai-dora", path)
    with pytest.raises(ConfigError, match="'civitai-dora' is a DoRA adapter.*checkpoint"):
        stack.bake(tmp_path / "baked.safetensors", entries=[("civitai-dora", 0.5)])
    # a checkpoint holds it: the merged weights are the DoRA weights
    out = stack.bake_checkpoint(tmp_path / "merged.safetensors", entries=[("civitai-dora", 0.5)])
    merged = load_base(str(out), device="cpu")
    mods = base_modules(merged.pipe)
    m = next(m for m, e in want.items() if e[1] is not None and m.startswith("unet."))
    torch.testing.assert_close(mods[m].weight.float(),
                               _expected(base_modules(base.pipe)[m].weight.detach(), [(0.5, want[m])]),
                               rtol=1e-4, atol=1e-4)
    # a magnitude that fits neither side of its layer: refused naming the module, nothing loaded
    k = next(key for key in sd if key.endswith(".dora_scale"))
    bad = dict(sd)
    bad[k] = torch.ones(1, 3)
    bad_path = save_safetensors(bad, tmp_path / "bad.safetensors")
    fresh = AdapterStack(base)
    with pytest.raises(IncompatibleAdapterError, match=rf"bad.safetensors: module '{k.split('.')[0]}': .*shape"):
        fresh.load("bad", bad_path)
    assert not fresh.loaded


def test_library_and_cli_name_a_dora_file(tiny_sd1_dir, tmp_path, capsys):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, _ = _dora_file(base.pipe, "sd1", seed=8)
    loha = {k.split(".")[0] for k in sd if ".hada_" in k}
    only_lora = {k: v for k, v in sd.items() if k.split(".")[0] not in loha}
    src = save_safetensors(only_lora, tmp_path / "my-dora.safetensors", {"ss_network_module": "lycoris.kohya"})
    lib = AdapterLibrary(tmp_path / "lib")
    info = lib.import_file(src)
    assert info.network.startswith("DoRA dim") and info.rank_text.startswith("DoRA dim")
    assert main(["loras", "info", "my-dora", "--library", str(tmp_path / "lib"), "--base", str(tiny_sd1_dir)]) == 0
    out = capsys.readouterr().out
    assert "DoRA dim" in out and "AUTOMATIC1111 and ComfyUI" in out
    # and it generates from the CLI by name
    assert main(["generate", "--base", str(tiny_sd1_dir), "--library", str(tmp_path / "lib"), "--prompt",
                 "a red circle <lora:my-dora:0.8>", "--steps", "3", "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").stat().st_size > 0


def test_kohya_export_of_a_dora_file_keeps_what_it_applies(tiny_sd1_dir, tmp_path):
    """A civitai DoRA (here a LoHa with lengths, LyCORIS' dora_wd) exported for A1111 / ComfyUI: plain LoRA pairs
    plus the same per-input `dora_scale`, which applies exactly as the original does."""
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, want = _dora_file(base.pipe, "sd1", seed=9)
    out_side = {k.split(".")[0] for k, v in sd.items() if k.endswith(".dora_scale") and v.shape[1] == 1}
    sd = {k: v for k, v in sd.items() if k.split(".")[0] not in out_side}
    src = save_safetensors(sd, tmp_path / "loha-dora.safetensors", {"ss_network_module": "lycoris.kohya"})
    out = export_adapter(src, tmp_path / "k.safetensors", "kohya", base=base)
    k, meta = load_safetensors(out)
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")) for key in k)
    assert {key for key in k if key.endswith(".dora_scale")} == {key for key in sd if key.endswith(".dora_scale")}
    assert "LoHa" in meta["lora_studio.converted_from"] and "DoRA" in meta["lora_studio.converted_from"]
    assert inspect_adapter(out, base).network.startswith("DoRA")
    g = torch.Generator().manual_seed(11)
    mods = base_modules(base.pipe)
    stack = AdapterStack(base)
    stack.load("src", src)
    stack.load("out", out)
    for m in [m for m in want if want[m][1] is None or want[m][2] == "in"]:
        x = _inputs(mods[m].weight, g)
        got = {}
        for name in ("src", "out"):
            stack.set_stack([StackEntry(name, 0.7, 0.7)])
            with torch.no_grad():
                got[name] = _module(base.pipe, m)(x)
        torch.testing.assert_close(got["out"], got["src"], rtol=1e-4, atol=1e-5, msg=m)
        torch.testing.assert_close(got["src"], _run(mods[m], _expected(mods[m].weight.detach(), [(0.7, want[m])]), x),
                                   rtol=1e-4, atol=1e-5, msg=m)
