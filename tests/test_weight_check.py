"""The model card's weight range: a check at the end of training of how far the adapter moves trigger-free
pictures, read by the toy world's evaluator on the toy base, shown as pictures elsewhere."""

from __future__ import annotations

import json

import pytest

from pipelines.base_models import DEFAULT_BASE
from training.config import TrainConfig
from training.trainer import train


def _run(images, tmp_path, name, **kw):
    cfg = TrainConfig(images=str(images), base=kw.pop("base", str(DEFAULT_BASE)), output_dir=str(tmp_path / "lib"),
                      name=name, device="cpu", checkpoint_every=0, sample_steps=6, batch_size=2, rank=4, seed=1,
                      **kw)
    return train(cfg)


@pytest.mark.parametrize("lr, steps, intact", [(1e-6, 2, True), (0.3, 12, False)])
def test_toy_card_says_up_to_which_weight_the_base_stays_intact(star_images, tmp_path, lr, steps, intact):
    """A harmless adapter keeps every trigger-free picture at every weight; a wrecked one (lr 0.3) does not
    at full weight, and the card says so, with the share kept at each weight."""
    res = _run(star_images, tmp_path, "wc", lr_unet=lr, max_steps=steps, resolution=64)
    card = (tmp_path / "lib" / "wc.md").read_text()
    assert "## Weight range" in card and "| 0.25 |" in card and "| 1 |" in card
    assert (res.run_dir / "weight-check.png").is_file()
    if intact:
        assert "Keeps the base intact up to weight 1**" in card
    else:
        assert "up to weight 1**" not in card
    # AUTOMATIC1111's user metadata beside the file: its card inserts the trigger word; the check in the notes
    user = json.loads((tmp_path / "lib" / "wc.json").read_text())
    assert user["activation text"] == "sks" and user["sd version"] == "Unknown" and user["preferred weight"] == 0
    assert ("Keeps the base intact up to weight 1." in user["notes"]) == intact


def test_weight_check_elsewhere_shows_pictures_and_can_be_turned_off(star_images, tiny_sd1_dir, tmp_path):
    res = _run(star_images, tmp_path, "tiny", base=str(tiny_sd1_dir), max_steps=2)
    card = (tmp_path / "lib" / "tiny.md").read_text()
    assert "judge the range from the pictures" in card and "weight-check.png" in card
    assert (res.run_dir / "weight-check.png").is_file()
    assert "Step range: judge from the pictures in `step-check.png`" in card and "| from step 3 |" in card
    assert json.loads((tmp_path / "lib" / "tiny.json").read_text())["activation text"] == "sks"
    assert (res.run_dir / "step-check.png").is_file()
    _run(star_images, tmp_path, "off", base=str(tiny_sd1_dir), max_steps=2, weight_check=False)
    assert "## Weight range" not in (tmp_path / "lib" / "off.md").read_text()


def test_toy_card_gives_the_step_range_with_pictures(star_images, tmp_path):
    """The card's step range: the adapter at weight 1 acting at every step and from each later start; a wrecked
    adapter (lr 0.3) moves trigger-free pictures less when its UNet part only acts over the later steps, and
    afterwards the model draws as before the check (every LoRA layer switched back on)."""
    import torch

    from pipelines.generation import GenerationRequest, generate
    from training.trainer import Trainer
    from training.weight_check import check_starts, check_weights

    cfg = TrainConfig(images=str(star_images), base=str(DEFAULT_BASE), output_dir=str(tmp_path / "lib"), name="sr",
                      device="cpu", checkpoint_every=0, sample_steps=6, batch_size=2, rank=4, seed=1, lr_unet=0.3,
                      max_steps=12, resolution=64, trigger="sks")
    tr = Trainer(cfg)
    tr.run()
    card = (tmp_path / "lib" / "sr.md").read_text()
    sc = tr.weight_check.step_check
    assert check_starts(6) == (0, 2, 3) and sc.starts == (0, 2, 3)
    assert "## Step range" in card and "| every step |" in card
    assert "| from step 2 |" in card and "| from step 3 |" in card
    assert sc.trigger_prompts and all("sks" in p for p in sc.trigger_prompts)
    assert sc.look == {"shape": "star", "style": "solid"}
    assert sc.free_change[3] < sc.free_change[0]
    assert (tr.run_dir / "step-check.png").is_file()
    # the suggestion goes into the file's metadata as START/STEPS (the Generate tab's rows start from it)
    from pipelines.adapters import SUGGESTED_START_KEY
    from pipelines.weights_io import read_metadata
    from training.export import adapter_metadata

    written = read_metadata(tmp_path / "lib" / "sr.safetensors").get(SUGGESTED_START_KEY)
    assert written == (f"{sc.suggested}/6" if sc.suggested else None)
    sc.suggested = 3
    assert adapter_metadata(tr)[SUGGESTED_START_KEY] == "3/6"
    sc.suggested = None
    assert SUGGESTED_START_KEY not in adapter_metadata(tr)
    req = GenerationRequest(prompt="a red circle on a white background", steps=4, seed=3, width=64, height=64)
    before = generate(tr.base, req)[0].image
    check_weights(tr)
    after = generate(tr.base, req)[0].image
    assert torch.equal(torch.tensor(list(before.getdata())), torch.tensor(list(after.getdata())))


