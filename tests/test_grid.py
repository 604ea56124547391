"""Comparison grids: one prompt and seed across weights, adapters or a run's checkpoints, as one labelled PNG."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from lora_helpers import make_lora
from PIL import Image

from app.cli import main
from pipelines.adapters import lora_metadata, save_adapter
from pipelines.base_models import load_base
from pipelines.errors import ConfigError, UnsafeNameError
from pipelines.generation import GenerationRequest, parse_parameters, read_png_parameters
from pipelines.grid import (
    adapter_columns,
    checkpoint_columns,
    make_grid,
    run_checkpoints,
    start_columns,
    weight_columns,
)
from pipelines.library import AdapterLibrary
from pipelines.stack import AdapterStack, StackEntry, parse_lora_hashes
from pipelines.weights_io import save_safetensors

WEIGHTS = [0, 0.5, 1.0]
STEPS = (5, 10, 200)  # numeric order differs from the names' text order (step-10 < step-200 < step-5)


def _req(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "steps": 2, "seed": 11, "scheduler": "DDIM", **kw})


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


@pytest.fixture(scope="module")
def lib(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid_lib")
    save_adapter(make_lora(sd1.pipe, rank=4, seed=1, std=1.0), root / "a.safetensors",
                 lora_metadata(family="sd1", rank=4, alpha=4))
    save_adapter(make_lora(sd1.pipe, rank=4, seed=2, std=1.0), root / "b.safetensors",
                 lora_metadata(family="sd1", rank=4, alpha=4))
    # a training run as the trainer leaves it: checkpoints/step-N/adapter.safetensors (+ state.pt)
    ck = root / "runs" / "myrun" / "checkpoints"
    for i, step in enumerate(STEPS):
        d = ck / f"step-{step}"
        d.mkdir(parents=True)
        save_safetensors(make_lora(sd1.pipe, rank=4, seed=10 + i, std=0.5 + i), d / "adapter.safetensors",
                         {"step": str(step)})
        (d / "state.pt").write_bytes(b"")
    (ck / "step-7").mkdir()  # an incomplete checkpoint (no adapter file): skipped
    (ck / ".step-300.tmp").mkdir()  # a half-written one: skipped
    return AdapterLibrary(root)


@pytest.fixture
def stack(sd1, lib):
    st = AdapterStack(sd1, lib)
    yield st
    st.unload()


def _crop_tiles(result, n_rows: int = 1) -> list[list[np.ndarray]]:
    """Cut the grid's bottom-right block back into cells (labels sit above the columns)."""
    img = np.asarray(result.image)
    ncols = len(result.columns)
    cw = result.image.width // ncols  # no row labels with one row
    ch = cw * result.tiles[0][0].image.height // result.tiles[0][0].image.width
    top = result.image.height - n_rows * ch
    return [[img[top + r * ch: top + (r + 1) * ch, c * cw:(c + 1) * cw] for c in range(ncols)] for r in range(n_rows)]


def test_weight_grid_tiles_labels_and_weight_zero_is_the_base(stack):
    result = make_grid(stack, _req(), weight_columns("a", WEIGHTS), axis="a weight")
    assert [c.label for c in result.columns] == ["a 0", "a 0.5", "a 1"]
    assert len(result.tiles) == 3 and all(len(col) == 1 for col in result.tiles)
    tile = result.tiles[0][0].image
    assert all(col[0].image.size == tile.size == (32, 32) for col in result.tiles)
    # one image: tiles side by side (enlarged to stay readable), with a label band on top
    scale = result.image.width // (3 * tile.width)
    assert scale >= 1 and result.image.width == 3 * tile.width * scale
    assert result.image.height > tile.height * scale
    base = stack.generate(_req())[0].image
    assert np.array_equal(np.asarray(result.tiles[0][0].image), np.asarray(base))  # weight 0 == no adapter
    assert not np.array_equal(np.asarray(result.tiles[2][0].image), np.asarray(base))
    cells = _crop_tiles(result)[0]
    enlarged = np.asarray(base.resize((tile.width * scale, tile.height * scale), Image.NEAREST))
    assert np.array_equal(cells[0], enlarged)  # the grid shows the tiles themselves, in column order
    label_band = np.asarray(result.image)[: result.image.height - tile.height * scale]
    assert (label_band < 128).any()  # dark label text drawn on the white band
    # the PNG parameters describe the grid, and each tile carries its own reproducible parameters
    p = parse_parameters(result.parameters)
    assert p["Prompt"] == "a red circle" and p["Seed"] == "11" and p["Size"] == "32x32"
    assert p["Grid"] == "a weight: a 0 | a 0.5 | a 1"
    assert p["Grid stacks"] == "<lora:a:0> | <lora:a:0.5> | <lora:a:1>"
    assert set(parse_lora_hashes(p["Lora hashes"])) == {"a"}
    assert parse_parameters(result.tiles[1][0].parameters)["Prompt"] == "a red circle <lora:a:0.5>"
    assert stack.reads == 1  # one file read for the whole grid


