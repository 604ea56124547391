"""kohya's sample prompt options (--n, --w, --h, --d, --s, --l, --ss) on the run's sample images."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import ConfigError
from training.config import TrainConfig
from training.sample_prompts import SamplePrompt, parse_sample_prompt


def test_a_kohya_line_reads_as_kohya_reads_it():
    got = parse_sample_prompt("a sks dog, best quality --n lowres, bad anatomy --w 64 --h 48 --d 7 --s 5 --l 4.5 "
                              "--ss k_euler_a")
    assert got == SamplePrompt("a sks dog, best quality", "lowres, bad anatomy", 64, 48, 7, 5, 4.5, "Euler a")
    assert parse_sample_prompt("a sks dog") == SamplePrompt("a sks dog")
    assert parse_sample_prompt("a dog --ss DPM++ 2M Karras --S 9").steps == 9  # options in any case, as kohya


@pytest.mark.parametrize("line, why", [
    ("a dog --cn pose.png", "--cn is a ControlNet image, an option kohya has for other models"),
    ("a dog --cfg 7", "unknown option --cfg (kohya's sample prompt options: --n negative prompt"),
    ("a dog --w 65", "--w must be a width (a multiple of 8), got '65'"),
    ("a dog --d", "--d needs a value"),
    ("a dog --ss fastest", "unknown sampler 'fastest'"),
])
def test_a_bad_option_is_refused_by_name_when_the_run_is_set_up(line, why):
    with pytest.raises(ConfigError, match="sample_prompts: 'a dog") as e:
        TrainConfig(images=".", sample_prompts=["a cat", line])
    assert why in str(e.value)


def test_the_samples_are_drawn_with_each_prompts_options(star_images, tiny_sd1_dir, tmp_path):
    from pipelines.generation import parse_parameters, read_png_parameters
    from training.trainer import train

    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), max_steps=1,
                      batch_size=2, device="cpu", name="s", rank=2, weight_check=False, sample_sampler="euler",
                      sample_prompts=["a sks --n blurry, lowres --w 48 --h 32 --d 7 --s 3 --l 4.5 --ss ddim",
                                      "a red sks"], sample_steps=2, sample_seed=11)
    res = train(cfg)
    first, second = (parse_parameters(read_png_parameters(p)) for p in sorted(res.samples)[-2:])
    assert (first["Prompt"], first["Negative prompt"], first["Size"], first["Seed"], first["Steps"],
            first["CFG scale"], first["Sampler"]) == ("a sks", "blurry, lowres", "48x32", "7", "3", "4.5", "DDIM")
    assert (second["Prompt"], second["Size"], second["Seed"], second["Steps"], second["CFG scale"],
            second["Sampler"]) == ("a red sks", "32x32", "11", "2", "7", "Euler")
    assert "Negative prompt" not in second


def test_kohya_ss_configs_keep_the_options_and_say_what_they_leave_out(tmp_path):
    from training.kohya_gui import read_kohya_gui

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"sample_prompts": "# a comment\nohwx woman --n ugly --w 512 --cn pose.png --d 3\n",
                                "sample_sampler": "k_dpm_2_a", "network_dim": 8}))
    got = read_kohya_gui(path)
    assert got.options["sample_prompts"] == ["ohwx woman --n ugly --w 512 --d 3"]
    assert got.options["sample_sampler"] == "DPM2 a"
    assert any("sample prompt 'ohwx woman': --cn pose.png is not applied" in n for n in got.notes)


def test_a_kohya_prompt_file_adds_its_prompts_and_names_a_bad_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# kohya's prompt file\n\nohwx woman, smiling --n lowres --w 64 --d 3\nohwx woman in a hat\n")
    cfg = TrainConfig(images=".", sample_prompts=["a cat"], sample_prompts_file=str(path))
    assert cfg.all_sample_prompts() == ["a cat", "ohwx woman, smiling --n lowres --w 64 --d 3", "ohwx woman in a hat"]
    path.write_text("ohwx woman\nohwx man --cfg 7\n")
    with pytest.raises(ConfigError, match=r"sample_prompts_file: .*prompts.txt, line 2: unknown option --cfg"):
        TrainConfig(images=".", sample_prompts_file=str(path))
    with pytest.raises(ConfigError, match="kohya's .toml and .json prompt files are not read here"):
        TrainConfig(images=".", sample_prompts_file=str(tmp_path / "prompts.toml"))
    with pytest.raises(ConfigError, match="nothing.txt: cannot be read"):
        TrainConfig(images=".", sample_prompts_file=str(tmp_path / "nothing.txt"))


def test_the_weight_check_reads_the_prompt_not_its_options(star_images, tiny_sd1_dir, tmp_path):
    from training.trainer import Trainer
    from training.weight_check import check_prompts, trigger_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a blue circle --n blurry --w 48\na sks on white --d 4\n")
    tr = Trainer(TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"),
                             trigger="sks", sample_prompts_file=str(path), device="cpu"))
    tr.build()
    assert check_prompts(tr)[0] == "a blue circle" and trigger_prompts(tr) == ["a sks on white"]
