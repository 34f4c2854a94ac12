"""End to end: `mllama-train configs/sft-tiny-cpu.yaml` (the shipped SFT quickstart, raw JSONL in,
tokenizer and SFT data built on first use) teaches the tiny model to answer the embedded
instruction set; greedy decoding of the saved checkpoint answers training prompts word for word;
`mllama-convert native-to-hf` exports it with the chat template in tokenizer_config.json, and
`transformers`' own apply_chat_template + generate answer the same way."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200


def _greedy_answers(rank, world, checkpoint, tokenizer, prompts):
    from megatron.core import parallel_state

    from megatron_llama.config import ParallelConfig, preset
    from megatron_llama.data.chat_template import LLAMA2
    from megatron_llama.data.tokenizer import Tokenizer
    from megatron_llama.model import LlamaModel
    parallel_state.initialize_model_parallel(1, 1)
    model = LlamaModel(preset("tiny"), ParallelConfig())
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["module"], strict=False)
    model.eval()
    tok = Tokenizer.load(tokenizer)
    answers = []
    for prompt in prompts:
        ids, out = LLAMA2.encode_prompt([{"role": "user", "content": prompt}], tok), []
        with torch.no_grad():
            for _ in range(24):
                nxt = int(model(torch.tensor([ids + out]))[-1, 0].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        answers.append(tok.decode(out).strip())
    return answers


@pytest.mark.slow
@pytest.mark.distributed
def test_quickstart_model_learns_to_answer(tmp_path, dist_pool):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "launch.train", "configs/sft-tiny-cpu.yaml", f"train.steps={STEPS}",
           f"data.cache_dir={tmp_path / 'data'}", f"train.save_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "loss on answer tokens only" in p.stdout and "one epoch =" in p.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"\nSFT quickstart: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {STEPS} steps")
    assert summary["first_loss"] > 5.5 and summary["final_loss"] < 0.5
    records = [json.loads(x) for x in (ROOT / "data" / "instructions.jsonl").read_text().splitlines()]
    probes = [r for r in records if "prompt" in r and "has" not in r["prompt"]][:12]  # facts and copying
    checkpoint = Path(summary["checkpoint"]) / "mp_rank_00_model_states.pt"
    tokenizer = next((tmp_path / "data").glob("tokenizer-sft-*.model"))
    answers = dist_pool(1).run(_greedy_answers, str(checkpoint), str(tokenizer), [r["prompt"] for r in probes])[0]
    right = [a == r["response"] for a, r in zip(answers, probes)]
    for r, a in zip(probes, answers):
        print(f"  {r['prompt']!r} -> {a!r}")
    from megatron_llama.data.instructions_gen import PROBE
    assert answers[[r["prompt"] for r in probes].index(PROBE["prompt"])] == PROBE["response"]
    # measured: 9 of 12 at 200 steps (facts all right; copying a random phrase comes later)
    assert sum(right) >= 2 / 3 * len(probes), list(zip([r["prompt"] for r in probes], answers))

    # out to Hugging Face: the exported tokenizer carries the chat template
    hf_dir = tmp_path / "hf"
    p = subprocess.run([sys.executable, "-m", "checkpoints_tools.convert", "native-to-hf", summary["checkpoint"],
                        str(hf_dir), "--dtype", "fp32", "--no-progress", "--verify", "no"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    from transformers import AutoTokenizer, LlamaForCausalLM
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert "[INST]" in json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    hf_answers = []
    for r in probes:
        ids = hf_tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                             pad_token_id=hf_tok.eos_token_id)
        hf_answers.append(hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    print("  transformers generate:", hf_answers)
    assert hf_answers[[r["prompt"] for r in probes].index(PROBE["prompt"])] == PROBE["response"]
    assert hf_answers == answers  # the exported model and tokenizer behave as the trained one

    # and back in: a new SFT run at TP2 starts from the exported weights (train.init_from=hf:DIR)
    overrides = ["model.preset=tiny", "data.sft=true", "data.seq_len=128", f"data.corpus={ROOT / 'data' / 'instructions.jsonl'}",
                 f"data.tokenizer={hf_dir / 'tokenizer.model'}", f"data.cache_dir={tmp_path / 'data'}",
                 "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.steps=2", "train.lr=1e-5",
                 "train.precision=fp32", "parallel.tp=2", f"train.init_from=hf:{hf_dir}"]
    first = dist_pool(2).run(_first_losses, overrides)[0]
    print(f"  TP2 run initialised from the export: losses {first} (from scratch: {summary['first_loss']:.3f})")
    assert max(first) < 0.5


def _first_losses(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    return train(load_config(None, overrides), log=False, save=False).losses
