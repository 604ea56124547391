"""Where training jobs live between processes: an SQLite table in the app's home, and each run's progress.json.

    <home>/jobs.sqlite          the queue and the history: one row per job (config, state, times, pids)
    <home>/jobs/<id>.log        what the job's process printed (its last lines explain a crash)
    <library>/runs/<name>/      the run folder the trainer writes: log.csv, samples/, checkpoints/, and
        progress.json           written by the training process (`RunStatus`): what the UI shows that
                                log.csv does not say (total steps, status message, adapter path, error)

The app's worker, `lora-studio jobs run` and `lora-studio train --queue` all go through `JobStore`; SQLite's
locking makes claiming the next job atomic across processes, so one job trains at a time per home.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

STATES = ("queued", "running", "done", "stopped", "failed", "interrupted")
ACTIVE = ("queued", "running")
PROGRESS_FILE = "progress.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    kind          TEXT NOT NULL DEFAULT 'train',   -- train | resume | more
    config        TEXT NOT NULL,                   -- TrainConfig as JSON
    num_processes INTEGER,
    state         TEXT NOT NULL DEFAULT 'queued',  -- queued | running | done | stopped | failed | interrupted
    submitted     REAL NOT NULL,
    started       REAL,
    finished      REAL,
    owner         TEXT,                            -- the worker process running it: 'pid@create_time'
    pid           INTEGER,                         -- the training process
    pid_token     TEXT,                            -- 'pid@create_time' of the training process
    run_dir       TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    summary       TEXT                             -- JSON: the run's last progress.json, kept with the job
);
"""


