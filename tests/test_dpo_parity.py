"""DPO against TRL's ``DPOTrainer`` as the reference, on real gloo TP groups (fp32, CPU).

TRL 1.16 is driven for real, offline: a character-level tokenizer built in memory with
``tokenizers``, a tiny in-memory ``datasets.Dataset`` of (prompt, chosen, rejected), a tiny random
``LlamaForCausalLM`` policy and a second one as ``ref_model``. TRL tokenizes, appends EOS, pads
and concatenates chosen and rejected rows with its own collator, and its ``compute_loss`` runs its
concatenated forward on both models. We take that very batch (``input_ids``, ``completion_mask``),
map the policy's weights into our TP-sliced model (``hf_to_native``), compute the reference's
log-probs with our model built from ``ref_model``'s weights (the stored reference pass computes
them the same way), and compare: loss, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` and every parameter's gradient, rel err <= 1e-5.

Losses: ``sigmoid`` (DPO), ``ipo``, cDPO (sigmoid with label smoothing 0.2) and RPO (sigmoid + 0.5 NLL). TRL 1.16 has no
cDPO loss type of its own (its ``label_smoothing`` feeds ``robust`` and ``exo_pair``); with
A = -log sigma(beta d), B = -log sigma(-beta d) its ``robust`` loss is
((1 - e) A - e B) / (1 - 2e), so cDPO = (1 - e) A + e B = 2(1 - e) * sigmoid - (1 - 2e) * robust,
which TRL computes as ``loss_type=[sigmoid, robust]`` with those ``loss_weights``. RPO
(``dpo.rpo_alpha``): TRL 1.16's ``loss_type=[sigmoid, sft]``, ``loss_weights=[1, alpha]``, whose
``sft`` term is the mean of ``-log p`` over the batch's chosen completion tokens.

The vocabulary (31 tokens) is padded to 32 at TP 2, so the padded logits are in play too.
"""
from __future__ import annotations

import pytest
import torch

from test_model_parity import full_grads, hf_reference, rel_err

TOL = 1e-5
ROWS = [  # prompts and answers of different lengths, so padding and per-row masks matter
    {"prompt": "<s>add one to two", "chosen": " three", "rejected": " four"},
    {"prompt": "<s>name a colour", "chosen": " red", "rejected": " a cat"},
    {"prompt": "<s>say hi", "chosen": " hello there", "rejected": " no"},
    {"prompt": "<s>spell dog", "chosen": " d o g", "rejected": " d o o g"},
]
CASES = {  # name: (DPOConfig kwargs, TRL DPOConfig kwargs)
    "sigmoid": (dict(beta=0.1, loss="sigmoid"), dict(beta=0.1, loss_type=["sigmoid"])),
    "ipo": (dict(beta=0.5, loss="ipo"), dict(beta=0.5, loss_type=["ipo"])),
    "cdpo": (dict(beta=0.1, loss="sigmoid", label_smoothing=0.2),
             dict(beta=0.1, loss_type=["sigmoid", "robust"], loss_weights=[2 * 0.8, -(1 - 2 * 0.2)],
                  label_smoothing=0.2)),
    # RPO: DPO + alpha * the mean NLL of the chosen answer tokens (TRL < 1.0: rpo_alpha)
    "rpo": (dict(beta=0.1, loss="sigmoid", rpo_alpha=0.5),
            dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])),
}


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def trl_reference(case: str, policy, ref_model, tmpdir: str):
    """TRL's batch, loss, metrics and the policy's gradients (left in ``policy``'s .grad)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()

    args = DPOConfig(output_dir=tmpdir, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     per_device_train_batch_size=len(ROWS), **CASES[case][1])
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                         processing_class=char_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    return batch, loss.detach(), metrics


def _parity_task(rank, world, tp, case, tmpdir):
    from megatron.core import parallel_state

    from megatron_llama.config import DPOConfig, ParallelConfig, preset
    from megatron_llama.model import LlamaModel, sequence_logps
    from megatron_llama.model.hf_mapping import hf_to_native, native_to_hf
    from megatron_llama.model.layout import load_full_state
    from pipelines.dpo_objective import dpo_step_loss, mean_stats

    parallel_state.initialize_model_parallel(tp, 1)
    cfg = preset("tiny", vocab_size=31)
    policy, ref_model = hf_reference(cfg, "llama", seed=11), hf_reference(cfg, "llama", seed=12)
    batch, trl_loss, trl_metrics = trl_reference(case, policy, ref_model, f"{tmpdir}/trl-{rank}")

    tokens = batch["input_ids"]
    labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)  # label t = token t+1
    mask = torch.cat([batch["completion_mask"][:, 1:], torch.zeros_like(tokens[:, :1])], dim=1).float()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    ref = LlamaModel(cfg, ParallelConfig(tp=tp))
    load_full_state(ref, hf_to_native(ref_model.state_dict(), cfg, tp), tp_rank, tp)
    with torch.no_grad():
        ref_logps = sequence_logps(ref(tokens), labels, mask).double()
    ours = LlamaModel(cfg, ParallelConfig(tp=tp))
    load_full_state(ours, hf_to_native(policy.state_dict(), cfg, tp), tp_rank, tp)
    pairs = len(ROWS)
    loss, stats = dpo_step_loss(ours(tokens), labels, mask, ref_logps, DPOConfig(**CASES[case][0]), 1.0 / pairs)
    loss.backward()
    metrics = mean_stats(stats)

    hf_params = dict(policy.named_parameters())
    assert set(native_to_hf(full_grads(ours), cfg)) == set(hf_params)
    grads = {n: rel_err(g, hf_params[n].grad) for n, g in native_to_hf(full_grads(ours), cfg).items()}
    return {"loss": rel_err(loss, trl_loss), "values": (loss.item(), trl_loss.item()),
            "metrics": {k: (metrics[k], trl_metrics[k]) for k in trl_metrics}, "grads": grads,
            "hf_params": len(hf_params), "grad_norm": torch.stack([p.grad.norm() for p in policy.parameters()]).norm().item()}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_dpo_matches_trl(dist_pool, tmp_path, tp, case):
    results = dist_pool(2).run(_parity_task, tp, case, str(tmp_path))
    r = results[0]
    assert r["grad_norm"] > 1e-3, "the reference gradients should be non-trivial"
    assert r["loss"] <= TOL, f"{case} tp={tp}: loss rel err {r['loss']:.2e} (ours, TRL: {r['values']})"
    assert set(r["metrics"]) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                 "logps/chosen", "logps/rejected"}
    for name, (ours, theirs) in r["metrics"].items():
        assert ours == pytest.approx(theirs, rel=TOL, abs=1e-7), f"{case} tp={tp}: {name} {ours} vs TRL {theirs}"
    assert len(r["grads"]) == r["hf_params"], "every HF parameter gets a gradient to compare"
    bad = {n: e for n, e in r["grads"].items() if e > TOL}
    assert not bad, f"{case} tp={tp}: gradient rel err above {TOL}: {bad}"
    worst = max(r["grads"].values())
    print(f"\n[dpo parity] {case} tp={tp}: loss {r['values'][0]:.6f} (TRL {r['values'][1]:.6f}, rel err "
          f"{r['loss']:.1e}); {r['metrics']}; max grad rel err {worst:.1e} over {len(r['grads'])} params")
