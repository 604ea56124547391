"""The `lora-studio` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from app.cli import main
from pipelines.generation import parse_parameters


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout


def test_generate_writes_png_with_parameters(tiny_sd1_dir, tmp_path, capsys):
    out = tmp_path / "circle.png"
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "a red circle", "--steps", "3", "--seed", "9",
               "--scheduler", "ddim", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    with Image.open(out) as im:
        p = parse_parameters(im.info["parameters"])
    assert p["Seed"] == "9" and p["Sampler"] == "DDIM" and p["Prompt"] == "a red circle"


def test_generate_missing_base_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "--base", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert rc == 2
    assert "missing" in capsys.readouterr().err


def test_commands_print_no_library_noise(tmp_path):
    """diffusers imports torchao (an optional extra) at start-up, which logs each CUDA kernel it cannot load
    on this machine; a user running a command sees only what the command says."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "app.cli", "loras"], capture_output=True, text=True, cwd=root,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("no adapters in")
    assert out.stderr == ""


def test_the_app_server_stops_on_sigterm(tmp_path):
    """`kill`, systemd and `docker stop` send SIGTERM: the app closes as it does on Ctrl-C."""
    import os
    import signal
    import socket
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path)}
    import queue
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ui", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()  # drained always
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # the app is up once it says where to open it
            try:
                if "Open http" in lines.get(timeout=1):
                    break
            except queue.Empty:
                assert proc.poll() is None, "the app ended before it served"
        else:
            pytest.fail("the app did not start serving within 4 minutes")
        assert proc.poll() is None, "the app ended before it served"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_run_refused_before_it_began_leaves_no_run_folder(tmp_path, capsys):
    lib = tmp_path / "lib"
    assert main(["train", "--images", str(tmp_path / "nowhere"), "--name", "t1", "--library", str(lib)]) == 2
    assert "image folder not found" in capsys.readouterr().err
    assert not (lib / "runs" / "t1").exists()


def _train_config_error(tmp_path, capsys, data: bytes | None, *extra: str) -> tuple[str, str]:
    """`lora-studio train --config FILE ...` with a bad FILE: exit status 2 and the one line it prints."""
    cfg = tmp_path / "run.toml"
    if data is not None:
        cfg.write_bytes(data)
    rc = main(["train", "--config", str(cfg if data is not None else tmp_path), *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "Traceback" not in err and err.count("\n") == 1, err
    return str(cfg if data is not None else tmp_path), err.strip()


@pytest.mark.parametrize("data,msg", [
    (b'images = "x"\nrandom_flip = "no"\n', "random_flip: must be true or false, got 'no'"),
    (b'images = "x"\nseed = "abc"\n', "seed: must be a whole number, got 'abc'"),
    (b'images = "x"\nunet_targets = "to_q"\n', "unet_targets: must be a list of strings, got 'to_q'"),
    (b'images = "x"\nlr_unet = inf\n', "lr_unet: must be a finite number, got inf"),
    (b'images = "x"\ndevice = "tpu"\n', "device: 'tpu' is not a device name torch knows"),
    (b"train = 5\n", "train: must be a [train] table of options, got 5"),
    (b'images = "caf\xe9"\n', "not UTF-8 text"),
    (None, "is a folder, not a config file"),
])
def test_train_config_errors_are_one_line_naming_file_and_field(data, msg, tmp_path, capsys):
    path, line = _train_config_error(tmp_path, capsys, data)
    assert line.startswith(f"error: {path}: {msg}"), line


def test_train_option_error_is_not_blamed_on_the_config_file(tmp_path, capsys):
    _, line = _train_config_error(tmp_path, capsys, b'images = "x"\n', "--rank", "0")
    assert line == "error: rank: must be a whole number between 1 and 1024, got 0"
