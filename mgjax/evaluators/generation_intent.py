"""Does the model answer with a text-to-image prompt exactly when an image is asked for?

Over generation requests and ordinary questions together (settings.splits), a turn asks for
an image when its reference answer holds a <h>...</h> prompt, and is answered with one when
the model's answer does (mgjax.decode.extract_image_prompt). Reported under the key
"generation_intent", beside the splits:

  intent_precision  of the answers that hold a prompt, the share whose turn asked for one
  intent_recall     of the turns that asked for an image, the share answered with a prompt
  missed_requests   turns that asked for an image and got no prompt (a 2B model's usual miss)
  unasked_prompts   ordinary questions answered with a prompt

Precision and recall are ratios, so their intervals and paired differences resample records
and recompute the ratio on each draw (stats.interval's `of`, stats.paired_ratio_difference).
"""

from __future__ import annotations

from typing import Any

from mgjax import decode, stats
from mgjax.evaluators import decoding

NAME = "generation_intent"
KEY = "generation_intent"  # its column in a stage's scores, beside the splits
LOWER_IS_BETTER = frozenset({"missed_requests", "unasked_prompts"})


def run(answers: decoding.AnswerCache, settings, **_) -> dict[str, dict[str, Any]]:
  """{KEY: scores} over the turns of settings.splits ({} when they hold no turn)."""
  asked, prompted, records = [], [], []
  offset = 0  # record numbers of each split after the one before's, so no two share one
  for split in answers.splits(settings.splits):
    got = answers(split)
    asked += [float(decode.extract_image_prompt(ref) is not None) for _, _, ref in got.turns]
    prompted += [float(decode.extract_image_prompt(a) is not None) for a in got.answers]
    records += [offset + r for r in got.records]
    offset += max(got.records, default=-1) + 1
  if not records:
    return {}
  hits = [a * p for a, p in zip(asked, prompted)]
  scores: dict[str, Any] = {
      "num_answers": len(records),
      "num_requests": int(sum(asked)),
      "missed_requests": int(sum(asked) - sum(hits)),
      "unasked_prompts": int(sum(prompted) - sum(hits)),
  }
  per_answer: dict[str, Any] = {"record": records}
  for name, of in (("intent_precision", prompted), ("intent_recall", asked)):
    if sum(of):  # a precision needs at least one prompt, a recall one request
      scores[name] = sum(hits) / sum(of)
      scores[f"{name}_ci95"] = list(stats.interval(hits, records, of=of, bounds=(0.0, 1.0)))
      per_answer[name] = {"hits": hits, "of": of}
  scores["per_answer"] = per_answer
  return {KEY: scores}
