"""TensorBoard event files (rank 0 only) when ``train.tensorboard_dir`` is set.

Scalars under ``train/`` (loss, lr, grad_norm, tokens_per_s, tflops_per_gpu, mfu, mem_gib,
tokens_seen, skipped_steps, rollbacks) and ``valid/`` (loss, ppl), by optimizer step. Written
with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``pip install
megatron-llama[tensorboard]``) or, failing that, ``tensorboardX``. Optional: if neither is installed
or writing fails, one ``warning:`` line is printed and training goes on without it.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from tensorboardX import SummaryWriter
    return SummaryWriter


class TensorBoardLogger:
    """``log(step, metrics)``: ``valid_*`` keys go under ``valid/``, the rest under ``train/``."""

    def __init__(self, log_dir: Optional[str], enabled: bool, warn: Optional[Callable[[str], None]] = None):
        self.writer = None
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        if not (enabled and log_dir):
            return
        try:
            self.writer = _summary_writer()(log_dir=log_dir)
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            self.warn(f"warning: TensorBoard logging disabled ({_one_line(e)}; pip install tensorboard); "
                      "training continues")

    def log(self, step: int, metrics: dict) -> None:
        if self.writer is None:
            return
        try:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = f"valid/{key[6:]}" if key.startswith("valid_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except Exception as e:  # noqa: BLE001
            self.warn(f"warning: TensorBoard logging disabled, write failed ({_one_line(e)}); training continues")
            self.close()

    def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
