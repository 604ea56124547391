"""LoRA training on tiny models: output files, resume, NaN, prior preservation, SDXL, config."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from pipelines.errors import ConfigError, DatasetError, IncompatibleAdapterError, TrainingError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import train


def _cfg(star_images, base, tmp_path, **kw):
    base_kw = dict(images=str(star_images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=4, batch_size=2,
                   checkpoint_every=2, device="cpu", sample_steps=2, name="t", rank=4, seed=3)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _lora_delta(sd):
    return {k: v for k, v in sd.items() if "lora_B" in k}


def test_trained_adapter_loads_in_diffusers_and_changes_output(star_images, tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    progress = []
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, train_text_encoder=True, alpha=8), on_progress=progress.append)
    assert res.adapter_path.name == "t.safetensors"
    lib = res.adapter_path.parent
    assert (lib / "t.png").is_file() and (lib / "t.md").is_file() and (lib / "t.toml").is_file()
    # the library's .toml is shared with the adapter: every option as trained, but no absolute local path
    # (a folder outside the home keeps only its name)
    want = _cfg(star_images, tiny_sd1_dir, tmp_path, train_text_encoder=True, alpha=8)
    toml = (lib / "t.toml").read_text()
    assert str(tmp_path) not in toml and str(star_images) not in toml and str(tiny_sd1_dir) not in toml
    assert TrainConfig.from_toml(lib / "t.toml") == want.replace(images=star_images.name, base=tiny_sd1_dir.name,
                                                                  output_dir="lib")
    steps = [p.step for p in progress if p.loss is not None and not p.message]
    assert steps == [1, 2, 3, 4] and all(p.eta_s is not None for p in progress if p.loss is not None)
    assert (res.run_dir / "log.csv").read_text().count("\n") == 5
    sd, meta = load_safetensors(res.adapter_path)
    # the library file has kohya's key layout (what AUTOMATIC1111 and ComfyUI map completely), alpha per module
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)
    assert any(k.startswith("lora_unet_") and k.endswith("to_q.lora_down.weight") for k in sd)
    assert any(k.startswith("lora_te_") and "q_proj.lora_up" in k for k in sd)
    assert all(float(v) == 8.0 for k, v in sd.items() if k.endswith(".alpha"))
    for key in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.architecture",
                "lora_studio.trigger", "lora_studio.base_hash", "lora_studio.train_config", "lora_studio.unet_layout"):
        assert key in meta, key
    # no absolute local path in what is shared; the base is a folder: no file hash for kohya's model-hash key
    assert not any(str(tmp_path) in v or str(star_images) in v or str(tiny_sd1_dir) in v for v in meta.values())
    assert "ss_new_sd_model_hash" not in meta
    assert meta["ss_network_alpha"] == "8" and meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["lora_studio.num_images"] == "4"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red sks", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(res.adapter_path))
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-4
    # alpha/rank honoured by diffusers: the scale on the layer is alpha / r = 2
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == pytest.approx(2.0)


def test_resume_gives_same_weights_as_uninterrupted(star_images, tiny_sd1_dir, tmp_path):
    # LoRA dropout and caption dropout / tag shuffling draw random numbers every step: all must resume exactly
    def cfg(*a, **kw):
        return _cfg(*a, **kw, caption_dropout=0.3, shuffle_tags=True, keep_tokens=0)

    full = train(cfg(star_images, tiny_sd1_dir, tmp_path / "a", name="r", max_steps=6, dropout=0.1))
    stop = threading.Event()

    def halt_at_3(p):
        if p.step == 3 and p.loss is not None:
            stop.set()

    part = train(cfg(star_images, tiny_sd1_dir, tmp_path / "b", name="r", max_steps=6, dropout=0.1),
                 on_progress=halt_at_3, stop=stop)
    assert part.stopped and part.steps == 3 and part.adapter_path is None
    assert part.checkpoint.name == "step-000003"
    resumed = train(cfg(star_images, tiny_sd1_dir, tmp_path / "b", name="r", max_steps=6, dropout=0.1,
                         resume="latest"))
    a, _ = load_safetensors(full.adapter_path)
    b, _ = load_safetensors(resumed.adapter_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_with_different_rank_is_refused(star_images, tiny_sd1_dir, tmp_path):
    train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="x", max_steps=2, checkpoint_every=1))
    with pytest.raises(TrainingError, match="rank: checkpoint 4 vs now 8"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="x", max_steps=4, rank=8, resume="latest",
                    overwrite=True))
    with pytest.raises(TrainingError, match="conv_rank: checkpoint None vs now 2"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="x", max_steps=4, conv_rank=2, resume="latest",
                    overwrite=True))


def test_resume_with_different_base_is_refused(star_images, tiny_sd1_dir, tiny_sd2_dir, tmp_path):
    train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="y", max_steps=2, checkpoint_every=1))
    with pytest.raises(TrainingError, match="base: checkpoint .*tiny_sd1.* vs now .*tiny_sd2"):
        train(_cfg(star_images, tiny_sd2_dir, tmp_path, name="y", max_steps=4, resume="latest", overwrite=True))


def test_checkpoint_retention(star_images, tiny_sd1_dir, tmp_path):
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=6, checkpoint_every=1, checkpoints_keep=2))
    names = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]


def test_nan_loss_stops_and_keeps_last_checkpoint(star_images, tiny_sd1_dir, tmp_path, monkeypatch):
    import training.trainer as tr

    real = tr.diffusion_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(tr, "diffusion_loss", sometimes_nan)
    cfg = _cfg(star_images, tiny_sd1_dir, tmp_path, name="n", max_steps=5, checkpoint_every=2)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        train(cfg)
    lib = tmp_path / "lib"
    assert not (lib / "n.safetensors").exists()
    ck = lib / "runs" / "n" / "checkpoints" / "step-000002" / "adapter.safetensors"
    sd, _ = load_safetensors(ck, check_finite=True)
    assert sd and all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)  # usable in A1111/ComfyUI as it is


def test_prior_preservation_generates_and_caches_class_images(star_images, tiny_sd1_dir, tmp_path):
    cfg = _cfg(star_images, tiny_sd1_dir, tmp_path, class_prompt="a shape", num_class_images=2, max_steps=2)
    train(cfg)
    cached = list((tmp_path / "lib" / ".cache" / "class_images").rglob("*.png"))
    assert len(cached) == 2
    mtimes = {p: p.stat().st_mtime for p in cached}
    train(cfg.replace(name="t2"))
    assert {p: p.stat().st_mtime for p in cached} == mtimes  # reused, not regenerated


def test_train_more_from_finished_adapter(star_images, tiny_sd1_dir, tmp_path):
    first = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="m1", max_steps=2, train_text_encoder=True))
    more = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="m2", max_steps=1, init_adapter=str(first.adapter_path),
                      lr_unet=1e-9, lr_text=1e-9, warmup_steps=0, lr_scheduler="constant", train_text_encoder=True))
    a, _ = load_safetensors(first.adapter_path)
    b, _ = load_safetensors(more.adapter_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6)


def test_fp16_adapter_file_is_half_the_size_and_loads_with_the_same_output(star_images, tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    full = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="f32", train_text_encoder=True))
    half = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="f16", train_text_encoder=True, save_precision="fp16"))
    a, _ = load_safetensors(full.adapter_path)
    b, meta = load_safetensors(half.adapter_path)
    assert a.keys() == b.keys() and all(v.dtype == torch.float16 for v in b.values())
    assert all(torch.equal(a[k].half(), b[k]) for k in a)  # the same run, rounded once at the end
    # the weights take half the bytes (the header and metadata, most of a tiny file, are the same)
    saved = full.adapter_path.stat().st_size - half.adapter_path.stat().st_size
    assert saved == pytest.approx(sum(v.numel() * 2 for v in b.values()), rel=0.02)
    assert json.loads(meta["lora_studio.train_config"])["save_precision"] == "fp16"
    # checkpoints stay fp32, so resuming is exact
    ckpt, _ = load_safetensors(half.checkpoint / "adapter.safetensors")
    assert all(v.dtype == torch.float32 for v in ckpt.values())

    outs = []
    for path in (full.adapter_path, half.adapter_path):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path))
        outs.append(pipe(prompt="a red sks", num_inference_steps=2, output_type="np", height=32, width=32,
                         generator=torch.Generator().manual_seed(0)).images)
    assert abs(outs[0] - outs[1]).max() < 2e-3
    # and it can be trained further
    more = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="f16b", max_steps=1, train_text_encoder=True,
                      init_adapter=str(half.adapter_path)))
    assert more.adapter_path.is_file()


def test_weights_too_large_for_fp16_are_not_saved_as_inf_and_are_kept(star_images, tiny_sd1_dir, tmp_path,
                                                                      monkeypatch):
    from training import lora

    real = lora.lora_state_dict

    def huge(pipe, comps):  # a weight beyond fp16's 65504
        sd = real(pipe, comps)
        k = next(iter(sd))
        return {**sd, k: sd[k] * 0 + 1e6}

    monkeypatch.setattr(lora, "lora_state_dict", huge)
    with pytest.raises(TrainingError, match="save_precision: .* does not fit in fp16.*step-000004"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="big", save_precision="fp16", checkpoint_every=0))
    assert not (tmp_path / "lib" / "big.safetensors").exists()
    monkeypatch.setattr(lora, "lora_state_dict", real)
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="big", save_precision="bf16", checkpoint_every=0,
                     resume="latest"))
    sd, _ = load_safetensors(res.adapter_path)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}


def test_train_more_with_other_ranks_than_the_adapter_is_refused(star_images, tiny_sd1_dir, tmp_path):
    first = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="c1", max_steps=1, unet_targets=["to_q", "conv1"],
                       conv_rank=2))
    with pytest.raises(IncompatibleAdapterError, match="c1.safetensors: its LoRA ranks differ .*conv1"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="c2", max_steps=1, unet_targets=["to_q", "conv1"],
                   init_adapter=str(first.adapter_path)))
    # the same ranks under another alpha would train another scale: refused, naming the module
    with pytest.raises(IncompatibleAdapterError, match=r"c1.safetensors: module unet\..* has alpha [24], this run uses [48];"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="c3", max_steps=1, unet_targets=["to_q", "conv1"],
                   conv_rank=2, alpha=8, init_adapter=str(first.adapter_path)))


def test_training_sees_shuffled_tags_and_dropped_captions(tiny_sd1_dir, tmp_path, monkeypatch):
    from PIL import Image

    from training import trainer as tr

    d = tmp_path / "tagged"
    d.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), color).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"sks, {color}, square, flat, simple")
    seen: list[str] = []
    real = tr.encode_text
    monkeypatch.setattr(tr, "encode_text", lambda base, prompts, *a: seen.extend(prompts) or real(base, prompts, *a))
    train(_cfg(d, tiny_sd1_dir, tmp_path, max_steps=12, shuffle_tags=True, keep_tokens=1, caption_dropout=0.2,
               checkpoint_every=0, sample_every=0))
    rows = [p for p in seen if p.startswith("sks, ")]
    assert rows and all(sorted(p.split(", ")[1:]) in (sorted(["red", "square", "flat", "simple"]),
                                                      sorted(["blue", "square", "flat", "simple"])) for p in rows)
    assert len(set(rows)) > 4  # new orders, not the file's one
    assert "" in seen  # some rows trained on the empty caption


def test_training_draws_only_the_configured_timesteps(star_images, tiny_sd1_dir, tmp_path, monkeypatch):
    from training import trainer as tr

    seen: list[int] = []
    real = tr.diffusion_loss

    def spy(*a, **k):
        seen.extend(a[9][1].tolist())  # the (noise, timesteps) the trainer drew for this batch
        return real(*a, **k)

    monkeypatch.setattr(tr, "diffusion_loss", spy)
    # kohya's --min_timestep / --max_timestep: [200, 300), instance and base-preservation rows alike
    train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=3, checkpoint_every=0, min_timestep=200,
               max_timestep=300, preserve_weight=1.0))
    assert len(seen) == 3 * 4 and all(200 <= t < 300 for t in seen) and len(set(seen)) > 3
    seen.clear()
    train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=3, checkpoint_every=0, name="full"))
    assert max(seen) >= 300 or min(seen) < 200  # the default range is the whole schedule


@pytest.mark.parametrize("kw,msg", [({"min_timestep": 500, "max_timestep": 500}, "min_timestep: must be below"),
                                    ({"max_timestep": 1001}, "max_timestep"), ({"min_timestep": -1}, "min_timestep")])
def test_a_bad_timestep_range_is_refused_naming_the_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(images="x", **kw)


def test_clip_skip_trains_on_the_next_to_last_layer_and_says_so_in_the_file(star_images, tiny_sd1_dir, tmp_path,
                                                                              tiny_sdxl_dir, monkeypatch):
    """kohya's --clip_skip 2: every caption (and the preservation prompts) encoded through the text encoder's
    next-to-last layer, also while the text encoder trains; the file says so (ss_clip_skip, model card, A1111
    notes) and generating it with another Clip skip is warned about."""
    from pipelines.adapters import adapter_facts
    from pipelines.base_models import load_base
    from pipelines.generation import GenerationRequest
    from pipelines.library import AdapterLibrary
    from pipelines.stack import AdapterStack, clip_skip_warnings
    from training import trainer as tr

    skips: list[int] = []
    real = tr.encode_text
    monkeypatch.setattr(tr, "encode_text", lambda base, prompts, skip=1: skips.append(skip) or real(base, prompts, skip))
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, clip_skip=2, train_text_encoder=True, lr_text=1e-4,
                     preserve_weight=1.0, checkpoint_every=0))
    assert skips and set(skips) == {2}
    base = load_base(tiny_sd1_dir, device="cpu")
    te = base.pipe.text_encoder
    ids = base.pipe.tokenizer(["a sks"], padding="max_length", max_length=base.pipe.tokenizer.model_max_length,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        want = getattr(te, "text_model", te).final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        assert torch.allclose(real(base, ["a sks"], 2)[0], want)
        assert not torch.allclose(real(base, ["a sks"], 1)[0], want)
    _, meta = load_safetensors(res.adapter_path)
    assert meta["ss_clip_skip"] == "2"
    card = res.adapter_path.with_suffix(".md").read_text()
    assert "Trained with clip skip 2" in card and "--clip-skip 2" in card
    assert "Clip skip 2" in json.loads(res.adapter_path.with_suffix(".json").read_text())["notes"]
    lib = AdapterLibrary(tmp_path / "lib")
    assert ("clip skip", "trained with clip skip 2: generate with Clip skip 2 too (--clip-skip 2)") in \
        adapter_facts(lib.info("t"))
    stack = AdapterStack(base, lib)
    stack.generate(GenerationRequest(prompt="a sks", steps=1, seed=1), ["t"])
    assert clip_skip_warnings(stack, 1) == ["t was trained with Clip skip 2; this image uses 1: set Clip skip to 2 "
                                             "for the look it learned"]
    assert clip_skip_warnings(stack, 2) == []
    with pytest.raises(ConfigError, match="clip_skip: SDXL models already take"):
        train(_cfg(star_images, tiny_sdxl_dir, tmp_path, clip_skip=2, name="xl"))
    with pytest.raises(ConfigError, match="clip_skip: .*at most 2, got 3"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, clip_skip=3, name="deep"))


def test_sdxl_training_on_tiny_model(star_images, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    res = train(_cfg(star_images, tiny_sdxl_dir, tmp_path, train_text_encoder=True, max_steps=2, buckets=False))
    sd, meta = load_safetensors(res.adapter_path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    # kohya's SDXL layout: te1/te2, and the UNet under the LDM block names kohya trains SDXL on
    assert any(k.startswith("lora_te2_") for k in sd) and any(k.startswith("lora_te1_") for k in sd)
    unet_keys = [k for k in sd if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for k in unet_keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(res.adapter_path))
    assert any("lora" in n for n, _ in pipe.text_encoder_2.named_modules())


def test_mixed_size_images_use_buckets(tiny_sd1_dir, tmp_path):
    from PIL import Image

    d = tmp_path / "mixed"
    d.mkdir()
    Image.new("RGB", (64, 32), "red").save(d / "wide.png")
    Image.new("RGB", (32, 64), "blue").save(d / "tall.png")
    Image.new("RGB", (40, 40), "green").save(d / "square.png")
    res = train(_cfg(d, tiny_sd1_dir, tmp_path, max_steps=3, batch_size=1))
    assert res.adapter_path.is_file()


@pytest.mark.parametrize("kw,field", [({"rank": 0}, "rank"), ({"resolution": 30}, "resolution"),
                                      ({"mixed_precision": "fp8"}, "mixed_precision"), ({"dropout": 1.5}, "dropout"),
                                      ({"name": "../evil"}, "name"), ({"lr_unet": -1.0}, "lr_unet"),
                                      ({"min_snr_gamma": -1.0}, "min_snr_gamma"),
                                      ({"save_precision": "fp8"}, "save_precision"), ({"conv_rank": 0}, "conv_rank"),
                                      ({"conv_alpha": -1.0}, "conv_alpha")])
def test_invalid_config_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kw)


def test_toml_unknown_key_and_round_trip(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('images = "x"\nrank = 4\nlearning_rate = 1e-4\n')
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_toml(p)
    cfg = TrainConfig(images="x", rank=4, sample_prompts=["a sks"], alpha=2.0)
    p.write_text(cfg.to_toml())
    assert TrainConfig.from_toml(p) == cfg
    p.write_text("[train]\nrank = 0\n")
    with pytest.raises(ConfigError, match="rank"):
        TrainConfig.from_toml(p)


def test_min_snr_gamma_zero_turns_weighting_off_in_toml(tmp_path):
    # TOML has no null: a preset's min-SNR default must still be switchable off from a config file
    p = tmp_path / "run.toml"
    p.write_text('images = "x"\npreset = "concept"\nmin_snr_gamma = 0\n')
    assert TrainConfig.from_toml(p).min_snr_gamma is None
    assert TrainConfig.from_dict({"preset": "concept"}).min_snr_gamma == 5.0


def test_preset_defaults_and_overrides():
    c = TrainConfig.from_dict({"preset": "style", "rank": 16})
    assert c.rank == 16 and c.instance_template == "in the style of {trigger}" and not c.train_text_encoder


def test_cli_builds_the_same_config(tmp_path):
    from app.cli import parse_train_args

    p = tmp_path / "run.toml"
    p.write_text('images = "pics"\nrank = 4\ntrigger = "ohwx"\n')
    cfg = parse_train_args(["--config", str(p), "--rank", "8", "--name", "n", "--no-train-text-encoder"])
    assert cfg == TrainConfig(images="pics", rank=8, trigger="ohwx", name="n", train_text_encoder=False)
    with pytest.raises(ConfigError, match="rank"):
        parse_train_args(["--images", "x", "--rank", "0"])
    cfg = parse_train_args(["--images", "x", "--preserve-weight", "3", "--preserve-prompt", "a cat",
                            "--preserve-prompt", "a dog"])
    assert cfg.preserve_weight == 3.0 and cfg.preserve_prompts == ["a cat", "a dog"]
    with pytest.raises(ConfigError, match="preserve_weight"):
        parse_train_args(["--images", "x", "--preserve-weight", "-1"])
    # module lists: the concept preset's wide UNet targets, replaced from the command line
    assert "conv1" in parse_train_args(["--images", "x", "--preset", "concept"]).unet_targets
    cfg = parse_train_args(["--images", "x", "--preset", "concept", "--unet-targets", "to_k, to_v",
                            "--text-targets", "q_proj,v_proj"])
    assert cfg.unet_targets == ["to_k", "to_v"] and cfg.text_targets == ["q_proj", "v_proj"]
    assert "conv1" in TrainConfig.from_dict({"preset": "concept"}).unet_targets  # the preset was not changed
    cfg = parse_train_args(["--images", "x", "--rank", "16", "--alpha", "8", "--conv-rank", "4"])
    assert (cfg.lora_conv_rank, cfg.lora_conv_alpha) == (4, 2.0)  # the same alpha/rank scale by default
    cfg = parse_train_args(["--images", "x", "--save-precision", "fp16", "--conv-alpha", "1"])
    assert cfg.save_precision == "fp16" and (cfg.lora_conv_rank, cfg.lora_conv_alpha) == (8, 1.0)


def test_fp16_on_cpu_is_refused_clearly(star_images, tiny_sd1_dir, tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, mixed_precision="fp16"))


@pytest.mark.parametrize("family,conv", [("sd1", None), ("sdxl", None), ("sd1", (2, 1.0)), ("sdxl", (2, 6.0))])
def test_concept_preset_modules_load_everywhere_with_the_trained_output(family, conv, star_images, tiny_sd1_dir,
                                                                        tiny_sdxl_dir, tmp_path):
    """The concept preset also trains the ResNet convolutions, the transformer blocks' projections and
    feed-forward layers: diffusers (our file and the kohya export) and our own stack must load all of
    them and reproduce the UNet of the finished run exactly. Also with the 3x3 convolutions at their own
    rank and alpha (kohya's conv_dim / conv_alpha), so the file carries two ranks and two alpha/rank scales."""
    from pipelines.adapters import export_kohya, to_peft
    from pipelines.base_models import load_base
    from pipelines.stack import AdapterStack
    from training.config import PRESETS

    base_dir = tiny_sd1_dir if family == "sd1" else tiny_sdxl_dir
    targets = PRESETS["concept"]["unet_targets"]
    assert {"conv1", "conv2", "ff.net.2"} <= set(targets)
    base = load_base(str(base_dir), device="cpu")
    conv_kw = {"conv_rank": conv[0], "conv_alpha": conv[1]} if conv else {}
    cfg = _cfg(star_images, base_dir, tmp_path, unet_targets=targets, max_steps=2, lr_unet=0.05, buckets=False,
               checkpoint_every=0, **conv_kw)
    res = train(cfg, base=base)
    sd, meta = load_safetensors(res.adapter_path)
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in sd)  # the library file: kohya's layout
    sd, _ = to_peft(sd, meta, unet_layers_per_block=base.pipe.unet.config.layers_per_block)
    conv_a = [v for k, v in sd.items() if ".resnets." in k and k.endswith("conv1.lora_A.weight")]
    assert conv_a and all(v.shape[0] == (conv[0] if conv else 4) and v.shape[2:] == (3, 3) for v in conv_a)
    assert all(v.shape[0] == 4 for k, v in sd.items() if k.endswith("ff.net.0.proj.lora_A.weight"))
    assert json.loads(meta["ss_network_args"]) == (  # kohya's LoCon args
        {"conv_dim": str(conv[0]), "conv_alpha": f"{conv[1]:g}"} if conv else {"conv_dim": "4", "conv_alpha": "4"})
    # the library lists the modules by the names the preset uses
    from pipelines.adapters import inspect_adapter

    assert set(inspect_adapter(res.adapter_path).modules) == set(targets)

    g = torch.Generator().manual_seed(0)
    unet = base.pipe.unet
    x = torch.randn(2, unet.config.in_channels, 4, 4, generator=g)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if family == "sdxl":
        pooled_dim = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled_dim, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}}

    def out(pipe_unet):
        with torch.no_grad():
            return pipe_unet(x, torch.tensor([500, 50]), cond, **extra).sample

    trained = out(unet)
    fresh = load_base(str(base_dir), device="cpu")
    assert (out(fresh.pipe.unet) - trained).abs().max() > 1e-3  # the run changed the UNet
    kohya = export_kohya(res.adapter_path, tmp_path / "k.safetensors")
    assert set(inspect_adapter(kohya).modules) == set(targets)
    for path in (res.adapter_path, kohya):
        other = load_base(str(base_dir), device="cpu")
        other.pipe.load_lora_weights(str(path))
        torch.testing.assert_close(out(other.pipe.unet), trained, atol=1e-5, rtol=1e-4)
        mine = load_base(str(base_dir), device="cpu")
        stack = AdapterStack(mine)
        stack.load("a", str(path))
        stack.set_stack([("a", 1.0)])
        torch.testing.assert_close(out(mine.pipe.unet), trained, atol=1e-5, rtol=1e-4)


