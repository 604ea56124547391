"""QLoRA-style training on a quantized frozen base (torchao int8 on the CPU; nf4 needs CUDA)."""

from __future__ import annotations


import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import Trainer

pytest.importorskip("torchao")


def _cfg(star_images, base, tmp_path, **kw):
    return TrainConfig(**{**dict(images=str(star_images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=3,
                                 batch_size=2, rank=4, seed=5, device="cpu", name="q", sample_steps=2,
                                 checkpoint_every=0, lr_unet=5e-3), **kw})


def test_int8_base_trains_an_adapter_that_loads_on_the_full_precision_base(star_images, tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.quantize import quantized_bytes

    trainer = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path, quantize_base="int8"))
    res = trainer.run()
    unet = trainer.base.pipe.unet
    # the frozen base really was quantized under the LoRA layers, and is smaller for it
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert type(to_q).__name__ == "TorchaoLoraLinear"
    assert type(to_q.base_layer.weight).__name__ == "Int8Tensor"
    now, full = quantized_bytes(unet)
    assert now < 0.35 * full
    assert set(trainer.quantized) == {"unet", "text_encoder"}  # the text encoder is frozen here: quantized too

    sd, meta = load_safetensors(res.adapter_path)
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in sd.items())
    assert '"quantize_base": "int8"' in meta["lora_studio.train_config"]

    # the adapter is an ordinary one: diffusers loads it on the unquantized base and it changes the output
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a sks", num_inference_steps=2, height=32, width=32, output_type="np")
    before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(res.adapter_path))
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-4


def test_int8_run_tracks_the_full_precision_run(star_images, tiny_sd1_dir, tmp_path):
    """Same seed and data: the LoRA trained on the int8 base stays close to the one on fp32 weights."""
    full = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path / "f")).run()
    quant = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path / "q", quantize_base="int8")).run()
    a, _ = load_safetensors(full.adapter_path)
    b, _ = load_safetensors(quant.adapter_path)
    num = sum(float((a[k] - b[k]).norm()) for k in a if "lora_up" in k)
    den = sum(float(a[k].norm()) for k in a if "lora_up" in k)
    assert den > 0 and num / den < 0.2


def test_quantize_base_is_validated(star_images, tiny_sd1_dir, tmp_path):
    with pytest.raises(ConfigError, match="quantize_base: must be one of nf4, int8"):
        _cfg(star_images, tiny_sd1_dir, tmp_path, quantize_base="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="quantize_base: 'nf4' .* needs a CUDA GPU"):
            Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path, quantize_base="nf4")).run()


def test_cli_accepts_quantize_base(star_images, tiny_sd1_dir, tmp_path):
    from app.cli import parse_train_args

    cfg = parse_train_args(["--images", str(star_images), "--quantize-base", "int8"])
    assert cfg.quantize_base == "int8"
