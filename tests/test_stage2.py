"""Stage 2's controls in real runs on the tiny sample: guards that fire for the right reason,
early stopping that hands on the best checkpoint, LoRA, replay, gradient accumulation,
bf16 compute, and the report.

Each run is a few steps of the 1.5M-parameter model; XLA compiling dominates, shared
through the persistent compilation cache that conftest.py sets.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import load_params, tiny_config
from mgjax import checkpoint, metrics, reports, stages, train


def checkpoint_params(path: str):
  """The params of a checkpoint folder (WORKDIR/checkpoints/<step>) as numpy."""
  return load_params(*checkpoint.locate(path))[0]


def flat(params) -> dict[str, np.ndarray]:
  return {checkpoint.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


def stage2_config(stage1, data_dir, **kw):
  c = tiny_config(2, data_dir, **kw)
  c.init_from = stage1.workdir
  return c


# ------------------------------------------------------------------ guards


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  # An absurd learning rate, warmed up from 0: step 1 changes nothing, step 2's update
  # blows the weights up, and step 3's loss is NaN.
  c = tiny_config(1, data_dir, steps=10, checkpoint_every=1)
  c.optim.lr, c.optim.warmup_steps = 1e30, 10
  with pytest.raises(stages.GuardTripped) as tripped:
    train.run(c, str(tmp_path))
  error = tripped.value
  assert error.reason == "guard" and error.step == 3
  assert "non-finite training loss at step 3" in str(error) and "optim.lr=1e+30" in str(error)
  # The checkpoint of step 2 holds the weights that gave the NaN: it is gone; step 1 is kept.
  assert error.checkpoint == str(tmp_path / "checkpoints" / "1")
  assert checkpoint.Checkpoints(str(tmp_path), read_only=True).all_steps() == [1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpoint_params(error.checkpoint)))
  assert not (tmp_path / "report.json").exists()


def test_collapse_guard_stops_on_an_empty_loss_mask(data_dir, tmp_path):
  # 8 tokens hold the user's turn only: no assistant token is ever supervised, the loss
  # reads 0 and looks perfect. The guard says why instead of training on nothing.
  c = tiny_config(1, data_dir, steps=5)
  c.data.seq_len = 8
  with pytest.raises(stages.GuardTripped, match=r"step 1 had no supervised tokens.*raise data\.seq_len"):
    train.run(c, str(tmp_path))


def test_collapse_guard_stops_a_memorising_run(data_dir, tmp_path):
  # The generation subset alone at a high learning rate: the prompts are a fixed function
  # of the request, so the loss heads for 0 - the failure Mini-Gemini's users reported.
  c = tiny_config(1, data_dir, steps=300, eval_every=300)
  c.data.train_split = "train_generation"
  c.optim.lr, c.optim.warmup_steps = 3e-3, 5
  c.guard.collapse_loss = 0.05
  with pytest.raises(stages.GuardTripped, match="collapsed to") as tripped:
    train.run(c, str(tmp_path))
  step = tripped.value.step
  assert step < 300
  collapsed_to = float(re.search(r"collapsed to (\S+) at step", str(tripped.value)).group(1))
  assert collapsed_to < 0.05
  # It fired at the first step below the threshold: every step logged before was above it.
  logged = {r["step"]: r["loss"] for r in metrics.read(str(tmp_path)) if r["split"] == "train"}
  assert max(logged) == step - 1 and min(logged.values()) >= 0.05


@pytest.mark.parametrize("action", ["warn", "stop", "rollback"])
def test_drift_guard_acts_when_understanding_drifts(stage1, data_dir, tmp_path, action):
  # A learning rate 50x stage 2's on the generation subset drags understanding along.
  c = stage2_config(stage1, data_dir, steps=12, eval_every=3)
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  c.guard.drift_action, c.guard.drift_threshold = action, 0.10
  c.early_stop.patience = 0
  summary = train.run(c, str(tmp_path))
  report = json.loads((tmp_path / "report.json").read_text())
  drift = report["drift"]
  out = [d["step"] for d in drift if not d["within_bounds"]]
  assert out, f"expected drift past 10%: {drift}"
  first_out = out[0]
  if action == "warn":
    assert report["stopped"] is None and summary.steps == 12
    assert report["result"]["step"] == 12
  elif action == "stop":
    assert report["stopped"]["reason"] == "drift_stop" and summary.steps == first_out
    assert report["result"]["step"] == first_out
  else:
    assert report["stopped"]["reason"] == "drift_rollback" and summary.steps == first_out
    # The best val_generation among the evaluations within bounds (stage 1's own result,
    # step 0, included) is handed on, and predict/stage 3 would load exactly it.
    val = {r["step"]: r["loss"] for r in metrics.read(str(tmp_path)) if r["split"] == "val_generation" and "loss" in r}
    in_bounds = [0] + [d["step"] for d in drift if d["within_bounds"]]
    best = min(in_bounds, key=lambda s: val[s])
    assert report["result"]["step"] == best
    expected = stage1.checkpoint if best == 0 else str(tmp_path / "checkpoints" / str(best))
    # report.json names it relative to the workdir; read back, it is the same folder.
    assert report["result"]["checkpoint"] == os.path.relpath(expected, str(tmp_path))
    assert checkpoint.result_checkpoint(str(tmp_path)) == expected
    assert checkpoint.locate(str(tmp_path)) == checkpoint.locate(expected)
    assert summary.val_loss_end["val_generation"] == pytest.approx(val[best])
  assert "drift" in (tmp_path / "report.md").read_text().lower()


def test_early_stopping_hands_on_the_best_checkpoint(stage1, data_dir, tmp_path):
  c = stage2_config(stage1, data_dir, steps=40, eval_every=2)
  c.optim.lr, c.optim.warmup_steps = 3e-3, 1
  c.guard.drift_action = "off"
  c.early_stop.patience, c.early_stop.min_delta = 2, 0.02
  summary = train.run(c, str(tmp_path))
  report = json.loads((tmp_path / "report.json").read_text())
  # Replay the rule over the logged losses: the run must have done exactly this.
  val = {r["step"]: r["loss"] for r in metrics.read(str(tmp_path)) if r["split"] == "val_generation" and "loss" in r}
  best, misses, stop = 0, 0, None
  for s in sorted(val)[1:]:
    if val[s] < val[best] - 0.02:
      best, misses = s, 0
    else:
      misses += 1
      if misses == 2:
        stop = s
        break
  assert stop is not None and stop < 40, f"no early stop in {val}"
  assert summary.steps == stop and report["stopped"]["reason"] == "early_stop"
  assert report["result"]["step"] == best
  kept = checkpoint.Checkpoints(str(tmp_path), read_only=True).all_steps()
  if best:
    assert best in kept  # kept past max_to_keep=2 because it is the best
    np.testing.assert_allclose(summary.val_loss_end["val_generation"], val[best], rtol=1e-6)
  # Killed after the stop's checkpoint, before the report: the same command finishes the run
  # as it was ending, without training past the stop.
  os.remove(tmp_path / "report.json")
  again = train.run(c, str(tmp_path))
  assert again.steps == stop and again.report == report
  assert max(r["step"] for r in metrics.read(str(tmp_path))) == stop


# ------------------------------------------------------------------ training features


def test_lora_trains_only_low_rank_adapters(stage1, data_dir, tmp_path):
  c = stage2_config(stage1, data_dir, steps=6)
  c.lora.rank = 2
  c.optim.lr = 3e-3
  c.early_stop.patience = 0  # the result is the last step, whatever its loss
  summary = train.run(c, str(tmp_path))
  before, after = flat(checkpoint_params(stage1.checkpoint)), flat(
      checkpoint_params(str(tmp_path / "checkpoints" / "6")))
  changed = [p for p in before if not np.array_equal(before[p], after[p])]
  assert changed and all(p.startswith("llm/layers/") and p.endswith("kernel") for p in changed)
  assert any("self_attn/o_proj" in p for p in changed) and any("mlp/down_proj" in p for p in changed)
  for p in changed:  # the checkpoint holds merged plain weights: base + a rank-2 delta
    delta = (after[p] - before[p]).reshape(before[p].shape[0] * (before[p].shape[1] if "o_proj" in p else 1), -1)
    assert np.linalg.matrix_rank(delta, tol=1e-6) <= 2, p
  assert summary.num_trainable < 0.1 * summary.num_params
  assert summary.val_loss_end["val_generation"] < summary.val_loss_start["val_generation"]


def test_grad_accumulation_gives_the_same_updates(data_dir, tmp_path):
  runs = {}
  for accum in (1, 2):
    c = tiny_config(1, data_dir, steps=3)
    c.train.grad_accum_steps = accum
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    train.run(c, str(tmp_path / str(accum)))
    runs[accum] = str(tmp_path / str(accum))
  losses = {a: [r["loss"] for r in metrics.read(w) if r["split"] == "train"] for a, w in runs.items()}
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)
  p1, p2 = (flat(checkpoint_params(os.path.join(w, "checkpoints", "3"))) for w in runs.values())
  for path in p1:
    np.testing.assert_allclose(p2[path], p1[path], rtol=0, atol=5e-5, err_msg=path)


def test_bf16_compute_keeps_float32_master_weights(data_dir, tmp_path):
  c = tiny_config(1, data_dir, steps=4)
  c.model.dtype = "bfloat16"
  summary = train.run(c, str(tmp_path))
  params = checkpoint_params(str(tmp_path / "checkpoints" / "4"))
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
  start = summary.val_loss_start
  assert all(np.isfinite(v) for v in summary.val_loss_end.values())
  assert summary.val_loss_end["val_understanding"] < start["val_understanding"]


# ------------------------------------------------------------------ the report


def test_stage2_report_holds_both_stages_side_by_side(stage1, data_dir, tmp_path):
  c = stage2_config(stage1, data_dir, steps=6, decode=True)
  summary = train.run(c, str(tmp_path))
  report = json.loads((tmp_path / "report.json").read_text())
  assert set(report) >= {"stage1", "stage2", "result", "stopped", "drift"}
  for stage in ("stage1", "stage2"):
    u, g, t = (report[stage][s] for s in ("val_understanding", "val_generation", "val_text"))
    assert set(u) >= {"loss", "accuracy", "chance"} and set(g) >= {"loss", "format_rate", "prompt_f1"}
    assert set(t) >= {"loss"}
    assert 0 <= u["accuracy"] <= 1 and 0 <= g["format_rate"] <= 1 and 0 <= g["prompt_f1"] <= 1
  # Every decoded score has its 95% interval, around it.
  for split, score in (("val_understanding", "accuracy"), ("val_generation", "prompt_f1")):
    lo, hi = report["stage2"][split][f"{score}_ci95"]
    assert lo <= report["stage2"][split][score] <= hi
  # Stage 2's "before" column is stage 1's result as stage 1's report scored it: the same
  # weights decoded with the same settings (the fingerprint) give the same answers.
  stage1_report = json.loads(open(os.path.join(stage1.workdir, "report.json")).read())
  assert report["eval_fingerprint"] == stage1_report["eval_fingerprint"]
  for split in ("val_understanding", "val_generation"):
    assert report["stage1"][split]["loss"] == pytest.approx(stage1_report["stage1"][split]["loss"], rel=1e-5)
    assert {**report["stage1"][split], "loss": 0} == {**stage1_report["stage1"][split], "loss": 0}
  # Measured again (another decoding batch size, so another fingerprint): the same answers.
  measured_config = stage2_config(stage1, data_dir, steps=2, decode=True)
  measured_config.eval.batch_size = 3
  measured = train.run(measured_config, str(tmp_path / "measured")).report
  for split in ("val_understanding", "val_generation"):
    assert measured["stage1"][split]["per_answer"] == report["stage1"][split]["per_answer"]
  # The paired difference to stage 1, answer by answer, with a verdict.
  compared = report["compared"]["val_understanding"]["accuracy"]
  assert compared["ci95"][0] <= compared["difference"] <= compared["ci95"][1]
  assert compared["verdict"] in ("improved", "held", "dropped", "undecided")
  assert "Paired difference to `stage1`" in (tmp_path / "report.md").read_text()
  # report.png draws stage 1 and stage 2 on one step axis: it finds stage 1's metrics.
  assert report["init_from_workdir"] == stage1.workdir and report["global_step_offset"] == 60
  assert [r["stage"] for _, r in reports.stage_chain(str(tmp_path), report)] == [1, 2]
  assert set(report["drift_bounds"]) == {"val_understanding", "val_text"}
  assert (tmp_path / "report.png").stat().st_size > 5000
  assert "| val_generation | format_rate |" in (tmp_path / "report.md").read_text()
  # The generation-intent score: requests and ordinary questions together, in both stages,
  # in report.md and among the paired differences.
  for stage in ("stage1", "stage2"):
    intent = report[stage]["generation_intent"]
    decoded = sum(report[stage][s]["num_answers"] for s in ("val_generation", "val_understanding"))
    assert intent["num_answers"] > decoded  # val_text's turns too
    assert intent["num_requests"] == report[stage]["val_generation"]["num_answers"]
    assert intent["missed_requests"] == round(intent["num_requests"] * (1 - intent["intent_recall"]))
    assert intent["intent_recall"] == pytest.approx(report[stage]["val_generation"]["format_rate"])
  assert "intent_recall" in report["compared"]["generation_intent"]
  assert "| generation_intent | intent_recall |" in (tmp_path / "report.md").read_text()
  assert summary.report == report
  # A finished run asked again reports what it made instead of training more.
  again = train.run(c, str(tmp_path))
  assert again.checkpoint == summary.checkpoint and again.steps == summary.steps
