"""``mllama-plot RUN_DIR``: PNGs of a run and a short text report, from the run's own ``metrics.jsonl``.

    mllama-plot runs/tiny-cpu-3d                 # -> runs/tiny-cpu-3d/plots/*.png + report.txt
    mllama-plot runs/llama-7b --out /tmp/plots   # somewhere else

Needs only the run directory (``train.save_dir``): no wandb, no TensorBoard. Works on a run that
is still going or that crashed (the trainer appends one JSON line per step as it goes). Writes
``loss.png`` (training and validation loss; skipped steps as red crosses, rollbacks as dashed
lines), ``lr.png``, ``grad_norm.png``, ``throughput.png`` (tokens/s and TFLOP/s per GPU),
``memory.png``, and ``report.txt`` (also printed): steps, tokens, time, best validation loss,
skipped steps, rollbacks, restarts.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from .run_log import FILE, read_records


def _segments(records: list[dict]) -> list[list[dict]]:
    """Training records split where the step goes back (a rollback or a resume from an older
    checkpoint), so lines are never drawn backwards."""
    out: list[list[dict]] = []
    for r in records:
        if not out or r["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(r)
    return out


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def report(records: list[dict], run_dir: str) -> list[str]:
    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid" and isinstance(r.get("valid_loss"), float)]
    starts = [r for r in records if r["type"] == "start"]
    ends = [r for r in records if r["type"] == "end"]
    events = [r for r in records if r["type"] == "event"]
    lines = [f"run {run_dir}"]
    if not train:
        return lines + ["  no training steps recorded yet"]
    total = starts[-1].get("total_steps") if starts else None
    last = train[-1]
    repeated = len(train) - last["step"]  # steps run again after a rollback or a resume from an older checkpoint
    lines.append(f"  steps: {last['step']}" + (f" of {total}" if total else "")
                 + (f" ({len(train)} optimizer steps run, {repeated} of them repeated)" if repeated > 0 else ""))
    lines.append(f"  tokens seen: {_fmt_count(last.get('tokens_seen', 0))}")
    # time actually training: per invocation, first to last record (start-up excluded)
    busy = sum(seg[-1]["time"] - seg[0]["time"] + seg[0].get("step_time_s", 0) for seg in _by_invocation(records))
    lines.append(f"  training time: {_fmt_duration(busy)} over {len(starts)} invocation(s); "
                 f"{len(starts) - 1} restart(s)/resume(s)")
    tok_s = _finite(r.get("tokens_per_s") for r in train)
    tflops = _finite(r.get("tflops_per_gpu") for r in train)
    if tok_s:
        med = sorted(tok_s)[len(tok_s) // 2]
        lines.append(f"  throughput (median): {_fmt_count(med)} tokens/s, "
                     f"{sorted(tflops)[len(tflops) // 2]:.3g} TFLOP/s per GPU")
    mem = _finite(r.get("mem_gib") for r in train)
    if mem:
        lines.append(f"  peak memory: {max(mem):.2f} GiB")
    lines.append(f"  training loss: first {train[0]['loss']:.4f}, last {last['loss']:.4f}")
    if valid:
        best = min(valid, key=lambda r: r["valid_loss"])
        what = (f"ppl {best['valid_ppl']:.2f}" if "valid_ppl" in best  # pair objectives report no perplexity
                else f"accuracy {best.get('valid_accuracy', float('nan')):.3f}")
        lines.append(f"  validation loss: best {best['valid_loss']:.4f} ({what}) at step "
                     f"{best['step']}; last {valid[-1]['valid_loss']:.4f} at step {valid[-1]['step']}")
    else:
        lines.append("  validation loss: none recorded (set data.valid_fraction or data.valid_sources)")
    nonfinite = sum(e.get("kind") == "nonfinite" for e in events)
    spikes = sum(e.get("kind") == "spike" for e in events)
    skipped = sum(e.get("action") == "skip" for e in events)
    rollbacks = sum(e.get("action") == "rollback" for e in events)
    lines.append(f"  NaN/Inf steps: {nonfinite}; loss spikes: {spikes}; skipped steps: {skipped}; rollbacks: {rollbacks}")
    for e in events[-5:]:
        lines.append(f"    {e.get('line', e)}")
    status = ends[-1]["status"] if ends and ends[-1]["time"] >= last["time"] else "running or crashed (no end record)"
    lines.append(f"  status: {status}")
    return lines


def _by_invocation(records: list[dict]) -> list[list[dict]]:
    out: list[list[dict]] = []
    for r in records:
        if r["type"] == "start" or not out:
            out.append([])
        if r["type"] == "train":
            out[-1].append(r)
    return [seg for seg in out if seg]


def _figure(title: str, ylabel: str):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _series(ax, segments, key: str, color: str, label: str, skipped_marks: bool = False) -> None:
    labelled = False
    for seg in segments:
        pts = [(r["step"], r[key]) for r in seg if isinstance(r.get(key), (int, float))
               and math.isfinite(r[key]) and not (skipped_marks and r.get("skipped"))]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=1.4, label=None if labelled else label)
            labelled = True


def _mark_events(ax, events: list[dict], top: float) -> None:
    skips = events
    if skips:
        ax.scatter([e["step"] for e in skips],
                   [min(e["loss"], top) if isinstance(e.get("loss"), float) and math.isfinite(e["loss"]) else top
                    for e in skips], marker="x", color="red", s=60, zorder=5,
                   label="NaN / loss spike (off-scale: at the top)")
    for i, e in enumerate(e for e in events if e.get("action") == "rollback"):
        ax.axvline(e["step"], color="purple", ls="--", lw=1, label="rollback" if i == 0 else None)


def plot(records: list[dict], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid"]
    events = [r for r in records if r["type"] == "event"]
    segments = _segments(train)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    # loss: the axis follows the accepted steps so one spike does not flatten the curve
    fig, ax = _figure("Loss", "loss (mean token cross-entropy)")
    _series(ax, segments, "loss", "tab:blue", "training loss", skipped_marks=True)
    good = sorted(_finite(r["loss"] for r in train if not r.get("skipped")) + _finite(r.get("valid_loss") for r in valid))
    if good:
        lo, hi = good[0], good[min(len(good) - 1, int(0.995 * len(good)))]
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + 4 * pad)
        _mark_events(ax, events, hi + 3.5 * pad)
    vpts = [(r["step"], r["valid_loss"]) for r in valid if _finite([r.get("valid_loss")])]
    if vpts:
        ax.plot(*zip(*vpts), "o-", color="tab:orange", lw=1.4, ms=5, label="validation loss")
    ax.legend(loc="best", framealpha=0.85)
    save(fig, "loss.png")

    fig, ax = _figure("Learning rate", "learning rate")
    _series(ax, segments, "lr", "tab:green", "lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    save(fig, "lr.png")

    fig, ax = _figure("Gradient norm (before clipping)", "global gradient norm")
    _series(ax, segments, "grad_norm", "tab:red", "grad norm")
    norms = _finite(r.get("grad_norm") for r in train)
    if norms and min(norms) > 0 and max(norms) / min(norms) > 50:
        ax.set_yscale("log")
    save(fig, "grad_norm.png")

    fig, ax = _figure("Throughput", "tokens / s (global)")
    _series(ax, segments, "tokens_per_s", "tab:blue", "tokens/s")
    ax.set_ylim(bottom=0)
    # TFLOP/s per GPU is tokens/s times a constant (FLOPs per token / GPUs): a second scale, not a second line
    ratios = [r["tflops_per_gpu"] / r["tokens_per_s"] for r in train
              if _finite([r.get("tflops_per_gpu"), r.get("tokens_per_s")]) == [r.get("tflops_per_gpu"), r.get("tokens_per_s")]
              and r["tokens_per_s"] > 0]
    if ratios:
        k = ratios[-1]
        right = ax.secondary_yaxis("right", functions=(lambda x: x * k, lambda y: y / k))
        right.set_ylabel("model TFLOP/s per GPU")
    save(fig, "throughput.png")

    fig, ax = _figure("Memory per process (rank 0)", "GiB (GPU: peak allocated; CPU: peak RSS)")
    _series(ax, segments, "mem_gib", "tab:brown", "memory")
    mem = _finite(r.get("mem_gib") for r in train)
    ax.set_ylim(0, 1.2 * max(mem) if mem and max(mem) > 0 else 1)
    save(fig, "memory.png")
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mllama-plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PNGs of a training run and a short text report, from the run's own metrics.jsonl.",
        epilog="examples:\n" + __doc__.split("\n", 2)[2].replace("``", ""))
    parser.add_argument("run_dir", help="a run directory (train.save_dir) holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs and report.txt (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / FILE).is_file():
        print(f"error: {run / FILE} not found: give the run's train.save_dir (the trainer writes {FILE} "
              "there as it trains)", file=sys.stderr)
        return 2
    records = read_records(str(run))
    out = Path(args.out) if args.out else run / "plots"
    try:
        written = plot(records, out)
    except ImportError:
        print("error: mllama-plot needs matplotlib: pip install 'megatron-llama[plot]'", file=sys.stderr)
        return 2
    lines = report(records, str(run))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {', '.join(p.name for p in written)} and report.txt to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
