"""Cost of DPO's stored reference pass (launch/reference_pass.py), measured on CPU with the tiny
model, and what it implies for LLaMA-7B against the alternative, a frozen co-resident reference.

One process (gloo, TP1·PP1·DP1, fp32): a random tiny ``LlamaForCausalLM`` saved with
``save_pretrained`` is the policy start and the reference; the shipped preference set (4000 pairs,
seq_len 96) is preprocessed into a scratch directory. Measured:

* the reference pass over every training pair (``reference_pass.compute``): seconds, pairs/s, and
  the growth of peak RSS during it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``);
* ``--steps`` DPO training steps at the same micro-batch: seconds per pair, to compare the one-off
  pass with a co-resident reference, which adds one forward of the reference per pair *every* epoch
  and keeps a second copy of the weights resident;
* the stored file's size.

The 7B figures are arithmetic, stated with their formula: forward FLOPs per token
``2 * N_matmul + 4 * L * d * s`` (a third of megatron_llama/flops.py's training FLOPs), at an
assumed MFU, and bf16 weight bytes for the co-resident copy.

    python bench/dpo_reference_pass.py --out bench/results/dpo_reference_pass.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 1024 ** 3


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def estimate_7b(pairs: int, seq_len: int, gpus: int, mfu: float, epochs: int) -> dict:
    from megatron_llama.config import preset
    from megatron_llama.flops import PEAK_BF16_TFLOPS
    cfg = preset("llama-7b")
    fwd_per_token = 2 * cfg.matmul_params() + 4 * cfg.num_layers * cfg.hidden_size * seq_len
    tokens = pairs * 2 * seq_len
    flops = tokens * fwd_per_token
    rate = gpus * PEAK_BF16_TFLOPS["H100"] * 1e12 * mfu
    weights = cfg.num_params() * 2  # bf16
    return {"model": "llama-7b", "pairs": pairs, "seq_len": seq_len, "tokens": tokens,
            "forward_flops_per_token": fwd_per_token, "pass_flops": flops,
            "assumed": f"{gpus} x H100 at {mfu:.0%} MFU ({PEAK_BF16_TFLOPS['H100']:g} TFLOP/s bf16 peak)",
            "stored_pass_seconds": round(flops / rate, 1),
            "stored_pass_extra_memory_bytes": 0, "stored_file_bytes": pairs * 16,
            "co_resident_forward_seconds_per_epoch": round(flops / rate, 1),
            "co_resident_forward_seconds_total": round(epochs * flops / rate, 1), "epochs": epochs,
            "co_resident_extra_weight_bytes_per_replica": weights,
            "co_resident_extra_weight_gib_per_gpu_at_tp8": round(weights / 8 / GIB, 2),
            "note": "both compute the same reference forward once per pair per pass; the stored pass does it "
                    "once in total and holds no second copy of the weights (the co-resident copy's bf16 weights "
                    "are split over TP x PP, and the policy's activations leave less room at the same batch)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dpo_reference_pass.json"))
    ap.add_argument("--steps", type=int, default=10, help="DPO training steps timed for comparison")
    ap.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import torch
    import transformers

    from launch import reference_pass
    from launch.lr_schedule import schedule_for
    from launch.train import _init_from, _quiet_libraries, rank_zero_first
    from megatron_llama.config import load_config, preset
    from megatron_llama.data.preference_build import build_preference_dataset
    from megatron_llama.data.preference_dataset import PreferenceBatchIterator
    from megatron_llama.model.hf_mapping import hf_config_kwargs
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed

    _quiet_libraries()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="dpo-ref-bench-"))
    try:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_kwargs(preset("tiny")))).float() \
            .save_pretrained(scratch / "hf")
        cfg = load_config(None, ["model.preset=tiny", "train.objective=dpo", f"train.init_from=hf:{scratch}/hf",
                                 f"data.corpus={ROOT / 'data' / 'preferences.jsonl'}", "data.seq_len=96",
                                 f"data.cache_dir={scratch}/data", f"train.micro_batch_size={args.micro_batch}",
                                 "train.grad_accum_steps=1", "train.precision=fp32", "train.weight_decay=0",
                                 "train.lr=1e-3", "train.warmup_steps=1", f"train.save_dir={scratch}/run"])
        device, _ = init_distributed()
        layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
        init_weights, _ = _init_from(cfg, layout, save=False)
        engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train), init_weights=init_weights)
        ds = build_preference_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size, rank_zero_first=rank_zero_first)
        rss0 = _rss_kib()
        _reset_hwm()
        t0 = time.perf_counter()
        table = reference_pass.compute(engine, ds, layout, cfg, lambda line: None)
        pass_s = time.perf_counter() - t0
        hwm = _hwm_kib()
        from megatron_llama.data import reference_logps as store
        path = scratch / "ref.npz"
        store.save(path, store.make_key("bench", ds), table)
        engine.objective.tables["train"] = torch.from_numpy(table)

        batches = PreferenceBatchIterator(ds, cfg.train.seed, 0, 0, 1, args.micro_batch)
        engine.train_step(iter([next(batches)]))  # warm-up
        _reset_hwm()
        rss1 = _rss_kib()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.train_step(iter([next(batches)]))
        step_s = (time.perf_counter() - t0) / args.steps
        train_hwm = _hwm_kib()
        params = sum(p.numel() for p in engine.engine.module.parameters())
        result = {
            "what": "DPO reference pass (stored, computed once at step 0) vs co-resident reference",
            "machine": "CPU, 1 process, 1 thread, fp32", "model": "tiny (d 64, 4 layers, vocab 512)",
            "params": params, "pairs": len(ds), "seq_len": cfg.data.seq_len, "micro_batch_pairs": args.micro_batch,
            "reference_pass_seconds": round(pass_s, 3), "reference_pass_pairs_per_s": round(len(ds) / pass_s, 1),
            "reference_pass_peak_rss_growth_mib": round((hwm - rss0) / 1024, 2),
            "train_step_seconds_per_pair": step_s / args.micro_batch,
            "train_step_peak_rss_growth_mib": round((train_hwm - rss1) / 1024, 2),
            "reference_pass_seconds_per_pair": pass_s / len(ds),
            "pass_over_train_epoch": round((pass_s / len(ds)) / (step_s / args.micro_batch), 3),
            "stored_file_bytes": path.stat().st_size,
            "co_resident_extra_weight_bytes": params * 4,
            "llama_7b_estimate": estimate_7b(pairs=100_000, seq_len=2048, gpus=8, mfu=0.4, epochs=3),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