def test_start_step_grid_keeps_the_rows_weights_and_switches_the_unet_part(stack):
    others = [StackEntry("a", 0.7, 0.4), StackEntry("b", 0.5)]
    result = make_grid(stack, _req(), start_columns("a", [0, 1, 2], others), axis="a acting")
    assert [c.label for c in result.columns] == ["every step", "from step 1", "from step 2"]
    p = parse_parameters(result.parameters)
    assert p["Grid stacks"] == ("<lora:b:0.5> <lora:a:0.4:0.7> | <lora:b:0.5> <lora:a:0.4:0.7:start=1> | "
                                "<lora:b:0.5> <lora:a:0.4:0.7:start=2>")
    tiles = [np.asarray(col[0].image) for col in result.tiles]
    full = np.asarray(stack.generate(_req(), [StackEntry("b", 0.5), StackEntry("a", 0.7, 0.4)])[0].image)
    unet_off = np.asarray(stack.generate(_req(), [StackEntry("b", 0.5), StackEntry("a", 0.0, 0.4)])[0].image)
    assert np.array_equal(tiles[0], full) and np.array_equal(tiles[2], unet_off)  # 2 steps: from 2 = never
    assert not np.array_equal(tiles[1], full) and not np.array_equal(tiles[1], unet_off)
    with pytest.raises(ConfigError, match="at least one start step"):
        start_columns("a", [])


def test_weight_grid_keeps_the_rows_step_range_and_text_encoder_weight(stack):
    others = [StackEntry("a", 0.3, 0.4, start=1), StackEntry("b", 0.5)]
    result = make_grid(stack, _req(), weight_columns("a", [0, 1], others), axis="a weight")
    p = parse_parameters(result.parameters)
    assert p["Grid stacks"] == "<lora:b:0.5> <lora:a:0.4:0:start=1> | <lora:b:0.5> <lora:a:0.4:1:start=1>"
    ranged = stack.generate(_req(), [StackEntry("b", 0.5), StackEntry("a", 1.0, 0.4, start=1)])[0].image
    every = stack.generate(_req(), [StackEntry("b", 0.5), StackEntry("a", 1.0, 0.4)])[0].image
    tile = np.asarray(result.tiles[1][0].image)
    assert np.array_equal(tile, np.asarray(ranged)) and not np.array_equal(tile, np.asarray(every))
    # 'b' is in every tile alike: no column says so, so a title line over the grid does
    alone = make_grid(stack, _req(), weight_columns("a", [0, 1], others[:1]), axis="a weight")
    assert result.image.width == alone.image.width and result.image.height > alone.image.height
    band = np.asarray(result.image)[: result.image.height - alone.image.height]
    assert (band < 128).any()  # dark text on the title band


def test_adapters_grid_with_prompt_tags_and_several_seeds(stack):
    req = _req(prompt="<lora:b:0.3> a red circle", num_images=2)
    result = make_grid(stack, req, adapter_columns(["a", "b"], 0.8))
    assert [c.label for c in result.columns] == ["a", "b"]
    assert [len(col) for col in result.tiles] == [2, 2] and result.tiles[0][1].seed == 12
    p = parse_parameters(result.parameters)
    # the prompt's tag applies to every column, except where the column sets that adapter itself
    assert p["Grid stacks"] == "<lora:b:0.3> <lora:a:0.8> | <lora:b:0.8>"
    assert set(parse_lora_hashes(p["Lora hashes"])) == {"a", "b"}
    tile = result.tiles[0][0].image
    assert result.image.height > 2 * tile.height and result.image.width > 2 * tile.width  # row labels too


