"""DeepSpeed's checkpoint-engine hook for loads onto a GPU: ``torch.load(mmap=True)``.

torch's default load reads every storage into freshly allocated host memory, page-faulting it in as
it goes (1.8 GB/s from the page cache on the CPU machine), and DeepSpeed then copies each tensor to
the GPU (``load_state_dict`` into the parameters, the optimizer's ``.to(device)``). Mapped, the load
itself costs next to nothing and the copy to the device reads the page cache directly: one pass
over the bytes instead of two. The mapped tensors go with the state dict once DeepSpeed has copied
them. Not used on CPU runs: there torch's optimizer keeps a same-device, same-dtype tensor as it is,
so a mapped moment would keep the file mapped (and its disk space held after pruning deletes it)
for the rest of the run, and copying it out costs what the default load does.

Files in torch's legacy (non-zip) format cannot be mapped: they are loaded the default way.
"""
from __future__ import annotations

import zipfile

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


class MappedLoad(TorchCheckpointEngine):
    """Loads like :class:`TorchCheckpointEngine`, with the file memory-mapped; saves unchanged."""

    def __init__(self):
        super().__init__(None)
        self.zipfile_serialization = True  # DeepSpeed's default (checkpoint_serialization)

    def load(self, path: str, map_location=None):
        mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
