"""A background worker that runs training jobs one at a time, in submission order.

The UI submits a `TrainConfig` and polls the job's state; closing the browser does not stop a job,
and a reopened page finds it again by id. Never two jobs on the device at once.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipelines.errors import LoraStudioError

from .config import TrainConfig
from .trainer import Progress, TrainResult, train


@dataclass
class Job:
    id: int
    config: TrainConfig
    state: str = "queued"  # queued | running | done | stopped | failed
    progress: Progress | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    result: TrainResult | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


class JobQueue:
    """FIFO of training jobs served by a single worker thread."""

    def __init__(self, runner: Callable[..., TrainResult] = train):
        self._runner = runner
        self._jobs: dict[int, Job] = {}
        self._order: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._loop, name="lora-studio-trainer", daemon=True)
        self._worker.start()
        self.running_now = 0  # how many jobs are on the device at this instant (0 or 1)
        self.max_concurrent_seen = 0

    def submit(self, cfg: TrainConfig) -> Job:
        with self._lock:
            job = Job(next(self._ids), cfg)
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._wake.notify()
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return [self._jobs[i] for i in self._order]

    def position(self, job: Job) -> int:
        """0 while running or finished; n = number of jobs ahead of it plus one while queued."""
        if job.state != "queued":
            return 0
        with self._lock:
            ahead = [i for i in self._order if self._jobs[i].active and i < job.id]
        return len(ahead)

    def stop(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        with self._lock:
            if job.state == "queued":
                job.state = "stopped"
                job.finished = time.time()
                return
        job.stop_event.set()

    def latest(self) -> Job | None:
        return self._jobs[self._order[-1]] if self._order else None

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        end = None if timeout is None else time.time() + timeout
        while job.active and (end is None or time.time() < end):
            time.sleep(0.05)
        return job

    # worker ------------------------------------------------------------------
    def _next(self) -> Job:
        with self._lock:
            while True:
                for i in self._order:
                    if self._jobs[i].state == "queued":
                        job = self._jobs[i]
                        job.state = "running"
                        return job
                self._wake.wait()

    def _loop(self) -> None:
        while True:
            job = self._next()
            self._run(job)

    def _run(self, job: Job) -> None:
        job.started = time.time()
        self.running_now += 1
        self.max_concurrent_seen = max(self.max_concurrent_seen, self.running_now)

        def on_progress(p: Progress) -> None:
            job.progress = p
            if p.loss is not None and not p.message:
                job.losses.append((p.step, p.loss))
            job.samples.extend(p.samples)
            if p.message:
                job.messages.append(p.message)

        try:
            job.result = self._runner(job.config, on_progress=on_progress, stop=job.stop_event)
            job.state = "stopped" if job.result.stopped else "done"
        except LoraStudioError as e:
            job.state, job.error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - an unexpected bug must not kill the worker thread
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            job.messages.append(traceback.format_exc())
        finally:
            self.running_now -= 1
            job.finished = time.time()
