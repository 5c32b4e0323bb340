"""The trainer opens a built dataset and never builds one; the entry points (mgjax.main,
mgjax.recipe, run_stage.run) build a missing one first, and leave a finished stage alone."""

import pytest

from conftest import tiny_config
from mgjax import run_stage, train
from mgjax.data import shared_build


def test_the_trainer_refuses_a_dataset_that_was_never_built(tmp_path):
  config = tiny_config(1, str(tmp_path / "data"), steps=1)
  with pytest.raises(
      shared_build.DatasetMissing, match=r"no finished build of data recipe 'sample_tiny' .*"
      r"`python -m mgjax\.data\.build --config=RECIPE --data_dir=DIR`"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists()  # nothing built


def test_a_finished_stage_reports_what_it_made_without_its_data(stage1, tmp_path):
  # Its dataset gone and its LLM tokenizer folder missing: neither is needed to report.
  config = tiny_config(1, str(tmp_path / "gone"), steps=60, eval_every=30, decode=True)
  config.model.tokenizer = str(tmp_path / "no_tokenizer_here")
  summary = run_stage.run(config, stage1.workdir)
  assert summary.checkpoint == stage1.checkpoint and summary.steps == stage1.steps
  assert not (tmp_path / "gone").exists()  # nothing built
  with pytest.raises(FileNotFoundError, match=r"model\.tokenizer=.* is not a folder"):
    run_stage.run(config, str(tmp_path / "unfinished"))  # checked before any data work
  assert not (tmp_path / "gone").exists()
