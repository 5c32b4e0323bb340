"""WORKDIR/report.json, report.md and report.png: what a stage achieved, side by side.

report.json (stage 2 shown; stage 1's has "start" and "stage1"):

  {"stage": 2,
   "stage1": {"val_understanding": {"loss", "accuracy", "chance", ...},
              "val_generation": {"loss", "format_rate", "prompt_f1", ...},
              "val_text": {"loss"}},
   "stage2": {same keys},
   "result": {"step", "checkpoint", "why"},          the checkpoint predict/stage 2 use
   "stopped": null or {"reason", "step", "message"},  early stop, drift, guard
   "drift": [{"step", "changes", "within_bounds"}]}   every drift check of the run

A stage started from another's result names its starting column after that stage
("stage0" for pretraining, "stage1"); one started from scratch has "start".
Stage 2's "stage1" column is measured, not copied: the same evaluation of the params
stage 2 started from (stage 1's result) on the same validation sets.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from mgjax import atomic, metrics

# Which scores to show per capability, in this order.
_SHOWN = {
    "val_understanding": ("accuracy", "chance", "spurious_prompt_rate", "loss"),
    "val_generation": ("format_rate", "prompt_f1", "prompt_exact", "loss"),
    "val_text": ("loss",),
    "val_caption": ("loss",),  # the pretraining phase's
    # Requests and ordinary questions together (mgjax.evaluators.generation_intent).
    "generation_intent": ("intent_precision", "intent_recall", "missed_requests", "unasked_prompts"),
}


class ReportDamaged(ValueError):
  """A report.json that does not read back as a report (cut short by a kill or a full disk
  before writes were atomic, or edited by hand)."""


def write(workdir: str, report: dict[str, Any]) -> None:
  """Writes report.png, report.md and, last, report.json under `workdir` (process 0 only).

  Each file is written whole to a temporary name and renamed into place, so a kill or a
  full disk leaves the previous file or the new one, never half of one. report.json marks
  a finished run (checkpoint.finished), so it comes last: without it the run is not
  finished, and its command run again writes all three.
  """
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  columns = [c for c in ("start", "stage0", "stage1", "stage2") if c in report]
  atomic.write_bytes(root / "report.png", chart(report, columns, workdir))
  atomic.write_bytes(root / "report.md", markdown(report, columns).encode())
  atomic.write_bytes(root / "report.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())


def read(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/report.json (None when there is none yet). Raises ReportDamaged, naming the file
  and what to run, when it does not read back as a report."""
  path = epath.Path(workdir) / "report.json"
  if not path.exists():
    return None
  try:
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or not isinstance(report.get("stage"), int):
      raise ValueError("not a report (no stage)")
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ReportDamaged(
        f"{path} is damaged ({type(e).__name__}: {e}). Run that stage's command again with "
        f"--workdir={workdir}: it rebuilds the report from the run's checkpoints (the damaged file is kept "
        "beside it).") from None
  return report


def set_aside(workdir: str) -> epath.Path:
  """Moves a damaged WORKDIR/report.json to report.json.damaged (numbered when taken)."""
  path = epath.Path(workdir) / "report.json"
  target, n = path.parent / "report.json.damaged", 1
  while target.exists():
    target, n = path.parent / f"report.json.damaged.{n}", n + 1
  path.rename(target)
  return target


def format_score(value: Any, ci95: Any = None) -> str:
  """A score with its 95% interval when it has one: "0.537 [0.517, 0.557]"; "-" for none."""
  if not isinstance(value, (int, float)):
    return "-"
  if isinstance(value, int):  # a count (generation_intent's missed_requests)
    return str(value)
  return f"{value:.3f}" + (f" [{ci95[0]:.3f}, {ci95[1]:.3f}]" if ci95 else "")


def format_difference(d: dict[str, Any]) -> str:
  """A paired difference with its 95% interval and verdict: "+0.012 [+0.008, +0.016] improved"."""
  lo, hi = d["ci95"]
  return f"{d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] {d['verdict']}"


