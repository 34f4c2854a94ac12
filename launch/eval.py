"""``mllama-eval CHECKPOINT --tasks T1,T2``: lm-evaluation-harness on a native checkpoint or an HF export.

* A native checkpoint (a step directory, or a run directory's ``latest``) is evaluated at the
  layout it was saved at: ``tp * pp`` ranks, started here like ``mllama-train`` starts its own
  (or under torchrun / srun). Our model sits behind lm-eval's ``LM`` interface
  (launch/eval_lm.py): exact log-likelihoods from the vocab-parallel head (the vocabulary is
  never gathered), greedy generation. Rank 0 runs lm-eval; the other ranks follow its batches
  (launch/eval_ranks.py).
* A Hugging Face directory (``mllama-convert native-to-hf`` output; it has ``config.json``) goes
  through lm-eval's own ``hf`` backend on the CPU in this process.

Tasks come from ``configs/eval_tasks`` (offline tasks over the shipped corpus), ``--include-path``
directories and lm-eval's built-ins. Nothing is downloaded: a task whose dataset is not already in
the Hugging Face cache is refused before any model is loaded (launch/eval_tasks.py).
Output: a table (task, metric, value, stderr) and a JSON file (``--output``).
Bad input (missing checkpoint or tokenizer, unknown task, a task needing the network, lm-eval not
installed) is one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_llama.config import ConfigError

EPILOG = """examples:
  mllama-eval runs/tiny-cpu-3d --tasks mllama_story_color,mllama_story_count
      # the run's latest checkpoint at its own TP x PP (starts tp*pp local processes)
  mllama-eval runs/tiny-cpu-3d/step0000120 --tasks mllama_story_color --limit 50 --output color.json
  mllama-eval hf/tiny --tasks mllama_story_color          # an exported HF directory, lm-eval's hf backend
  torchrun --nproc-per-node 4 -m launch.eval runs/tiny-cpu-3d --tasks mllama_story_count
  mllama-eval runs/7b --tasks hellaswag,arc_easy --include-path my_tasks/   # datasets already in the HF cache

the shipped offline tasks (configs/eval_tasks, regenerate with configs/eval_tasks/generate.py):
  mllama_story_color   multiple choice (acc): the colour of the animals in a corpus story
  mllama_story_count   greedy generation (exact_match): how many animals the story has
  mllama_corpus_ppl    rolling log-likelihood (word / byte perplexity, bits per byte) of corpus documents
  mllama_offline       all three
during training: train.eval_tasks=[mllama_story_color] train.eval_tasks_every=2 (every 2nd checkpoint)
exit status: 0 done, 1 failed, 2 bad input
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllama-eval", description=__doc__.split("\n")[0].replace("``", ""),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="native checkpoint (step dir or run dir) or HF directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--limit", type=int, default=0, help="items per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget when a task gives none")
    p.add_argument("--tokenizer", help="tokenizer file (native checkpoints; default: the one the run used)")
    p.add_argument("--include-path", action="append", default=[], help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="native backend: model dtype (auto: bf16 on GPU, fp32 on CPU); the hf backend runs fp32")
    p.add_argument("--output", help="results JSON (default: RUN_DIR/eval_tasks/stepN.json for a native "
                                    "checkpoint, DIR.eval.json beside an HF directory)")
    p.add_argument("--log-samples", action="store_true", help="also write every item's responses to the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "run.json").is_file() and not (path / "latest").is_file()


def _hf_tokenizer_check(path: Path) -> None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ConfigError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): export with the run's "
                          "tokenizer (mllama-convert native-to-hf ... --tokenizer tokenizer.model)")


