"""Adapter files: every common LoRA format loads as diffusers itself loads it; bad files are refused first."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import latents, make_lora

from pipelines.adapters import (
    canonical_peft_keys,
    DIFFUSERS_METADATA_KEY,
    detect_format,
    export_kohya,
    inspect_adapter,
    lora_metadata,
    save_adapter,
    to_kohya,
)
from pipelines.base_models import load_base
from pipelines.errors import CorruptWeightsError, IncompatibleAdapterError, PickleRefusedError
from pipelines.stack import AdapterStack
from pipelines.weights_io import addnet_hash, load_safetensors, save_safetensors


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_base(tiny_sdxl_dir, device="cpu")


@pytest.fixture(scope="module")
def sd1_ref(sd1):
    return latents(sd1.pipe)


@pytest.fixture(scope="module")
def sdxl_ref(sdxl):
    return latents(sdxl.pipe)


def _old_diffusers(sd: dict) -> dict:
    """The attention-processor format of diffusers < 0.21 (`processor.to_q_lora.down.weight`)."""
    out = {}
    for k, v in sd.items():
        k = k.replace(".lora_A.weight", "_lora.down.weight").replace(".lora_B.weight", "_lora.up.weight")
        k = k.replace(".to_out.0_lora", ".to_out_lora")
        for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
            k = k.replace(f".{a}_lora.", f".{b}_lora.")
        if k.startswith("unet."):
            k = k.replace(".to_", ".processor.to_", 1)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def files(sd1, sdxl, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter_files")
    f = {}
    sd = make_lora(sd1.pipe, rank=4, seed=1)
    f["ours"] = save_adapter(sd, d / "ours.safetensors", lora_metadata(family="sd1", rank=4, alpha=8, name="ours",
                                                                      trigger_word="sks"))
    save_safetensors(sd, d / "plain_peft.safetensors")  # diffusers' convention without metadata: alpha = rank
    f["plain_peft"] = d / "plain_peft.safetensors"
    f["kohya"] = export_kohya(f["ours"], d / "kohya.safetensors")
    k, meta = load_safetensors(f["kohya"])
    f["kohya_noalpha"] = save_safetensors({n: v for n, v in k.items() if not n.endswith(".alpha")},
                                          d / "kohya_noalpha.safetensors", meta)
    f["diffusers_old"] = save_safetensors(_old_diffusers(sd), d / "old.safetensors")
    # written by diffusers' own save_lora_weights (text-encoder keys as transformers 5 names them), alpha 6
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    StableDiffusionPipeline.save_lora_weights(
        d, weight_name="diffusers_saved.safetensors",
        unet_lora_layers={k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")},
        text_encoder_lora_layers={k[len("text_encoder.text_model."):]: v for k, v in sd.items()
                                  if k.startswith("text_encoder.")},
        unet_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
                                              ).to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj",
                                                                                         "v_proj", "out_proj"]).to_dict())
    f["diffusers_saved"] = d / "diffusers_saved.safetensors"
    sdx = make_lora(sdxl.pipe, rank=2, seed=3, components=("unet", "text_encoder", "text_encoder_2"))
    f["xl_ours"] = save_adapter(sdx, d / "xl_ours.safetensors", lora_metadata(family="sdxl", rank=2, alpha=3))
    f["xl_kohya"] = export_kohya(f["xl_ours"], d / "xl_kohya.safetensors", base=sdxl)
    # kohya keys with diffusers' UNet names (down_blocks_…), as some tools write SDXL files
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    dnames = convert_state_dict_to_kohya(canonical_peft_keys(sdx))
    dnames = {k: (torch.tensor(3.0) if k.endswith(".alpha") else v) for k, v in dnames.items()}
    f["xl_kohya_dnames"] = save_safetensors(dnames, d / "xl_kohya_dnames.safetensors")
    return f


def _reference(base, path):
    """The output after diffusers' own `load_lora_weights` of the file."""
    base.pipe.load_lora_weights(str(path), adapter_name="reference")
    try:
        return latents(base.pipe)
    finally:
        base.pipe.unload_lora_weights()


def _ours(base, path):
    st = AdapterStack(base)
    st.load("x", path)
    st.set_stack([("x", 1.0)])
    try:
        return latents(base.pipe)
    finally:
        st.unload()


