"""The native checkpoint format: library code used by ``launch/`` (training) and
``checkpoints_tools/`` (conversion), neither of which imports the other.

``directory``: the run directory protocol (``stepN/``, ``run.json`` marker, ``latest``, atomic
saves, pruning, choosing the checkpoint to resume).
"""
from .directory import (LATEST, META, TMP_SUFFIX, complete_checkpoints, latest, prune, resume, save,
                        tag_for)

__all__ = ["LATEST", "META", "TMP_SUFFIX", "complete_checkpoints", "latest", "prune", "resume", "save",
           "tag_for"]
