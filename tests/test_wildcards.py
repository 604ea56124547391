"""Dynamic prompts and wildcards (the template language of AUTOMATIC1111's Dynamic Prompts extension): the
syntax, wildcard files as the extension keeps them, each image's own prompt in `generate`, every combination,
one prompt for a grid, the Generate tab."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from app.cli import main
from pipelines.errors import ConfigError
from pipelines.generation import GenerationRequest, parse_parameters, read_png_parameters
from pipelines.wildcards import Wildcards, draw, draw_once, every, has_syntax, plan


@pytest.fixture()
def cards(tmp_path):
    """A wildcards folder as the extension's users fill it: text files (comments, blank lines, a line with a
    choice of its own, one naming another file), a subfolder, YAML and JSON lists."""
    d = tmp_path / "wildcards"
    (d / "shapes").mkdir(parents=True)
    (d / "colour.txt").write_text("# the base's colours\nred\n\ngreen\n{blue|navy}\n", encoding="utf-8")
    (d / "shapes" / "round.txt").write_text("circle\n", encoding="utf-8")
    (d / "shapes" / "sharp.txt").write_text("square\ntriangle\n", encoding="utf-8")
    (d / "thing.txt").write_text("__colour__ __shapes/round__\n", encoding="utf-8")
    (d / "animals.yaml").write_text("animals:\n  pets: [cat, dog]\n  wild:\n    - fox\n  count: 3\n",
                                    encoding="utf-8")
    (d / "moods.json").write_text(json.dumps({"mood": ["calm", "angry"]}), encoding="utf-8")
    return Wildcards.at(d)


def test_choices_are_drawn_by_seed_as_the_extension_writes_them(cards):
    t = "a {big|small} __colour__ {2$$ and $$a|b|c} {0::never|always} \\{x\\|y\\}"
    drawn = [draw(t, s, cards) for s in range(40)]
    assert drawn == [draw(t, s, cards) for s in range(40)]  # a seed gives its prompt again
    assert {d.split()[1] for d in drawn} == {"big", "small"}
    assert {d.split()[2] for d in drawn} == {"red", "green", "blue", "navy"}  # a line's own choice drawn too
    for d in drawn:
        pair = d.split()[3:6]
        assert pair[1] == "and" and pair[0] != pair[2] and {pair[0], pair[2]} <= {"a", "b", "c"}  # no repeats
        assert d.endswith(" always {x|y}")  # weight 0 never; escaped braces and bars are text
    ranged = {draw("{1-2$$a|b|c}", s, cards) for s in range(60)}
    assert {len(r.split(", ")) for r in ranged} == {1, 2} and "a, b, c" not in ranged
    assert {draw("{-$$a|b}", s, cards) for s in range(30)} >= {"a", "b", "a, b", "b, a"}
    assert draw("{5$$a|b}", 1, cards) in ("a, b", "b, a")  # asking more than there are gives all
    assert not has_syntax("a red circle <lora:x:0.8> (red:1.2) [a:b:5] AND c") and has_syntax("{a|b}")


def test_wildcard_files_folders_globs_and_structured_lists(cards):
    assert cards.names() == ["animals/pets", "animals/wild", "colour", "mood",
                             "shapes/round", "shapes/sharp", "thing"]
    assert {draw("__shapes/*__", s, cards) for s in range(30)} == {"circle", "square", "triangle"}
    assert {draw("__sharp__", s, cards) for s in range(20)} == {"square", "triangle"}  # found in its folder
    assert {draw("__animals/*__", s, cards) for s in range(30)} == {"cat", "dog", "fox"}
    assert {draw("__PETS__", s, cards) for s in range(20)} == {"cat", "dog"}  # names match up to case
    assert draw("__thing__", 3, cards).endswith(" circle")  # a line naming another wildcard
    two = {draw("{2$$__animals/*__}", s, cards) for s in range(40)}
    assert all(len(set(t.split(", "))) == 2 for t in two)  # two different lines of the files


def test_every_combination_in_order_up_to_the_limit(cards):
    got, more = every("I {love|hate} {a|b} __colour__", cards, 100)
    assert not more and len(got) == 16 and got[:5] == ["I love a red", "I love a green", "I love a blue",
                                                       "I love a navy", "I love b red"]
    assert every("{1-2$$a|b|c}", cards, 10) == (["a", "b", "c", "a, b", "a, c", "b, c"], False)
    assert every("{a|b|c} {x|y}", cards, 4) == (["a x", "a y", "b x", "b y"], True)


def test_bad_templates_and_files_say_what_and_where(cards, tmp_path):
    with pytest.raises(ConfigError, match=r"no wildcard '__nope__' in .*wildcards .*it has: animals/pets"):
        draw("a __nope__", 1, cards)
    with pytest.raises(ConfigError, match=r"the choice '\{b\|c' has no closing '\}'"):
        draw("a {b|c", 1, cards)
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "me.txt").write_text("x __me__\n")
    with pytest.raises(ConfigError, match="nested more than 20 deep at '__me__'"):
        draw("__me__", 1, Wildcards.at(loop))
    (loop / "bad.yaml").write_text("a: [b\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        Wildcards.at(loop).names()
    with pytest.raises(ConfigError, match="no wildcard '__x__' in no wildcards folder"):
        draw("__x__", 1, Wildcards.at(None))


def test_plan_keeps_a_plain_request_and_splits_a_templated_one(cards):
    plain = GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=5, num_images=3)
    p = plan(plain, cards)
    assert p.requests == [plain] and p.templates == {} and not p.notes
    assert [(r.seed, r.num_images) for r in plan(plain, cards, fixed_seed=True).requests] == [(5, 1)] * 3
    req = GenerationRequest(prompt="a {red|green} circle", negative_prompt="__mood__", seed=5, num_images=4)
    p = plan(req, cards)
    assert [r.prompt for r in p.requests for _ in range(r.num_images)] == [draw(req.prompt, 5 + i, cards)
                                                                           for i in range(4)]
    assert [r.seed for r in p.requests] == [5 + sum(q.num_images for q in p.requests[:i])
                                            for i in range(len(p.requests))]
    assert p.templates == {"Template": "a {red|green} circle", "Negative Template": "__mood__"}
    every_one = plan(GenerationRequest(prompt="a {red|green} {circle|square}", seed=2, num_images=3), cards,
                     combinatorial=True, fixed_seed=True)
    assert [(r.prompt, r.seed) for r in every_one.requests] == [("a red circle", 2), ("a red square", 2),
                                                                ("a green circle", 2)]
    assert "more than 3 combinations" in every_one.notes[0]
    once, templates = draw_once(GenerationRequest(prompt="__colour__ {a|b}", seed=9, num_images=2), cards)
    assert once.prompt == draw("__colour__ {a|b}", 9, cards) and once.num_images == 2 and once.seed == 9
    assert templates == {"Template": "__colour__ {a|b}"}


def test_generate_draws_each_image_and_the_png_makes_it_again(tiny_sd1_dir, tmp_path, capsys, monkeypatch, cards):
    """Image i of a templated run is the image its drawn prompt makes alone at its seed; its PNG records that prompt
    and the template, and `--from-png` makes the same picture."""
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    args = ["--base", str(tiny_sd1_dir), "--steps", "2", "--device", "cpu", "--wildcards", str(cards.folder)]
    rc = main(["generate", *args, "--prompt", "a __colour__ {circle|square}, sharp", "--seed", "3",
               "--num-images", "3", "--out", str(tmp_path / "t.png")])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for i in range(3):
        params = parse_parameters(read_png_parameters(tmp_path / f"t-{i}.png"))
        assert params["Prompt"] == draw("a __colour__ {circle|square}, sharp", 3 + i, cards)
        assert params["Seed"] == str(3 + i) and params["Template"] == "a __colour__ {circle|square}, sharp"
        assert f"(seed {3 + i}): {params['Prompt']}" in out
        rc = main(["generate", *args, "--prompt", params["Prompt"], "--seed", str(3 + i),
                   "--out", str(tmp_path / f"alone-{i}.png")])
        assert rc == 0
        with Image.open(tmp_path / f"t-{i}.png") as a, Image.open(tmp_path / f"alone-{i}.png") as b:
            assert a.tobytes() == b.tobytes()
    rc = main(["generate", *args, "--from-png", str(tmp_path / "t-1.png"), "--out", str(tmp_path / "again.png")])
    assert rc == 0
    with Image.open(tmp_path / "t-1.png") as a, Image.open(tmp_path / "again.png") as b:
        assert a.tobytes() == b.tobytes()
    rc = main(["generate", *args, "--prompt", "a {red|blue} circle", "--combinatorial", "--fixed-seed",
               "--num-images", "4", "--seed", "1", "--out", str(tmp_path / "c.png")])
    assert rc == 0
    got = [parse_parameters(read_png_parameters(tmp_path / f"c-{i}.png")) for i in range(2)]
    assert [g["Prompt"] for g in got] == ["a red circle", "a blue circle"] and {g["Seed"] for g in got} == {"1"}
    assert not (tmp_path / "c-2.png").exists()  # two combinations: two images of the four asked
    rc = main(["generate", *args, "--prompt", "a __nope__", "--out", str(tmp_path / "n.png")])
    assert rc == 2 and "no wildcard '__nope__'" in capsys.readouterr().err


def test_grid_draws_one_prompt_for_every_tile(tiny_sd1_dir, tmp_path, capsys, monkeypatch, cards):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    rc = main(["grid", "--base", str(tiny_sd1_dir), "--steps", "2", "--device", "cpu", "--wildcards",
               str(cards.folder), "--prompt", "a __colour__ circle", "--seed", "4", "--cfgs", "2,5",
               "--out", str(tmp_path / "g.png")])
    assert rc == 0, capsys.readouterr().err
    params = parse_parameters(read_png_parameters(tmp_path / "g.png"))
    assert params["Prompt"] == draw("a __colour__ circle", 4, cards) and params["Template"] == "a __colour__ circle"


def test_generate_tab_draws_wildcards_and_every_combination(tmp_path, tiny_sd1_dir):
    """The Generate tab: the Wildcards picker lists the home's files and adds `__name__` to the prompt; Generate
    draws a prompt per image (listed under the gallery), or every combination, on one seed if asked."""
    from app.studio import Studio
    from app.ui import StudioUI
    from training.jobs import JobQueue

    studio = Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), queue=JobQueue(command=lambda *a: None),
                    device="cpu")
    ui = StudioUI(studio)
    ui.build()
    studio.wildcards_dir.mkdir(parents=True, exist_ok=True)
    (studio.wildcards_dir / "colour.txt").write_text("red\nblue\n", encoding="utf-8")
    assert ui.refresh_wildcards("gone")["choices"] == ["colour"]
    prompt = ui.insert_wildcard("a", "colour")
    assert prompt == "a __colour__"
    form = (f"{prompt} {{circle|square}}", "", 2, 3.0, 8, 0, 0, 4, "Euler", 1, 1.0, 0, "Latent", 0.7, None, 0.75,
            4, None, False)
    slots = (None, True, 1.0, False, 1.0, False, 0, 0) * 4
    gallery, files, params, seed, paths, warn, info = ui.generate_event(ui.base_names()[0], *form, True, True,
                                                                        -1, 0, False, 0, False, 0, *slots)
    prompts = [parse_parameters(read_png_parameters(p))["Prompt"] for p in paths]
    assert prompts == ["a red circle", "a red square", "a blue circle", "a blue square"]
    assert {parse_parameters(read_png_parameters(p))["Seed"] for p in paths} == {"8"}
    assert "4 prompt(s) drawn" in info and "- a blue square" in info
    gallery, files, params, seed, paths, warn, info = ui.generate_event(ui.base_names()[0], *form, False, False,
                                                                        -1, 0, False, 0, False, 0, *slots)
    got = [parse_parameters(read_png_parameters(p)) for p in paths]
    assert [g["Prompt"] for g in got] == [draw(form[0], 8 + i, studio.wildcards()) for i in range(4)]
    assert [g["Seed"] for g in got] == ["8", "9", "10", "11"]
    # with the variation seed: one seed, variation seeds counting up, as the accordion's boxes say
    *_, paths, warn, info = ui.generate_event(ui.base_names()[0], *form, False, False, 30, 0.2, False, 0, False, 0,
                                              *slots)
    got = [parse_parameters(read_png_parameters(p)) for p in paths]
    assert [(g["Seed"], g["Variation seed"], g["Variation seed strength"]) for g in got] == [
        ("8", str(30 + i), "0.2") for i in range(4)]
    out = ui.recall_form(read_png_parameters(paths[2]), ui.base_names()[0])
    assert out[-8:-5] == (32, 0.2, {"open": True, "__type__": "update"}) and out[0] == got[2]["Prompt"]
    assert out[-5] is False  # no Tiling recorded


def test_a_choice_between_adapters_gives_each_image_its_own(tiny_sd1_dir, tmp_path, capsys, monkeypatch, cards):
    """`{<lora:a:1>|<lora:b:1>}`: a common dynamic-prompts use, an adapter drawn per image. Each image is made with
    its own drawn adapter (as that tag alone makes it) and records it in `Lora hashes`."""
    from lora_helpers import make_lora
    from pipelines.adapters import lora_metadata, save_adapter
    from pipelines.base_models import load_base

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    lib = tmp_path / "home" / "loras"
    pipe = load_base(str(tiny_sd1_dir), device="cpu").pipe
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_adapter(make_lora(pipe, rank=4, seed=seed, std=2.0), lib / f"{name}.safetensors",
                     lora_metadata(family="sd1", rank=4, alpha=4, name=name))
    args = ["--base", str(tiny_sd1_dir), "--steps", "2", "--device", "cpu", "--wildcards", str(cards.folder),
            "--library", str(lib)]
    rc = main(["generate", *args, "--prompt", "a red circle {<lora:alpha:1>|<lora:beta:1>}", "--combinatorial",
               "--fixed-seed", "--num-images", "2", "--seed", "6", "--out", str(tmp_path / "pick.png")])
    assert rc == 0, capsys.readouterr().err
    for i, name in enumerate(("alpha", "beta")):
        params = parse_parameters(read_png_parameters(tmp_path / f"pick-{i}.png"))
        assert params["Prompt"] == f"a red circle <lora:{name}:1>" and params["Lora hashes"].startswith(f"{name}: ")
        assert main(["generate", *args, "--prompt", params["Prompt"], "--seed", "6",
                     "--out", str(tmp_path / f"alone-{name}.png")]) == 0
        with Image.open(tmp_path / f"pick-{i}.png") as a, Image.open(tmp_path / f"alone-{name}.png") as b:
            assert a.tobytes() == b.tobytes()
    with Image.open(tmp_path / "pick-0.png") as a, Image.open(tmp_path / "pick-1.png") as b:
        assert a.tobytes() != b.tobytes()  # the two adapters draw differently


def test_the_wildcards_command_lists_files_and_shows_what_a_template_draws(cards, capsys):
    assert main(["wildcards", "--wildcards", str(cards.folder)]) == 0
    out = capsys.readouterr().out
    assert "__colour__" in out and "__animals/pets__" in out and "__shapes/sharp__" in out
    assert main(["wildcards", "--wildcards", str(cards.folder), "--draw", "a __colour__ {x|y}", "--num", "3",
                 "--seed", "4"]) == 0
    assert capsys.readouterr().out.split("\n")[:3] == [draw("a __colour__ {x|y}", 4 + i, cards) for i in range(3)]
    assert main(["wildcards", "--wildcards", str(cards.folder), "--draw", "{a|b|c}", "--num", "2",
                 "--combinatorial"]) == 0
    got = capsys.readouterr()
    assert got.out.split() == ["a", "b"] and "more than 2 combinations" in got.err
    assert main(["wildcards", "--wildcards", str(cards.folder), "--draw", "__nope__"]) == 2
