"""v-prediction and zero-terminal-SNR models (pipelines.schedule), and CFG rescale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import ConfigError
from pipelines.generation import SCHEDULERS, GenerationRequest, generate, set_scheduler
from pipelines.schedule import (
    V_PRED_KEY,
    ZTSNR_KEY,
    apply_schedule,
    file_schedule,
    marker_tensors,
    model_schedule,
    zero_snr_betas,
)
from pipelines.single_file import load_single_file, save_single_file, to_single_file_state_dict
from pipelines.weights_io import read_metadata, save_safetensors
from tests.test_single_file import build_sd, build_sdxl, tok_dir  # noqa: F401 - tok_dir is a fixture

PROMPT = "a red circle on a white background"


def _bare_file(pipe, path, **marks):
    """A single file as other tools write it: weights (and the given marks), no embedded configs."""
    return save_safetensors({**to_single_file_state_dict(pipe), **marks}, path)


def test_v_pred_and_ztsnr_tensors_of_an_sdxl_file_set_its_schedule(tok_dir, tmp_path):  # noqa: F811
    """NoobAI-XL V-Pred and its kin: the config (diffusers' standard SDXL one predicts epsilon) is overruled by the
    file's own marks, as AUTOMATIC1111 and ComfyUI read them, and the weights load as they are."""
    from diffusers import StableDiffusionXLPipeline

    pipe = build_sdxl(tok_dir, 48)
    pipe.save_pretrained(tmp_path / "config", safe_serialization=True)  # an epsilon config, as the standard one
    plain = load_single_file(_bare_file(pipe, tmp_path / "eps.safetensors"), StableDiffusionXLPipeline,
                             config_dir=tmp_path / "config")
    assert model_schedule(plain) == ("epsilon", False) and "_schedule_note" not in plain.__dict__
    marked = _bare_file(pipe, tmp_path / "vpred.safetensors", **marker_tensors("v_prediction", True))
    loaded = load_single_file(marked, StableDiffusionXLPipeline, config_dir=tmp_path / "config")
    assert model_schedule(loaded) == ("v_prediction", True)
    assert "'v_pred' tensor" in loaded.__dict__["_schedule_note"] and "'ztsnr'" in loaded.__dict__["_schedule_note"]
    sa, sb = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    loaded.scheduler.set_timesteps(4)
    assert loaded.scheduler.timesteps[0] == 999  # a zero-SNR schedule starts from the last timestep
    assert float(loaded.scheduler.alphas_cumprod[-1]) == 0.0


def test_files_written_here_carry_the_marks(tok_dir, tmp_path):  # noqa: F811
    """A baked or exported checkpoint of a v-prediction / zero-SNR model says so where A1111 and ComfyUI look."""
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir)
    path = save_single_file(pipe, tmp_path / "eps.safetensors")
    assert read_metadata(path)["modelspec.prediction_type"] == "epsilon"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert V_PRED_KEY not in f.keys() and ZTSNR_KEY not in f.keys()
    apply_schedule(pipe, "v_prediction", True)
    path = save_single_file(pipe, tmp_path / "v.safetensors")
    assert read_metadata(path)["modelspec.prediction_type"] == "v"  # the SAI model spec's value
    with safe_open(str(path), framework="pt") as f:
        assert {V_PRED_KEY, ZTSNR_KEY} <= set(f.keys())
    apply_schedule(pipe, "epsilon", False)
    pipe.save_pretrained(tmp_path / "epsconfig", safe_serialization=True)
    again = load_single_file(path, StableDiffusionPipeline, config_dir=tmp_path / "epsconfig")
    assert model_schedule(again) == ("v_prediction", True)


