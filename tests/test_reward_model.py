"""Reward models (train.objective=reward): the ranking loss against a hand computation, the same
losses, metrics and trained weights under TP2·PP2·DP2 as at TP1, ``native-to-hf`` writing a
``LlamaForSequenceClassification`` whose ``transformers`` scores (padded batches, either side)
equal ours, and starting from ``hf:DIR`` (a causal LM: trunk loaded, score head seeded; a
sequence classifier: all of it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RTOL = 2e-5  # fp32 summation order only (TP splits matmuls, DP/gas split the batch)


def test_ranking_loss_and_last_token_rewards():
    from megatron_llama.model.score_head import last_token_positions, ranking_loss, sequence_rewards
    mask = torch.zeros(4, 6)
    mask[0, 2:4] = 1   # labels 2..3 are answer tokens -> last answer token at position 4
    mask[1, 1:5] = 1   # -> 5
    mask[2, 0:1] = 1   # -> 1
    mask[3, 2:3] = 1   # -> 3
    assert last_token_positions(mask).tolist() == [4, 5, 1, 3]
    scores = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 10  # [s, rows]
    r = sequence_rewards(scores, mask)
    assert r.tolist() == pytest.approx([float(scores[4, 0]), float(scores[5, 1]), float(scores[1, 2]), float(scores[3, 3])])
    margin = torch.tensor([0.5, 0.0])
    loss, stats = ranking_loss(r, margin)
    gap = r[:2] - r[2:]
    want = -F.logsigmoid(gap - margin).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats.tolist() == pytest.approx([2, float((gap > 0).sum()), float(gap.sum()),
                                            float(-F.logsigmoid(gap - margin).sum())])


def _pairs(tmp_path: Path, n: int = 400) -> Path:
    lines = (ROOT / "data" / "preferences.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _overrides(tmp_path: Path, tp: int, pp: int, dp: int) -> list[str]:
    mbs = 4 // dp  # global batch 8 pairs = mbs x gas 2 x dp
    return ["model.preset=tiny", "train.objective=reward", "data.seq_len=64", f"data.corpus={_pairs(tmp_path)}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.valid_fraction=0.1", "train.eval_iters=2",
            f"train.micro_batch_size={mbs}", "train.grad_accum_steps=2", "train.steps=6", "train.warmup_steps=1",
            # eps = 1: Adam's update lr * m / (sqrt(v) + eps) is ~ lr * gradient (|g| << 1), so the
            # trained weights compare the gradients linearly (eps 1e-8 would blow up the ulp-level
            # differences of near-zero gradients into +-lr steps)
            "train.lr=0.5", "train.eps=1.0", "train.grad_clip=0", "train.precision=fp32", "train.seed=5", "train.keep_last=1",
            f"train.save_dir={tmp_path / f'tp{tp}pp{pp}dp{dp}'}",
            f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}"]


def _train(rank, world, overrides):
    from launch.train import train
    from megatron_llama.config import load_config
    s = train(load_config(None, overrides), log=False)
    return s.losses, s.grad_norms, s.metrics, s.valid_metrics, s.checkpoint


def _full_weights(checkpoint: str) -> dict:
    from megatron_llama.checkpoint.native_weights import open_native
    return {k: t.float() for _, layer in open_native(checkpoint).layers(pad_for_tp=1) for k, t in layer.items()}


def _initial_weights(checkpoint: str) -> dict:
    from checkpoints_tools.verify import single_process_tp1
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.config import ParallelConfig
    from megatron_llama.model import LlamaModel
    ck = open_native(checkpoint)
    with single_process_tp1():
        model = LlamaModel(ck.model, ParallelConfig(), seed=ck.config.train.seed)
    names = {name for _, layer in ck.layers(pad_for_tp=1) for name in layer}
    return {k: v.detach() for k, v in model.named_parameters() if k in names}


@pytest.mark.distributed
def test_reward_layouts_agree_and_export_scores_match_transformers(dist_pool, tmp_path):
    ref = dist_pool(1).run(_train, _overrides(tmp_path, 1, 1, 1))[0]
    res = dist_pool(8).run(_train, _overrides(tmp_path, 2, 2, 2))
    losses, norms, metrics, valid, ck = res[0]
    ref_losses, ref_norms, ref_metrics, ref_valid, ref_ck = ref
    for other in res[1:]:  # every rank reports the same numbers
        assert other[0] == pytest.approx(losses, rel=1e-6) and other[2] == metrics
    print(f"\nreward TP2·PP2·DP2 vs TP1: losses {losses} vs {ref_losses}")
    assert max(ref_losses) - min(ref_losses) > 1e-3
    assert losses == pytest.approx(ref_losses, rel=RTOL, abs=0)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    for m, r in zip(metrics, ref_metrics):
        assert m["accuracy"] == r["accuracy"] and m["reward_gap"] == pytest.approx(r["reward_gap"], rel=1e-4, abs=1e-6)
    assert valid[-1][1]["valid_loss"] == pytest.approx(ref_valid[-1][1]["valid_loss"], rel=RTOL)
    assert valid[-1][1]["valid_accuracy"] == ref_valid[-1][1]["valid_accuracy"]
    # the weight updates (~ lr * the sum of the gradients, see train.eps) agree tensor by tensor
    a, b, init = _full_weights(ck), _full_weights(ref_ck), _initial_weights(ref_ck)
    assert a.keys() == b.keys() == init.keys() and "head.score.weight" in a and not any("output" in k for k in a)
    ulp = torch.finfo(torch.float32).eps
    for k in a:  # 1e-4 of the update, above the fp32 rounding of the weights themselves (norms sit at ~1)
        diff, update = (a[k] - b[k]).norm().item(), (b[k] - init[k]).norm().item()
        assert diff <= 1e-4 * update + 2 * ulp * b[k].abs().max().item() * b[k].numel() ** 0.5, (k, diff, update)
    worst = max(((a[k] - b[k]).norm() / (b[k] - init[k]).norm()).item() for k in a)
    print(f"weight updates TP2·PP2·DP2 vs TP1: worst relative difference {worst:.2e}")

    _export_and_compare(ref_ck, tmp_path / "hf")


def _export_and_compare(checkpoint: str, out: Path) -> None:
    import transformers

    from checkpoints_tools.convert import main
    from checkpoints_tools.verify import compare, single_process_tp1
    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.checkpoint.native_weights import open_native
    from megatron_llama.config import ParallelConfig
    from megatron_llama.data.chat_template import LLAMA2
    from megatron_llama.data.tokenizer import Tokenizer
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.layout import load_full_state
    from megatron_llama.model.score_head import sequence_rewards

    assert main(["native-to-hf", checkpoint, str(out), "--dtype", "fp32", "--no-progress"]) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForSequenceClassification"] and conf["num_labels"] == 1
    assert compare(checkpoint, str(out)).max_rel < 1e-5  # every position's score
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert tuple(hf.score.weight.shape) == (1, 64) and hf.score.bias is None
    tok = Tokenizer.load(str(out / "tokenizer.model"))
    assert conf["pad_token_id"] == tok.unk_id != tok.eos_id

    # conversations of different lengths, each ending with its answer's EOS, as training renders them
    pairs = [json.loads(line) for line in (ROOT / "data" / "preferences.jsonl").read_text().splitlines()[:6]]
    seqs = []
    for p in pairs:
        context = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
        answer = p["chosen"] if isinstance(p["chosen"], str) else p["chosen"]["content"]
        seqs.append(LLAMA2.encode(context + [{"role": "assistant", "content": answer}], tok)[0])
    s = max(map(len, seqs))
    ck = open_native(checkpoint)
    full = {k: t.float() for _, layer in ck.layers(pad_for_tp=1) for k, t in layer.items()}
    with single_process_tp1():
        ours_model = LlamaModel(ck.model, ParallelConfig(), dtype=torch.float32)
        load_full_state(ours_model, full, 0, 1)
        tokens = torch.full((len(seqs), s), tok.eos_id, dtype=torch.long)  # our padding (EOS)
        mask = torch.zeros(len(seqs), s)
        for i, ids in enumerate(seqs):
            tokens[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids) - 1] = 1  # enough for the position: the last label is the EOS
        with torch.no_grad():
            ours = sequence_rewards(ours_model(tokens), mask)
        # hf:DIR of the exported reward model: loads everything, scores the same
        again = LlamaModel(ck.model, ParallelConfig(), dtype=torch.float32, seed=99)
        load_initial_weights(again, ck.model, f"hf:{out}", 0, 1, pipelined=False)
        with torch.no_grad():
            assert torch.allclose(sequence_rewards(again(tokens), mask), ours, rtol=1e-5, atol=1e-6)

    pad = conf["pad_token_id"]
    for side in ("right", "left"):  # HF picks the last non-pad token either way
        batch = torch.full((len(seqs), s), pad, dtype=torch.long)
        attn = torch.zeros_like(batch)
        for i, ids in enumerate(seqs):
            sl = slice(0, len(ids)) if side == "right" else slice(s - len(ids), s)
            batch[i, sl], attn[i, sl] = torch.tensor(ids), 1
        with torch.no_grad():
            theirs = hf(input_ids=batch, attention_mask=attn).logits.squeeze(-1)
        rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
        print(f"HF {side}-padded scores vs ours: max rel {rel:.2e}")
        assert rel < 1e-5
    # and the tokenizer files pad with the same token
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.pad_token_id == pad
    # back to native (a reward-model checkpoint at TP2), verified against the HF directory
    assert main(["hf-to-native", str(out), str(out.parent / "back"), "--tp", "2", "--no-progress"]) == 0
    back = open_native(str(out.parent / "back"))
    assert back.model.head == "score" and back.config.train.objective == "reward"


def test_reward_run_from_a_causal_lm_keeps_the_trunk_and_seeds_the_head(tmp_path, single_process_model_parallel):
    import transformers

    from megatron_llama.checkpoint.hf_source import hf_model_config
    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.config import ConfigError, ParallelConfig
    from megatron_llama.model import LlamaModel
    from megatron_llama.model.hf_mapping import native_to_hf

    conf = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(tmp_path / "lm")
    lm = hf_model_config(tmp_path / "lm")
    from dataclasses import replace
    cfg = replace(lm, head="score")
    model = LlamaModel(cfg, ParallelConfig(), seed=3)
    seeded = model.head.score.weight.detach().clone()
    load_initial_weights(model, cfg, f"hf:{tmp_path / 'lm'}", 0, 1, pipelined=False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "lm").state_dict()
    ours = native_to_hf({k: v.detach() for k, v in model.named_parameters()}, cfg)
    for k, v in ours.items():
        if k != "score.weight":
            assert torch.equal(v, hf[k]), k
    assert torch.equal(model.head.score.weight, seeded)  # not taken from the LM head
    # the same from a native LM checkpoint (an SFT / pretraining run's format), saved at TP2
    from checkpoints_tools.convert import main
    assert main(["hf-to-native", str(tmp_path / "lm"), str(tmp_path / "native"), "--tp", "2", "--no-progress",
                 "--verify", "no"]) == 0
    native = LlamaModel(cfg, ParallelConfig(), seed=3)
    load_initial_weights(native, cfg, str(tmp_path / "native"), 0, 1, pipelined=False)
    for (k, a), (_, b) in zip(native.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), k
    # the other way round is refused: a reward model cannot start an LM run
    transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**{**conf.to_dict(), "num_labels": 1})
                                                ).save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match="is a reward model"):
        load_initial_weights(LlamaModel(lm, ParallelConfig()), lm, f"hf:{tmp_path / 'rm'}", 0, 1, pipelined=False)
