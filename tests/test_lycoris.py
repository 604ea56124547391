"""LyCORIS adapters from civitai (LoHa, LoKr, CP-decomposed LoCon) load, weight, fuse and export exactly.

The expected weight differences are computed here the way AUTOMATIC1111 and ComfyUI apply these files
(LoHa: (w1a·w1b) ⊙ (w2a·w2b); LoKr: w1 ⊗ w2; Tucker cores contracted; scale alpha/dim, or 1 for a LoKr of two
full matrices), independently of the converter under test, and compared with the base weights after the
adapter is fused at a weight.
"""

from __future__ import annotations

import pytest
import torch
from test_kohya_layout import _every_layer_lora

from app.cli import main
from pipelines.adapters import (_strip_text_model, base_modules, export_adapter, inspect_adapter, peft_key_map,
                                to_kohya)
from pipelines.base_models import load_base
from pipelines.errors import IncompatibleAdapterError
from pipelines.library import AdapterLibrary
from pipelines.single_file import unet_layout
from pipelines.stack import AdapterStack
from pipelines.weights_io import load_safetensors, save_safetensors

WEIGHT = 0.7


def _kohya_names(pipe, family: str) -> dict[str, str]:
    """{kohya module name: our module name} for every Linear/Conv2d of the UNet and text encoder(s)."""
    fake = _every_layer_lora(pipe, rank=1)  # factors for every Linear and Conv2d: only their names matter here
    kohya = to_kohya(fake, 1.0, family=family, layout=unet_layout(pipe.unet))
    kmap = peft_key_map(list(kohya), "kohya", pipe.unet.config.layers_per_block
                        if isinstance(pipe.unet.config.layers_per_block, int) else pipe.unet.config.layers_per_block[0])
    return {k.split(".")[0]: _strip_text_model(v.rsplit(".lora_", 1)[0])
            for k, v in kmap.items() if k.endswith(".lora_down.weight")}


def _layers_by_kind(pipe, family: str):
    """(kohya name -> our name, our name -> base module, the UNet's attention Linears, the first text encoder's
    q_proj layers, the ResNets' 3x3 convolutions of an even input width), kohya names, sorted."""
    names = _kohya_names(pipe, family)
    mods = base_modules(pipe)
    lin = [k for k, v in sorted(names.items()) if isinstance(mods.get(v), torch.nn.Linear) and ".attn" in v
           and v.startswith("unet.")]
    te = [k for k, v in sorted(names.items()) if v.startswith("text_encoder.") and v.endswith("q_proj")]
    c3 = [k for k, v in sorted(names.items()) if isinstance(mods.get(v), torch.nn.Conv2d)
          and mods[v].kernel_size == (3, 3) and "resnets" in v and mods[v].in_channels % 2 == 0]
    return names, mods, lin, te, c3


