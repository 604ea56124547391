"""The kohya key layout of every file a user takes out of the app: each key names a real layer.

AUTOMATIC1111 and ComfyUI find a LoRA module by its name in the original (LDM) layout of the model, with
dots written as underscores (`lora_unet_input_blocks_4_1_…`), or for SD 1.x/2.x also by the diffusers name
that kohya's SD 1.x networks use (`lora_unet_down_blocks_1_attentions_0_…`), which they convert to the
LDM name. A key that maps to no layer is dropped there without an error, so every key is checked here,
for a LoRA on *every* Linear and Conv2d layer of the UNet and text encoders (attention, projections,
feed-forward, ResNet convolutions, time embedding, shortcuts, down/upsamplers).
"""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main
from pipelines.adapters import UNET_LAYOUT_KEY, export_adapter, lora_metadata, save_adapter, to_kohya, to_peft
from pipelines.base_models import load_base
from pipelines.errors import IncompatibleAdapterError
from pipelines.single_file import to_single_file_state_dict, unet_block_prefixes, unet_layout, unet_module_to_ldm
from pipelines.weights_io import load_safetensors


def _every_layer_lora(pipe, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random LoRA factors (peft keys) for every Linear and Conv2d of the UNet and the text encoder(s)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            key = f"{comp}.{name}" if comp == "unet" else f"{comp}.text_model.{name.removeprefix('text_model.')}"
            if isinstance(mod, torch.nn.Linear):
                sd[f"{key}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g)
                sd[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g)
            elif isinstance(mod, torch.nn.Conv2d):
                sd[f"{key}.lora_A.weight"] = torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=g)
                sd[f"{key}.lora_B.weight"] = torch.randn(mod.out_channels, rank, 1, 1, generator=g)
    return sd


def _modules(state_dict_keys, prefix: str) -> set[str]:
    """Module names (dots as underscores, as the LoRA keys spell them) of the weights under `prefix`."""
    return {k[len(prefix):].rsplit(".", 1)[0].replace(".", "_") for k in state_dict_keys if k.startswith(prefix)}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request):
    d = request.getfixturevalue(f"tiny_{request.param}_dir")
    return request.param, load_base(str(d), device="cpu")


def test_every_key_names_a_layer_of_the_original_layout(model):
    family, base = model
    pipe = base.pipe
    layout = unet_layout(pipe.unet)
    kohya = to_kohya(_every_layer_lora(pipe), 4.0, family=family, layout=layout)
    ldm = to_single_file_state_dict(pipe)  # the original single-file layout that A1111 / ComfyUI run
    ldm_unet = _modules(ldm, "model.diffusion_model.")
    # the diffusers name of each UNet layer, for SD 1.x files (kohya's own SD 1.x naming)
    prefixes = unet_block_prefixes(layout)
    diffusers_to_ldm = {n.replace(".", "_"): unet_module_to_ldm(n, prefixes) for n, _ in pipe.unet.named_modules()}
    te1 = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
    ldm_te1 = _modules(ldm, te1)
    # SDXL's second encoder is OpenCLIP in the original layout (fused q/k/v): kohya, AUTOMATIC1111 and ComfyUI
    # name its LoRA keys after transformers' CLIP layers and convert them; those are the names to match
    te2_names = {("text_model." + n.removeprefix("text_model.")).replace(".", "_")
                 for n, m in (pipe.text_encoder_2.named_modules() if family == "sdxl" else [])}

    modules = {k.split(".")[0] for k in kohya}
    assert len(modules) * 3 == len(kohya)  # lora_down, lora_up, alpha for each
    unmatched = []
    for m in modules:
        if m.startswith("lora_unet_"):
            name = m[len("lora_unet_"):]
            if family == "sdxl":  # kohya trains SDXL on the LDM UNet: its keys are the LDM names themselves
                ok = name in ldm_unet
            else:
                ok = (diffusers_to_ldm.get(name) or "").replace(".", "_") in ldm_unet
        elif m.startswith(("lora_te_", "lora_te1_")):
            assert m.startswith("lora_te_" if family == "sd1" else "lora_te1_"), m
            ok = m.split("_", 2)[2] in ldm_te1
        else:
            assert m.startswith("lora_te2_") and family == "sdxl", m
            ok = m[len("lora_te2_"):] in te2_names
        if not ok:
            unmatched.append(m)
    assert not unmatched, unmatched[:5]
    n_unet = sum(m.startswith("lora_unet_") for m in modules)
    n_layers = sum(isinstance(x, (torch.nn.Linear, torch.nn.Conv2d)) for x in pipe.unet.modules())
    assert n_unet == n_layers  # nothing was dropped on the way


