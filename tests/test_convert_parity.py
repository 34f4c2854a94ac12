"""Conversion through files, on real gloo ranks and real DeepSpeed engines, against ``transformers``.

An HF model (seeded O(1) random weights: tests/test_model_parity.hf_reference) is saved as sharded
safetensors with an index, cut so small that the q, k and v of one layer land in different files;
``mllama-convert hf-to-native`` writes it at TP1 / TP2 / PP2 / TP2·PP2; a 4-rank engine at that
layout starts from the files (``train.init_from``) and its logits must equal the HF model's within
1e-5 (relative, fp32) for the plain, GQA, QKV-bias and tied shapes. The same files also load through
DeepSpeed's own ``load_checkpoint(load_module_only=True)`` (the writer writes what DeepSpeed reads),
and a checkpoint the engine then saves itself (real PipelineModule layer files) reads back bitwise.

Llama 3 shapes (``LLAMA3_CASES``) run the same path at TP1, TP2 and TP2·PP2 on a sequence 2.5x the
original context, so llama3 RoPE scaling (theta 5e5) stretches the low frequencies there: a Llama
3.1-shaped tiny (GQA, vocabulary 70001 > 65535, padded at TP2) and a Llama 3.2-shaped tiny (tied,
scaling factor 32). The same files with the scaling removed from config.json must miss the bound.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_model_parity import CASES, VOCAB, case_config, hf_reference, rel_err

pytestmark = pytest.mark.distributed
TOL = 1e-5
SEQ = 24
# case -> layouts (tp, pp) run in a 4-process pool (DP fills the rest); tied at PP2: the head's
# layer file holds a copy of the embedding (param table: pipe_copy)
LAYOUTS = {"mha": [(1, 1), (2, 1), (1, 2), (2, 2)], "gqa": [(2, 2)], "qkv-bias": [(2, 2)],
           "tied": [(2, 1), (2, 2)]}


# original context 32, sequence 80: positions past 2x the original context
_ROPE31 = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
LLAMA3_CASES = {
    "llama3.1": ("tiny-gqa", dict(vocab_size=70001, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                                  num_layers=2, max_seq_len=128, rope_theta=500000.0, rope_scaling=_ROPE31), "llama"),
    "llama3.2": ("tiny-gqa", dict(vocab_size=VOCAB, num_layers=2, max_seq_len=128, rope_theta=500000.0,
                                  tie_embeddings=True, rope_scaling=dict(_ROPE31, factor=32.0)), "llama"),
}
LLAMA3_SEQ = 80
LLAMA3_LAYOUTS = [(1, 1), (2, 1), (2, 2)]
ALL_CASES = {**CASES, **LLAMA3_CASES}


def _case_config(case: str):
    from megatron_llama.config import preset
    name, overrides, _ = ALL_CASES[case]
    return preset(name, **overrides)


def _overrides(case: str, tp: int, pp: int, init_from: str, seq: int = SEQ) -> list[str]:
    name, model, _ = ALL_CASES[case]
    return ([f"model.preset={name}"] + [f"model.{k}={v}" for k, v in model.items()]
            + [f"parallel.tp={tp}", f"parallel.pp={pp}", "train.precision=fp32", "data.synthetic=true",
               f"data.seq_len={seq}", f"train.init_from={init_from}"])


def _gather_tp(t, layout):
    import torch.distributed as dist
    from megatron.core import parallel_state
    if layout.tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(layout.tp)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def _logits(engine, layout, tokens):
    """Full logits [b, s, V_pad] on every rank of the last stage (None elsewhere): the stages run in
    order, activations sent point to point between the same TP rank of consecutive stages."""
    import torch.distributed as dist
    module = engine.engine.module
    if layout.pp == 1:
        return _gather_tp(module(tokens), layout).transpose(0, 1)
    x = tokens
    stage = layout.pp_rank
    if stage > 0:
        x = torch.empty(tokens.shape[1], tokens.shape[0], engine.cfg.model.hidden_size)
        dist.recv(x, src=layout.pp_ranks[stage - 1])
        x = (x,)
    for layer in module.forward_funcs:
        x = layer(x)
    if stage < layout.pp - 1:
        dist.send(x[0].contiguous(), dst=layout.pp_ranks[stage + 1])
        return None
    return _gather_tp(x, layout).transpose(0, 1)


def _run(rank, world, jobs, tokens):
    """For each job (case, tp, pp, sources, save_to): one engine at that layout; for every source, its
    weights loaded (``train.init_from``'s loader) and the logits. The first source is loaded before
    DeepSpeed wraps the model, as in training; later ones into the same parameters."""
    from pathlib import Path

    from megatron.core import parallel_state

    from megatron_llama.checkpoint import save as save_checkpoint
    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    out = []
    for case, tp, pp, sources, save_to in jobs:
        cfg = load_config(None, _overrides(case, tp, pp, sources[0], tokens.shape[1]))
        device, _ = init_distributed()
        layout, topo = build_topology(cfg.parallel, 1, device)

        def load(module, source):
            load_initial_weights(module, cfg.model, source, parallel_state.get_tensor_model_parallel_rank(), tp, pp > 1)
        engine = TrainEngine(cfg, layout, topo, device, lambda s: 1.0, init_weights=lambda m: load(m, sources[0]))
        logits = [_logits(engine, layout, tokens)]
        for source in sources[1:]:
            load(engine.engine.module, source)
            logits.append(_logits(engine, layout, tokens))
        loaded_by_deepspeed = None
        if save_to:
            # DeepSpeed reads our files itself: perturb, load module-only, compare with what init_from gave
            load(engine.engine.module, sources[0])
            before = {n: p.detach().clone() for n, p in engine.engine.module.named_parameters()}
            with torch.no_grad():
                for p in engine.engine.module.parameters():
                    p.add_(1.0)
            native = sources[0]
            engine.engine.load_checkpoint(str(Path(native).parent), tag=Path(native).name, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
            loaded_by_deepspeed = all(torch.equal(before[n], p) for n, p in engine.engine.module.named_parameters())
            save_checkpoint(engine, cfg, layout, save_to, step=1, consumed_samples=0, last_loss=0.0)
        out.append((logits, loaded_by_deepspeed))
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """HF references saved as sharded safetensors, converted to every layout of LAYOUTS."""
    from checkpoints_tools.convert import main
    root = tmp_path_factory.mktemp("convert")
    refs = {}
    for case, layouts in LAYOUTS.items():
        cfg = case_config(case)
        hf = hf_reference(cfg, CASES[case][2], seed=11)
        hf_dir = root / f"{case}-hf"
        hf.save_pretrained(hf_dir, max_shard_size="40KB")
        refs[case] = (cfg, hf, hf_dir)
        for tp, pp in layouts:
            assert main(["hf-to-native", str(hf_dir), str(root / f"{case}-tp{tp}pp{pp}"), "--tp", str(tp),
                         "--pp", str(pp), "--no-progress", "--verify", "no"]) == 0
    return root, refs


def test_one_layer_split_across_files(converted):
    import json
    root, refs = converted
    index = json.loads((refs["mha"][2] / "model.safetensors.index.json").read_text())["weight_map"]
    files = {index[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"}
    assert len(files) > 1, "the test must read one layer's q, k, v from different files"


def test_parity_through_files_every_layout(converted, dist_pool):
    root, refs = converted
    tokens = torch.randint(0, 501, (2, SEQ), generator=torch.Generator().manual_seed(3))
    # one engine per (case, layout); its sources: the native files converted for that layout, and
    # train.init_from=hf:DIR (each rank reads its slices: whole KV groups, bias rows, vocab rows, columns)
    # or a native checkpoint saved at another TP (unshard + re-slice)
    extra = {("mha", 2, 2): [str(root / "mha-tp1pp1")], ("gqa", 2, 2): [f"hf:{refs['gqa'][2]}"],
             ("qkv-bias", 2, 2): [f"hf:{refs['qkv-bias'][2]}"]}
    jobs = [(case, tp, pp, [str(root / f"{case}-tp{tp}pp{pp}")] + extra.get((case, tp, pp), []),
             str(root / "saved-by-engine") if (case, tp, pp) == ("gqa", 2, 2) else None)
            for case, layouts in LAYOUTS.items() for tp, pp in layouts]
    results = dist_pool(4).run(_run, jobs, tokens)
    for j, (case, tp, pp, sources, save_to) in enumerate(jobs):
        cfg, hf, _ = refs[case]
        with torch.no_grad():
            ref = hf(tokens).logits
        for s, source in enumerate(sources):
            last = [r[j][0][s] for r in results if r[j][0][s] is not None]
            assert last, f"{case} TP{tp}·PP{pp}: no rank returned logits"
            for logits in last:
                err = rel_err(logits[..., :cfg.vocab_size], ref)
                assert err < TOL, f"{case} TP{tp}·PP{pp} from {source}: logits differ from transformers by {err:.2e}"
                assert torch.isinf(logits[..., cfg.vocab_size:]).all()
            print(f"{case} TP{tp}·PP{pp} from {Path(source).name}: rel err {err:.2e}")
        if save_to:
            assert all(r[j][1] for r in results), "DeepSpeed's load_checkpoint did not restore our files"
            _check_engine_checkpoint(save_to, refs[case])


def _check_engine_checkpoint(save_dir, ref):
    """The checkpoint DeepSpeed wrote itself (PipelineModule layer files, TP2·PP2) reads back bitwise."""
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.model.hf_mapping import hf_to_native
    cfg, hf, _ = ref
    ck = open_native(save_dir)
    assert ck.per_layer_files and (ck.tp, ck.pp) == (2, 2)
    want = hf_to_native(hf.state_dict(), cfg, tp=2)
    got = {k: t for _, layer in ck.layers() for k, t in layer.items()}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def converted_llama3(tmp_path_factory):
    """Llama 3-shaped HF references (transformers 5 files: rope_parameters), converted to TP1, TP2, TP2·PP2,
    and each also converted once (TP1) from a copy whose config.json has the scaling removed."""
    import json
    import shutil

    from checkpoints_tools.convert import main
    root = tmp_path_factory.mktemp("convert-l3")
    refs = {}
    for case in LLAMA3_CASES:
        cfg = _case_config(case)
        hf = hf_reference(cfg, "llama", seed=13)
        hf_dir = root / f"{case}-hf"
        hf.save_pretrained(hf_dir)
        assert json.loads((hf_dir / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
        refs[case] = (cfg, hf, hf_dir)
        for tp, pp in LLAMA3_LAYOUTS:
            assert main(["hf-to-native", str(hf_dir), str(root / f"{case}-tp{tp}pp{pp}"), "--tp", str(tp),
                         "--pp", str(pp), "--no-progress", "--verify", "no"]) == 0
        plain = root / f"{case}-unscaled-hf"
        shutil.copytree(hf_dir, plain)
        c = json.loads((plain / "config.json").read_text())
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_parameters"]["rope_theta"]}
        (plain / "config.json").write_text(json.dumps(c))
        assert main(["hf-to-native", str(plain), str(root / f"{case}-unscaled"), "--no-progress", "--verify", "no"]) == 0
    return root, refs


def test_llama3_parity_through_files(converted_llama3, dist_pool):
    from checkpoints_tools.verify import native_logits
    root, refs = converted_llama3
    tokens = torch.randint(0, VOCAB, (1, LLAMA3_SEQ), generator=torch.Generator().manual_seed(5))
    jobs = [(case, tp, pp, [str(root / f"{case}-tp{tp}pp{pp}")], None) for case in LLAMA3_CASES
            for tp, pp in LLAMA3_LAYOUTS]
    results = dist_pool(4).run(_run, jobs, tokens)
    for case in LLAMA3_CASES:
        cfg, hf, _ = refs[case]
        with torch.no_grad():
            ref = hf(tokens).logits
        for j, (c, tp, pp, sources, _) in enumerate(jobs):
            if c != case:
                continue
            last = [r[j][0][0] for r in results if r[j][0][0] is not None]
            assert last, f"{case} TP{tp}·PP{pp}: no rank returned logits"
            for logits in last:
                err = rel_err(logits[..., :cfg.vocab_size], ref)
                assert err < TOL, f"{case} TP{tp}·PP{pp}: logits differ from transformers by {err:.2e}"
                assert torch.isinf(logits[..., cfg.vocab_size:]).all()
            print(f"{case} TP{tp}·PP{pp} (vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size(tp)}): "
                  f"rel err {err:.2e}")
        # the same weights through the same files, scaling removed from config.json: far outside the bound
        wrong = rel_err(native_logits(str(root / f"{case}-unscaled"), tokens), ref)
        print(f"{case} without rope scaling: rel err {wrong:.2e}")
        assert wrong > 100 * TOL, f"{case}: dropping the rope scaling changed the logits by only {wrong:.2e}"