def test_checkpoints_are_found_in_step_order(stack, lib):
    found = run_checkpoints(lib.root, "myrun")
    assert [s for s, _ in found] == sorted(STEPS)
    assert all(p.name == "adapter.safetensors" and p.parent.name == f"step-{s}" for s, p in found)
    cols = checkpoint_columns(stack, "myrun", 0.9)
    assert [c.label for c in cols] == ["step 5", "step 10", "step 200"]  # no finished adapter in the library
    assert [c.entries[0].name for c in cols] == ["myrun@step-5", "myrun@step-10", "myrun@step-200"]
    assert all(c.entries[0].weight == 0.9 for c in cols)
    result = make_grid(stack, _req(), cols, axis="myrun checkpoint")
    imgs = [np.asarray(col[0].image) for col in result.tiles]
    assert len(imgs) == 3 and not np.array_equal(imgs[0], imgs[2])
    # the run's adapter switched on in a row: its checkpoints take its place, with the row's weight and range
    rows = [StackEntry("myrun", 0.6, start=1), StackEntry("a", 0.5)]
    cols = checkpoint_columns(stack, "myrun", others=rows)
    assert [c.entries for c in cols][0] == (StackEntry("a", 0.5), StackEntry("myrun@step-5", 0.6, start=1))
    result = make_grid(stack, _req(), cols, axis="myrun checkpoint")
    assert parse_parameters(result.parameters)["Grid stacks"].startswith(
        "<lora:a:0.5> <lora:myrun@step-5:0.6:start=1> |")
    with pytest.raises(FileNotFoundError, match="nope"):
        run_checkpoints(lib.root, "nope")
    with pytest.raises(UnsafeNameError):
        run_checkpoints(lib.root, "../runs")


def test_bad_requests(stack):
    with pytest.raises(ConfigError, match="weight"):
        weight_columns("a", [])
    with pytest.raises(ConfigError, match="between -10 and 10"):
        weight_columns("a", [0, 11])
    with pytest.raises(ConfigError, match="no columns"):
        make_grid(stack, _req(), [])