def test_a_target_module_that_matches_nothing_is_refused(star_images, tiny_sd1_dir, tmp_path):
    with pytest.raises(ConfigError, match="unet_targets: 'to_qq'"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, unet_targets=["to_q", "to_qq"]))
    with pytest.raises(ConfigError, match="text_targets: 'qproj'"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, train_text_encoder=True, text_targets=["qproj"]))
    assert not (tmp_path / "lib" / "t.safetensors").exists()


@pytest.mark.parametrize("preset,conv_rank", [("style", None), ("concept", None), ("concept", 2)])
def test_adapter_size_bench_counts_what_peft_builds(preset, conv_rank, tiny_sd1_dir):
    """bench/adapter_size.py (the README's file sizes for SD 1.5/2.x/SDXL) counts LoRA weights by formula;
    on a real UNet it must match the layers peft actually creates."""
    import importlib.util
    from pathlib import Path

    from pipelines.base_models import load_base
    from training import lora
    from training.config import ATTENTION_TARGETS, PRESETS

    path = Path(__file__).resolve().parent.parent / "bench" / "adapter_size.py"
    spec = importlib.util.spec_from_file_location("adapter_size", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    targets, rank = PRESETS[preset].get("unet_targets", ATTENTION_TARGETS), PRESETS[preset]["rank"]
    base = load_base(str(tiny_sd1_dir), device="cpu")
    counted, layers = bench.unet_lora_params(base.pipe.unet, targets, rank, conv_rank)
    lora.attach(base.pipe, rank, rank, targets, None, conv_rank=conv_rank)
    built = [n for n, _ in base.pipe.unet.named_modules() if n.endswith(".lora_A.default")]
    assert layers == len(built)
    assert counted == sum(p.numel() for n, p in base.pipe.unet.named_parameters() if "lora_" in n)


def test_presets_follow_the_base_family_and_never_give_real_models_the_toy_values(tiny_sd1_dir, tmp_path):
    """The toy's presets are tuned on the toy world; SD 1.x/2.x/XL bases get published values (lr 1e-4, 500
    steps, ...), read from the base's configs without loading it. A tiny test model counts as toy-sized."""
    import json
    import shutil

    from training.config import PRESETS, preset_family

    assert preset_family(None) == "toy" and preset_family(str(tiny_sd1_dir)) == "toy"
    toy = TrainConfig.from_dict({"preset": "concept"})
    assert toy.lr_unet == PRESETS["concept"]["lr_unet"]
    # the same folder with SD 1.5's widths reads as sd1 (only configs are read; no weights are needed)
    real = tmp_path / "sd15"
    shutil.copytree(tiny_sd1_dir, real)
    for sub, key in (("unet", "cross_attention_dim"), ("text_encoder", "hidden_size")):
        cfg_path = real / sub / "config.json"
        c = json.loads(cfg_path.read_text())
        c[key] = 768
        cfg_path.write_text(json.dumps(c))
    assert preset_family(str(real)) == "sd1"
    c = TrainConfig.from_dict({"preset": "concept", "base": str(real)})
    assert (c.lr_unet, c.max_steps, c.rank, c.alpha, c.batch_size, c.lr_scheduler) == (1e-4, 500, 16, 8.0, 1,
                                                                                      "constant")
    assert c.lr_text < c.lr_unet and c.unet_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert TrainConfig.from_dict({"preset": "concept", "base": str(real), "lr_unet": 3e-4}).lr_unet == 3e-4
    assert preset_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    xl = TrainConfig.from_dict({"preset": "style", "base": "stabilityai/stable-diffusion-xl-base-1.0"})
    assert xl.grad_accum == 4 and not xl.train_text_encoder and xl.lr_unet == 1e-4
    assert preset_family(str(tmp_path / "missing.safetensors")) == "sd1"  # unreadable: gentle values, not toy's


def test_bf16_mixed_precision_keeps_the_frozen_base_in_bf16_and_trains_fp32_lora(star_images, tiny_sd1_dir, tmp_path):
    """mixed_precision = "bf16" stores the frozen weights in bf16 (half the memory, as the diffusers examples do)
    while the LoRA weights and their optimizer stay fp32; a base passed in by the caller (the app's) is not changed."""
    import math

    from pipelines.base_models import load_base
    from training.trainer import Trainer

    caller = load_base(tiny_sd1_dir, device="cpu")
    tr = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path, name="mp", mixed_precision="bf16", train_text_encoder=True,
                      checkpoint_every=0), base=caller)
    tr.build()
    for comp in ("unet", "text_encoder"):
        named = list(getattr(tr.base.pipe, comp).named_parameters())
        assert {p.dtype for n, p in named if "lora_" not in n} == {torch.bfloat16}, comp
        assert {p.dtype for n, p in named if "lora_" in n} == {torch.float32}, comp
    assert caller.pipe.unet.dtype == torch.float32 and tr.base is not caller
    before = {n: p.detach().clone() for n, p in tr.base.pipe.unet.named_parameters() if "lora_B" in n}
    assert all(math.isfinite(tr.train_step(k)) for k in range(2))
    after = dict(tr.base.pipe.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name="mp2", mixed_precision="bf16", checkpoint_every=0))
    sd, _ = load_safetensors(res.adapter_path)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)


