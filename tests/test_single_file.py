"""Single-file (LDM / A1111 / ComfyUI layout) export and import of SD 1.x, 2.x and XL pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.errors import CorruptWeightsError, ModelLoadError
from pipelines.single_file import (
    CONFIG_METADATA_KEY,
    detect_family_from_single_file_keys,
    load_single_file,
    save_single_file,
    to_single_file_state_dict,
)
from pipelines.weights_io import read_metadata, save_safetensors

# UNet / VAE layouts: the conftest-sized model, the embedded toy model's layout, and 2 layers/block.
UNET_VARIANTS = {
    "2-levels": dict(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "toy-3-levels": dict(
        block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "3-levels-2-layers": dict(
        block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD 1.5's exact block layout with tiny channels: its LDM names are known from the real files.
    "sd15-layout": dict(
        block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}
VAE_BLOCKS = {"2-levels": (2, 1), "toy-3-levels": (3, 1), "3-levels-2-layers": (3, 2), "sd15-layout": (4, 2)}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from training.toy_tokenizer import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return folder


def _tokenizer(tok_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tok_dir)


def _text_encoder(vocab: int, hidden: int, act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae(levels: int, layers: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32)[:levels], down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=layers, latent_channels=4,
        norm_num_groups=16, sample_size=16 * 2 ** (levels - 1),
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
        prediction_type=prediction_type,
    )


def build_sd(tok_dir: Path, variant: str = "2-levels", family: str = "sd1"):
    """A tiny SD 1.x (or 2.x: gelu OpenCLIP-style encoder, linear projections, v-prediction) pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = _tokenizer(tok_dir)
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=16, use_linear_projection=family == "sd2", **UNET_VARIANTS[variant],
    )
    te = _text_encoder(len(tok), 32, act="gelu" if family == "sd2" else "quick_gelu")
    pipe = StableDiffusionPipeline(
        vae=_vae(*VAE_BLOCKS[variant]), text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=_scheduler("v_prediction" if family == "sd2" else "epsilon"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl(tok_dir: Path, width_2: int):
    """A tiny SDXL pipeline; width_2 is the second (OpenCLIP) encoder's width (32 = same as the first)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(tok_dir)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + width_2, cross_attention_dim=32 + width_2, norm_num_groups=16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(2, 1), text_encoder=_text_encoder(len(tok), 32),
        text_encoder_2=_text_encoder(len(tok), width_2, act="gelu", projection=True, seed=1),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, generator=generator, output_type="np").images


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    # Bit-equal weights still differ by ~1e-6 in outputs when their memory layout differs.
    return torch.allclose(x, y, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def assert_same_outputs(a, b) -> None:
    """UNet, VAE and text encoder(s) of two pipelines compute the same thing, and so do the pipelines."""
    ids = a.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is not None:
            assert _close(getattr(a, name)(ids)[0], getattr(b, name)(ids)[0]), name
    torch.manual_seed(0)
    size = a.unet.config.sample_size
    latents = torch.randn(1, 4, size, size)  # (B, 4, H/f, W/f)
    image = torch.rand(1, 3, size * a.vae_scale_factor, size * a.vae_scale_factor) * 2 - 1
    assert _close(a.vae.decode(latents).sample, b.vae.decode(latents).sample), "vae decoder"
    assert _close(a.vae.encode(image).latent_dist.mean, b.vae.encode(image).latent_dist.mean), "vae encoder"
    if a.unet.config.addition_embed_type is None:
        ctx = torch.randn(1, 77, a.unet.config.cross_attention_dim)
        assert _close(a.unet(latents, 10, ctx).sample, b.unet(latents, 10, ctx).sample), "unet"
    b.set_progress_bar_config(disable=True)
    assert _close(torch.from_numpy(_generate(a)), torch.from_numpy(_generate(b))), "generated image"


def assert_same_weights(a, b, names=("unet", "vae", "text_encoder", "text_encoder_2")) -> None:
    for name in names:
        if getattr(a, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_sd1_round_trip_reproduces_the_pipeline(tok_dir, tmp_path, variant):
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir, variant)
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    loaded = load_single_file(path, StableDiffusionPipeline, tokenizer_dir=tok_dir)
    assert_same_weights(pipe, loaded)
    assert_same_outputs(pipe, loaded)


def test_converted_keys_are_the_real_ldm_names(tok_dir):
    pipe = build_sd(tok_dir, "toy-3-levels")
    sd = to_single_file_state_dict(pipe)
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",  # level 0's downsampler follows its one resnet
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # UpBlock2D's upsampler: no attention before it
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in sd, key
    # LDM counts the decoder's levels from the lowest resolution: up.0 is diffusers' last up block.
    lowest_level = pipe.vae.decoder.up_blocks[-1].resnets[0].conv1.weight
    assert torch.equal(sd["first_stage_model.decoder.up.0.block.0.conv1.weight"], lowest_level)
    assert sd["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)  # 1x1 conv
    assert sd["model.diffusion_model.output_blocks.3.2.conv.weight"].shape[0] == 32  # CrossAttnUpBlock2D upsampler
    assert not [k for k in sd if k.startswith(("unet.", "vae.", "text_encoder."))]


def test_sd15_layout_gives_sd15_key_names(tok_dir):
    """The names real SD 1.5 checkpoints use for the same blocks (and that diffusers uses to sniff 'v1')."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    sd = to_single_file_state_dict(build_sd(tok_dir, "sd15-layout"))
    unet = {k.removeprefix("model.diffusion_model.") for k in sd if k.startswith("model.diffusion_model.")}
    for key in (
        "input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
        "input_blocks.11.0.out_layers.3.weight", "input_blocks.8.1.proj_in.weight",
        "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.in_layers.2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
    ):
        assert key in unet or key in sd, key
    assert CHECKPOINT_KEY_NAMES["v1"] in sd
    assert {int(k.split(".")[1]) for k in unet if k.startswith("output_blocks.")} == set(range(12))
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd  # lowest level has none


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_diffusers_own_converters_invert_the_export(tok_dir, variant):
    """diffusers' LDM -> diffusers conversion gives back exactly the original weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe = build_sd(tok_dir, variant)
    sd = to_single_file_state_dict(pipe)
    for model, back in (
        (pipe.unet, convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config))),
        (pipe.vae, convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config))),
    ):
        orig = model.state_dict()
        assert back.keys() == orig.keys()
        assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_metadata_names_the_architecture_and_embeds_configs(tok_dir, tmp_path):
    pipe = build_sd(tok_dir, "toy-3-levels")
    path = save_single_file(pipe, tmp_path / "toy.safetensors", metadata={"modelspec.title": "Toy"})
    meta = read_metadata(path)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "Toy"
    assert meta["modelspec.resolution"] == "32x32"
    configs = json.loads(meta[CONFIG_METADATA_KEY])
    assert configs["unet/config.json"]["down_block_types"] == list(UNET_VARIANTS["toy-3-levels"]["down_block_types"])
    assert configs["vae/config.json"]["block_out_channels"] == [16, 32, 32]
    assert configs["model_index.json"]["_class_name"] == "StableDiffusionPipeline"
    assert "scheduler/scheduler_config.json" in configs and not [k for k in configs if k.startswith("tokenizer")]


@pytest.mark.parametrize("width_2", [48, 32], ids=["realistic-widths", "equal-widths"])
def test_sdxl_round_trip(tok_dir, tmp_path, width_2):
    """Equal encoder widths are the case where diffusers alone would load CLIP-L into text_encoder_2."""
    from diffusers import StableDiffusionXLPipeline

    pipe = build_sdxl(tok_dir, width_2)
    sd = to_single_file_state_dict(pipe)
    te2 = "conditioner.embedders.1.model."
    assert sd[te2 + "transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * width_2, width_2)
    assert torch.equal(sd[te2 + "text_projection"], pipe.text_encoder_2.text_projection.weight.T)
    for name in ("ln_final.weight", "positional_embedding", "token_embedding.weight"):
        assert te2 + name in sd, name
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "model.diffusion_model.label_emb.0.2.weight" in sd
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn1.to_q.weight" in sd

    path = save_single_file(pipe, tmp_path / "xl.safetensors")
    assert read_metadata(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    loaded = load_single_file(path, StableDiffusionXLPipeline, tokenizer_dir=tok_dir)
    assert_same_weights(pipe, loaded)
    assert_same_outputs(pipe, loaded)


def test_sd2_round_trip_uses_open_clip_layout(tok_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir, "2-levels", family="sd2")
    path = save_single_file(pipe, tmp_path / "v2.safetensors")
    keys = to_single_file_state_dict(pipe).keys()
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert read_metadata(path)["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    loaded = load_single_file(path, StableDiffusionPipeline, tokenizer_dir=tok_dir)
    assert_same_weights(pipe, loaded)
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_explicit_config_folder_is_used_offline(tok_dir, tmp_path):
    """A diffusers folder as `config_dir` (tokenizer included) loads a file that has no embedded configs."""
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir)
    pipe.save_pretrained(tmp_path / "folder", safe_serialization=True)
    path = save_safetensors(to_single_file_state_dict(pipe), tmp_path / "bare.safetensors")
    loaded = load_single_file(path, StableDiffusionPipeline, config_dir=tmp_path / "folder")
    assert_same_weights(pipe, loaded)


def test_no_config_anywhere_is_a_clear_error_without_network(tok_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = save_safetensors(to_single_file_state_dict(build_sd(tok_dir)), tmp_path / "bare.safetensors")
    with pytest.raises(ModelLoadError, match="bare.safetensors.*config"):
        load_single_file(path, StableDiffusionPipeline)


def test_embedded_configs_need_a_tokenizer_folder(tok_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = save_single_file(build_sd(tok_dir), tmp_path / "notok.safetensors")
    with pytest.raises(ModelLoadError, match="notok.safetensors.*tokenizer"):
        load_single_file(path, StableDiffusionPipeline)


@pytest.mark.parametrize(
    "configs",
    [
        {"model_index.json": {"_class_name": "StableDiffusionPipeline"}, "../../evil/config.json": {}},
        {"model_index.json": {"../../evil": ["transformers", "CLIPTokenizer"]}},
        {"model_index.json": {"unet": ["os", "system"]}},
    ],
    ids=["config-path", "tokenizer-slot", "library"],
)
def test_hostile_embedded_configs_are_refused(tok_dir, tmp_path, configs):
    """Embedded names become files in a temporary folder and classes to import: both are checked."""
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir)
    path = save_safetensors(to_single_file_state_dict(pipe), tmp_path / "evil.safetensors",
                            metadata={CONFIG_METADATA_KEY: json.dumps(configs)})
    with pytest.raises(ModelLoadError, match="evil.safetensors"):
        load_single_file(path, StableDiffusionPipeline, tokenizer_dir=tok_dir)
    assert not (tmp_path.parent / "evil").exists()


def test_truncated_file_names_the_file(tok_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = save_single_file(build_sd(tok_dir), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((ModelLoadError, CorruptWeightsError), match="cut.safetensors"):
        load_single_file(path, StableDiffusionPipeline, tokenizer_dir=tok_dir)


def test_missing_weights_are_refused_not_left_uninitialised(tok_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir)
    sd = to_single_file_state_dict(pipe)
    del sd["model.diffusion_model.out.2.weight"]
    meta = read_metadata(save_single_file(pipe, tmp_path / "full.safetensors"))
    path = save_safetensors(sd, tmp_path / "partial.safetensors", metadata=meta)
    with pytest.raises(ModelLoadError, match="partial.safetensors.*missing"):
        load_single_file(path, StableDiffusionPipeline, tokenizer_dir=tok_dir)


@pytest.mark.parametrize(
    ("key", "family"),
    [
        ("conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight", "sdxl"),
        ("cond_stage_model.model.transformer.resblocks.0.ln_1.weight", "sd2"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "sd1"),
    ],
)
def test_family_from_single_file_keys(key, family):
    assert detect_family_from_single_file_keys(["model.diffusion_model.out.2.weight", key], "m.safetensors") == family


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        (["model.layers.0.mlp.weight"], "not an SD"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight"], "refiner"),
    ],
)
def test_unknown_single_file_layout_names_the_file(keys, why):
    with pytest.raises(ModelLoadError, match=f"odd.safetensors.*{why}"):
        detect_family_from_single_file_keys(keys, "odd.safetensors")