def test_cli_grid_modes(tiny_sd1_dir, lib, tmp_path, capsys):
    common = ["grid", "--base", str(tiny_sd1_dir), "--device", "cpu", "--library", str(lib.root), "--prompt",
              "a blue square", "--steps", "1", "--seed", "3", "--scheduler", "ddim"]
    out = tmp_path / "w.png"
    assert main(common + ["--lora", "a", "--weights", "0,1", "--out", str(out)]) == 0
    p = parse_parameters(read_png_parameters(out))
    assert p["Grid stacks"] == "<lora:a:0> | <lora:a:1>" and p["Seed"] == "3"
    assert "2 tiles" in capsys.readouterr().out
    out = tmp_path / "l.png"
    assert main(common + ["--loras", "a,b", "--weight", "0.5", "--out", str(out)]) == 0
    assert parse_parameters(read_png_parameters(out))["Grid stacks"] == "<lora:a:0.5> | <lora:b:0.5>"
    out = tmp_path / "c.png"
    assert main(common + ["--checkpoints", "myrun", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width % 3 == 0 and im.height > im.width // 3  # three square tiles under a label band
    assert "step 5 | step 10 | step 200" in parse_parameters(read_png_parameters(out))["Grid"]
    out = tmp_path / "s.png"
    assert main(common + ["--lora", "a", "--starts", "0,1", "--weight", "0.8", "--out", str(out)]) == 0
    assert parse_parameters(read_png_parameters(out))["Grid stacks"] == "<lora:a:0.8> | <lora:a:0.8:start=1>"
    assert main(common + ["--lora", "a:0.6", "--starts", "0,1", "--out", str(out)]) == 0  # the weight given there
    assert parse_parameters(read_png_parameters(out))["Grid stacks"] == "<lora:a:0.6> | <lora:a:0.6:start=1>"
    assert main(common + ["--lora", "a:1:start=1", "--weights", "0,1", "--out", str(out)]) == 0
    p = parse_parameters(read_png_parameters(out))
    assert p["Grid stacks"] == "<lora:a:0:start=1> | <lora:a:1:start=1>"
    assert p["Grid"].startswith("a weight acting from step 1:")
    capsys.readouterr()
    assert main(common + ["--loras", "a,b", "--starts", "0,1", "--out", str(out)]) == 2
    assert "--starts varies one adapter" in capsys.readouterr().err
    assert main(common + ["--lora", "a", "--weights", "0,x", "--out", str(out)]) == 2
    assert "--weights" in capsys.readouterr().err


def test_long_column_titles_wrap_inside_their_column():
    from PIL import Image

    from pipelines.grid import image_grid

    cells = [[Image.new("RGB", (64, 64), "gray")] * 3]
    labels = ["outline-style-v2@step-000600 weight 0.8", "a-very-long-adapter-name-without-spaces-at-all", "final"]
    short = image_grid(cells, ["a", "b", "c"])
    grid = image_grid(cells, labels)
    cw = grid.width // 3
    band = grid.height - 64 * (cw // 64)  # the title band above the images
    assert band > short.height - 64 * (cw // 64)  # more than one line of title
    px = grid.load()
    for x in (cw - 1, cw, 2 * cw - 1, 2 * cw):  # the column boundaries stay clear: no title runs into the next
        assert all(px[x, y] == (255, 255, 255) for y in range(band)), x


def test_a_hires_grid_counts_its_progress_and_records_the_first_pass_size(stack):
    """With a Hires fix each tile runs two passes: the progress counts all their steps to the end, and the
    grid's parameters keep A1111's first-pass Size (the tiles are the enlarged pictures)."""
    seen: list[tuple[int, int]] = []
    result = make_grid(stack, _req(hires_scale=1.5, hires_steps=3, denoising_strength=0.5),
                       weight_columns("a", [0, 1]), on_progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2 * (2 + 3), 2 * (2 + 3)) and all(d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.tiles[0][0].image.size == (48, 48)
    assert parse_parameters(result.parameters)["Size"] == "32x32"


def test_a_settings_axis_varies_cfg_steps_or_sampler_with_the_adapters_fixed(stack):
    """A1111's X/Y plot over CFG scale, steps or sampler: each tile is exactly the image made alone with that
    setting (the prompt's adapter in every tile), labelled, and the parameters name each column's setting."""
    from pipelines.grid import setting_columns

    req = _req(prompt="a red circle <lora:a:0.7>")
    result = make_grid(stack, req, setting_columns("guidance", [3, 7.5]), axis="CFG scale")
    assert [c.label for c in result.columns] == ["CFG 3", "CFG 7.5"]
    for col, cfg in zip(result.tiles, (3.0, 7.5)):
        alone = stack.generate(dataclasses.replace(req, guidance=cfg))[0].image
        assert np.array_equal(np.asarray(col[0].image), np.asarray(alone))
    p = parse_parameters(result.parameters)
    assert p["Grid settings"] == "CFG scale 3 | CFG scale 7.5" and p["Grid stacks"] == "<lora:a:0.7> | <lora:a:0.7>"
    seen: list[tuple[int, int]] = []
    steps = make_grid(stack, req, setting_columns("steps", ["1", 3]), on_progress=lambda d, t: seen.append((d, t)))
    assert [c.label for c in steps.columns] == ["1 steps", "3 steps"] and seen[-1] == (4, 4)
    samplers = make_grid(stack, req, setting_columns("scheduler", ["euler_a", "DDIM"]))
    assert [c.label for c in samplers.columns] == ["Euler a", "DDIM"]
    assert "Sampler: Euler a" in samplers.tiles[0][0].parameters
    with pytest.raises(ConfigError, match="guidance: must be between 0 and 50"):
        make_grid(stack, req, setting_columns("guidance", [3, 99]))
    with pytest.raises(ConfigError, match="scheduler: unknown 'warp'"):
        setting_columns("scheduler", ["warp"])


def test_prompt_sr_swaps_a_word_in_both_prompts_and_in_lora_tags(stack, tmp_path):
    """A1111's Prompt S/R axis: the first value is found in the prompt and each column swaps it (in the negative
    prompt too, and inside <lora:…> tags, so "a:0.7" -> "b:0.7" compares two adapters); each tile is the image
    made alone with its prompt."""
    from pipelines.grid import prompt_sr_columns, split_values

    req = _req(prompt="a red circle <lora:a:0.7>", negative_prompt="red blur")
    result = make_grid(stack, req, prompt_sr_columns(["red", "blue"], req.prompt, req.negative_prompt),
                       axis="Prompt S/R")
    assert [c.label for c in result.columns] == ["red", "blue"]
    alone = stack.generate(dataclasses.replace(req, prompt="a blue circle <lora:a:0.7>", negative_prompt="blue blur"))
    assert np.array_equal(np.asarray(result.tiles[1][0].image), np.asarray(alone[0].image))
    assert not np.array_equal(np.asarray(result.tiles[0][0].image), np.asarray(alone[0].image))
    p = parse_parameters(result.parameters)
    assert p["Grid"] == "Prompt S/R: red / blue".replace(" / ", " | ") and "Grid settings" not in p
    tags = make_grid(stack, req, prompt_sr_columns(["a:0.7", "b:0.7"], req.prompt))
    assert parse_parameters(tags.parameters)["Grid stacks"] == "<lora:a:0.7> | <lora:b:0.7>"
    with pytest.raises(ConfigError, match="'green' .* is not in the prompt"):
        prompt_sr_columns(["green", "blue"], req.prompt, req.negative_prompt)
    with pytest.raises(ConfigError, match="then what to swap it for"):
        prompt_sr_columns(["red"], req.prompt)
    assert split_values('"red, glossy", blue ,  green') == ["red, glossy", "blue", "green"]
    # the CLI's --prompt-sr
    out = tmp_path / "sr.png"
    assert main(["grid", "--base", str(stack.model.source), "--library", str(stack.library.root), "--prompt",
                 "a red circle", "--steps", "2", "--prompt-sr", "red,green", "--out", str(out)]) == 0
    assert parse_parameters(read_png_parameters(out))["Grid"] == "Prompt S/R: red | green"


def test_a_second_axis_checkpoints_by_weights_and_settings(stack, lib, tiny_sd1_dir, tmp_path, capsys):
    """A1111's X/Y plot: rows are a second axis. Checkpoints x weights, the grid LoRA trainers make most: each tile is
    the checkpoint at its row's weight, the same picture as that stack alone; rows and columns are labelled and the
    parameters name both axes."""
    from pipelines.grid import setting_columns, weight_rows

    cols = checkpoint_columns(stack, "myrun")
    result = make_grid(stack, _req(), cols, axis="myrun checkpoint", rows=weight_rows([0.5, 1.0]), row_axis="weight")
    p = parse_parameters(result.parameters)
    assert p["Grid rows"] == "weight: weight 0.5 | weight 1"
    assert p["Grid stacks"].split(" | ")[:4] == ["<lora:myrun@step-5:0.5>", "<lora:myrun@step-10:0.5>",
                                                 "<lora:myrun@step-200:0.5>", "<lora:myrun@step-5:1>"]
    alone = stack.generate(_req(), [StackEntry("myrun@step-10", 0.5)])[0].image
    assert np.array_equal(np.asarray(result.tiles[1][0].image), np.asarray(alone))
    assert len(result.tiles) == 6  # row by row: step 5 at 0.5 … step 200 at 1
    assert not np.array_equal(np.asarray(result.tiles[0][0].image), np.asarray(result.tiles[3][0].image))
    one_row = make_grid(stack, _req(), cols, axis="myrun checkpoint", rows=weight_rows([1.0]), row_axis="weight")
    assert result.image.height > one_row.image.height  # a second row of tiles
    # settings on both axes combine; the same setting on both, or weights over setting columns, is refused
    both = make_grid(stack, _req(), setting_columns("guidance", [2, 6]), axis="CFG scale",
                     rows=setting_columns("steps", [1, 2]), row_axis="Steps")
    assert parse_parameters(both.parameters)["Grid settings"].split(" | ")[3] == "CFG scale 6; Steps 2"
    with pytest.raises(ConfigError, match="the columns vary guidance already"):
        make_grid(stack, _req(), setting_columns("guidance", [2, 6]), rows=setting_columns("guidance", [1]))
    with pytest.raises(ConfigError, match="weights vary the adapter each column compares"):
        make_grid(stack, _req(), setting_columns("guidance", [2, 6]), rows=weight_rows([0.5]))
    with pytest.raises(ConfigError, match="set the number of images to 1"):
        make_grid(stack, _req(num_images=2), cols, rows=weight_rows([0.5]))
    # the CLI: --checkpoints with --rows-weights
    rc = main(["grid", "--base", str(tiny_sd1_dir), "--library", str(lib.root), "--prompt", "a red circle",
               "--steps", "2", "--seed", "11", "--scheduler", "DDIM", "--checkpoints", "myrun", "--rows-weights",
               "0.5,1", "--out", str(tmp_path / "xy.png"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    saved = parse_parameters(read_png_parameters(tmp_path / "xy.png"))
    assert saved["Grid rows"] == "weight: weight 0.5 | weight 1"
    assert main(["grid", "--base", str(tiny_sd1_dir), "--library", str(lib.root), "--prompt", "x", "--lora", "a",
                 "--rows-weights", "0.5", "--out", str(tmp_path / "n.png")]) == 2


def test_a_third_axis_makes_one_xy_grid_per_value(stack, lib, tiny_sd1_dir, tmp_path, capsys):
    """A1111's X/Y/Z plot: for each value of the third axis, the X/Y grid with that value in every tile, the grids
    one under the other; each tile is the picture its three settings make alone, and `Grid z` names the axis."""
    from pipelines.grid import setting_columns, weight_rows

    cols = checkpoint_columns(stack, "myrun")[:2]
    zs = setting_columns("guidance", [2, 6])
    result = make_grid(stack, _req(), cols, axis="myrun checkpoint", rows=weight_rows([0.5, 1.0]), row_axis="weight",
                       zs=zs, z_axis="CFG scale")
    p = parse_parameters(result.parameters)
    assert p["Grid z"] == "CFG scale: CFG 2 | CFG 6" and p["Grid rows"] == "weight: weight 0.5 | weight 1"
    assert len(result.tiles) == 8 and "Grid interrupted" not in p
    # the last tile: the second checkpoint at weight 1 and CFG 6, as that stack and setting make it alone
    alone = stack.generate(_req(guidance=6.0), [StackEntry("myrun@step-10", 1.0)])[0].image
    assert np.array_equal(np.asarray(result.tiles[-1][0].image), np.asarray(alone))
    assert not np.array_equal(np.asarray(result.tiles[0][0].image), np.asarray(result.tiles[4][0].image))
    xy = make_grid(stack, _req(), cols, rows=weight_rows([0.5, 1.0]))
    assert result.image.height > 2 * xy.image.height - 40 and result.image.width > xy.image.width  # + a label column
    with pytest.raises(ConfigError, match="z: the columns vary guidance already; choose another third axis"):
        make_grid(stack, _req(), setting_columns("guidance", [2, 6]), zs=setting_columns("guidance", [1]))
    with pytest.raises(ConfigError, match="z: the rows vary weight already; choose another third axis"):
        make_grid(stack, _req(), cols, rows=weight_rows([0.5]), zs=weight_rows([1.0]))
    # the CLI: --z-samplers; with --rows-weights and --z-weights both, refused
    rc = main(["grid", "--base", str(tiny_sd1_dir), "--library", str(lib.root), "--prompt", "a red circle",
               "--steps", "2", "--seed", "11", "--scheduler", "DDIM", "--loras", "a,b", "--z-samplers", "DDIM,Euler",
               "--out", str(tmp_path / "xyz.png"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert parse_parameters(read_png_parameters(tmp_path / "xyz.png"))["Grid z"] == "Sampler: DDIM | Euler"
    assert "4 tiles" in capsys.readouterr().out
    assert main(["grid", "--base", str(tiny_sd1_dir), "--library", str(lib.root), "--prompt", "x", "--checkpoints",
                 "myrun", "--rows-weights", "0.5", "--z-weights", "1", "--out", str(tmp_path / "n.png")]) == 2
