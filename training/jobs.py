"""Training jobs: a persistent queue whose jobs run one at a time, each as its own process.

A job is a row in `<home>/jobs.sqlite` (see `training.jobstore`). A worker thread in the app takes the next
queued job, writes its config into the run folder and starts `python -m app.cli train --config <file>` (the
same path as `lora-studio train`; several processes through `accelerate launch` with `num_processes`), then
waits on that process. Progress, losses and samples are read back from the run folder (progress.json,
log.csv). A crash or an out-of-memory kill ends the job, never the app; the queue and the history survive a
restart, and a job that was training when the app died is shown as 'interrupted' (resumable from its
checkpoints). Stop sends SIGINT: the trainer finishes its step, writes a checkpoint and the job ends 'stopped'.

The UI holds `Job` objects and polls them: `JobQueue.get` (and `jobs`, `latest`, `wait`) refresh them from the
database and the run folder.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.errors import ConfigError

from .config import TrainConfig
from .jobstore import ACTIVE, JobStore, process_token, read_status, settle, token_alive
from .trainer import Progress, TrainResult, run_dir_for

ROOT = Path(__file__).resolve().parent.parent


class _LossLog:
    """Reads a run's log.csv as it grows: (step, loss) rows, only complete lines, a rewritten file re-read."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.pos = 0
        self.by_step: dict[int, float] = {}

    def read(self, path: Path, since: float | None) -> list[tuple[int, float]] | None:
        """The rows, or None when unchanged; a file last written before `since` belongs to an older run."""
        try:
            st = path.stat()
        except OSError:
            return None
        if since is not None and st.st_mtime < since:
            return None
        key = (st.st_dev, st.st_ino)
        if key != self.key or st.st_size < self.pos:
            self.key, self.pos, self.by_step = key, 0, {}
        if st.st_size == self.pos:
            return None
        try:
            with open(path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return None
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.pos += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            parts = line.split(",")
            try:
                self.by_step[int(parts[0])] = float(parts[1])
            except (ValueError, IndexError):  # the header
                continue
        return sorted(self.by_step.items())


@dataclass
class Job:
    id: int
    config: TrainConfig
    state: str = "queued"  # queued | running | done | stopped | failed | interrupted
    progress: Progress | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    result: TrainResult | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    pid: int | None = None  # the training process
    kind: str = "train"  # train | resume | more
    num_processes: int | None = None
    run_dir: Path | None = None
    log_path: Path | None = None  # what the training process printed
    _loss_log: _LossLog = field(default_factory=_LossLog, repr=False)
    _final: bool = field(default=False, repr=False)
    _stop_sent: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def step(self) -> int:
        return self.progress.step if self.progress else 0

    @property
    def total(self) -> int:
        return self.progress.total if self.progress and self.progress.total else self.config.max_steps


CommandFn = Callable[[Job, Path], list[str]]


def train_command(job: Job, config_path: Path) -> list[str]:
    """The job's process: `lora-studio train --config FILE` (with `--num-processes N` when asked)."""
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", str(config_path)]
    if job.num_processes and job.num_processes > 1:
        cmd += ["--num-processes", str(job.num_processes)]
    return cmd


def pinned(cfg: TrainConfig) -> TrainConfig:
    """The config with its library folder and local paths absolute: a queued job trains the same whatever
    the folder or environment of the process that runs it."""
    changes: dict[str, Any] = {"output_dir": str(cfg.library_dir.expanduser().resolve())}
    for name in ("images", "class_images", "init_adapter", "base", "resume", "mask_dir", "vae", "dataset_config"):
        value = getattr(cfg, name)
        if value and not Path(value).expanduser().is_absolute() and Path(value).expanduser().exists():
            changes[name] = str(Path(value).expanduser().resolve())
    if cfg.dataset_config:  # its folders are found later from the worker's folder: only absolute or beside the file
        from .kohya_dataset import read_kohya_dataset

        toml = Path(changes.get("dataset_config", cfg.dataset_config)).expanduser()
        for sub in [*(k := read_kohya_dataset(toml)).train, *k.reg]:
            if not sub.folder.is_absolute() and not (toml.parent / sub.folder).is_dir():
                raise ConfigError(f"{toml}: image_dir {sub.folder} is found from this folder only; a queued run "
                                  "starts elsewhere: write it as an absolute path or relative to the .toml file")
    return cfg.replace(**changes)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the job's process leads its own group: `accelerate launch` children get it too
    except (OSError, AttributeError):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


class JobQueue:
    """The jobs of one home folder, and (with `worker=True`) the thread that trains them one at a time.

    `command(job, config_path) -> argv` starts a job's process (tests pass a fake trainer); the default is
    `train_command`. Without `home` the queue binds to the Studio's home on first use (else the default home).
    """

    def __init__(self, home: str | os.PathLike | None = None, *, command: CommandFn | None = None,
                 worker: bool = True, poll_s: float = 1.0):
        self._command = command or train_command
        self._want_worker = worker
        self.poll_s = poll_s
        self._store: JobStore | None = None
        self._jobs: dict[int, Job] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False
        self._current: Job | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.owner = process_token()
        self.running_now = 0  # how many jobs this queue has on the device at this instant (0 or 1)
        self.max_concurrent_seen = 0
        if home is not None:
            self.bind(home)

    # setup ---------------------------------------------------------------------------------------------
    def bind(self, home: str | os.PathLike) -> "JobQueue":
        """Use the jobs database of `home` (once; later calls keep the first) and start the worker."""
        with self._lock:
            if self._store is None:
                self._store = JobStore(home)
                self._store.recover()
                if self._want_worker:
                    self._worker = threading.Thread(target=self._loop, name="lora-studio-jobs", daemon=True)
                    self._worker.start()
                    atexit.register(self.close)
        return self

    @property
    def store(self) -> JobStore:
        if self._store is None:
            from pipelines.library import default_home

            self.bind(default_home())
        return self._store

    @property
    def home(self) -> Path:
        return self.store.home

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker. A job training now gets SIGINT (it saves a checkpoint) and ends 'interrupted'."""
        self._closing = True
        with self._wake:
            self._wake.notify_all()
        job = self._current
        if job is not None and job.pid:
            _signal_group(job.pid, signal.SIGINT)
        self._idle.wait(timeout)

    # the API the UI uses -------------------------------------------------------------------------------
    def submit(self, cfg: TrainConfig, *, num_processes: int | None = None, kind: str = "train") -> Job:
        cfg = pinned(cfg)
        if self.active_with_name(cfg.name) is not None:
            raise ConfigError(f"name: a training called '{cfg.name}' is already queued or running")
        job_id = self.store.add(cfg.name, cfg.to_json(), kind=kind, num_processes=num_processes,
                                run_dir=str(run_dir_for(cfg)))
        job = self.get(job_id)
        with self._wake:
            self._wake.notify_all()
        return job

    def get(self, job_id: int) -> Job | None:
        row = self.store.row(int(job_id))
        return self._sync(row) if row else None

    def jobs(self) -> list[Job]:
        """Every job of this home, oldest first, refreshed."""
        return [self._sync(r) for r in self.store.rows()]

    def latest(self) -> Job | None:
        rows = self.store.rows(limit=1)
        return self._sync(rows[-1]) if rows else None

    def position(self, job: Job) -> int:
        """0 while running or finished; while queued, the number of jobs ahead of it (the running one counts)."""
        if job.state != "queued":
            return 0
        return sum(1 for r in self.store.rows() if r["state"] in ACTIVE and r["id"] < job.id)

    def active_with_name(self, name: str) -> Job | None:
        for r in self.store.rows():
            if r["state"] in ACTIVE and r["name"].casefold() == name.casefold():
                return self._sync(r)
        return None

    def stop(self, job_id: int) -> None:
        """A queued job leaves the queue; a running one gets SIGINT from its worker and ends 'stopped'."""
        store = self.store
        if store.update(job_id, only_if_state="queued", state="stopped", stop_requested=1, finished=time.time()):
            self.get(job_id)
            return
        store.update(job_id, only_if_state="running", stop_requested=1)
        cur = self._current
        if cur is not None and cur.id == job_id:
            self._send_stop(cur)

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        end = None if timeout is None else time.time() + timeout
        while True:
            self.get(job.id)
            if not job.active or (end is not None and time.time() >= end):
                return job
            time.sleep(0.1)

    # refreshing Job objects from the database and the run folder ----------------------------------------
    def _sync(self, row: dict[str, Any]) -> Job:
        with self._lock:  # the worker and the UI's polls refresh the same Job objects
            job = self._jobs.get(row["id"])
            if job is None:
                cfg = TrainConfig.from_dict(json.loads(row["config"]), source=f"job {row['id']}")
                job = Job(row["id"], cfg, submitted=row["submitted"], kind=row["kind"],
                          num_processes=row["num_processes"], log_path=self.store.log_path(row["id"]))
                self._jobs[row["id"]] = job
            return self._refresh(job, row)

    def _refresh(self, job: Job, row: dict[str, Any]) -> Job:
        if job._final:
            return job
        state = row["state"]
        job.error, job.started, job.finished, job.pid = row["error"], row["started"], row["finished"], row["pid"]
        job.run_dir = Path(row["run_dir"]) if row["run_dir"] else None
        if state != "queued":
            if state == "running":
                status = read_status(job.run_dir)
            else:
                status = json.loads(row["summary"]) if row["summary"] else None
            if status is not None and job.started and status.get("started", 0) < job.started:
                status = None  # an older run's progress.json in the same folder
            if status is not None:
                self._apply_status(job, status, state)
            if job.run_dir is not None and job.started:
                rows = job._loss_log.read(job.run_dir / "log.csv", job.started)
                if rows is not None:
                    job.losses = rows
        job.state = state  # last: whoever sees a job finished finds its result and samples in place
        job._final = not job.active
        return job

    @staticmethod
    def _apply_status(job: Job, s: dict[str, Any], state: str) -> None:
        total = s.get("total") or job.config.max_steps
        job.progress = Progress(int(s.get("step") or 0), int(total), s.get("loss"), s.get("lr"),
                                float(s.get("elapsed_s") or 0.0), s.get("eta_s"), [], s.get("message") or "")
        job.samples = [Path(p) for p in s.get("samples", [])]
        job.messages = list(s.get("messages", []))
        if state in ("done", "stopped") and (s.get("adapter") or s.get("checkpoint")):
            job.result = TrainResult(
                Path(s["adapter"]) if s.get("adapter") else None, job.run_dir or run_dir_for(job.config),
                int(s.get("step") or 0), s.get("final_loss"), float(s.get("seconds") or 0.0), list(job.samples),
                None, stopped=s.get("state") == "stopped",
                checkpoint=Path(s["checkpoint"]) if s.get("checkpoint") else None)

    # the worker ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            if not self.run_next():
                with self._wake:
                    if not self._closing:
                        self._wake.wait(self.poll_s)

    def run_next(self) -> Job | None:
        """Claim and train the next job of this home (blocking until it ends); None when nothing can run now."""
        if self._closing:
            return None
        self._idle.clear()
        try:
            row = self.store.claim(self.owner)
            if row is None:
                return None
            job = self._sync(row)
            self._run(job, adopted=row["adopted"], token=row["pid_token"])
            return job
        finally:
            self._idle.set()

    def run_pending(self, *, wait: bool = False, on_job: Callable[[Job, str], None] | None = None) -> list[Job]:
        """Work through the queue in this process (`lora-studio jobs run`): until none is queued, or for ever
        with `wait`. Ctrl-C stops the job training now (with a checkpoint) and returns."""
        done: list[Job] = []
        try:
            while not self._closing:
                job = self.run_next()
                if job is not None:
                    done.append(job)
                    if on_job:
                        on_job(job, "finished")
                    continue
                waiting = any(r["state"] in ACTIVE for r in self.store.rows())
                if not waiting and not wait:
                    break
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            cur = self._current
            if cur is not None:
                self.stop(cur.id)
                self._idle.wait(120)  # the worker notices the exit and records 'stopped'
            raise
        return done

    def _send_stop(self, job: Job) -> None:
        if job.pid and not job._stop_sent:
            job._stop_sent = True  # once: a second SIGINT makes the trainer abort without a checkpoint
            _signal_group(job.pid, signal.SIGINT)

    def _run(self, job: Job, adopted: bool = False, token: str | None = None) -> None:
        store = self.store
        self.running_now += 1
        self.max_concurrent_seen = max(self.max_concurrent_seen, self.running_now)
        self._current = job
        proc: subprocess.Popen | None = None
        try:
            if not adopted:
                run_dir = run_dir_for(job.config)
                cfg_path = run_dir / "job.toml"
                _write_atomic(cfg_path, job.config.to_toml())  # the run's own record: resume reads it too
                argv = self._command(job, cfg_path)
                env = dict(os.environ)
                env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
                store.logs.mkdir(parents=True, exist_ok=True)
                with open(store.log_path(job.id), "ab") as log:
                    log.write(f"$ {' '.join(argv)}\n".encode())
                    log.flush()
                    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
                token = process_token(proc.pid)
                store.update(job.id, pid=proc.pid, pid_token=token, run_dir=str(run_dir))
                job.pid = proc.pid
            rc: int | None = None
            while True:
                if proc is not None:
                    rc = proc.poll()
                    if rc is not None:
                        break
                elif not token_alive(token):
                    break
                row = store.row(job.id)
                if row is not None and row["stop_requested"]:
                    self._send_stop(job)
                if row is not None:
                    self._sync(row)
                time.sleep(0.2)
            row = store.row(job.id) or {}
            state, error, summary = settle(row, rc, closing=self._closing, log_path=store.log_path(job.id))
            store.update(job.id, only_if_state="running", state=state, error=error, summary=summary,
                         finished=time.time())
        except Exception as e:  # noqa: BLE001 - could not start the process: the job fails, the worker goes on
            if proc is not None and proc.poll() is None:
                _signal_group(proc.pid, signal.SIGKILL)
            store.update(job.id, only_if_state="running", state="failed", finished=time.time(),
                         error=f"could not run the training process: {type(e).__name__}: {e}")
        finally:
            self._current = None
            self.running_now -= 1
            self.get(job.id)


__all__ = ["Job", "JobQueue", "train_command", "pinned"]
