"""A reward model's scalar head and its pairwise ranking loss (Llama 2, section 3.2.2).

The head is ``LlamaForSequenceClassification``'s with one label: ``score.weight`` [1, d], no
bias, applied to the final-norm output at every position; the reward of a sequence is the score
at its **last token** (the EOS that closes the answer; the last kept token when a pair was
truncated). Hugging Face picks the same position as "the last token that is not
``pad_token_id``", which is why the export names a pad token that never ends a sequence
(checkpoints_tools: ``write_hf_config``).

TP: the weight is tiny and held whole on every TP rank (``replicated``); its input is the
replicated final-norm output, so every TP rank computes the same scores and the same gradient,
and DeepSpeed's clipping counts it once (on TP rank 0), like the norms. Sequence parallelism is
refused (the input would be a sequence slice).

Initialisation: like every other matrix, N(0, ``model.init_std``) drawn in full from
``(train.seed, "head.score.weight")`` (model/init.py), whatever the layout; a run started from an
SFT or pretrained checkpoint (``train.init_from``) takes the trunk from it and this draw for the
head (the LM head's weights are not used).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_llama.config import ModelConfig

from .layout import mark


class ScoreHead(torch.nn.Module):
    """hidden [s, b, d] (replicated over TP) -> scores [s, b] float32, one per position."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        device = "cpu" if mp.use_cpu_initialization else torch.cuda.current_device()
        self.score = torch.nn.Linear(cfg.hidden_size, 1, bias=False, device=device, dtype=mp.params_dtype)
        mark(self.score.weight, "replicated", (1, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x).squeeze(-1).float()


def last_token_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """[rows] int64: the position of each row's last answer token. ``loss_mask`` [rows, s] marks
    *label* positions (t predicts token t + 1), so the last answer token is one after the last mark."""
    s = loss_mask.shape[1]
    pos = torch.arange(s, device=loss_mask.device).expand_as(loss_mask)
    return torch.where(loss_mask > 0, pos, torch.full_like(pos, -1)).amax(dim=1) + 1


def sequence_rewards(scores: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """scores [s, rows] (ScoreHead output), loss_mask [rows, s] -> reward per row [rows]."""
    pos = last_token_positions(loss_mask)
    return scores.gather(0, pos.unsqueeze(0)).squeeze(0)


def ranking_loss(rewards: torch.Tensor, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [2P] (chosen rows then rejected rows), margin [P] -> (mean loss over the P pairs,
    float64 sums [pairs, correct, reward gap, loss] for the metrics).

    loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i); "correct": r_chosen > r_rejected."""
    p = margin.shape[0]
    gap = rewards[:p] - rewards[p:]
    losses = -F.logsigmoid(gap - margin.to(gap.dtype))
    stats = torch.stack([torch.tensor(float(p), dtype=torch.float64, device=gap.device),
                         (gap > 0).sum().double(), gap.detach().double().sum(), losses.detach().double().sum()])
    return losses.mean(), stats