def test_compiled_unet_trains_the_same_adapter(star_images, tiny_sd1_dir, tmp_path, monkeypatch):
    """compile_unet = true runs the training step through torch.compile: the same losses and the same adapter as
    the eager step (to float tolerance), and the saved file has the UNet's own names (no compile wrapper's).
    The graph is captured by dynamo and run by aot_eager here: inductor's code generation takes minutes on
    a 2-core CPU (bench/step_speedups.py --variants compile measures the real thing)."""
    from torch._dynamo.utils import counters

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(type(m).__name__) or real(m, backend="aot_eager"))
    counters.clear()
    progress = {True: [], False: []}
    out = {}
    for comp in (False, True):
        res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, name=f"c{int(comp)}", compile_unet=comp, max_steps=3,
                         checkpoint_every=0, weight_check=False), on_progress=progress[comp].append)
        out[comp], _ = load_safetensors(res.adapter_path)
    losses = {c: list({p.step: p.loss for p in progress[c] if p.loss is not None}.values()) for c in progress}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert compiled == ["UNet2DConditionModel"] and counters["stats"]["unique_graphs"] >= 1  # the step ran compiled
    assert out[True].keys() == out[False].keys() and not any("_orig_mod" in k for k in out[True])
    for k in out[False]:
        assert torch.allclose(out[True][k], out[False][k], atol=1e-5), k


