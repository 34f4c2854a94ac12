"""``mllama-bench``: training throughput of layouts, against the peers a user would pick instead.

Each configuration runs real optimizer steps (forward, backward, ZeRO-1 AdamW) in fresh
processes (``launch/bench_worker.py`` under torch.distributed.run), warm-up excluded, and
reports the median step: tokens/s/GPU, model TFLOP/s/GPU, MFU, peak memory per GPU, pipeline
bubble. ``--baseline`` runs peers (launch/bench_peers.py) in the same call, on the same shape,
sequence length, tokens per optimizer step and GPUs, each at its best micro-batch; every ratio
printed and stored names the peer it is against (``ours-bf16 / torchtitan``). Model FLOPs per token = 6 * N_matmul + 12 * L * d * s (megatron_llama/flops.py);
MFU = TFLOP/s per GPU / peak dense bf16 (A100 312, H100 989, H200 989).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_llama.config import ConfigError

EPILOG = """examples:
  # one GPU, the 7B block shape cut to 8 layers, 16 sequences per optimizer step, vs HF
  mllama-bench --preset llama-7b-8l --layouts tp1pp1dp1 --mbs 2,4,8 --baseline hf-deepspeed
  # bf16 and float8 against torchtitan (pip install .[bench]) and compiled HF, same call
  mllama-bench --mbs 8,16 --precision bf16,fp8 \
      --baseline hf-deepspeed,hf-compiled,torchtitan,torchtitan-fp8
  # a sweep on 4 GPUs, with selective recomputation as well
  mllama-bench --preset llama-7b --layouts tp1pp1dp4,tp2pp1dp2,tp1pp2dp2 --seqs-per-step 64 \\
      --checkpointing none,selective
  # on an H200, what fits on an 80 GB H100 (every system capped at 79.1 GiB)
  mllama-bench --mbs 8,16 --mem-cap-gib 79.1 --baseline torchtitan
  # Llama 3 8B block shape, 8 layers, seq 8192, 4 sequences per step
  mllama-bench --preset llama3-8b-8l --seq-len 8192 --seqs-per-step 4 --mbs 1,2 --baseline torchtitan
  # multi-node under SLURM (one layout per job): every rank measures, rank 0 aggregates
  sbatch --nodes 16 launch/slurm/bench.sbatch '{"impl":"ours","preset":"llama-65b",...}' out.json
  # analytic plan: LLaMA-65B on 2048 A100s, layouts ranked (no GPU needed)
  mllama-bench --plan --preset llama-65b --gpus 2048 --gpu-type A100 --seqs-per-step 2048
