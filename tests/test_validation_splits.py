"""A validation split the dataset holds no records of: said and left out, never scored as
loss 0 or nan; refused before training when early stopping would pick the result by it."""

import json
import os

import pytest

from conftest import tiny_config
from mgjax import base_config, metrics, train
from mgjax.data import build


def _without_val_text(data_dir: str, **overrides):
  config = tiny_config(1, data_dir, **overrides)
  config.data.recipe.name = "sample_tiny_no_val_text"  # its own build: another content
  config.data.recipe.val_per_category.text = 0
  build.build_if_missing(config.data.recipe, config.data.data_dir)
  return config


def test_an_empty_validation_split_is_not_evaluated_and_the_run_says_so(data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  summary = train.run(_without_val_text(data_dir, steps=2, decode=True), workdir)
  out = capsys.readouterr().out
  folder = os.path.join(data_dir, "mgjax_instructions", "sample_tiny_no_val_text", "1.4.0")
  assert f"warning: val_text of the dataset at {folder} hold(s) no records: not evaluated (no loss, no scores)\n" in out
  assert set(summary.val_loss_end) == {"val_understanding", "val_generation"}
  # The splits with records, and generation_intent's column over them (val_text left out).
  assert set(summary.report["stage1"]) == {"val_understanding", "val_generation", "generation_intent"}
  intent = summary.report["stage1"]["generation_intent"]
  assert intent["num_answers"] == sum(summary.report["stage1"][s]["num_answers"] for s in summary.val_loss_end)
  assert "NaN" not in open(os.path.join(workdir, "report.json")).read()
  assert all(record["split"] != "val_text" for record in metrics.read(workdir))
  for split in ("val_understanding", "val_generation"):
    assert summary.report["stage1"][split]["num_answers"] > 0
  assert json.loads(open(os.path.join(workdir, "report.json")).read())["complete"]


def test_an_empty_early_stopping_split_is_refused_before_training(data_dir, tmp_path):
  config = _without_val_text(data_dir, steps=2)
  config.early_stop.split, config.early_stop.patience = "val_text", 1
  with pytest.raises(
      base_config.ConfigError, match=r"^early_stop\.split='val_text' holds no records in the dataset at "
      r".*/sample_tiny_no_val_text/1\.4\.0, so early stopping .* Name a validation split with records"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