def _lycoris_file(pipe, family: str, seed: int = 0):
    """A file with one module of each kind, and the ΔW (times alpha/dim) each should add, by our module name."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    names, mods, lin, te, c3 = _layers_by_kind(pipe, family)
    sd, want = {}, {}

    def shape_of(k):
        m = mods[names[k]]
        return (m.out_features, m.in_features) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape)

    # LoHa on a linear layer, dim 4, alpha 2
    k = lin[0]
    o, i = shape_of(k)
    w1a, w1b, w2a, w2b = r(o, 4), r(4, i), r(o, 4), r(4, i)
    sd.update({f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b,
               f"{k}.alpha": torch.tensor(2.0)})
    want[names[k]] = (w1a @ w1b) * (w2a @ w2b) * (2.0 / 4)
    # LoHa on a text-encoder projection, dim 2, no alpha (scale 1)
    k = te[0]
    o, i = shape_of(k)
    w1a, w1b, w2a, w2b = r(o, 2), r(2, i), r(o, 2), r(2, i)
    sd.update({f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b})
    want[names[k]] = (w1a @ w1b) * (w2a @ w2b)
    # LoHa on a 3x3 convolution, stored flattened (r, in·9) as LyCORIS does without Tucker
    k = c3[0]
    o, i, kh, kw = shape_of(k)
    w1a, w1b, w2a, w2b = r(o, 3), r(3, i * kh * kw), r(o, 3), r(3, i * kh * kw)
    sd.update({f"{k}.hada_w1_a": w1a, f"{k}.hada_w1_b": w1b, f"{k}.hada_w2_a": w2a, f"{k}.hada_w2_b": w2b,
               f"{k}.alpha": torch.tensor(1.5)})
    want[names[k]] = ((w1a @ w1b) * (w2a @ w2b)).reshape(o, i, kh, kw) * (1.5 / 3)
    # LoHa with Tucker cores on another 3x3 convolution
    k = c3[1]
    o, i, kh, kw = shape_of(k)
    t1, a1, b1, t2, a2, b2 = r(2, 2, kh, kw), r(2, o), r(2, i), r(2, 2, kh, kw), r(2, o), r(2, i)
    sd.update({f"{k}.hada_t1": t1, f"{k}.hada_w1_a": a1, f"{k}.hada_w1_b": b1, f"{k}.hada_t2": t2,
               f"{k}.hada_w2_a": a2, f"{k}.hada_w2_b": b2, f"{k}.alpha": torch.tensor(2.0)})
    cp = lambda t, a, b: torch.einsum("abkl,ao,bi->oikl", t, a, b).contiguous()  # noqa: E731
    want[names[k]] = cp(t1, a1, b1) * cp(t2, a2, b2) * (2.0 / 2)
    # LoKr: full w1 (2 x 2) ⊗ low-rank w2 (dim 3), alpha 6, on a linear layer
    k = lin[1]
    o, i = shape_of(k)
    w1, w2a, w2b = r(2, 2), r(o // 2, 3), r(3, i // 2)
    sd.update({f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(6.0)})
    want[names[k]] = torch.kron(w1, w2a @ w2b) * (6.0 / 3)
    # LoKr of two full matrices: alpha is ignored (scale 1)
    k = lin[2]
    o, i = shape_of(k)
    w1, w2 = r(4, 2), r(o // 4, i // 2)
    sd.update({f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(100.0)})
    want[names[k]] = torch.kron(w1, w2)
    # LoKr on a 3x3 convolution: low-rank w1, full 4-D w2
    k = c3[2]
    o, i, kh, kw = shape_of(k)
    w1a, w1b, w2 = r(2, 1), r(1, 2), r(o // 2, i // 2, kh, kw)
    sd.update({f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(0.5)})
    want[names[k]] = torch.kron((w1a @ w1b)[:, :, None, None], w2) * (0.5 / 1)
    # LoKr on a 3x3 convolution with a Tucker core on w2 (dim 2)
    k = c3[3]
    o, i, kh, kw = shape_of(k)
    w1, t2, w2a, w2b = r(2, 2), r(2, 2, kh, kw), r(2, o // 2), r(2, i // 2)
    sd.update({f"{k}.lokr_w1": w1, f"{k}.lokr_t2": t2, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
               f"{k}.alpha": torch.tensor(1.0)})
    want[names[k]] = torch.kron(w1[:, :, None, None], cp(t2, w2a, w2b)) * (1.0 / 2)
    # LoCon with a CP middle (LyCORIS `lora_mid`) on a 3x3 convolution
    k = c3[4]
    o, i, kh, kw = shape_of(k)
    up, mid, down = r(o, 2, 1, 1), r(2, 2, kh, kw), r(2, i, 1, 1)
    sd.update({f"{k}.lora_up.weight": up, f"{k}.lora_mid.weight": mid, f"{k}.lora_down.weight": down,
               f"{k}.alpha": torch.tensor(1.0)})
    want[names[k]] = torch.einsum("oa,abkl,bi->oikl", up.flatten(1), mid, down.flatten(1)) * (1.0 / 2)
    # and a plain LoRA module beside them (LyCORIS' LoCon files mix them)
    k = lin[3]
    o, i = shape_of(k)
    up, down = r(o, 2), r(2, i)
    sd.update({f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(1.0)})
    want[names[k]] = up @ down * 0.5
    return sd, want


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family_base(request):
    d = request.getfixturevalue(f"tiny_{request.param}_dir")
    return request.param, d


def _fused_deltas(base, path, modules, name="lyco"):
    """(the base weights, the weights with the file fused at WEIGHT) for `modules`."""
    stack = AdapterStack(base)
    mods = base_modules(base.pipe)
    before = {m: mods[m].weight.detach().clone() for m in modules}
    stack.load(name, path)
    stack.set_stack([(name, WEIGHT)])
    stack.fuse()
    mods = base_modules(base.pipe)
    after = {m: mods[m].weight.detach().clone() for m in modules}
    stack.unfuse()
    stack.unload()
    return before, after


def test_loha_lokr_and_cp_locon_add_what_a1111_adds(family_base, tmp_path):
    family, d = family_base
    base = load_base(str(d), device="cpu")
    sd, want = _lycoris_file(base.pipe, family)
    path = save_safetensors(sd, tmp_path / "lyco.safetensors", {"ss_network_module": "lycoris.kohya"})
    before, after = _fused_deltas(base, path, list(want))
    for module, delta in want.items():
        torch.testing.assert_close(after[module] - before[module], WEIGHT * delta.reshape(before[module].shape),
                                   rtol=1e-4, atol=1e-5, msg=module)
    # what the library and `loras info` show: the file's own terms
    info = inspect_adapter(path, base)
    assert info.format == "lycoris" and info.matched == info.total == len(want)
    assert info.network.startswith(("LoHa + LoKr", "LoKr + LoHa")) and "LoCon (CP)" in info.network


def test_export_writes_an_exact_plain_lora_and_needs_the_base_for_flattened_convs(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, want = _lycoris_file(base.pipe, "sd1", seed=1)
    path = save_safetensors(sd, tmp_path / "lyco.safetensors", {"ss_network_module": "lycoris.kohya",
                                                                "ss_network_dim": "4"})
    with pytest.raises(IncompatibleAdapterError, match="lyco.safetensors: .*flattened.*--base"):
        export_adapter(path, tmp_path / "k.safetensors", "kohya")
    out = export_adapter(path, tmp_path / "k.safetensors", "kohya", base=base)
    k, meta = load_safetensors(out)
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in k)
    assert meta["lora_studio.converted_from"].startswith("LyCORIS ") and meta["ss_network_module"] == "networks.lora"
    # every LoRA down factor of a 3x3 convolution is 4-D, as AUTOMATIC1111 builds its Conv2d from it
    mods, names = base_modules(base.pipe), _kohya_names(base.pipe, "sd1")
    for key, v in k.items():
        m = mods[names[key.split(".")[0]]]
        if key.endswith("lora_down.weight") and isinstance(m, torch.nn.Conv2d):
            assert tuple(v.shape[1:]) == (m.in_channels, *m.kernel_size), key
    before, after = _fused_deltas(base, out, list(want), name="plain")
    for module, delta in want.items():
        torch.testing.assert_close(after[module] - before[module], WEIGHT * delta.reshape(before[module].shape),
                                   rtol=1e-4, atol=1e-5, msg=module)


def test_unsupported_lycoris_types_are_refused_naming_module_and_type(tiny_sd1_dir, tmp_path):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    names = _kohya_names(base.pipe, "sd1")
    k = next(n for n in sorted(names) if n.endswith("attn1_to_k"))
    ia3 = save_safetensors({f"{k}.weight": torch.ones(8), f"{k}.on_input": torch.tensor(False)},
                           tmp_path / "ia3.safetensors")
    stack = AdapterStack(base)
    with pytest.raises(IncompatibleAdapterError, match=rf"ia3.safetensors: module '{k}' is a LyCORIS \(IA\)³ layer"):
        stack.load("ia3", ia3)
    half = save_safetensors({f"{k}.hada_w1_a": torch.ones(4, 2), f"{k}.hada_w1_b": torch.ones(2, 4)},
                            tmp_path / "half.safetensors")
    with pytest.raises(IncompatibleAdapterError, match=rf"half.safetensors: module '{k}': .*LoHa.*hada_w2_a"):
        inspect_adapter(half)
    assert not stack.loaded  # nothing was touched


def test_library_keeps_the_original_file_and_cli_info_names_it(tiny_sd1_dir, tmp_path, capsys):
    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, _ = _lycoris_file(base.pipe, "sd1", seed=2)
    src = save_safetensors(sd, tmp_path / "civitai-loha.safetensors", {"ss_network_module": "lycoris.kohya"})
    lib = AdapterLibrary(tmp_path / "lib")
    info = lib.import_file(src)
    assert info.format == "lycoris"
    assert (tmp_path / "lib" / "civitai-loha.safetensors").read_bytes() == src.read_bytes()
    assert main(["loras", "info", "civitai-loha", "--library", str(tmp_path / "lib"), "--base", str(tiny_sd1_dir)]) == 0
    out = capsys.readouterr().out
    assert "LyCORIS LoHa" in out and "exact LoRA" in out
    assert "lycoris keys" in out


def test_training_further_from_a_lycoris_file_is_refused_naming_it(star_images, tiny_sd1_dir, tmp_path):
    from training.config import TrainConfig
    from training.trainer import train

    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, _ = _lycoris_file(base.pipe, "sd1", seed=3)
    src = save_safetensors(sd, tmp_path / "civitai-lokr.safetensors")
    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), max_steps=1,
                      batch_size=2, device="cpu", name="more", rank=4, seed=3, init_adapter=str(src))
    with pytest.raises(IncompatibleAdapterError,
                       match="civitai-lokr.safetensors: a LyCORIS .* cannot be trained further"):
        train(cfg)
    assert not (tmp_path / "lib" / "more.safetensors").exists()


def test_fp16_files_convert_to_fp16_factors_of_the_same_difference(tiny_sd1_dir):
    """civitai's LyCORIS files are fp16: their LoRA factors stay fp16 (half the memory), the same ΔW to fp16
    precision."""
    from pipelines.lycoris import to_lora

    base = load_base(str(tiny_sd1_dir), device="cpu")
    sd, _ = _lycoris_file(base.pipe, "sd1", seed=6)
    full = to_lora(sd).state_dict
    half = to_lora({k: v.half() if v.ndim else v for k, v in sd.items()}).state_dict
    assert full.keys() == half.keys()
    for k in (k for k in half if k.endswith("lora_down.weight")):
        m = k.split(".")[0]
        assert half[k].dtype == torch.float16 and full[k].dtype == torch.float32

        def delta(s):
            up, down = s[f"{m}.lora_up.weight"].float(), s[f"{m}.lora_down.weight"].float()
            return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)

        torch.testing.assert_close(delta(half), delta(full), rtol=2e-2, atol=2e-3)


def test_sd1_projections_stored_flat_need_the_base_to_export_and_load_with_it(tiny_sd1_dir, tmp_path):
    """SD 1.x's proj_in/proj_out are 1x1 convolutions that LyCORIS stores as 2-D factors: an export without the
    base would write factors AUTOMATIC1111 cannot load, so it asks for --base; with it the file loads here."""
    base = load_base(str(tiny_sd1_dir), device="cpu")
    names = _kohya_names(base.pipe, "sd1")
    k = next(n for n in sorted(names) if n.endswith("attentions_0_proj_in"))
    mod = base_modules(base.pipe)[names[k]]
    g = torch.Generator().manual_seed(7)
    o, i = mod.out_channels, mod.in_channels
    sd = {f"{k}.hada_w1_a": torch.randn(o, 2, generator=g), f"{k}.hada_w1_b": torch.randn(2, i, generator=g),
          f"{k}.hada_w2_a": torch.randn(o, 2, generator=g), f"{k}.hada_w2_b": torch.randn(2, i, generator=g)}
    path = save_safetensors(sd, tmp_path / "proj.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="proj.safetensors: .*flattened.*--base"):
        export_adapter(path, tmp_path / "k.safetensors", "kohya")
    out = export_adapter(path, tmp_path / "k.safetensors", "kohya", base=base)
    assert load_safetensors(out)[0][f"{k}.lora_down.weight"].shape == (4, i, 1, 1)
    before, after = _fused_deltas(base, out, [names[k]])
    want = ((sd[f"{k}.hada_w1_a"] @ sd[f"{k}.hada_w1_b"]) * (sd[f"{k}.hada_w2_a"] @ sd[f"{k}.hada_w2_b"]))
    torch.testing.assert_close((after[names[k]] - before[names[k]]).flatten(1), WEIGHT * want, rtol=1e-4, atol=1e-5)


def test_trained_scale_loha_in_fp16_keeps_its_difference(tiny_sd1_dir):
    """Trained LoHa factors are small (w2_a ~1e-3): their products would sink below fp16's normal range unless
    the factors are balanced; the fp16 conversion stays as exact as fp16 itself."""
    from pipelines.lycoris import to_lora

    g = torch.Generator().manual_seed(8)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{k}.hada_w1_a": torch.randn(320, 16, generator=g) * 0.02, f"{k}.hada_w1_b": torch.randn(16, 320, generator=g),
          f"{k}.hada_w2_a": torch.randn(320, 16, generator=g) * 1e-3, f"{k}.hada_w2_b": torch.randn(16, 320, generator=g),
          f"{k}.alpha": torch.tensor(8.0)}
    half = {n: (v.half() if v.ndim else v) for n, v in sd.items()}
    ref = (half[f"{k}.hada_w1_a"].float() @ half[f"{k}.hada_w1_b"].float()) * \
        (half[f"{k}.hada_w2_a"].float() @ half[f"{k}.hada_w2_b"].float())
    got = to_lora(half).state_dict
    up, down = got[f"{k}.lora_up.weight"], got[f"{k}.lora_down.weight"]
    delta = up.float() @ down.float()
    assert float((delta - ref).norm() / ref.norm()) < 2e-3


def test_lycoris_keys_in_another_naming_are_refused_by_name(tmp_path):
    path = save_safetensors({"unet.down_blocks.0.attn1.to_q.hada_w1_a": torch.ones(4, 2),
                             "unet.down_blocks.0.attn1.to_q.hada_w1_b": torch.ones(2, 4)}, tmp_path / "p.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="p.safetensors: 'unet.down_blocks.*kohya's naming"):
        inspect_adapter(path)
