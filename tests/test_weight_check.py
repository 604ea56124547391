"""The model card's weight range: a check at the end of training of how far the adapter moves trigger-free
pictures, read by the toy world's evaluator on the toy base, shown as pictures elsewhere."""

from __future__ import annotations

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


def test_weight_check_elsewhere_shows_pictures_and_can_be_turned_off(star_images, tiny_sd1_dir, tmp_path):
    res = _run(star_images, tmp_path, "tiny", base=str(tiny_sd1_dir), max_steps=2)
    card = (tmp_path / "lib" / "tiny.md").read_text()
    assert "judge the range from the pictures" in card and "weight-check.png" in card
    assert (res.run_dir / "weight-check.png").is_file()
    _run(star_images, tmp_path, "off", base=str(tiny_sd1_dir), max_steps=2, weight_check=False)
    assert "## Weight range" not in (tmp_path / "lib" / "off.md").read_text()
