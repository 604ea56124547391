"""Optimizers beyond AdamW (Prodigy, Adafactor, Lion) and kohya-style --optimizer_args."""

from __future__ import annotations

import json

import pytest
import torch

from lora_helpers import assert_resumes_exactly
from pipelines.errors import ConfigError, TrainingError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.optimizers import Lion, describe, parse_args
from training.trainer import train


def _cfg(star_images, base, tmp_path, **kw):
    base_kw = dict(images=str(star_images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=3,
                   batch_size=2, checkpoint_every=0, device="cpu", sample_steps=2, name="t", rank=4, seed=3,
                   weight_check=False, warmup_steps=0)
    base_kw.update(kw)
    return TrainConfig.from_dict(base_kw)


def test_kohya_style_arguments_parse_and_bad_ones_name_the_key():
    assert parse_args(["d_coef=2", "betas=0.9,0.99  use_bias_correction=True", " eps=1e-6 "]) == {
        "d_coef": 2, "betas": (0.9, 0.99), "use_bias_correction": True, "eps": 1e-6}
    assert parse_args(["safeguard_warmup=false decouple=True"]) == {"safeguard_warmup": False, "decouple": True}
    with pytest.raises(ConfigError, match="optimizer_args: 'd_coef' is not key=value"):
        parse_args(["d_coef"])
    with pytest.raises(ConfigError, match="d_coef is given twice"):
        parse_args(["d_coef=2", "d_coef=3"])
    # checked against the optimizer's own signature before anything loads
    with pytest.raises(ConfigError, match="Prodigy has no argument 'dcoef'; it takes .*d_coef"):
        TrainConfig(optimizer="prodigy", lr_unet=1.0, optimizer_args=["dcoef=2"])
    with pytest.raises(ConfigError, match="betas=0.9 does not fit AdamW's betas"):
        TrainConfig(optimizer_args=["betas=0.9"])
    with pytest.raises(ConfigError, match="use_bias_correction='yes' does not fit"):
        TrainConfig(optimizer="prodigy", lr_unet=1.0, optimizer_args=["use_bias_correction=yes"])
    with pytest.raises(ConfigError, match="lr is set by lr_unet"):
        TrainConfig(optimizer_args=["lr=1"])


def test_weight_decay_in_the_arguments_wins_as_in_kohya():
    """kohya has no weight-decay option but --optimizer_args, so its configs carry it there."""
    from training.optimizers import build

    p = torch.nn.Parameter(torch.ones(3))
    opt = build("prodigy", [{"params": [p], "lr": 1.0}], 1.0, 0.01, ["weight_decay=0.1 decouple=True d0=0.0001"])
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["d0"] == 1e-4
    assert build("lion", [{"params": [p], "lr": 1e-4}], 1e-4, 0.01, []).param_groups[0]["weight_decay"] == 0.01


def test_prodigy_takes_a_multiplier_as_its_rate():
    # left out, the rates become Prodigy's 1.0, whatever a preset says; an AdamW-sized rate is refused
    cfg = TrainConfig.from_dict({"optimizer": "prodigy", "preset": "concept"})
    assert (cfg.lr_unet, cfg.lr_text, cfg.train_text_encoder) == (1.0, 1.0, True)
    assert TrainConfig.from_dict({"optimizer": "prodigy", "lr_unet": 0.5}).lr_text == 0.5
    with pytest.raises(ConfigError, match="lr_unet: Prodigy finds its own step size.*got 0.001"):
        TrainConfig.from_dict({"optimizer": "prodigy", "lr_unet": 1e-3})
    with pytest.raises(ConfigError, match="lr_text: Prodigy takes one learning rate"):
        TrainConfig.from_dict({"optimizer": "prodigy", "preset": "concept", "lr_text": 2e-4})
    assert TrainConfig.from_dict({"optimizer": "adamw", "preset": "concept"}).lr_unet == 1e-3  # others as before


def test_lion_steps_by_the_sign_of_its_interpolated_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    g1, g2 = torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, -1.0, 2.0])
    p.grad = g1.clone()
    opt.step()
    want = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.1 * g1)
    torch.testing.assert_close(p.detach(), want)
    m1 = 0.01 * g1
    p.grad = g2.clone()
    opt.step()
    want = want * (1 - 0.05) - 0.1 * torch.sign(0.9 * m1 + 0.1 * g2)
    torch.testing.assert_close(p.detach(), want)


