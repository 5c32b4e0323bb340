"""Scores beyond loss: decode the held-out sets and check what the model answers.

  generation     asked with " <GEN>", does the answer carry a well-formed <h>...</h>
                 prompt (format_rate), and how close is that prompt to the reference
                 (prompt_f1: SQuAD-style token F1, 0 for a missing prompt; prompt_exact:
                 the share that equal it, case, punctuation and spacing aside)?
  understanding  on short checkable answers (the sample's), exact-match accuracy of
                 every assistant turn given the reference conversation before it; beside
                 it `chance`: what answering every question with its most common training
                 answer would score (a random one of them when tied), i.e. a model that
                 never looks at the image.
                 `spurious_prompt_rate`: answers that wrongly hold a <h> prompt.

Every score comes with a 95% bootstrap interval over records (mgjax.stats), and `compare`
gives the paired difference between two evaluations of the same answers (stage 2 against
the stage-1 weights it started from) with its interval and a verdict: a score "held" when
no drop larger than `eval.hold_margin` is inside the interval.

Losses come from the trainer's own evaluation; this module only decodes and scores.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Iterable

import numpy as np

from mgjax import decode, stats
from mgjax.data.records import IMAGE_PLACEHOLDER

# Decoded scores where a rise is a regression.
LOWER_IS_BETTER = frozenset({"spurious_prompt_rate"})

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
  """Lower case, punctuation and surrounding/duplicate whitespace removed."""
  return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def token_f1(prediction: str, reference: str) -> float:
  """Bag-of-words F1 between two normalised texts (the SQuAD metric)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not common:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def conversation(example: dict) -> tuple[list[dict[str, str]], list[bytes]]:
  """A TFDS example's messages (as chat dicts) and encoded images."""
  m = example["messages"]
  messages = [{"role": _text(r), "content": _text(c)} for r, c in zip(m["role"], m["content"])]
  return messages, list(example["images"])


def assistant_turns(source) -> Iterable[tuple[list[dict], list[bytes], str]]:
  """(conversation before the turn, its images, reference answer) for every assistant turn."""
  for i in range(len(source)):
    messages, images = conversation(source[i])
    for t, message in enumerate(messages):
      if message["role"] == "assistant" and t > 0:
        # Only the images whose <image> slots are in the prefix are fed.
        n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages[:t])
        yield messages[:t], images[:n_images], message["content"]


def _question(messages: list[dict]) -> str:
  return normalize_answer(messages[-1]["content"].replace(IMAGE_PLACEHOLDER, ""))