def _kohya_dirs(tmp_path):
    from PIL import Image

    folders = {"img/3_sks red": (255, 0, 0), "img/1_sks blue": (0, 0, 255), "reg/1_a shape": (128, 128, 128)}
    for folder, colour in folders.items():
        (tmp_path / folder).mkdir(parents=True)
        # the class image another shape (2:3): cut to the training images' size, so each step's rows stack
        Image.new("RGB", (32, 48) if folder.startswith("reg") else (32, 32), colour).save(tmp_path / folder / "0.png")
    return tmp_path / "img", tmp_path / "reg"


def test_a_kohya_dataset_trains_with_its_repeats_captions_and_regularisation_folder(tiny_sd1_dir, tmp_path):
    """A dataset laid out for kohya_ss (img/3_sks red, img/1_sks blue, reg/1_a shape) trains as there: each
    folder's images as often as its number says, captioned with its name, and the reg folder's images as class
    images with their folder's caption, no class prompt needed."""
    from training.trainer import Trainer

    img, reg = _kohya_dirs(tmp_path)
    tr = Trainer(_cfg(img, tiny_sd1_dir, tmp_path, batch_size=1, class_images=str(reg), checkpoint_every=0))
    tr.build()
    seen = [tr.examples[i].caption for k in range(12) for i in tr.schedule(k)]
    assert (seen.count("sks red"), seen.count("sks blue")) == (9, 3)  # three epochs of 3 + 1
    assert [ex.caption for ex in tr.priors] == ["a shape"] and tr.prior_schedules
    assert tr.priors[0].size == tr.examples[0].size
    assert tr.train_step(0) > 0
    # the file says so as kohya's does: images counted with their repeats, each folder's count and tags
    res = train(_cfg(img, tiny_sd1_dir, tmp_path, name="k2", max_steps=2, checkpoint_every=0))
    _, meta = load_safetensors(res.adapter_path)
    assert meta["ss_num_train_images"] == "4" and meta["ss_masked_loss"] == "False"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks red": {"n_repeats": 3, "img_count": 1},
                                                   "1_sks blue": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"]) == {"3_sks red": {"sks red": 1}, "1_sks blue": {"sks blue": 1}}


