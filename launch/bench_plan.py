"""``mllama-bench --plan``: an analytic estimate of memory and throughput per layout.

A first-order model, calibrated on one measurement and stated here so its error can be
checked against real runs (``mllama-bench`` reports predicted vs measured):

* **Memory per GPU** = weights/grads/optimizer + activations + logits.
  Static: ``P_gpu * (2 bf16 weights + 2 bf16 grads + 4 fp32 grad accumulation + 12 / dp)``
  bytes (fp32 master, Adam m and v partitioned by ZeRO-1 over DP; no fp32 accumulation at
  gas 1, DP 1, PP 1); ``P_gpu`` = the largest
  stage's parameters / TP. Activations per block per micro-batch:
  ``s * b * d * (8 + 32 / tp)`` bytes without recomputation (measured: 40 bytes per token per
  hidden unit for the 7B block at TP 1 on an H100), ``(8 + 22 / tp)`` selective, ``2`` full
  (+ one block live); the first stage holds ``pp`` micro-batches in flight (1F1B).
  Logits: ``3 * s * b * V / tp * 4`` bytes on the last stage (PP = 1: one chunk of the
  chunked loss, at most 1.5 GiB).
* **Step time** = compute / efficiency x (1 + bubble) + TP + DP communication + optimizer.
  Compute: model FLOPs / peak at ``EFFICIENCY`` (0.584), x4/3 for full recomputation, x1.05
  selective. Per micro-batch: ``48 bytes * P_gpu`` over HBM bandwidth (fp32 gradient
  accumulation, hooks, launch overhead). Both constants are fitted to the H100 sweep of the
  LLaMA-7B shape at micro-batches 2/4/8 (bench/results/h100-llama7b8l.json: within 2%). Bubble (1F1B): ``(pp - 1) / m``. TP: 4 all-reduces of ``s*b*d`` bf16 per block
  per micro-batch, ring cost ``2 (tp-1)/tp * bytes / bw_intra``. DP: one all-reduce of the
  fp32 gradient partition per step over ``bw_intra`` (DP inside a node) or ``bw_inter``.
  Optimizer: ``20 bytes * P_gpu / dp`` over HBM bandwidth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_llama.config import ModelConfig
from megatron_llama.flops import flops_per_token

EFFICIENCY = 0.584
MICRO_BATCH_BYTES_PER_PARAM = 48


@dataclass
class GPU:
    name: str
    peak_tflops: float
    hbm_gib: float
    hbm_gbs: float
    intra_gbs: float    # achievable all-reduce bus bandwidth inside a node (NVLink)
    inter_gbs: float    # per GPU, across nodes (InfiniBand)
    per_node: int = 8


GPUS = {
    "A100": GPU("A100-80GB", 312, 80, 2000, 230, 25),
    "H100": GPU("H100-80GB", 989, 80, 3350, 370, 50),
    "H200": GPU("H200-141GB", 989, 141, 4800, 370, 50),
}


@dataclass
class Estimate:
    tp: int
    pp: int
    dp: int
    mbs: int
    gas: int
    checkpointing: str
    mem_gib: float
    fits: bool
    step_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: float
    bubble: float


_ACT = {"none": (8, 32), "selective": (8, 22), "full": (2, 0)}


def estimate(cfg: ModelConfig, gpu: GPU, tp: int, pp: int, dp: int, mbs: int, gas: int, seq: int,
             checkpointing: str = "none") -> Estimate:
    d, L, gpus = cfg.hidden_size, cfg.num_layers, tp * pp * dp
    p_gpu = cfg.num_params(tp) / pp / tp
    # the fp32 gradient buffer is gone at gas 1, DP 1 without a pipeline (pipelines/bf16_direct_step.py)
    accum = 0 if (gas == 1 and dp == 1 and pp == 1) else 4
    static = p_gpu * (2 + 2 + accum + 12 / dp)
    a, b_tp = _ACT[checkpointing]
    per_block = seq * mbs * d * (a + b_tp / tp)
    act = per_block * (L / pp) * min(pp, gas)
    if checkpointing == "full":
        act += seq * mbs * d * (8 + 32 / tp)
    logits = 3 * seq * mbs * cfg.padded_vocab_size(tp) / tp * 4
    if pp == 1:  # the head's chunked loss (model/fused_loss.py): one ~0.5 GiB chunk + its fp32 work
        logits = min(logits, 3 * 2**29)
    mem = (static + act + logits) / 2**30

    tokens = seq * mbs * gas * dp
    flops = flops_per_token(cfg, seq) * tokens
    recompute = {"none": 1.0, "selective": 1.05, "full": 4 / 3}[checkpointing]
    bubble = (pp - 1) / (gas + pp - 1) if pp > 1 else 0.0
    t = flops * recompute / (gpus * gpu.peak_tflops * 1e12 * EFFICIENCY) / (1 - bubble)
    t += gas * MICRO_BATCH_BYTES_PER_PARAM * p_gpu / (gpu.hbm_gbs * 1e9)
    if tp > 1:
        t += (L / pp) * gas * 4 * 2 * (tp - 1) / tp * (seq * mbs * d * 2) / (gpu.intra_gbs * 1e9)
    if dp > 1:
        bw = gpu.intra_gbs if tp * pp * dp <= gpu.per_node else gpu.inter_gbs
        t += 2 * (dp - 1) / dp * p_gpu * 4 / (bw * 1e9)
    t += 20 * p_gpu / dp / (gpu.hbm_gbs * 1e9)
    tok_s_gpu = tokens / t / gpus
    tflops = flops_per_token(cfg, seq) * tok_s_gpu / 1e12
    return Estimate(tp, pp, dp, mbs, gas, checkpointing, round(mem, 2), mem < 0.92 * gpu.hbm_gib, t,
                    tok_s_gpu, tflops, tflops / gpu.peak_tflops, bubble)


def plan(cfg: ModelConfig, gpu: GPU, num_gpus: int, global_batch: int, seq: int,
         mbs_choices=(1, 2, 4, 8), modes=("none", "selective", "full")) -> list[Estimate]:
    """Every layout of ``num_gpus`` (TP within a node), ranked: fitting ones by throughput first."""
    out = []
    tps = [t for t in (1, 2, 4, 8) if t <= gpu.per_node and cfg.num_kv_heads % t == 0]
    for tp in tps:
        for pp in range(1, min(cfg.num_layers, num_gpus // tp) + 1):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            for mbs in mbs_choices:
                if global_batch % (mbs * dp):
                    continue
                gas = global_batch // (mbs * dp)
                for mode in modes:
                    out.append(estimate(cfg, gpu, tp, pp, dp, mbs, gas, seq, mode))
    return sorted(out, key=lambda e: (not e.fits, -e.tokens_per_s_per_gpu))


def format_plan(rows: list[Estimate], top: int = 15) -> str:
    lines = [f"{'layout':>14} {'mbs':>4} {'gas':>4} {'ckpt':>9} {'mem GiB':>8} {'fits':>5} "
             f"{'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6} {'bubble':>6}"]
    for e in rows[:top]:
        lines.append(f"{f'TP{e.tp}·PP{e.pp}·DP{e.dp}':>14} {e.mbs:>4} {e.gas:>4} {e.checkpointing:>9} "
                     f"{e.mem_gib:>8.1f} {'yes' if e.fits else 'no':>5} {e.tokens_per_s_per_gpu:>10.0f} "
                     f"{e.tflops_per_gpu:>8.0f} {e.mfu:>6.1%} {e.bubble:>6.1%}")
    return "\n".join(lines)


def as_dicts(rows: list[Estimate]) -> list[dict]:
    return [asdict(r) for r in rows]
