"""lm-evaluation-harness tasks: found, checked offline before anything runs, evaluated, reported.

* ``lm-eval`` is an optional extra (``pip install 'megatron-llama[eval]'``): nothing imports it
  until an evaluation is asked for, and then :func:`require_lm_eval` says how to install it.
* Offline always: ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` are set before ``datasets`` is
  imported, so a task is loaded from local files or the Hugging Face cache, never downloaded.
  :func:`check_tasks` loads every task before any model is built; a name lm-eval does not know, or
  a task whose dataset is only on the Hub, is a ConfigError (one line). Fetch such a dataset into
  the cache beforehand (``datasets.load_dataset(...)`` on a machine with network) to use it.
* Tasks are looked up in ``configs/eval_tasks`` (the shipped offline tasks) and the
  ``--include-path`` directories first; lm-eval's own index of built-in tasks (about 10 s to
  build) only when a name is not found there.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Optional

from megatron_llama.config import ConfigError

SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "configs" / "eval_tasks"
INSTALL = "pip install 'megatron-llama[eval]' (lm-eval==0.4.13)"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"evaluation needs lm-evaluation-harness, which is not installed: {INSTALL}") from None


def force_offline() -> None:
    """No hub access from here on (also for a ``datasets`` already imported)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys
    if "datasets" in sys.modules:
        import datasets
        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True


def quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def include_paths(extra: list[str] = ()) -> list[str]:
    paths = [str(SHIPPED_TASKS)] if SHIPPED_TASKS.is_dir() else []
    for p in extra:
        if not Path(p).is_dir():
            raise ConfigError(f"--include-path {p} is not a directory: pass a directory of lm-eval task YAMLs")
        paths.append(str(Path(p).resolve()))
    return paths


_MANAGERS: dict = {}


def task_manager(names: list[str], paths: list[str]):
    """A TaskManager that knows every name: the local one if it does, else one with the built-ins too."""
    from lm_eval.tasks import TaskManager
    key = tuple(paths)
    local = _MANAGERS.get((key, False))
    if local is None:
        local = _MANAGERS[(key, False)] = TaskManager(include_path=paths or None, include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    full = _MANAGERS.get((key, True))
    if full is None:
        full = _MANAGERS[(key, True)] = TaskManager(include_path=paths or None)
    return full


def parse_tasks(text) -> list[str]:
    names = text if isinstance(text, list) else str(text).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ConfigError("no lm-eval tasks given: e.g. --tasks mllama_story_color,mllama_story_count")
    return names


def check_tasks(names: list[str], paths: list[str]):
    """Every task exists and loads offline; returns the TaskManager. ConfigError (one line) otherwise."""
    require_lm_eval()
    force_offline()
    quiet_lm_eval()
    tm = task_manager(names, paths)
    for name in names:
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"lm-eval has no task {name!r}{hint}: `lm-eval ls tasks` lists them; local task YAMLs "
                              f"go in {SHIPPED_TASKS} or a directory passed with --include-path")
    for name in names:
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                tm.load([name])
        except Exception as e:  # lm-eval / datasets raise many kinds; the first line says which dataset
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if isinstance(e, ConnectionError) or "offline" in msg.lower() or "hub" in msg.lower():
                raise ConfigError(f"lm-eval task {name} needs its dataset from the Hugging Face Hub ({msg}); "
                                  "mllama-eval never downloads: put it in the HF cache first (datasets.load_dataset "
                                  "on a machine with network) or use a local task (configs/eval_tasks)") from None
            raise ConfigError(f"lm-eval task {name} cannot be loaded: {type(e).__name__}: {msg}") from None
    return tm


@contextlib.contextmanager
def _own_random_state():
    """lm-eval seeds Python's, NumPy's and torch's global generators; a training run keeps its own."""
    import numpy as np
    import torch
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


def evaluate(lm, names: list[str], tm, limit: Optional[int] = None, model_args: Optional[dict] = None,
             log_samples: bool = False, batch_size: Optional[int] = None, progress: bool = True) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm`` (an ``LM`` object, or a model type name such as ``"hf"``
    with ``model_args``); returns its results dict (``results``, ``samples`` with ``log_samples``).
    Without ``progress`` lm-eval's own progress bars (stderr) are not shown."""
    from lm_eval import simple_evaluate
    force_offline()
    quiet_lm_eval()
    devnull = open(os.devnull, "w")
    bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(devnull)
    with _own_random_state(), contextlib.redirect_stdout(devnull), bars, devnull:
        out = simple_evaluate(model=lm, model_args=model_args, tasks=names, task_manager=tm, limit=limit or None,
                              log_samples=log_samples, batch_size=batch_size, bootstrap_iters=1000)
    if out is None:
        raise RuntimeError("lm-eval returned no results")
    return out


def result_rows(results: dict) -> list[tuple[str, str, float, Optional[float]]]:
    """``(task, metric, value, stderr)`` for every task and metric lm-eval reported."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            # metrics are "name,filter"; other keys ("alias", "sample_len") describe the task
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            name = metric if filt in ("none", "") else f"{metric} ({filt})"
            rows.append((task, name, float(value), stderr))
    return rows


def format_table(rows) -> str:
    head = ("task", "metric", "value", "stderr")
    body = [(t, m, f"{v:.4f}", "" if s is None or not math.isfinite(s) else f"±{s:.4f}") for t, m, v, s in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, body)])


def scalars(rows) -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` for the run's loggers."""
    return {f"eval/{t}/{m.replace(' ', '_')}": v for t, m, v, _ in rows}


def write_results(path: str | os.PathLike, payload: dict) -> Path:
    """JSON written atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
    except ImportError:
        pass
    return str(value)
