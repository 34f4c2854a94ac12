"""The native checkpoint format: library code used by ``launch/`` (training) and
``checkpoints_tools/`` (conversion), neither of which imports the other.

``directory``: the run directory protocol (``stepN/``, ``run.json`` marker, ``latest``, atomic
saves, pruning, choosing the checkpoint to resume); ``params``: the parameter table;
``integrity``: file sizes and checksums (``crc32``: hashed by several threads); ``mapped_load``: the GPU load hook; ``native_weights`` / ``hf_source`` / ``optimizer_state`` /
``resharded`` / ``init_from``: readers and writers used by conversion, resharding and init_from;
``formats``: ``resume`` with a loader for every format (DeepSpeed's own and the reshard store).

The modules import each other as a tree (tests/test_checkpoint_imports.py): ``params`` and
``integrity`` at the bottom, then ``directory``, the readers, and the stores and ``formats`` on top.
"""
from .directory import LATEST, META, TMP_SUFFIX, check_run_dir, complete_checkpoints, latest, prune, save, tag_for
from .formats import resume

__all__ = ["LATEST", "META", "TMP_SUFFIX", "check_run_dir", "complete_checkpoints", "latest", "prune", "resume", "save",
           "tag_for"]
