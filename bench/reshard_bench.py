"""Peak RSS and GB/s of ``mllama-convert reshard`` on LLaMA-7B-shaped checkpoints with optimizer state.

A full 7B native checkpoint with fp32 masters and two Adam moments is ~84 GB, more than this
machine's disk and memory budget allow next to its other users, so the model is the 7B shape
(d 4096, ffn 11008, 32 heads, vocabulary 32000) cut to a few layers; comparing two layer
counts shows whether memory grows with depth (it must not) and how time scales per layer.

The input is written directly in the file format that DeepSpeed's ZeRO-1 writes for our
training runs at TP2·PP2·DP4 (``mp_rank_XX_model_states.pt`` with ``param_shapes``,
``zero_pp_rank_D_mp_rank_XX_optim_states.pt`` with flat fp32 partitions, Adam moments and
``param_slice_mappings``), one file at a time, with random values; training a 7B-shaped model
on this CPU to get one is not possible. Correctness on real DeepSpeed checkpoints is what
tests/test_checkpoint_reshard.py proves; this measures cost.

    PYTHONPATH=. python bench/reshard_bench.py --layers 2 8 --work /tmp/reshard-bench

Memory is reported three ways, because ``ru_maxrss`` alone cannot tell a leak from mapped
input: ``peak_rss_gib`` (the kernel's ``ru_maxrss``: anonymous memory AND the pages of the
memory-mapped input shards that were touched), and, from a thread sampling
``/proc/self/status`` every 2 ms, ``peak_anon_gib`` (``RssAnon``: what the converter allocates)
and ``peak_file_gib`` (``RssFile``: mapped input pages, plus the interpreter's own libraries),
overall and per pipeline layer. Clean mapped pages can be reclaimed by the kernel under memory
pressure, so ``RssFile`` (and ``ru_maxrss``) depend on what else runs; ``RssAnon`` does not.
A small shape (seconds, not minutes) checks that neither grows with depth::

    PYTHONPATH=. python bench/reshard_bench.py --hidden 1024 --heads 8 --vocab 4096 --layers 4 16 \\
        --out bench/results/reshard_memory_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TP, PP, DP = 2, 2, 4


def write_native(cfg, out: Path) -> int:
    """A TP·PP·DP ZeRO-1 native checkpoint of ``cfg`` (random values); returns its bytes."""
    from deepspeed.utils.tensor_fragment import fragment_address

    from megatron_llama.checkpoint.params import param_table
    from megatron_llama.config import config_to_dict
    from megatron_llama.model.layout import shard

    table = param_table(cfg.model, TP)
    blocks = cfg.model.num_layers
    first_stage_end = 1 + blocks // 2  # stage 0: embedding + the first half of the blocks
    step = out / "step0000100"
    step.mkdir(parents=True)
    total = 0
    for stage in range(PP):
        rows = [r for r in table if (r.layer < first_stage_end) == (stage == 0)]
        for t in range(TP):
            mp = stage * TP + t
            shapes = [OrderedDict(), OrderedDict()]  # group 0: matrices (decayed), group 1: 1-D
            for r in rows:
                local = tuple(shard(torch.empty(r.shape, device="meta"), r.split, t, TP).shape)
                shapes[0 if len(local) > 1 else 1][r.pipe_name] = torch.Size(local)
            sched = {"base_lrs": [3e-4, 3e-4], "last_epoch": 100, "_step_count": 101, "_is_initial": False,
                     "_get_lr_called_within_step": False, "_last_lr": [2.9e-4, 2.9e-4], "lr_lambdas": [None, None]}
            torch.save({"module": None, "param_shapes": shapes, "lr_scheduler": sched, "global_steps": 100,
                        "global_samples": 1600, "skipped_steps": 0, "step": 100, "consumed_samples": 1600},
                       step / f"mp_rank_{mp:02d}_model_states.pt")
            for d in range(DP):
                fp32, state, mappings = [], {}, []
                for g, group in enumerate(shapes):
                    sizes = [s.numel() for s in group.values()]
                    flat = sum(sizes)
                    part = -(-flat // DP)
                    lo, hi = d * part, min(flat, (d + 1) * part)
                    m, offset = OrderedDict(), 0
                    for name, n in zip(group, sizes):
                        a, b = max(lo, offset), min(hi, offset + n)
                        if a < b:
                            m[name] = fragment_address(numel=b - a, start=a - lo)
                        offset += n
                    mappings.append(m)
                    fp32.append(torch.randn(part))
                    state[g] = {"step": torch.tensor(100.0), "exp_avg": torch.randn(part).mul_(1e-3),
                                "exp_avg_sq": torch.rand(part).mul_(1e-6)}
                    total += 3 * 4 * part
                groups = [{"weight_decay": wd, "lr": 2.9e-4, "betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": False,
                           "initial_lr": 3e-4, "params": [g]} for g, wd in enumerate((0.1, 0.0))]
                torch.save({"optimizer_state_dict": {
                    "param_slice_mappings": mappings, "single_partition_of_fp32_groups": fp32,
                    "base_optimizer_state": {"state": state, "param_groups": groups}, "zero_stage": 1}},
                    step / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")
                del fp32, state
    meta = {"step": 100, "consumed_samples": 1600, "last_loss": 0.0, "reason": "bench",
            "layout": {"tp": TP, "pp": PP, "dp": DP, "world_size": TP * PP * DP}, "config": config_to_dict(cfg)}
    (step / "run.json").write_text(json.dumps(meta, default=str))
    (out / "latest").write_text(step.name)
    return total


def layer_bytes(cfg) -> int:
    """fp32 master + two moments of the largest pipeline layer (what reshard holds at once)."""
    from megatron_llama.checkpoint.params import param_table
    per = {}
    for r in param_table(cfg.model, 1):
        n = 1
        for s in r.shape:
            n *= s
        per[r.layer] = per.get(r.layer, 0) + 12 * n
    return max(per.values())


def _status_mib() -> dict[str, float]:
    """RssAnon, RssFile, VmRSS and VmHWM of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def child(argv: list[str]) -> None:
    """The measured process: ``mllama-convert reshard`` with a thread sampling its memory; each
    sample is attributed to the pipeline layer of the parameter being read."""
    from checkpoints_tools.convert import main as convert
    from megatron_llama.checkpoint import optimizer_state

    layer = [-1]
    peaks: dict[int, dict[str, float]] = {}
    table, read = optimizer_state._table_by_stage, optimizer_state._StageShards.shard
    rows = {}

    def remember_table(ckpt):
        rows.update(table(ckpt))
        return rows

    def traced_shard(self, name, *args):
        layer[0] = rows[name].layer
        return read(self, name, *args)

    optimizer_state._table_by_stage = remember_table
    optimizer_state._StageShards.shard = traced_shard
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status_mib()
            p = peaks.setdefault(layer[0], {"anon": 0.0, "file": 0.0, "rss": 0.0})
            p["anon"], p["file"], p["rss"] = (max(p["anon"], s["RssAnon"]), max(p["file"], s["RssFile"]),
                                              max(p["rss"], s["VmRSS"]))
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = convert(argv)
    done.set()
    sampler.join()
    per_layer = [{"layer": k, **{n: round(v, 1) for n, v in p.items()}} for k, p in sorted(peaks.items()) if k >= 0]
    print("MEMORY " + json.dumps({"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                  "vm_hwm_mib": round(_status_mib()["VmHWM"], 1),
                                  "start_mib": peaks.get(-1), "per_layer_mib": per_layer}), flush=True)
    sys.exit(rc)