@pytest.mark.parametrize("key,fmt", [("ours", "peft"), ("plain_peft", "peft"), ("diffusers_saved", "peft"),
                                     ("kohya", "kohya"),
                                     ("kohya_noalpha", "kohya"), ("diffusers_old", "diffusers_old")])
def test_sd1_formats_load_as_diffusers_loads_them(sd1, sd1_ref, files, key, fmt):
    path = files[key]
    assert detect_format(load_safetensors(path)[0]) == fmt
    ref = _reference(sd1, path)
    ours = _ours(sd1, path)
    assert (ref - sd1_ref).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert torch.equal(latents(sd1.pipe), sd1_ref)  # and unloading restored the base exactly
    info = inspect_adapter(path, sd1)
    assert (info.matched, info.total) == (40, 40) and info.format == fmt
    assert info.alpha == {"ours": 8, "kohya": 8, "diffusers_saved": 6}.get(key, 4)


@pytest.mark.parametrize("key", ["xl_ours", "xl_kohya", "xl_kohya_dnames"])
def test_sdxl_formats_load_as_diffusers_loads_them(sdxl, sdxl_ref, files, key):
    ref = _reference(sdxl, files[key])
    ours = _ours(sdxl, files[key])
    assert (ref - sdxl_ref).abs().max() > 1e-3
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    info = inspect_adapter(files[key], sdxl)
    assert info.components == ["unet", "text_encoder", "text_encoder_2"] and info.matched == info.total


def test_same_adapter_in_every_format_gives_the_same_image(sd1, sdxl, files):
    assert torch.allclose(_ours(sd1, files["ours"]), _ours(sd1, files["kohya"]), atol=1e-6, rtol=0)
    a = _ours(sdxl, files["xl_ours"])
    assert torch.allclose(a, _ours(sdxl, files["xl_kohya"]), atol=1e-6, rtol=0)
    assert torch.allclose(a, _ours(sdxl, files["xl_kohya_dnames"]), atol=1e-6, rtol=0)


def test_alpha_not_equal_rank_is_honoured_by_diffusers_itself(sd1, files):
    """Our metadata makes diffusers apply alpha/rank = 8/4 = 2 (without it, peft files get scale 1)."""
    sd, meta = load_safetensors(files["ours"])
    cfg = json.loads(meta[DIFFUSERS_METADATA_KEY])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 8
    pipe = sd1.pipe
    pipe.load_lora_weights(str(files["ours"]), adapter_name="r")
    try:
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        layer = pipe.unet.get_submodule(name)
        assert layer.scaling["r"] == pytest.approx(2.0)
        x = torch.randn(3, layer.in_features)
        a, b = sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"]
        with torch.no_grad():
            delta = layer(x) - layer.get_base_layer()(x)
        assert torch.allclose(delta, 2.0 * x @ a.T @ b.T, atol=1e-5)
        te = pipe.text_encoder.get_submodule("encoder.layers.1.self_attn.v_proj")
        assert te.scaling["r"] == pytest.approx(2.0)
    finally:
        pipe.unload_lora_weights()


