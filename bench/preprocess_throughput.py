"""Benchmark (not a test): preprocessing MB/s per worker, raw SentencePiece speed, index build time.

    .venv/bin/python bench/preprocess_throughput.py          # ~3-5 min on a 2-core machine

1. Text: the Python standard library's sources and docs (English prose + code, no download),
   as JSONL documents. A 32k-vocabulary LLaMA-style BPE is trained on a sample of it.
2. Raw ``sp.encode`` (one thread, batched) in MB/s: the ceiling for one worker.
3. ``preprocess`` with 1 worker (in-process) and with all cores: MB/s of input JSONL per worker.
   Rates are per CPU-second (process + child CPU time) as well as per wall second: the
   machine is shared, and CPU time is what a worker costs whatever else is running.
4. Index building for a multi-GB-token corpus: a synthetic .idx (4M documents, 4B tokens) with
   a sparse .bin (no disk used), then GPTDataset indices (seq 2048), cold and cached, and a
   two-source blend.

Writes bench/results/preprocess_throughput.json.

    .venv/bin/python bench/preprocess_throughput.py --kinds   # ~15 min on a 2-core machine

``--kinds`` instead compares the tokenizer kinds on >= 200 MB of JSONL made from the shipped
corpus (data/corpus.jsonl, its documents reshuffled per copy): a 32k SentencePiece BPE and a 128k
byte-level BPE (``tokenizers``, Llama 3's layout), both trained on the stdlib text and installed
packages' sources (the shipped corpus is too small for 128k merges), each through ``preprocess``
with 1 and 2 workers. MB/s per CPU-second is the figure to read (the machine is shared: load
averages are recorded). The byte-level BPE runs with its chunk memo (``chunk_memo.py``) and once
without; the memo's hit rate (share of bytes it answered) and size come from one worker's memo
over the whole file. The shipped corpus repeats by construction, so the memo answers nearly all
of it; ``distinct_text`` repeats the BPE runs on as many MB of distinct text (the stdlib's and
the installed packages' sources and docs). Every run's .bin/.idx sha256 is recorded, and
``same_bytes_with_and_without_memo`` says whether they are all equal.
Writes bench/results/preprocess_throughput_kinds.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import site
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_llama.data.indexed import write_index  # noqa: E402
from megatron_llama.data.preprocess import preprocess  # noqa: E402
from megatron_llama.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

TARGET_MB = 24


def make_corpus(path: Path, target_mb: float = TARGET_MB, site_packages: bool = False) -> int:
    """Stdlib .py/.txt/.rst files (``site_packages``: and the installed packages', for more
    distinct words; then this environment's, for more text), split into ~4 KB documents, until
    ``target_mb`` of JSONL."""
    stdlib = Path(os.__file__).parent
    files = sorted(stdlib.rglob("*"))
    if site_packages:
        files += sorted(f for d in site.getsitepackages() if not Path(d).is_relative_to(stdlib)
                        for f in Path(d).rglob("*"))
    size = 0
    with open(path, "w") as out:
        for f in files:
            if f.suffix not in (".py", ".txt", ".rst") or not f.is_file() or (
                    "site-packages" in f.parts and not site_packages):
                continue
            text = f.read_text(errors="replace")
            for k in range(0, len(text), 4096):
                line = json.dumps({"text": text[k:k + 4096], "src": f.name}) + "\n"
                out.write(line)
                size += len(line)
            if size > target_mb * 1e6:
                return size
    return size


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def raw_encode_mbps(tok: Tokenizer, path: Path) -> tuple[float, float]:
    """(MB/s per CPU-second, per wall second) of SentencePiece alone on the corpus's texts."""
    texts = [json.loads(line)["text"] for line in open(path)][:6000]
    nbytes = sum(len(t.encode()) for t in texts)
    c0, t0 = time.process_time(), time.perf_counter()
    for k in range(0, len(texts), 256):
        tok.sp.encode(texts[k:k + 256], num_threads=1)
    return nbytes / 1e6 / (time.process_time() - c0), nbytes / 1e6 / (time.perf_counter() - t0)


def index_build(tmp: Path, seq_len: int = 2048) -> dict:
    import torch  # noqa: F401  (import cost outside the timings)
    from megatron_llama.config import DataConfig
    from megatron_llama.data import build_train_dataset
    rng = np.random.default_rng(0)
    out = {}
    prefixes = []
    for name, docs in (("big", 4_000_000), ("small", 1_000_000)):
        lengths = rng.integers(1, 2000, docs).astype(np.int32)  # mean ~1000 tokens
        prefix = tmp / name
        t0 = time.perf_counter()
        write_index(f"{prefix}.idx", np.uint16, lengths)
        with open(f"{prefix}.bin", "wb") as f:  # sparse: the right size, no blocks written
            f.truncate(int(lengths.sum(dtype=np.int64)) * 2)
        out[f"{name}_tokens"] = int(lengths.sum(dtype=np.int64))
        out[f"{name}_documents"] = docs
        out[f"{name}_write_idx_s"] = round(time.perf_counter() - t0, 2)
        prefixes.append(str(prefix))
    # tokenizer: any model with vocab <= 65535 ids works for a synthetic corpus of zeros
    tok = str(tmp / "tok.model")
    for label, sources in (("single", [{"path": prefixes[0]}]),
                           ("blend", [{"path": prefixes[0], "weight": 0.7},
                                      {"path": prefixes[1], "weight": 0.3, "epochs": 2.0}])):
        for run in ("cold", "cached"):
            data = DataConfig(seq_len=seq_len, tokenizer=tok, sources=sources, cache_dir=str(tmp / "cache"))
            t0 = time.perf_counter()
            ds = build_train_dataset(data, seed=1, model_vocab_size=32000)
            out[f"{label}_{run}_s"] = round(time.perf_counter() - t0, 2)
            out[f"{label}_windows"] = len(ds)
            ds[len(ds) - 1]
    return out


def make_shipped_corpus(path: Path, target_mb: float) -> int:
    """data/corpus.jsonl repeated until ``target_mb``, documents in a new order per copy."""
    import random
    lines = (ROOT / "data" / "corpus.jsonl").read_text().splitlines(keepends=True)
    size, rng = 0, random.Random(0)
    with open(path, "w") as out:
        while size < target_mb * 1e6:
            rng.shuffle(lines)
            out.writelines(lines)
            size += sum(map(len, lines))
    return size


def raw_batch_mbps(tok, path: Path, n: int = 20000) -> float:
    """MB/s per CPU-second of the tokenizer's own batch encode on the corpus's first texts."""
    texts = [json.loads(line)["text"] for _, line in zip(range(n), open(path))]
    nbytes = sum(len(t.encode()) for t in texts)
    c0 = time.process_time()
    for k in range(0, len(texts), 512):
        tok.encode_batch(texts[k:k + 512])
    return nbytes / 1e6 / (time.process_time() - c0)


def bpe_breakdown(tok, path: Path, n: int = 20000) -> dict:
    """Where a byte-level BPE's time goes: its regex pre-tokenizer alone (with the Python objects
    it returns, so an upper bound on its cost), and tiktoken on the same vocabulary (ranks = ids)."""
    import tiktoken

    from megatron_llama.data.tokenizer_hf import LLAMA3_PATTERN
    from megatron_llama.data.tokenizer_tiktoken import bytes_to_unicode
    texts = [json.loads(line)["text"] for _, line in zip(range(n), open(path))]
    nbytes = sum(len(t.encode()) for t in texts) / 1e6
    c0 = time.process_time()
    for t in texts:
        tok.tk.pre_tokenizer.pre_tokenize_str(t)
    pre = nbytes / (time.process_time() - c0)
    inv = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(inv[c] for c in s): i for s, i in tok.tk.get_vocab(with_added_tokens=False).items()
             if all(c in inv for c in s)}
    enc = tiktoken.Encoding("bench", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    c0 = time.process_time()
    ids = enc.encode_ordinary_batch(texts, num_threads=1)
    tt = nbytes / (time.process_time() - c0)
    return {"pretokenize_only_mb_s_per_cpu_s": round(pre, 2), "tiktoken_same_vocab_mb_s_per_cpu_s": round(tt, 2),
            "tiktoken_ids_equal_on_sample": ids == tok.encode_batch(texts)}


def memo_pass(tok, path: Path, batch_bytes: int = 1 << 20) -> dict:
    """One worker's chunk memo over the whole file, in preprocess's ~1 MB batches: its MB/s per
    CPU-second (encode alone), the share of bytes it answered (hit rate) and its size at the end."""
    from megatron_llama.data.chunk_memo import ChunkMemo
    memo = ChunkMemo(tok.tk, tok.eos_id)
    cpu, nbytes, batch, size = 0.0, 0, [], 0

    def run():
        nonlocal cpu
        c0 = time.process_time()
        memo.encode_documents(batch)
        cpu += time.process_time() - c0

    with open(path) as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            size += len(line)
            if size >= batch_bytes:
                run()
                batch, size = [], 0
    if batch:
        run()
    held = sys.getsizeof(memo.memo) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in memo.memo.items())
    return {"memo_alone_mb_s_per_cpu_s": round(memo.total_bytes / 1e6 / cpu, 2), "hit_rate_by_bytes": round(memo.hit_rate(), 4),
            "entries_at_end": len(memo.memo), "memo_mb_at_end": round(held / 1e6, 1), "max_entries": memo.max_entries}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def preprocess_runs(corpus: Path, out: Path, tokenizer: str, runs) -> dict:
    """``preprocess`` once per (label, workers, chunk_memo): MB/s per CPU-second and per wall
    second, load averages, the output's sha256 (.bin and .idx)."""
    r: dict = {}
    for label, workers, memo in runs:
        load = os.getloadavg()
        c0 = cpu_seconds()
        s = preprocess([str(corpus)], str(out / label), tokenizer, workers=workers, progress=False, chunk_memo=memo)
        cpu = cpu_seconds() - c0
        mb = s.input_bytes / 1e6
        r[label] = {"workers": workers, "chunk_memo": memo,
                    "mb_s_per_cpu_s": round(mb / cpu, 2), "mb_s_wall": round(mb / s.seconds, 2),
                    "cpu_s": round(cpu, 1), "wall_s": round(s.seconds, 1),
                    "load_average_before": [round(x, 2) for x in load],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "sha256_bin_idx": [sha256(out / f"{label}.bin"), sha256(out / f"{label}.idx")]}
        r["tokens"], r["bytes_per_token"] = s.tokens, round(s.input_bytes / s.tokens, 2)
        (out / f"{label}.bin").unlink()
        print(label, json.dumps(r[label]), flush=True)
    return r