@pytest.mark.parametrize("name, extra", [("prodigy", {"optimizer_args": ["d_coef=2"]}),
                                         ("adafactor", {"lr_unet": 1e-3}),
                                         ("adafactor", {"lr_unet": 1e-3, "optimizer_args": ["relative_step=True"]}),
                                         ("lion", {"lr_unet": 3e-4, "train_text_encoder": True, "lr_text": 1e-4})])
def test_each_optimizer_trains_and_the_file_says_which(star_images, tiny_sd1_dir, tmp_path, name, extra):
    from pipelines.adapters import adapter_facts
    from pipelines.library import AdapterLibrary

    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, optimizer=name, **extra))
    sd, meta = load_safetensors(res.adapter_path)
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().max() > 0 for v in ups)  # the optimizer moved the zero-initialised up weights
    assert meta["ss_optimizer"] == describe(name, extra.get("optimizer_args", []))
    card = (res.adapter_path.parent / "t.md").read_text()
    relative = "relative_step=True" in extra.get("optimizer_args", [])
    label = {"prodigy": "Prodigy (d_coef=2), lr 1, a multiplier", "lion": "Lion, lr 0.0003 (text encoder 0.0001)",
             "adafactor": "Adafactor (relative_step=True), lr 0.001" if relative else "Adafactor, lr 0.001"}[name]
    assert f"- {label}" in card
    facts = dict(adapter_facts(AdapterLibrary(res.adapter_path.parent).info("t")))
    assert {"prodigy": "Prodigy (d_coef=2)", "adafactor": "Adafactor", "lion": "Lion"}[name] in facts["training"]
    lrs = [float(line.split(",")[2]) for line in (res.run_dir / "log.csv").read_text().splitlines()[1:]]
    if name == "prodigy" or relative:  # the log shows the optimizer's own step, not the rate it was given
        assert all(0 < lr <= 0.01 for lr in lrs) and lrs != [extra.get("lr_unet")] * 3
    else:
        assert lrs == [extra["lr_unet"]] * 3


def test_a_prodigy_run_resumes_exactly_and_a_changed_optimizer_is_refused(star_images, tiny_sd1_dir, tmp_path):
    def cfg(sub, **kw):
        return _cfg(star_images, tiny_sd1_dir, tmp_path / sub, **{"optimizer": "prodigy", "max_steps": 6,
                                                                   "checkpoint_every": 1, **kw})

    assert_resumes_exactly(cfg)  # Prodigy's estimate d comes back with the state
    with pytest.raises(TrainingError, match="optimizer: checkpoint 'prodigy' vs now 'adamw'"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path / "b", max_steps=8, resume="latest", overwrite=True))
    with pytest.raises(TrainingError, match=r"optimizer_args: checkpoint \[\] vs now \['d_coef=2'\]"):
        train(cfg("b", max_steps=8, resume="latest", overwrite=True, optimizer_args=["d_coef=2"]))


def test_a_checkpoint_from_before_optimizer_choices_resumes(star_images, tiny_sd1_dir, tmp_path):
    """Checkpoints written before these options existed hold no optimizer key: they were AdamW runs."""
    part = train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=2, checkpoint_every=1),
                 on_progress=lambda p: None)
    ckpt = part.run_dir / "checkpoints" / "step-000001"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    saved = json.loads(state["config"])
    del saved["optimizer"], saved["optimizer_args"]
    state["config"] = json.dumps(saved)
    torch.save(state, ckpt / "state.pt")
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=3, resume=str(ckpt), overwrite=True))
    assert res.steps == 3


def test_optimizer_arguments_from_the_command_line_as_kohya_writes_them():
    from app.cli import parse_train_args

    cfg = parse_train_args(["--optimizer", "prodigy", "--optimizer-args", "d_coef=2", "use_bias_correction=True",
                            "--optimizer-arg", "safeguard_warmup=True"])
    assert cfg.optimizer_args == ["d_coef=2", "use_bias_correction=True", "safeguard_warmup=True"]
    assert cfg.lr_unet == 1.0
    with pytest.raises(ConfigError, match="Lion has no argument 'd_coef'"):
        parse_train_args(["--optimizer", "lion", "--optimizer-args", "d_coef=2"])


def test_kohya_optimizer_names_read_as_a_user_says_them():
    from pipelines.adapters import optimizer_label

    assert optimizer_label("bitsandbytes.optim.adamw.AdamW8bit") == "AdamW8bit"
    assert optimizer_label("prodigyopt.prodigy.Prodigy(decouple=True,use_bias_correction=True)") == \
        "Prodigy (decouple=True,use_bias_correction=True)"
    assert optimizer_label("") == optimizer_label("None") == ""
