"""DeepSpeed around the model: ZeRO over DP, bf16 with fp32 master weights, clipping, LR schedule.

* PP > 1: a DeepSpeed ``PipelineEngine`` around ``stages.build_pipeline_module`` (ZeRO 0/1 only,
  DeepSpeed's limit); one optimizer step = ``train_batch`` over the step's micro-batches.
* PP = 1: a plain ``DeepSpeedEngine`` around ``LlamaModel`` (no pipeline schedule; ZeRO 2/3 also
  allowed). The DP/TP groups come from DeepSpeed's grid over the same topology (``mpu``).

Precision: bf16 on GPU with fp32 master weights and fp32 gradient accumulation
(``data_types.grad_accum_dtype = fp32``; DeepSpeed issue 1835), fp32 on CPU.
Optimizer: a client ``torch.optim.AdamW`` (fused on GPU; no JIT-compiled DeepSpeed Adam), no
weight decay on 1-D parameters (norm weights and biases). At ``grad_accum_steps = 1`` and DP 1
(no pipeline) there is no fp32 gradient buffer: the AdamW reads the bf16 gradients in one pass
that folds in the clip and writes the bf16 weights (``bf16_direct_step.py``, ``fused_adamw.py``).
Gradient clipping (``train.grad_clip``) is DeepSpeed's: the norm is summed over DP partitions and
over the TP x PP model-parallel group, counting TP-replicated parameters (norms) once (on TP
rank 0; megatron-core marks split parameters ``tensor_model_parallel``). The same global norm is
therefore obtained under every layout (tested).

Skipped steps: ``step_gate(loss, grad_norm) -> skip`` (launch/spikes.py) is asked once per optimizer
step, right before the client optimizer would change the weights: DeepSpeed has reduced and
clipped the gradients by then, and the step's global loss is gathered with one all-reduce over
the world (under PP only the last stage has it). A skipped step leaves weights and optimizer
state untouched; DeepSpeed skips non-finite gradient norms by itself (its own overflow check).
Either way the LR schedule still advances, so it stays a function of the step number.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from megatron_llama.checkpoint.integrity import without_zip_crc
from megatron_llama.checkpoint.mapped_load import MappedLoad
from megatron_llama.config import RunConfig
from megatron_llama.model import LMHead, LlamaModel, fp8, lm_loss
from megatron_llama.model.score_head import ScoreHead

from .bf16_direct_step import make_step_direct
from .bf16_grads import fuse_grad_accumulation
from .bf16_step import make_step_sync_free, skip_single_rank_allreduce
from .compile_policy import use_compile
from .objectives import objective_for
from .fused_adamw import AdamW
from .tied import install_tied_grad_reduction
from .token_weights import weigh_answer_tokens
from .topology import ParallelLayout


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32  # fp8: bf16 outside the GEMMs


def deepspeed_config(cfg: RunConfig, dp: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict (no optimizer/scheduler sections: those are client objects)."""
    t = cfg.train
    conf = {
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero_config(cfg.parallel),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,          # our trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        # its throughput timer synchronizes the device at every forward and step (pipelines/bf16_step.py)
        "timers": {"throughput": {"enabled": False}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "pipeline": {"activation_checkpoint_interval": 0, **pipe_partitioning(cfg.parallel)},
    }
    if dtype == torch.bfloat16:
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    return conf


def pipe_partitioning(parallel) -> dict:
    """DeepSpeed sends 1/tp of each stage-to-stage activation (and gradient) from each TP rank and
    all-gathers it on the receiving stage, which assumes TP replicas. Under sequence parallelism
    each TP rank holds a different [s/tp, b, d] slice (already 1/tp): send it whole."""
    whole = parallel.sequence_parallel and parallel.tp > 1
    return {"pipe_partitioned": not whole, "grad_partitioned": not whole}


def zero_config(parallel) -> dict:
    """DeepSpeed's ``zero_optimization`` section from ``parallel.*`` (stage, overlap, bucket sizes)."""
    return {"stage": parallel.zero_stage, "overlap_comm": parallel.overlap_comm,
            "reduce_bucket_size": parallel.reduce_bucket_size,
            "allgather_bucket_size": parallel.allgather_bucket_size,
            "contiguous_gradients": parallel.contiguous_gradients}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norm weights and biases (1-D) are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    return AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                 eps=t.eps, fused=device.type == "cuda")


