"""The trainer's console output: start banner, one line per logged step, end summary (rank 0).

Throughput is global tokens per second; TFLOP/s per GPU and MFU follow ``megatron_llama.flops``
(model FLOPs per token = 6 * N_matmul + 12 * L * d * s, causal mask not discounted, recompute not
counted). On CPU there is no peak to compare with, so MFU shows as "-".
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Callable, Optional

import torch

from megatron_llama.flops import flops_per_token, mfu, model_tflops_per_gpu, peak_tflops


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process, or its peak resident set on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class StepLogger:
    """Formats and prints (rank 0 only) the training lines."""

    def __init__(self, cfg, layout, device: torch.device, tokens_per_step: int, total_steps: int,
                 enabled: bool, stream=None, sink: Optional[Callable[[int, dict], None]] = None):
        """``sink(step, metrics)``, if given, receives every step's :meth:`metrics` (wandb)."""
        self.cfg, self.layout, self.device = cfg, layout, device
        self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
        self.enabled = enabled
        self.sink = sink
        self.stream = stream or sys.stdout
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak: Optional[float] = peak_tflops(name)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self._window_start = self._last_step = time.perf_counter()
        self._window_steps = 0

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def banner(self, params: int, source: str, stages: str, resumed_from: Optional[int], dtype) -> None:
        c, lay, t = self.cfg, self.layout, self.cfg.train
        self.print(f"mllama-train | model {c.model.name}: {fmt_count(params)} params, {c.model.num_layers} layers, "
                   f"d={c.model.hidden_size}, heads {c.model.num_attention_heads}/{c.model.num_kv_heads} kv, "
                   f"vocab {c.model.vocab_size}")
        self.print(f"  layout {lay.describe()}, ZeRO-{c.parallel.zero_stage}, {str(dtype).replace('torch.', '')}, "
                   f"checkpointing {c.parallel.activation_checkpointing}" + (f" | {stages}" if stages else ""))
        self.print(f"  batch {t.micro_batch_size} x {t.grad_accum_steps} micro-batches x DP{lay.dp} = "
                   f"{t.micro_batch_size * t.grad_accum_steps * lay.dp} {'pairs x 2' if c.preference else 'sequences'} x "
                   f"{c.data.seq_len} tokens = "
                   f"{fmt_count(self.tokens_per_step)} tokens/step; {t.steps} steps, lr {t.lr:g}")
        self.print(f"  data: {source}")
        self.print(f"  FLOPs/token {self.flops_per_token:.3g} (6*N_matmul + 12*L*d*s); peak "
                   + (f"{self.peak:g} TFLOP/s bf16" if self.peak else "unknown (MFU not shown)"))
        if resumed_from is not None:
            self.print(f"  resumed from step {resumed_from}")

    def restart_clock(self) -> None:
        """Throughput is measured from here (call it when the training loop starts)."""
        self._window_start = self._last_step = time.perf_counter()
        self._window_steps = 0

    def metrics(self, result, step_time_s: float) -> dict:
        """One step's numbers: loss, lr, grad norm, global tokens/s, TFLOP/s per GPU, MFU (None
        without a known peak), memory (GiB) and step time."""
        tok_s = self.tokens_per_step / max(step_time_s, 1e-9)
        seq, world = self.cfg.data.seq_len, self.layout.world_size
        return {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tok_s,
                "tflops_per_gpu": model_tflops_per_gpu(tok_s, self.cfg.model, seq, world),
                "mfu": mfu(tok_s, self.cfg.model, seq, world, self.peak),
                "mem_gib": memory_gib(self.device), "step_time_s": step_time_s, **getattr(result, "metrics", {})}

    def step(self, step: int, result, elapsed_total: float, steps_done: int) -> None:
        """``step`` is 1-based; console throughput is measured since the previous logged step."""
        now = time.perf_counter()
        if self.sink is not None:
            self.sink(step, self.metrics(result, now - self._last_step))
        self._last_step = now
        self._window_steps += 1
        if step % self.cfg.train.log_interval and step != self.total_steps:
            return
        m = self.metrics(result, (now - self._window_start) / max(1, self._window_steps))
        self._window_start, self._window_steps = now, 0
        eta = elapsed_total / max(1, steps_done) * (self.total_steps - step)
        width = len(str(self.total_steps))
        u = m["mfu"]
        extra = "".join(f"{k.replace('_', ' ')} {v:.4f} | " for k, v in getattr(result, "metrics", {}).items())
        self.print(f"step {step:>{width}}/{self.total_steps} | loss {result.loss:.4f} | {extra}lr {result.lr:.2e} | "
                   f"grad {result.grad_norm:.3f} | {fmt_count(m['tokens_per_s'])} tok/s | "
                   f"{m['tflops_per_gpu']:.3g} TFLOP/s/GPU | MFU {'-' if u is None else f'{100 * u:.1f}%'} | "
                   f"mem {m['mem_gib']:.2f} GiB | ETA {fmt_duration(eta)}")
