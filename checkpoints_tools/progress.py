"""Progress bars for conversions: bytes with GB/s (tqdm's rate) and tensors/s in the postfix."""
from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm


class TensorProgress:
    """``update(tensors)`` after each converted layer; shows GB done, GB/s and tensors/s."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True):
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                   "{rate_fmt}{postfix}]")
        self.tensors, self.bytes, self.t0 = 0, 0, time.perf_counter()

    def update(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Count ``tensors`` as done (their bytes in ``dtype`` when given: what is written)."""
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
        n = sum(t.numel() * (size or t.element_size()) for t in tensors.values())
        self.tensors += len(tensors)
        self.bytes += n
        self.bar.set_postfix_str(f"{self.tensors / max(time.perf_counter() - self.t0, 1e-9):.0f} tensors/s",
                                 refresh=False)
        self.bar.update(n)

    def close(self) -> dict:
        self.bar.close()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"tensors": self.tensors, "bytes": self.bytes, "seconds": dt, "gb_per_s": self.bytes / dt / 1e9}
