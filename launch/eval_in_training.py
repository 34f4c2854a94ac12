"""``train.eval_tasks``: lm-evaluation-harness tasks on the checkpoints a run saves.

After every ``train.eval_tasks_every``-th checkpoint (and after the last one) the trained model is
evaluated in place, at the run's layout, with the weights just saved: the live modules (no
reload), rank 0 driving lm-eval and every other rank following its batches (launch/eval_ranks.py,
pipelines/forward_only.py). Results go where the validation loss goes: one ``eval_tasks`` record
in ``metrics.jsonl``, ``eval/<task>/<metric>`` scalars to TensorBoard / wandb, a console line, and
``<save_dir>/eval_tasks/stepN.json`` (the same file ``mllama-eval`` writes).

Cost: every rank is held for the forward passes of the items (one per choice for multiple
choice; one per generated token for generation, no KV cache) plus lm-eval's task setup on rank 0
(under a second for the shipped tasks); data-parallel replicas compute the same batches (the
wall time is one replica's). ``train.eval_tasks_limit`` caps the items per task.
The tasks and the tokenizer are checked once at start-up (rank 0; the error reaches every rank):
an unknown task, one needing the network, or a run without a tokenizer stops before step 1.
An evaluation that fails later is one ``warning:`` line; training goes on. A save on SIGTERM /
SIGUSR1 (preemption: little time left) is not evaluated.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch.distributed as dist

from megatron_llama.config import ConfigError


class TaskEvaluator:
    def __init__(self, cfg, layout, engine, device, on: bool = True):
        self.cfg, self.layout, self.engine, self.device = cfg, layout, engine, device
        t = cfg.train
        self.names = list(t.eval_tasks) if on else []
        self.saves = 0
        self.tm = self.tokenizer = None
        if not self.names:
            return
        if cfg.parallel.zero_stage == 3:
            raise ConfigError("train.eval_tasks with parallel.zero_stage=3 is not supported (the module holds no "
                              "full weights): use zero_stage 1 or 2, or evaluate exported checkpoints with mllama-eval")
        problem = [None]
        if layout.rank == 0:
            try:
                self._prepare()
            except ConfigError as e:
                problem = [str(e)]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise ConfigError(problem[0])

    def _prepare(self) -> None:
        from megatron_llama.data.run_tokenizer import run_tokenizer
        from megatron_llama.data.tokenizer import Tokenizer
        from .eval_tasks import check_tasks, include_paths
        self.tm = check_tasks(self.names, include_paths())
        path = run_tokenizer(self.cfg)
        if path is None:
            raise ConfigError("train.eval_tasks needs the run's tokenizer, and this run has none (synthetic data?): "
                              "set data.tokenizer or drop train.eval_tasks")
        self.tokenizer = Tokenizer.load(path)

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def describe(self) -> str:
        t = self.cfg.train
        every = "every checkpoint" if t.eval_tasks_every == 1 else f"every {t.eval_tasks_every}th checkpoint"
        items = f"{t.eval_tasks_limit} items each" if t.eval_tasks_limit else "all items"
        return f"lm-eval tasks {', '.join(self.names)} ({items}) on {every} and the last"

    def after_save(self, step: int, last: bool, beat: Callable[[], None]) -> Optional[dict]:
        """Every rank, right after a checkpoint of ``step``: evaluates when due. Returns on rank 0
        ``{"rows": [...], "scalars": {...}, "seconds", "path"}`` (None when not due, on the other
        ranks, or when the evaluation failed: a warning line is printed then)."""
        if not self.enabled:
            return None
        self.saves += 1
        if not (last or self.saves % self.cfg.train.eval_tasks_every == 0):
            return None
        from pipelines.forward_only import ForwardOnly
        from .eval_ranks import SharedForward
        module = self.engine.engine.module  # LlamaModel, or this rank's PipelineModule stage
        forward = ForwardOnly(module, self.layout, self.cfg.model.hidden_size, self.device,
                              self.cfg.parallel.sequence_parallel)
        shared = SharedForward(forward, self.device, on_batch=beat)
        if self.layout.rank != 0:
            shared.follow()
            return None
        t0 = time.perf_counter()
        try:
            with shared.leading():
                results = self._evaluate(shared)
        except Exception as e:  # the followers were released by leading(); training goes on
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            print(f"warning: lm-eval tasks at step {step} failed ({type(e).__name__}: {msg}); training goes on",
                  flush=True)
            return None
        return self._record(step, results, time.perf_counter() - t0)

    def _evaluate(self, shared) -> dict:
        from .eval_lm import NativeLM
        from .eval_tasks import evaluate
        t = self.cfg.train
        lm = NativeLM(shared.score, self.tokenizer, max_length=self.cfg.model.max_seq_len,
                      batch_size=max(8, t.micro_batch_size), progress=False)
        return evaluate(lm, self.names, self.tm, t.eval_tasks_limit or None, progress=False)

    def _record(self, step: int, results: dict, seconds: float) -> dict:
        from pathlib import Path
        from megatron_llama.checkpoint import tag_for
        from .eval_tasks import result_rows, scalars, write_results
        rows = result_rows(results)
        path = Path(self.cfg.train.save_dir) / "eval_tasks" / f"{tag_for(step)}.json"
        write_results(path, {"step": step, "backend": "native (in training)", "layout": self.layout.describe(),
                             "tasks": self.names, "limit": self.cfg.train.eval_tasks_limit or None,
                             "seconds": round(seconds, 2),
                             "rows": [{"task": t, "metric": m, "value": v, "stderr": s} for t, m, v, s in rows],
                             "results": results.get("results"), "versions": results.get("versions")})
        return {"rows": rows, "scalars": {**scalars(rows), "eval/seconds": round(seconds, 2)},
                "seconds": seconds, "path": str(path)}
