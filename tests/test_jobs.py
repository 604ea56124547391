"""Training jobs as processes from a persistent queue (issue 15): each job trains in its own process, progress
comes back from the run folder, a crash ends only the job, the queue and history survive a restart, stop then
resume gives the weights of an uninterrupted run, and the command line sees the same jobs."""

from __future__ import annotations

import os
import shutil
import sys
import time

import pytest
import torch

from app.cli import main
from app.studio import Studio
from pipelines.errors import ConfigError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.jobs import JobQueue, train_command
from training.jobstore import JobStore
from training.trainer import train

from jobs_helpers import FileGate, wait_for


def _cfg(images, base, lib, **kw) -> TrainConfig:
    d = dict(images=str(images), base=str(base), output_dir=str(lib), max_steps=2, batch_size=2, device="cpu",
             sample_steps=1, name="k", rank=2, seed=5, resolution=32)
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture()
def home(tmp_path):
    return tmp_path / "home"


def test_a_job_trains_in_its_own_process_and_reports_progress(home, star_images, tiny_sd1_dir):
    studio = Studio(home=home, base=str(tiny_sd1_dir), device="cpu")
    job = studio.submit(_cfg(star_images, tiny_sd1_dir, studio.library.root, max_steps=3, sample_every=2,
                             sample_prompts=["a sks"]))
    assert studio.job(job.id) is job and job.state in ("queued", "running")
    assert wait_for(lambda: studio.job(job.id).pid is not None, 60)
    assert job.pid != os.getpid()  # the training is another process, not a thread of the app
    studio.queue.wait(job, timeout=180)
    assert job.state == "done", (job.error, job.log_path.read_text()[-2000:])
    assert [s for s, _ in job.losses] == [1, 2, 3] and all(loss > 0 for _, loss in job.losses)
    assert job.progress.step == job.progress.total == 3
    assert len(job.samples) >= 2 and all(p.is_file() for p in job.samples)  # step 2 and the final ones
    assert job.result.adapter_path == studio.library.root / "k.safetensors" and job.result.adapter_path.is_file()
    assert job.result.steps == 3 and job.result.final_loss == pytest.approx(job.losses[-1][1], rel=1e-4)
    assert any("image" in m for m in job.messages)  # the scan report the trainer printed
    run = studio.library.root / "runs" / "k"
    assert (run / "job.toml").is_file() and (run / "progress.json").is_file()
    assert studio.queue.latest() is job and studio.queue.max_concurrent_seen == 1
    assert studio.run_state("k").in_use and not studio.run_state("k").resumable
    with pytest.raises(ConfigError, match="already"):
        studio.check_new_adapter_name("K")


def test_a_crashing_job_fails_with_a_readable_error_and_the_queue_goes_on(home, star_images, tiny_sd1_dir, tmp_path):
    lib = tmp_path / "lib"
    gone = tmp_path / "gone"
    shutil.copytree(star_images, gone)

    def command(job, path):
        if job.name == "boom":  # a process that dies the way the out-of-memory killer ends one
            return [sys.executable, "-c", "import os, signal; print('loading…', flush=True); "
                                          "os.kill(os.getpid(), signal.SIGKILL)"]
        return train_command(job, path)

    q = JobQueue(home, command=command, worker=False)
    a = q.submit(_cfg(gone, tiny_sd1_dir, lib, name="a"))
    b = q.submit(_cfg(star_images, tiny_sd1_dir, lib, name="boom"))
    c = q.submit(_cfg(star_images, tiny_sd1_dir, lib, name="c"))
    shutil.rmtree(gone)  # the image folder disappears after queuing
    done = q.run_pending()
    assert [j.id for j in done] == [a.id, b.id, c.id]
    assert a.state == "failed" and "image folder not found" in a.error and str(gone) in a.error and "Traceback" not in a.error
    assert b.state == "failed" and "killed (SIGKILL)" in b.error and "out of memory" in b.error
    assert c.state == "done", c.error
    assert (lib / "c.safetensors").is_file() and not (lib / "a.safetensors").exists()