def _overflow_said_by_trainer(record: logging.LogRecord) -> bool:
    """DeepSpeed's "OVERFLOW! Skipping step" warning: the trainer logs the skip in one line of its own."""
    return "OVERFLOW! Skipping step" not in record.getMessage()


@dataclass
class StepResult:
    loss: float          # mean token loss over the global batch (same on every rank)
    grad_norm: float     # global gradient norm before clipping
    lr: float            # learning rate used by this step's update
    skipped: bool = False  # the update was not applied (non-finite gradients, or step_gate said so)
    metrics: dict = field(default_factory=dict)  # the objective's numbers beside the loss (reward: accuracy, ...)


class TrainEngine:
    """One optimizer step at a time over this DP rank's micro-batches, whatever the layout."""

    def __init__(self, cfg: RunConfig, layout: ParallelLayout, topology, device: torch.device,
                 lr_multiplier: Callable[[int], float], dtype: Optional[torch.dtype] = None,
                 quiet: bool = True, init_weights: Optional[Callable[[torch.nn.Module], None]] = None):
        import deepspeed
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        if quiet:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            logging.getLogger("DeepSpeed").addFilter(_overflow_said_by_trainer)
        self.cfg, self.layout, self.device = cfg, layout, device
        self.dtype = dtype or resolve_dtype(cfg.train.precision, device)
        self.pipelined = layout.pp > 1
        if cfg.train.precision == "fp8":
            fp8.check_supported(device)
        ds_conf = deepspeed_config(cfg, layout.dp, self.dtype)
        self.objective = objective_for(cfg, layout.tp)
        # DeepSpeed prints banners from rank 0 (topology, seeds); keep the trainer's output readable.
        mute = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
        with mute:
            if self.pipelined:
                from .stages import build_pipeline_module
                model = build_pipeline_module(cfg, topology, self.dtype, device, layout.dp,
                                              loss_fn=self.objective.loss)
                mpu = None  # a PipelineModule brings its own grid
            else:
                model = LlamaModel(cfg.model, cfg.parallel, dtype=self.dtype, device=device, seed=cfg.train.seed,
                                   compile=use_compile(cfg, device))
                mpu = PipelineParallelGrid(topology=topology)
            if init_weights is not None:  # before DeepSpeed copies the weights into its fp32 masters
                init_weights(model)
            if cfg.train.precision == "fp8":  # float8 GEMMs in the blocks' TP layers, LM head in bf16
                fp8.convert(model, cfg.train.fp8_recipe, skip=(LMHead, ScoreHead))
            optimizer = build_optimizer(model, cfg, device)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
            self._gate_client_step(optimizer)  # after LambdaLR, which wraps step() itself
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu, config=ds_conf)
        self.fused_grad_accumulation = fuse_grad_accumulation(self.optimizer)  # bf16: no fp32 temporaries
        self.sync_free_step = make_step_sync_free(self.optimizer)  # bf16: no host syncs in the step
        self.single_rank_allreduce_skipped = skip_single_rank_allreduce(self.engine, layout.dp, self.pipelined)
        # gas 1, DP 1: no fp32 gradient buffer, AdamW reads the bf16 gradients (bf16_direct_step.py)
        self.direct_step = make_step_direct(self.optimizer, self.engine, cfg.train.grad_accum_steps,
                                            self.pipelined, self.sync_free_step)
        self.grid = self.engine.grid if self.pipelined else mpu
        self.step_gate: Optional[Callable[[float, Optional[float]], bool]] = None
        self._decision: Optional[bool] = None
        self._loss_sum: Optional[torch.Tensor] = None
        if self.pipelined and cfg.model.tie_embeddings:
            install_tied_grad_reduction(self.engine)  # exact, whatever DP (pipelines/tied.py)
        self._check_grid()
        self.local_params = sum(p.numel() for p in model.parameters())
        self.fused_loss = not self.pipelined  # train_step asks the model for the loss (not under SFT)

    def _check_grid(self) -> None:
        """The engine's groups are the topology's groups (which check_groups_agree compared)."""
        g, lay = self.grid, self.layout
        dp = tuple(sorted(g.get_data_parallel_group_ranks()))
        if dp != lay.dp_ranks or g.get_data_parallel_world_size() != lay.dp:
            raise RuntimeError(f"DeepSpeed engine DP group {dp} != topology DP group {lay.dp_ranks}")
        if self.pipelined and tuple(sorted(g.pp_group)) != lay.pp_ranks:
            raise RuntimeError(f"DeepSpeed engine PP group {g.pp_group} != topology PP group {lay.pp_ranks}")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, ...]]) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` micro-batches ``(tokens, labels)`` [b, s],
        or SFT's ``(tokens, labels, answer_mask, segments)``: loss = mean over the global batch's
        answer tokens, attention inside each packed sample (token_weights.py, document_mask.py)."""
        lr = self.lr
        self._decision = None
        ds_skipped = self.engine.skipped_steps
        micro_batches = [tuple(t.to(self.device) for t in mb) for mb in micro_batches]
        pairs = self.objective.pairs
        if micro_batches and len(micro_batches[0]) == 4 and not pairs:
            micro_batches, _ = weigh_answer_tokens(micro_batches, self.layout.dp,
                                                   self.grid.get_data_parallel_group(), self.device)
        if pairs:
            self.objective.prepare(micro_batches, self.layout.dp, self.grid.get_data_parallel_group())
        if self.pipelined:
            # first stage reads the inputs, last stage the loss targets (DeepSpeed's contract)
            it = (self._pipe_item(mb) for mb in micro_batches)
            loss = self.engine.train_batch(data_iter=it).item()
        else:
            total = self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
            for tokens, labels, *rest in micro_batches:
                if pairs:  # (tokens, labels, loss_mask, margin, pair_index): preference_dataset.py
                    loss_t = self.objective.loss(self.engine(tokens), (labels, *rest))
                elif rest:  # SFT: (loss_mask, segments)
                    loss_t = lm_loss(self.engine(tokens, rest[1]), labels, rest[0])
                else:  # the head's chunked loss: no [tokens x vocab] logits (model/fused_loss.py)
                    loss_t = self.engine(tokens, labels=labels)
                self.engine.backward(loss_t)
                total += loss_t.detach().float()  # before step(): the gate reads it
                self.engine.step()
            total /= self.cfg.train.grad_accum_steps
            if self.layout.dp > 1:
                dist.all_reduce(total, group=self.grid.get_data_parallel_group())
                total /= self.layout.dp
            loss = total.item()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm.item() if torch.is_tensor(norm) else (norm if norm is not None else float("nan")))
        skipped = bool(self._decision)
        if self.engine.skipped_steps != ds_skipped:  # DeepSpeed's overflow check: no update, no LR step
            self.scheduler.step()
            skipped = True
        elif not math.isfinite(norm) and self.sync_free_step:  # skipped on the device (bf16_step.py)
            self.engine.skipped_steps += 1
            skipped = True
        return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=skipped,
                          metrics=self.objective.collect(self.device))

    def _pipe_item(self, mb: tuple) -> tuple:
        """A micro-batch as DeepSpeed's pipeline wants it: (first stage inputs, last stage labels)."""
        if self.objective.pairs:  # tokens [2P, s]; (labels, loss_mask, margin, pair_index)
            return mb[0], tuple(mb[1:])
        if len(mb) == 4:  # SFT
            return (mb[0], mb[3]), (mb[1], mb[2])
        return mb

    def _gate_client_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Route the client optimizer's ``step`` through :attr:`step_gate` (decided once per step:
        ZeRO calls it once per parameter group)."""
        inner = optimizer.step

        def gated_step(*args, **kwargs):
            if self._decision is None:
                self._decision = False
                if self.step_gate is not None:
                    norm = self._grad_norm_now()
                    # ZeRO-0 fp32 computes no norm we can read: check the gradients ourselves
                    loss, bad_grads = self._step_stats(optimizer if norm is None else None)
                    self._decision = bool(self.step_gate(loss, float("nan") if bad_grads else norm))
            return None if self._decision else inner(*args, **kwargs)
        optimizer.step = gated_step

    def _step_stats(self, check_grads: Optional[torch.optim.Optimizer]) -> tuple[float, bool]:
        """This step's mean loss over the global batch, and whether any rank has a non-finite
        gradient in ``check_grads`` (if given); the same on every rank (one all-reduce over the world)."""
        t = self.cfg.train
        local = self._loss_sum
        if self.pipelined:
            local = self.engine.total_loss if self.engine.is_last_stage() else None
        out = torch.zeros(2, dtype=torch.float32, device=self.device)
        if local is not None:  # every TP x DP rank of the last stage holds its replica's loss
            out[0] += local.detach().float().sum() / (t.grad_accum_steps * self.layout.dp * self.layout.tp)
        if check_grads is not None:
            out[1] = float(any(not torch.isfinite(p.grad).all() for g in check_grads.param_groups
                               for p in g["params"] if p.grad is not None))
        dist.all_reduce(out)
        return float(out[0].item()), bool(out[1].item() > 0)

    def _grad_norm_now(self) -> Optional[float]:
        """The global norm DeepSpeed just computed (ZeRO / bf16 optimizers), or None (ZeRO-0 fp32)."""
        norm = getattr(self.optimizer, "_global_grad_norm", None)
        return None if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)

    def eval_step(self, micro_batches: Iterable[tuple[torch.Tensor, ...]]) -> float:
        """Mean loss over ``grad_accum_steps`` micro-batches ``(tokens, labels)`` [b, s] (pair
        objectives: preference micro-batches) of every DP rank, without gradients; the same value
        on every rank. The objective's metrics of these batches: ``objective.collect`` next."""
        micro_batches = [tuple(t.to(self.device) for t in mb) for mb in micro_batches]
        if self.objective.pairs:
            self.objective.prepare(micro_batches, self.layout.dp, self.grid.get_data_parallel_group())
        if self.pipelined:
            it = (self._pipe_item(mb) for mb in micro_batches)
            out = self.engine.eval_batch(data_iter=it)
            self.engine.module.train()
            return float(out.item())
        self.engine.module.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for tokens, labels, *rest in micro_batches:
                if self.objective.pairs:
                    total += self.objective.loss(self.engine(tokens), (labels, *rest)).float()
                else:
                    total += lm_loss(self.engine(tokens), labels).float()
        self.engine.module.train()
        total /= self.cfg.train.grad_accum_steps
        if self.layout.dp > 1:
            dist.all_reduce(total, group=self.grid.get_data_parallel_group())
            total /= self.layout.dp
        return float(total.item())

    # --- checkpoints (thin: megatron_llama/checkpoint/directory.py owns the directory layout) -------------
    def save(self, save_dir: str, tag: str, client_state: dict, checkpoint_engine=None) -> None:
        """Every rank writes its shards under ``save_dir/tag``. DeepSpeed's own ``latest`` is not
        written: megatron_llama/checkpoint/directory.py marks a checkpoint complete and points ``latest`` at it.
        ``checkpoint_engine`` replaces DeepSpeed's (torch.save) for this save only: the asynchronous
        save's host snapshot (megatron_llama/checkpoint/async_save.py). torch.save writes no zip CRCs
        here: run.json's table covers the files (megatron_llama/checkpoint/integrity.py)."""
        with self._checkpoint_engine(checkpoint_engine), without_zip_crc():
            self.engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, save_dir: str, tag: Optional[str] = None) -> Optional[dict]:
        """On a GPU the files are memory-mapped (megatron_llama/checkpoint/mapped_load.py)."""
        with self._checkpoint_engine(MappedLoad() if self.device.type in self.mapped_load_devices else None):
            path, client_state = self.engine.load_checkpoint(save_dir, tag=tag)
        return client_state if path is not None else None

    mapped_load_devices = ("cuda",)  # a test adds "cpu" to run the mapped load on gloo

    @contextlib.contextmanager
    def _checkpoint_engine(self, replacement):
        own = self.engine.checkpoint_engine
        if replacement is not None:
            self.engine.checkpoint_engine = replacement
        try:
            yield
        finally:
            self.engine.checkpoint_engine = own
