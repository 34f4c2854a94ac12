"""Parallel layout, training, data and run configs: the typed, validated form of a run YAML."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .dpo import DPOConfig
from .errors import ConfigError
from .model import ModelConfig

CHECKPOINT_MODES = ("none", "selective", "full")
PARTITION_METHODS = ("bloom", "uniform", "parameters", "cost")
PRECISIONS = ("auto", "bf16", "fp32", "fp8")
FP8_RECIPES = ("tensorwise", "rowwise")
SPIKE_ACTIONS = ("warn", "skip", "rollback")
INIT_NEW_ROWS = ("mean", "zero", "random")


@dataclass
class ParallelConfig:
    """The 3D layout. ``dp`` = None means "whatever world_size / (tp * pp) is"."""

    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None
    zero_stage: int = 1
    # split the activations outside the TP layers along the sequence (no-op at tp = 1, so one
    # config serves every layout; seq_len must be divisible by tp)
    sequence_parallel: bool = False
    partition_method: str = "bloom"
    activation_checkpointing: str = "none"
    # ZeRO gradient communication (DeepSpeed's zero_optimization keys; sizes in elements):
    # overlap_comm reduces gradient buckets while the backward pass still runs (ZeRO 1-3).
    overlap_comm: bool = False
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise ConfigError(f"parallel.dp must be >= 1, got {self.dp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.partition_method not in PARTITION_METHODS:
            raise ConfigError(f"parallel.partition_method={self.partition_method!r}: "
                              f"choose one of {', '.join(PARTITION_METHODS)}")
        if self.activation_checkpointing not in CHECKPOINT_MODES:
            raise ConfigError(f"parallel.activation_checkpointing={self.activation_checkpointing!r}: "
                              f"choose one of {', '.join(CHECKPOINT_MODES)}")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive number of elements (e.g. 500000000), "
                                  f"got {value!r}")
        if self.overlap_comm and self.zero_stage == 0:
            raise ConfigError("parallel.overlap_comm=true needs ZeRO (it overlaps ZeRO's gradient reduction "
                              "with the backward pass): set parallel.zero_stage=1 or 2, or overlap_comm=false")
        if self.overlap_comm and self.pp > 1:
            raise ConfigError(f"parallel.overlap_comm=true with parallel.pp={self.pp}: DeepSpeed's pipeline engine "
                              "reduces gradients after the pipeline schedule and would silently turn it off; "
                              "set parallel.overlap_comm=false (bucket sizes still apply)")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} with parallel.pp={self.pp}: "
                              "DeepSpeed's pipeline engine supports ZeRO 0/1 only; set zero_stage=1")

    def resolve_dp(self, world_size: int) -> int:
        """DP size for this world; raises if world_size is not tp*pp*dp."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}"
                              f" = {mp}: launch a multiple of {mp} processes or change tp/pp")
        dp = world_size // mp
        if self.dp is not None and self.dp != dp:
            raise ConfigError(f"world size {world_size} != tp*pp*dp = {self.tp}*{self.pp}*{self.dp}"
                              f" = {mp * self.dp}: launch {mp * self.dp} processes or set parallel.dp={dp}")
        return dp

    def check_model(self, model: ModelConfig) -> None:
        """Layout constraints that depend on the model shape."""
        if model.num_attention_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} does not divide model.num_attention_heads="
                              f"{model.num_attention_heads}: use a tp that divides it")
        if model.num_kv_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} does not divide model.num_kv_heads="
                              f"{model.num_kv_heads}: use a tp that divides it (each TP rank holds whole KV heads)")
        if self.pp > model.num_layers:
            raise ConfigError(f"parallel.pp={self.pp} is larger than model.num_layers={model.num_layers}:"
                              " every pipeline stage needs at least one transformer block")