def test_a1111_yaml_beside_the_file_says_v_prediction(tok_dir, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionPipeline

    pipe = build_sd(tok_dir)
    pipe.save_pretrained(tmp_path / "config", safe_serialization=True)
    path = _bare_file(pipe, tmp_path / "model.safetensors")
    assert model_schedule(load_single_file(path, StableDiffusionPipeline, config_dir=tmp_path / "config"))[0] == \
        "epsilon"
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n    linear_start: 0.00085\n')
    loaded = load_single_file(path, StableDiffusionPipeline, config_dir=tmp_path / "config")
    assert model_schedule(loaded) == ("v_prediction", False)
    assert "model.yaml" in loaded.__dict__["_schedule_note"]


def test_load_base_options_override_the_file(tok_dir, tmp_path):  # noqa: F811
    from pipelines.base_models import load_base

    pipe = build_sd(tok_dir)
    pipe.save_pretrained(tmp_path / "config", safe_serialization=True)
    path = _bare_file(pipe, tmp_path / "vpred.safetensors", **marker_tensors("v_prediction", False))
    read = load_base(path, device="cpu", config=str(tmp_path / "config"))
    assert (read.prediction_type, read.zero_terminal_snr) == ("v_prediction", False)
    assert "vpred.safetensors: v-prediction, read from its 'v_pred' tensor" == read.schedule_note
    forced = load_base(path, device="cpu", config=str(tmp_path / "config"), prediction_type="eps",
                       zero_terminal_snr=True)
    assert (forced.prediction_type, forced.zero_terminal_snr) == ("epsilon", True) and forced.schedule_note is None
    with pytest.raises(ConfigError, match="prediction_type: must be epsilon or v_prediction"):
        load_base(path, device="cpu", config=str(tmp_path / "config"), prediction_type="x0")


def test_sd2_file_on_the_standard_config_is_told_apart_by_its_weights(tmp_path):
    """diffusers' standard config takes every SD 2.x file for the 768-v model; SD 2.1-base predicts epsilon."""
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    for std, want in ((0.2, "v_prediction"), (0.01, "epsilon")):
        path = save_safetensors({key: torch.randn(320) * std}, tmp_path / f"sd2_{std}.safetensors")
        pred, zsnr, why = file_schedule(path, [key], {}, "sd2", standard_config=True)
        assert (pred, zsnr) == (want, None) and "weights" in why
        assert file_schedule(path, [key], {}, "sd2", standard_config=False) == (None, None, "")


def test_every_sampler_samples_a_zero_snr_schedule(toy_base):
    """Each sampler of the list draws on the toy model with and without zero terminal SNR (LMS needs scipy); on the
    zero-SNR schedule it starts from the last timestep, and those without diffusers' own option get the same
    rescaled betas as Euler computes for itself."""
    import diffusers

    own = {k: v for k, v in toy_base.pipe.scheduler.config.items() if not k.startswith("_")}
    native = diffusers.EulerDiscreteScheduler.from_config({**own, "rescale_betas_zero_snr": True})
    ours = diffusers.EulerDiscreteScheduler.from_config({**own, "trained_betas": zero_snr_betas(own).tolist()})
    assert torch.allclose(native.alphas_cumprod, ours.alphas_cumprod, atol=1e-6)
    for name in SCHEDULERS:
        for zsnr in (None, True):
            out = generate(toy_base, GenerationRequest(prompt=PROMPT, steps=6, seed=1, scheduler=name,
                                                       zero_terminal_snr=zsnr))[0]
            assert np.asarray(out.image).std() > 1, (name, zsnr)
            assert ("Noise Schedule: Zero Terminal SNR" in out.parameters) == bool(zsnr), name
            if zsnr and "timestep_spacing" in toy_base.pipe.scheduler.config:
                assert int(toy_base.pipe.scheduler.timesteps[0]) == 999, name
    set_scheduler(toy_base.pipe, "DPM++ 2M Karras")


def test_cfg_rescale_is_diffusers_guidance_rescale(toy_base):
    """The hook gives diffusers' own `guidance_rescale` where a pipeline has it (SD txt2img), and works where it
    has not (SD img2img); 0 leaves the picture as it was, bit for bit."""
    req = dict(prompt=PROMPT, steps=6, seed=5, num_images=2, scheduler="DDIM")
    plain = generate(toy_base, GenerationRequest(**req))
    ours = generate(toy_base, GenerationRequest(**req, cfg_rescale=0.7))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    native = toy_base.pipe(prompt=PROMPT, num_inference_steps=6, guidance_scale=7, guidance_rescale=0.7,
                           generator=gens, num_images_per_prompt=2, output_type="np").images
    as_array = lambda imgs: np.stack([np.asarray(i.image, dtype=np.float32) / 255 for i in imgs])  # noqa: E731
    assert np.abs(as_array(ours) - native).max() < 3 / 255
    assert np.abs(as_array(plain) - native).max() > 20 / 255
    assert "CFG Rescale: 0.7" in ours[0].parameters and "CFG Rescale" not in plain[0].parameters
    zero = generate(toy_base, GenerationRequest(**req, cfg_rescale=0.0))
    assert np.array_equal(as_array(zero), as_array(plain))
    start = Image.new("RGB", (64, 64), (30, 70, 220))
    i2i = dict(req, init_image=start, denoising_strength=0.8)
    assert not np.array_equal(as_array(generate(toy_base, GenerationRequest(**i2i))),
                              as_array(generate(toy_base, GenerationRequest(**i2i, cfg_rescale=0.7))))
    with pytest.raises(ConfigError, match="cfg_rescale"):
        GenerationRequest(prompt=PROMPT, cfg_rescale=1.5)


@pytest.mark.parametrize("key", ["CFG Rescale", "Rescale CFG", "CFG Rescale φ"])
def test_recall_reads_cfg_rescale_and_the_noise_schedule(key):
    from pipelines.recall import recall

    got = recall(f"a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, {key}: 0.7, "
                 "Noise Schedule: Zero Terminal SNR")
    assert got.request.cfg_rescale == 0.7 and got.request.zero_terminal_snr is True
    plain = recall("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Noise Schedule: Default")
    assert plain.request.cfg_rescale == 0 and plain.request.zero_terminal_snr is None


def test_zero_snr_training_is_for_v_prediction_models():
    from training.config import TrainConfig

    with pytest.raises(ConfigError, match="zero_terminal_snr: an epsilon model"):
        TrainConfig(images="x", trigger="sks", zero_terminal_snr=True, prediction_type="epsilon")


def test_kohya_ss_schedule_options_are_read(tmp_path):
    import json

    from training.kohya_gui import read_kohya_gui

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"v_parameterization": True, "zero_terminal_snr": True,
                                "scale_v_pred_loss_like_noise_pred": True, "network_dim": 8}))
    got = read_kohya_gui(path)
    assert got.options["prediction_type"] == "v_prediction" and got.options["zero_terminal_snr"] is True
    assert any("scale_v_pred_loss_like_noise_pred" in n for n in got.notes)


