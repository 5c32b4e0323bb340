"""Two evaluations of the same answers side by side: stage 2 against the stage-1 weights it
started from, answer by answer, with each difference's 95% interval and a verdict."""

from __future__ import annotations

from typing import Any

from mgjax import evaluators, stats


def compare(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]],
            margin: float) -> dict[str, dict[str, dict[str, Any]]]:
  """{split: {score: {"difference", "ci95", "verdict"}}}: the paired difference of every
  decoded score both evaluations have, answer by answer (see `stats.verdict`): a score
  "held" when no drop larger than `margin` is inside the interval."""
  compared = {}
  for split in sorted(set(after) & set(before)):
    a, b = after[split].get("per_answer"), before[split].get("per_answer")
    if not a or not b or not a["record"] or a["record"] != b["record"]:
      continue  # not decoded on both sides, no answers, or not the same answers
    for score in a:
      if score == "record" or score not in b:
        continue
      if isinstance(a[score], dict):  # a ratio (generation_intent's precision and recall)
        diff = stats.paired_ratio_difference((a[score]["hits"], a[score]["of"]), (b[score]["hits"], b[score]["of"]),
                                             a["record"])
      else:
        diff = stats.paired_difference(a[score], b[score], a["record"])
      lo, hi = diff["ci95"]
      diff["verdict"] = stats.verdict((-hi, -lo) if score in evaluators.LOWER_IS_BETTER else (lo, hi), margin)
      compared.setdefault(split, {})[score] = diff
  return compared
