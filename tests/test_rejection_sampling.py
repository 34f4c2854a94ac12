"""``mllama-rs``: K samples per prompt from a policy (an exported HF causal LM, via
transformers.generate), scored by our native reward model, the best kept as an SFT record the
SFT path reads; deterministic under a seed, and a run interrupted mid-way resumes by prompt index
to the same bytes as an uninterrupted one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _train_reward(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    return train(load_config(None, overrides), log=False).checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory, dist_pool):
    import transformers

    from megatron_llama.data.chat_template import LLAMA2
    from megatron_llama.data.sft_build import _train_chat_tokenizer
    from megatron_llama.data.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("rs")
    tok = Tokenizer.load(_train_chat_tokenizer(str(ROOT / "data" / "instructions.jsonl"), d / "tok", 512, LLAMA2))
    policy = d / "policy"
    conf = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(policy)
    shutil.copyfile(tok.path, policy / "tokenizer.model")
    pairs = d / "pairs.jsonl"
    pairs.write_text("\n".join((ROOT / "data" / "preferences.jsonl").read_text().splitlines()[:64]) + "\n")
    reward = dist_pool(1).run(_train_reward, [
        "model.preset=tiny", "train.objective=reward", "data.seq_len=64", f"data.corpus={pairs}",
        f"data.tokenizer={tok.path}", f"data.cache_dir={d / 'cache'}", "train.steps=2", "train.warmup_steps=1",
        "train.micro_batch_size=4", "train.precision=fp32", f"train.save_dir={d / 'reward'}"])[0]
    prompts = d / "prompts.jsonl"
    prompts.write_text("\n".join((ROOT / "data" / "instructions.jsonl").read_text().splitlines()[:5])
                       + "\n\n{\"neither\": 1}\n")
    return policy, reward, prompts, tok


def _rs(models, out: Path, *extra: str) -> int:
    from launch.rejection_sampling import main
    policy, reward, prompts, _ = models
    return main(["--prompts", str(prompts), "--policy", str(policy), "--reward", str(reward), "--k", "3",
                 "--max-new-tokens", "8", "--seed", "7", "--output", str(out), "--quiet", *extra])


@pytest.mark.distributed
def test_best_of_k_is_written_as_sft_data_and_resumes_to_the_same_bytes(models, tmp_path, capsys):
    from megatron_llama.data.chat_template import LLAMA2
    from megatron_llama.data.sft_preprocess import preprocess_sft
    from megatron_llama.data.sft_records import parse_record
    whole = tmp_path / "whole.jsonl"
    assert _rs(models, whole) == 0
    assert "5 SFT records (best of 3 per prompt) for 6 prompts, 1 skipped" in capsys.readouterr().out
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [r["prompt_index"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        assert len(r["rewards"]) == 3 and r["reward"] == max(r["rewards"])
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
        messages, reason = parse_record(json.dumps(r).encode())  # the SFT path reads it as it is
        assert reason is None and messages == r["messages"]
    summary = preprocess_sft([str(whole)], str(tmp_path / "sft"), models[3].path, progress=False)
    assert summary.samples == 5

    again = tmp_path / "again.jsonl"
    assert _rs(models, again, "--stop-after", "2") == 0  # interrupted after 2 prompts
    assert not again.exists() and len((tmp_path / "again.jsonl.partial").read_text().splitlines()) == 2
    with open(tmp_path / "again.jsonl.partial", "ab") as f:
        f.write(b'{"prompt_index": 2, "mess')  # torn by the kill
    assert _rs(models, again) == 0
    assert "resumed at prompt 2" in capsys.readouterr().out
    assert again.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "again.jsonl.partial").exists()
    # the same policy as a native checkpoint (mapped to transformers in memory): the same samples
    from checkpoints_tools.convert import main as convert
    policy, reward, prompts, tok = models
    native = tmp_path / "native-policy"
    assert convert(["hf-to-native", str(policy), str(native), "--no-progress", "--verify", "no"]) == 0
    from launch.rejection_sampling import main
    via_native = tmp_path / "via-native.jsonl"
    assert main(["--prompts", str(prompts), "--policy", str(native), "--reward", str(reward), "--k", "3",
                 "--max-new-tokens", "8", "--seed", "7", "--output", str(via_native), "--quiet"]) == 0
    assert via_native.read_bytes() == whole.read_bytes()
    # other settings on top of an interrupted run: refused in one line
    assert _rs(models, tmp_path / "x.jsonl", "--stop-after", "1") == 0
    capsys.readouterr()
    assert _rs(models, tmp_path / "x.jsonl", "--k", "2") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other settings" in err[0]


@pytest.mark.distributed
def test_bad_inputs_are_one_line(models, tmp_path, capsys):
    from launch.rejection_sampling import main
    policy, reward, prompts, _ = models
    # the reward model given as the policy (and the reverse)
    assert main(["--prompts", str(prompts), "--policy", str(reward), "--reward", str(reward),
                 "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    assert main(["--prompts", str(prompts), "--policy", str(policy), "--reward", str(policy),
                 "--output", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error: ")]
    assert len(err) == 2 and all("is a" in e for e in err)
