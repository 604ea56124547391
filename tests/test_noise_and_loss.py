"""kohya's noise and loss options: multires noise, input perturbation, L1 / pseudo-Huber loss, debiased
estimation, max-norm regularisation (scale_weight_norms)."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import (diffusion_loss, draw_noise, elementwise_loss, huber_parameter, noisy_input,
                              train)

from lora_helpers import assert_resumes_exactly


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def test_without_the_options_the_noise_is_drawn_as_before():
    """Default runs draw exactly what they drew before these options existed (adapters stay bit-identical)."""
    cfg = TrainConfig(images=".", noise_offset=0.05)
    noise, t = draw_noise((2, 4, 8, 8), torch.Generator().manual_seed(5), cfg, 1000)
    g = torch.Generator().manual_seed(5)
    want = torch.randn((2, 4, 8, 8), generator=g)
    want = want + 0.05 * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.equal(noise, want) and torch.equal(t, torch.randint(0, 1000, (2,), generator=g))


def _neighbour_correlation(x: torch.Tensor) -> float:
    a, b = x[..., :, 1:].flatten(), x[..., :, :-1].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_multires_noise_is_unit_noise_with_coarse_levels_and_comes_from_the_seed():
    cfg = TrainConfig(images=".", multires_noise_iterations=6, multires_noise_discount=0.3)
    shape = (8, 4, 64, 64)
    noise, _ = draw_noise(shape, torch.Generator().manual_seed(1), cfg, 1000)
    plain, _ = draw_noise(shape, torch.Generator().manual_seed(1), TrainConfig(images="."), 1000)
    assert abs(float(noise.std()) - 1) < 1e-4
    # coarse levels make neighbouring pixels move together (mildly at kohya's 0.3); plain noise has none of that
    assert _neighbour_correlation(noise) > 0.015 and abs(_neighbour_correlation(plain)) < 0.005
    again, _ = draw_noise(shape, torch.Generator().manual_seed(1), cfg, 1000)
    assert torch.equal(noise, again)
    stronger, _ = draw_noise(shape, torch.Generator().manual_seed(1), cfg.replace(multires_noise_discount=0.8), 1000)
    assert _neighbour_correlation(stronger) > 0.2


def test_input_perturbation_noises_the_input_and_leaves_the_target(sched):
    cfg = TrainConfig(images=".", ip_noise_gamma=0.1)
    drawn = draw_noise((8, 4, 16, 16), torch.Generator().manual_seed(2), cfg, 1000)
    assert len(drawn) == 3 and abs(float(drawn[2].std()) - 0.1) < 0.01
    latents = torch.randn(8, 4, 16, 16)
    want = sched.add_noise(latents, drawn[0] + drawn[2], drawn[1])
    assert torch.equal(noisy_input(sched, latents, drawn), want)
    assert torch.equal(noisy_input(sched, latents, drawn[:2]), sched.add_noise(latents, drawn[0], drawn[1]))


def test_loss_types(sched):
    pred = torch.tensor([0.0, 0.01, 3.0]).view(3, 1, 1, 1)
    target = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([500, 500, 500])
    cfg = TrainConfig(images=".")
    assert torch.equal(elementwise_loss(pred, target, t, sched, cfg), pred ** 2)
    assert torch.equal(elementwise_loss(pred, target, t, sched, cfg.replace(loss_type="l1")), pred.abs())
    huber = cfg.replace(loss_type="huber", huber_schedule="constant", huber_c=0.1)
    h = elementwise_loss(pred, target, t, sched, huber).flatten()
    assert h[0] == 0 and h[1] == pytest.approx(0.01 ** 2, rel=0.01)  # quadratic for small errors
    assert h[2] == pytest.approx(2 * 0.1 * 3.0 - 2 * 0.1 ** 2, rel=1e-3)  # linear (2c|d|) for large ones
    smooth = elementwise_loss(pred, target, t, sched, huber.replace(loss_type="smooth_l1")).flatten()
    assert torch.allclose(smooth, h / 0.1)


def test_huber_schedules(sched):
    t = torch.tensor([0, 250, 500, 750, 999])
    cfg = TrainConfig(images=".", loss_type="huber", huber_c=0.1)
    assert torch.equal(huber_parameter(t, sched, cfg.replace(huber_schedule="constant")), torch.full((5,), 0.1))
    exp = huber_parameter(t, sched, cfg.replace(huber_schedule="exponential"))
    assert exp[0] == 1 and exp[-1] == pytest.approx(0.1 ** (999 / 1000), rel=1e-5)
    assert exp[2] == pytest.approx(math.sqrt(0.1), rel=1e-3)  # geometric half-way
    snr = huber_parameter(t, sched, cfg)
    assert all(snr[i] > snr[i + 1] for i in range(4)) and snr[0] > 0.9 and snr[-1] == pytest.approx(0.1, abs=0.01)


def test_debiased_estimation_weights_each_image_by_one_over_root_snr(sched, tiny_sd1_dir):
    from pipelines.base_models import load_base

    base = load_base(tiny_sd1_dir, device="cpu")
    latents = torch.randn(3, 4, 8, 8)
    pred = torch.randn(3, 4, 8, 8)
    fake_unet = lambda x, t, c, **kw: type("Out", (), {"sample": pred})()  # noqa: E731
    noise_t = (torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 900]))
    cfg = TrainConfig(images=".", min_snr_gamma=None)
    args = (base, sched, latents, torch.zeros(3, 77, 32), None, None, None)
    plain = diffusion_loss(*args, cfg, torch.float32, noise_t, unet=fake_unet)
    debiased = diffusion_loss(*args, cfg.replace(debiased_estimation=True), torch.float32, noise_t, unet=fake_unet)
    ac = sched.alphas_cumprod[noise_t[1]]
    assert torch.allclose(debiased, plain / torch.sqrt(ac / (1 - ac)), rtol=1e-5)


def test_max_norm_caps_each_layers_update_and_keeps_its_direction():
    from peft import LoraConfig, inject_adapter_in_model

    from training.lora import cap_update_norms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Conv2d(12, 8, 3), torch.nn.Linear(8, 8))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["0", "1", "2"]), model)
    layers = [model[0], model[1], model[2]]

    def delta(layer):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return ((b.flatten(1) @ a.flatten(1)) * layer.scaling["default"]).detach()

    with torch.no_grad():
        for layer, size in zip(layers, (3.0, 2.0, 0.01)):  # two layers past the cap, one well under it
            layer.lora_B["default"].weight.normal_(0, size)
    before = [delta(layer).clone() for layer in layers]
    scaled, mean, top = cap_update_norms([model], 1.0)
    after = [delta(layer) for layer in layers]
    assert scaled == 2 and top == pytest.approx(1.0)
    for b, a in zip(before[:2], after[:2]):
        assert float(a.norm()) == pytest.approx(1.0, rel=1e-4)
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) == pytest.approx(1.0)
    assert torch.equal(after[2], before[2])  # under the cap: untouched
    assert mean == pytest.approx((2 + float(before[2].norm())) / 3, rel=1e-4)


def test_max_norm_is_refused_where_it_has_no_meaning():
    for kw, what in ((dict(network="loha"), "network loha"), (dict(dora=True), "DoRA")):
        with pytest.raises(ConfigError, match=f"scale_weight_norms: .*{what}"):
            TrainConfig(images=".", scale_weight_norms=1.0, **kw)
    with pytest.raises(ConfigError, match="scale_weight_norms: with textual inversion"):
        TrainConfig(images=".", name="word", textual_inversion=True, scale_weight_norms=1.0)


def _cfg(star_images, base, tmp_path, sub="a", **kw):
    args = dict(images=str(star_images), base=str(base), output_dir=str(tmp_path / sub / "lib"), max_steps=4,
                batch_size=2, checkpoint_every=1, device="cpu", sample_steps=2, name="t", rank=4, seed=3,
                weight_check=False, multires_noise_iterations=4, ip_noise_gamma=0.1, loss_type="huber",
                debiased_estimation=True, scale_weight_norms=0.05, train_text_encoder=True)
    args.update(kw)
    return TrainConfig(**args)


def test_a_run_with_every_option_trains_resumes_exactly_and_records_them(star_images, tiny_sd1_dir, tmp_path):
    messages = []
    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, "solo"), on_progress=lambda p: messages.append(p.message))
    sd, meta = load_safetensors(res.adapter_path)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert (meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"], meta["ss_loss_type"],
            meta["ss_huber_schedule"], meta["ss_huber_c"], meta["ss_debiased_estimation"],
            meta["ss_scale_weight_norms"]) == ("4", "0.1", "huber", "snr", "0.1", "True", "0.05")
    said = [m for m in messages if m and m.startswith("max norm 0.05: ")]
    assert said and "time(s) over steps 1-4" in said[0] and "a layer's update was scaled down " in said[0]
    # every saved layer's update is within the cap (the file's alpha/rank scale included)
    for key in [k for k in sd if k.endswith("lora_down.weight")]:
        down, up = sd[key].float(), sd[key.replace("lora_down", "lora_up")].float()
        alpha = float(sd[key.replace("lora_down.weight", "alpha")])
        assert float((up.flatten(1) @ down.flatten(1)).norm()) * alpha / down.shape[0] <= 0.05 * (1 + 1e-3), key
    assert_resumes_exactly(lambda sub, **kw: _cfg(star_images, tiny_sd1_dir, tmp_path, sub, **kw))
