"""AUTOMATIC1111's prompt editing: [from:to:when], [to:when], [from::when] and [a|b] alternation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pipelines.base_models import load_base
from pipelines.generation import GenerationRequest, generate
from pipelines.prompt_editing import at_step, schedule
from pipelines.prompts import encode
from training.evaluator import classify, load_evaluator

A = "a red circle on a white background"
B = "a blue square on a yellow background"


@pytest.mark.parametrize("prompt,steps,hires,want", [
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),                 # [to:when] adds at the step
    ("a [b: 3 ]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b::3] c", 10, None, [(3, "a b c"), (10, "a  c")]),           # [from::when] removes
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),  # nested
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),          # a decimal point: a share of the steps
    ("[x:y:1.0]", 10, None, [(10, "x")]),                            # 1.0 is every step; 1 is step 1
    ("[x:y:1]", 10, None, [(1, "x"), (10, "y")]),
    ("[x:y:25]", 20, None, [(20, "x")]),                             # past the last step: never switches
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),         # emphasis stays for the weights' parser
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("(x [a:b:2]:1.3)", 4, None, [(2, "(x a:1.3)"), (4, "(x b:1.3)")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[a|b|c] d", 4, None, [(1, "a d"), (2, "b d"), (3, "c d"), (4, "a d")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),            # what does not parse is one text
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("a red | blue", 10, None, [(10, "a red | blue")]),              # a bar outside brackets: one text
    ("(a|b) c [d:2]", 10, None, [(10, "(a|b) c [d:2]")]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),                         # the Hires pass: the edit has happened
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),           # 1.5: half of the Hires pass
    ("[x:y:15]", 10, 10, [(5, "x"), (10, "y")]),                     # 15: its 5th step after 10 first-pass ones
])
def test_schedules_read_as_automatic1111_reads_them(prompt, steps, hires, want):
    assert schedule(prompt, steps, hires) == want


def test_sampler_steps_take_the_text_of_the_first_entry_that_ends_at_or_after_them():
    entries = schedule(f"[{A}:{B}:10]", 20)
    assert [at_step(entries, i) for i in range(20)] == [A] * 11 + [B] * 9  # A1111: steps 0-10 read `from`
    alternating = schedule("[x|y]", 4)
    assert [at_step(alternating, i) for i in range(4)] == ["x", "x", "y", "x"]


@pytest.fixture(scope="module")
def toy(toy_base_dir):
    return load_base(toy_base_dir, device="cpu")


def _seen(model, req, key="encoder_hidden_states"):
    """What the UNet was given at each call of a generation: the text embeddings, or SDXL's pooled ones
    (key "text_embeds"); the images too."""
    calls = []

    def hook(_module, _args, kwargs):
        value = kwargs[key] if key in kwargs else kwargs["added_cond_kwargs"][key]
        calls.append(value.detach().clone())

    handle = model.pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = generate(model, req)
    finally:
        handle.remove()
    return calls, images


@pytest.mark.parametrize("guidance,num_images", [(7.0, 2), (1.0, 1)])
def test_the_unet_reads_each_steps_text_and_negative_text(toy, guidance, num_images):
    req = GenerationRequest(prompt=f"[{A}:{B}:5]", negative_prompt="[blurry::3]", steps=8, seed=1,
                            guidance=guidance, num_images=num_images, scheduler="Euler")
    calls, _ = _seen(toy, req)
    assert len(calls) == 8
    with torch.no_grad():
        enc = {(p, n): encode(toy, p, n, None) for p in (A, B) for n in ("blurry", "")}
    for i, got in enumerate(calls):
        want = enc[(A if i <= 5 else B, "blurry" if i <= 3 else "")]
        if guidance > 1:  # the pipeline holds the negative half first
            neg, pos = got[:num_images], got[num_images:]
            assert torch.equal(neg, want["negative_prompt_embeds"].expand_as(neg)), i
        else:
            pos = got
        assert torch.equal(pos, want["prompt_embeds"].expand_as(pos)), i


def test_a_hires_pass_counts_its_own_steps_after_the_first_pass(toy):
    req = GenerationRequest(prompt=f"[{A}:{B}:8]", steps=6, seed=1, scheduler="Euler", hires_scale=1.5,
                            hires_steps=4, denoising_strength=0.5)
    calls, images = _seen(toy, req)
    assert len(calls) == 10 and images[0].image.size == (96, 96)
    with torch.no_grad():
        a, b = (encode(toy, p, "", None)["prompt_embeds"] for p in (A, B))
    # first pass: step 8 is past its 6, so A throughout; the Hires pass: its step 2 (8 - 6), so A to step 2
    want = [a] * 6 + [a, a, a, b]
    assert all(torch.equal(got[1:], w) for got, w in zip(calls, want))
    calls, _ = _seen(toy, GenerationRequest(prompt=f"[{A}:{B}:0.5]", steps=6, seed=1, scheduler="Euler",
                                            hires_scale=1.5, hires_steps=4, denoising_strength=0.5))
    assert all(torch.equal(got[1:], w) for got, w in zip(calls, [a] * 4 + [b] * 2 + [b] * 4))


def test_an_edit_that_never_happens_gives_the_first_texts_picture_and_batches_stay_per_seed(toy):
    def img(prompt, **kw):
        req = GenerationRequest(prompt=prompt, steps=8, seed=4, scheduler="Euler", **kw)
        return [np.asarray(g.image, dtype=np.int16) for g in generate(toy, req)]

    plain = img(A)[0]
    assert np.array_equal(img(f"[{A}:{B}:8]")[0], plain)  # the switch is past the last step
    assert np.abs(img(f"[{A}:{B}:7]")[0] - plain).max() <= 1  # switches after the last step runs
    pair = img(f"[{A}:{B}:3]", num_images=2)
    second = np.asarray(generate(toy, GenerationRequest(prompt=f"[{A}:{B}:3]", steps=8, seed=5,
                                                        scheduler="Euler"))[0].image, dtype=np.int16)
    assert np.abs(pair[1] - second).max() <= 1  # image i of a batch is seed + i's, alone
    assert np.abs(pair[0] - plain).mean() > 5  # and the edit changed the picture


def test_the_picture_follows_the_edit(toy):
    ev = load_evaluator()

    def read(prompt):
        images = generate(toy, GenerationRequest(prompt=prompt, steps=20, seed=5, num_images=6))
        return Counter(f"{c['color']} {c['shape']} {c['background']}" for c in classify(ev, [i.image for i in images]))

    # the colours switch part way, the shape both texts share stays
    assert read("a [red:blue:0.5] circle on a [white:yellow:0.3] background").most_common(1)[0] == (
        "blue circle yellow", 6)
    assert read(f"[{A}:{B}:19]").most_common(1)[0] == ("red circle white", 6)


def test_sdxl_swaps_both_encoders_and_the_pooled_embedding(tiny_sdxl_dir):
    xl = load_base(tiny_sdxl_dir, device="cpu")
    req = GenerationRequest(prompt="[a cat:a dog:2]", steps=4, seed=1, scheduler="Euler", width=64, height=64)
    hidden, _ = _seen(xl, req)
    pooled, _ = _seen(xl, req, key="text_embeds")
    with torch.no_grad():
        cat, dog = (encode(xl, p, "", None) for p in ("a cat", "a dog"))
    for i, (h, p) in enumerate(zip(hidden, pooled)):
        want = cat if i <= 2 else dog
        assert torch.equal(h[1:], want["prompt_embeds"]) and torch.equal(p[1:], want["pooled_prompt_embeds"]), i