"""


def _layouts(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            tp = int(item.split("tp")[1].split("pp")[0])
            pp = int(item.split("pp")[1].split("dp")[0])
            dp = int(item.split("dp")[1])
        except (IndexError, ValueError):
            raise ConfigError(f"--layouts: {item!r} is not like tp2pp1dp4") from None
        if min(tp, pp, dp) < 1:
            raise ConfigError(f"--layouts: {item!r} has a size below 1: every one of tp, pp, dp must be >= 1")
        out.append((tp, pp, dp))
    return out


def _parallel_settings(text: str) -> dict:
    """``--parallel overlap_comm=true,reduce_bucket_size=50000000`` -> checked ParallelConfig fields."""
    import typing
    from megatron_llama.config import ConfigError, ParallelConfig
    from megatron_llama.config.load import _coerce
    fields = typing.get_type_hints(ParallelConfig)
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key in ("tp", "pp", "dp"):
            raise ConfigError(f"--parallel {item!r}: expected KEY=VALUE with KEY a parallel.* field other than "
                              f"tp/pp/dp (--layouts sets those), e.g. overlap_comm=true")
        out[key] = _coerce(value, fields[key], f"--parallel {key}")
    ParallelConfig(**out)  # validated once here, before any process starts
    return out


def _ints(text: str, flag: str = "--mbs") -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated positive integers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: give comma-separated positive integers, e.g. 1,2,4")
    return values


def check_args(args) -> None:
    """Every flag checked before any process starts or any file is written; raises ConfigError."""
    from megatron_llama.config.paths import output_prefix
    from megatron_llama.config.run import CHECKPOINT_MODES
    for flag, value, low in (("--seqs-per-step", args.seqs_per_step, 1), ("--seq-len", args.seq_len, 2),
                             ("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--gpus", args.gpus, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.mem_cap_gib is not None and args.mem_cap_gib <= 0:
        raise ConfigError(f"--mem-cap-gib must be positive GiB, got {args.mem_cap_gib:g}")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive seconds, got {args.timeout:g}")
    bad = [m for m in args.checkpointing.split(",") if m not in CHECKPOINT_MODES]
    if bad:
        raise ConfigError(f"--checkpointing {bad[0]!r}: choose from {', '.join(CHECKPOINT_MODES)}")
    _layouts(args.layouts)
    _ints(args.mbs)
    output_prefix(args.out, "--out")


def _run_one(spec: dict, timeout: float) -> dict:
    """Start spec's world of processes on this machine; returns rank 0's result."""
    world = spec["tp"] * spec["pp"] * spec["dp"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "launch.bench_worker", json.dumps(spec), str(out)]
        # every system gets the same allocator: expandable segments (torchtitan's launcher sets it
        # too) keep the reserved memory near the allocated peak instead of fragmenting
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return dict(spec, error=f"timed out after {timeout:.0f}s")
        if out.exists():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        err = "out of memory" if "OutOfMemoryError" in (proc.stderr or "") else " | ".join(tail)[-300:]
        lines = [ln for ln in (proc.stderr or "").splitlines() if "Error" in ln or "error:" in ln]
        return dict(spec, error=(lines[-1][-300:] if lines and err != "out of memory" else err),
                    stderr_tail=(proc.stderr or "")[-4000:])


def _system(r: dict) -> str:
    """``ours-bf16``, ``ours-fp8``, ``ours-fp8-rowwise`` or the peer's name."""
    if r["impl"] != "ours":
        return r["impl"]
    prec = r.get("precision") or "bf16"
    if prec == "fp8" and r.get("fp8_recipe") == "rowwise":
        prec = "fp8-rowwise"
    return f"ours-{'bf16' if prec == 'auto' else prec}"


def _row(r: dict) -> str:
    name = _system(r) if r["impl"] != "ours" else f"{_system(r)} TP{r['tp']}·PP{r['pp']}·DP{r['dp']}"
    head = f"{name:>26} {r['mbs']:>4} {r['gas']:>4} {r['checkpointing']:>9}"
    if "error" in r:
        return f"{head}  {r['error']}"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
    return (f"{head} {r['step_s']:>7.3f} {r['tokens_per_s_per_gpu']:>10.0f} {r['tflops_per_gpu']:>8.1f} "
            f"{mfu:>6} {r['peak_mem_gib']:>8.1f} {r['bubble']:>6.1%}")


HEADER = (f"{'system':>26} {'mbs':>4} {'gas':>4} {'ckpt':>9} {'step s':>7} {'tok/s/GPU':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'bubble':>6}")


def _plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "error" not in r]
    labels = [_system(r) + ("" if r["impl"] != "ours" else f"\ntp{r['tp']}pp{r['pp']}dp{r['dp']}")
              + f"\nmbs{r['mbs']} {r['checkpointing']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, len(ok) * 1.1), 4))
    colors = ["tab:gray" if r["impl"] != "ours" else "tab:blue" for r in ok]
    bars = ax.bar(range(len(ok)), [r["tflops_per_gpu"] for r in ok], color=colors)
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(ok)), labels, fontsize=7)
    ax.set_ylabel("model TFLOP/s per GPU")
    ax.set_title(f"{ok[0]['preset']} seq {ok[0]['seq_len']} on {ok[0]['device']}" if ok else "no results")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def largest_fitting(results: list[dict]) -> dict:
    """Per system (and recompute mode): the largest micro-batch that ran, and those that ran out of memory."""
    out: dict[str, dict] = {}
    for r in results:
        key = f"{_system(r)} {r['checkpointing']}"
        entry = out.setdefault(key, {"largest_mbs": None, "oom_mbs": []})
        if "error" not in r:
            entry["largest_mbs"] = max(entry["largest_mbs"] or 0, r["mbs"])
        elif r["error"] == "out of memory":
            entry["oom_mbs"].append(r["mbs"])
    return out