def _native_tokenizer(ck, given: Optional[str]):
    from megatron_llama.data.run_tokenizer import run_tokenizer
    from megatron_llama.data.tokenizer import Tokenizer
    path = given or run_tokenizer(ck.config)
    if path is None:
        d = ck.config.data
        where = (f"the one its run trained into data.cache_dir={d.cache_dir} is gone" if d.corpus
                 else "its run recorded none (data.tokenizer unset)")
        raise ConfigError(f"checkpoint {ck.path} has no tokenizer: {where}; pass --tokenizer tokenizer.model")
    if not Path(path).is_file():
        raise ConfigError(f"tokenizer {path} of checkpoint {ck.path} does not exist: pass --tokenizer "
                          "with the tokenizer the model was trained with")
    tok = Tokenizer.load(path)
    if tok.vocab_size > ck.model.vocab_size:
        raise ConfigError(f"tokenizer {path} has {tok.vocab_size} ids but the model's vocabulary has only "
                          f"{ck.model.vocab_size}: pass the tokenizer the model was trained with")
    return path, tok


def _default_output(target: Path, step_dir: Optional[Path]) -> Path:
    if step_dir is not None:
        return step_dir.parent / "eval_tasks" / f"{step_dir.name}.json"
    return target.parent / f"{target.name}.eval.json"


def _report(args, results: dict, meta: dict, out: Path) -> None:
    from .eval_tasks import format_table, result_rows, write_results
    rows = result_rows(results)
    payload = {**meta, "tasks": args.tasks.split(","), "limit": args.limit or None,
               "rows": [{"task": t, "metric": m, "value": v, "stderr": s} for t, m, v, s in rows],
               "results": results.get("results"), "versions": results.get("versions"),
               "n-samples": results.get("n-samples")}
    if args.log_samples:
        payload["samples"] = {task: [{k: s.get(k) for k in ("doc_id", "target", "resps", "filtered_resps")}
                                     for s in items] for task, items in (results.get("samples") or {}).items()}
    print(format_table(rows), flush=True)
    print(f"results: {write_results(out, payload)}", flush=True)


def _eval_hf(args, path: Path, names: list[str], tm) -> int:
    from .eval_tasks import evaluate
    _hf_tokenizer_check(path)
    t0 = time.perf_counter()
    results = evaluate("hf", names, tm, args.limit, log_samples=args.log_samples, batch_size=args.batch_size,
                       progress=not args.no_progress,
                       model_args={"pretrained": str(path), "dtype": "float32", "device": "cpu"})
    meta = {"checkpoint": str(path), "backend": "hf", "seconds": round(time.perf_counter() - t0, 2)}
    _report(args, results, meta, Path(args.output) if args.output else _default_output(path, None))
    return 0