OBJECTIVES = ("lm", "reward", "dpo")
PAIR_OBJECTIVES = ("reward", "dpo")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Global batch = micro_batch_size * grad_accum_steps * dp.

    Checkpoints go to ``save_dir`` every ``save_interval`` steps (0 = off), every ``save_minutes``
    minutes of wall time (0 = off), on SIGTERM/SIGUSR1 and at the end; the newest ``keep_last``
    are kept (0 = keep all). ``wandb_project`` set = rank 0 logs every step to Weights & Biases
    (``WANDB_MODE=offline`` / ``WANDB_DIR`` are honoured). ``init_from`` (``hf:DIR`` or a native
    checkpoint) starts a new run from those weights (megatron_llama/checkpoint/init_from.py); it is
    ignored when the run resumes from its own ``save_dir``.
    """

    seed: int = 1234
    steps: int = 100
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"
    compile: Optional[bool] = None  # torch.compile each block; None = on for CUDA, off on CPU
    log_interval: int = 1
    save_dir: str = "runs/default"
    save_interval: int = 0
    save_minutes: float = 0.0
    keep_last: int = 2
    # interval and timed saves copy the shards to host memory and write them in the background
    # (megatron_llama/checkpoint/async_save.py); signal and final saves are complete before exit
    async_save: bool = False
    wandb_project: Optional[str] = None
    init_from: Optional[str] = None  # hf:DIR or a native checkpoint: weights only, fresh optimizer, step 0
    # init_from with an extension of the source's tokenizer: the embedding / head rows of the new ids start
    # at the mean of the source's rows (mean), at zero (zero) or N(0, init_std) (random)
    init_new_rows: str = "mean"
    # validation (launch/validation.py): every eval_interval steps (0 = only at the end) when the
    # data has a held-out split (data.valid_fraction / data.valid_sources), eval_iters global batches
    eval_interval: int = 0
    eval_iters: int = 10
    tensorboard_dir: Optional[str] = None  # rank 0 writes TensorBoard event files here
    # lm-evaluation-harness tasks (launch/eval_in_training.py, needs megatron-llama[eval]) on the weights of
    # every eval_tasks_every-th checkpoint and of the last one; eval_tasks_limit items per task (0 = all)
    eval_tasks: list = field(default_factory=list)
    eval_tasks_every: int = 1
    eval_tasks_limit: int = 0
    # loss spikes (launch/spikes.py): z-score of the loss over the last spike_window accepted steps,
    # checked after spike_warmup steps; NaN/Inf loss or grad norm is always skipped
    spike_action: str = "warn"
    spike_zscore: float = 6.0
    spike_window: int = 50
    spike_warmup: int = 20
    spike_max_in_row: int = 5  # this many skipped / rolled-back steps in a row: stop, exit status 4
    fp8_recipe: str = "tensorwise"  # precision=fp8: float8 scaling, tensorwise or rowwise
    # resilience (launch/supervisor.py, launch/watchdog.py, launch/exit_codes.py)
    max_restarts: int = 3            # restarts of failed (1) or hung (3) ranks by mllama-train's supervisor
    restart_backoff_s: float = 10.0  # wait before the first restart, doubled each time (at most 5 min)
    hang_timeout_s: float = 600.0    # a rank without progress this long exits 3 (0 = no watchdog)
    collective_timeout_s: float = 1800.0  # torch.distributed process-group timeout
    # what the head stage optimises (pipelines/objectives.py): lm = next-token loss (pretraining,
    # SFT); reward = pairwise ranking loss of a scalar-head reward model; dpo = direct preference
    # optimisation. reward and dpo read preference pairs (data: mllama-preprocess --preference)
    objective: str = "lm"

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "log_interval", "eval_iters",
                     "spike_window", "spike_max_in_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"train.objective={self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.init_new_rows not in INIT_NEW_ROWS:
            raise ConfigError(f"train.init_new_rows={self.init_new_rows!r}: choose one of {', '.join(INIT_NEW_ROWS)}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe={self.fp8_recipe!r}: choose one of {', '.join(FP8_RECIPES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.spike_action not in SPIKE_ACTIONS:
            raise ConfigError(f"train.spike_action={self.spike_action!r}: choose one of {', '.join(SPIKE_ACTIONS)}")
        if self.spike_zscore <= 0:
            raise ConfigError(f"train.spike_zscore must be positive, got {self.spike_zscore}")
        for name in ("save_interval", "save_minutes", "keep_last", "eval_interval", "spike_warmup", "max_restarts",
                     "restart_backoff_s", "hang_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if self.eval_tasks_every < 1 or self.eval_tasks_limit < 0:
            raise ConfigError(f"train.eval_tasks_every must be >= 1 (got {self.eval_tasks_every}) and "
                              f"train.eval_tasks_limit >= 0 (got {self.eval_tasks_limit}; 0 = every item)")
        if not all(isinstance(t, str) and t.strip() for t in self.eval_tasks):
            raise ConfigError(f"train.eval_tasks={self.eval_tasks!r}: give lm-eval task names, e.g. "
                              "[mllama_story_color, mllama_story_count]")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"train.collective_timeout_s must be positive, got {self.collective_timeout_s}")

    def check_batch(self, dp: int) -> None:
        gbs = self.micro_batch_size * self.grad_accum_steps * dp
        if self.global_batch_size is not None and self.global_batch_size != gbs:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} != micro_batch_size*grad_accum_steps"
                f"*dp = {self.micro_batch_size}*{self.grad_accum_steps}*{dp} = {gbs}: "
                f"set grad_accum_steps={self.global_batch_size // max(1, self.micro_batch_size * dp)}"
                " or drop global_batch_size")


@dataclass
class DataConfig:
    """Where samples come from.

    ``sources`` is a list of ``{path: <prefix of .bin/.idx>, weight: float, epochs: float?}``;
    ``corpus`` is raw JSONL to tokenize and preprocess on first use (the quickstart).
    ``synthetic`` = True feeds deterministic random tokens (tests and benchmarks only).
    ``seq_len`` defaults to the model's ``max_seq_len`` (2048 for the LLaMA presets).
    ``sft`` = True: the data are conversations (``mllama-preprocess --sft`` output in ``sources``, or
    raw SFT JSONL in ``corpus``), packed per sample, loss on answer tokens only.
    """

    seq_len: Optional[int] = None
    tokenizer: Optional[str] = None
    sources: list = field(default_factory=list)
    corpus: Optional[str] = None
    cache_dir: str = "runs/data"
    vocab_size: int = 0
    synthetic: bool = False
    text_key: str = "text"
    sft: bool = False                 # supervised fine-tuning data (megatron_llama/data/sft_*.py)
    sft_overlong: str = "truncate"    # SFT samples longer than seq_len: truncate or drop
    chat_template: str = "llama2"     # SFT conversation format (data/chat_template.py)
    # held-out validation data: a fraction of the documents (never trained on), or own sources
    valid_fraction: float = 0.0
    valid_sources: list = field(default_factory=list)
    # preference pairs (train.objective reward / dpo): a pair longer than seq_len on either side
    preference_overlong: str = "truncate"  # truncate (both sides cut to seq_len) or drop

    def __post_init__(self) -> None:
        if self.preference_overlong not in ("truncate", "drop"):
            raise ConfigError(f"data.preference_overlong={self.preference_overlong!r}: choose truncate or drop")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.sft_overlong not in ("truncate", "drop"):
            raise ConfigError(f"data.sft_overlong={self.sft_overlong!r}: choose truncate or drop")
        if not 0 <= self.valid_fraction < 0.5:
            raise ConfigError(f"data.valid_fraction must be in [0, 0.5), got {self.valid_fraction}: "
                              "e.g. 0.01 holds out 1% of the documents")
        if self.sft and (self.valid_fraction or self.valid_sources):
            raise ConfigError("data.valid_fraction / data.valid_sources with data.sft=true are not supported yet:"
                              " validate SFT runs by evaluating the exported model, or drop the validation split")
        if self.valid_fraction and self.valid_sources:
            raise ConfigError("data.valid_fraction and data.valid_sources are both set: hold out a fraction "
                              "of the training documents or give separate validation sources, not both")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # read when train.objective=dpo

    @property
    def preference(self) -> bool:
        """The run reads preference pairs (megatron_llama/data/preference_dataset.py)."""
        return self.train.objective in PAIR_OBJECTIVES

    def _check_objective(self) -> None:
        """The objective decides the head (reward: score) and the data (reward/dpo: pairs)."""
        objective = self.train.objective
        if objective == "dpo" and not self.train.init_from:
            raise ConfigError("train.objective=dpo needs a reference model, and there is none: set "
                              "train.init_from to the SFT checkpoint (or hf:DIR) the policy starts from; it is also "
                              "the reference")
        if objective == "reward":
            self.model.head = "score"
        elif self.model.head == "score":
            raise ConfigError(f"model.head=score is a reward model's head, but train.objective={objective}: "
                              "set train.objective=reward (or model.head=lm)")
        if not self.preference:
            return
        if self.data.sft:
            raise ConfigError(f"data.sft=true with train.objective={objective}: preference runs read pairs "
                              "(mllama-preprocess --preference); drop data.sft")
        if self.data.synthetic:
            raise ConfigError(f"data.synthetic=true with train.objective={objective}: preference runs need "
                              "real pairs; set data.corpus: data/preferences.jsonl (shipped) instead")
        if self.parallel.sequence_parallel and self.parallel.tp > 1:
            raise ConfigError(f"parallel.sequence_parallel=true with train.objective={objective} is not "
                              "supported yet: set parallel.sequence_parallel=false")
        if objective == "reward" and self.model.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true with train.objective=reward: a reward model has no "
                              "LM head to tie; set model.tie_embeddings=false")

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)
        if self.data.seq_len is None:
            self.data.seq_len = self.model.max_seq_len
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}: raise max_seq_len or shorten seq_len")
        self._check_objective()
        if self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tp:
            raise ConfigError(f"parallel.sequence_parallel=true splits the sequence over tp={self.parallel.tp} "
                              f"ranks, but data.seq_len={self.data.seq_len} is not divisible by it: "
                              "use a seq_len that is a multiple of tp")
