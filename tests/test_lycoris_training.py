"""Training LyCORIS' LoHa and LoKr: files in LyCORIS' kohya-named layout that hold exactly what was trained."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import assert_resumes_exactly
from pipelines.errors import ConfigError, IncompatibleAdapterError, TrainingError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import Trainer, train

WIDE = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def _cfg(images, base, tmp_path, **kw):
    base_kw = dict(images=str(images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=3, batch_size=2,
                   checkpoint_every=0, device="cpu", sample_steps=2, name="t", rank=4, seed=3, weight_check=False,
                   warmup_steps=0, unet_targets=WIDE, train_text_encoder=True)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _deltas_of_layers(pipe, components):
    """{our module name: ΔW} of every attached layer, as peft applies it (scale included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pipelines.adapters import _canon_module

    out = {}
    for comp in components:
        for name, m in getattr(pipe, comp).named_modules():
            if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight"):
                out[_canon_module(f"{comp}.{name}")] = m.get_delta_weight("default").detach().float()
    return out


def _deltas_of_file(path, base):
    """{kohya module: ΔW} as AUTOMATIC1111 / ComfyUI / this app read the file (LyCORIS -> exact LoRA pairs)."""
    from pipelines.adapters import as_lora

    sd, meta = load_safetensors(path)
    lora, conv = as_lora(sd, base, where=path)
    out = {}
    for key in lora:
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            down, up = lora[key].float(), lora[f"{module}.lora_up.weight"].float()
            scale = float(lora[f"{module}.alpha"]) / down.shape[0]
            out[module] = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale
    return out, conv, meta


@pytest.mark.parametrize("family, network", [("sd1", "loha"), ("sd1", "lokr"), ("sdxl", "loha"), ("sdxl", "lokr")])
def test_the_file_holds_exactly_what_was_trained(star_images, tiny_sd1_dir, tiny_sdxl_dir, tmp_path, family,
                                                 network):
    from pipelines.adapters import kohya_names
    from pipelines.single_file import unet_layout

    base_dir = tiny_sd1_dir if family == "sd1" else tiny_sdxl_dir
    tr = Trainer(_cfg(star_images, base_dir, tmp_path, network=network))
    res = tr.run()
    trained = _deltas_of_layers(tr.base.pipe, tr.components)
    in_file, conv, meta = _deltas_of_file(res.adapter_path, tr.base)
    assert conv.label == {"loha": "LoHa", "lokr": "LoKr"}[network] and not conv.flattened
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{network}"' in meta["ss_network_args"]
    card = res.adapter_path.with_suffix(".md").read_text()
    label = {"loha": "LoHa", "lokr": "LoKr"}[network]
    assert f"{label} adapter trained" in card and f"- {label} rank 4, alpha 4" in card
    assert f"which apply {label} natively" in card and "load_lora_weights" not in card
    from pipelines.library import AdapterLibrary

    assert AdapterLibrary(res.adapter_path.parent).info("t").rank_text.startswith(label)  # the Library's column
    names = kohya_names(trained, is_sdxl=family == "sdxl", layout=unet_layout(tr.base.pipe.unet))
    assert sorted(names.values()) == sorted(in_file)  # every trained layer, text encoders and convolutions too
    assert any(n.startswith("lora_unet_") and n.endswith("conv1" if family == "sd1" else "in_layers_2")
               for n in in_file)
    assert any(n.startswith("lora_te2_" if family == "sdxl" else "lora_te_") for n in in_file)
    moved = 0
    for module, delta in trained.items():
        got = in_file[names[module]]
        torch.testing.assert_close(got, delta.reshape(delta.shape[0], -1), rtol=1e-4, atol=1e-6)
        moved += bool(delta.abs().max() > 0) and module.startswith("unet.")
    # three steps moved every UNet layer (SDXL reads its text encoders' next-to-last layer: the last gets none)
    assert moved == sum(m.startswith("unet.") for m in trained)


def test_a_loha_run_resumes_exactly_and_continues_from_its_file(star_images, tiny_sd1_dir, tmp_path):
    def cfg(sub, **kw):
        return _cfg(star_images, tiny_sd1_dir, tmp_path / sub, **{"network": "loha", "max_steps": 6,
                                                                  "checkpoint_every": 1, **kw})

    a = assert_resumes_exactly(cfg)
    assert any(".hada_w1_a" in k for k in a)
    full_path = tmp_path / "a" / "lib" / "t.safetensors"
    with pytest.raises(TrainingError, match="network: checkpoint 'loha' vs now 'lokr'"):
        train(cfg("b", network="lokr", max_steps=8, resume="latest", overwrite=True))
    # train more from the finished file: it starts where the file is
    more = train(cfg("c", init_adapter=str(full_path), max_steps=1, checkpoint_every=0, lr_unet=1e-12,
                     lr_text=1e-12))
    c, _ = load_safetensors(more.adapter_path)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(IncompatibleAdapterError, match="a LoHa adapter cannot be trained further as lora; "
                                                       "continue it with network 'loha'"):
        train(cfg("d", network="lora", init_adapter=str(full_path)))
    with pytest.raises(IncompatibleAdapterError, match="a LoHa adapter cannot be trained further as lokr"):
        train(cfg("e", network="lokr", init_adapter=str(full_path)))


def test_lokr_layers_too_small_to_decompose_train_at_scale_one(tiny_sd1_dir):
    """Both factors full: LyCORIS' loaders apply such a layer at scale 1 whatever its alpha, so it trains so."""
    from peft.tuners.lokr.layer import LoKrLayer

    from pipelines.base_models import load_base
    from training.lora import attach, module_alphas

    pipe = load_base(str(tiny_sd1_dir), device="cpu").pipe
    attach(pipe, 4, 2.0, WIDE, None, network="lokr")
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoKrLayer)]
    full = [m for m in layers if "default" in m.lokr_w1 and "default" in m.lokr_w2]
    split = [m for m in layers if "default" in m.lokr_w2_a]
    assert full and split  # the tiny UNet has both kinds
    assert all(m.scaling["default"] == 1.0 and m.alpha["default"] == m.r["default"] for m in full)
    assert all(m.scaling["default"] == 0.5 for m in split)  # alpha 2 / rank 4, as LyCORIS' alpha / dim
    alphas = module_alphas(pipe, ["unet"])
    assert sorted(set(alphas.values())) == [2.0, 4.0]


