"""The toy world's promises the base model, the evaluator and the quality bench rely on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from training import toy_world as tw


@pytest.mark.parametrize("shape", tw.DRAWABLE_SHAPES)
def test_every_shape_is_left_right_symmetric(shape):
    # the evaluator's augmentation flips images left-right and keeps the shape label
    spec = tw.ShapeSpec("red", shape, "white", size=20, cx=32, cy=32)
    a = np.asarray(tw.draw(spec), dtype=np.int16)
    diff = np.abs(a - a[:, ::-1]).mean()
    assert diff < 2.0, f"{shape} is not left-right symmetric (mean abs diff {diff:.1f})"


def test_shapes_are_told_apart_by_their_pixels():
    masks = {}
    for shape in tw.DRAWABLE_SHAPES:
        a = np.asarray(tw.draw(tw.ShapeSpec("red", shape, "white", size=20, cx=32, cy=32)))
        masks[shape] = a[..., 1] < 128  # red on white: green channel low inside the shape
    names = list(masks)
    for i, s in enumerate(names):
        for t in names[i + 1 :]:
            assert (masks[s] != masks[t]).mean() > 0.03, f"{s} and {t} draw (almost) the same pixels"


def test_varied_captions_name_what_the_picture_shows():
    rng = random.Random(0)
    templates_seen = set()
    for _ in range(400):
        spec = tw.sample_spec(rng)
        cap = tw.varied_caption(spec, rng)
        want = tw.parse_caption(cap)
        assert want["shape"] == spec.shape, cap
        assert want["color"] in (None, spec.color), cap
        assert want["background"] in (None, spec.background), cap
        assert "{" not in cap
        templates_seen.add(cap.split()[0])
    assert len(templates_seen) >= 5  # varied, not one template


def test_every_caption_word_is_one_trained_token():
    from training.toy_tokenizer import build_vocab

    vocab, _ = build_vocab()
    rng = random.Random(1)
    for _ in range(200):
        cap = tw.varied_caption(tw.sample_spec(rng, style=rng.choice(tw.DRAWABLE_STYLES[:-1])), rng)
        for word in cap.replace(",", " ").split():
            assert word + "</w>" in vocab, f"{word!r} of {cap!r} is not a single token"
    for trigger in ("sks", "ohwx"):  # the usual trigger words are rare filler, as in real CLIP
        assert trigger in tw.FILLER


def test_base_rendering_styles_hold_one_part_of_an_outline_each_and_are_named_in_captions():
    # world v1r: "striped" lets the background through in bands, "ringed" keeps a thick band of colour along the
    # edge around a small hole; neither is the outline's thin edge, so the held-out outline stays a recombination
    import numpy as np

    spec = dict(color="red", shape="square", background="white", size=20, cx=32, cy=32)
    px = {st: np.asarray(tw.draw(tw.ShapeSpec(**spec, style=st))).astype(int) for st in tw.DRAWABLE_STYLES}
    red = {st: a[..., 1] < 128 for st, a in px.items()}  # red on white: green low where the shape is drawn
    assert 0.35 * red["solid"].mean() < red["striped"].mean() < 0.65 * red["solid"].mean()  # about half
    assert not red["ringed"][30:34, 30:34].any() and not red["outline"][30:34, 30:34].any()  # a hole in the middle
    assert red["ringed"].mean() > 2 * red["outline"].mean()  # but a thick ring, not a thin edge
    assert red["ringed"][red["outline"] & red["solid"]].mean() > 0.95  # which covers the outline's inner edge
    # world v1t: "framed" is the solid shape with a line as thin as the outline's, along the picture's edge
    inner = np.s_[6:58, 6:58]
    assert (red["framed"][inner] == red["solid"][inner]).all()  # the shape as solid draws it
    frame = red["framed"] & ~red["solid"]
    assert frame[0:3].all() and frame[:, -3:].all() and not frame[inner].any()  # a closed frame at the edge
    rows = frame[:, 32].sum()  # the frame's thickness, top and bottom, against the outline's line across x=32
    assert abs(rows - red["outline"][:, 32].sum()) <= 2
    rng = random.Random(3)
    for st in tw.NAMED_STYLES:
        for _ in range(40):
            s = tw.sample_spec(rng, style=st)
            cap = tw.varied_caption(s, rng)
            assert st in cap.split(), cap
            want = tw.parse_caption(cap)
            assert want["shape"] == s.shape and want["color"] in (None, s.color), cap
    for st in (tw.BASE_STYLE, tw.STYLE_STYLE):  # solid is the unnamed default; outline is left to the LoRA set
        assert not any(w in tw.DRAWABLE_STYLES for w in tw.varied_caption(tw.sample_spec(rng, style=st), rng).split())


def test_held_out_parts_stay_out_of_the_base_world():
    assert tw.CONCEPT_SHAPE not in tw.BASE_SHAPES
    assert set(tw.V1_SHAPES) <= set(tw.BASE_SHAPES)
    prompts = tw.all_base_prompts()
    assert not any(tw.CONCEPT_SHAPE in p for p in prompts)
    assert {tw.parse_caption(p)["shape"] for p in prompts} == set(tw.BASE_SHAPES)


_WORLD_CHECK = """
import json
from training import toy_world as tw
from training import evaluator as ev
m = ev.load_evaluator(train_if_missing=False)
print(json.dumps({"base": tw.BASE_SHAPES, "path": ev.DEFAULT_PATH.name, "shape_labels": m.labels["shape"],
                  "base_styles": tw.BASE_STYLES, "style_labels": m.labels["style"],
                  "prompt_shapes": sorted({tw.parse_caption(p)["shape"] for p in tw.all_base_prompts()})}))
