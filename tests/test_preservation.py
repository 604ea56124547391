"""Base preservation: self-distillation towards the base model on prompts without the trigger."""

from __future__ import annotations

import torch

from pipelines.base_models import load_base
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import AdaptersOff, Trainer, encode_text, preservation_prompts, train


def _cfg(images, base, tmp_path, **kw):
    base_kw = dict(images=str(images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=4, batch_size=2,
                   checkpoint_every=0, device="cpu", sample_steps=2, name="p", rank=4, seed=3)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def test_preservation_prompts_take_the_trigger_out():
    cfg = TrainConfig(images="x", trigger="ohwx", class_prompt="a dog", preserve_prompts=["a cat"])
    got = preservation_prompts(cfg, ["a blue circle on a gray background in ohwx style", "a photo of ohwx",
                                     "a red square"])
    assert got[0] == ""  # the unconditional prompt comes first
    assert "a blue circle on a gray background" in got  # the whole phrase out
    assert "a blue circle on a gray background in style" in got  # the word out
    assert "a photo of dog" in got  # the class noun in its place
    assert {"a red square", "a dog", "a cat"} <= set(got)
    assert not any("ohwx" in p for p in got)
    assert len(got) == len(set(got))


def test_adapters_off_runs_the_base_model(star_images, tiny_sd1_dir, tmp_path):
    cfg = _cfg(star_images, tiny_sd1_dir, tmp_path, lr_unet=5e-2, lr_text=5e-2, train_text_encoder=True,
               preserve_weight=1.0, preserve_images=2)
    tr = Trainer(cfg)
    tr.build()
    for step in range(3):
        tr.train_step(step)
    pipe = tr.base.pipe
    fresh = load_base(str(tiny_sd1_dir), device="cpu").pipe
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 100])
    prompts = ["a red circle", "a sks"]
    with torch.no_grad():
        lora_cond, _ = encode_text(tr.base, prompts)
        lora_out = pipe.unet(x, t, lora_cond).sample
        with AdaptersOff([pipe.unet, pipe.text_encoder]):
            cond, _ = encode_text(tr.base, prompts)
            off = pipe.unet(x, t, cond).sample
        ids = fresh.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ref = fresh.unet(x, t, fresh.text_encoder(ids)[0]).sample
        again = pipe.unet(x, t, lora_cond).sample
    torch.testing.assert_close(off, ref, rtol=1e-5, atol=1e-5)
    assert (lora_out - ref).abs().max() > 1e-3  # the adapter did change the model
    torch.testing.assert_close(again, lora_out)  # and is back on afterwards, still trainable
    assert all(p.requires_grad for p in tr.params)


def _deviation(res, base_dir, prompt: str) -> float:
    """Mean relative change of the UNet's prediction that the trained adapter makes for `prompt`."""
    base = load_base(str(base_dir), device="cpu")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.linspace(50, 950, 8).long()
    with torch.no_grad():
        cond, _ = encode_text(base, [prompt] * 8)
        ref = base.pipe.unet(x, t, cond).sample
        base.pipe.load_lora_weights(str(res.adapter_path))
        cond, _ = encode_text(base, [prompt] * 8)
        out = base.pipe.unet(x, t, cond).sample
    return float(((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())


def test_base_preservation_keeps_trigger_free_prompts_near_the_base(star_images, tiny_sd1_dir, tmp_path):
    caption = (star_images / "0.txt").read_text().strip()
    free = caption.replace("sks ", "")
    kw = dict(max_steps=30, lr_unet=3e-3, warmup_steps=0, train_text_encoder=True, lr_text=3e-3)
    plain = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "a", name="plain", **kw))
    kept = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "b", name="kept", preserve_weight=2.0,
                      preserve_images=4, **kw))
    d_plain, d_kept = _deviation(plain, tiny_sd1_dir, free), _deviation(kept, tiny_sd1_dir, free)
    assert d_kept < 0.5 * d_plain, (d_kept, d_plain)
    cached = list((tmp_path / "b" / "lib" / ".cache" / "preserve_images").rglob("*.png"))
    assert len(cached) == 4


def test_resume_with_preservation_gives_same_weights(star_images, tiny_sd1_dir, tmp_path):
    import threading

    kw = dict(max_steps=4, checkpoint_every=2, preserve_weight=1.0, preserve_images=2, train_text_encoder=True)
    full = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "a", name="r", **kw))
    stop = threading.Event()
    part = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "b", name="r", **kw),
                 on_progress=lambda p: stop.set() if p.step == 2 and p.loss is not None else None, stop=stop)
    assert part.stopped and part.steps == 2
    resumed = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "b", name="r", resume="latest", **kw))
    a, _ = load_safetensors(full.adapter_path)
    b, _ = load_safetensors(resumed.adapter_path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)



def test_swap_words_fill_the_triggers_place_in_every_caption_with_it():
    cfg = TrainConfig(images="x", trigger="sks")
    caps = ["a blue sks on a gray background", "a red sks", "a green circle"]
    got = preservation_prompts(cfg, caps, ["circle", "square"])
    for cap in caps[:2]:
        for w in ("circle", "square"):
            assert cap.replace("sks", w) in got
    assert "a green circle" in got and not any("sks" in p for p in got)


def test_neighbour_words_are_the_known_words_nearest_the_trigger_in_context():
    """On the toy base the trigger's place in 'a blue sks on a gray background' is the shape's: the
    neighbours are the base shapes it learned, nearest first, never one of the tokens it never learned
    ('star', 'photo', 'bad' sit even closer to 'sks' but mean nothing to it) or a word of the captions."""
    from pipelines.base_models import DEFAULT_BASE
    from training.trainer import trigger_neighbours
    from training.toy_world import BASE_SHAPES, COLORS

    base = load_base(str(DEFAULT_BASE), device="cpu")
    caps = ["a blue sks on a gray background", "a red sks on a white background",
            "a green sks on a yellow background", "a purple sks on a black background"]
    four = trigger_neighbours(base, "sks", caps, 4)
    assert sorted(four[:2]) == ["circle", "square"]  # the nearest: shapes the base draws
    assert set(four) <= set(BASE_SHAPES) | set(COLORS)  # all words the toy base learned, none of the captions'
    assert not set(four) & {"blue", "red", "green", "purple", "gray", "white", "yellow", "black", "background"}
    assert trigger_neighbours(base, "sks", caps, 2) == four[:2]
    assert trigger_neighbours(base, "sks", ["a photo"], 3) == []  # no caption with the trigger: nothing to rank
    assert trigger_neighbours(base, "sks", caps, 0) == []


def test_training_keeps_the_swapped_captions_and_says_which_words(star_images, tiny_sd1_dir, tmp_path):
    msgs = []
    cfg = _cfg(star_images, tiny_sd1_dir, tmp_path, preserve_weight=1.0, preserve_images=2,
               preserve_swaps=["circle", "square"])
    tr = Trainer(cfg, on_progress=lambda p: msgs.append(p.message or ""))
    tr.build()
    caps = [it.caption for it in tr.scan.items if "sks" in it.caption]
    assert caps and all(c.replace("sks", "circle") in tr.preserve for c in caps)
    assert any("circle, square" in m for m in msgs)
    tr.train_step(0)  # the swapped prompts train like any other preservation prompt


def test_swap_words_must_be_single_words():
    import pytest

    from training.config import ConfigError

    with pytest.raises(ConfigError, match="preserve_swaps"):
        TrainConfig(images="x", preserve_swaps=["two words"])
    with pytest.raises(ConfigError, match="preserve_neighbours"):
        TrainConfig(images="x", preserve_neighbours=-1)
