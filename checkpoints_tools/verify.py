"""``mllama-convert verify A B``: the same fixed tokens through two checkpoints, logits compared.

Each side is a native checkpoint (run at TP = 1 in this process: its layers are gathered with
``layout.unshard``, whatever layout it was saved at) or a Hugging Face directory (run by
``transformers`` with eager attention). Both run in fp32 on CPU. Reported: max absolute and max
relative (to the largest |logit|) difference, and the mean KL(A || B) of the next-token
distributions. Reward models (a score head: ``LlamaForSequenceClassification``) compare the
score of every position instead (HF: ``score(model(tokens).last_hidden_state)``, the values its
pooling picks from); no KL.

The check fails when the relative difference exceeds a bound set by the dtypes the two sides'
weights are *stored* in. Both sides compute in fp32, so two checkpoints holding the same values
(any dtype, e.g. a bf16 HF model and its bf16 conversion) must agree to fp32 rounding:
``1e-5``. When one side holds rounded copies of the other's weights the bound is that rounding's:
bf16 keeps 8 significant bits (each weight moves by up to 2^-9 = 0.2 %), which measured 0.26-0.80 %
of the largest logit on the tiny test shapes (O(1) random and std-0.02 weights); the bound is
``3e-2``, about 4x that. fp16 (11 bits) measured 0.04-0.09 %: bound ``5e-3``. A mixed-dtype
comparison is therefore blunt (a missing RoPE scaling moves logits by ~5e-3): compare like with
like where it matters.

The sequence is long enough to reach the scaled frequencies: with RoPE scaling on, twice the
original context (``original_max_position_embeddings``, or ``max_seq_len / factor`` for linear
scaling), capped at ``max_seq_len``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llama.config import ConfigError


FP32_BOUND = 1e-5
ROUNDING_BOUND = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass
class Report:
    a: str
    b: str
    tokens: int
    max_abs: float
    max_rel: float
    kl: float
    bound: float = FP32_BOUND
    why: str = "same stored values"
    scores: bool = False  # reward models: per-position scores, not logits

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.bound

    def describe(self) -> str:
        what, kl = ("score", "") if self.scores else ("logit", f", mean KL {self.kl:.3e}")
        return (f"verify: {self.tokens} fixed tokens through {self.a} and {self.b}: max |{what} diff| "
                f"{self.max_abs:.3e}, relative {self.max_rel:.3e} (bound {self.bound:.0e}: {self.why}){kl}")


def default_bound(a: set, b: set) -> tuple[float, str]:
    """The relative-difference bound for sides whose weights are stored in dtypes ``a`` and ``b``."""
    name = lambda ds: "/".join(sorted(str(d).replace("torch.", "") for d in ds))  # noqa: E731
    if a == b:
        return FP32_BOUND, f"both {name(a)}, computed in fp32"
    narrow = [d for d in (a ^ b) if d in ROUNDING_BOUND]
    bound = max((ROUNDING_BOUND[d] for d in narrow), default=FP32_BOUND)
    return bound, f"{name(a)} vs {name(b)}: rounding"


def default_tokens(cfg) -> int:
    """32 tokens, or twice the original context when RoPE scaling is on (at most max_seq_len)."""
    s = cfg.rope_scaling
    if s is None:
        return min(32, cfg.max_seq_len)
    original = s.original_max_position_embeddings or int(cfg.max_seq_len / s.factor)
    return min(max(32, 2 * original), cfg.max_seq_len)


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


def native_logits(path: str, tokens: torch.Tensor, dtypes: set | None = None) -> torch.Tensor:
    """[b, s, vocab] fp32 logits of a native checkpoint at TP = 1 (``dtypes`` gets the stored dtypes)."""
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.layout import load_full_state
    ck = open_native(path)
    full = {}
    for _, layer in ck.layers(pad_for_tp=1):
        for k, t in layer.items():
            if dtypes is not None:
                dtypes.add(t.dtype)
            full[k] = t.float()
    with single_process_tp1():
        model = LlamaModel(ck.model, ParallelConfig(), dtype=torch.float32)
        load_full_state(model, full, 0, 1)
        with torch.no_grad():
            out = model(tokens).transpose(0, 1)
            return out.float() if ck.model.head == "score" else out[..., :ck.model.vocab_size].float()


def hf_logits(path: str, tokens: torch.Tensor, dtypes: set | None = None) -> torch.Tensor:
    """[b, s, vocab] logits, or [b, s] scores of every position for a sequence classifier."""
    import transformers
    if dtypes is not None:
        dtypes |= hf_stored_dtypes(path)
    score = _is_score(path)
    auto = transformers.AutoModelForSequenceClassification if score else transformers.AutoModelForCausalLM
    try:  # eager attention materialises [s, s] scores per head: SDPA for long sequences
        model = auto.from_pretrained(path, dtype=torch.float32,
                                     attn_implementation="eager" if tokens.shape[1] <= 4096 else "sdpa")
    except (OSError, ValueError) as e:
        raise ConfigError(f"transformers cannot load {path}: {str(e).splitlines()[0][:150]}") from None
    with torch.no_grad():
        if score:
            return model.score(model.model(tokens).last_hidden_state).squeeze(-1).float()
        return model(tokens).logits.float()


def _is_score(path: str) -> bool:
    """A reward model (score head), HF or native."""
    if _is_hf(path):
        import json
        arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or [""])[0]
        return arch.endswith("ForSequenceClassification")
    from megatron_llama.checkpoint.native_weights import open_native
    return open_native(path).model.head == "score"


def hf_stored_dtypes(path: str) -> set:
    """The dtypes an HF directory's tensors are stored in (read from the file headers)."""
    from megatron_llama.checkpoint.hf_source import HFWeights
    w = HFWeights(path)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    out = set()
    for name, f in w.where.items():
        h = w._handle(f)
        out.add(names.get(h.get_slice(name).get_dtype(), torch.float64) if f.suffix == ".safetensors"
                else h[name].dtype)
    return out


def model_of(path: str):
    """The ``ModelConfig`` of either side."""
    if _is_hf(path):
        from megatron_llama.checkpoint.hf_source import hf_model_config
        return hf_model_config(path)
    from megatron_llama.checkpoint.native_weights import open_native
    return open_native(path).model


def vocab_of(path: str) -> int:
    return model_of(path).vocab_size


def compare(a: str, b: str, seq: int | None = None, seed: int = 0) -> Report:
    """``seq`` None: :func:`default_tokens` of the longer-reaching side."""
    ma, mb = model_of(a), model_of(b)
    vocab = min(ma.vocab_size, mb.vocab_size)
    if seq is None:
        seq = min(max(default_tokens(ma), default_tokens(mb)), ma.max_seq_len, mb.max_seq_len)
    tokens = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))
    if _is_score(a) != _is_score(b):
        raise ConfigError(f"one of {a} and {b} is a reward model (score head) and the other a language model: "
                          "they are not the same model")
    da, db = set(), set()
    la = (hf_logits if _is_hf(a) else native_logits)(a, tokens, da).double()
    lb = (hf_logits if _is_hf(b) else native_logits)(b, tokens, db).double()
    if la.shape != lb.shape:
        raise ConfigError(f"{a} and {b} have different vocabularies ({la.shape[-1]} vs {lb.shape[-1]}): "
                          "they are not the same model")
    diff = (la - lb).abs().max().item()
    bound, why = default_bound(da, db)
    if _is_score(a):
        return Report(a, b, seq, diff, diff / la.abs().max().item(), float("nan"), bound, why, scores=True)
    kl = torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return Report(a, b, seq, diff, diff / la.abs().max().item(), kl, bound, why)