def test_restart_keeps_the_queue_and_the_history(home, star_images, tiny_sd1_dir, tmp_path):
    lib = tmp_path / "lib"
    store = JobStore(home)
    # a job that was training when the app died (its worker and its process are gone)
    ghost = store.add("ghost", _cfg(star_images, tiny_sd1_dir, lib, name="ghost").to_json())
    store.update(ghost, state="running", started=time.time() - 60, owner="999999@1.0", pid=999999,
                 pid_token="999999@1.0", run_dir=str(lib / "runs" / "ghost"))
    first = JobQueue(home, worker=False)  # an app that queued a job and closed before it ran
    queued = first.submit(_cfg(star_images, tiny_sd1_dir, lib, name="later")).id
    assert first.get(ghost).state == "interrupted" and "resume" in first.get(ghost).error
    del first

    studio = Studio(home=home, base=str(tiny_sd1_dir), device="cpu", library=lib)  # the app starts again
    names = [(j.name, j.state) for j in studio.queue.jobs()]
    assert ("ghost", "interrupted") in names and (("later", "queued") in names or ("later", "running") in names)
    job = studio.job(queued)
    studio.queue.wait(job, timeout=180)
    assert job.state == "done", job.error
    assert (lib / "later.safetensors").is_file()
    again = JobQueue(home, worker=False)  # and the finished job is history for the next start
    assert [(j.id, j.state) for j in again.jobs()] == [(ghost, "interrupted"), (queued, "done")]
    assert again.get(queued).result.adapter_path == lib / "later.safetensors"