def markdown(report: dict[str, Any], columns: list[str]) -> str:
  lines = [f"# Stage {report['stage']} report", ""]
  result = report.get("result") or {}
  if result:
    lines += [f"Result: step {result['step']} ({result['why']}), `{result['checkpoint']}`.", ""]
  if report.get("stopped"):
    lines += [f"**Stopped early** at step {report['stopped']['step']}: {report['stopped']['message']}", ""]
  lines += [
      "| split | score | " + " | ".join(columns) + " |", "| --- | --- | " + " | ".join("---" for _ in columns) + " |"
  ]
  splits = [s for s in _SHOWN if any(s in report[c] for c in columns)]
  splits += sorted({s for c in columns for s in report[c]} - set(splits))
  for split in splits:
    for score in _SHOWN.get(split, ("loss",)):
      cells = [(report[c].get(split, {}).get(score), report[c].get(split, {}).get(f"{score}_ci95")) for c in columns]
      if any(v is not None for v, _ in cells):
        lines.append(f"| {split} | {score} | " + " | ".join(format_score(v, ci) for v, ci in cells) + " |")
  lines += [
      "", "Decoded scores show their 95% bootstrap interval over records in brackets. "
      "`chance`: answering each question with its most common training answer, without "
      "looking at the image. `format_rate`: share of generation requests answered with a "
      "well-formed `<h>...</h>` prompt; `prompt_f1`: token F1 of that prompt against the "
      "reference; `prompt_exact`: share of prompts equal to it. `spurious_prompt_rate`: understanding answers that hold a `<h>` prompt. "
      "`generation_intent`, over requests and ordinary questions together: `intent_precision`, the share of answers "
      "holding a prompt whose turn asked for an image; `intent_recall`, the share of image requests answered with a "
      "prompt; `missed_requests`, requests that got none; `unasked_prompts`, ordinary questions that got one.", ""
  ]
  compared = report.get("compared") or {}
  if compared:
    start = columns[0]
    lines += [
        f"Paired difference to `{start}` on the same answers (this stage minus where it started), "
        f"95% interval over records; a score held when no drop beyond {report.get('hold_margin', 0.02):.2f} "
        "is inside the interval:", "", "| split | score | difference | 95% interval | verdict |",
        "| --- | --- | --- | --- | --- |"
    ]
    for split, scores in compared.items():
      for score, d in scores.items():
        lo, hi = d["ci95"]
        lines.append(f"| {split} | {score} | {d['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {d['verdict']} |")
    lines.append("")
  drift = report.get("drift") or []
  if drift:
    lines += ["Drift of the guarded splits from where this stage started:", ""]
    lines += [
        f"- step {d['step']}: " + ", ".join(f"{s} {c:+.1%}" for s, c in d["changes"].items()) +
        ("" if d["within_bounds"] else " (out of bounds)") for d in drift
    ]
    lines.append("")
  lines += ["![validation curves and scores](report.png)", ""]
  return "\n".join(lines)