def test_kohya_names_written_by_hand_reach_the_right_modules(sd1, sdxl, tmp_path):
    """Literal kohya keys (as A1111/ComfyUI files carry them), independent of our own converter."""
    g = torch.Generator().manual_seed(0)

    def pair(name, i, o, r=2, alpha=1.0):
        return {f"{name}.lora_down.weight": torch.randn(r, i, generator=g),
                f"{name}.lora_up.weight": torch.randn(o, r, generator=g), f"{name}.alpha": torch.tensor(alpha)}

    sd = {**pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 32),
          **pair("lora_te_text_model_encoder_layers_1_self_attn_q_proj", 32, 32)}
    p = save_safetensors(sd, tmp_path / "k1.safetensors")
    st = AdapterStack(sd1)
    st.load("k1", p)
    try:
        layer = sd1.pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")
        adapter = next(iter(layer.lora_A))
        assert layer.scaling[adapter] == pytest.approx(0.5)  # alpha 1 / rank 2
        assert torch.equal(layer.lora_A[adapter].weight,
                           sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"])
        assert adapter in sd1.pipe.text_encoder.get_submodule("encoder.layers.1.self_attn.q_proj").lora_A
    finally:
        st.unload()
    # SDXL: kohya's own UNet names (input/middle/output_blocks; the tiny UNet has 1 layer per block) and te1/te2
    sdx = {**pair("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", 64, 64),
           **pair("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", 64, 64),
           **pair("lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_v", 64, 64),
           **pair("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", 32, 32),
           **pair("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", 32, 32)}
    p = save_safetensors(sdx, tmp_path / "k2.safetensors")
    info = inspect_adapter(p, sdxl)
    assert info.family == "sdxl" and (info.matched, info.total) == (5, 5)
    st = AdapterStack(sdxl)
    st.load("k2", p)
    try:
        for comp, mod in [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
                          ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
                          ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v"),
                          ("text_encoder", "encoder.layers.0.self_attn.k_proj"),
                          ("text_encoder_2", "encoder.layers.1.self_attn.out_proj")]:
            model = getattr(sdxl.pipe, comp)
            if comp != "unet" and hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel only
                mod = "text_model." + mod
            assert len(model.get_submodule(mod).lora_A) == 1, mod
    finally:
        st.unload()


def test_kohya_export_keys_alpha_and_metadata(sdxl, files):
    k, meta = load_safetensors(files["kohya"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in k
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in k
    a = k["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"]
    assert a.dtype == torch.float32 and a.ndim == 0 and float(a) == 8.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.trigger_phrase"] == "sks" and DIFFUSERS_METADATA_KEY not in meta
    kx, mx = load_safetensors(files["xl_kohya"])
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0") for n in kx)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_0") for n in kx)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kx
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.lora_up.weight" in kx
    assert mx["ss_base_model_version"] == "sdxl_base_v1-0" and mx["modelspec.architecture"].startswith("stable-diffusion-xl")


def test_metadata_keys_for_other_tools():
    m = lora_metadata(family="sdxl", rank=16, alpha=8, name="style", base_model="sdxl-base", base_hash="abc",
                      trigger_word="zwx", modules=["to_q", "q_proj"], steps=500, resolution=1024, num_images=12,
                      training_config={"rank": 16})
    assert m["ss_network_module"] == "networks.lora" and m["ss_network_dim"] == "16" and m["ss_network_alpha"] == "8"
    assert m["ss_base_model_version"] == "sdxl_base_v1-0" and m["ss_output_name"] == "style"
    assert m["modelspec.sai_model_spec"] == "1.0.0"
    assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert m["modelspec.trigger_phrase"] == "zwx" and m["modelspec.resolution"] == "1024x1024"
    assert m["lora_studio.base_family"] == "sdxl" and m["lora_studio.trigger"] == "zwx"
    assert json.loads(m["lora_studio.train_config"]) == {"rank": 16}
    assert lora_metadata(family="sd1", rank=4, alpha=4)["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_adapter_info(sd1, files, tmp_path):
    from PIL import Image

    p = tmp_path / "ours.safetensors"
    p.write_bytes(files["ours"].read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "ours.png")
    info = inspect_adapter(p, sd1)
    assert (info.name, info.format, info.family, info.family_source) == ("ours", "peft", "sd1", "metadata")
    assert (info.rank, info.alpha, info.trigger_word) == (4, 8.0, "sks")
    assert info.modules == ["k_proj", "out_proj", "q_proj", "to_k", "to_out.0", "to_q", "to_v", "v_proj"]
    assert info.short_hash == addnet_hash(p)[:12] and info.size == p.stat().st_size
    assert info.preview == tmp_path / "ours.png" and info.components == ["unet", "text_encoder"]
    kinfo = inspect_adapter(files["kohya_noalpha"])
    assert (kinfo.format, kinfo.rank, kinfo.alpha) == ("kohya", 4, 4.0)  # no .alpha: alpha = rank


def _no_adapters(base) -> bool:
    return not any("lora_A" in n for c in ("unet", "text_encoder", "text_encoder_2")
                   if getattr(base.pipe, c, None) is not None for n, _ in getattr(base.pipe, c).named_modules())


@pytest.mark.parametrize("direction", ["sd1_on_sdxl", "sdxl_on_sd1", "sd1_on_sdxl_no_metadata"])
def test_family_mismatch_is_refused_and_leaves_the_base_untouched(sd1, sdxl, sd1_ref, sdxl_ref, files, tmp_path,
                                                                   direction):
    if direction == "sd1_on_sdxl":
        path, base, ref, want = files["ours"], sdxl, sdxl_ref, ("SD 1.x", "SDXL")
    elif direction == "sdxl_on_sd1":
        path, base, ref, want = files["xl_ours"], sd1, sd1_ref, ("SDXL", "SD 1.x")
    else:  # only shapes to go by: the tiny models' widths differ (32 vs 64)
        sd, _ = load_safetensors(files["ours"])
        path, base, ref, want = save_safetensors(sd, tmp_path / "bare.safetensors"), sdxl, sdxl_ref, ("SDXL",)
    with pytest.raises(IncompatibleAdapterError) as e:
        AdapterStack(base).load("x", path)
    assert all(w in str(e.value) for w in want) and path.name in str(e.value)
    assert _no_adapters(base)
    assert torch.equal(latents(base.pipe), ref)


def test_zero_matching_keys_is_an_error_and_partial_is_reported(sd1, sd1_ref, tmp_path):
    r = torch.ones(2, 32)
    none = {"unet.no_such_block.to_q.lora_A.weight": r, "unet.no_such_block.to_q.lora_B.weight": r.T.clone()}
    p = save_safetensors(none, tmp_path / "none.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="none of its 1 layers"):
        AdapterStack(sd1).load("none", p)
    assert _no_adapters(sd1) and torch.equal(latents(sd1.pipe), sd1_ref)
    part = dict(none)
    good = {k: v for k, v in make_lora(sd1.pipe, only="attn1.to_q").items() if k.startswith("unet.")}
    part.update(good)
    p = save_safetensors(part, tmp_path / "part.safetensors")
    info = inspect_adapter(p, sd1)
    n = len(good) // 2
    assert (info.matched, info.total) == (n, n + 1) and info.partial
    st = AdapterStack(sd1)
    st.load("part", p)
    st.unload()


def test_bad_files_are_refused(sd1, tmp_path):
    sd = make_lora(sd1.pipe, only="attn1.to_q")
    key = next(iter(sd))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "nan.safetensors"))  # weights_io would refuse to write it
    with pytest.raises(CorruptWeightsError, match="NaN"):
        inspect_adapter(tmp_path / "nan.safetensors", sd1)
    with pytest.raises(CorruptWeightsError):
        AdapterStack(sd1).load("nan", tmp_path / "nan.safetensors")
    assert _no_adapters(sd1)
    torch.save({"unet.x.lora_A.weight": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(PickleRefusedError):
        inspect_adapter(tmp_path / "a.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptWeightsError, match="junk.safetensors"):
        inspect_adapter(tmp_path / "junk.safetensors")
    save_safetensors({"model.weight": torch.ones(2, 2)}, tmp_path / "notlora.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="not a LoRA"):
        inspect_adapter(tmp_path / "notlora.safetensors")


def test_detect_format():
    assert detect_format(["unet.a.to_q.lora_A.weight", "unet.a.to_q.lora_B.weight"]) == "peft"
    assert detect_format(["lora_unet_a_to_q.lora_down.weight", "lora_unet_a_to_q.lora_up.weight",
                          "lora_unet_a_to_q.alpha"]) == "kohya"
    assert detect_format(["unet.a.processor.to_q_lora.down.weight"]) == "diffusers_old"
    assert detect_format(["lora_unet_a.hada_w1_a", "lora_unet_a.hada_w1_b"]) == "lycoris"
    assert detect_format(["model.diffusion_model.x.weight"]) == "unknown"


def test_kohya_alphas_that_differ_per_module_are_honoured(sd1, tmp_path):
    """diffusers 0.42's own kohya loading applies the most common alpha to every module; we apply each one."""
    g = torch.Generator().manual_seed(0)
    sd, want = {}, {}
    for prefix, mod, projs in [("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_", "unet",
                                ("to_q", "to_k", "to_v")),
                               ("lora_te_text_model_encoder_layers_0_self_attn_", "te", ("q_proj", "k_proj", "v_proj"))]:
        for proj, alpha in zip(projs, (1.0, 4.0, 4.0)):
            name = prefix + proj
            sd[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g)
            sd[f"{name}.alpha"] = torch.tensor(alpha)
            want[(mod, proj)] = alpha / 2
    p = save_safetensors(sd, tmp_path / "mixed_alpha.safetensors")
    st = AdapterStack(sd1)
    st.load("m", p)
    try:
        attn = sd1.pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
        te = sd1.pipe.text_encoder.get_submodule("encoder.layers.0.self_attn")
        for (mod, proj), scale in want.items():
            layer = (attn if mod == "unet" else te).get_submodule(proj)
            assert next(iter(layer.scaling.values())) == pytest.approx(scale), (mod, proj)
    finally:
        st.unload()
