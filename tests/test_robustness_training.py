"""Training under failure: SIGKILL then resume, disk full, out of memory, queued jobs."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.errors import TrainingError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.jobs import JobQueue
from training.toy_world import draw, sample_spec
from training.trainer import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = random.Random(1)
    for i in range(4):
        draw(sample_spec(rng, shapes=["star"]), resolution=32).save(d / f"{i}.png")
    return d


def _cfg(images, base, lib, **kw):
    d = dict(images=str(images), base=str(base), output_dir=str(lib), max_steps=6, batch_size=2, device="cpu",
             sample_steps=2, name="k", rank=4, seed=5, checkpoint_every=1, checkpoints_keep=10)
    d.update(kw)
    return TrainConfig(**d)


def test_sigkill_mid_training_then_resume_matches_uninterrupted(images, tiny_sd1_dir, tmp_path):
    ref = train(_cfg(images, tiny_sd1_dir, tmp_path / "ref", max_steps=8))
    lib = tmp_path / "killed"
    cmd = [sys.executable, "-m", "app.cli", "train", "--images", str(images), "--base", str(tiny_sd1_dir),
           "--library", str(lib), "--steps", "8", "--batch-size", "2", "--device", "cpu", "--name", "k",
           "--rank", "4", "--seed", "5", "--checkpoint-every", "1", "--checkpoints-keep", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = lib / "runs" / "k" / "checkpoints" / "step-000003"
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the training subprocess never reached step 3"
    assert not (lib / "k.safetensors").exists()
    resumed = train(_cfg(images, tiny_sd1_dir, lib, max_steps=8, resume="latest"))
    a, _ = load_safetensors(ref.adapter_path)
    b, _ = load_safetensors(resumed.adapter_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_disk_full_while_checkpointing_is_clear_and_keeps_older(images, tiny_sd1_dir, tmp_path, monkeypatch):
    import pipelines.weights_io as ad  # every adapter and checkpoint file is written through it

    real = ad.save_safetensors
    calls = {"n": 0}

    def fill_up(sd, path, meta=None):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sd, path, meta)

    monkeypatch.setattr(ad, "save_safetensors", fill_up)
    with pytest.raises(TrainingError, match="No space left on device.*older checkpoints are kept"):
        train(_cfg(images, tiny_sd1_dir, tmp_path))
    ck = tmp_path / "runs" / "k" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000001", "step-000002"]
    for p in ck.iterdir():
        load_safetensors(p / "adapter.safetensors", check_finite=True)


def test_out_of_memory_stops_cleanly_with_advice(images, tiny_sd1_dir, tmp_path, monkeypatch):
    import training.trainer as tr

    real = tr.Trainer.train_step

    def oom_at_3(self, step):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, step)

    monkeypatch.setattr(tr.Trainer, "train_step", oom_at_3)
    with pytest.raises(TrainingError, match="out of memory at step 3.*batch_size.*gradient_checkpointing"):
        train(_cfg(images, tiny_sd1_dir, tmp_path))
    ck = tmp_path / "runs" / "k" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000001", "step-000002"]


def test_two_jobs_queue_and_never_run_together(images, tiny_sd1_dir, tmp_path):
    q = JobQueue(tmp_path / "home")  # each job trains in its own process, one at a time
    a = q.submit(_cfg(images, tiny_sd1_dir, tmp_path, name="a", max_steps=3))
    b = q.submit(_cfg(images, tiny_sd1_dir, tmp_path, name="b", max_steps=3))
    deadline = time.time() + 60  # the worker thread picks a up; a slow machine may take a moment
    while q.get(a.id).state == "queued" and time.time() < deadline:
        time.sleep(0.01)
    assert a.state == "running" and q.get(b.id).state == "queued" and q.position(b) == 1
    q.wait(a, timeout=120)
    q.wait(b, timeout=120)
    assert a.state == b.state == "done", (a.error, b.error)
    assert q.max_concurrent_seen == 1 and a.finished <= b.started and a.pid != b.pid
    assert (tmp_path / "a.safetensors").is_file() and (tmp_path / "b.safetensors").is_file()
    assert [s for s, _ in a.losses] == [1, 2, 3]


def test_stopping_a_queued_job_never_runs_it(images, tiny_sd1_dir, tmp_path):
    q = JobQueue(tmp_path / "home")
    a = q.submit(_cfg(images, tiny_sd1_dir, tmp_path, name="a", max_steps=2))
    b = q.submit(_cfg(images, tiny_sd1_dir, tmp_path, name="b", max_steps=2))
    q.stop(b.id)
    q.wait(a, timeout=120)
    time.sleep(0.3)
    assert q.get(b.id).state == "stopped" and b.started is None
    assert not (tmp_path / "b.safetensors").exists()


def _log_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_log_survives_sigkill_and_resume_keeps_one_row_per_step(images, tiny_sd1_dir, tmp_path):
    lib = tmp_path / "lib"
    cmd = [sys.executable, "-m", "app.cli", "train", "--images", str(images), "--base", str(tiny_sd1_dir),
           "--library", str(lib), "--steps", "12", "--batch-size", "1", "--device", "cpu", "--name", "k",
           "--rank", "2", "--seed", "5", "--checkpoint-every", "2", "--sample-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = lib / "runs" / "k" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (lib / "runs" / "k" / "checkpoints" / "step-000002").exists() and log.exists() \
                and log.read_text().count("\n") >= 1 + 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = _log_rows(log)
    assert rows[0] == ["step", "loss", "lr", "elapsed_s"]
    killed_at = len(rows) - 1
    assert killed_at >= 3 and [int(r[0]) for r in rows[1:]] == list(range(1, killed_at + 1))  # flushed as it went
    assert not (lib / "k.safetensors").exists()
    with open(log, "a") as f:
        f.write("99,0.01")  # and a line cut short by the kill
    resumed = train(_cfg(images, tiny_sd1_dir, lib, max_steps=12, batch_size=1, rank=2, checkpoint_every=2,
                         sample_steps=1, resume="latest"))
    assert resumed.adapter_path.is_file()
    rows = _log_rows(log)
    assert rows[0] == ["step", "loss", "lr", "elapsed_s"] and sum(r == rows[0] for r in rows) == 1
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 13))  # no gap, no step twice
    elapsed = [float(r[3]) for r in rows[1:]]
    assert elapsed == sorted(elapsed)  # the resumed rows continue the run's time


def test_resumed_log_drops_rows_after_the_checkpoint(tmp_path):
    from training.trainer import open_log

    log = tmp_path / "log.csv"
    log.write_text("".join(f"{i},0.5,1e-3,{i / 10}\r\n" for i in range(1, 8)) + "3,0.4,1e-3,0.35\r\n8,0.")
    f, offset = open_log(log, 5)  # a log without its header (written by an older version), a repeated step
    f.close()
    rows = _log_rows(log)
    assert rows[0] == ["step", "loss", "lr", "elapsed_s"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"] and rows[3][1] == "0.4" and offset == 0.5
    f, offset = open_log(log, 0)  # a new run starts a new log
    f.close()
    assert _log_rows(log) == [["step", "loss", "lr", "elapsed_s"]] and offset == 0.0