def summarize(results: list[dict], cfg) -> dict:
    """Best run of each system, ours-X / peer ratios (every one named), plan-vs-measured error."""
    from . import bench_plan
    ok = [r for r in results if "error" not in r]
    best: dict[str, dict] = {}
    for r in ok:
        if _system(r) not in best or r["tflops_per_gpu"] > best[_system(r)]["tflops_per_gpu"]:
            best[_system(r)] = r
    keys = ("impl", "tp", "pp", "dp", "mbs", "gas", "checkpointing", "tflops_per_gpu", "tokens_per_s_per_gpu",
            "mfu", "peak_mem_gib", "step_s")
    summary = {"best": {k: {f: b.get(f) for f in keys} for k, b in best.items()}, "ratios": {},
               "largest_mbs_that_fits": largest_fitting(results)}
    for o in (k for k in best if k.startswith("ours")):
        for peer in (k for k in best if not k.startswith("ours")):
            summary["ratios"][f"{o} / {peer}"] = best[o]["tflops_per_gpu"] / best[peer]["tflops_per_gpu"]
    ours = [r for r in ok if r["impl"] == "ours" and r.get("precision", "bf16") != "fp8"]
    if ours:
        name = ours[0]["device"]
        gpu = bench_plan.GPUS.get("H200" if "H200" in name else "H100" if "H100" in name else "A100")
        errors = []
        for r in ours:
            est = bench_plan.estimate(cfg, gpu, r["tp"], r["pp"], r["dp"], r["mbs"], r["gas"], r["seq_len"],
                                      r["checkpointing"])
            r["plan_step_s"], r["plan_mem_gib"] = est.step_s, est.mem_gib
            errors.append(abs(est.step_s - r["step_s"]) / r["step_s"])
        summary["plan_step_time_rel_error_max"] = max(errors)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mllama-bench", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b-8l", help="model preset (see megatron_llama/config/presets.py)")
    p.add_argument("--layouts", default="tp1pp1dp1", help="comma list like tp1pp1dp4,tp2pp2dp1")
    p.add_argument("--mbs", default="1,2,4,8", help="micro-batch sizes to try (the best is reported)")
    p.add_argument("--seqs-per-step", type=int, default=16, help="sequences per optimizer step (global batch)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--checkpointing", default="none", help="comma list of none,selective,full")
    p.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--baseline", default="", help="comma list of peers to run in the same call: "
                   "hf-deepspeed (HF + ZeRO-1, eager), hf-compiled (each decoder layer compiled), torchtitan, "
                   "torchtitan-fp8, torchtitan-fp8-rowwise (torchtitan 0.2.2: pip install .[bench])")
    p.add_argument("--precision", default="bf16", help="comma list for our runs: bf16, fp8 (tensorwise), "
                   "fp8-rowwise (float8 needs a Hopper GPU)")
    p.add_argument("--no-compile", action="store_true", help="run our blocks eagerly")
    p.add_argument("--parallel", default="", metavar="KEY=VALUE,...",
                   help="extra parallel.* settings for our runs, e.g. overlap_comm=true,reduce_bucket_size=50000000")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--mem-cap-gib", type=float, default=None, metavar="GIB",
                   help="cap every system's GPU memory (allocator included) at GIB, e.g. 79.1 to ask on an "
                        "H200 what fits on an 80 GB H100")
    p.add_argument("--out", default="bench/results/bench.json", help="JSON results (PNG plot beside it)")
    p.add_argument("--plan", action="store_true", help="print the analytic plan only (no GPU needed)")
    p.add_argument("--gpus", type=int, default=8, help="--plan: number of GPUs")
    p.add_argument("--gpu-type", default="H100", help="--plan: A100, H100 or H200")
    args = p.parse_args(argv)

    from .bench_shapes import bench_model
    try:
        check_args(args)
        cfg = bench_model(args.preset, args.seq_len)
        return _plan(args, cfg) if args.plan else _sweep(args, argv, cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _plan(args, cfg) -> int:
    """The analytic layout ranking (launch/bench_plan.py): no GPU needed."""
    from . import bench_plan
    gpu = bench_plan.GPUS.get(args.gpu_type.upper())
    if gpu is None:
        raise ConfigError(f"--gpu-type {args.gpu_type}: choose one of {', '.join(bench_plan.GPUS)}")
    rows = bench_plan.plan(cfg, gpu, args.gpus, args.seqs_per_step, args.seq_len)
    if not rows:
        raise ConfigError(f"no layout of {args.gpus} GPUs fits {args.preset} with {args.seqs_per_step} "
                          "sequences per step (tp must divide the heads, dp the batch): change --gpus or "
                          "--seqs-per-step")
    print(f"plan: {args.preset} ({cfg.num_params() / 1e9:.1f}B) on {args.gpus} x {gpu.name}, "
          f"{args.seqs_per_step} x {args.seq_len} tokens per step")
    print(bench_plan.format_plan(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"plan": bench_plan.as_dicts(rows)}, indent=1))
    return 0