def test_sdxl_names_follow_the_base_layout_not_a_guess(tiny_sdxl_dir, tmp_path):
    """The tiny SDXL UNet has one layer per block (real SDXL: two): its second level's attention is LDM
    input block 3 (conv_in 0, resnet 1, downsampler 2), which a layers_per_block=2 guess would call 4."""
    base = load_base(str(tiny_sdxl_dir), device="cpu")
    sd = _every_layer_lora(base.pipe)
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "unet.down_blocks.0.resnets.0.conv1"
    peft = {k: v for k, v in sd.items() if k.startswith((attn, conv))}
    src = save_adapter(peft, tmp_path / "xl.safetensors", lora_metadata(family="sdxl", rank=2, alpha=2))
    # no layout in the file and no base: refused, never guessed
    with pytest.raises(IncompatibleAdapterError, match="xl.safetensors: .*base model.*--base"):
        export_adapter(src, tmp_path / "k.safetensors", "kohya")
    out = export_adapter(src, tmp_path / "k.safetensors", "kohya", base=base)
    k, meta = load_safetensors(out)
    assert {n.split(".")[0] for n in k} == {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
                                            "lora_unet_input_blocks_1_0_in_layers_2"}
    # the file now records the layout: converting it back needs no base, and gives the same factors
    assert json.loads(meta[UNET_LAYOUT_KEY]) == unet_layout(base.pipe.unet)
    back = export_adapter(out, tmp_path / "back.safetensors", "peft")
    again, _ = load_safetensors(back)
    assert again.keys() == peft.keys() and all(torch.equal(again[n], peft[n]) for n in peft)
    # and diffusers reads our names into the same layers: same UNet output as the peft file
    outs = []
    for path in (src, out):
        b = load_base(str(tiny_sdxl_dir), device="cpu")
        b.pipe.load_lora_weights(str(path))
        g = torch.Generator().manual_seed(0)
        x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        with torch.no_grad():
            outs.append(b.pipe.unet(x, 500, cond, added_cond_kwargs=added).sample)
    torch.testing.assert_close(outs[0], outs[1])


def test_cli_export_of_an_sdxl_file_without_layout_needs_the_base(tiny_sdxl_dir, tmp_path, capsys):
    base = load_base(str(tiny_sdxl_dir), device="cpu")
    lib = tmp_path / "lib"
    lib.mkdir()
    peft = {k: v for k, v in _every_layer_lora(base.pipe).items() if ".attentions." in k and k.startswith("unet.")}
    save_adapter(peft, lib / "xl.safetensors", lora_metadata(family="sdxl", rank=2, alpha=2))
    assert main(["loras", "export", "xl", "--library", str(lib), "--out", str(tmp_path / "x.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "--base" in err and "Traceback" not in err
    assert main(["loras", "export", "xl", "--library", str(lib), "--out", str(tmp_path / "x.safetensors"),
                 "--base", str(tiny_sdxl_dir)]) == 0
    k, _ = load_safetensors(tmp_path / "x.safetensors")
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for n in k)
    sd, _ = to_peft(k, {}, unet_layers_per_block=1)
    assert sd.keys() == peft.keys()


def test_real_sdxl_and_sd15_unets_get_the_names_kohya_files_carry():
    """On the released architectures (built on the meta device from their published configs): the names
    that kohya_ss writes and AUTOMATIC1111 / ComfyUI look up, written here from SDXL's original layout
    (input block 3 and 6 are downsamplers, 4-5 and 7-8 carry attention; 10 transformer blocks at the
    innermost level), independent of our converter."""
    import sys
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from adapter_size import UNETS

    from pipelines.single_file import unet_to_ldm

    expected = {
        "sdxl": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
                 "lora_unet_output_blocks_0_1_proj_in", "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_8_0_out_layers_3",
                 "lora_unet_output_blocks_3_0_skip_connection", "lora_unet_middle_block_2_emb_layers_1"],
        "sd15": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_mid_block_attentions_0_proj_out", "lora_unet_down_blocks_1_resnets_0_conv1",
                 "lora_unet_up_blocks_0_upsamplers_0_conv"],
    }
    for arch, names in expected.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**UNETS[arch])
        sd = {}
        for n, m in unet.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                sd[f"unet.{n}.lora_A.weight"] = torch.zeros(2, 1)
                sd[f"unet.{n}.lora_B.weight"] = torch.zeros(1, 2)
        family = "sdxl" if arch == "sdxl" else "sd1"
        modules = {k.split(".")[0] for k in to_kohya(sd, 2.0, family=family, layout=unet_layout(unet))}
        assert set(names) <= modules, sorted(set(names) - modules)
        if arch == "sdxl":  # every key is an LDM module name itself
            ldm = {k.rsplit(".", 1)[0].replace(".", "_") for k in unet_to_ldm(unet)}
            assert {m[len("lora_unet_"):] for m in modules} <= ldm
