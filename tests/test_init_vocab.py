"""``train.init_from`` and the tokenizer (issue 16 §4, issue 18's silent tokenizer mismatch).

A run from other weights carries the source's tokenizer (never trains a new one), refuses a different
one in one line, and grows the vocabulary for an *extension* of it: the source's rows bitwise at TP2,
new rows at the mean (or zero / a seeded draw), padding zero; before the first step the logits over
the old tokens equal the source model's (transformers, rel 1e-5), and then the loss falls on a
corpus that uses the new tokens (the shipped configs/continual-tiny-cpu.yaml, real DeepSpeed
engines on gloo ranks).

The extension is made by ``mllama-tokenizer extend``'s function (25 new merges learned from the shipped
corpus, appended after the existing ids).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_model_parity import hf_reference, rel_err

ROOT = Path(__file__).resolve().parent.parent
OLD_VOCAB = 400
NEW_VOCAB = OLD_VOCAB + 25   # 425: padded to 426 at TP2, one zero padding row


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny HF model with its SentencePiece tokenizer.model (400 ids), an extension (+25 words), an unrelated
    tokenizer, and the same model converted to a native checkpoint that records its tokenizer."""
    from checkpoints_tools.convert import main
    from megatron_llama.config import preset
    from megatron_llama.data.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("vocab")
    corpus = str(ROOT / "data" / "corpus.jsonl")
    tok = train_tokenizer([corpus], str(d / "tok"), OLD_VOCAB, max_sentences=5000)
    shutil.copyfile(ROOT / "data" / "instructions.jsonl", d / "other.txt")  # other text: other merges
    other = train_tokenizer([str(d / "other.txt")], str(d / "other"), OLD_VOCAB, max_sentences=5000)
    from megatron_llama.data.tokenizer_extend import extend_tokenizer
    ext = extend_tokenizer(tok, str(d / "extended"), inputs=[corpus], vocab_size=NEW_VOCAB, max_sentences=5000).output
    cfg = preset("tiny", vocab_size=OLD_VOCAB)
    hf = hf_reference(cfg, "llama", seed=21)
    hf.save_pretrained(d / "hf")
    shutil.copyfile(tok, d / "hf" / "tokenizer.model")
    assert main(["hf-to-native", str(d / "hf"), str(d / "native"), "--verify", "no", "--no-progress"]) == 0
    # the corpus tokenized with the extension here: pool workers are daemons and may not start the
    # preprocessing workers a data.corpus run would start
    from megatron_llama.data.preprocess import preprocess
    preprocess([corpus], str(d / "corpus-ext"), ext, workers=1, progress=False)
    return dict(dir=d, tok=tok, ext=ext, other=other, hf=hf, cfg=cfg)


def _continual(src, tp: int, extra=(), corpus: bool = True) -> list[str]:
    d = src["dir"]
    data = ([f"data.corpus={ROOT / 'data' / 'corpus.jsonl'}"] if corpus else
            ["data.corpus=null", f"data.sources=[{{path: {d / 'corpus-ext'}, weight: 1.0}}]"])
    return [f"parallel.tp={tp}", f"model.vocab_size={NEW_VOCAB}", f"train.init_from=hf:{d / 'hf'}",
            f"data.tokenizer={src['ext']}", f"data.cache_dir={d / 'cache'}", f"train.save_dir={d / 'run'}",
            *data, *extra]


def test_extension_check_and_carry(source):
    from megatron_llama.checkpoint.init_tokenizer import extends, plan_init_tokenizer
    from megatron_llama.config import ConfigError, load_config
    from megatron_llama.data.tokenizer import Tokenizer
    old, ext, other = (Tokenizer.load(source[k]) for k in ("tok", "ext", "other"))
    assert extends(old, ext) is None and extends(ext, old) is not None
    assert extends(old, other).startswith("id ")
    first = (ROOT / "data" / "corpus.jsonl").read_text().splitlines()[0]
    assert ext.vocab_size == NEW_VOCAB and max(ext.encode(first)) >= OLD_VOCAB  # the corpus uses new tokens
    plan = plan_init_tokenizer(load_config(ROOT / "configs" / "continual-tiny-cpu.yaml", _continual(source, 2)))
    assert plan.source_vocab == OLD_VOCAB and "400 -> 425 rows" in plan.line
    # issue 18: no data.tokenizer -> the source's is carried, for a native source and an HF one
    for spec in (str(source["dir"] / "native"), f"hf:{source['dir'] / 'hf'}"):
        cfg = load_config(ROOT / "configs" / "sft-tiny-cpu.yaml",
                          [f"train.init_from={spec}", f"model.vocab_size={OLD_VOCAB}"])
        plan = plan_init_tokenizer(cfg)
        assert Tokenizer.load(cfg.data.tokenizer).checksum == old.checksum and "the source's" in plan.line
    too_small = load_config(ROOT / "configs" / "continual-tiny-cpu.yaml", _continual(source, 2, ["model.vocab_size=410"]))
    with pytest.raises(ConfigError, match="has 425 ids but model.vocab_size is 410: set model.vocab_size=425"):
        plan_init_tokenizer(too_small)


