"""Our LlamaModel against Hugging Face as the reference, on real multi-process gloo TP groups.

Both models get the same random weights: the HF model is built from a seed, its weights are
redrawn so that activations are O(1) (HF's own std-0.02 init leaves attention nearly uniform,
which would hide RoPE or head-order mistakes), norm weights and biases are made non-trivial
(so a swapped or missing norm/bias shows), and the HF state dict is mapped with
``hf_to_native`` and sliced per TP rank by ``load_full_state``. Everything runs on CPU in fp32.

Relative error everywhere in this file is ``||ours - ref||_2 / ||ref||_2`` over the whole
tensor (logits, loss, or one parameter's gradient), computed in float64; the bound is 1e-5.
The measured values are printed (run with ``-s`` to see them).

The vocabulary is 501 tokens, so it is padded to 502 at TP 2 and to 504 at TP 4: the padded
logits must come out as -inf and must not change the softmax or the loss.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

TOL = 1e-5
BATCH, SEQ = 2, 24
VOCAB = 501  # not a multiple of 2 or 4: exercises the padded-vocab masking at TP 2 and 4

CASES = {
    # name: (preset, overrides, reference architecture)
    "mha": ("tiny", dict(vocab_size=VOCAB), "llama"),
    "gqa": ("tiny-gqa", dict(vocab_size=VOCAB), "llama"),
    # Qwen2: bias on q, k, v only; also a non-default rope theta (Qwen2 uses 1e6)
    "qkv-bias": ("tiny-gqa", dict(vocab_size=VOCAB, qkv_bias=True, rope_theta=1e6), "qwen2"),
    # small models tie the LM head to the embedding: one weight, gradients from both uses
    "tied": ("tiny", dict(vocab_size=VOCAB, tie_embeddings=True), "llama"),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm()).item()


def case_config(case: str):
    from megatron_llama.config import preset
    name, overrides, _ = CASES[case]
    return preset(name, **overrides)


def hf_reference(cfg, arch: str, seed: int):
    """A HF LlamaForCausalLM / Qwen2ForCausalLM with seeded random weights of O(1) activations."""
    import transformers

    from megatron_llama.model.hf_mapping import hf_config_kwargs

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    # eager attention: an implementation independent of the SDPA call our model makes
    hf_cfg = config_cls(**hf_config_kwargs(cfg), attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(hf_cfg).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:  # [out, in] matrices: unit-variance outputs for unit-variance inputs
                p.copy_(noise / p.shape[1] ** 0.5)
    return model


def _gather_tp(t: torch.Tensor, dim: int | None = None):
    """All-gather ``t`` over the TP group: the list of per-rank tensors (rank order), or their
    concatenation along ``dim``."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        parts = [t]
    else:
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return parts if dim is None else torch.cat(parts, dim=dim)


def full_grads(model) -> dict[str, torch.Tensor]:
    """Full (TP = 1 layout) gradient of every parameter, gathered from all TP ranks with
    ``layout.unshard``. Replicated parameters (norms) must have equal grads on every rank."""
    from megatron_llama.model.layout import unshard

    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        shards = _gather_tp(p.grad)
        if p.tp_split == "replicated":
            for s in shards[1:]:
                assert torch.equal(s, shards[0]), f"replicated {name}: grads differ across TP ranks"
        out[name] = unshard(shards, p.tp_split)
        assert tuple(out[name].shape) == p.full_shape, name
    return out


