"""lmms-eval's own command line on mgjax checkpoints, offline, over local tasks made from the
sample's validation records (mgjax.lmms_tasks): its scores must be mgjax's own."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config

from mgjax import decode, lmms_tasks
from mgjax.data import datasets
from mgjax.evaluators import decoding, understanding

SPLIT = "val_understanding"
# Offline and quiet: lmms-eval, datasets and the hub client must not reach for the network.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_lmms_eval(tmp_path, model_args: str, task: str, include: str, *extra: str) -> tuple[dict, list[dict]]:
  """`python -m lmms_eval --model mgjax ...`; its results and its logged samples (doc order)."""
  out = tmp_path / f"out_{task}"
  env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
  # DEBUG: lmms-eval's CLI otherwise logs an exception during evaluation and exits 0.
  command = [
      sys.executable, "-m", "lmms_eval", "--model", "mgjax", "--model_args", model_args, "--tasks", task,
      "--include_path", include, "--output_path",
      str(out), "--log_samples", "--verbosity", "DEBUG", *extra
  ]
  done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
  results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
  samples = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
  assert len(results) == 1 and len(samples) == 1, done.stderr[-6000:]
  with open(samples[0]) as f:
    logged = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
  with open(results[0]) as f:
    return json.load(f)["results"][task], logged


@pytest.fixture(scope="module")
def val_source(stage1, data_dir):
  config = tiny_config(1, data_dir)
  return datasets.open_split(datasets.load_built(config.data.recipe, data_dir), SPLIT)


def test_lmms_eval_scores_a_checkpoint_as_mgjax_evaluation_does(stage1, val_source, tmp_path):
  workdir = stage1.workdir
  generator, config = decode.load_workdir(workdir)
  generator.max_batch_size = config.eval.batch_size  # as the trainer's evaluation decodes
  tasks = tmp_path / "tasks"
  lmms_tasks.write_task(val_source, SPLIT, str(tasks), max_new_tokens=config.eval.max_new_tokens)

  # mgjax's own evaluation of the same checkpoint and records, at its batch size.
  answers = decoding.AnswerCache(generator, {SPLIT: val_source}, config.eval.max_new_tokens)
  own = understanding.run(answers, config.evals.understanding)[SPLIT]
  assert own["num_answers"] == 11  # 8 records, 3 of them with a second question

  scores, samples = run_lmms_eval(tmp_path, f"workdir={workdir},batch_size={config.eval.batch_size}",
                                  lmms_tasks.task_name(SPLIT), str(tasks))
  assert [s["filtered_resps"] for s in samples] == answers(SPLIT).answers  # answer for answer
  assert [s["target"] for s in samples] == [ref for _, _, ref in answers(SPLIT).turns]
  assert scores["acc,none"] == pytest.approx(own["accuracy"], abs=1e-12)
  # A second turn is asked with the conversation before it, as mgjax's evaluation asks it.
  assert samples[1]["input"] == "Where is the triangle?" and samples[1]["target"] == "Bottom left."
