"""The native checkpoint format: library code used by ``launch/`` (training) and
``checkpoints_tools/`` (conversion), neither of which imports the other.

``directory``: the run directory protocol (``stepN/``, ``run.json`` marker, ``latest``, atomic
saves, pruning, choosing the checkpoint to resume); ``params``: the parameter table;
``integrity``: file sizes and checksums; ``native_weights`` / ``hf_source`` / ``optimizer_state`` /
``resharded`` / ``init_from``: readers and writers used by conversion, resharding and init_from.
"""
from .directory import (LATEST, META, TMP_SUFFIX, check_run_dir, complete_checkpoints, latest, prune,
                        resume, save, tag_for)

__all__ = ["LATEST", "META", "TMP_SUFFIX", "check_run_dir", "complete_checkpoints", "latest", "prune", "resume", "save",
           "tag_for"]
