"""The quickstart journey: train the tiny model (tied embeddings, TP2·DP2, ZeRO-2, tokenizer trained from
the shipped corpus), ``mllama-convert native-to-hf``, then ``transformers`` loads the directory with
``AutoTokenizer`` and ``LlamaForCausalLM`` and generates text. The exported tied embedding is the
trained weight (equal to the checkpoint's, not the initial one), and the logits equal ours."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _train(overrides: list[str]) -> list[float]:
    """``mllama-train configs/tiny-cpu-3d.yaml ...`` as a user runs it (it starts its own 4 processes)."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "launch.train", str(ROOT / "configs" / "tiny-cpu-3d.yaml"), *overrides],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    save_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.save_dir="))
    return json.loads((Path(save_dir) / "summary.json").read_text())["losses"]


def _initial_embedding(cfg):
    from checkpoints_tools.verify import single_process_tp1
    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import LlamaModel
    with single_process_tp1():
        return LlamaModel(cfg.model, ParallelConfig(), seed=cfg.train.seed).embedding.word_embeddings.weight.detach()


# The quickstart's SentencePiece tokenizer (trained by the run, TP2·DP2 ZeRO-2), and a Llama 3-style
# byte-level BPE tokenizer.json given as data.tokenizer (one process: the layout is covered above,
# this case adds the tokenizer.json export at the least cost).
JOURNEYS = {
    "sentencepiece": ["parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=2"],
    "bpe-bytelevel": ["parallel.tp=1", "parallel.dp=1"],
}


@pytest.mark.parametrize("kind", sorted(JOURNEYS))
def test_train_export_generate(kind, tmp_path, capsys):
    import transformers

    from checkpoints_tools.convert import main
    from checkpoints_tools.verify import compare
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.data.tokenizer import load_tokenizer

    run = tmp_path / "run"
    overrides = list(JOURNEYS[kind])
    if kind == "bpe-bytelevel":
        from megatron_llama.data.tokenizer_hf import train_bpe_bytelevel
        ours = load_tokenizer(train_bpe_bytelevel([str(ROOT / "data" / "corpus.jsonl")], str(tmp_path / "bpe"), 512))
        overrides.append(f"data.tokenizer={ours.path}")
    losses = _train(["model.tie_embeddings=true", "parallel.pp=1", *overrides, "train.steps=12",
                     f"train.save_dir={run}", f"data.corpus={ROOT / 'data' / 'corpus.jsonl'}",
                     f"data.cache_dir={tmp_path / 'data'}"])
    assert losses[-1] < losses[0]
    out = tmp_path / "hf"
    assert main(["native-to-hf", str(run), str(out), "--dtype", "fp32", "--no-progress"]) == 0
    assert "verify:" in capsys.readouterr().err  # a small model is verified by default
    tokenizer_file = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
    assert (out / tokenizer_file).is_file() and (out / "tokenizer_config.json").is_file()
    ours = load_tokenizer(out / tokenizer_file)

    ck = open_native(run)
    trained = ck.layer(0, pad_for_tp=1)["embedding.word_embeddings.weight"]
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    exported = model.model.embed_tokens.weight.detach()
    assert torch.equal(exported, trained)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not torch.allclose(exported, _initial_embedding(ck.config), atol=1e-4), "exported an untrained copy"
    report = compare(str(run), str(out))
    assert report.max_rel < 1e-5, report.describe()

    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("The river", return_tensors="pt").input_ids
    assert ids[0].tolist() == [ours.bos_id, *ours.encode("The river")] and tok.bos_token_id == ours.bos_id
    assert tok.eos_token_id == ours.eos_id == model.config.eos_token_id
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0], skip_special_tokens=True)
    print("generated:", text)
    assert gen.shape[1] > ids.shape[1] and text.startswith("The river") and len(text) > len("The river")
