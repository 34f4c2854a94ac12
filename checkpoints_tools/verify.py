"""``mllama-convert verify A B``: the same fixed tokens through two checkpoints, logits compared.

Each side is a native checkpoint (run at TP = 1 in this process: its layers are gathered with
``layout.unshard``, whatever layout it was saved at) or a Hugging Face directory (run by
``transformers`` with eager attention). Both run in fp32 on CPU. Reported: max absolute and max
relative (to the largest |logit|) difference, and the mean KL(A || B) of the next-token
distributions. Reward models (a score head: ``LlamaForSequenceClassification``) compare the
score of every position instead (HF: ``score(model(tokens).last_hidden_state)``, the values its
pooling picks from); no KL.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llama.config import ConfigError


@dataclass
class Report:
    a: str
    b: str
    tokens: int
    max_abs: float
    max_rel: float
    kl: float

    scores: bool = False  # reward models: per-position scores, not logits

    def describe(self) -> str:
        what, kl = ("score", "") if self.scores else ("logit", f", mean KL {self.kl:.3e}")
        return (f"verify: {self.tokens} fixed tokens through {self.a} and {self.b}: max |{what} diff| "
                f"{self.max_abs:.3e}, relative {self.max_rel:.3e}{kl}")


def _is_hf(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


@contextlib.contextmanager
def single_process_tp1():
    """megatron-core's parallel state for one process (TP = PP = 1) over a private gloo group."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state
    started = False
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        started = True
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def native_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] fp32 logits of a native checkpoint at TP = 1."""
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.layout import load_full_state
    ck = open_native(path)
    full = {k: t.float() for _, layer in ck.layers(pad_for_tp=1) for k, t in layer.items()}
    with single_process_tp1():
        model = LlamaModel(ck.model, ParallelConfig(), dtype=torch.float32)
        load_full_state(model, full, 0, 1)
        with torch.no_grad():
            out = model(tokens).transpose(0, 1)
            return out.float() if ck.model.head == "score" else out[..., :ck.model.vocab_size].float()


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, vocab] logits, or [b, s] scores of every position for a sequence classifier."""
    import transformers
    if _is_score(path):
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager")
        except (OSError, ValueError) as e:
            raise ConfigError(f"transformers cannot load {path}: {str(e).splitlines()[0][:150]}") from None
        with torch.no_grad():
            return model.score(model.model(tokens).last_hidden_state).squeeze(-1).float()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ConfigError(f"transformers cannot load {path}: {str(e).splitlines()[0][:150]}") from None
    with torch.no_grad():
        return model(tokens).logits.float()


def _is_score(path: str) -> bool:
    """A reward model (score head), HF or native."""
    if _is_hf(path):
        import json
        arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or [""])[0]
        return arch.endswith("ForSequenceClassification")
    from megatron_llama.checkpoint.native_weights import open_native
    return open_native(path).model.head == "score"


def vocab_of(path: str) -> int:
    if _is_hf(path):
        import json
        return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    from megatron_llama.checkpoint.native_weights import open_native
    return open_native(path).model.vocab_size


def compare(a: str, b: str, seq: int = 32, seed: int = 0) -> Report:
    vocab = min(vocab_of(a), vocab_of(b))
    tokens = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    la = (hf_logits if _is_hf(a) else native_logits)(a, tokens).double()
    lb = (hf_logits if _is_hf(b) else native_logits)(b, tokens).double()
    if _is_score(a) != _is_score(b):
        raise ConfigError(f"one of {a} and {b} is a reward model (score head) and the other a language model: "
                          "they are not the same model")
    if la.shape != lb.shape:
        raise ConfigError(f"{a} and {b} have different vocabularies ({la.shape[-1]} vs {lb.shape[-1]}): "
                          "they are not the same model")
    diff = (la - lb).abs().max().item()
    if _is_score(a):
        return Report(a, b, seq, diff, diff / la.abs().max().item(), float("nan"), scores=True)
    kl = torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return Report(a, b, seq, diff, diff / la.abs().max().item(), kl)
