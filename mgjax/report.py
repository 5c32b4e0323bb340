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

# Which scores to show per capability, in this order.
_SHOWN = {
    "val_understanding": ("accuracy", "chance", "spurious_prompt_rate", "loss"),
    "val_generation": ("format_rate", "prompt_f1", "loss"),
    "val_text": ("loss",),
    "val_caption": ("loss",),  # the pretraining phase's
}


def write(workdir: str, report: dict[str, Any]) -> None:
  """Writes report.json, report.md and report.png under `workdir` (process 0 only)."""
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  columns = [c for c in ("start", "stage0", "stage1", "stage2") if c in report]
  (root / "report.png").write_bytes(chart(report, columns))
  (root / "report.md").write_text(markdown(report, columns))


def read(workdir: str) -> dict[str, Any] | None:
  path = epath.Path(workdir) / "report.json"
  return json.loads(path.read_text()) if path.exists() else None


def _cell(value: Any) -> str:
  return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


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
      values = [report[c].get(split, {}).get(score) for c in columns]
      if any(v is not None for v in values):
        lines.append(f"| {split} | {score} | " + " | ".join(_cell(v) for v in values) + " |")
  lines += [
      "", "`chance`: answering each question with its most common training answer, without "
      "looking at the image. `format_rate`: share of generation requests answered with a "
      "well-formed `<h>...</h>` prompt; `prompt_f1`: token F1 of that prompt against the "
      "reference. `spurious_prompt_rate`: understanding answers that hold a `<h>` prompt.", ""
  ]
  drift = report.get("drift") or []
  if drift:
    lines += ["Drift of the guarded splits from where this stage started:", ""]
    lines += [
        f"- step {d['step']}: " + ", ".join(f"{s} {c:+.1%}" for s, c in d["changes"].items()) +
        ("" if d["within_bounds"] else " (out of bounds)") for d in drift
    ]
    lines.append("")
  lines += ["![scores per capability](report.png)", ""]
  return "\n".join(lines)


def chart(report: dict[str, Any], columns: list[str]) -> bytes:
  """A PNG: one panel per capability, the columns' scores as grouped bars."""
  import io

  # A bare Figure, not pyplot: no display needed (TPU VMs, CI) and no global backend
  # switched under a notebook that is showing its own plots.
  from matplotlib.figure import Figure

  panels = [(split, [s
                     for s in scores
                     if any(report[c].get(split, {}).get(s) is not None
                            for c in columns)])
            for split, scores in _SHOWN.items()]
  panels = [(split, scores) for split, scores in panels if scores]
  fig = Figure(figsize=(4.2 * len(panels), 3.6))
  axes = fig.subplots(1, len(panels), squeeze=False)
  width = 0.8 / max(len(columns), 1)
  for ax, (split, scores) in zip(axes[0], panels):
    for i, column in enumerate(columns):
      values = [report[column].get(split, {}).get(s) for s in scores]
      xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(scores))]
      bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=column)
      for bar, v in zip(bars, values):
        if v is not None:
          ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=7)
    ax.set_xticks(range(len(scores)), scores, fontsize=8)
    ax.set_title(split.removeprefix("val_"))
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()
