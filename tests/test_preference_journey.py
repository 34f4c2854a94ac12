"""The preference journey on the shipped tiny CPU configs, end to end (subprocesses of the real CLIs):

SFT (configs/sft-tiny-cpu.yaml, cut to 140 steps so the SFT model is not yet perfect) -> a reward
model from it (configs/reward-tiny-cpu.yaml, 250 steps at lr 3e-3), refused as a DPO policy in one
line -> DPO (configs/dpo-tiny-cpu.yaml from the SFT checkpoint, with the RPO term ``dpo.rpo_alpha``;
the reference pass runs before step 0 and is stored beside the pairs) -> a second DPO start reads
the stored pass back -> the stored pass is refused in one line once the data it was computed for
change -> export with ``mllama-convert native-to-hf``, after which ``transformers`` greedy
``generate`` gives the chosen answer -> one ``mllama-rs`` round with the DPO policy and that reward
model.

What is asserted is what was measured (see the README, bench/dpo_tiny_rate.py; these CPU runs are
deterministic under their seeds): the reward model's held-out accuracy >= 90 % (92.2 %); the
held-out rate of preferring the chosen answer (log p(chosen) > log p(rejected)) reaches the issue's
90 % and is above the SFT model's (86.5 % -> 100 %; DPO 200 steps at lr 3e-3, beta 0.5, rpo_alpha 5);
the exported model generates the chosen answer for 37 of 48 probe prompts (the SFT start: 15; the
300-step SFT quickstart: 36). The probes are the first 48 single-turn pairs of DPO's held-out split:
prompts DPO never trained on, but training prompts of the SFT model (every preference prompt is one
of the instruction set's, and its chosen side is that record's answer). So this measures that the
policy learnt to produce the chosen answers, not generalisation to new prompts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RM_SHORT = ("train.steps=250", "train.lr=3e-3")  # configs/reward-tiny-cpu.yaml from the SFT model
BETA, PROBES = 0.5, 48  # configs/dpo-tiny-cpu.yaml's dpo.beta; prompts asked for their chosen answer


def held_out_probes(data: Path, count: int) -> list[dict]:
    """The first ``count`` single-turn pairs (string prompt and chosen answer) of DPO's held-out 5 %:
    prompts DPO never trained on, but the SFT model did (every preference prompt is one of the
    instruction set's, whose answer is the chosen side). Pair i is line i: nothing was skipped."""
    from megatron_llama.data.heldout import heldout_mask
    records = [json.loads(x) for x in (ROOT / "data" / "preferences.jsonl").read_text().splitlines()]
    manifest = json.loads(next(data.glob("pref-*.pref.json")).read_text())
    assert manifest["pairs"] == len(records) and manifest["skipped"] == 0
    held = heldout_mask(len(records), 0.05)  # configs/dpo-tiny-cpu.yaml's data.valid_fraction
    return [r for i, r in enumerate(records)
            if held[i] and isinstance(r.get("prompt"), str) and isinstance(r.get("chosen"), str)][:count]


def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """``transformers`` greedy ``generate`` for all prompts in one left-padded batch (the same answers
    as one prompt at a time: checked on the journey's model, 48 of 48)."""
    seqs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for p in prompts]
    width, pad = max(map(len, seqs)), tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in seqs])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=pad)
    return [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def _cli(args, env, timeout=600):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.perf_counter() - t0:5.1f} s] {' '.join(a for a in args[:3])}")
    return p


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_then_dpo_then_export(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    data = tmp_path / "data"
    p = _cli(["-m", "launch.train", "configs/sft-tiny-cpu.yaml", "train.steps=140", f"data.cache_dir={data}",
              f"train.save_dir={tmp_path / 'sft'}", "train.max_restarts=0"], env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    shipped = [line for line in (ROOT / "configs" / "dpo-tiny-cpu.yaml").read_text().splitlines()
               if line.strip().startswith("tokenizer:")][0].split()[1]
    tokenizer = data / Path(shipped).name
    assert tokenizer.is_file(), "configs/dpo-tiny-cpu.yaml names the tokenizer the SFT quickstart trains"

    # the reward model from the same SFT model (configs/reward-tiny-cpu.yaml, shortened: from an SFT start
    # it needs 250 steps at lr 3e-3, not the 1000 from scratch); then given as a DPO policy: refused
    p = _cli(["-m", "launch.train", "configs/reward-tiny-cpu.yaml", f"train.init_from={tmp_path / 'sft'}",
              f"data.cache_dir={data}", f"data.tokenizer={tokenizer}", *RM_SHORT, "train.eval_interval=0",
              f"train.save_dir={tmp_path / 'rm'}", "train.max_restarts=0"], env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rm_accuracy = json.loads((tmp_path / "rm" / "summary.json").read_text())["valid_metrics"][-1][1]["valid_accuracy"]
    print(f"\nreward model ({' '.join(RM_SHORT)}): held-out accuracy {rm_accuracy:.1%}")
    assert rm_accuracy >= 0.9  # measured 92.2 % (twice)

    dpo = ["-m", "launch.train", "configs/dpo-tiny-cpu.yaml", f"train.init_from={tmp_path / 'sft'}",
           f"data.cache_dir={data}", f"data.tokenizer={tokenizer}", "train.max_restarts=0"]
    p = _cli(dpo + [f"train.init_from={tmp_path / 'rm'}", f"train.save_dir={tmp_path / 'dpo-rm'}"], env)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "is a reward model" in errors[0], p.stderr[-2000:]
    p = _cli(dpo + [f"train.save_dir={tmp_path / 'dpo'}", "train.eval_interval=0"], env)  # held-out at the end
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "DPO reference (train): computed" in p.stdout and "DPO reference (valid): computed" in p.stdout
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    step, final = summary["valid_metrics"][-1]
    sft_rate, dpo_rate = final["valid_reference_prefers_chosen"], final["valid_prefers_chosen"]
    print(f"\nheld-out pairs preferring the chosen answer: SFT {sft_rate:.1%} -> DPO {dpo_rate:.1%} at step {step}; "
          f"reward accuracy {final['valid_rewards/accuracies']:.1%}, margin {final['valid_rewards/margins']:.3f}, "
          f"log p(chosen) {final['valid_rewards/chosen'] / BETA:+.2f} from the SFT model's, "
          f"NLL {final['valid_nll']:.3f}")
    assert step == 200 and sft_rate < 0.9 <= dpo_rate and dpo_rate > sft_rate  # measured 86.5 % -> 100 %
    assert final["valid_rewards/accuracies"] > 0.95 and final["valid_rewards/margins"] > 4  # measured 99.5 %, 5.86
    # the NLL term lifts log p(chosen) above the SFT model's (plain DPO pushed it down, from -4.8 to -11.0)
    assert final["valid_rewards/chosen"] > 0 and final["valid_nll"] < 0.2  # measured +1.74 (beta 0.5), 0.130
    assert summary["final_loss"] < 1.0 < summary["first_loss"]  # first: log 2 + 5 x NLL 0.43; measured 2.86 -> 0.64

    # a second run from the same SFT model reads the stored pass instead of computing it
    p = _cli(dpo + [f"train.save_dir={tmp_path / 'dpo2'}", "train.steps=1", "train.eval_interval=0"], env)
    assert p.returncode == 0 and "DPO reference (train): " + str(data) in p.stdout, p.stdout[-2000:]
    # ... and refuses it in one line once the data it was computed for have changed in place
    pairs = next(data.glob("pref-*.lossmask.bin"))
    raw = bytearray(pairs.read_bytes())
    raw[-1] ^= 1
    pairs.write_bytes(bytes(raw))
    p = _cli(dpo + [f"train.save_dir={tmp_path / 'dpo3'}", "train.steps=1"], env)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "another preference data" in errors[0], p.stderr[-2000:]

    hf_dir = tmp_path / "hf"
    p = _cli(["-m", "checkpoints_tools.convert", "native-to-hf", summary["checkpoint"], str(hf_dir), "--dtype", "fp32",
              "--no-progress", "--verify", "no"], env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    from transformers import AutoTokenizer, LlamaForCausalLM
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    probes = held_out_probes(data, PROBES)
    t0 = time.perf_counter()
    answers = greedy_answers(model, hf_tok, [r["prompt"] for r in probes])
    right = 0
    for i, (r, answer) in enumerate(zip(probes, answers)):
        right += answer == r["chosen"]
        if i < 12:
            print(f"  {r['prompt']!r} -> {answer!r}" + ("" if answer == r["chosen"] else f" (chosen {r['chosen']!r})"))
    print(f"  transformers generates the chosen answer for {right} of {len(probes)} held-out prompts "
          f"[{time.perf_counter() - t0:.1f} s]")
    # measured 37 of 48 (8 of the first 12); the SFT start: 15 (2 of 12); the 300-step SFT quickstart: 36 (9 of
    # 12). What it misses is mostly copying a number from the prompt ("Dan has 8 cows." -> "Dan has 2 cows.")
    assert right >= 35

    # one rejection-sampling round: the DPO policy samples, the reward model keeps the best answer
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in probes[:4]))
    p = _cli(["-m", "launch.rejection_sampling", "--prompts", str(prompts), "--policy", summary["checkpoint"],
              "--reward", str(tmp_path / "rm"), "--k", "2", "--max-new-tokens", "16", "--tokenizer", str(tokenizer),
              "--output", str(tmp_path / "rs.jsonl"), "--quiet"], env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    kept = [json.loads(x) for x in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert len(kept) == 4 and all(r["messages"][-1]["role"] == "assistant" for r in kept)
    assert all(r["reward"] == max(r["rewards"]) for r in kept)
