"""Every repository path the docs and the ``--help`` texts name exists: ``configs/...yaml``,
``data/...``, ``bench/...`` and source files, in README.md, the other Markdown docs, the comments
of the shipped configs, the docstrings of the sources (for ``configs/...yaml``) and the ``--help``
of every console script in setup.py and of each of its subcommands (run in this process).
Files a command is told to write (``--out PATH``) are outputs and not looked for."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = ("configs", "data", "bench", "launch", "tests", "megatron_llama", "pipelines", "checkpoints_tools")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(TOP)})/[\w./*-]*[\w*])")
OUTPUT = re.compile(r"(?:--out|--output|-o)[ =]+(\S+)")
CONFIG = re.compile(r"(?<![\w/.-])(configs/[\w./-]+\.ya?ml)")


def named_paths(text: str, pattern: re.Pattern = PATH) -> set[str]:
    outputs = set(OUTPUT.findall(text))
    return {p.rstrip(".") for p in pattern.findall(text)} - outputs


def missing(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()))


def _run_help(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None), f"{argv}: exit {done.value.code}"
    return out.getvalue()


def help_texts() -> dict[str, str]:
    """``{"mllama-x [sub]": its --help}`` for every console script of setup.py and its subcommands."""
    scripts = re.findall(r'"(mllama-[\w-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
    assert len(scripts) >= 6, scripts
    made: list[argparse.ArgumentParser] = []
    init = argparse.ArgumentParser.__init__

    def recording(self, *a, **k):  # which parsers (and so which subcommands) a script builds
        init(self, *a, **k)
        made.append(self)
    texts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "__init__", recording)
        for name, module, fn in scripts:
            main = getattr(importlib.import_module(module), fn)
            made.clear()
            texts[name] = _run_help(main, ["--help"])
            subs = [a for p in list(made) for a in p._actions if isinstance(a, argparse._SubParsersAction)]
            for action in subs:
                for sub in action.choices:
                    texts[f"{name} {sub}"] = _run_help(main, [sub, "--help"])
    return texts


def _docs() -> list[Path]:
    """The repository's Markdown docs (top level and one folder down), not hidden folders' copies."""
    return [p for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("*/*.md"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_the_checker_sees_a_dangling_path():
    text = "mllama-train configs/7b.yaml; python bench/convert_memory.py --out bench/results/new.json"
    assert named_paths(text) == {"configs/7b.yaml", "bench/convert_memory.py"}
    assert missing(named_paths(text)) == ["configs/7b.yaml"]


def test_paths_in_docs_and_help_exist():
    docs = {str(p.relative_to(ROOT)): p.read_text() for p in _docs()}
    texts = dict(docs, **help_texts())
    assert {"mllama-convert reshard", "mllama-convert native-to-hf", "mllama-tokenizer train"} <= set(texts)
    assert "README.md" in texts
    found = {where: missing(named_paths(text)) for where, text in texts.items()}
    sources = [p for top in ("configs", "checkpoints_tools", "launch", "megatron_llama", "pipelines", "bench")
               for p in sorted((ROOT / top).rglob("*")) if p.suffix in (".py", ".yaml", ".sbatch", ".sh")]
    found.update({str(p.relative_to(ROOT)): missing(named_paths(p.read_text(), CONFIG)) for p in sources})
    dangling = {where: paths for where, paths in found.items() if paths}
    assert not dangling, f"paths named but not in the repository: {dangling}"


WRITES = re.compile(r"mllama-convert (?:hf-to-native|native-to-hf|meta-to-native|reshard) \S+ ([\w./-]+)"
                    r"|save_dir[=:] *([\w./-]+)|--output[ =]([\w./-]+)")


def test_outputs_the_docs_write_are_git_ignored():
    """What the README's commands write (hf/tiny, ckpt/..., runs/...) stays out of `git status`."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    texts = [p.read_text() for p in _docs() + sorted(ROOT.glob("configs/*.yaml"))]
    outputs = {next(g for g in m if g) for t in texts for m in WRITES.findall(t)}
    outputs = {o for o in outputs if not o.startswith(("/", "bench/", "OUT", "NEW"))}
    assert {"hf/tiny", "ckpt/llama2-7b-tp2pp2", "runs/llama-7b-tp4"} <= outputs, outputs
    res = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=ROOT, capture_output=True, text=True)
    ignored = set(res.stdout.split())
    assert ignored == outputs, f"written by documented commands but not in .gitignore: {sorted(outputs - ignored)}"
