"""Training DoRA (`--dora`): the file holds per-input `dora_scale` lengths that AUTOMATIC1111, ComfyUI and this app
apply, and applied so it computes exactly what the trained model computed, at weight 1 and at other weights."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import assert_resumes_exactly
from pipelines.adapters import _strip_text_model
from pipelines.errors import ConfigError, IncompatibleAdapterError, TrainingError
from pipelines.stack import AdapterStack, StackEntry
from pipelines.weights_io import load_safetensors
from test_dora import _dora_weight
from training.config import TrainConfig
from training.kohya_gui import read_kohya_gui
from training.trainer import Trainer, train

WIDE = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def _cfg(images, base, tmp_path, **kw):
    base_kw = dict(images=str(images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=3, batch_size=2,
                   checkpoint_every=0, device="cpu", sample_steps=2, name="t", rank=4, seed=3, weight_check=False,
                   warmup_steps=0, unet_targets=WIDE, train_text_encoder=True, dora=True, lr_unet=3e-3,
                   lr_text=3e-3)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _inputs(layer, g):
    base = layer.get_base_layer()
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(1, base.in_channels, 6, 6, generator=g)
    return torch.randn(3, base.in_features, generator=g)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_dora_file_computes_what_was_trained(star_images, tiny_sd1_dir, tiny_sdxl_dir, tmp_path, family):
    from training.lora import DORA_PARAM, dora_layers

    base_dir = tiny_sd1_dir if family == "sd1" else tiny_sdxl_dir
    tr = Trainer(_cfg(star_images, base_dir, tmp_path))
    res = tr.run()
    sd, meta = load_safetensors(res.adapter_path)
    mags = {k: v for k, v in sd.items() if k.endswith(".dora_scale")}
    assert meta["ss_network_module"] == "lycoris.kohya" and '"dora_wd": "True"' in meta["ss_network_args"]
    assert '"wd_on_output": "False"' in meta["ss_network_args"]
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in sd)  # kohya's layout, as A1111 / ComfyUI map it
    assert {k.rsplit(".", 1)[0] for k in mags} == {k.split(".")[0] for k in sd if k.endswith(".lora_down.weight")}
    assert all(v.shape[0] == 1 and v.ndim in (2, 4) for v in mags.values())  # (1, in[, 1, 1]): per input channel
    card = res.adapter_path.with_suffix(".md").read_text()
    assert "DoRA adapter trained" in card and "- DoRA rank 4, alpha 4" in card and "dora_scale" in card
    # the trained model's layers, at weight 1 and at 0.5 (peft's scale, as the end-of-training check varies it)
    layers = {comp: dict(dora_layers(getattr(tr.base.pipe, comp))) for comp in tr.components}
    moved = sum(bool((getattr(l, DORA_PARAM).reshape(-1) - l.get_base_layer().weight.detach().float()
                      .transpose(0, 1).reshape(l.get_base_layer().weight.shape[1], -1).norm(dim=1)).abs().max()
                     > 1e-6) for comp in layers for l in layers[comp].values())
    assert moved > 0  # the lengths trained
    g = torch.Generator().manual_seed(0)
    cases = [(f"{comp}.{name}", layer, _inputs(layer, g)) for comp in layers for name, layer in layers[comp].items()]
    expected = {}
    with torch.no_grad():
        for weight in (1.0, 0.5):
            for key, layer, x in cases:
                layer.scale_layer(weight)
                expected[key, weight] = layer(x)
                layer.unscale_layer(weight)
        # ... and against the formula A1111 applies, for one layer
        key, layer, x = next(c for c in cases if isinstance(c[1].get_base_layer(), torch.nn.Linear))
        w = layer.get_base_layer().weight.detach().float()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = b @ a * layer._dora_unit
        want = _dora_weight(w, delta, getattr(layer, DORA_PARAM).detach(), "in")
        blend = w + 0.5 * (want - w)
        torch.testing.assert_close(expected[key, 0.5], torch.nn.functional.linear(x, blend, layer.get_base_layer().bias),
                                   rtol=1e-4, atol=1e-5)
    # the file, loaded into a fresh base by the app's stack: the same outputs
    from pipelines.base_models import load_base

    fresh = load_base(str(base_dir), device="cpu")
    stack = AdapterStack(fresh)
    info = stack.load("t", res.adapter_path)
    assert info.network.startswith("DoRA dim 4") and stack.is_dora("t")
    for weight in (1.0, 0.5):
        stack.set_stack([StackEntry("t", weight, weight)])
        for key, _, x in cases:
            comp = key.split(".")[0]
            mod = next(m for n, m in getattr(fresh.pipe, comp).named_modules()
                       if _strip_text_model(f"{comp}.{n}") == _strip_text_model(key))
            with torch.no_grad():
                got = mod(x)
            torch.testing.assert_close(got, expected[key, weight], rtol=1e-4, atol=1e-5, msg=f"{key} at {weight}")


def test_a_dora_run_resumes_exactly_and_continues_from_its_file(star_images, tiny_sd1_dir, tmp_path):
    def cfg(sub, **kw):
        return _cfg(star_images, tiny_sd1_dir, tmp_path / sub, **{"max_steps": 6, "checkpoint_every": 1, **kw})

    a = assert_resumes_exactly(cfg)
    assert any(k.endswith(".dora_scale") for k in a)
    full_path = tmp_path / "a" / "lib" / "t.safetensors"
    with pytest.raises(TrainingError, match="dora: checkpoint True vs now False"):
        train(cfg("b", dora=False, max_steps=8, resume="latest", overwrite=True))
    more = train(cfg("c", init_adapter=str(full_path), max_steps=1, checkpoint_every=0, lr_unet=1e-12, lr_text=1e-12))
    c, _ = load_safetensors(more.adapter_path)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(IncompatibleAdapterError, match="it is a DoRA adapter; continue it with dora on"):
        train(cfg("d", dora=False, init_adapter=str(full_path), checkpoint_every=0))
    plain = train(cfg("e", dora=False, max_steps=1, checkpoint_every=0))
    with pytest.raises(IncompatibleAdapterError, match="plain LoRA adapter; continue it with dora off"):
        train(cfg("f", init_adapter=str(plain.adapter_path), checkpoint_every=0))


def test_dora_options_are_checked(star_images, tiny_sd1_dir, tmp_path):
    with pytest.raises(ConfigError, match="dora: DoRA is trained with network 'lora' here, not loha"):
        _cfg(star_images, tiny_sd1_dir, tmp_path, network="loha")
    with pytest.raises(ConfigError, match="dora: DoRA needs the base weights unquantized"):
        _cfg(star_images, tiny_sd1_dir, tmp_path, quantize_base="nf4")
    # kohya_ss' LyCORIS/LoCon with dora_wd trains DoRA here; with LoHa it is named as not applied
    import json

    locon = tmp_path / "locon.json"
    locon.write_text(json.dumps({"LoRA_type": "LyCORIS/LoCon", "dora_wd": True, "train_data_dir": str(star_images)}))
    read = read_kohya_gui(locon)
    assert read.options["dora"] is True and read.options["network"] == "lora"
    loha = tmp_path / "loha.json"
    loha.write_text(json.dumps({"LoRA_type": "LyCORIS/LoHa", "dora_wd": True, "train_data_dir": str(star_images)}))
    read = read_kohya_gui(loha)
    assert "dora" not in read.options and any("dora_wd" in n and "not applied" in n for n in read.notes)
