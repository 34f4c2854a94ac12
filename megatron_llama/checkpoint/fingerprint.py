"""What a ``train.init_from`` source is: a checksum of its weights, and whether it is a language model.

DPO's stored reference pass is keyed by the checksum of the model that computed it (the policy's
starting point), so a stored file is never used with other weights:

* a native checkpoint: sha256 of its ``run.json`` file table (every file's size and CRC-32, written
  at save time), so nothing is re-read;
* ``hf:DIR``: sha256 of ``config.json`` and the weight files' bytes (read once, streamed).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_llama.config import ConfigError

from .directory import META

_HF_WEIGHTS = ("*.safetensors", "*.bin")


def weights_checksum(spec: str) -> str:
    """sha256 (hex) identifying the weights of ``spec`` (``hf:DIR`` or a native checkpoint)."""
    h = hashlib.sha256()
    if spec.startswith("hf:"):
        root = Path(spec[3:])
        files = [root / "config.json"] + sorted(p for pat in _HF_WEIGHTS for p in root.glob(pat))
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()
    from .native_weights import resolve_checkpoint
    meta = json.loads((resolve_checkpoint(spec) / META).read_text())
    files = meta.get("files")
    if not files:
        raise ConfigError(f"{spec}/{META} lists no file checksums (written by an older version): convert or save "
                          "the checkpoint again so that it can serve as a DPO reference")
    h.update(json.dumps(files, sort_keys=True).encode())
    return h.hexdigest()


def check_language_model(spec: str, where: str = "train.init_from") -> None:
    """Refuse a reward model (scalar score head) where a language model (LM head) is needed."""
    if spec.startswith("hf:"):
        try:
            arch = (json.loads((Path(spec[3:]) / "config.json").read_text()).get("architectures") or ["?"])[0]
        except (OSError, ValueError):
            return  # hf_source reports a missing or broken config.json in its own words
        if arch.endswith("ForSequenceClassification"):
            raise ConfigError(f"{where}={spec} is a reward model ({arch}, a scalar score head), not a language "
                              "model: DPO trains the policy from the SFT model; pass the SFT checkpoint instead")
        return
    from .native_weights import resolve_checkpoint
    try:
        config = json.loads((resolve_checkpoint(spec) / META).read_text()).get("config", {})
    except (OSError, ValueError):
        return  # init_from's own reader reports the damage
    objective = (config.get("train") or {}).get("objective", "lm")
    head = (config.get("model") or {}).get("head", "lm")
    if objective == "reward" or head == "score":
        raise ConfigError(f"{where}={spec} is a reward model checkpoint (train.objective={objective}, a scalar "
                          "score head), not a language model: DPO trains the policy from the SFT model; pass the "
                          "SFT checkpoint instead")
