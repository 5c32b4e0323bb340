"""The evaluations of one stage: the validation losses at every evaluation, and the decoded
evaluators config.evals names, at the stage's start, on its result and every `every` steps.

Decoded scores are reused rather than decoded again where they cannot differ: stage 2
starts from stage 1's result, which stage 1 already scored; when the evaluation that
decided those answers has the same fingerprint (validation data, tokenizer, decoding
settings, evaluators, model numerics, mesh), its scores stand for the start's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ml_collections

from mgjax import decode, metrics, reports, sharding
from mgjax.data import datasets
from mgjax.evaluators import DECODED, decoding, understanding, val_loss

# The evaluation settings that decide the decoded answers (not, e.g., eval.score_start).
_DECODING_KEYS = ("decode", "max_new_tokens", "batch_size")


def check(config: ml_collections.ConfigDict) -> list[str]:
  """What in config.evals cannot run, one problem each (base_config.check_train raises them)."""
  problems = []
  for name, settings in config.evals.items():
    if name not in DECODED:
      problems.append(f"evals.{name}: no evaluator of that name (known: {sorted(DECODED)})")
      continue
    # Splits the run does not validate on are left out (generation_intent lists val_text,
    # which a run may drop); an evaluator left with none would measure nothing.
    if not set(settings.splits) & set(config.data.val_splits):
      problems.append(f"evals.{name}.splits={tuple(settings.splits)}: none of them is in data.val_splits "
                      f"{tuple(config.data.val_splits)}")
    every = settings.get("every", 0)
    if every < 0:
      problems.append(f"evals.{name}.every={every} must be 0 (start and result only) or more")
    elif every and config.train.eval_every >= 1 and every % config.train.eval_every:
      problems.append(f"evals.{name}.every={every} must be a multiple of train.eval_every="
                      f"{config.train.eval_every}: decoded evaluators run at evaluation steps")
  return problems


class Suite:
  """Validation losses of every val split, and the decoded scores of a set of weights."""

  def __init__(self, config: ml_collections.ConfigDict, data: Any, setup: Any, writer: metrics.MetricsWriter):
    """data: the run's mgjax.stage_data.StageData; setup: its mgjax.train_step.StepSetup."""
    self.config, self.data, self.setup, self.writer = config, data, setup, writer
    self.batch_size = sharding.batch_size_per_process(config.train.eval_batch_size, setup.mesh)
    # The chance level of understanding accuracy: the training mix's most common answers.
    # It reads the whole mix, so it is read once, on the first scoring that needs it.
    self._majority: dict[str, tuple[str, ...]] | None = None

  def losses(self, step: int, trainable: Any, frozen: Any) -> dict[str, float]:
    losses = val_loss.run(self.setup, self.data.encoder, self.data.val_sources, trainable, frozen,
                          batch_size=self.batch_size, num_threads=self.config.data.num_threads)
    for split, value in losses.items():
      self.writer.write(step, split, loss=value)
    return losses

  def fingerprint(self) -> str:
    """What decides the decoded answers besides the weights: the validation data, the
    tokenizer (model.tokenizer's, else the dataset's), the decoding settings and evaluators,
    the model's numerics and the mesh (its split decides the order of reductions). Greedy
    decoding is deterministic, so two evaluations with the same fingerprint and the same
    weights give the same answers."""
    config = self.config
    return hashlib.sha256(
        json.dumps(
            {
                "dataset": [str(self.data.dataset.dataset_dir), self.data.dataset.version],
                "val_splits": list(config.data.val_splits),
                "seq_len": config.data.seq_len,
                "eval": {
                    k: config.eval[k] for k in _DECODING_KEYS
                },
                "evals": config.evals.to_dict(),
                "eval_batch_size": config.train.eval_batch_size,
                "model": self.data.model_cfg.to_dict(),
                "mesh": dict(self.setup.mesh.shape),
            }, sort_keys=True, default=str).encode()).hexdigest()

  def previous_scores(self, init_from: dict) -> dict | None:
    """The decoded scores the stage this one starts from reported for the very checkpoint
    it handed on, when they were decoded with this stage's fingerprint (else None: they
    must be measured)."""
    try:
      previous = reports.read(init_from["workdir"]) or {}
    except reports.ReportDamaged:
      return None  # measured instead
    column = previous.get(f"stage{previous.get('stage')}")
    if not (previous.get("complete") and column and previous.get("eval_fingerprint") == self.fingerprint()):
      return None
    if (previous.get("result") or {}).get("step") != init_from["step"]:
      return None  # started from another of its checkpoints
    return column

  def start_scores(self, params: Any, losses: dict[str, float], init_from: dict) -> dict[str, dict[str, Any]]:
    """The scores of the weights this stage starts from: the previous stage's own report of
    them when it holds the same evaluation (saves decoding every validation set again),
    else measured."""
    previous = self.previous_scores(init_from)
    if previous is None or {key for key, values in previous.items() if "loss" in values} != set(losses):
      return self.scores(0, params, losses)
    scores = {key: dict(values) for key, values in previous.items()}
    for split, value in losses.items():
      scores[split]["loss"] = value
    self._log(0, scores)
    return scores

  def _log(self, step: int, scores: dict[str, dict[str, Any]]) -> None:
    for key, values in scores.items():
      extra = {k: float(v) for k, v in values.items() if k != "loss" and isinstance(v, (int, float))}
      if extra:
        self.writer.write(step, key, **extra)

  def _majority_answers(self) -> dict[str, tuple[str, ...]] | None:
    """None without a train split: then no chance level is shown."""
    if self._majority is None and self.data.dataset.splits.get("train"):
      self._majority = understanding.majority_answers(datasets.open_split(self.data.dataset, "train"))
    return self._majority

  def _decoded(self, params: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    eval_cfg = self.config.eval
    if not eval_cfg.decode or not names:
      return {}
    generator = decode.Generator(self.setup.graphdef, params, self.data.tokenizer, self.data.encoder,
                                 max_batch_size=eval_cfg.batch_size)
    answers = decoding.AnswerCache(generator, self.data.val_sources, eval_cfg.max_new_tokens)
    scores: dict[str, dict[str, Any]] = {}
    for name in names:
      for key, values in DECODED[name].run(answers, self.config.evals[name], majority=self._majority_answers).items():
        scores.setdefault(key, {}).update(values)
    return scores

  def scores(self, step: int, params: Any, losses: dict[str, float]) -> dict[str, dict[str, Any]]:
    """{split: {"loss", and the decoded scores}} of `params`, every evaluator of config.evals
    run, plus a column per evaluator that spans splits (generation_intent)."""
    scores = {split: {"loss": value} for split, value in losses.items()}
    for key, values in self._decoded(params, list(self.config.evals)).items():
      scores.setdefault(key, {}).update(values)
    self._log(step, scores)
    return scores

  def due(self, step: int) -> list[str]:
    """The decoded evaluators config.evals runs at this evaluation step (their `every`)."""
    return [name for name, s in self.config.evals.items() if s.get("every", 0) and step % s.every == 0]

  def periodic(self, step: int, params: Any) -> None:
    """The decoded evaluators due at `step`, logged to metrics.jsonl and TensorBoard."""
    names = self.due(step)
    if names:
      self._log(step, self._decoded(params, names))
