"""``mllama-convert reshard CKPT OUT --tp T --pp P [--dp D] [--zero-stage Z]``: continue a run at
another TP x PP x DP layout with its model AND optimizer state.

CKPT is a run directory (its newest complete checkpoint is taken) or one of its ``stepN/``.
OUT becomes a run directory holding one checkpoint of the same step for the new layout
(fp32 master weights, Adam moments and step count, LR scheduler, consumed samples); resume it
by pointing the new run at it::

    mllama-convert reshard runs/llama-7b runs/llama-7b-tp4 --tp 4 --pp 1 --dp 2
    mllama-train configs/llama-7b.yaml parallel.tp=4 parallel.pp=1 parallel.dp=2 \\
        train.grad_accum_steps=<printed by reshard> train.save_dir=runs/llama-7b-tp4

The global batch (micro batch x grad accumulation x DP) is kept: reshard prints the
``train.grad_accum_steps`` that does so at the new DP, and then the run reads exactly the
samples the uninterrupted run would have read (the sampler is a pure function of the
consumed samples, the DP rank and the DP size).

Streaming: one parameter (weights + two moments, fp32) in memory at a time;
the input shards are memory-mapped. Output is written under a temporary name and renamed at
the end, so an interrupted or failed reshard leaves nothing behind; a SIGKILLed one leaves
``.OUT.reshard-PID@HOST.tmp``, which the next reshard into the same directory removes once that
process is gone (never one of a live process).
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path

from megatron_llama.config import ConfigError, ParallelConfig

EXAMPLES = """examples:
  mllama-convert reshard runs/tiny runs/tiny-tp1 --tp 1 --pp 1 --dp 1
  mllama-convert reshard runs/llama-7b/step0001000 runs/llama-7b-dp4 --tp 2 --pp 1 --dp 4 --zero-stage 2
then resume with the new layout:  mllama-train RUN.yaml parallel.tp=.. parallel.pp=.. parallel.dp=..
                                  train.grad_accum_steps=.. train.save_dir=OUT"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="run directory (newest checkpoint) or a stepN/ directory in it")
    p.add_argument("out", metavar="OUT", help="new run directory to create (train.save_dir of the resumed run)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the new layout")
    p.add_argument("--pp", type=int, required=True, help="pipeline-parallel size of the new layout")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: the checkpoint's)")
    p.add_argument("--zero-stage", type=int, default=None, choices=(1, 2),
                   help="ZeRO stage of the new run (default: the checkpoint's; 2 needs --pp 1)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")


def new_run_meta(ckpt, tp: int, pp: int, dp: int, zero_stage: int) -> tuple[dict, int]:
    """``run.json`` of the resharded checkpoint and the grad accumulation that keeps the global
    batch. Raises ConfigError for a layout the model cannot take."""
    from megatron_llama.config.load import config_from_dict

    cfg = ckpt.cfg
    par = ParallelConfig(tp=tp, pp=pp, dp=dp, zero_stage=zero_stage,
                         partition_method=cfg.parallel.partition_method,
                         activation_checkpointing=cfg.parallel.activation_checkpointing)
    par.check_model(cfg.model)
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * ckpt.dp
    if global_batch % (t.micro_batch_size * dp):
        raise ConfigError(f"--dp {dp} does not divide the global batch {global_batch} in micro-batches of "
                          f"{t.micro_batch_size}: choose a DP that divides {global_batch // t.micro_batch_size}")
    grad_accum = global_batch // (t.micro_batch_size * dp)
    tree = copy.deepcopy(ckpt.meta["config"])
    tree["parallel"].update(tp=tp, pp=pp, dp=dp, zero_stage=zero_stage)
    tree["train"].update(grad_accum_steps=grad_accum, global_batch_size=global_batch)
    config_from_dict(copy.deepcopy(tree))  # the new config must validate like a run's
    meta = dict(ckpt.meta, config=tree,
                layout={"tp": tp, "pp": pp, "dp": dp, "world_size": tp * pp * dp},
                resharded_from={"path": str(ckpt.path.resolve()), "tp": ckpt.tp, "pp": ckpt.pp, "dp": ckpt.dp},
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"), reason="reshard")
    return meta, grad_accum


def reshard(ckpt_path: str, out: str, tp: int, pp: int, dp=None, zero_stage=None, force: bool = False,
            progress: bool = True) -> Path:
    """Write the resharded run directory ``out`` (see the module doc); returns its checkpoint."""
    from tqdm import tqdm

    from megatron_llama.checkpoint import LATEST, tag_for
    from megatron_llama.checkpoint.optimizer_state import open_native
    from megatron_llama.checkpoint.params import param_table
    from megatron_llama.checkpoint.resharded import write_store

    from .output_dir import owned_name, remove_dead

    ckpt = open_native(ckpt_path)
    dp = ckpt.dp if dp is None else dp
    zero_stage = ckpt.cfg.parallel.zero_stage if zero_stage is None else zero_stage
    if tp < 1 or pp < 1 or dp < 1:
        raise ConfigError(f"--tp, --pp and --dp must be >= 1 (got {tp}, {pp}, {dp})")
    if zero_stage not in (1, 2):
        raise ConfigError(f"--zero-stage {zero_stage}: resharding carries ZeRO stage 1 or 2 optimizer state")
    meta, grad_accum = new_run_meta(ckpt, tp, pp, dp, zero_stage)
    dest = Path(out)
    if dest.exists() and not force:
        raise ConfigError(f"{dest} exists: choose a new OUT directory or pass --force to replace it")
    if dest.resolve() == Path(ckpt_path).resolve() or dest.resolve() in ckpt.path.resolve().parents:
        raise ConfigError(f"OUT {dest} is the checkpoint being read: choose another directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_dead(dest.parent, "reshard", ".tmp")
    tmp = Path(f"{owned_name(dest, 'reshard')}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tag = tag_for(ckpt.step)
    total = sum(3 * 4 * _numel(r.shape) for r in param_table(ckpt.cfg.model, ckpt.tp))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="reshard", disable=not progress)
    try:
        (tmp / tag).mkdir(parents=True)
        write_store(ckpt, tmp / tag, meta, on_param=lambda name, nbytes: bar.update(nbytes))
        (tmp / LATEST).write_text(tag)
        bar.close()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new = f"TP{tp}·PP{pp}·DP{dp}"
    print(f"resharded {ckpt.path} (TP{ckpt.tp}·PP{ckpt.pp}·DP{ckpt.dp}, step {ckpt.step}) -> {dest / tag} ({new}, "
          f"ZeRO-{zero_stage}); resume with:\n  mllama-train RUN.yaml parallel.tp={tp} parallel.pp={pp} "
          f"parallel.dp={dp} parallel.zero_stage={zero_stage} train.grad_accum_steps={grad_accum} "
          f"train.save_dir={dest}")
    return dest / tag


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _quiet() -> None:
    """DeepSpeed's and torch's import-time chatter is not for this tool's console (it runs on CPU)."""
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    _quiet()
    try:
        reshard(args.ckpt, args.out, args.tp, args.pp, args.dp, args.zero_stage, args.force,
                progress=not args.quiet)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mllama-convert reshard", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