def test_training_on_a_zero_snr_v_prediction_schedule(star_images, tiny_sd1_dir, tmp_path):
    """kohya's --v_parameterization --zero_terminal_snr: the run's noise schedule reaches zero SNR, the loss stays
    finite there (min-SNR and debiased weights included), the file says so, and a caller's base is not changed."""
    from pipelines.base_models import load_base
    from pipelines.weights_io import load_safetensors
    from training.config import TrainConfig
    from training.trainer import Trainer

    from pipelines.errors import TrainingError

    args = dict(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), max_steps=3,
                batch_size=2, device="cpu", sample_steps=2, name="z", rank=4, seed=3, weight_check=False,
                min_timestep=990, debiased_estimation=True)  # every step at the last timesteps, where SNR is ~0
    caller = load_base(tiny_sd1_dir, device="cpu")
    tr = Trainer(TrainConfig(**args, prediction_type="v_prediction", zero_terminal_snr=True), base=caller)
    res = tr.run()
    assert (caller.prediction_type, caller.zero_terminal_snr) == ("epsilon", False)
    assert tr.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(tr.noise_scheduler.alphas_cumprod[-1]) == 0.0
    sd, meta = load_safetensors(res.adapter_path)
    assert all(torch.isfinite(v).all() for v in sd.values()) and any(v.abs().sum() > 0 for v in sd.values())
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_zero_terminal_snr"] == "True"
    with pytest.raises(TrainingError, match="zero_terminal_snr: .* predicts epsilon"):
        Trainer(TrainConfig(**{**args, "name": "e"}, zero_terminal_snr=True), base=caller).run()


def test_cli_and_app_take_cfg_rescale_and_the_schedule_and_make_them_again(toy_base_dir, tmp_path, monkeypatch):
    from app.cli import main
    from app.studio import Studio
    from app.ui import StudioUI
    from pipelines.generation import read_png_parameters

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--prompt", PROMPT, "--steps", "6",
                 "--seed", "5", "--scheduler", "Euler", "--cfg-rescale", "0.7", "--zero-terminal-snr",
                 "--out", str(out)]) == 0
    text = read_png_parameters(out)
    assert "CFG Rescale: 0.7" in text and "Noise Schedule: Zero Terminal SNR" in text
    again = tmp_path / "again.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--from-png", str(out),
                 "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    ui = StudioUI(Studio(home=tmp_path / "home", base=str(toy_base_dir), device="cpu"))
    form = (PROMPT, "", 6, 7.0, 5, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, None, 0.75, 4, None, False)
    slots = (None, True, 1.0, False, 1.0, False, 0, 0) * 4
    *_, paths, warn, info = ui.generate_event(ui.base_names()[0], *form, False, False, -1, 0, False, 0.7, True, 0,
                                              *slots)
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(out)))  # the CLI's picture
    recalled = ui.recall_form(read_png_parameters(paths[0]), ui.base_names()[0])
    assert recalled[-4:-2] == (0.7, True) and recalled[-2] == gr_open()


def gr_open():
    import gradio as gr

    return gr.update(open=True)
