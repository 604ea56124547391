"""The shipped toy-world evaluator: accurate on fresh ground truth, and score() catches wrong images."""

from __future__ import annotations

import random

import pytest

from training import evaluator as ev
from training import toy_world as tw


@pytest.fixture(scope="module")
def model():
    if not ev.DEFAULT_PATH.is_file():
        pytest.fail(f"{ev.DEFAULT_PATH} is missing: run `python -m training.evaluator` and commit it")
    return ev.load_evaluator(ev.DEFAULT_PATH, train_if_missing=False)


@pytest.mark.parametrize("augmented", [False, True], ids=["clean", "augmented"])
def test_accuracy_per_head_on_fresh_ground_truth(model, augmented):
    acc = ev.evaluate_accuracy(model, n=300, seed=424242, augmented=augmented)
    assert set(acc) == {"color", "shape", "background", "style"}
    for head, a in acc.items():
        assert a >= 0.97, f"{head}: {a:.3f}"


def test_classify_reads_a_drawing(model):
    spec = tw.ShapeSpec("red", "star", "blue", size=18, cx=32, cy=32, style="outline")
    big = tw.draw(spec).resize((256, 256))  # other sizes are resized to the evaluator's 64 px
    assert ev.classify(model, [big]) == [{"color": "red", "shape": "star", "background": "blue", "style": "outline"}]


def test_score_counts_a_wrong_prompt_as_a_miss(model):
    rng = random.Random(7)
    specs = [tw.sample_spec(rng) for _ in range(6)]
    images = [tw.draw(s) for s in specs]
    right = [s.caption() for s in specs]
    assert ev.score(model, images, right)["all"] == 1.0

    wrong_color = [p.replace(f"a {s.color} ", f"a {_other(s.color, s.background, tw.FG_COLORS)} ", 1)
                   for p, s in zip(right, specs)]
    res = ev.score(model, images, wrong_color)
    assert res["color"] == 0.0 and res["all"] == 0.0
    assert res["shape"] == 1.0 and res["background"] == 1.0

    res = ev.score(model, images[:1], [f"a {specs[0].color} star on a {specs[0].background} background"])
    assert res["shape"] == 0.0 and res["all"] == 0.0


def test_score_only_counts_fields_the_prompt_names(model):
    spec = tw.ShapeSpec("green", "circle", "white", size=16, cx=30, cy=34)
    res = ev.score(model, [tw.draw(spec)], ["a circle"])
    assert res["shape"] == 1.0 and res["all"] == 1.0
    assert res["color"] is None and res["background"] is None


def _other(color: str, background: str, palette: list[str]) -> str:
    return next(c for c in palette if c not in (color, background))