def majority_answers(train_source, max_records: int = 20000) -> dict[str, tuple[str, ...]]:
  """Question -> its most common answers in the training split (several when tied), for
  the chance baseline. Ties are kept rather than broken by whichever came first, so the
  baseline does not depend on the order the split was written in."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for i in range(min(len(train_source), max_records)):
    example = train_source[i]
    if _text(example["category"]) != "understanding":
      continue
    messages, _ = conversation(example)
    for t in range(1, len(messages)):
      if messages[t]["role"] == "assistant" and messages[t - 1]["role"] == "user":
        counts[_question(messages[:t])][normalize_answer(messages[t]["content"])] += 1
  majority = {}
  for q, c in counts.items():
    top = max(c.values())
    majority[q] = tuple(sorted(a for a, n in c.items() if n == top))
  return majority


def chance(turns: list[tuple[list[dict], str]], majority: dict[str, tuple[str, ...]]) -> float:
  """Expected accuracy on (conversation before the answer, reference) turns of a blind
  guesser that answers with a most common training answer, picked at random when k are
  tied: a reference among them is right with probability 1/k."""

  def expected(prefix, ref):
    tied = majority.get(_question(prefix), ())
    return 1 / len(tied) if normalize_answer(ref) in tied else 0.0

  return float(np.mean([expected(prefix, ref) for prefix, ref in turns]))


def _answer_every_turn(generator: decode.Generator, source, max_new_tokens: int):
  """Every assistant turn of `source` with the model's own answer in its place, and the
  index of the record each turn belongs to (the bootstrap's groups)."""
  items, records = [], []
  for i in range(len(source)):
    for item in assistant_turns([source[i]]):
      items.append(item)
      records.append(i)
  answers = generator.generate([p for p, _, _ in items], [im for _, im, _ in items], max_new_tokens=max_new_tokens)
  return items, answers, records


def _with_intervals(per_answer: dict[str, list[float]], records: list[int]) -> dict[str, Any]:
  """Each score's mean and 95% interval, and the per-answer values a paired comparison
  (stage 2 against where it started) resamples."""
  scores: dict[str, Any] = {"num_answers": len(records)}
  if records:  # none: the split holds no answer to score, and no score is shown
    for name, values in per_answer.items():
      scores[name] = float(np.mean(values))
      scores[f"{name}_ci95"] = list(stats.interval(values, records, bounds=(0.0, 1.0)))
  scores["per_answer"] = {"record": records, **per_answer}
  return scores


def score_generation(generator: decode.Generator, source, *, max_new_tokens: int) -> dict[str, Any]:
  items, answers, records = _answer_every_turn(generator, source, max_new_tokens)
  prompts = [decode.extract_image_prompt(a) for a in answers]
  references = [decode.extract_image_prompt(ref) or ref for _, _, ref in items]
  return _with_intervals(
      {
          "format_rate": [float(p is not None) for p in prompts],
          "prompt_f1": [token_f1(p, r) if p is not None else 0.0 for p, r in zip(prompts, references)],
          # Every attribute carried over, in the reference's words: stricter than F1, where
          # the words every prompt shares already score.
          "prompt_exact": [
              float(p is not None and normalize_answer(p) == normalize_answer(r)) for p, r in zip(prompts, references)
          ],
      },
      records)


def score_accuracy(generator: decode.Generator, source, *, max_new_tokens: int,
                   majority: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
  items, answers, records = _answer_every_turn(generator, source, max_new_tokens)
  scores = _with_intervals(
      {
          "accuracy": [float(normalize_answer(a) == normalize_answer(ref)) for a, (_, _, ref) in zip(answers, items)],
          "spurious_prompt_rate": [float(decode.extract_image_prompt(a) is not None) for a in answers],
      }, records)
  if majority is not None and items:
    scores["chance"] = chance([(prefix, ref) for prefix, _, ref in items], majority)
  return scores


def evaluate(generator: decode.Generator, val_sources: dict[str, Any], losses: dict[str, float], eval_cfg,
             majority: dict[str, tuple[str, ...]] | None = None) -> dict[str, dict[str, Any]]:
  """{split: {"loss": ..., and the split's scores}} for every validation split.

  Each decoded score comes with its 95% interval (`NAME_ci95`, over records) and the
  per-answer values behind it (`per_answer`). `majority` (from `majority_answers` over the
  training mix) adds the chance level to the accuracy splits; it depends on the data only,
  so a run computes it once.
  """
  results = {}
  for split, source in val_sources.items():
    results[split] = {"loss": losses[split]}
    if not eval_cfg.decode:
      continue
    if split in eval_cfg.generation_splits:
      results[split].update(score_generation(generator, source, max_new_tokens=eval_cfg.max_new_tokens))
    if split in eval_cfg.accuracy_splits:
      results[split].update(score_accuracy(generator, source, max_new_tokens=eval_cfg.max_new_tokens,
                                           majority=majority))
  return results


def compare(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]],
            margin: float) -> dict[str, dict[str, dict[str, Any]]]:
  """{split: {score: {"difference", "ci95", "verdict"}}}: the paired difference of every
  decoded score both evaluations have, answer by answer (see `stats.verdict`)."""
  compared = {}
  for split in sorted(set(after) & set(before)):
    a, b = after[split].get("per_answer"), before[split].get("per_answer")
    if not a or not b or not a["record"] or a["record"] != b["record"]:
      continue  # not decoded on both sides, no answers, or not the same answers
    for score in a:
      if score != "record" and score in b:
        diff = stats.paired_difference(a[score], b[score], a["record"])
        lo, hi = diff["ci95"]
        diff["verdict"] = stats.verdict((-hi, -lo) if score in LOWER_IS_BETTER else (lo, hi), margin)
        compared.setdefault(split, {})[score] = diff
  return compared