def _eval_native_rank(args, names: list[str]) -> int:
    """On every rank of the checkpoint's layout (RANK / WORLD_SIZE set)."""
    import torch

    from megatron_llama.checkpoint.init_from import load_initial_weights
    from megatron_llama.checkpoint.native_weights import open_native
    from pipelines.engine import resolve_dtype
    from pipelines.forward_only import ForwardOnly
    from pipelines.topology import build_topology, init_distributed
    from .eval_ranks import SharedForward
    from . import exit_codes

    ck = open_native(args.checkpoint)
    tok_path, tok = _native_tokenizer(ck, args.tokenizer)
    cfg = ck.config
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp = ck.tp, ck.pp, None
    cfg.train.compile = False  # every batch has another shape
    cfg.parallel.resolve_dp(int(os.environ["WORLD_SIZE"]))  # a world that is not tp*pp*N: one line
    device, _ = init_distributed(timeout_minutes=cfg.train.collective_timeout_s / 60)
    layout, topo = build_topology(cfg.parallel, cfg.train.seed, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or resolve_dtype("auto", device)
    module = build_model(cfg, layout, topo, dtype, device)
    from megatron.core import parallel_state
    load_initial_weights(module, cfg.model, str(ck.path), parallel_state.get_tensor_model_parallel_rank(),
                         layout.tp, pipelined=layout.pp > 1)
    shared = SharedForward(ForwardOnly(module, layout, cfg.model.hidden_size, device, cfg.parallel.sequence_parallel),
                           device)
    if layout.rank != 0:
        return shared.follow()
    from .eval_lm import NativeLM
    from .eval_tasks import check_tasks, evaluate
    t0 = time.perf_counter()
    with shared.leading():
        tm = check_tasks(names, _paths(args))
        lm = NativeLM(shared.score, tok, max_length=cfg.model.max_seq_len, batch_size=args.batch_size,
                      max_gen_toks=args.max_gen_toks, progress=not args.no_progress)
        results = evaluate(lm, names, tm, args.limit, log_samples=args.log_samples, progress=not args.no_progress)
    meta = {"checkpoint": str(ck.path), "backend": "native", "step": ck.step, "layout": layout.describe(),
            "tokenizer": tok_path, "dtype": str(dtype).replace("torch.", ""),
            "seconds": round(time.perf_counter() - t0, 2)}
    _report(args, results, meta, Path(args.output) if args.output else _default_output(ck.path, ck.path))
    return exit_codes.DONE


def build_model(cfg, layout, topo, dtype, device):
    """This rank's part of the model, randomly initialised (the weights are loaded next)."""
    if layout.pp > 1:
        import contextlib
        import io
        from pipelines.stages import build_pipeline_module
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's topology banner
            return build_pipeline_module(cfg, topo, dtype, device, layout.dp)
    from megatron_llama.model import LlamaModel
    return LlamaModel(cfg.model, cfg.parallel, dtype=dtype, device=device, seed=cfg.train.seed)


def _paths(args) -> list[str]:
    from .eval_tasks import include_paths
    return include_paths(args.include_path)


def _single_process_env() -> None:
    """A one-rank world in this process (TP1·PP1 checkpoints: no launcher, no second interpreter)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: Optional[list[str]] = None) -> int:
    from . import exit_codes
    args = _parser().parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore")  # megatron-core's "Apex not installed" at import, on every rank
    in_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.batch_size < 1 or args.limit < 0 or args.max_gen_toks < 1:
            raise ConfigError("--batch-size and --max-gen-toks must be >= 1, --limit >= 0")
        names = _task_names(args.tasks)
        if in_launcher:
            _quiet()
            return _eval_native_rank(args, names)
        target = Path(args.checkpoint)
        if not target.exists():
            raise ConfigError(f"{target} does not exist: pass a native checkpoint (run or step directory) "
                              "or an exported HF directory")
        from .eval_tasks import check_tasks
        if _is_hf_dir(target):
            _hf_tokenizer_check(target)
            return _eval_hf(args, target, names, check_tasks(names, _paths(args)))
        from megatron_llama.checkpoint.native_weights import open_native
        ck = open_native(target)  # before any process starts: a bad checkpoint is one line here
        _native_tokenizer(ck, args.tokenizer)
        check_tasks(names, _paths(args))
        nproc = ck.tp * ck.pp
        if nproc == 1:
            _single_process_env()
            _quiet()
            return _eval_native_rank(args, names)
        from .supervisor import supervise
        print(f"mllama-eval: {ck.path} was saved at TP{ck.tp}·PP{ck.pp}; starting {nproc} local processes",
              file=sys.stderr, flush=True)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        return supervise(argv if argv is not None else sys.argv[1:], nproc, 0, 0.0, module="launch.eval")
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        elif in_launcher:
            time.sleep(2.0)  # let rank 0's line out before a launcher stops the others
        return exit_codes.BAD_INPUT
    except Exception as e:  # inside lm-eval or the model: one line, the followers were released
        if rank == 0:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            print(f"error: evaluation failed: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        return exit_codes.FAILED


def _task_names(text: str) -> list[str]:
    from .eval_tasks import parse_tasks
    return parse_tasks(text)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _quiet() -> None:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    for name in ("DeepSpeed", "megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
