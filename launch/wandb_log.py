"""Weights & Biases logging of the per-step metrics (rank 0 only), when ``train.wandb_project`` is set.

* The run's config is the resolved ``config_to_dict(cfg)`` plus the layout.
* ``WANDB_MODE`` (``offline``, ``disabled``), ``WANDB_DIR``, ``WANDB_ENTITY`` and the API key come
  from the environment, as wandb reads them itself.
* A resumed job logs into the same wandb run: its id is kept in ``<save_dir>/wandb_run_id``.
* wandb is optional: if it is not installed or ``wandb.init`` fails (no API key, no network), one
  ``warning:`` line is printed and training goes on without it; a failing ``log`` does the same.
"""
from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from megatron_llama.config import config_to_dict

RUN_ID_FILE = "wandb_run_id"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class WandbLogger:
    """``log(step, metrics)`` and ``finish()``; does nothing when disabled or when init failed."""

    def __init__(self, cfg, layout, enabled: bool, persist_id: bool = True,
                 warn: Optional[Callable[[str], None]] = None):
        self.run = None
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        project = cfg.train.wandb_project
        if not (enabled and project):
            return
        try:
            import wandb
            run_id = self._run_id(Path(cfg.train.save_dir)) if persist_id else None
            config = config_to_dict(cfg)
            config["layout"] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": layout.world_size}
            self.run = wandb.init(project=project, name=Path(cfg.train.save_dir).name, id=run_id,
                                  resume="allow" if run_id else None, config=config,
                                  settings=wandb.Settings(console="off", quiet=True))
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            self.run = None
            self.warn(f"warning: wandb logging disabled, wandb.init failed ({_one_line(e)}); training continues")

    @staticmethod
    def _run_id(save_dir: Path) -> str:
        path = save_dir / RUN_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]  # wandb ids: [a-z0-9], unique per project
        save_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def log(self, step: int, metrics: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:  # noqa: BLE001
            self.warn(f"warning: wandb logging disabled, log failed ({_one_line(e)}); training continues")
            self.finish(exit_code=1)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
                # Stop wandb's service process too: its writer may hold the last records until the
                # service exits, and a trainer embedded in a longer-lived process (a notebook, the
                # test pool) would otherwise leave the offline run file incomplete.
                import wandb
                wandb.teardown(exit_code=exit_code)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    @property
    def sink(self) -> Optional[Callable[[int, dict], None]]:
        return self.log if self.run is not None else None