# ----------------------------------------------------------------------------------------------- processes
def process_token(pid: int | None = None) -> str:
    """'pid@create_time': names one process even after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        return f"{pid}@{psutil.Process(pid).create_time():.3f}"
    except Exception:  # noqa: BLE001 - no psutil, or the process is already gone
        return f"{pid}@?"


def token_alive(token: str | None) -> bool:
    """Whether the process a `process_token` named is still running (a zombie is not)."""
    if not token:
        return False
    pid_s, _, ctime = token.partition("@")
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    try:
        import psutil

        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return ctime == "?" or abs(p.create_time() - float(ctime)) < 0.01
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess, AccessDenied, a bad number
        return False


# ----------------------------------------------------------------------------------------------- the database
class JobStore:
    """The jobs table. Each call opens its own connection, so any thread or process may use it."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home).expanduser()
        self.path = self.home / "jobs.sqlite"
        self.logs = self.home / "jobs"
        self.home.mkdir(parents=True, exist_ok=True)
        c = sqlite3.connect(self.path, timeout=30)
        try:
            c.execute("PRAGMA journal_mode = WAL")  # readers (the UI's polls) never wait for the worker's writes
            c.executescript(_SCHEMA)
        finally:
            c.close()

    @contextmanager
    def _conn(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        c = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        c.row_factory = sqlite3.Row
        try:
            c.execute("PRAGMA busy_timeout = 30000")
            c.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
        finally:
            c.close()

    def add(self, name: str, config_json: str, *, kind: str = "train", num_processes: int | None = None,
            run_dir: str | None = None) -> int:
        with self._conn(immediate=True) as c:
            cur = c.execute("INSERT INTO jobs (name, kind, config, num_processes, state, submitted, run_dir) "
                            "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                            (name, kind, config_json, num_processes, time.time(), run_dir))
            return int(cur.lastrowid)

    def row(self, job_id: int) -> dict[str, Any] | None:
        with self._conn() as c:
            r = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(r) if r else None

    def rows(self, limit: int | None = None) -> list[dict[str, Any]]:
        """All jobs, oldest first (the last `limit` with a limit)."""
        with self._conn() as c:
            if limit:
                rs = c.execute("SELECT * FROM (SELECT * FROM jobs ORDER BY id DESC LIMIT ?) ORDER BY id",
                               (limit,)).fetchall()
            else:
                rs = c.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [dict(r) for r in rs]

    def update(self, job_id: int, *, only_if_state: str | tuple[str, ...] | None = None, **values: Any) -> bool:
        """Set columns; with `only_if_state`, only while the job is in that state (returns whether it was)."""
        cols = ", ".join(f"{k} = ?" for k in values)
        sql, args = f"UPDATE jobs SET {cols} WHERE id = ?", [*values.values(), job_id]
        if only_if_state is not None:
            states = (only_if_state,) if isinstance(only_if_state, str) else tuple(only_if_state)
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        with self._conn(immediate=True) as c:
            return c.execute(sql, args).rowcount > 0

    def recover(self) -> list[int]:
        """Jobs left 'running' by a worker that is gone: finished from their run folder, or 'interrupted'.

        A training process that outlived its worker is left running (a new worker adopts it)."""
        changed = []
        with self._conn(immediate=True) as c:
            for r in c.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                if token_alive(r["owner"]) or token_alive(r["pid_token"]):
                    continue
                state, error, summary = settle(dict(r), rc=None)
                c.execute("UPDATE jobs SET state = ?, error = ?, summary = ?, finished = ? WHERE id = ?",
                          (state, error, summary, time.time(), r["id"]))
                changed.append(r["id"])
        return changed

    def claim(self, owner: str) -> dict[str, Any] | None:
        """Atomically take the next job for `owner`: an orphaned training process (its worker died, it still
        runs) to watch, else the oldest queued job; None while another worker's job trains or none waits."""
        self.recover()
        with self._conn(immediate=True) as c:
            running = c.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
            for r in running:
                if not token_alive(r["owner"]):  # a training process whose worker died: adopt it
                    c.execute("UPDATE jobs SET owner = ? WHERE id = ?", (owner, r["id"]))
                    return {**dict(r), "owner": owner, "adopted": True}
            if running:
                return None
            r = c.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if r is None:
                return None
            now = time.time()
            c.execute("UPDATE jobs SET state = 'running', owner = ?, started = ? WHERE id = ?", (owner, now, r["id"]))
            return {**dict(r), "state": "running", "owner": owner, "started": now, "adopted": False}

    def log_path(self, job_id: int) -> Path:
        return self.logs / f"{job_id}.log"


# ----------------------------------------------------------------------------------------------- progress.json
def read_status(run_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The run folder's progress.json, or None (absent, or caught mid-replace on a system without atomic
    rename)."""
    if not run_dir:
        return None
    try:
        data = json.loads((Path(run_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, lines: int = 12) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    keep = [ln for ln in text.splitlines() if ln.strip() and "\r" not in ln and not ln.lstrip().startswith("0%")]
    return "\n".join(keep[-lines:])


def _signal_name(rc: int) -> str:
    import signal

    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def settle(row: dict[str, Any], rc: int | None, *, closing: bool = False,
           log_path: Path | None = None) -> tuple[str, str | None, str | None]:
    """A finished training process -> (state, error, summary JSON), from its progress.json and exit status.

    `rc` None: its exit status is unknown (its worker was gone). `closing`: the app stopped it on the way out.
    """
    status = read_status(row.get("run_dir"))
    if status is not None and row.get("started") and status.get("started", 0) < row["started"]:
        status = None  # an older run's file: this job's process never wrote one
    summary = json.dumps(status) if status is not None else row.get("summary")
    reported = (status or {}).get("state")
    if reported == "done" and rc in (0, None):
        return "done", None, summary
    if reported == "failed":
        return "failed", status.get("error") or "training failed", summary
    if row.get("stop_requested") and not closing:  # whatever the process managed before it stopped
        return "stopped", None, summary
    step = (status or {}).get("step")
    at = f" at step {step}/{(status or {}).get('total')}" if step else ""
    if closing or rc is None or reported == "stopped":
        return "interrupted", (f"interrupted{at}: the app stopped while this job was training; resume it to continue "
                               "from its last checkpoint"), summary
    if rc < 0:
        why = f"the training process was killed ({_signal_name(rc)})"
        if rc == -9:
            why += "; often the system ran out of memory"
    elif rc == 0:
        why = "the training process ended without saving an adapter"
    else:
        why = f"the training process exited with status {rc}"
    tail = _tail(log_path) if log_path is not None else ""
    last = [ln for ln in tail.splitlines() if ln.startswith("error:") or "Error" in ln]
    detail = (last[-1] if last else tail.splitlines()[-1] if tail else "").removeprefix("error: ")
    return "failed", f"{why}{at}" + (f": {detail}" if detail else ""), summary


class RunStatus:
    """Writes the run folder's progress.json from the trainer's progress callback, atomically.

    Written at most every `every_s` seconds while steps go by, and at once for a message, samples, or the end.
    """

    def __init__(self, run_dir: str | os.PathLike, every_s: float = 0.5, keep_messages: int = 50):
        self.path = Path(run_dir) / PROGRESS_FILE
        self.every_s, self.keep = every_s, keep_messages
        self.data: dict[str, Any] = {"version": 1, "pid": os.getpid(), "started": time.time(), "state": "preparing",
                                     "step": 0, "total": None, "loss": None, "lr": None, "elapsed_s": 0.0,
                                     "eta_s": None, "message": "", "messages": [], "samples": [], "adapter": None,
                                     "final_loss": None, "seconds": None, "checkpoint": None, "error": None}
        self._last = 0.0
        self.write()

    def write(self) -> None:
        self.data["updated"] = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data), encoding="utf-8")
        os.replace(tmp, self.path)
        self._last = time.monotonic()

    def __call__(self, p) -> None:
        """A trainer `Progress`."""
        d = self.data
        d.update(step=p.step, total=p.total, elapsed_s=p.elapsed_s, eta_s=p.eta_s)
        if p.loss is not None:
            d["loss"] = p.loss
        if p.lr is not None:
            d["lr"] = p.lr
        if p.step > 0 and d["state"] == "preparing":
            d["state"] = "training"
        urgent = bool(p.message or p.samples)
        if p.message:
            d["message"] = p.message
            d["messages"] = (d["messages"] + [p.message])[-self.keep:]
        d["samples"] += [str(s) for s in p.samples]
        if urgent or time.monotonic() - self._last >= self.every_s:
            self.write()

    def finished(self, result) -> None:
        """A `TrainResult`: done, or stopped with its checkpoint."""
        self.data.update(state="stopped" if result.stopped else "done", step=result.steps,
                         final_loss=result.final_loss, seconds=result.seconds, eta_s=0.0,
                         adapter=str(result.adapter_path) if result.adapter_path else None,
                         checkpoint=str(result.checkpoint) if result.checkpoint else None)
        self.write()

    def failed(self, error: BaseException) -> None:
        from pipelines.errors import LoraStudioError

        if isinstance(error, KeyboardInterrupt):
            msg = "aborted (Ctrl-C twice)"
        elif isinstance(error, (LoraStudioError, FileNotFoundError)):
            msg = str(error)
        else:
            msg = f"{type(error).__name__}: {error}"
        self.data.update(state="failed", error=msg or type(error).__name__)
        self.write()


__all__ = ["JobStore", "RunStatus", "read_status", "settle", "process_token", "token_alive", "STATES", "ACTIVE"]
