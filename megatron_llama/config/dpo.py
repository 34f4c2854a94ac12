"""DPOConfig: the ``dpo:`` section of a run YAML (read when ``train.objective=dpo``).

    dpo: {beta: 0.1, loss: sigmoid, label_smoothing: 0.0, rpo_alpha: 0.0}

* ``beta``: strength of the pull towards the reference (TRL's ``beta``; for ``ipo`` it is the
  paper's tau). Must be > 0.
* ``loss``: ``sigmoid`` (DPO, Rafailov et al. 2023) or ``ipo`` (Azar et al. 2023, on
  per-token averaged log-ratios, as TRL computes it).
* ``label_smoothing``: the conservative DPO (cDPO) flip probability eps in [0, 0.5): the loss is
  ``(1 - eps) * -log sigma(beta * d) + eps * -log sigma(-beta * d)``. Only for ``sigmoid``.
* ``rpo_alpha``: weight of a negative log-likelihood term on the chosen answers added to the
  preference loss (RPO, Pang et al. 2024; Llama 3 used 0.2): ``loss + alpha * NLL`` with NLL the
  mean of ``-log p`` over the chosen answer tokens of the global batch. It keeps DPO from pushing
  ``log p(chosen)`` down with ``log p(rejected)``. TRL 1.16 computes it as ``loss_type=[<loss>,
  "sft"], loss_weights=[1, alpha]`` (TRL < 1.0: ``rpo_alpha``). 0 (the default) is plain DPO.
* ``reference_dir``: where the stored reference passes live (megatron_llama/data/reference_logps.py);
  unset = beside the dataset. A pass is computed before the first step when its file is not there
  yet; a file computed for other data (or another model) is refused in one line.

The reference model is always the policy's starting point, ``train.init_from`` (an SFT checkpoint
or ``hf:DIR``); the section is validated on its own here and against the run in ``run.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    reference_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.beta > 0:  # also catches NaN
            raise ConfigError(f"dpo.beta={self.beta:g} must be > 0 (it scales the log-ratio to the reference; "
                              "TRL's default is 0.1): set e.g. dpo.beta=0.1")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss={self.loss!r}: choose one of {', '.join(DPO_LOSSES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing:g} must be in [0, 0.5) (the probability "
                              "that a preference label is flipped, cDPO): e.g. 0.1, or 0 for plain DPO")
        if not 0 <= self.rpo_alpha < math.inf:  # also catches NaN
            raise ConfigError(f"dpo.rpo_alpha={self.rpo_alpha:g} must be a finite number >= 0 (the weight of the "
                              "NLL term on the chosen answers; Llama 3 used 0.2): e.g. 0.2, or 0 for plain DPO")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing:g} with dpo.loss={self.loss}: label "
                              "smoothing (cDPO) is defined for the sigmoid loss only; set dpo.loss=sigmoid or "
                              "dpo.label_smoothing=0")
