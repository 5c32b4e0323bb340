"""Comparing answers as text: the normalisation and token F1 of SQuAD's evaluation."""

from __future__ import annotations

import collections
import re
import string

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