def _spread(values: list[float]) -> float:
    return round(max(values) - min(values), 1) if values else 0.0


def measure(layers: int, work: Path, target: tuple[int, int, int], shape: list[str]) -> dict:
    from megatron_llama.config import load_config
    cfg = load_config(None, ["model.preset=llama-7b", f"model.num_layers={layers}", "model.vocab_size=32000",
                             *shape, f"parallel.tp={TP}", f"parallel.pp={PP}", f"parallel.dp={DP}",
                             "train.micro_batch_size=1", "train.grad_accum_steps=4"])
    src, out = work / f"src-{layers}l", work / f"out-{layers}l"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_native(cfg, src)
    gen_s = time.perf_counter() - t0
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "reshard", str(src), str(out), "--tp", str(target[0]), "--pp", str(target[1]), "--dp", str(target[2]),
           "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(p.stdout + p.stderr)
    mem = json.loads(next(line[7:] for line in p.stdout.splitlines() if line.startswith("MEMORY ")))
    rss_kb = mem["ru_maxrss_kib"]
    per_layer = mem["per_layer_mib"]
    blocks = [r for r in per_layer if 1 <= r["layer"] <= layers]  # the transformer blocks
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(src)
    shutil.rmtree(out)
    return {"layers": layers, "input_bytes": nbytes, "output_bytes": written, "generate_s": round(gen_s, 1),
            "reshard_wall_s": round(wall, 1), "gb_per_s": round(written / 1e9 / wall, 3),
            "peak_rss_gib": round(rss_kb / 2 ** 20, 2),
            "peak_anon_gib": round(max(r["anon"] for r in per_layer) / 1024, 3),
            "peak_file_gib": round(max(r["file"] for r in per_layer) / 1024, 3),
            "start_anon_mib": round(mem["start_mib"]["anon"], 1), "start_file_mib": round(mem["start_mib"]["file"], 1),
            "blocks_anon_spread_mib": _spread([r["anon"] for r in blocks]),
            "blocks_file_spread_mib": _spread([r["file"] for r in blocks]),
            "largest_layer_gib": round(layer_bytes(cfg) / 2 ** 30, 3),
            "target_gib": round(3 * layer_bytes(cfg) / 2 ** 30 + 2, 2), "per_layer_peak_mib": per_layer}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--work", default="/tmp/reshard-bench")
    ap.add_argument("--to", type=int, nargs=3, default=[4, 1, 2], metavar=("TP", "PP", "DP"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reshard_7b_shape.json"))
    ap.add_argument("--hidden", type=int, help="hidden size instead of 7B's 4096 (a small probe)")
    ap.add_argument("--heads", type=int, help="attention heads instead of 7B's 32")
    ap.add_argument("--vocab", type=int, help="vocabulary instead of 32000")
    args = ap.parse_args()
    shape = [f"model.{k}={v}" for k, v in (("hidden_size", args.hidden), ("num_attention_heads", args.heads),
                                           ("vocab_size", args.vocab)) if v is not None]
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.layers:
        runs.append(measure(n, work, tuple(args.to), shape))
        print(json.dumps(runs[-1]), flush=True)
    what = "LLaMA-7B shape" if not shape else "LLaMA-7B shape with " + ", ".join(shape)
    result = {"what": f"mllama-convert reshard, {what} cut to N layers, TP{TP}·PP{PP}·DP{DP} ZeRO-1 -> "
                      f"TP{args.to[0]}·PP{args.to[1]}·DP{args.to[2]}, fp32 masters + Adam moments",
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, shared with other jobs; "
                         "input freshly written (likely in the page cache)",
              "runs": runs}
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        result["per_layer_s"] = round((b["reshard_wall_s"] - a["reshard_wall_s"]) / (b["layers"] - a["layers"]), 2)
        for key, name in (("peak_rss_gib", "rss"), ("peak_anon_gib", "anon"), ("peak_file_gib", "file")):
            result[f"{name}_growth_mib_per_layer"] = round((b[key] - a[key]) * 1024 / (b["layers"] - a["layers"]), 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
