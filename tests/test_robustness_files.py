"""Hostile and broken weight/image files: clear errors that name the file, bounded memory, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.errors import CorruptWeightsError, PickleRefusedError
from pipelines.weights_io import load_safetensors, read_header, save_safetensors
from training.dataset import check_image


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048))
def test_random_bytes_never_load_and_name_the_file(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    with pytest.raises((CorruptWeightsError, FileNotFoundError)) as e:
        load_safetensors(path)
    assert "fuzz.safetensors" in str(e.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(min_value=1, max_value=2**62), shape=st.lists(st.integers(0, 2**31), min_size=1, max_size=4),
       dtype=st.sampled_from(["F32", "F16", "I64", "BF16", "XX"]))
def test_headers_claiming_huge_sizes_are_refused_without_allocating(tmp_path, n, shape, dtype):
    before = _rss_mb()
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, n]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CorruptWeightsError, match="huge.safetensors"):
        load_safetensors(path)
    assert _rss_mb() - before < 200


def test_header_length_claiming_gigabytes(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 8 * 1024**3) + b"{}")
    with pytest.raises(CorruptWeightsError, match="big.safetensors.*header claims"):
        read_header(path)


def test_pickle_renamed_to_safetensors_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptWeightsError, match="model.safetensors"):
        load_safetensors(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_adapter_refused_without_allow_and_code_never_runs(tmp_path, suffix):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"lora{suffix}"
    torch.save({"x": Evil()}, path)
    with pytest.raises(PickleRefusedError, match="only .safetensors is accepted unless --allow-pickle"):
        load_safetensors(path)
    assert not marker.exists()
    # even when allowed, only weights-only unpickling is used: the payload still cannot run
    with pytest.raises(CorruptWeightsError):
        load_safetensors(path, allow_pickle=True)
    assert not marker.exists()


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors({"a": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptWeightsError, match="t.safetensors.*truncated"):
        load_safetensors(path)


def test_non_finite_tensors_refused_on_save_and_load(tmp_path):
    path = tmp_path / "n.safetensors"
    with pytest.raises(CorruptWeightsError, match="NaN"):
        save_safetensors({"a": torch.tensor([1.0, float("nan")])}, path)
    assert not path.exists()
    from safetensors.torch import save_file

    save_file({"a": torch.tensor([1.0, float("inf")])}, str(path))
    with pytest.raises(CorruptWeightsError, match="n.safetensors.*'a'"):
        load_safetensors(path, check_finite=True)


def test_sigkill_while_writing_keeps_previous_file(tmp_path):
    """A writer killed mid-write never leaves a half-written file under the real name."""
    path = tmp_path / "adapter.safetensors"
    save_safetensors({"w": torch.ones(4)}, path, {"version": "1"})
    script = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from pipelines.weights_io import save_safetensors
        big = {{f"w{{i}}": torch.randn(1024, 1024) for i in range(64)}}  # 256 MB: slow enough to interrupt
        print("writing", flush=True)
        while True:
            save_safetensors(big, {str(path)!r}, {{"version": "2"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    import time

    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sd, meta = load_safetensors(path)  # whichever version is there, it is whole
    assert meta["version"] in ("1", "2")
    assert ("w" in sd) == (meta["version"] == "1")


def test_enospc_while_saving_is_a_clear_error_and_keeps_old_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    path = tmp_path / "a.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_safetensors(path)[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=4096), ext=st.sampled_from([".png", ".jpg", ".gif", ".webp", ".bmp"]))
def test_image_loader_fuzz_rejects_cleanly(tmp_path, data, ext):
    path = tmp_path / f"x{ext}"
    path.write_bytes(data)
    try:
        w, h = check_image(path)
    except ValueError as e:
        assert str(e)
    else:
        assert w >= 8 and h >= 8
