"""The tiny DPO recipe's held-out rate of preferring the chosen answer, from an SFT start below 90 %.

The chain of tests/test_preference_journey.py with the real CLI (one CPU process each, fp32):
``configs/sft-tiny-cpu.yaml`` cut to ``--sft-steps`` (140: not yet perfect; the full quickstart
model already prefers the chosen side of ~99 % of the pairs, leaving DPO nothing to raise), then
``configs/dpo-tiny-cpu.yaml`` from it, validated every ``--eval-interval`` steps on the held-out 5 %
of the pairs. Recorded: the SFT model's rate (``valid_reference_prefers_chosen``, the reference
pass), DPO's rate per validation, its reward accuracy and margin, ``log p(chosen)`` and the NLL
per chosen token (how far the policy drifted from the SFT model) and the wall times. Both models
are then exported (``mllama-convert native-to-hf``) and ``transformers`` greedy ``generate`` is
asked for the chosen answer of the journey test's probes: the first ``--probes`` single-turn
pairs of DPO's held-out split (prompts the SFT model trained on, as every preference prompt is one
of the instruction set's; DPO never saw them).

    python bench/dpo_tiny_rate.py --out bench/results/dpo_tiny_rate.json
    python bench/dpo_tiny_rate.py --out bench/results/dpo_tiny_rate_no_rpo.json \
        dpo.rpo_alpha=0 train.lr=1e-3                                          # plain DPO
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "launch.train", *args, "train.max_restarts=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: training failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def probe_pairs(count: int) -> list[dict]:
    """The first ``count`` single-turn pairs (string prompt and chosen) of the held-out 5 % of
    data/preferences.jsonl: pair i is line i (no record is skipped), held out by data/heldout.py."""
    from megatron_llama.data.heldout import heldout_mask
    records = [json.loads(x) for x in (ROOT / "data" / "preferences.jsonl").read_text().splitlines()]
    held = heldout_mask(len(records), 0.05)
    return [r for i, r in enumerate(records)
            if held[i] and isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str)][:count]


def generates_chosen(checkpoint: str, hf_dir: Path, probes: list[dict], env: dict) -> list[bool]:
    """Export ``checkpoint`` to ``hf_dir``; for each probe, whether greedy ``generate`` (24 new
    tokens) gives exactly its chosen answer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    p = subprocess.run([sys.executable, "-m", "checkpoints_tools.convert", "native-to-hf", checkpoint, str(hf_dir),
                        "--dtype", "fp32", "--no-progress", "--verify", "no"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: export failed:\n{p.stderr[-2000:]}")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    seqs = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for r in probes]
    width, pad = max(map(len, seqs)), tok.eos_token_id  # one left-padded batch: greedy, as one at a time
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in seqs])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=pad)
    right = [tok.decode(o[width:], skip_special_tokens=True).strip() == r["chosen"] for o, r in zip(out, probes)]
    return right


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=140)
    ap.add_argument("--eval-interval", type=int, default=50)
    ap.add_argument("--probes", type=int, default=48, help="held-out prompts asked for their chosen answer")
    ap.add_argument("--out", default="bench/results/dpo_tiny_rate.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of configs/dpo-tiny-cpu.yaml")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    with tempfile.TemporaryDirectory(prefix="dpo-rate-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        sft_s = _train(["configs/sft-tiny-cpu.yaml", f"train.steps={a.sft_steps}", f"data.cache_dir={data}",
                        f"train.save_dir={tmp / 'sft'}"], env)
        tokenizer = next(data.glob("tokenizer-sft-*.model"))
        dpo_s = _train(["configs/dpo-tiny-cpu.yaml", f"train.init_from={tmp / 'sft'}", f"data.cache_dir={data}",
                        f"data.tokenizer={tokenizer}", f"train.save_dir={tmp / 'dpo'}",
                        f"train.eval_interval={a.eval_interval}", *a.overrides], env)
        summary = json.loads((tmp / "dpo" / "summary.json").read_text())
        probes = probe_pairs(a.probes)
        sft_ckpt = json.loads((tmp / "sft" / "summary.json").read_text())["checkpoint"]
        sft_right = generates_chosen(sft_ckpt, tmp / "hf-sft", probes, env)
        dpo_right = generates_chosen(summary["checkpoint"], tmp / "hf-dpo", probes, env)
    curve = [{"step": step, "prefers_chosen": m["valid_prefers_chosen"],
              "rewards/accuracies": m["valid_rewards/accuracies"], "rewards/margins": m["valid_rewards/margins"],
              "logps/chosen": m["valid_logps/chosen"], "logps/rejected": m["valid_logps/rejected"],
              "nll": m["valid_nll"], "loss": m["valid_loss"]} for step, m in summary["valid_metrics"]]
    sft_rate = summary["valid_metrics"][-1][1]["valid_reference_prefers_chosen"]
    cfg = {line.split(":")[0].strip(): line.split(":")[1].split("#")[0].strip()
           for line in (ROOT / "configs" / "dpo-tiny-cpu.yaml").read_text().splitlines()
           if line.strip().split(":")[0] in ("steps", "lr", "warmup_steps", "beta", "loss", "rpo_alpha")}
    result = {"what": ("held-out rate of log p(chosen) > log p(rejected), SFT start vs DPO: the 186 held-out pairs (5 %) "
                      "read as 12 global batches of 16 = 192, 6 of them twice (launch/validation.py)"),
              "generation": (f"transformers greedy generate (24 new tokens) == the chosen answer, for the first "
                             f"{len(probes)} single-turn held-out pairs' prompts"),
              "probes": [r["prompt"] for r in probes],
              "sft": {"config": "configs/sft-tiny-cpu.yaml", "steps": a.sft_steps, "held_out_prefers_chosen": sft_rate,
                      "generates_chosen": sum(sft_right), "wall_s": round(sft_s, 1)},
              "dpo": {"config": "configs/dpo-tiny-cpu.yaml", **cfg, "overrides": a.overrides,
                      "held_out_prefers_chosen": curve[-1]["prefers_chosen"], "generates_chosen": sum(dpo_right),
                      "curve": curve, "wall_s": round(dpo_s, 1)},
              "meets_issue_90pct": curve[-1]["prefers_chosen"] >= 0.9 > sft_rate,
              "machine": "CPU, 1 process, fp32 (shared 2-core host)"}
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"SFT {a.sft_steps} steps: {sft_rate:.1%}, generates {sum(sft_right)}/{len(probes)} -> "
          f"DPO {curve[-1]['step']} steps: {curve[-1]['prefers_chosen']:.1%}, generates {sum(dpo_right)}/{len(probes)} "
          f"(SFT {sft_s:.0f} s, DPO {dpo_s:.0f} s) -> {out}")


if __name__ == "__main__":
    main()
