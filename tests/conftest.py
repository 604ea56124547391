"""Shared fixtures: tiny SD 1.x / 2.x / XL pipelines built from kwargs on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.base_models import DEFAULT_BASE  # noqa: E402


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    from training.toy_tokenizer import write_tokenizer

    write_tokenizer(tmp)
    return CLIPTokenizer.from_pretrained(tmp)


def _text_encoder(vocab: int, hidden: int = 32, act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, sample_size=32,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def build_tiny_sd(tmp: Path, family: str = "sd1", in_channels: int = 4):
    """A tiny SD 1.x (or 2.x: gelu text encoder, v-prediction) pipeline, 32 px; `in_channels=9`: an inpainting
    model's UNet (latents, mask, masked picture's latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = _tokenizer(tmp / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    te = _text_encoder(len(tok), act="gelu" if family == "sd2" else "quick_gelu")
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(tmp: Path, in_channels: int = 4):
    """A tiny SDXL pipeline: two text encoders and the text_time extra conditioning (`in_channels=9`: an
    inpainting model's UNet)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(tmp / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=16,
    )
    te = _text_encoder(len(tok), hidden=32)
    te2 = _text_encoder(len(tok), hidden=32, act="gelu", projection=True, seed=1)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_sd1")
    build_tiny_sd(d / "build").save_pretrained(d / "model", safe_serialization=True)
    return d / "model"


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x inpainting model (sd-v1-5-inpainting's layout: a 9-channel UNet)."""
    d = tmp_path_factory.mktemp("tiny_inpaint")
    build_tiny_sd(d / "build", in_channels=9).save_pretrained(d / "model", safe_serialization=True)
    return d / "model"


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_sd2")
    build_tiny_sd(d / "build", family="sd2").save_pretrained(d / "model", safe_serialization=True)
    return d / "model"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl(d / "build").save_pretrained(d / "model", safe_serialization=True)
    return d / "model"


@pytest.fixture(scope="session")
def toy_base_dir() -> Path:
    assert (DEFAULT_BASE / "model_index.json").is_file(), f"the embedded toy model is missing at {DEFAULT_BASE}"
    return DEFAULT_BASE


@pytest.fixture(scope="session")
def toy_base(toy_base_dir):
    from pipelines.base_models import load_base

    return load_base(toy_base_dir, device="cpu")


@pytest.fixture(scope="session")
def star_images(tmp_path_factory) -> Path:
    """Four 32px star drawings, captioned with the trigger 'sks' (a concept the tiny models never saw)."""
    import random

    from training.toy_world import draw, sample_spec

    d = tmp_path_factory.mktemp("stars")
    rng = random.Random(0)
    for i in range(4):
        s = sample_spec(rng, shapes=["star"])
        draw(s, resolution=32).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(s.caption().replace("star", "sks"))
    return d