def test_stop_then_resume_ends_with_the_weights_of_an_uninterrupted_run(home, star_images, tiny_sd1_dir, tmp_path):
    steps = 12
    ref = train(_cfg(star_images, tiny_sd1_dir, tmp_path / "ref", max_steps=steps, checkpoint_every=1,
                     checkpoints_keep=20))
    studio = Studio(home=home, base=str(tiny_sd1_dir), device="cpu")
    cfg = _cfg(star_images, tiny_sd1_dir, studio.library.root, max_steps=steps, checkpoint_every=1,
               checkpoints_keep=20)
    job = studio.submit(cfg)
    assert wait_for(lambda: len(studio.job(job.id).losses) >= 2, 120), job.error
    studio.queue.stop(job.id)
    studio.queue.wait(job, timeout=120)
    assert job.state == "stopped", job.error
    assert job.result is not None and job.result.checkpoint is not None and job.result.checkpoint.is_dir()
    assert 2 <= job.result.steps < steps, "the stop landed after the run had finished"
    st = studio.run_state("k")
    assert st.resumable and not st.in_use and st.step == job.result.steps and st.total == steps
    with pytest.raises(ConfigError, match="no checkpoint"):
        studio.resume("never-trained")
    more = studio.resume("k")
    assert more.kind == "resume" and more.config.resume == "latest"
    with pytest.raises(ConfigError, match="already"):
        studio.resume("k")
    studio.queue.wait(more, timeout=180)
    assert more.state == "done", more.error
    assert [s for s, _ in more.losses] == list(range(1, steps + 1))  # one history across the stop
    a, _ = load_safetensors(ref.adapter_path)
    b, _ = load_safetensors(more.result.adapter_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # train more from the finished adapter: a new job under a free name, starting from its weights
    extra = studio.train_more("k", 2)
    assert extra.config.name == "k-more" and extra.config.init_adapter == str(more.result.adapter_path)
    studio.queue.wait(extra, timeout=180)
    assert extra.state == "done", extra.error
    assert (studio.library.root / "k-more.safetensors").is_file() and extra.result.steps == 2


def test_jobs_command_lists_the_queue_and_train_queue_adds_to_it(home, star_images, tiny_sd1_dir, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    lib = tmp_path / "lib"
    args = ["train", "--queue", "--images", str(star_images), "--base", str(tiny_sd1_dir), "--library", str(lib),
            "--steps", "2", "--batch-size", "2", "--device", "cpu", "--rank", "2", "--resolution", "32",
            "--sample-steps", "1"]
    assert main([*args, "--name", "q1"]) == 0
    assert main([*args, "--name", "q2"]) == 0
    out = capsys.readouterr().out
    assert "queued job 1 'q1'" in out and "queued job 2 'q2' (1 ahead" in out
    assert not (lib / "q1.safetensors").exists()  # nothing trained in the foreground
    rows = JobStore(home).rows()
    assert [(r["name"], r["state"]) for r in rows] == [("q1", "queued"), ("q2", "queued")]
    assert main([*args, "--name", "q1"]) == 2  # the same name twice in the queue is refused
    assert "already queued" in capsys.readouterr().err
    assert main(["jobs", "stop", "2"]) == 0
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert "ID" in out and "NAME" in out and "STATE" in out and "STARTED" in out and "FINISHED" in out
    assert "q1" in out and "queued" in out and "0/2" in out and "q2" in out and "stopped" in out
    assert main(["jobs", "run"]) == 0  # headless: trains what is queued, here, without the app
    out = capsys.readouterr().out
    assert "job 1 'q1': done at step 2/2" in out and (lib / "q1.safetensors").is_file()
    # resume by job id or run name: what cannot be resumed says why (a finished run, a job that never ran)
    assert main(["jobs", "resume", "1"]) == 2
    assert "'q1' already finished; train more steps from it instead" in capsys.readouterr().err
    assert main(["jobs", "resume", "2"]) == 2
    assert "the run 'q2' has no checkpoint" in capsys.readouterr().err
    assert main(["jobs", "resume", "9"]) == 2
    assert "no job 9" in capsys.readouterr().err
    assert main(["jobs", "list", "--home", str(home)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if " q1 " in ln)
    assert "done" in line and "2/2" in line and line.count(time.strftime("%Y-%m-%d")) == 2


APP = r'''
import json, sys, time
from training.config import TrainConfig
from training.jobs import JobQueue

q = JobQueue(sys.argv[1])  # an app with its worker thread
q.submit(TrainConfig.from_dict(json.loads(sys.argv[2])))
time.sleep(600)
'''


def test_a_job_training_when_the_app_dies_is_interrupted_and_resumable(home, star_images, tiny_sd1_dir, tmp_path):
    import signal
    import subprocess
    from pathlib import Path

    lib = tmp_path / "lib"
    cfg = _cfg(star_images, tiny_sd1_dir, lib, max_steps=40, checkpoint_every=1, checkpoints_keep=3)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    app = subprocess.Popen([sys.executable, "-c", APP, str(home), cfg.to_json()], cwd=root, env=env)
    try:
        store = JobStore(home) if wait_for(lambda: (home / "jobs.sqlite").is_file(), 60) else None
        assert store is not None
        log = lib / "runs" / "k" / "log.csv"
        assert wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 3, 120)
    finally:
        app.kill()  # the app dies (SIGKILL: no clean-up); its training process lives on, on its own
        app.wait()
    [row] = store.rows()
    assert row["state"] == "running" and row["pid"] != app.pid
    assert JobQueue(home, worker=False).get(row["id"]).state == "running"  # still training: not interrupted
    os.killpg(row["pid"], signal.SIGKILL)  # and then the training process dies too
    assert wait_for(lambda: not _alive(row["pid"]), 30)

    studio = Studio(home=home, base=str(tiny_sd1_dir), device="cpu", library=lib)  # the app starts again
    job = studio.job(row["id"])
    assert job.state == "interrupted" and "resume" in job.error and not job.active
    st = studio.run_state("k")
    assert st.resumable and st.step >= 1
    more = studio.resume("k")
    studio.queue.wait(more, timeout=240)
    assert more.state == "done", more.error
    assert [s for s, _ in more.losses] == list(range(1, 41)) and (lib / "k.safetensors").is_file()


def _alive(pid: int) -> bool:
    from training.jobstore import process_token, token_alive

    return token_alive(process_token(pid))