def kinds(target_mb: float) -> dict:
    from megatron_llama.data.tokenizer import load_tokenizer
    from megatron_llama.data.tokenizer_hf import train_bpe_bytelevel
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # raw encode: one core, as one worker
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "python": platform.python_version(), "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stdlib = tmp / "stdlib.jsonl"
        results["tokenizer_training_text_mb"] = round(make_corpus(stdlib, 120, site_packages=True) / 1e6, 1)
        corpus = tmp / "shipped.jsonl"
        results["input_mb"] = round(make_shipped_corpus(corpus, target_mb) / 1e6, 1)
        t0 = time.perf_counter()
        sp = train_tokenizer([str(stdlib)], str(tmp / "sp32k"), 32000, max_sentences=2_000_000)
        results["train_s_sentencepiece_32k"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        bpe = train_bpe_bytelevel([str(stdlib)], str(tmp / "bpe128k"), 128000)
        results["train_s_bpe_bytelevel_128k"] = round(time.perf_counter() - t0, 1)
        distinct = tmp / "distinct.jsonl"
        results["distinct_text_mb"] = round(make_corpus(distinct, target_mb, site_packages=True) / 1e6, 1)
        for name, path in (("sentencepiece_32k", sp), ("bpe_bytelevel_128k", bpe)):
            tok = load_tokenizer(path)
            r = {"kind": tok.kind, "vocab_size": tok.vocab_size,
                 "raw_encode_batch_mb_s_per_cpu_s": round(raw_batch_mbps(tok, corpus), 2)}
            memo = tok.kind == "tokenizers"
            if memo:
                r["breakdown"] = bpe_breakdown(tok, corpus)
                r["chunk_memo_refusal"] = tok.chunk_memo_refusal  # None: the memo is on
                r["memo"] = memo_pass(tok, corpus)
            runs = [("1w", 1, True), ("2w", 2, True)] + [("1w_without_memo", 1, False)] * memo
            r.update(preprocess_runs(corpus, tmp, path, runs))
            alone = r["memo"]["memo_alone_mb_s_per_cpu_s"] if memo else r["raw_encode_batch_mb_s_per_cpu_s"]
            r["share_of_cpu_in_encode_1w"] = round(r["1w"]["mb_s_per_cpu_s"] / alone, 2)  # the rest: JSON, I/O
            r["target_5_mb_s_per_core_met"] = r["1w"]["mb_s_per_cpu_s"] >= 5 and r["2w"]["mb_s_per_cpu_s"] >= 5
            if memo:
                r["same_bytes_with_and_without_memo"] = (r["1w"]["sha256_bin_idx"] == r["2w"]["sha256_bin_idx"]
                                                         == r["1w_without_memo"]["sha256_bin_idx"])
                # the shipped corpus repeats by construction; the same on text that does not
                d = {"memo": memo_pass(tok, distinct)}
                d.update(preprocess_runs(distinct, tmp, path, runs))
                d["same_bytes_with_and_without_memo"] = (d["1w"]["sha256_bin_idx"] == d["2w"]["sha256_bin_idx"]
                                                         == d["1w_without_memo"]["sha256_bin_idx"])
                r["distinct_text"] = d
            results[name] = r
            print(name, json.dumps(r), flush=True)
    return results


def main() -> None:
    if "--kinds" in sys.argv:
        results = kinds(float(os.environ.get("BENCH_MB", "205")))
        out = ROOT / "bench" / "results" / "preprocess_throughput_kinds.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "python": platform.python_version(),
                     "load_average_at_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        corpus = tmp / "stdlib.jsonl"
        results["input_mb"] = round(make_corpus(corpus) / 1e6, 1)
        sample = tmp / "sample.jsonl"
        with open(corpus) as src, open(sample, "w") as dst:
            dst.writelines(line for k, line in enumerate(src) if k % 4 == 0)
        t0 = time.perf_counter()
        model = train_tokenizer([str(sample)], str(tmp / "tok"), 32000)
        results["tokenizer_train_s_32k"] = round(time.perf_counter() - t0, 1)
        tok = Tokenizer.load(model)
        cpu, wall = raw_encode_mbps(tok, corpus)
        results["raw_sp_encode_mb_s_per_cpu_s"] = round(cpu, 2)
        results["raw_sp_encode_mb_s_wall"] = round(wall, 2)
        for workers in (1, os.cpu_count() or 1):
            c0 = cpu_seconds()
            s = preprocess([str(corpus)], str(tmp / f"out{workers}"), model, workers=workers, progress=False)
            mb = s.input_bytes / 1e6
            results[f"preprocess_{workers}w_mb_s_wall_total"] = round(mb / s.seconds, 2)
            results[f"preprocess_{workers}w_mb_s_wall_per_worker"] = round(mb / s.seconds / workers, 2)
            results[f"preprocess_{workers}w_mb_s_per_cpu_s"] = round(mb / (cpu_seconds() - c0), 2)
            results["tokens"] = s.tokens
        results["bytes_per_token"] = round(results["input_mb"] * 1e6 / results["tokens"], 2)
        # Tokenizer-limited: the whole pipeline (JSON, EOS, numpy, writing) costs little more CPU
        # per MB than SentencePiece's encode alone.
        results["pipeline_cpu_share_in_sp_encode"] = round(
            results["preprocess_1w_mb_s_per_cpu_s"] / results["raw_sp_encode_mb_s_per_cpu_s"], 2)
        results["tokenizer_limited"] = results["pipeline_cpu_share_in_sp_encode"] >= 0.8
        results["index_build"] = index_build(tmp)
    out = ROOT / "bench" / "results" / "preprocess_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
