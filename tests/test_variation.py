"""AUTOMATIC1111's variation seed (its "Extra" seed options): variations of one picture. Each image's starting noise
is its seed's, moved towards the noise of its variation seed by the strength; the images of a batch share the seed
and take variation seeds N, N+1, …; the PNG records both, and reading it back makes the same picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base_models import load_base
from pipelines.errors import ConfigError
from pipelines.generation import GenerationRequest, generate, parse_parameters, slerp
from pipelines.recall import recall
from pipelines.wildcards import Wildcards, plan


@pytest.fixture(scope="module")
def model(tiny_sd1_dir):
    return load_base(str(tiny_sd1_dir), device="cpu")


def _req(**kw):
    return GenerationRequest(**{"prompt": "a red circle", "steps": 3, "scheduler": "Euler", "seed": 5, **kw})


def _pixels(img) -> np.ndarray:
    return np.asarray(img.image, dtype=np.float64)


def test_slerp_ends_and_keeps_the_noise_scale():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(slerp(0.0, a, b), a)
    torch.testing.assert_close(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)  # a straight mix of two noises would shrink it to ~0.71 of theirs
    ends = (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)) / 2
    assert ((mid.flatten(1).norm(dim=1) / ends - 1).abs() < 0.1).all()
    assert ((((a + b) / 2).flatten(1).norm(dim=1) / ends) < 0.8).all()
    torch.testing.assert_close(slerp(0.3, a, a), a)  # parallel rows: no division by zero


def test_variations_of_one_picture(model):
    plain = {s: _pixels(generate(model, _req(seed=s))[0]) for s in (5, 9, 10)}
    # at full strength the variation seed's own picture; the batch shares the seed, variation seeds count up
    full = generate(model, _req(subseed=9, subseed_strength=1.0, num_images=2))
    assert [i.seed for i in full] == [5, 5] and [i.subseed for i in full] == [9, 10]
    assert np.abs(_pixels(full[0]) - plain[9]).max() <= 1 and np.abs(_pixels(full[1]) - plain[10]).max() <= 1
    # a little strength: near its seed's picture, not its variation seed's, and not the same
    near = _pixels(generate(model, _req(subseed=9, subseed_strength=0.1))[0])
    assert 0 < np.abs(near - plain[5]).mean() < np.abs(near - plain[9]).mean()
    # recorded as A1111 records it, and read back into the same request
    made = generate(model, _req(subseed=9, subseed_strength=0.25, num_images=2))[1]
    p = parse_parameters(made.parameters)
    assert (p["Seed"], p["Variation seed"], p["Variation seed strength"]) == ("5", "10", "0.25")
    again = recall(made.parameters).request
    assert (again.seed, again.subseed, again.subseed_strength) == (5, 10, 0.25)
    alone = generate(model, again)[0]
    assert np.abs(_pixels(alone) - _pixels(made)).max() <= 1
    assert "Variation seed" not in generate(model, _req())[0].parameters


def test_variation_seed_refusals_and_random_seed():
    with pytest.raises(ConfigError, match="^subseed_strength: .*between 0 and 1"):
        _req(subseed_strength=1.5)
    with pytest.raises(ConfigError, match="^subseed_strength: .*img2img"):
        _req(subseed_strength=0.2, init_image=Image.new("RGB", (64, 64)))
    r = _req(subseed_strength=0.2)
    assert r.subseed >= 0  # -1: a random one, recorded
    assert "not applied here" not in " ".join(recall("x\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, "
                                                     "Variation seed: 4, Variation seed strength: 0.5").notes)


def test_dynamic_prompts_with_a_variation_seed_keep_its_numbering(tmp_path):
    req = _req(prompt="a {red|blue} circle", subseed=20, subseed_strength=0.3, num_images=3)
    p = plan(req, Wildcards.at(tmp_path))
    images = [(r.seed, r.subseed + i) for r in p.requests for i in range(r.num_images)]
    assert images == [(5, 20), (5, 21), (5, 22)]