@pytest.mark.parametrize("look, free, want", [
    ({0: 0.8, 5: 0.8, 10: 0.75}, {0: 0.2, 5: 0.3, 10: 0.6}, 10),  # the latest start keeping 90% of the look
    ({0: 0.8, 5: 0.8, 10: 0.5}, {0: 0.2, 5: 0.3, 10: 0.6}, 5),  # step 10 loses the look
    ({0: 0.8, 5: 0.8, 10: 0.8}, {0: 0.5, 5: 0.5, 10: 0.5}, None),  # no start keeps more of the base
    ({0: 0.0, 5: 0.0, 10: 0.0}, {0: 0.2, 5: 0.3, 10: 0.6}, None),  # nothing learned: no range to suggest
])
def test_step_suggestion_keeps_the_look_and_more_of_the_base(look, free, want):
    from training.weight_check import suggest_start

    assert suggest_start((0, 5, 10), look, free) == want


@pytest.mark.parametrize("folder, want", [("style-outline", {"style": "outline"}), ("concept-star", {"shape": "star"})])
def test_the_trained_look_is_what_the_captions_leave_to_the_adapter(folder, want):
    """On the shipped sets the check looks for the outline style and for the star shape (the fields the captions
    do not name), as bench/quality.py scores fidelity."""
    from pathlib import Path

    from training.dataset import scan_folder
    from training.evaluator import load_evaluator
    from training.weight_check import trained_look

    items = scan_folder(Path(__file__).parents[1] / "sample_data" / folder).items
    look = trained_look(load_evaluator(), items)
    assert all(look.get(k) == v for k, v in want.items())


@pytest.mark.parametrize("family, version", [("sd1", "SD1"), ("sd2", "SD2"), ("sdxl", "SDXL")])
def test_a1111_user_metadata_names_the_sd_version_of_real_bases(family, version):
    """A1111 filters its LoRA cards by this version; a real base gives its family (a toy-sized one "Unknown")."""
    from types import SimpleNamespace

    from training.export import a1111_user_metadata

    cfg = SimpleNamespace(base=f"/models/not-here-{family}", name="mine", rank=16, trigger="ohwx", clip_skip=1)
    tr = SimpleNamespace(cfg=cfg, base=SimpleNamespace(name=f"my-{family}", family=family), weight_check=None)
    user = a1111_user_metadata(tr)
    assert user["sd version"] == version and user["activation text"] == "ohwx"


def test_check_prompts_read_as_sentences():
    """The card lists the check's trigger-free prompts: a style caption loses its whole trigger phrase
    ("in ohwx style"), never just the word ("... in style"); a concept caption keeps its class noun."""
    from types import SimpleNamespace

    from training.weight_check import check_prompts

    caps = ["a purple square on a yellow background in ohwx style", "a blue circle on a gray background in ohwx style"]
    tr = SimpleNamespace(cfg=TrainConfig(images=".", trigger="ohwx"),
                         scan=SimpleNamespace(items=[SimpleNamespace(caption=c) for c in caps]))
    assert check_prompts(tr) == ["a purple square on a yellow background", "a blue circle on a gray background"]
    tr.cfg = TrainConfig(images=".", trigger="sks", class_prompt="a shape")
    tr.scan.items = [SimpleNamespace(caption="a blue sks on a gray background")]
    assert "a blue shape on a gray background" in check_prompts(tr)
