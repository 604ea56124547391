"""A kohya_ss GUI config (.json) trains here as it reads there: CLI --config, and Load settings in the app."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.errors import ConfigError
from training.config import TrainConfig
from training.kohya_gui import LOCON_TARGETS, STANDARD_TARGETS, read_kohya_gui

# the shape of kohya_ss' own presets (presets/lora/*.json): numbers often written as strings, empty = unset
PRODIGY = {
    "LoRA_type": "Standard", "adaptive_noise_scale": 0, "cache_latents": True, "caption_dropout_rate": 0,
    "caption_extension": ".txt", "clip_skip": "1", "conv_alpha": 32, "conv_dim": 32, "enable_bucket": True,
    "epoch": 4, "flip_aug": False, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
    "keep_tokens": "0", "learning_rate": 1.0, "lr_scheduler": "constant", "lr_warmup": 0,
    "max_resolution": "1024,1024", "max_train_steps": "", "min_snr_gamma": 5, "mixed_precision": "bf16",
    "network_alpha": 16, "network_dim": 32, "noise_offset": 0, "optimizer": "Prodigy",
    "optimizer_args": "weight_decay=0.01 decouple=True d0=0.0001 use_bias_correction=True",
    "save_precision": "bf16", "scale_weight_norms": 5, "seed": "", "shuffle_caption": False,
    "text_encoder_lr": 1.0, "train_batch_size": 2, "unet_lr": 1.0, "xformers": "xformers",
    "multires_noise_iterations": 6, "sample_prompts": "a photo of ohwx woman --n blurry --w 512 --s 20\n\n",
}


def _kohya_folder(tmp_path, star_images):
    img = tmp_path / "img" / "10_ohwx woman"
    img.mkdir(parents=True)
    for p in sorted(star_images.glob("*.png"))[:3]:
        shutil.copy(p, img / p.name)
    return tmp_path / "img"


def _write(tmp_path, data, name="mine.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=4))
    return path


def test_a_kohya_ss_prodigy_preset_reads_as_our_options(tmp_path, star_images):
    img = _kohya_folder(tmp_path, star_images)
    path = _write(tmp_path, {**PRODIGY, "train_data_dir": str(img), "output_name": "queen"})
    cfg = TrainConfig.from_toml(path)
    assert (cfg.optimizer, cfg.lr_unet, cfg.lr_text, cfg.train_text_encoder) == ("prodigy", 1.0, 1.0, True)
    assert cfg.optimizer_args == ["weight_decay=0.01 decouple=True d0=0.0001 use_bias_correction=True"]
    assert (cfg.rank, cfg.alpha, cfg.conv_rank, cfg.unet_targets) == (32, 16.0, None, STANDARD_TARGETS)
    assert (cfg.batch_size, cfg.resolution, cfg.mixed_precision, cfg.save_precision) == (2, 1024, "bf16", "bf16")
    assert (cfg.lr_scheduler, cfg.warmup_steps, cfg.min_snr_gamma, cfg.gradient_checkpointing) == \
        ("constant", 0, 5.0, True)
    assert cfg.sample_prompts == ["a photo of ohwx woman --n blurry --w 512 --s 20"] and cfg.name == "queen"
    # epochs counted as kohya_ss counts them: 3 images x 10 repeats / batch 2 x 4 epochs; the trigger from the folder
    assert cfg.max_steps == 60 and cfg.trigger == "ohwx"
    notes = read_kohya_gui(path).notes
    assert any("4 epoch(s) of the images in train_data_dir are 60 steps" in n for n in notes)
    assert cfg.scale_weight_norms == 5.0
    # kohya_ss passes the multires options only when its noise type says Multires; this preset's is Original
    assert cfg.multires_noise_iterations == 0
    assert any(n.startswith("multires_noise_iterations 6 is not applied") for n in notes)
    assert not any(n.startswith("not applied") for n in notes)  # xformers, cache_latents: only about speed there


def test_kohya_ss_noise_and_loss_options_are_applied(tmp_path):
    base = {"LoRA_type": "Standard", "learning_rate": 1e-4, "max_train_steps": "100", "noise_offset": 0.05,
            "noise_offset_type": "Multires", "multires_noise_iterations": "8", "multires_noise_discount": 0.2,
            "ip_noise_gamma": 0.1, "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2,
            "huber_scale": 2, "debiased_estimation_loss": True, "scale_weight_norms": 1}
    path = _write(tmp_path, base)
    cfg = TrainConfig.from_toml(path)
    # Multires: the offset is not passed (kohya_ss' GUI passes one or the other)
    assert (cfg.noise_offset, cfg.multires_noise_iterations, cfg.multires_noise_discount) == (0.0, 8, 0.2)
    assert (cfg.ip_noise_gamma, cfg.loss_type, cfg.huber_schedule, cfg.huber_c) == (0.1, "huber", "exponential", 0.2)
    assert cfg.debiased_estimation and cfg.scale_weight_norms == 1.0
    notes = read_kohya_gui(path).notes
    assert any(n.startswith("huber_scale 2 is not applied") for n in notes)
    assert not any(n.startswith("not applied") for n in notes)
    # a max norm on LoHa (kohya_ss keeps the field in every config) is left out with a note, not refused
    cfg = read_kohya_gui(_write(tmp_path, {**base, "LoRA_type": "LyCORIS/LoHa"}))
    assert "scale_weight_norms" not in cfg.options
    assert any(n.startswith("scale_weight_norms 1 is not applied") for n in cfg.notes)
    with pytest.raises(ConfigError, match="loss_type"):
        TrainConfig.from_toml(_write(tmp_path, {**base, "loss_type": "l3"}))


def test_kohya_ss_rate_rules_warmup_percent_and_locon(tmp_path):
    base = {"LoRA_type": "Kohya LoCon", "network_dim": 16, "network_alpha": 8, "conv_dim": 4, "conv_alpha": 1,
            "learning_rate": 1e-4, "unet_lr": 0, "text_encoder_lr": 0, "optimizer": "AdamW8bit",
            "lr_scheduler": "constant", "lr_warmup": 10, "max_train_steps": "500"}
    cfg = TrainConfig.from_toml(_write(tmp_path, base))
    # unet_lr 0 falls back to learning_rate; both 0 (no text-encoder rate of its own): the TE at learning_rate
    assert (cfg.lr_unet, cfg.train_text_encoder, cfg.lr_text) == (1e-4, True, 1e-4)
    assert (cfg.optimizer, cfg.unet_targets, cfg.conv_rank, cfg.conv_alpha) == ("adamw8bit", LOCON_TARGETS, 4, 1.0)
    # 10% of 500 steps of warm-up; kohya's constant schedule then warms up, as ours does with warm-up
    assert (cfg.max_steps, cfg.warmup_steps, cfg.lr_scheduler) == (500, 50, "constant_with_warmup")
    cfg = TrainConfig.from_toml(_write(tmp_path, {**base, "unet_lr": 2e-4, "lr_warmup_steps": 7}))
    assert (cfg.lr_unet, cfg.train_text_encoder, cfg.lr_text, cfg.warmup_steps) == (2e-4, False, 0.0, 7)
    cfg = TrainConfig.from_toml(_write(tmp_path, {**base, "text_encoder_lr": 5e-5, "network_train_unet_only": True}))
    assert cfg.train_text_encoder is False
    # kohya's Adafactor: relative_step on unless said, with its own schedule ("adafactor"): ours runs it so
    path = _write(tmp_path, {**base, "optimizer": "Adafactor", "lr_scheduler": "adafactor", "lr_warmup": 0})
    cfg = TrainConfig.from_toml(path)
    assert (cfg.optimizer, cfg.optimizer_args, cfg.lr_scheduler) == \
        ("adafactor", ["relative_step=True scale_parameter=True"], "constant")
    assert any("relative_step=True, it picks its own step size" in n for n in read_kohya_gui(path).notes)
    args = "scale_parameter=False relative_step=False warmup_init=False"
    assert TrainConfig.from_toml(_write(tmp_path, {**base, "optimizer": "Adafactor", "optimizer_args": args})
                                 ).optimizer_args == [args]
    # kohya_ss' shell-quoted arguments
    cfg = TrainConfig.from_toml(_write(tmp_path, {**base, "optimizer": "Prodigy", "learning_rate": 1.0,
                                                  "optimizer_args": '"d0=1e-5" "d_coef=1.0" "weight_decay=0.4"'}))
    from training.optimizers import parse_args

    assert parse_args(cfg.optimizer_args) == {"d0": 1e-5, "d_coef": 1.0, "weight_decay": 0.4}
    # the command line wins over the file
    assert TrainConfig.from_toml(_write(tmp_path, base), {"max_steps": 9}).max_steps == 9


def test_lycoris_loha_and_lokr_recipes_train_as_those_networks(tmp_path):
    # kohya_ss' own LyCORIS presets (loha-sd15.json, sd15 - LoKr v1.1.json) as they are written
    loha = {**PRODIGY, "LoRA_type": "LyCORIS/LoHa", "LyCORIS_preset": "full", "network_dim": 32, "network_alpha": 16,
            "conv_dim": 8, "conv_alpha": 4, "use_cp": True, "network_dropout": 0.1, "factor": -1}
    path = _write(tmp_path, loha, "loha.json")
    cfg = TrainConfig.from_toml(path)
    assert (cfg.network, cfg.rank, cfg.alpha, cfg.conv_rank, cfg.conv_alpha) == ("loha", 32, 16.0, 8, 4.0)
    assert cfg.unet_targets == LOCON_TARGETS and cfg.dropout == 0.0
    notes = " ".join(read_kohya_gui(path).notes)
    assert "use_cp is not applied" in notes and "network_dropout 0.1 is not applied" in notes
    assert TrainConfig.from_toml(_write(tmp_path, {**loha, "LyCORIS_preset": "attn-only"})).unet_targets == \
        STANDARD_TARGETS[:4]
    lokr = {**loha, "LoRA_type": "LyCORIS/LoKr", "network_dim": 100000, "conv_dim": 100000, "network_alpha": 1,
            "factor": 8, "use_cp": False, "network_dropout": 0}
    path = _write(tmp_path, lokr, "lokr.json")
    cfg = TrainConfig.from_toml(path)
    assert (cfg.network, cfg.lokr_factor, cfg.rank, cfg.conv_rank) == ("lokr", 8, 1024, 1024)
    assert "network_dim 100000 (LyCORIS' full LoKr factors) is read as 1024" in " ".join(read_kohya_gui(path).notes)


def test_what_cannot_be_trained_here_names_the_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"ia3\.json: LoRA_type: 'LyCORIS/iA3' is not trained by LoRA Studio"):
        TrainConfig.from_toml(_write(tmp_path, {**PRODIGY, "LoRA_type": "LyCORIS/iA3"}, "ia3.json"))
    with pytest.raises(ConfigError, match=r"d\.json: optimizer: 'DAdaptAdam' is not one LoRA Studio has.*"
                                          r"Prodigy is D-Adaptation's successor"):
        TrainConfig.from_toml(_write(tmp_path, {**PRODIGY, "optimizer": "DAdaptAdam"}, "d.json"))
    with pytest.raises(ConfigError, match=r"n\.json: network_dim: must be a whole number, got '8.5'"):
        TrainConfig.from_toml(_write(tmp_path, {**PRODIGY, "network_dim": "8.5"}, "n.json"))
    with pytest.raises(ConfigError, match=r"o\.json: optimizer_args: Prodigy has no argument 'dcoef'"):
        TrainConfig.from_toml(_write(tmp_path, {**PRODIGY, "optimizer_args": "dcoef=2"}, "o.json"))
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="x.json: not a kohya_ss LoRA config"):
        TrainConfig.from_toml(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ConfigError, match="y.json: not a kohya_ss config"):
        TrainConfig.from_toml(tmp_path / "y.json")
    # epochs with no folder to count: said, and the steps left to the user
    notes = read_kohya_gui(_write(tmp_path, {**PRODIGY, "train_data_dir": str(tmp_path / "gone")})).notes
    assert any("could not be counted" in n and "give --steps" in n for n in notes)


def test_the_cli_trains_from_a_kohya_ss_config(tmp_path, star_images, tiny_sd1_dir, capsys):
    from app.cli import main

    img = _kohya_folder(tmp_path, star_images)
    path = _write(tmp_path, {**PRODIGY, "train_data_dir": str(img), "output_name": "from-kohya",
                             "pretrained_model_name_or_path": str(tiny_sd1_dir), "max_resolution": "32,32",
                             "network_dim": 4, "network_alpha": 4, "mixed_precision": "no", "save_precision": "fp16",
                             "gradient_checkpointing": False})
    lib = tmp_path / "lib"
    assert main(["train", "--config", str(path), "--steps", "2", "--library", str(lib), "--device", "cpu",
                 "--no-weight-check", "--sample-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "read as a kohya_ss config: rank 4, prodigy, lr 1, 2 steps, batch 2" in out
    assert "note: multires_noise_iterations 6 is not applied" in out and "trigger word: ohwx" in out
    assert "max norm 5: " in out  # its scale_weight_norms 5 is applied, and the run says how it acted
    from pipelines.weights_io import load_safetensors

    _, meta = load_safetensors(lib / "from-kohya.safetensors")
    assert (meta["ss_scale_weight_norms"], meta["ss_multires_noise_iterations"], meta["ss_loss_type"]) == (
        "5", "None", "l2")
    assert meta["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(weight_decay=0.01,decouple=True")
    assert meta["lora_studio.trigger"] == "ohwx"


def test_load_settings_in_the_app_takes_a_kohya_ss_config(tmp_path, star_images, tiny_sd1_dir):
    from app.studio import Studio
    from app.ui import SETTINGS_FIELDS, StudioUI
    from training.jobs import JobQueue

    ui = StudioUI(Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), device="cpu", queue=JobQueue(worker=False)))
    ui.build()
    img = _kohya_folder(tmp_path, star_images)
    path = _write(tmp_path, {**PRODIGY, "train_data_dir": str(img), "output_name": "queen",
                             "pretrained_model_name_or_path": "C:/models/sdxl.safetensors"})
    *values, msg = ui.load_settings_file(str(path), ui.base_names()[0])
    got = {k: v["value"] if isinstance(v, dict) else v for k, v in zip(SETTINGS_FIELDS, values)}
    assert (got["name"], got["optimizer"], got["lr_unet"], got["rank"], got["max_steps"]) == \
        ("queen", "prodigy", 1.0, 32, 60)
    assert "weight_decay=0.01" in got["optimizer_args"] and got["preset"] == "custom"
    assert "Loaded the settings of <b>mine</b>" in msg and "multires_noise_iterations 6 is not applied" in msg
    assert "4 epoch(s) of the images in train_data_dir are 60 steps" in msg
    assert got["scale_weight_norms"] == 5.0 and "&#x27;C:/models/sdxl.safetensors&#x27; is not here" in msg
    # the trigger word comes from kohya's folder names, as on the command line; the images are dropped in the app
    assert got["trigger"] == "ohwx" and "trigger word &#x27;ohwx&#x27; from its folder names" in msg
    assert "are not loaded here: drop them, or a .zip of the folder, above" in msg
