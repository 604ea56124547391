"""LoRA Studio's command line as bench/train_speed.py's "ours": `python bench/ours_shim.py train ...` runs
`app.cli` unchanged. With $LORA_STUDIO_BENCH_PEAK set, the process's peak RSS (kB) is written there when
training ends, before the end-of-run sample, weight check and save: the same phase bench/peer_shim.py records
for diffusers' example, so the two peaks compare like with like.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peer_shim import peak_kb  # noqa: E402  (bench/, this script's folder: the peer's shim records the same figure)


def record_peak_at_training_end() -> None:
    path = os.environ.get("LORA_STUDIO_BENCH_PEAK")
    if not path:
        return
    from training.trainer import Trainer

    original = Trainer.make_samples
    done = [False]

    def make_samples(self, step):
        if step == self.cfg.max_steps and not done[0]:  # the run's final samples: the training loop is over
            done[0] = True
            Path(path).write_text(peak_kb())
        return original(self, step)

    Trainer.make_samples = make_samples


if __name__ == "__main__":
    record_peak_at_training_end()
    from app.cli import main

    sys.exit(main(sys.argv[1:]))
