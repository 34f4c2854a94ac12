"""``mllama-convert`` in one process: bitwise HF round trip through TP2·PP2, Meta's interleaved-RoPE
checkpoints against a reference model of our own, and every kind of bad input (one ``error:`` line,
exit status 2, nothing left behind)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints_tools.convert import main
from test_model_parity import case_config, hf_reference


def _hf_dir(tmp_path: Path, case: str = "gqa", name: str = "hf", shard: str = "40KB") -> Path:
    cfg = case_config(case)
    d = tmp_path / name
    hf_reference(cfg, "qwen2" if case == "qkv-bias" else "llama", seed=5).save_pretrained(d, max_shard_size=shard)
    return d


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _run(argv) -> int:
    return main(argv + ["--no-progress"] if argv[0] != "inspect" else argv)


def test_hf_round_trip_through_tp2_pp2_is_bitwise(tmp_path):
    """fp32 in, fp32 out without asking (--dtype auto: the stored dtype), every tensor bitwise."""
    hf = _hf_dir(tmp_path, "qkv-bias")
    assert _run(["hf-to-native", str(hf), str(tmp_path / "n"), "--tp", "2", "--pp", "2", "--verify", "no"]) == 0
    assert json.loads((tmp_path / "n" / "run.json").read_text())["dtype"] == "float32"
    assert _run(["native-to-hf", str(tmp_path / "n"), str(tmp_path / "back"),
                 "--max-shard-size", "50KB", "--verify", "yes"]) == 0
    a, b = _tensors(hf), _tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "float32"
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    from safetensors import safe_open
    first = next((tmp_path / "back").glob("*.safetensors"))
    with safe_open(str(first), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_export_dtype_is_the_stored_one_unless_asked(tmp_path):
    """A bf16 checkpoint exports as bf16 by default (no silent upcast either); --dtype chooses;
    an HF input mixing bf16 and fp32 converts to fp32 (exact for both); float64 is refused."""
    from safetensors.torch import load_file, save_file
    hf = _hf_dir(tmp_path, "gqa", shard="10MB")
    src = _tensors(hf)
    assert _run(["hf-to-native", str(hf), str(tmp_path / "bf"), "--tp", "2", "--pp", "2", "--dtype", "bf16",
                 "--verify", "no"]) == 0
    assert _run(["native-to-hf", str(tmp_path / "bf"), str(tmp_path / "out-bf"), "--verify", "no"]) == 0
    out = _tensors(tmp_path / "out-bf")
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], src[k].to(torch.bfloat16)) for k in src)
    assert _run(["native-to-hf", str(tmp_path / "bf"), str(tmp_path / "out-up"), "--dtype", "fp32",
                 "--verify", "no"]) == 0
    up = _tensors(tmp_path / "out-up")
    assert all(up[k].dtype == torch.float32 and torch.equal(up[k], out[k].float()) for k in src)
    # mixed input: the norms in fp32, the matrices in bf16
    mixed = {k: (t if t.dim() == 1 else t.to(torch.bfloat16)) for k, t in src.items()}
    (f,) = hf.glob("*.safetensors")
    save_file(mixed, str(f), metadata={"format": "pt"})
    assert _run(["hf-to-native", str(hf), str(tmp_path / "mix"), "--verify", "no"]) == 0
    assert _run(["native-to-hf", str(tmp_path / "mix"), str(tmp_path / "out-mix"), "--verify", "no"]) == 0
    back = _tensors(tmp_path / "out-mix")
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], mixed[k].float()) for k in src)
    save_file({k: t.double() for k, t in load_file(f).items()}, str(f), metadata={"format": "pt"})
    assert _run(["hf-to-native", str(hf), str(tmp_path / "f64"), "--verify", "no"]) == 2
    assert _run(["hf-to-native", str(hf), str(tmp_path / "f64"), "--dtype", "fp32", "--verify", "no"]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_every_written_file_honours_the_umask(tmp_path, umask):
    """safetensors' save_file alone would leave model*.safetensors at 0600."""
    hf, tok = _hf_dir(tmp_path, "gqa"), _tokenizer(tmp_path)
    old = os.umask(umask)
    try:
        assert _run(["hf-to-native", str(hf), str(tmp_path / "n"), "--tp", "2", "--pp", "2", "--verify", "no"]) == 0
        for shard in ("10MB", "50KB"):  # one model.safetensors, and sharded with an index
            out = tmp_path / f"hf-{shard}"
            assert _run(["native-to-hf", str(tmp_path / "n"), str(out), "--max-shard-size", shard,
                         "--verify", "no", "--tokenizer", tok]) == 0
    finally:
        os.umask(old)
    files = [p for d in ("n", "hf-10MB", "hf-50KB") for p in (tmp_path / d).iterdir()]
    assert (tmp_path / "hf-10MB" / "model.safetensors").is_file() and (tmp_path / "hf-50KB" / "tokenizer.model").is_file()
    assert len([p for p in files if p.suffix == ".safetensors"]) > 2
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    for d in ("n", "hf-10MB", "hf-50KB"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o777 & ~umask


def _tokenizer(tmp_path: Path) -> str:
    from megatron_llama.data.tokenizer import train_tokenizer
    return train_tokenizer([str(Path(__file__).parent.parent / "data" / "corpus.jsonl")], str(tmp_path / "tok"), 400,
                           max_sentences=2000)


def test_pytorch_bin_input(tmp_path):
    cfg = case_config("mha")
    d = tmp_path / "bin"
    model = hf_reference(cfg, "llama", seed=2)
    model.save_pretrained(d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # two pytorch_model-*.bin with an index
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in halves.items():
        torch.save({k: state[k] for k in ks}, d / name)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                   "weight_map": {k: n for n, ks in halves.items()
                                                                                  for k in ks}}))
    assert _run(["hf-to-native", str(tmp_path / "bin"), str(tmp_path / "n"), "--tp", "2", "--verify", "yes"]) == 0


