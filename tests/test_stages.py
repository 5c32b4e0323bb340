"""The stage-2 guards' decisions on plain numbers (the real runs are in test_stage2.py)."""

import math

import ml_collections

from mgjax import stages


def cfg(**kw):
  base = dict(collapse_loss=1e-4, drift_splits=("val_understanding", "val_text"), drift_threshold=0.1,
              drift_action="rollback")
  return ml_collections.ConfigDict({**base, **kw})


def test_training_guard_names_the_problem_and_the_fix():
  guard = stages.TrainingGuard(cfg(), ml_collections.ConfigDict(dict(lr=2e-4)))
  assert guard.check(1, 2.5, 1.0, 100) is None
  nan = guard.check(2, math.nan, 1.0, 100)
  assert "non-finite training loss at step 2" in nan and "2.5000 at step 1" in nan and "optim.lr=0.0002" in nan
  assert "no supervised tokens" in guard.check(3, 0.0, 0.0, 0) and "data.seq_len" in guard.check(3, 0.0, 0.0, 0)
  collapsed = guard.check(4, 1e-6, 0.1, 100)
  assert "collapsed" in collapsed and "early stopping" in collapsed


def test_drift_guard_compares_with_the_start_and_is_off_without_one():
  guard = stages.DriftGuard(cfg(), {"val_understanding": 0.5, "val_text": 1.0, "val_generation": 0.2})
  ok = guard.check({"val_understanding": 0.54, "val_text": 0.9, "val_generation": 5.0})
  assert ok.within_bounds and abs(ok.changes["val_understanding"] - 0.08) < 1e-9
  assert "val_generation" not in ok.changes  # not a guarded split
  assert not guard.check({"val_understanding": 0.56, "val_text": 1.0}).within_bounds
  assert stages.DriftGuard(cfg(), None).check({"val_understanding": 99.0}).within_bounds


def test_early_stopping_counts_evaluations_without_improvement():
  config = ml_collections.ConfigDict(dict(split="val_generation", patience=2, min_delta=0.01))
  es = stages.EarlyStopping(config)
  assert not es.update(10, {"val_generation": 1.0}, True)
  assert not es.update(20, {"val_generation": 0.995}, True)  # within min_delta: no improvement
  assert es.update(30, {"val_generation": 0.5}, False)  # better, but out of the drift bounds
  assert (es.best_step, es.best_value) == (10, 1.0)
  # A resumed run carries on from the saved state.
  resumed = stages.EarlyStopping(config, es.state())
  assert resumed.state() == es.state() == {"best_step": 10, "best_value": 1.0, "evals_without_improvement": 2}
  assert not resumed.update(40, {"val_generation": 0.9}, True)
  assert resumed.state() == {"best_step": 40, "best_value": 0.9, "evals_without_improvement": 0}


def test_early_stopping_with_patience_zero_tracks_but_never_stops():
  es = stages.EarlyStopping(ml_collections.ConfigDict(dict(split="val_generation", patience=0, min_delta=0.0)))
  assert not any(es.update(s, {"val_generation": float(s)}, True) for s in (1, 2, 3, 4))
  assert es.best_step == 1