def run_ours(cfg, full_state, tokens, tp: int, checkpointing: str = "none", seed: int = 0,
             grads: bool = False, backward_context=contextlib.nullcontext) -> dict:
    """Build our model at this rank's TP slice of ``full_state``; return the gathered logits
    [b, s, V] (real vocab only), the padded logits, the loss and (optionally) full grads.
    ``backward_context()`` is entered around ``loss.backward()``."""
    from megatron.core import parallel_state

    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.layout import load_full_state

    model = LlamaModel(cfg, ParallelConfig(tp=tp, activation_checkpointing=checkpointing), seed=seed)
    load_full_state(model, full_state, parallel_state.get_tensor_model_parallel_rank(), tp)
    n_full = sum(math.prod(p.full_shape) for p in model.parameters())
    assert n_full == cfg.num_params(tp), (n_full, cfg.num_params(tp))  # the count the configs report
    with torch.no_grad():
        local = model(tokens)                                     # [s, b, V_pad / tp]
        assert local.shape == (tokens.shape[1], tokens.shape[0], cfg.padded_vocab_size(tp) // tp)
        logits = _gather_tp(local, dim=-1).transpose(0, 1)        # [b, s, V_pad]
    out = {"logits": logits[..., :cfg.vocab_size], "pad_logits": logits[..., cfg.vocab_size:]}
    # next-token loss over the same b*(s-1) positions as HF's internally shifted loss
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    out["loss"] = loss.detach()
    if grads:
        with backward_context():
            loss.backward()
        out["grads"] = full_grads(model)
    return out


def _parity_task(rank, world, tp, case, seed, grads):
    from megatron.core import parallel_state

    from megatron_llama.model.hf_mapping import hf_to_native, native_to_hf

    parallel_state.initialize_model_parallel(tp, 1)
    cfg = case_config(case)
    hf = hf_reference(cfg, CASES[case][2], seed)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 2))
    ref = hf(input_ids=tokens, labels=tokens)  # HF shifts the labels internally
    if grads:
        ref.loss.backward()
    ours = run_ours(cfg, hf_to_native(hf.state_dict(), cfg, tp), tokens, tp, seed=seed, grads=grads)

    result = {
        "logits": rel_err(ours["logits"], ref.logits),
        "loss": rel_err(ours["loss"], ref.loss),
        "loss_values": (ours["loss"].item(), ref.loss.item()),
        "pad_columns": ours["pad_logits"].shape[-1],
        "pad_all_neg_inf": bool(torch.all(ours["pad_logits"] == float("-inf"))),
    }
    if grads:
        hf_params = dict(hf.named_parameters())
        ours_hf = native_to_hf(ours["grads"], cfg)
        if cfg.tie_embeddings:  # HF lists the shared weight once, as the embedding
            assert ours_hf.pop("lm_head.weight") is ours_hf["model.embed_tokens.weight"]
        assert set(ours_hf) == set(hf_params), set(ours_hf) ^ set(hf_params)
        result["grads"] = {n: rel_err(g, hf_params[n].grad) for n, g in ours_hf.items()}
    return result


def _check(results: list[dict], label: str, expect_pad: int) -> dict:
    """Every rank must agree and be within TOL of HF; print the measured errors."""
    for r in results:
        assert r == results[0], f"{label}: TP ranks disagree"
    r = results[0]
    assert r["loss"] <= TOL, f"{label}: loss rel err {r['loss']:.3e} (ours, HF: {r['loss_values']})"
    assert r["logits"] <= TOL, f"{label}: logits rel err {r['logits']:.3e}"
    assert r["pad_columns"] == expect_pad
    assert r["pad_all_neg_inf"], f"{label}: padded vocab logits are not masked to -inf"
    msg = f"[parity] {label}: logits rel err {r['logits']:.2e}, loss rel err {r['loss']:.2e}"
    if "grads" in r:
        worst = max(r["grads"], key=r["grads"].get)
        bad = {n: e for n, e in r["grads"].items() if e > TOL}
        assert not bad, f"{label}: gradient rel err above {TOL}: {bad}"
        msg += f", max grad rel err {r['grads'][worst]:.2e} ({worst}, {len(r['grads'])} params)"
    print(msg)
    return r


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_and_loss_match_hf(dist_pool, tp, case):
    """Logits (all real vocab columns, gathered over TP) and loss equal HF's, rel err <= 1e-5."""
    cfg = case_config(case)
    # TP 1 runs on the 2-process pool too (two data-parallel replicas): one fewer pool to start
    results = dist_pool(max(tp, 2)).run(_parity_task, tp, case, 1000 + tp, False)
    _check(results, f"{case} tp={tp}", cfg.padded_vocab_size(tp) - cfg.vocab_size)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_hf_tp2(dist_pool, case):
    """Gradient of every weight at TP 2, unsharded and mapped to HF names, equals HF's:
    per-parameter rel err <= 1e-5 (and the two TP ranks' norm grads are identical)."""
    cfg = case_config(case)
    results = dist_pool(2).run(_parity_task, 2, case, 77, True)
    r = _check(results, f"{case} tp=2 grads", cfg.padded_vocab_size(2) - cfg.vocab_size)
    # HF names: q,k,v,o,gate,up,down + 2 norms per layer (+3 biases); embed, lm_head, final norm
    per_layer = 9 + (3 if CASES[case][1].get("qkv_bias") else 0)
    assert len(r["grads"]) == cfg.num_layers * per_layer + (2 if cfg.tie_embeddings else 3)