def test_tied_export_has_no_lm_head_and_loads(tmp_path):
    import transformers
    hf = _hf_dir(tmp_path, "tied")
    assert _run(["hf-to-native", str(hf), str(tmp_path / "n"), "--tp", "2", "--verify", "no"]) == 0
    assert _run(["native-to-hf", str(tmp_path / "n"), str(tmp_path / "out"), "--dtype", "fp32", "--verify", "no"]) == 0
    assert "lm_head.weight" not in _tensors(tmp_path / "out")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_inspect_reads_metadata(tmp_path, capsys):
    hf = _hf_dir(tmp_path)
    assert _run(["hf-to-native", str(hf), str(tmp_path / "n"), "--tp", "2", "--pp", "2", "--verify", "no"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "n"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "TP2·PP2" in out and "weights only" in out and "vocab     501 (padded to 502 for TP2)" in out
    assert "layers.3.attention.qkv.weight" in out and "rows" in out and "4.attention.qkv.weight" in out
    assert main(["inspect", str(hf)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out


def test_inspect_names_the_trained_tokenizer_not_the_corpus(tmp_path, capsys):
    """A run that trained its tokenizer from data.corpus: inspect shows that tokenizer.model (the
    file native-to-hf exports), or says it is gone; the corpus is not a tokenizer."""
    from megatron_llama.config import DataConfig
    from megatron_llama.data.build import _prepare_corpus
    hf = _hf_dir(tmp_path)
    assert _run(["hf-to-native", str(hf), str(tmp_path / "n"), "--verify", "no"]) == 0
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join((Path(__file__).parent.parent / "data" / "corpus.jsonl").read_text().splitlines(True)[:300]))
    data = DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), vocab_size=400)
    trained, _ = _prepare_corpus(data, 501)  # what a run does at start-up
    meta = json.loads((tmp_path / "n" / "run.json").read_text())
    meta["config"]["data"].update(tokenizer=None, corpus=str(corpus), cache_dir=str(tmp_path / "cache"), vocab_size=400)
    (tmp_path / "n" / "run.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "n")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("tokenizer"))
    assert line.split()[1] == trained and f"(trained from {corpus})" in line, line
    shutil.rmtree(tmp_path / "cache")
    assert main(["inspect", str(tmp_path / "n")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("tokenizer"))
    assert line.split()[1] == "none" and "no longer holds it" in line, line


# --- Meta ------------------------------------------------------------------------------------------
META = dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300, multiple_of=32, norm_eps=1e-5,
            rope_theta=10000.0)  # 3 query heads per KV head: neither 1 nor n_kv_heads


def _meta_weights(p: dict, seed: int = 0, tied: bool = False) -> dict[str, torch.Tensor]:
    """Random Meta-layout weights for params.json ``p`` (``ffn_dim_multiplier`` as Llama 3's);
    ``tied``: no ``output.weight`` (Llama 3.2)."""
    g = torch.Generator().manual_seed(seed)
    d, hd = p["dim"], p["dim"] // p["n_heads"]
    f = int(p.get("ffn_dim_multiplier", 1.0) * int(2 * 4 * d / 3))
    f = p["multiple_of"] * math.ceil(f / p["multiple_of"])

    def mat(o, i, scale=1.0):
        return torch.randn(o, i, generator=g) * scale / i ** 0.5

    def norm():
        return 1 + 0.2 * torch.randn(d, generator=g)

    w = {"tok_embeddings.weight": torch.randn(p["vocab_size"], d, generator=g), "norm.weight": norm()}
    if not tied:
        w["output.weight"] = mat(p["vocab_size"], d)
    for i in range(p["n_layers"]):
        # large q/k: sharp attention, so rotary mistakes change the logits by O(1), not 1e-5
        w |= {f"layers.{i}.attention.wq.weight": mat(p["n_heads"] * hd, d, 4.0),
              f"layers.{i}.attention.wk.weight": mat(p["n_kv_heads"] * hd, d, 4.0),
              f"layers.{i}.attention.wv.weight": mat(p["n_kv_heads"] * hd, d),
              f"layers.{i}.attention.wo.weight": mat(d, p["n_heads"] * hd),
              f"layers.{i}.feed_forward.w1.weight": mat(f, d), f"layers.{i}.feed_forward.w3.weight": mat(f, d),
              f"layers.{i}.feed_forward.w2.weight": mat(d, f),
              f"layers.{i}.attention_norm.weight": norm(), f"layers.{i}.ffn_norm.weight": norm()}
    return w


def _meta_reference(w: dict, p: dict, tokens: torch.Tensor, freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's LLaMA forward, written from the paper's description: complex (interleaved-pair) RoPE, GQA.
    ``freqs`` [head_dim / 2]: rotary frequencies (default: from ``rope_theta``); a model without
    ``output.weight`` (tied) multiplies by the embedding."""
    d, H, G = p["dim"], p["n_heads"], p["n_kv_heads"]
    hd = d // H
    b, s = tokens.shape

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["norm_eps"]) * weight

    if freqs is None:
        freqs = 1.0 / p["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    cis = torch.polar(torch.ones(s, hd // 2), torch.outer(torch.arange(s).float(), freqs.float()))

    def rope(x):  # [b, s, heads, hd]: pairs (x0, x1), (x2, x3), ... are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = w["tok_embeddings.weight"][tokens]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        L = lambda n: w[f"layers.{i}.{n}.weight"]  # noqa: E731
        x = rms(h, L("attention_norm"))
        q = rope((x @ L("attention.wq").T).view(b, s, H, hd))
        k = rope((x @ L("attention.wk").T).view(b, s, G, hd)).repeat_interleave(H // G, dim=2)
        v = (x @ L("attention.wv").T).view(b, s, G, hd).repeat_interleave(H // G, dim=2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / hd ** 0.5 + mask
        o = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, s, d)
        h = h + o @ L("attention.wo").T
        x = rms(h, L("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ L("feed_forward.w1").T) * (x @ L("feed_forward.w3").T)) @ L("feed_forward.w2").T
    return rms(h, w["norm.weight"]) @ w.get("output.weight", w["tok_embeddings.weight"]).T


def _write_meta(w: dict, p: dict, out: Path, shards: int = 2) -> None:
    out.mkdir()
    (out / "params.json").write_text(json.dumps(p))
    for r in range(shards):
        part = {"rope.freqs": torch.zeros(8)}
        for k, t in w.items():
            short = k.rsplit(".", 2)[-2]
            if k == "tok_embeddings.weight":
                dim = 1
            elif short in ("wq", "wk", "wv", "w1", "w3", "output"):
                dim = 0
            elif short in ("wo", "w2"):
                dim = 1
            else:
                part[k] = t.clone()
                continue
            part[k] = t.chunk(shards, dim=dim)[r].clone()
        torch.save(part, out / f"consolidated.{r:02d}.pth")


def test_meta_to_native_matches_interleaved_reference(tmp_path, monkeypatch):
    from checkpoints_tools import meta
    from checkpoints_tools.verify import native_logits
    w = _meta_weights(META)
    _write_meta(w, META, tmp_path / "meta")
    tokens = torch.randint(0, META["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
    ref = _meta_reference(w, META, tokens)
    assert _run(["meta-to-native", str(tmp_path / "meta"), str(tmp_path / "n"), "--tp", "2"]) == 0
    ours = native_logits(str(tmp_path / "n"), tokens)
    err = ((ours - ref).norm() / ref.norm()).item()
    print(f"meta: rel err {err:.2e}")
    assert err < 1e-5
    # the same conversion without the rotary permutation must be caught by this test
    monkeypatch.setattr(meta, "interleaved_to_halves", lambda t, heads: t)
    assert _run(["meta-to-native", str(tmp_path / "meta"), str(tmp_path / "bad")]) == 0
    wrong = native_logits(str(tmp_path / "bad"), tokens)
    assert ((wrong - ref).norm() / ref.norm()).item() > 1e-2


# --- bad input -------------------------------------------------------------------------------------
def _fails(capsys, argv, words: str, out: Path) -> None:
    capsys.readouterr()
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    if out is not None:
        assert not out.exists() or (out / "keep").exists(), "partial output left behind"
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_input(tmp_path, capsys):
    hf = _hf_dir(tmp_path, shard="20KB")
    out = tmp_path / "out"
    # not a LLaMA checkpoint
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64}))
    _fails(capsys, ["hf-to-native", str(gpt), str(out)], "not a LLaMA-family checkpoint", out)
    _fails(capsys, ["native-to-hf", str(tmp_path / "nothing"), str(out)], "does not exist", out)
    _fails(capsys, ["hf-to-native", str(tmp_path / "nothing"), str(out)], f"{tmp_path / 'nothing'} does not exist", out)
    _fails(capsys, ["hf-to-native", str(gpt / "config.json"), str(out)], "is a file, not a directory", out)
    _fails(capsys, ["hf-to-native", str(tmp_path), str(out)], "has no config.json", out)
    # TP not dividing the KV heads (tiny-gqa: 8 heads, 4 KV heads)
    _fails(capsys, ["hf-to-native", str(hf), str(out), "--tp", "8"], "--tp=8 does not divide model.num_kv_heads=4", out)
    # shapes that disagree with the config
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(hf, bad_cfg)
    c = json.loads((bad_cfg / "config.json").read_text())
    (bad_cfg / "config.json").write_text(json.dumps(c | {"intermediate_size": c["intermediate_size"] + 16}))
    _fails(capsys, ["hf-to-native", str(bad_cfg), str(out)], "config.json", out)
    # a missing shard
    gone = tmp_path / "gone"
    shutil.copytree(hf, gone)
    sorted(gone.glob("model-*.safetensors"))[1].unlink()
    _fails(capsys, ["hf-to-native", str(gone), str(out)], "missing", out)
    # a damaged file (the last shard: the failure comes mid-write, after output was started)
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    last = sorted(broken.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:200])
    _fails(capsys, ["hf-to-native", str(broken), str(out), "--tp", "2", "--pp", "2"], "damaged", out)
    # an existing output directory, unless --force
    out.mkdir()
    (out / "keep").write_text("mine")
    _fails(capsys, ["hf-to-native", str(hf), str(out)], "already exists", out)
    assert (out / "keep").read_text() == "mine"
    assert _run(["hf-to-native", str(hf), str(out), "--tp", "2", "--pp", "2", "--force", "--verify", "no"]) == 0
    assert not (out / "keep").exists() and (out / "run.json").is_file()
    # native side: a missing and a damaged shard
    native = tmp_path / "native"
    shutil.copytree(out, native)
    (native / "layer_03-model_01-model_states.pt").unlink()
    _fails(capsys, ["native-to-hf", str(native), str(tmp_path / "hf_out")], "layer_03-model_01", tmp_path / "hf_out")
    shutil.rmtree(native)
    shutil.copytree(out, native)
    f = native / "layer_05-model_00-model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    _fails(capsys, ["native-to-hf", str(native), str(tmp_path / "hf_out")], "damaged", tmp_path / "hf_out")


def test_vocabulary_smaller_than_tokenizer(tmp_path, capsys):
    from megatron_llama.data.tokenizer import train_tokenizer
    tok = train_tokenizer([str(Path(__file__).parent.parent / "data" / "corpus.jsonl")], str(tmp_path / "tok"), 600,
                          max_sentences=20000)
    hf = _hf_dir(tmp_path)  # vocabulary 501 < 600 pieces
    _fails(capsys, ["hf-to-native", str(hf), str(tmp_path / "out"), "--tokenizer", tok],
           "has 600 ids but the model's vocabulary has only 501", tmp_path / "out")


def test_init_from_is_ignored_when_the_run_resumes_and_checks_the_shape(tmp_path):
    from launch.train import _init_from
    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.config import ConfigError, load_config
    from types import SimpleNamespace
    hf = _hf_dir(tmp_path)
    cfg = load_config(None, ["model.preset=tiny-gqa", "model.vocab_size=501", f"train.save_dir={tmp_path / 'run'}",
                             f"train.init_from=hf:{hf}"])
    layout = SimpleNamespace(tp=1, pp=1)
    load, line = _init_from(cfg, layout, save=True)
    assert load is not None and line.startswith("initialised from Hugging Face directory") and "step 0" in line
    (tmp_path / "run" / "step0000005").mkdir(parents=True)
    (tmp_path / "run" / "step0000005" / "run.json").write_text("{}")
    load, line = _init_from(cfg, layout, save=True)
    assert load is None and "ignored: resuming" in line
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        load_initial_weights(torch.nn.Linear(1, 1), cfg.model, f"hf:{tmp_path / 'nowhere'}", 0, 1, pipelined=False)
    other = load_config(None, ["model.preset=tiny", "model.vocab_size=501"])  # 4 KV heads, not tiny-gqa's
    with pytest.raises(ConfigError, match="different model shape: num_attention_heads=8 \\(run: 4\\)"):
        load_initial_weights(torch.nn.Linear(1, 1), other.model, f"hf:{hf}", 0, 1, pipelined=False)
