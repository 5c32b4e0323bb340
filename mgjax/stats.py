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

from typing import Any, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _draws(num_groups: int, resamples: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, num_groups, size=(resamples, num_groups))


def _per_group(groups, *columns) -> list[np.ndarray]:
  """Each column summed per group (record), groups in sorted order."""
  _, index = np.unique(np.asarray(groups), return_inverse=True)
  return [np.bincount(index, weights=np.asarray(c, np.float64), minlength=index.max() + 1) for c in columns]


def interval(values: Sequence[float], groups: Sequence[int] | None = None, *, resamples: int = RESAMPLES, seed: int = 0,
             bounds: tuple[float, float] | None = None, of: Sequence[float] | None = None) -> tuple[float, float]:
  """The 95% percentile interval of mean(values), resampling the groups (records) with
  replacement; without `groups` every value is its own group.

  `of`: a ratio instead of a mean, sum(values) / sum(of) (precision: prompts that were asked
  for, of all prompts given), each draw's ratio over the answers it drew; draws with nothing
  in the denominator are left out.

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
  of = np.ones_like(values) if of is None else np.asarray(of, np.float64)
  if of.sum() <= 0:
    raise ValueError("a ratio needs a denominator above 0")
  sums, counts = _per_group(groups, values, of)
  draws = _draws(sums.size, resamples, seed)
  with np.errstate(invalid="ignore", divide="ignore"):
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
  lo, hi = np.quantile(means[np.isfinite(means)], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
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


def paired_ratio_difference(after: tuple[Sequence[float], Sequence[float]], before: tuple[Sequence[float],
                                                                                          Sequence[float]],
                            groups: Sequence[int], *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
  """The difference of two ratios (`interval`'s `of`) on the same answers, each given as
  (values, of), with its 95% interval: both ratios on the same draws of records, so what the
  records themselves bring cancels as in `paired_difference`. Draws where either ratio has
  nothing in its denominator are left out."""
  a_num, a_den, b_num, b_den = _per_group(groups, *after, *before)
  draws = _draws(a_num.size, resamples, seed)
  with np.errstate(invalid="ignore", divide="ignore"):
    diffs = a_num[draws].sum(1) / a_den[draws].sum(1) - b_num[draws].sum(1) / b_den[draws].sum(1)
    difference = a_num.sum() / a_den.sum() - b_num.sum() / b_den.sum()
  diffs = diffs[np.isfinite(diffs)]
  if not np.isfinite(difference) or not diffs.size:
    raise ValueError("a ratio on one side has nothing in its denominator")
  lo, hi = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
  reach = 3.0 / a_num.size  # as `interval`'s bounds: n records cannot rule out less than 3/n
  lo, hi = max(-1.0, min(lo, difference - reach)), min(1.0, max(hi, difference + reach))
  return {"difference": float(difference), "ci95": [float(lo), float(hi)]}


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
