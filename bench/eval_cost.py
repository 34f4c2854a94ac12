"""What lm-eval tasks cost a run: ``python bench/eval_cost.py [--layout tp2pp2] [--limit 16]``.

Trains the tiny model (configs/tiny-cpu-3d.yaml shape, CPU, fp32) for ``--steps`` steps with
``train.eval_tasks`` on the shipped offline tasks at every checkpoint, then reads from its
``metrics.jsonl`` the seconds each in-training evaluation held the ranks against the median step
time. Then it times ``mllama-eval`` on the last checkpoint (native, at the run's layout, including
process start-up) and on its fp32 HF export (lm-eval's hf backend). Writes
``bench/results/eval_cost_tiny_cpu.json``. On a shared machine the seconds are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = "mllama_story_color,mllama_story_count,mllama_corpus_ppl"


def _run(args: list, env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"error: {' '.join(map(str, args[:2]))} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="tp2pp2", help="tpNppM of the training run (DP 1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-interval", type=int, default=10)
    ap.add_argument("--limit", type=int, default=16, help="items per task")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_cost_tiny_cpu.json"))
    args = ap.parse_args(argv)
    m = re.fullmatch(r"tp(\d+)pp(\d+)", args.layout)
    if not m:
        sys.exit(f"error: --layout {args.layout!r}: write tpNppM, e.g. tp2pp2")
    tp, pp = m.groups()
    with tempfile.TemporaryDirectory(prefix="eval-cost-") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"))
        run = tmp / "run"
        train_s = _run(["launch.train", ROOT / "configs" / "tiny-cpu-3d.yaml", f"parallel.tp={tp}", f"parallel.pp={pp}",
                        "parallel.dp=1", f"train.steps={args.steps}", f"train.save_interval={args.save_interval}",
                        f"train.save_dir={run}", f"data.corpus={ROOT / 'data' / 'corpus.jsonl'}",
                        f"data.cache_dir={tmp / 'data'}", "train.eval_interval=0", "train.log_interval=1",
                        f"train.eval_tasks=[{TASKS}]", f"train.eval_tasks_limit={args.limit}"], env, tmp)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["type"] == "train"]
        step_s = statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:]))
        evals = [{"step": r["step"], "seconds": r["eval/seconds"]} for r in records if r["type"] == "eval_tasks"]
        hf = tmp / "hf"
        _run(["checkpoints_tools.convert", "native-to-hf", run, hf, "--dtype", "fp32", "--no-progress", "--verify", "no"],
             env, tmp)
        common = ["--tasks", TASKS, "--limit", args.limit, "--no-progress"]
        native_s = _run(["launch.eval", run, *common, "--output", tmp / "native.json"], env, tmp)
        hf_s = _run(["launch.eval", hf, *common, "--output", tmp / "hf.json"], env, tmp)
        native = json.loads((tmp / "native.json").read_text())
        hf_res = json.loads((tmp / "hf.json").read_text())
    out = {"what": "lm-eval tasks on the tiny model (d=64, 4 layers, vocab 512), fp32, CPU",
           "machine": f"{os.cpu_count()} CPU cores (shared: seconds are upper bounds)",
           "layout": f"TP{tp}·PP{pp}·DP1", "tasks": TASKS.split(","), "items_per_task": args.limit,
           "train_wall_s": round(train_s, 1), "median_step_s": round(step_s, 3),
           "in_training_evaluations": evals,
           "in_training_eval_over_step": round(statistics.median(e["seconds"] for e in evals) / step_s, 1),
           "mllama_eval_native_wall_s": round(native_s, 1), "mllama_eval_native_eval_s": native["seconds"],
           "mllama_eval_hf_wall_s": round(hf_s, 1), "mllama_eval_hf_eval_s": hf_res["seconds"],
           "rows_native": native["rows"], "rows_hf": hf_res["rows"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("rows")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