def stage_chain(workdir: str, report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """(workdir, report) of this stage and of every stage it started from, oldest first,
  as far back as their report.json files can be read."""
  chain, seen = [(workdir, report)], {str(workdir)}
  while (previous := chain[0][1].get("init_from_workdir")) and str(previous) not in seen:
    seen.add(str(previous))
    try:
      earlier = read(previous)
    except ReportDamaged:  # the chart shows what can be read; the earlier stage's rerun mends it
      break
    if not earlier:
      break
    chain.insert(0, (previous, earlier))
  return chain


def chart(report: dict[str, Any], columns: list[str], workdir: str | None = None) -> bytes:
  """A PNG, one panel per validation split: its loss over the steps of this stage and the
  stages before it on one step axis (as TensorBoard counts them), the decoded scores with
  their 95% intervals where they were measured, the drift bounds, and the result
  checkpoint of each stage."""
  import io

  # A bare Figure, not pyplot: no display needed (TPU VMs, CI) and no global backend
  # switched under a notebook that is showing its own plots.
  from matplotlib import lines, ticker
  from matplotlib.figure import Figure

  chain = stage_chain(workdir, report) if workdir else [("", report)]
  losses: dict[str, list[tuple[int, float, int]]] = {}  # split -> (global step, loss, stage)
  for stage_dir, stage_report in chain:
    offset = int(stage_report.get("global_step_offset", 0))
    for record in metrics.read(stage_dir) if stage_dir else []:
      if record["split"] != "train" and "loss" in record:
        losses.setdefault(record["split"], []).append((offset + record["step"], record["loss"], stage_report["stage"]))
  # A panel per validation split (a column with a loss), not per column spanning splits.
  splits = [
      s for s in _SHOWN if s in losses or any("loss" in r.get(c, {}).get(s, {}) for _, r in chain for c in columns)
  ]
  splits += sorted(set(losses) - set(splits))
  fig = Figure(figsize=(4.6 * max(len(splits), 1), 4.4))
  axes = fig.subplots(1, max(len(splits), 1), squeeze=False)[0]
  markers = {
      "accuracy": "o",
      "chance": "_",
      "format_rate": "s",
      "prompt_f1": "D",
      "prompt_exact": "^",
      "spurious_prompt_rate": "x"
  }
  result_styles = (":", "-.", "--", (0, (1, 3)))  # one per stage of the chain
  for ax, split in zip(axes, splits):
    points = losses.get(split, [])
    for stage in sorted({p[2] for p in points}):
      xs, ys = zip(*[(x, y) for x, y, s in points if s == stage])
      ax.plot(xs, ys, marker=".", label=f"loss, {stage_name(stage)}")
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("validation loss (log scale)")
    if points:
      ax.set_yscale("log")  # a stage's first loss is many times its last: stage 2's detail stays visible
      ax.yaxis.set_major_locator(ticker.FixedLocator(loss_ticks(min(p[1] for p in points), max(p[1] for p in points))))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
      ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.set_title(split.removeprefix("val_"))
    scored = ax.twinx()
    scored.set_ylim(-0.02, 1.02)
    scored.set_ylabel("decoded score")
    for i, (_, stage_report) in enumerate(chain):
      offset = int(stage_report.get("global_step_offset", 0))
      stage = stage_report["stage"]
      result_step = offset + int((stage_report.get("result") or {}).get("step", 0))
      ax.axvline(result_step, color="grey", linestyle=result_styles[i % len(result_styles)], linewidth=1,
                 label=f"{stage_name(stage)} result")
      bound = (stage_report.get("drift_bounds") or {}).get(split)
      if bound is not None:
        end = offset + int(stage_report.get("steps_trained", 0))
        ax.hlines(bound, offset, end, colors="red", linestyles="--", linewidth=1, label="drift bound")
      ends = [(offset, k) for k in stage_report if k in ("start", f"stage{stage - 1}")
             ] + [(result_step, f"stage{stage}")]
      for x, column in ends:
        for name, value in stage_report.get(column, {}).get(split, {}).items():
          if name in markers and isinstance(value, float):
            ci = stage_report[column][split].get(f"{name}_ci95")
            err = [[value - ci[0]], [ci[1] - value]] if ci else None
            scored.errorbar([x], [value], yerr=err, fmt=markers[name], color="black", capsize=3, markersize=4)
    names = sorted({
        n for _, r in chain for c in r if c.startswith(("stage", "start")) and isinstance(r[c], dict)
        for n in r[c].get(split, {}) if n in markers
    })
    # One legend under the panel, outside the data: the loss curves, the bounds, the result
    # checkpoints and the score markers (black, on the right axis).
    handles, labels = ax.get_legend_handles_labels()
    for n in names:
      handles.append(lines.Line2D([], [], marker=markers[n], color="black", linestyle="none", markersize=4))
      labels.append(f"{n} (right axis)")
    if handles:
      ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the legends below the panels included
  return buffer.getvalue()


def loss_ticks(lo: float, hi: float) -> list[float]:
  """Plain-number ticks for a log-scale loss axis from lo to hi: about five, evenly spaced on
  the log scale, rounded to two digits (three where two would repeat). A log axis's default
  ticks are powers of ten, none of which may fall inside a range like 4.3-7.0."""
  import numpy as np

  spaced = np.geomspace(lo, hi, 5) if hi > lo > 0 else [lo]
  ticks = sorted({float(f"{t:.2g}") for t in spaced})
  return ticks if len(ticks) >= 3 or hi <= lo else sorted({float(f"{t:.3g}") for t in spaced})


def stage_name(stage: int) -> str:
  """'pretraining' for stage 0 (configs/pretrain.py), else 'stage N'."""
  return "pretraining" if stage == 0 else f"stage {stage}"
