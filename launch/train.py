"""``mllama-train CONFIG.yaml [SECTION.KEY=VALUE ...]``: 3D-parallel LLaMA pretraining.

Runs under any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK::

    deepspeed --num_gpus 8 -m launch.train configs/tiny-gpu-3d.yaml    # (CPU: export OMP_NUM_THREADS=1)
    torchrun --nproc-per-node 8 -m launch.train configs/tiny-gpu-3d.yaml
    srun ... (see launch/slurm/train.sbatch)

Started without a launcher (no RANK / WORLD_SIZE in the environment) it starts
``parallel.tp * parallel.pp * parallel.dp`` processes on this machine itself under a supervisor
that restarts failed or hung runs (launch/supervisor.py) and says so. gloo on CPU, NCCL on GPU.
Exit statuses: launch/exit_codes.py (also in ``--help``).

Every bad layout or config is reported before any process group exists as one line
``error: <what and how to fix>`` (printed by rank 0 only), exit status 2, no traceback.

SIGTERM / SIGUSR1 (SLURM's warning before a time limit or preemption) and SIGINT (Ctrl-C): every
rank saves a checkpoint at the next step boundary and exits with status 128 + signal (143 / 138 /
130); the same command resumes it (launch/signals.py, megatron_llama/checkpoint/directory.py). Exit status 0 = finished.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_llama.config import ConfigError, RunConfig, load_config

_START = time.perf_counter()
BAD_INPUT_GRACE_S = 2.0
USAGE = "mllama-train CONFIG.yaml [SECTION.KEY=VALUE ...]   (e.g. train.steps=50 parallel.tp=2)"
EPILOG = """examples:
  mllama-train configs/tiny-cpu-3d.yaml                  # starts tp*pp*dp local processes, supervised
  mllama-train configs/tiny-cpu-3d.yaml train.steps=20 train.save_dir=runs/try
  torchrun --nproc-per-node 8 -m launch.train configs/tiny-gpu-3d.yaml
  sbatch --nodes 2 --gpus-per-node 8 launch/slurm/train.sbatch configs/llama-7b.yaml
