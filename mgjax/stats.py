"""Uncertainty of the decoded scores: 95% bootstrap intervals over validation examples.

A score is the mean of per-answer values (1/0 for a right answer, a prompt's F1). The
answers of one conversation share its image and its history, so they are not independent:
the bootstrap resamples whole records (the cluster bootstrap), and a record with three
answers counts three times within its draw. Intervals are percentile intervals of
`RESAMPLES` draws with a fixed seed, so the same answers always give the same interval.

A paired difference compares two sets of weights on the same answers (stage 2 against the
stage-1 weights it started from): each record's difference is resampled, which cancels the
spread that the examples themselves bring (an easy question is easy for both), so the
interval is far narrower than the two scores' own intervals suggest.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def interval(values: Sequence[float], groups: Sequence[int] | None = None, *, resamples: int = RESAMPLES, seed: int = 0,
             bounds: tuple[float, float] | None = None) -> tuple[float, float]:
  """The 95% percentile interval of mean(values), resampling the groups (records) with
  replacement; without `groups` every value is its own group.

  `bounds`: the range a value can take ((0, 1) for a score, (-1, 1) for a difference of
  two). Then the interval reaches at least 3/n (n records) past the mean on each side, within
  the bounds: a bootstrap only resamples what the records show, so two answers alike give
  [x, x], while by the rule of three n records cannot rule out an effect shown by fewer than
  3/n of all records at 95%. Large sets are unaffected (their spread is wider); a handful
  of answers reads as what it is, too few to tell.
  """
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError("an interval needs at least one value")
  groups = np.arange(values.size) if groups is None else np.asarray(groups)
  if groups.shape != values.shape:
    raise ValueError(f"{values.size} values but {groups.size} group labels")
  _, index = np.unique(groups, return_inverse=True)
  sums = np.bincount(index, weights=values)
  counts = np.bincount(index).astype(np.float64)
  draws = np.random.default_rng(seed).integers(0, sums.size, size=(resamples, sums.size))
  means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
  lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
  if bounds is not None:
    mean, reach = sums.sum() / counts.sum(), 3.0 / sums.size
    lo, hi = max(bounds[0], min(lo, mean - reach)), min(bounds[1], max(hi, mean + reach))
  return float(lo), float(hi)


def paired_difference(after: Sequence[float], before: Sequence[float], groups: Sequence[int] | None = None,
                      **kwargs) -> dict[str, float | list[float]]:
  """mean(after - before) on the same examples (scores in [0, 1]) and its 95% interval."""
  after, before = np.asarray(after, np.float64), np.asarray(before, np.float64)
  if after.shape != before.shape:
    raise ValueError(f"a paired difference needs the same examples: {after.size} against {before.size}")
  diff = after - before
  return {"difference": float(diff.mean()), "ci95": list(interval(diff, groups, bounds=(-1.0, 1.0), **kwargs))}


def verdict(ci95: Sequence[float], margin: float) -> str:
  """What a paired difference's interval says, for a score where higher is better:

    improved   the whole interval is above 0;
    held       it is not all above 0, but no drop larger than `margin` is in it;
    dropped    the whole interval is below 0 and reaches past -margin;
    undecided  it straddles -margin and 0: more examples are needed to tell.
  """
  lo, hi = ci95
  if lo > 0:
    return "improved"
  if lo >= -margin:
    return "held"
  if hi < 0:
    return "dropped"
  return "undecided"