def test_other_tokenizer_is_refused_by_mllama_train(source, tmp_path):
    """§5 / issue 18: one line, exit 2, before any process starts, nothing written."""
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, "-m", "launch.train", str(ROOT / "configs" / "sft-tiny-cpu.yaml"),
                          f"train.init_from={source['dir'] / 'native'}", f"model.vocab_size={OLD_VOCAB}",
                          f"data.tokenizer={source['other']}", f"train.save_dir={tmp_path / 'run'}",
                          f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, timeout=120, env=env)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert err[0].startswith("error: data.tokenizer=") and "nor an extension of it (id " in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_grown_rows_from_a_native_source_zero_and_random(source, single_process_model_parallel):
    """TP1 in this process, from the native checkpoint: old rows bitwise, new rows zero / a seeded draw."""
    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.config import ParallelConfig, preset
    from megatron_llama.model import LlamaModel
    cfg = preset("tiny", vocab_size=NEW_VOCAB)
    want = source["hf"].model.embed_tokens.weight.detach()
    draws = []
    for mode in ("zero", "random", "random"):
        model = LlamaModel(cfg, ParallelConfig(), seed=3)
        load_initial_weights(model, cfg, str(source["dir"] / "native"), 0, 1, False, source_vocab=OLD_VOCAB,
                             new_rows=mode, seed=5)
        emb = model.embedding.word_embeddings.weight.detach()
        assert torch.equal(emb[:OLD_VOCAB], want)
        if mode == "zero":
            assert not emb[OLD_VOCAB:].any()
        else:
            draws.append(emb[OLD_VOCAB:].clone())
            assert 0.01 < draws[-1].std().item() < 0.04  # N(0, init_std = 0.02)
    assert torch.equal(draws[0], draws[1])


def _continual_task(rank, world, overrides, tokens, steps):
    """The shipped config at TP2: the model right after init_from (gathered weights, logits), then a short run."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from launch.train import _init_from, train
    from megatron_llama.config import load_config
    from pipelines.engine import TrainEngine
    from pipelines.topology import build_topology, init_distributed
    cfg = load_config(ROOT / "configs" / "continual-tiny-cpu.yaml", overrides)
    device, _ = init_distributed()
    layout, topo = build_topology(cfg.parallel, 1, device)
    load, line = _init_from(cfg, layout, save=False)
    engine = TrainEngine(cfg, layout, topo, device, lambda s: 1.0, init_weights=load)
    module = engine.engine.module
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(layout.tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)
    with torch.no_grad():
        logits = gather(module(tokens), -1).transpose(0, 1)
        emb = gather(module.embedding.word_embeddings.weight.detach(), 0)
        head = gather(module.head.output.weight.detach(), 0)
    parallel_state.destroy_model_parallel()
    summary = train(load_config(ROOT / "configs" / "continual-tiny-cpu.yaml", overrides), max_steps=steps,
                    log=False, save=False)
    return dict(line=line, logits=logits, emb=emb, head=head, losses=summary.losses)


@pytest.mark.distributed
def test_continual_pretraining_from_hf_with_extended_vocab(source, dist_pool):
    tokens = torch.randint(0, OLD_VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    results = dist_pool(2).run(_continual_task, _continual(source, 2, ["train.warmup_steps=2"], corpus=False),
                               tokens, 8)
    r = results[0]
    hf = source["hf"]
    print(f"\n{r['line']}\nlosses {[round(x, 3) for x in r['losses']]}")
    assert "400 -> 425 rows, new rows start at mean of the source's rows" in r["line"]
    for ours, theirs in ((r["emb"], hf.model.embed_tokens.weight), (r["head"], hf.lm_head.weight)):
        theirs = theirs.detach()
        assert ours.shape == (426, 64)                       # 425 padded to a multiple of TP2
        assert torch.equal(ours[:OLD_VOCAB], theirs)         # the source's rows, bitwise, at TP2
        mean = theirs.double().mean(0).float()
        assert torch.allclose(ours[OLD_VOCAB:NEW_VOCAB], mean.expand(NEW_VOCAB - OLD_VOCAB, -1), rtol=0, atol=1e-7)
        assert not ours[NEW_VOCAB:].any()                    # padding row zero
    with torch.no_grad():
        ref = hf(tokens).logits
    err = rel_err(r["logits"][..., :OLD_VOCAB], ref)
    print(f"logits over the old tokens vs the source (transformers): rel err {err:.2e}")
    assert err < 1e-5
    losses = r["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
