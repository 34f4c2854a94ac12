"""Memory and speed of ``mllama-convert`` on a LLaMA-7B-shaped checkpoint (random bf16 weights).

For each layer count (default 8 and 32): writes a random bf16 HF checkpoint of the LLaMA-7B shape
(d 4096, 32 heads, ffn 11008, vocab 32000; one safetensors file per layer, 2 GB index shards are not
needed to measure streaming) into a scratch directory, then runs as separate processes

* ``mllama-convert hf-to-native HF NATIVE --tp 2 --pp 2``
* ``mllama-convert native-to-hf NATIVE HF2 --dtype bf16``

and records each one's peak RSS (``getrusage(RUSAGE_CHILDREN)`` of a fresh child), wall time and
GB/s (bytes of weights written / wall time), next to the target: peak RSS <= 3 x the largest layer
+ 2 GiB and not growing with the number of layers. Everything is deleted afterwards.

    python bench/convert_memory.py --layers 8,32 --out bench/results/convert_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def write_random_hf(out: Path, layers: int) -> int:
    """A LLaMA-7B-shaped HF directory with ``layers`` blocks; returns the bytes of weights."""
    from safetensors.torch import save_file

    from megatron_llama.config import preset
    from megatron_llama.model.hf_mapping import hf_config_kwargs, hf_keys
    from checkpoints_tools.hf_export import hf_shapes, write_hf_config
    cfg = preset("llama-7b", num_layers=layers)
    out.mkdir(parents=True)
    shapes = dict(hf_shapes(cfg))
    groups = [["model.embed_tokens.weight"]] + [hf_keys(cfg, f"layers.{i}") for i in range(layers)] + [
        ["model.norm.weight", "lm_head.weight"]]
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    # random values tiled from one block: what is measured is I/O and copies, not the values, and drawing
    # 7e9 normal numbers would take longer than the conversions themselves on a small machine
    block = (torch.randn(1 << 20, generator=g) * 0.02).to(torch.bfloat16)

    def rand(shape):
        n = int(torch.Size(shape).numel())
        return block.repeat(-(-n // block.numel()))[:n].view(shape).roll(int(torch.randint(n, (1,), generator=g)))

    for n, keys in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: rand(shapes[k]) for k in keys}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    write_hf_config(out, cfg, torch.bfloat16)
    assert hf_config_kwargs(cfg)["num_hidden_layers"] == layers
    return total


def largest_layer_bytes(layers: int) -> int:
    from megatron_llama.config import preset
    cfg = preset("llama-7b", num_layers=layers)
    return 2 * max(cfg.block_params(), cfg.embedding_params())


def measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process: wall time and its peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    script = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
              "rc = subprocess.run(sys.argv[1:]).returncode; "
              "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
              "'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    res = subprocess.run([sys.executable, "-c", script, *cmd], env=env, capture_output=True, text=True)
    line = res.stdout.strip().splitlines()[-1]
    info = json.loads(line)
    if info["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return {"wall_s": round(info["wall_s"], 2), "peak_rss_gib": round(info["peak_rss_kib"] * 1024 / GIB, 3)}


def bench(layers: int, scratch: Path) -> dict:
    hf, native, back = scratch / f"hf{layers}", scratch / f"native{layers}", scratch / f"back{layers}"
    t0 = time.perf_counter()
    total = write_random_hf(hf, layers)
    gen_s = time.perf_counter() - t0
    convert = [sys.executable, "-m", "checkpoints_tools.convert"]
    a = measured(convert + ["hf-to-native", str(hf), str(native), "--tp", "2", "--pp", "2", "--no-progress",
                            "--verify", "no"])
    shutil.rmtree(hf)
    b = measured(convert + ["native-to-hf", str(native), str(back), "--dtype", "bf16", "--no-progress",
                            "--verify", "no"])
    shutil.rmtree(native)
    shutil.rmtree(back)
    largest = largest_layer_bytes(layers)
    target = (3 * largest + 2 * GIB) / GIB
    out = {"layers": layers, "weights_gb": round(total / 1e9, 2), "largest_layer_gib": round(largest / GIB, 3),
           "target_peak_rss_gib": round(target, 3), "generate_s": round(gen_s, 1)}
    for name, r in (("hf_to_native_tp2pp2", a), ("native_to_hf", b)):
        out[name] = {**r, "gb_per_s": round(total / 1e9 / r["wall_s"], 3),
                     "within_target": r["peak_rss_gib"] <= target}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--scratch", default=None, help="scratch directory (default: a new one under /tmp)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert_memory.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="convert-bench-", dir="/tmp"))
    results = []
    try:
        for n in (int(x) for x in args.layers.split(",")):
            r = bench(n, scratch)
            r["load_avg"] = [round(x, 1) for x in os.getloadavg()]  # the machine is shared: read speeds with it
            print(json.dumps(r), flush=True)
            results.append(r)
            machine = {"cpus": os.cpu_count(),
                       "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}
            Path(args.out).write_text(json.dumps({"benchmark": "mllama-convert memory/speed, LLaMA-7B shape, bf16",
                                                  "machine": machine, "results": results}, indent=2) + "\n")
            print(f"wrote {args.out}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