"""


@dataclass
class TrainSummary:
    steps: int = 0                 # optimizer steps done by this invocation
    final_step: int = 0            # global step reached (includes resumed steps)
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    checkpoint: Optional[str] = None
    resumed_from: Optional[int] = None
    stop_signal: Optional[int] = None  # SIGTERM/SIGUSR1 that stopped the run early (checkpoint saved)
    valid_losses: list = field(default_factory=list)  # [step, validation loss]
    metrics: list = field(default_factory=list)  # per step: the objective's numbers (reward: accuracy, reward_gap)
    valid_metrics: list = field(default_factory=list)  # [step, {valid_loss, valid_accuracy, ...}]
    skipped_steps: int = 0         # NaN/Inf or spike steps whose update was not applied
    rollbacks: int = 0
    eval_tasks: list = field(default_factory=list)  # [step, {"eval/<task>/<metric>": value}] (rank 0)
    diverged: Optional[str] = None  # why too many spikes / NaNs in a row stopped the run (exit status 4)


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def validate_layout(cfg: RunConfig, world_size: int) -> int:
    """All layout / batch checks that need only the world size; returns DP. Raises ConfigError."""
    dp = cfg.parallel.resolve_dp(world_size)
    cfg.parallel.check_model(cfg.model)
    cfg.train.check_batch(dp)
    return dp


def processes_needed(cfg: RunConfig) -> int:
    """Processes to start on this machine when no launcher did: tp*pp*dp; with ``parallel.dp``
    unset, as many model replicas as the visible GPUs hold (1 on CPU)."""
    mp = cfg.parallel.tp * cfg.parallel.pp
    gpus = _gpu_count()
    if cfg.parallel.dp is not None:
        n = mp * cfg.parallel.dp
    else:
        n = mp * max(1, gpus // mp)
    if gpus and n > gpus:
        raise ConfigError(f"the layout needs {n} processes (tp*pp*dp = {cfg.parallel.tp}*{cfg.parallel.pp}*"
                          f"{n // mp}), one per GPU, but this machine has {gpus} GPUs: lower parallel.dp, tp or pp,"
                          " or launch on several nodes (launch/slurm/train.sbatch)")
    return n


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank_zero_first(fn):
    """Run ``fn`` on global rank 0, then on the other ranks; returns its result.

    For work that fills a shared cache (tokenizer training, preprocessing): rank 0 builds it, the
    others then find it ready. If rank 0 fails with a ConfigError (a bad corpus, say), every rank
    raises the same error instead of waiting forever at a barrier.
    """
    import torch.distributed as dist
    if dist.get_rank() == 0:
        status = [None]
        try:
            out = fn()
        except ConfigError as e:
            status = [str(e)]
            dist.broadcast_object_list(status, src=0)
            raise
        dist.broadcast_object_list(status, src=0)
        return out
    status = [None]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise ConfigError(status[0])
    return fn()


def train(cfg: RunConfig, max_steps: Optional[int] = None, log: bool = True, save: bool = True,
          on_step: Optional[Callable[[int], None]] = None) -> TrainSummary:
    """Train on the current distributed world (initialising it if needed). Every rank calls this.

    ``max_steps`` stops early (tests) without changing the LR schedule, which is always defined by
    ``train.steps``. ``on_step(step)`` is called on every rank after each optimizer step (tests,
    profilers). With ``save``: resumes from the newest complete checkpoint in ``train.save_dir``,
    saves every ``save_interval`` steps, every ``save_minutes`` minutes and at the end, and on
    SIGTERM/SIGUSR1 saves at the next step boundary and returns early with ``stop_signal`` set
    (see launch/signals.py). Returns the same summary on every rank.
    """
    import torch
    import torch.distributed as dist

    from pipelines.engine import TrainEngine
    from pipelines.stages import describe_stages
    from pipelines.balance import stage_boundaries
    from pipelines.topology import build_topology, init_distributed

    from megatron_llama import checkpoint
    from megatron_llama.checkpoint.async_save import AsyncSaves
    from .batches import open_batches
    from .lr_schedule import schedule_for
    from .metrics import StepLogger, fmt_count, fmt_duration
    from .faults import Faults
    from .signals import StepBoundary, StopSignals, exit_code_for, signal_name
    from .wandb_log import WandbLogger
    from .monitor import RunMonitor
    from .rollback import SkippedSamples, reposition, respond
    from .spikes import StepGuard
    from .validation import Validator
    from .eval_in_training import TaskEvaluator
    from .watchdog import Heartbeat

    device, _backend = init_distributed(timeout_minutes=cfg.train.collective_timeout_s / 60)
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    t = cfg.train
    if t.objective == "dpo":  # before any weights are read: a reward model is no policy
        from .reference_pass import check_policy_source
        check_policy_source(cfg)
    init_weights, init_line = _init_from(cfg, layout, save)
    engine = TrainEngine(cfg, layout, topo, device, schedule_for(cfg.train), init_weights=init_weights)
    global_batch = t.micro_batch_size * t.grad_accum_steps * layout.dp
    tokens_per_step = global_batch * cfg.data.seq_len * (2 if cfg.preference else 1)  # a pair is two rows

    start_step, consumed = checkpoint.resume(engine, layout, t.save_dir) if save else (0, 0)
    batches, source = open_batches(cfg, consumed, layout.dp_rank, layout.dp, rank_zero_first)
    meta = checkpoint.latest(t.save_dir) if save and start_step else None
    skips = SkippedSamples.load(t.save_dir, meta) if save else SkippedSamples(None)
    validator = Validator(cfg, layout, engine, rank_zero_first)
    tasks = TaskEvaluator(cfg, layout, engine, device, on=save)  # on saved checkpoints
    guard = StepGuard(t)
    guard.load_state_dict((meta or {}).get("spike_detector"))
    run_state = lambda: {"skipped_samples": skips.ranges, "spike_detector": guard.state_dict()}  # noqa: E731
    engine.step_gate = guard.gate  # asked before every optimizer update (pipelines/engine.py)

    total_params = cfg.model.num_params(layout.tp)
    stages = ""
    if layout.pp > 1:
        stages = describe_stages(cfg, stage_boundaries(cfg.model, cfg.parallel, layout.dp, cfg.data.seq_len,
                                                       t.micro_batch_size, engine.dtype == torch.bfloat16))
    logger = StepLogger(cfg, layout, device, tokens_per_step, t.steps, enabled=log and layout.rank == 0)
    logger.banner(total_params, source, stages, start_step or None, engine.dtype)
    if init_line:
        logger.print(init_line)
    logger.print(f"  {validator.describe()}; loss spikes: {t.spike_action} (z > {t.spike_zscore:g})")
    if tasks.enabled:
        logger.print(f"  {tasks.describe()}")
    if t.objective == "dpo":  # the reference log-probs of every pair: stored, or one pass now (step 0)
        from .reference_pass import prepare
        prepare(engine, cfg, layout, {"train": batches.dataset, "valid": validator.dataset}, start_step,
                logger.print)

    summary = TrainSummary(resumed_from=start_step or None)
    end = t.steps if max_steps is None else min(t.steps, start_step + max_steps)
    with contextlib.ExitStack() as scope:
        # rank 0 only; if wandb.init fails: one warning line, training goes on
        wandb_log = scope.enter_context(WandbLogger(cfg, layout, enabled=layout.rank == 0, persist_id=save))
        monitor = scope.enter_context(RunMonitor(cfg, layout, save, wandb_log.sink))
        monitor.start(start_step, {"resumed": bool(start_step), "layout": layout.describe(), "total_steps": t.steps,
                                   "tokens_per_step": tokens_per_step})
        logger.sink = monitor.train
        heart = scope.enter_context(Heartbeat(layout.rank, t.hang_timeout_s))
        boundary = stop = saver = None
        # test hook (MLLAMA_FAULT, launch/faults.py); empty in real runs
        faults = Faults(layout.rank, stop_requested=lambda: stop is not None and stop.received is not None,
                        save_dir=t.save_dir)
        if save:  # SIGTERM/SIGUSR1/SIGINT now mean "save and stop at the next step boundary"
            stop = scope.enter_context(StopSignals())
            boundary = StepBoundary(stop, t.save_minutes, device, layout.rank)
        if save and t.async_save:  # interval and timed saves written in the background
            saver = scope.enter_context(AsyncSaves(engine, t.save_dir, t.keep_last, device,
                                                   after_file=lambda s, _n: faults.at("kill-writing", s)))
        t0 = time.perf_counter()
        logger.restart_clock()
        step = start_step
        while step < end:
            consumed = reposition(batches, skips, consumed)  # past samples skipped by a rollback
            heart.beat(step + 1, "data")
            faults.at("stall", step)
            micro = [next(batches) for _ in range(t.grad_accum_steps)]
            heart.beat(step + 1, "step")
            result = engine.train_step(iter(micro))
            step += 1
            samples = (consumed, consumed + global_batch)
            consumed += global_batch
            verdict = guard.after_step(result)
            summary.skipped_steps, summary.rollbacks = guard.counts["skipped"], guard.counts["rollbacks"]
            monitor.counters.update(tokens_seen=consumed * cfg.data.seq_len, skipped_steps=summary.skipped_steps,
                                    rollbacks=summary.rollbacks, skipped=int(result.skipped))
            summary.losses.append(result.loss)
            summary.grad_norms.append(result.grad_norm)
            summary.lrs.append(result.lr)
            summary.metrics.append(result.metrics)
            logger.step(step, result, time.perf_counter() - t0, step - start_step)
            if verdict.kind != "ok":  # one line; a rollback reloads the last checkpoint (launch/rollback.py)
                if saver is not None:
                    saver.wait()  # the newest checkpoint is complete before anything reloads it
                step, consumed = respond(verdict, step, samples, engine, layout, t.save_dir if save else None,
                                         skips, batches, logger.print, monitor.event)
                summary.diverged = guard.diverged(step)
                if summary.diverged:
                    logger.print(f"error: {summary.diverged}")
                    break
            if validator.due(step, last=step >= end):
                with logger.paused():  # the next step's time and throughput leave validation out
                    v = validator.run()
                monitor.valid(step, v)
                summary.valid_losses.append([step, v["valid_loss"]])
                summary.valid_metrics.append([step, v])
                extra = " | ".join(f"{k[6:].replace('_', ' ')} {x:.2f}" if k == "valid_ppl" else
                                   f"{k[6:].replace('_', ' ')} {x:.4f}" for k, x in v.items() if k != "valid_loss")
                logger.print(f"validation at step {step}: loss {v['valid_loss']:.4f} | {extra}")
            if on_step is not None:
                on_step(step)
            for kind in ("kill", "term", "wait-signal", "corrupt"):
                faults.at(kind, step)
            if boundary is None or step >= end:  # the last step is saved below anyway
                continue
            heart.beat(step, "boundary")
            decision = boundary.decide()  # the same on every rank
            if saver is not None:
                saver.poll()  # commits a finished background write (run.json, latest)
            if decision.stop_signal:
                summary.stop_signal = decision.stop_signal
                break
            interval = bool(t.save_interval) and step % t.save_interval == 0
            if interval or decision.timed_save:
                heart.beat(step, "save")
                reason = "interval" if interval else "timed"
                with logger.paused():
                    if saver is not None:
                        saver.save(cfg, layout, step, consumed, result.loss, reason=reason, extra=run_state())
                    else:
                        checkpoint.save(engine, cfg, layout, t.save_dir, step, consumed, result.loss,
                                        reason=reason, extra=run_state(),
                                        on_written=lambda s: faults.at("kill-saving", s))
                    _eval_tasks(tasks, step, False, heart, monitor, logger, summary)
                boundary.saved()
        summary.wall_time_s = time.perf_counter() - t0
        summary.steps = step - start_step
        summary.final_step = step
        summary.tokens_per_s = summary.steps * tokens_per_step / max(summary.wall_time_s, 1e-9)
        if saver is not None:
            heart.beat(step, "save")
            saver.wait()  # a background write still going is finished and committed first
        if save and summary.steps and not summary.diverged:  # a diverged state is not worth a checkpoint
            reason = signal_name(summary.stop_signal) if summary.stop_signal else "end"
            heart.beat(step, "save")
            summary.checkpoint = str(checkpoint.save(engine, cfg, layout, t.save_dir, step, consumed,
                                                     summary.losses[-1], reason=reason, extra=run_state(),
                                                     on_written=lambda s: faults.at("kill-saving", s)))
            if not summary.stop_signal:  # a preempted job has seconds left: save, don't evaluate
                _eval_tasks(tasks, step, True, heart, monitor, logger, summary)
        monitor.end(step, {"status": "diverged" if summary.diverged else (signal_name(summary.stop_signal)
                                                                          if summary.stop_signal else "done"),
                           "wall_time_s": round(summary.wall_time_s, 2)})
        dist.barrier()
    if summary.steps:
        first, last = summary.losses[0], summary.losses[-1]
        total = time.perf_counter() - _START
        lines = [f"done: {summary.steps} steps (to step {step} of {t.steps}), loss {first:.4f} -> {last:.4f}",
                 f"  training {fmt_duration(summary.wall_time_s)}, {fmt_count(summary.tokens_per_s)} tok/s; "
                 f"wall time including start-up {fmt_duration(total)}"]
        if summary.valid_losses:
            best = min(v for _, v in summary.valid_losses)
            lines.append(f"  validation loss {summary.valid_losses[-1][1]:.4f} at step {summary.valid_losses[-1][0]}"
                         f" (best {best:.4f})")
        if summary.skipped_steps or summary.rollbacks:
            lines.append(f"  {summary.skipped_steps} steps skipped, {summary.rollbacks} rollbacks (loss spikes / NaNs)")
        if summary.checkpoint:
            lines.append(f"  checkpoint {summary.checkpoint} (resumes automatically from {t.save_dir}/latest)")
        if summary.stop_signal:
            again = "run the same command" if summary.stop_signal == signal.SIGINT else "re-submit"
            lines.append(f"received {signal_name(summary.stop_signal)} at step {step}: saved checkpoint "
                         f"{summary.checkpoint}, exiting (status {exit_code_for(summary.stop_signal)}); "
                         f"{again} to resume")
        for line in lines:
            logger.print(line)
        if save and layout.rank == 0:
            _write_summary(cfg, layout, summary, total, lines)
    else:
        logger.print(f"nothing to do: the checkpoint in {t.save_dir} is already at step {step} of {t.steps}"
                     " (raise train.steps to continue)")
    return summary


def _eval_tasks(tasks, step: int, last: bool, heart, monitor, logger, summary: TrainSummary) -> None:
    """``train.eval_tasks`` on the checkpoint just saved, when due (launch/eval_in_training.py)."""
    if not tasks.enabled:
        return
    heart.beat(step, "eval tasks")
    out = tasks.after_save(step, last, beat=lambda: heart.beat(step, "eval tasks"))
    if out is None:
        return
    monitor.eval_tasks(step, out["scalars"])
    summary.eval_tasks.append([step, out["scalars"]])
    shown = " | ".join(f"{t} {m} {v:.4f}" for t, m, v, _ in out["rows"])
    logger.print(f"eval tasks at step {step}: {shown} ({out['seconds']:.1f} s; {out['path']})")


def _init_from(cfg: RunConfig, layout, save: bool):
    """``train.init_from``: (a function loading this rank's slices into the new model, the log line)."""
    spec = cfg.train.init_from
    if not spec:
        return None, None
    from megatron_llama import checkpoint
    from megatron_llama.checkpoint.init_from import describe_source, load_initial_weights
    from megatron_llama.checkpoint.init_tokenizer import plan_init_tokenizer
    # also when resuming: the run keeps the source's tokenizer (data.tokenizer is set to it when unset)
    plan = plan_init_tokenizer(cfg)
    if save and checkpoint.latest(cfg.train.save_dir) is not None:
        return None, f"train.init_from={spec} ignored: resuming from {cfg.train.save_dir}"

    def load(module):
        from megatron.core import parallel_state
        load_initial_weights(module, cfg.model, spec, parallel_state.get_tensor_model_parallel_rank(),
                             layout.tp, pipelined=layout.pp > 1, source_vocab=plan.source_vocab,
                             new_rows=cfg.train.init_new_rows, seed=cfg.train.seed)
    line = f"initialised from {describe_source(spec)}: weights only, fresh optimizer, step 0"
    if cfg.model.head == "score":
        from megatron_llama.checkpoint.init_from import source_head
        line += ("; score head from it" if source_head(spec) == "score" else
                 "; score head drawn from train.seed (the source has an LM head, not used)")
    return load, line + (f"\n  {plan.line}" if plan.line else "")


def _write_summary(cfg: RunConfig, layout, summary: TrainSummary, total_s: float, lines: list[str]) -> None:
    """``<save_dir>/summary.json`` and ``summary.txt``: what the run did, readable without tools."""
    import json
    from pathlib import Path
    root = Path(cfg.train.save_dir)
    root.mkdir(parents=True, exist_ok=True)
    info = {"layout": layout.describe(), "model": cfg.model.name, "steps": summary.steps,
            "final_step": summary.final_step, "first_loss": summary.losses[0], "final_loss": summary.losses[-1],
            "losses": summary.losses, "grad_norms": summary.grad_norms, "lrs": summary.lrs,
            "train_time_s": round(summary.wall_time_s, 2), "wall_time_s": round(total_s, 2),
            "tokens_per_s": round(summary.tokens_per_s, 1), "checkpoint": summary.checkpoint,
            "resumed_from": summary.resumed_from, "stop_signal": summary.stop_signal,
            "valid_losses": summary.valid_losses, "valid_metrics": summary.valid_metrics,
            "best_valid_loss": min((v for _, v in summary.valid_losses), default=None),
            "skipped_steps": summary.skipped_steps, "rollbacks": summary.rollbacks, "diverged": summary.diverged,
            "eval_tasks": summary.eval_tasks}
    (root / "summary.json").write_text(json.dumps(info, indent=2))
    (root / "summary.txt").write_text("\n".join(lines) + "\n")


def _supervise(nproc: int, argv: list[str], cfg: RunConfig) -> int:
    """Start ``nproc`` local ranks of this trainer under the restarting supervisor."""
    from .supervisor import supervise
    restarts = (f"restarts on failure or hang: up to {cfg.train.max_restarts}" if cfg.train.max_restarts
                else "no restarts (train.max_restarts=0)")
    print(f"mllama-train: no distributed launcher detected; starting {nproc} local processes "
          f"({restarts})", flush=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    return supervise(argv, nproc, cfg.train.max_restarts, cfg.train.restart_backoff_s,
                     log_dir=Path(cfg.train.save_dir) / "logs")


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: Optional[list[str]] = None) -> int:
    """The CLI; Ctrl-C before the training loop handles signals (start-up) is one line, status 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if _env_rank() == 0:
            print("mllama-train: interrupted (Ctrl-C) before training started: nothing was saved",
                  file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


def _main(argv: Optional[list[str]] = None) -> int:
    # before CUDA starts: expandable segments keep reserved memory near the allocated peak (no
    # fragmentation OOM on an 80 GB card where the tensors fit; the user's own setting wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from megatron_llama.config.paths import writable_dir
    from megatron_llama import checkpoint
    from . import exit_codes
    from .host_memory import check_async_save_memory
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mllama-train", usage=USAGE,
                                     description=__doc__.split("\n")[0].replace("``", ""),
                                     epilog=EPILOG + "\n" + exit_codes.HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE")
    parser.add_argument("--print-save-dir", action="store_true",
                        help="print the run's train.save_dir and exit (job scripts: the kill switch lives there)")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    in_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_save_dir:
            print(cfg.train.save_dir)
            return exit_codes.DONE
        if cfg.train.precision == "fp8":  # refuse before any process starts
            from megatron_llama.model import fp8
            fp8.check_supported()
        if cfg.train.objective == "dpo":  # its reference, before any process starts (and
            # before the tokenizer check: a reward model as the policy is the clearer line)
            from .reference_pass import check_policy_source
            check_policy_source(cfg)
        if cfg.train.init_from and not in_launcher:  # a tokenizer that does not fit: refused before anything is written
            from megatron_llama.checkpoint.init_tokenizer import plan_init_tokenizer
            _quiet_libraries()
            plan_init_tokenizer(cfg)  # may carry the source's tokenizer into data.tokenizer
        if not in_launcher and cfg.data.tokenizer is not None and not cfg.data.synthetic:
            from megatron_llama.data.tokenizer import load_tokenizer  # one line now, not from 8 processes
            load_tokenizer(cfg.data.tokenizer).check_fits(cfg.model.vocab_size)
        writable_dir(cfg.train.save_dir, "train.save_dir")  # before any step, not at the first save
        if cfg.train.eval_tasks and not in_launcher:  # before any process starts (the ranks check again)
            from .eval_tasks import check_tasks, include_paths
            check_tasks(cfg.train.eval_tasks, include_paths())
        checkpoint.check_run_dir(cfg.train.save_dir)
        if not in_launcher:
            n = processes_needed(cfg)
            validate_layout(cfg, n)
            check_async_save_memory(cfg, n, n, _has_cuda())
            return _supervise(n, [a for a in argv if a != "--print-save-dir"], cfg)
        validate_layout(cfg, int(os.environ["WORLD_SIZE"]))
        if "MLLAMA_ATTEMPT" not in os.environ:  # under another launcher (our supervisor checked already)
            check_async_save_memory(cfg, int(os.environ["WORLD_SIZE"]),
                                    int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _has_cuda())
        _quiet_libraries()
        summary = train(cfg)
    except ConfigError as e:
        if _env_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif in_launcher:
            # Every rank finds the same error; only rank 0 prints it. A launcher (torchrun,
            # deepspeed) SIGTERMs the others as soon as one rank exits, so the silent ranks wait
            # a moment: otherwise rank 0 could be killed before its line is out.
            time.sleep(BAD_INPUT_GRACE_S)
        return exit_codes.BAD_INPUT
    if summary is None:
        return exit_codes.FAILED
    if summary.diverged:
        return exit_codes.DIVERGED
    if summary.stop_signal:  # saved and stopped early: 128 + signal, like a shell (launch/signals.py)
        return exit_codes.for_signal(summary.stop_signal)
    return exit_codes.DONE


def _quiet_libraries() -> None:
    """Library start-up chatter (missing apex/TE, DeepSpeed info) is not for the user's console."""
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    logging.getLogger("megatron.core").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