def _sweep(args, argv, cfg) -> int:
    from megatron_llama.config.run import ParallelConfig
    extra = _parallel_settings(args.parallel)
    for tp, pp, _dp in _layouts(args.layouts):
        ParallelConfig(tp=tp, pp=pp).check_model(cfg)  # before any process starts
    from .bench_peers import PEERS
    peers = [b for b in args.baseline.split(",") if b]
    precisions = [x for x in args.precision.split(",") if x]
    for name in peers:
        if name not in PEERS:
            raise ConfigError(f"--baseline {name}: choose from {', '.join(PEERS)}")
    for prec in precisions:
        if prec not in ("bf16", "fp8", "fp8-tensorwise", "fp8-rowwise"):
            raise ConfigError(f"--precision {prec}: choose from bf16, fp8, fp8-rowwise")
    specs = []
    for tp, pp, dp in _layouts(args.layouts):
        for prec in precisions:
            for mode in args.checkpointing.split(","):
                for mbs in _ints(args.mbs):
                    if args.seqs_per_step % (mbs * dp):
                        continue
                    specs.append(dict(impl="ours", preset=args.preset, tp=tp, pp=pp, dp=dp, mbs=mbs,
                                      gas=args.seqs_per_step // (mbs * dp), checkpointing=mode,
                                      seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                                      compile=False if args.no_compile else None,
                                      precision="fp8" if prec.startswith("fp8") else "auto",
                                      fp8_recipe="rowwise" if prec == "fp8-rowwise" else "tensorwise",
                                      parallel=extra))
    if not specs:
        raise ConfigError(f"no --mbs value in {args.mbs} times dp divides --seqs-per-step {args.seqs_per_step}:"
                          " change --mbs or --seqs-per-step")
    gpus = max(s["tp"] * s["pp"] * s["dp"] for s in specs)
    for name in peers:
        for mbs in _ints(args.mbs):
            if args.seqs_per_step % (mbs * gpus) == 0:
                specs.append(dict(impl=name, preset=args.preset, tp=1, pp=1, dp=gpus, mbs=mbs,
                                  gas=args.seqs_per_step // (mbs * gpus), checkpointing="none",
                                  seq_len=args.seq_len, steps=args.steps, warmup=args.warmup))

    if args.mem_cap_gib is not None:
        for spec in specs:
            spec["mem_cap_gib"] = args.mem_cap_gib
    print(HEADER, flush=True)
    results = []
    for spec in specs:
        t0 = time.time()
        r = _run_one(spec, args.timeout)
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(_row(r), flush=True)

    summary = summarize(results, cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["mllama-bench", *(argv or sys.argv[1:])]),
                               "summary": summary, "results": results}, indent=1))
    plotted = _plot(results, out.with_suffix(".png"))
    for system, b in summary["best"].items():
        where = f"TP{b['tp']}·PP{b['pp']}·DP{b['dp']} " if system.startswith("ours") else ""
        print(f"best {system}: {where}mbs {b['mbs']} {b['checkpointing']}: {b['tflops_per_gpu']:.1f} TFLOP/s/GPU, "
              f"{b['tokens_per_s_per_gpu']:.0f} tok/s/GPU, {b['peak_mem_gib']:.1f} GiB")
    for key, fit in summary["largest_mbs_that_fits"].items():
        oom = f", out of memory at {','.join(map(str, fit['oom_mbs']))}" if fit["oom_mbs"] else ""
        print(f"largest micro-batch that fits, {key}: {fit['largest_mbs']}{oom}")
    for name, ratio in summary["ratios"].items():
        print(f"{name} (each at its best micro-batch): {ratio:.3f}x")
    if "plan_step_time_rel_error_max" in summary:
        print(f"analytic plan vs measured step time: max relative error {summary['plan_step_time_rel_error_max']:.1%}")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
