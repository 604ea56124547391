"""A fake trainer process for queue tests: writes a run folder the way `lora-studio train` does (progress.json,
log.csv), reports step 1, then waits for the test to release it before it finishes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

FAKE_TRAINER = r'''
import json, os, sys, time, tomllib
from pathlib import Path

cfg = tomllib.loads(Path(sys.argv[1]).read_text())
gate = Path(sys.argv[2])
run = Path(cfg["output_dir"]) / "runs" / cfg["name"]
run.mkdir(parents=True, exist_ok=True)
total = cfg["max_steps"]
status = {"version": 1, "pid": os.getpid(), "started": time.time(), "state": "training", "step": 1, "total": total,
          "loss": 0.5, "lr": 1e-3, "elapsed_s": 1.0, "eta_s": 3.0, "message": "", "messages": [], "samples": [],
          "adapter": None, "final_loss": None, "seconds": None, "checkpoint": None, "error": None}

def write():
    tmp = run / ".progress.json.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, run / "progress.json")

with open(run / "log.csv", "w") as f:
    f.write("step,loss,lr,elapsed_s\n1,0.5,1e-3,1.0\n")
write()
(gate / f"started-{time.time_ns()}-{cfg['name']}").touch()
deadline = time.time() + 120
while not (gate / "release").exists() and time.time() < deadline:
    time.sleep(0.02)
with open(run / "log.csv", "a") as f:
    f.write(f"{total},0.25,1e-3,2.0\n")
status.update(step=total, loss=0.25, final_loss=0.25, state="done", seconds=2.0, eta_s=0.0,
              adapter=str(Path(cfg["output_dir"]) / f"{cfg['name']}.safetensors"))
write()
'''


class _Release:
    def __init__(self, path: Path):
        self.path = path

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()


class FileGate:
    """`JobQueue(command=gate)`: each job's process is the fake trainer, blocked until `gate.release.set()`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.script = self.folder / "fake_trainer.py"
        self.script.write_text(FAKE_TRAINER)
        self.release = _Release(self.folder / "release")

    @property
    def started(self) -> list[str]:
        """Names of the jobs whose process has reported its first step, in order."""
        marks = sorted(p.name for p in self.folder.glob("started-*"))
        return [m.split("-", 2)[2] for m in marks]

    def __call__(self, job, config_path: Path) -> list[str]:
        return [sys.executable, str(self.script), str(config_path), str(self.folder)]


def wait_for(pred, timeout: float = 120.0, every: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())
