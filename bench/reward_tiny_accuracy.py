"""Measurement (not a test): held-out accuracy of configs/reward-tiny-cpu.yaml.

    .venv/bin/python bench/reward_tiny_accuracy.py            # ~3 min, one CPU process

Runs ``mllama-train configs/reward-tiny-cpu.yaml`` as a user would (tokenizer trained and the
shipped data/preferences.jsonl preprocessed on first use, into a temporary directory) and
records every validation on the held-out pairs: loss, accuracy (r_chosen > r_rejected) and the
mean reward gap. Writes bench/results/reward_tiny_cpu.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="reward-tiny-") as tmp:
        env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "launch.train", str(ROOT / "configs" / "reward-tiny-cpu.yaml"),
                        f"train.save_dir={tmp}/run", f"data.cache_dir={tmp}/data"], env=env, check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    valid = [{"step": step, **v} for step, v in summary["valid_metrics"]]
    out = {"config": "configs/reward-tiny-cpu.yaml", "machine": platform.processor() or platform.machine(),
           "steps": summary["steps"], "wall_time_s": round(wall, 1), "train_time_s": summary["train_time_s"],
           "first_loss": summary["first_loss"], "final_loss": summary["final_loss"], "validations": valid,
           "final_valid_accuracy": valid[-1]["valid_accuracy"], "target_valid_accuracy": 0.9}
    path = ROOT / "bench" / "results" / "reward_tiny_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}: held-out accuracy {out['final_valid_accuracy']:.3f} after {out['steps']} steps")


if __name__ == "__main__":
    main()