def test_class_images_without_captions_need_a_class_prompt(tiny_sd1_dir, tmp_path):
    img, reg = _kohya_dirs(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    (reg / "1_a shape" / "0.png").rename(plain / "0.png")
    with pytest.raises(ConfigError, match=r"class_prompt: .*plain/0\.png"):
        train(_cfg(img, tiny_sd1_dir, tmp_path, class_images=str(plain)))
    from training.trainer import Trainer  # with the prompt, they train under it

    tr = Trainer(_cfg(img, tiny_sd1_dir, tmp_path, class_images=str(plain), class_prompt="a shape", name="t2"))
    tr.build()
    assert [ex.caption for ex in tr.priors] == ["a shape"]


def test_the_trigger_word_comes_from_kohya_folder_names_unless_given(tmp_path):
    img, _ = _kohya_dirs(tmp_path)
    (img / "1_sks blue").rename(img / "1_ohwx blue")  # sorted first: its first word is the trigger
    assert TrainConfig.from_dict({"images": str(img)}).trigger == "ohwx"
    assert TrainConfig.from_dict({"images": str(img), "trigger": "zwx"}).trigger == "zwx"
    assert TrainConfig.from_dict({"images": str(tmp_path / "reg" / "1_a shape")}).trigger == "sks"  # not that layout
    assert TrainConfig.from_dict({"images": str(tmp_path / "reg")}).trigger == "shape"  # "a" is no trigger word


def _half_masked_set(tmp_path):
    """Three 64x32 images (wide), each with a mask that is white on its left half only: one by transparency, one
    as OneTrainer's -masklabel file, one in a kohya-style mask folder."""
    from PIL import Image

    d, masks = tmp_path / "masked", tmp_path / "masks"
    d.mkdir()
    masks.mkdir()
    left = Image.new("L", (64, 32), 0)
    left.paste(255, (0, 0, 32, 32))
    rgba = Image.new("RGBA", (64, 32), (200, 30, 30, 255))
    rgba.putalpha(left)
    rgba.save(d / "alpha.png")
    Image.new("RGB", (64, 32), (30, 200, 30)).save(d / "beside.png")
    left.save(d / "beside-masklabel.png")
    Image.new("RGB", (64, 32), (30, 30, 200)).save(d / "kohya.jpg")
    left.convert("RGB").save(masks / "kohya.png")
    return d, masks


def test_masked_loss_reads_each_images_mask_cropped_and_flipped_with_it(tiny_sd1_dir, tmp_path):
    from training.trainer import Trainer

    d, masks = _half_masked_set(tmp_path)
    seen = []
    tr = Trainer(_cfg(d, tiny_sd1_dir, tmp_path, masked_loss=True, mask_dir=str(masks), random_flip=True,
                      resolution=64, checkpoint_every=0), on_progress=lambda p: seen.append(p.message or ""))
    tr.build()
    assert len(tr.scan.items) == 3  # the -masklabel file is a mask, not a training image
    assert len(tr.examples) == 6 and all(ex.mask is not None for ex in tr.examples)
    for k in range(0, 6, 2):  # each image, then its mirror image
        plain, mirrored = tr.examples[k].mask, tr.examples[k + 1].mask
        h, w = plain.shape[1:]
        assert (h, w) == tuple(tr.examples[k].latent.shape[1:])
        assert plain[..., : w // 2 - 1].min() > 0.99 and plain[..., w // 2 + 1:].max() < 0.01  # the edge: blended
        assert torch.equal(mirrored, torch.flip(plain, dims=[2]))
    assert any("masked loss: 3 of 3 images have a mask (on average 50%" in m for m in seen)
    assert tr.train_step(0) > 0


def test_masked_loss_ignores_the_error_where_the_mask_is_black(tiny_sd1_dir):
    """Where the mask is 0 the prediction gets no gradient at all; where it is 1, the usual one."""
    from diffusers import DDPMScheduler

    from pipelines.base_models import load_base
    from training.trainer import diffusion_loss

    base = load_base(tiny_sd1_dir, device="cpu")
    sched = DDPMScheduler.from_config(base.pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8)
    pred = torch.zeros(2, 4, 8, 8, requires_grad=True)
    mask = torch.ones(2, 1, 8, 8)
    mask[0, :, :, :4] = 0  # the first row's left half does not count; the second row counts whole
    cfg = TrainConfig(images=".", min_snr_gamma=None)
    noise_t = (torch.randn(2, 4, 8, 8), torch.tensor([100, 500]))
    fake_unet = lambda x, t, c, **kw: type("Out", (), {"sample": pred})()  # noqa: E731
    loss = diffusion_loss(base, sched, latents, torch.zeros(2, 77, 32), None, None, None, cfg, torch.float32,
                          noise_t, unet=fake_unet, mask=mask)
    loss.sum().backward()
    assert pred.grad[0, :, :, :4].abs().max() == 0 and pred.grad[0, :, :, 4:].abs().min() > 0
    assert pred.grad[1].abs().min() > 0
    full = diffusion_loss(base, sched, latents, torch.zeros(2, 77, 32), None, None, None, cfg, torch.float32, noise_t,
                          unet=fake_unet)
    assert torch.allclose(loss[1], full[1]) and loss[0] < full[0]
    # averaged over the mask instead (every image weighs the same): the half-masked row's loss is twice as large
    by_mask = diffusion_loss(base, sched, latents, torch.zeros(2, 77, 32), None, None, None,
                             cfg.replace(mask_mean="mask"), torch.float32, noise_t, unet=fake_unet, mask=mask)
    assert torch.allclose(by_mask[0], 2 * loss[0]) and torch.allclose(by_mask[1], full[1])


def test_masked_loss_without_any_mask_is_refused_naming_the_folder(star_images, tiny_sd1_dir, tmp_path):
    with pytest.raises(DatasetError, match=rf"masked_loss: none of the \d+ images in {star_images}"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, masked_loss=True))


def _dataset_toml(tmp_path, extra_general: str = "", extra_subset: str = "") -> "Path":
    img, reg = _kohya_dirs(tmp_path)
    f = tmp_path / "dataset.toml"
    f.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
color_aug = false
{extra_general}

[[datasets]]
resolution = 32
batch_size = 1

  [[datasets.subsets]]
  image_dir = '{(img / "3_sks red").as_posix()}'
  class_tokens = 'sks red'
  num_repeats = 3
  {extra_subset}

  [[datasets.subsets]]
  image_dir = 'img/1_sks blue'
  class_tokens = 'sks blue'
  caption_suffix = ', glossy'

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{(reg / "1_a shape").as_posix()}'
  class_tokens = 'a shape'
""")
    return f


def test_a_kohya_dataset_config_trains_its_subsets_with_its_options(tiny_sd1_dir, tmp_path, monkeypatch):
    """kohya sd-scripts' --dataset_config: each subset's folder, repeats and caption (class_tokens, suffix), its
    is_reg subset as the class images, and its options (caption shuffling, keep_tokens, resolution, batch size)
    unless given explicitly; what LoRA Studio has no option for is said in the log."""
    from training.trainer import Trainer

    f = _dataset_toml(tmp_path)
    monkeypatch.chdir(tmp_path / "reg")  # image_dir 'img/1_sks blue' is found beside the file, not from here
    cfg = TrainConfig.from_dict({"dataset_config": str(f), "base": str(tiny_sd1_dir), "output_dir": str(tmp_path / "l"),
                                 "max_steps": 2, "device": "cpu", "name": "kd", "sample_every": 0,
                                 "checkpoint_every": 0, "weight_check": False, "batch_size": 2})
    assert (cfg.shuffle_tags, cfg.keep_tokens, cfg.resolution, cfg.batch_size, cfg.trigger) == (True, 1, 32, 2, "sks")
    seen = []
    tr = Trainer(cfg.replace(batch_size=1), on_progress=lambda p: seen.append(p.message or ""))
    tr.build()
    captions = [tr.examples[i].caption for k in range(12) for i in tr.schedule(k)]
    assert (captions.count("sks red"), captions.count("sks blue , glossy")) == (9, 3)
    assert [ex.caption for ex in tr.priors] == ["a shape"]
    assert any("not applied" in m and "color_aug" in m for m in seen)
    assert tr.train_step(0) > 0


@pytest.mark.parametrize("general, subset, msg", [
    ("bogus = 1", "", r"\[general\] bogus: not an option of kohya's dataset config"),
    ("", "keep_tokens = 2", r"subset #2: keep_tokens: 1 here but 2 in \[\[datasets\]\] #1 subset #1"),
    ("", "resolution = [512, 768]", r"resolution: \[512, 768\] is not square"),
    ("", "metadata_file = 'meta.json'", "a fine-tuning dataset"),
    ("", "num_repeats = 0", "num_repeats: a whole number of 1 or more"),
])
def test_a_kohya_dataset_config_that_cannot_apply_is_refused_naming_the_key(tmp_path, general, subset, msg):
    f = _dataset_toml(tmp_path, general, subset.replace("num_repeats = 0", "").strip() if "num_repeats" in subset
                      else subset)
    if "num_repeats = 0" in subset:
        f.write_text(f.read_text().replace("num_repeats = 3", "num_repeats = 0"))
    with pytest.raises(ConfigError, match=msg) as e:
        TrainConfig.from_dict({"dataset_config": str(f)})
    assert str(f) in str(e.value)


def test_a_kohya_dataset_config_with_a_missing_folder_names_it(tmp_path, capsys):
    from app.cli import parse_train_args

    f = _dataset_toml(tmp_path)
    f.write_text(f.read_text().replace("img/1_sks blue", "img/nowhere"))
    with pytest.raises(ConfigError, match=r"subset #2: image_dir: img/nowhere is not a folder"):
        parse_train_args(["--dataset-config", str(f)])
    f.write_text(f.read_text().replace("img/nowhere", "img/1_sks blue"))
    assert parse_train_args(["--dataset-config", str(f), "--trigger", "zz"]).trigger == "zz"
    from app.cli import main

    assert main(["train", "--dataset-config", str(f), "--images", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_a_kohya_option_every_subset_overrides_alike_is_no_conflict(tmp_path):
    f = _dataset_toml(tmp_path)
    text = f.read_text().replace("  class_tokens = 'sks red'", "  class_tokens = 'sks red'\n  keep_tokens = 2")
    f.write_text(text.replace("  class_tokens = 'sks blue'", "  class_tokens = 'sks blue'\n  keep_tokens = 2")
                 .replace("  class_tokens = 'a shape'", "  class_tokens = 'a shape'\n  keep_tokens = 2"))
    assert TrainConfig.from_dict({"dataset_config": str(f)}).keep_tokens == 2  # [general]'s 1 applies nowhere


def test_kohya_dataset_config_layering_defaults_and_types(tmp_path):
    """Subset keys may sit at any level (general < dataset < subset), a subset that leaves an option unset counts
    with kohya's default, class-image subsets do not decide flips, kohya's own caption ending is the default, and
    a value of the wrong type is refused under its kohya name."""
    from training.kohya_dataset import read_kohya_dataset

    img, reg = _kohya_dirs(tmp_path)
    (img / "3_sks red" / "inner").mkdir()
    Image_new = __import__("PIL.Image", fromlist=["Image"]).new
    Image_new("RGB", (32, 32)).save(img / "3_sks red" / "inner" / "x.png")  # kohya reads the folder's own files
    f = tmp_path / "d.toml"
    f.write_text(f"""
[general]
class_tokens = 'sks thing'
[[datasets]]
num_repeats = 4
  [[datasets.subsets]]
  image_dir = '{(img / "3_sks red").as_posix()}'
  [[datasets.subsets]]
  image_dir = '{(reg / "1_a shape").as_posix()}'
  is_reg = true
  flip_aug = true
""")
    k = read_kohya_dataset(f)
    assert [(s.repeats, s.tokens) for s in k.train] == [(4, "sks thing")]
    assert "random_flip" not in k.options and k.options["caption_ext"] == ".caption"
    from training.dataset import scan_subsets

    assert [it.path.name for it in scan_subsets(k.train).items] == ["0.png"]
    f.write_text(f.read_text().replace("  flip_aug = true", "  flip_aug = 'yes'"))
    with pytest.raises(ConfigError, match=r"subset #2: flip_aug: must be true or false, got 'yes'"):
        read_kohya_dataset(f)
    text = f.read_text().replace("  flip_aug = 'yes'", "").replace("  is_reg = true", "  shuffle_caption = true")
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"subset #2: shuffle_caption: True here but False in \[\[datasets\]\] #1 "
                                          r"subset #1"):
        read_kohya_dataset(f)  # one subset shuffles, the other (kohya's default) does not


def test_a_saved_config_naming_a_dataset_config_loads_without_its_file(tmp_path):
    """A job's or a run's saved options name the dataset config they were made from; they load again when
    that file has moved (the run itself reads it when it starts)."""
    f = _dataset_toml(tmp_path)
    cfg = TrainConfig.from_dict({"dataset_config": str(f)})
    f.unlink()
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.shuffle_tags and again.keep_tokens == 1 and again.dataset_config == str(f)


def test_a_queued_run_refuses_image_dirs_found_only_from_the_submitting_folder(tmp_path, monkeypatch):
    from training.jobs import pinned

    img, _ = _kohya_dirs(tmp_path)
    conf = tmp_path / "conf"
    conf.mkdir()
    f = conf / "d.toml"
    f.write_text("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'img/3_sks red'\n  class_tokens = 'sks'\n")
    monkeypatch.chdir(tmp_path)  # found from here only, not beside the file: a worker elsewhere would miss it
    cfg = TrainConfig.from_dict({"dataset_config": str(f)})
    with pytest.raises(ConfigError, match="write it as an absolute path or relative to the .toml"):
        pinned(cfg)
    f.write_text(f.read_text().replace("img/3_sks red", "../img/3_sks red"))  # beside the file: pinned as it is
    assert pinned(cfg).dataset_config == str(f)