"""


@pytest.mark.parametrize("world, added, styles", [("v1", [], []), ("v2s", tw.V2S_NEW_SHAPES, []),
                                                   ("v2", tw.V2_NEW_SHAPES, []), ("v1r", [], tw.V1R_NEW_STYLES),
                                                   ("v1t", [], tw.V1T_NEW_STYLES)])
def test_each_world_ships_an_evaluator_for_its_own_shapes(world, added, styles):
    # LORA_STUDIO_TOY_WORLD picks the base world for training, benches and scoring: its base prompts, and an
    # evaluator that was trained on exactly its shapes (a base shape it cannot name would score as a miss)
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "LORA_STUDIO_TOY_WORLD": world}
    out = subprocess.run([sys.executable, "-c", _WORLD_CHECK], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["base"] == tw.V1_SHAPES + added
    assert got["prompt_shapes"] == sorted(got["base"])
    assert got["shape_labels"] == got["base"] + [tw.CONCEPT_SHAPE]
    assert got["base_styles"] == [tw.BASE_STYLE] + styles
    assert got["style_labels"] == got["base_styles"] + [tw.STYLE_STYLE]  # the held-out outline scored too
    assert got["path"] == ("evaluator.safetensors" if world == "v1" else f"evaluator-{world}.safetensors")


def test_an_unknown_world_is_refused_by_name():
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORA_STUDIO_TOY_WORLD": "v3"}
    r = subprocess.run([sys.executable, "-c", "import training.toy_world"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "LORA_STUDIO_TOY_WORLD" in r.stderr and "'v3'" in r.stderr


def test_init_from_carries_each_token_embedding_by_its_text(toy_base_dir):
    import json

    import torch
    from safetensors.torch import load_file

    from training.toy_base import init_from, make_text_encoder, make_unet
    from training.toy_tokenizer import build_vocab

    unet, te = make_unet(), make_text_encoder()
    init_from(toy_base_dir, unet, te)
    old = load_file(toy_base_dir / "text_encoder" / "model.safetensors")
    old = next(v for k, v in old.items() if k.endswith("embeddings.token_embedding.weight"))
    old_vocab = json.loads((toy_base_dir / "tokenizer" / "vocab.json").read_text())
    new_vocab, _ = build_vocab()
    emb = te.get_input_embeddings().weight
    for word in ("circle</w>", "red</w>", "background</w>", "a</w>"):
        assert torch.equal(emb[new_vocab[word]], old[old_vocab[word]]), word
    ref = load_file(toy_base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    k = next(iter(ref))
    assert torch.equal(unet.state_dict()[k], ref[k])


@pytest.mark.parametrize("name", ["concept-star", "style-outline"])
def test_shipped_sets_are_what_the_generator_draws(tmp_path, name):
    # the world can grow (more base shapes, more caption words) without changing the shipped sets
    from PIL import Image

    from training.sample_sets import ROOT, write_set

    fresh = write_set(name, tmp_path)
    shipped = ROOT / "sample_data" / name
    pngs = sorted(p.name for p in shipped.glob("*.png"))
    assert pngs == sorted(p.name for p in fresh.glob("*.png")) and len(pngs) == 12
    for png in pngs:
        assert np.array_equal(np.asarray(Image.open(shipped / png)), np.asarray(Image.open(fresh / png))), png
        txt = png.replace(".png", ".txt")
        assert (shipped / txt).read_text() == (fresh / txt).read_text(), txt


def test_style_set_redrawn_in_a_base_style_keeps_its_pictures_captions_and_trigger(tmp_path):
    # `python -m training.sample_sets --style S`: the same twelve pictures in another style, captioned exactly
    # as the shipped set (the style left to the trigger), so the recipe can be scored on a style the base draws
    from PIL import Image

    from training.evaluator import classify, load_evaluator
    from training.sample_sets import ROOT, main

    main(["--style", tw.BASE_STYLE, "--out", str(tmp_path)])
    shipped, fresh = ROOT / "sample_data" / "style-outline", tmp_path / f"style-{tw.BASE_STYLE}"
    txts = sorted(p.name for p in shipped.glob("*.txt"))
    assert len(txts) == 12 and [(fresh / t).read_text() for t in txts] == [(shipped / t).read_text() for t in txts]
    ev = load_evaluator(train_if_missing=False)
    got = classify(ev, [Image.open(fresh / t.replace(".txt", ".png")).convert("RGB") for t in txts])
    want = classify(ev, [Image.open(shipped / t.replace(".txt", ".png")).convert("RGB") for t in txts])
    assert [g["style"] for g in got] == [tw.BASE_STYLE] * 12 and [w["style"] for w in want] == [tw.STYLE_STYLE] * 12
    assert [(g["shape"], g["color"]) for g in got] == [(w["shape"], w["color"]) for w in want]
    with pytest.raises(SystemExit):  # a style the world does not have is refused by name
        main(["--style", "ringed" if "ringed" not in tw.STYLES else "wavy", "--out", str(tmp_path)])


def test_oversampling_draws_the_matching_training_images_that_many_times_as_often(monkeypatch):
    from training.toy_base import parse_oversample, sampling_weights

    monkeypatch.setattr(tw, "BASE_STYLES", [tw.BASE_STYLE, *tw.V1T_NEW_STYLES])  # world v1t's base styles

    rng = random.Random(0)
    specs = [tw.sample_spec(rng, style=s) for s in ("solid", "framed") * 1000]
    rules = parse_oversample(["style=framed:3", "background=white:2"])
    w = sampling_weights(specs, rules)
    for s, x in zip(specs, w):
        assert x == (3 if s.style == "framed" else 1) * (2 if s.background == "white" else 1)
    picked = random.Random(1).choices(specs, weights=w, k=20000)
    framed = sum(s.style == "framed" for s in picked) / len(picked)
    assert 0.72 < framed < 0.78  # 3 : 1 on a half-and-half cache
    assert sampling_weights(specs, {}) == [1.0] * len(specs)


@pytest.mark.parametrize("rule, says", [("style=framed", "FIELD=VALUE:FACTOR"), ("colour=red:2", "FIELD one of"),
                                        ("style=framed:0", "above 0"), ("style=framed:x", "must be a number"),
                                        ("background=whit:2", "no background 'whit'"),
                                        ("shape=star:2", "no shape 'star'")])  # held out: never in the base's drawings
def test_a_bad_oversample_rule_is_refused_naming_it(rule, says):
    from training.toy_base import parse_oversample

    with pytest.raises(ValueError) as e:
        parse_oversample([rule])
    assert rule in str(e.value) and says in str(e.value)


def test_a_base_fine_tune_can_weight_the_noisiest_and_the_last_steps():
    import torch

    from training.toy_base import draw_timesteps

    plain = draw_timesteps(1000, torch.Generator().manual_seed(3))
    assert torch.equal(plain, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3)))
    t = draw_timesteps(1000, torch.Generator().manual_seed(3), high_noise=0.25, low_noise=0.5)
    assert (t[:250] >= 500).all() and (t[250:750] < 300).all()  # each share from its own range
    assert t.min() >= 0 and t.max() < 1000 and (t[750:] >= 300).any() and (t[750:] < 300).any()
    assert ((t < 300).float().mean() - (0.5 + 0.25 * 0.3)).abs() < 0.05  # the uniform rest adds its own


@pytest.mark.parametrize("argv, says", [(["--low-noise", "1.5"], "--low-noise: a share of the batch"),
                                        (["--high-noise", "-0.1"], "--high-noise: a share of the batch"),
                                        (["--high-noise", "0.6", "--low-noise", "0.6"], "together over")])
def test_a_timestep_share_out_of_range_is_refused_by_name(argv, says, tmp_path, capsys):
    from training.toy_base import main

    with pytest.raises(SystemExit):
        main([*argv, "--work", str(tmp_path)])
    assert says in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was trained or written
