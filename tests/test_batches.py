"""AUTOMATIC1111's Batch size: the images made a few at a time, the same images as in one batch."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import ConfigError
from pipelines.generation import GenerationRequest, generate

PROMPT = "a red circle on a white background"


@pytest.mark.parametrize("extra", [{}, {"subseed": 5, "subseed_strength": 0.3}], ids=["seeds", "variation-seeds"])
def test_batches_make_the_images_one_batch_makes(toy_base, extra):
    req = dict(prompt=PROMPT, steps=6, seed=3, num_images=5, **extra)
    whole = generate(toy_base, GenerationRequest(**req))
    progress = []
    parts = generate(toy_base, GenerationRequest(**req, batch_size=2), on_progress=lambda d, t: progress.append((d, t)))
    assert [(g.seed, g.subseed, g.parameters) for g in parts] == [(g.seed, g.subseed, g.parameters) for g in whole]
    for a, b in zip(whole, parts):  # a batch's rows are computed apart: at most a rounding of one level
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 2
    assert progress[-1] == (18, 18) and [d for d, _ in progress] == list(range(1, 19))  # 3 batches of 6 steps


def test_an_interrupt_ends_the_batch_it_comes_in(toy_base):
    calls = []

    def interrupt():
        calls.append(1)
        return len(calls) >= 8  # during the second batch

    got = generate(toy_base, GenerationRequest(prompt=PROMPT, steps=6, seed=3, num_images=6, batch_size=2),
                   interrupt=interrupt)
    assert [g.seed for g in got] == [3, 4, 5, 6] and got[-1].interrupted == 2 and got[0].interrupted is None


def test_a_bad_batch_size_is_refused_by_name():
    with pytest.raises(ConfigError, match="batch_size: images made at a time"):
        GenerationRequest(prompt=PROMPT, batch_size=-1)


def test_cli_batch_size(toy_base_dir, tmp_path):
    from PIL import Image

    from app.cli import main

    out = tmp_path / "b.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--prompt", PROMPT, "--steps", "4",
                 "--seed", "9", "--num-images", "3", "--batch-size", "1", "--out", str(out)]) == 0
    files = sorted(tmp_path.glob("b*.png"))
    assert len(files) == 3 and {Image.open(f).info["parameters"].split("Seed: ")[1].split(",")[0] for f in files} \
        == {"9", "10", "11"}