def test_network_options_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="dropout: loha layers have no LoRA dropout"):
        TrainConfig(network="loha", dropout=0.1)
    with pytest.raises(ConfigError, match="quantize_base: lokr trains on an unquantized base only"):
        TrainConfig(network="lokr", quantize_base="int8")
    with pytest.raises(ConfigError, match="lokr_factor: must be -1"):
        TrainConfig(network="lokr", lokr_factor=0)
    with pytest.raises(ConfigError, match="network: must be one of lora, loha, lokr"):
        TrainConfig(network="ia3")


@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_the_size_bench_counts_what_training_builds(tiny_sd1_dir, network):
    """bench/adapter_size.py --network (the README's LoHa / LoKr sizes for SD 1.5 and SDXL) counts what peft
    builds in training, on a meta-device copy."""
    import importlib.util
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from pipelines.base_models import load_base
    from training.lora import PARAM_MARKERS, attach

    path = Path(__file__).resolve().parent.parent / "bench" / "adapter_size.py"
    spec = importlib.util.spec_from_file_location("adapter_size", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe = load_base(str(tiny_sd1_dir), device="cpu").pipe
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel(**pipe.unet.config)
    counted = bench.injected_params(meta_unet, WIDE, 4, network, conv_rank=2)
    attach(pipe, 4, 4.0, WIDE, None, conv_rank=2, network=network)
    built = sum(p.numel() for n, p in pipe.unet.named_parameters() if any(m in n for m in PARAM_MARKERS))
    assert counted == built > 0


def test_continuing_a_lokr_file_checks_the_alphas_that_mean_something(star_images, tiny_sd1_dir, tmp_path):
    """A full-factor LoKr layer's alpha is unused by every loader (LyCORIS writes 1 there, this app its rank):
    any value continues. A decomposed layer's alpha scales it: another one is refused, naming the module."""
    from pipelines.adapters import lycoris_dim
    from pipelines.weights_io import save_safetensors

    first = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "a", network="lokr", max_steps=1,
                       train_text_encoder=False))
    sd, meta = load_safetensors(first.adapter_path)
    modules = {k.rpartition(".")[0] for k in sd}
    full = [m for m in modules if lycoris_dim({k.rpartition(".")[2]: v for k, v in sd.items()
                                               if k.startswith(m + ".")}) is None]
    split = sorted(modules - set(full))
    assert full and split
    edited = dict(sd)
    for m in full:
        edited[f"{m}.alpha"] = torch.tensor(1.0)
    save_safetensors(edited, tmp_path / "full-alpha-1.safetensors", meta)
    more = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "b", network="lokr", max_steps=1,
                      train_text_encoder=False, init_adapter=str(tmp_path / "full-alpha-1.safetensors")))
    assert more.adapter_path.is_file()
    edited[f"{split[0]}.alpha"] = torch.tensor(1.0)
    save_safetensors(edited, tmp_path / "split-alpha-1.safetensors", meta)
    with pytest.raises(IncompatibleAdapterError, match="has alpha 1, this run uses 4"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path / "c", network="lokr", max_steps=1, train_text_encoder=False,
                   init_adapter=str(tmp_path / "split-alpha-1.safetensors")))
