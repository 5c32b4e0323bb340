"""The trainer: one stage of the recipe, from its config to its report.

  run(config, workdir):
    starting point -> mesh -> data -> step setup -> init or restore -> loop -> result -> report

The loop, each step: next batch -> train step -> guard check (one step behind, so the host
never waits for the device) -> log -> evaluate (drift guard, early stopping) -> checkpoint.
It ends at the last step or when `StopTraining` is raised (guard, preemption, early stop,
drift); the reason decides what follows.

Every stage runs through `run`; what makes stage 2 a stage 2 (params-only start from stage
1, its own schedule and split, the drift guard's reference) is config plus mgjax.stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import tqdm
from etils import epath
from flax import nnx

from mgjax import base_config, checkpoint, decode, evaluate as evaluation, metrics, reports
from mgjax import locks, preemption, sharding, stages, train_step, throughput, run_files
from mgjax.data import datasets, pipeline, shared_build
from mgjax.data import chat_tokenizers
from mgjax.models import attention, vlm


@dataclasses.dataclass
class Summary:
  """What a run trained and where it went (printed by main, read by the recipe)."""

  stage: int
  workdir: str
  steps: int  # steps trained (fewer than configured when a guard or early stopping ended the run)
  train_loss: float
  val_loss_start: dict[str, float]
  val_loss_end: dict[str, float]  # at the result checkpoint
  checkpoint: str  # the result: what stage 2, predict and export use
  num_params: int
  num_trainable: int
  seconds: float
  init_from: str | None = None
  report: dict[str, Any] = dataclasses.field(default_factory=dict)

  def format(self) -> str:
    # A report written before it recorded the parameter counts has none to show.
    counts = f", {self.num_trainable:,} of {self.num_params:,} params trained" if self.num_params else ""
    lines = [
        f"{reports.stage_name(self.stage)}: {self.steps} steps in {self.seconds:.0f}s{counts}",
        f"  final train loss {self.train_loss:.4f}",
    ]
    for split, end in self.val_loss_end.items():
      lines.append(f"  {split:<18} loss {self.val_loss_start.get(split, float('nan')):.4f} -> {end:.4f}")
    stopped = self.report.get("stopped")
    if stopped:
      lines.append(f"  stopped at step {stopped['step']}: {stopped['message']}")
    if self.init_from:
      lines.append(f"  started from {self.init_from}")
    lines.append(f"  result     {self.checkpoint}")
    lines.append(f"  report     {os.path.join(self.workdir, 'report.md')}")
    lines.append(
        f"  metrics    {os.path.join(self.workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(self.workdir, 'tensorboard')})"
    )
    return "\n".join(lines)


def total_steps(config: ml_collections.ConfigDict, train_records: int) -> int:
  """train.steps, or train.epochs of the train split when set (the cap stage 2 is sized by)."""
  if config.train.epochs:
    return max(1, math.ceil(config.train.epochs * train_records / config.data.batch_size))
  return config.train.steps


class StopTraining(Exception):
  """Ends the loop before its last step. `reason`: 'guard' (a bad loss or gradient),
  'preempted' (SIGTERM or Ctrl-C), 'early_stop', or 'drift_stop' / 'drift_rollback'."""

  def __init__(self, reason: str, step: int, message: str, last_good_checkpoint: str | None = None):
    super().__init__(message)
    self.reason, self.step, self.message = reason, step, message
    self.last_good_checkpoint = last_good_checkpoint

  def as_dict(self) -> dict[str, Any]:
    """As report.json records it."""
    out = {"reason": self.reason, "step": self.step, "message": self.message}
    if self.reason == "guard":
      out["last_good_checkpoint"] = self.last_good_checkpoint
    return out


# ------------------------------------------------------------------------------ Data


@dataclasses.dataclass
class StageData:
  """The built dataset and what the run reads from it."""
  dataset: datasets.BuiltDataset
  tokenizer: Any
  model_cfg: ml_collections.ConfigDict  # config.model resolved for this tokenizer and platform
  encoder: pipeline.ConversationEncoder
  train_iter: Any
  train_records: int
  val_sources: dict[str, Any]
  tokenizer_record: dict[str, Any]  # checkpoints' meta "tokenizer" (_tokenizer_record)


def open_data(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
              init_checkpoint: str | None = None) -> StageData:
  """Opens the built dataset (the same on every process), checks the tokenizer is the one
  the checkpoints resumed or started from were trained with, saves it into the workdir, and
  opens the train iterator and the validation splits."""
  template = config.model.get("template", "")
  own = llm_tokenizer(config)
  # Built before the run (mgjax.main builds a missing one); every process checks it sees the same build.
  dataset = shared_build.open_shared_build(config.data.recipe, config.data.data_dir)
  tokenizer = own if own is not None else chat_tokenizers.apply_template(chat_tokenizers.load(dataset.tokenizer_dir),
                                                                         template)
  record = _tokenizer_record(tokenizer, config.model.get("tokenizer") or dataset.tokenizer_dir, template, dataset)
  _refuse_other_tokenizer(record, workdir, init_checkpoint)  # before the workdir's copy is replaced
  if jax.process_index() == 0:
    run_files.save_tokenizer(tokenizer, workdir)
  model_cfg = run_files.resolve_model_config(config.model, tokenizer)
  # The attention kernel for this platform and row layout (cuDNN's takes unpacked rows only).
  model_cfg.attention = attention.for_run(model_cfg.get("attention", "auto"), mesh.devices.flat[0].platform,
                                          packed=config.data.packing)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  local_batch = sharding.batch_size_per_process(config.data.batch_size, mesh)
  accum = config.train.grad_accum_steps
  if local_batch % accum or (config.data.batch_size // accum) % sharding.batch_shards(mesh):
    raise ValueError(f"train.grad_accum_steps={accum} must split data.batch_size={config.data.batch_size} into "
                     f"micro-batches that still divide over the {sharding.batch_shards(mesh)} batch shards of the mesh")
  train_source = datasets.open_split(dataset, config.data.train_split)
  if not len(train_source):  # else the first batch ends the run in a bare StopIteration
    recipe, split = config.data.recipe, config.data.train_split
    why = ("pretraining trains on image-caption pairs, and the recipe names no source with category='caption' "
           "(add one, e.g. dict(name=..., format='llava_json', path=..., image_root=..., category='caption'), and "
           "bump its version), or start stage 1 from the LLM instead"
           if split == "train_caption" else f"its sources left nothing for it (see {dataset.data_card})")
    raise ValueError(f"data recipe {recipe.name!r} (version {recipe.version}) has no {split} records: {why}")
  replay_source = (datasets.open_split(dataset, config.data.replay_split) if config.data.replay_fraction > 0 else None)
  train_iter = pipeline.train_iterator(train_source, encoder, batch_size=local_batch, seed=config.seed,
                                       num_threads=config.data.num_threads, prefetch=config.data.prefetch,
                                       replay_source=replay_source, replay_fraction=config.data.replay_fraction,
                                       packing=config.data.packing)
  val_sources = {split: datasets.open_split(dataset, split) for split in config.data.val_splits}
  splits = {config.data.train_split: train_source, **val_sources}
  pipeline.check_lengths(config.data, encoder, splits, log=jax.process_index() == 0)  # over data.seq_len
  return StageData(dataset, tokenizer, model_cfg, encoder, train_iter, len(train_source), val_sources, record)


def llm_tokenizer(config: ml_collections.ConfigDict):
  """The LLM's own tokenizer (model.tokenizer) with the conversation format (model.template;
  '' keeps the tokenizer's own) and the special tokens the pipeline needs, or None when the
  dataset's trained tokenizer is used. Raises at once for a missing folder or a template that
  cannot train, naming the field and the fix."""
  if not config.model.get("tokenizer"):
    return None
  try:
    own = chat_tokenizers.load(config.model.tokenizer)
  except FileNotFoundError as e:  # chat_tokenizers.check_local's reason, with the field and the fix
    raise FileNotFoundError(
        f"model.tokenizer={config.model.tokenizer!r} is not a folder holding the LLM's own tokenizer. Point "
        "--config.model.tokenizer at the LLM's Hugging Face folder or at OUT/tokenizer of `python -m "
        "mgjax.convert import-llm --out=OUT` (for mgm_smol: `python -m mgjax.convert fetch-smollm2` writes "
        f"models/SmolLM2-135M-Instruct). ({e})") from None
  return chat_tokenizers.apply_template(own, config.model.get("template", ""))


def check_before_data(config: ml_collections.ConfigDict) -> None:
  """What stops a run before any data work, so mgjax.main and mgjax.recipe call it before they
  build a missing dataset: config values that cannot run, and an LLM tokenizer or template
  that cannot train."""
  base_config.check_train(config)
  llm_tokenizer(config)


def _tokenizer_record(tokenizer, source: str, template: str, dataset: datasets.BuiltDataset) -> dict[str, Any]:
  return {
      "fingerprint": chat_tokenizers.fingerprint(tokenizer),
      "path": str(source),
      "template": template,
      "dataset": f"{dataset.name} {dataset.version}"
  }


def _recorded_tokenizer(workdir: str, step: int) -> dict[str, Any] | None:
  """The tokenizer record in a checkpoint's meta; None for a checkpoint without one (older,
  imported) or whose meta does not read (the restore decides what to do with that one)."""
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    return ckpts.meta(step).get("tokenizer")
  except checkpoint.CheckpointError:
    return None
  finally:
    ckpts.close()


def _refuse_other_tokenizer(record: dict[str, Any], workdir: str, init_checkpoint: str | None) -> None:
  """Raises ValueError when the checkpoint a run resumes (the newest with a record) or starts
  from (init_checkpoint) was trained with another tokenizer: its token ids would be read as
  other text, and training would go on with exit 0 and a different loss."""
  if checkpoint.has_checkpoints(workdir):
    steps = checkpoint.Checkpoints(workdir, read_only=True)
    candidates = [(workdir, step) for step in sorted(steps.all_steps(), reverse=True)]
    steps.close()
    fix = ("resume with the data version and model.tokenizer/model.template it was trained with (e.g. "
           "--config.data.recipe.version=...), or train this stage from its start in a new --workdir")
  elif init_checkpoint:
    folder = epath.Path(init_checkpoint)
    candidates = [(str(folder.parent.parent), int(folder.name))]
    fix = ("start from a checkpoint trained with this run's tokenizer, or train with the data version and "
           "model.tokenizer/model.template that checkpoint used (e.g. --config.data.recipe.version=...)")
  else:
    return
  for where, step in candidates:
    saved = _recorded_tokenizer(where, step)
    if saved is None:
      continue
    if saved["fingerprint"] != record["fingerprint"]:
      describe = lambda r: (f"{r['path']} (data {r['dataset']}, template {r['template'] or 'its own'!r}, "
                            f"fingerprint {r['fingerprint'][:12]})")
      raise ValueError(f"checkpoint {epath.Path(where) / 'checkpoints' / str(step)} was trained with tokenizer "
                       f"{describe(saved)}, but this run's tokenizer is {describe(record)}: the same token ids "
                       f"would mean other text. To continue from it, {fix}")
    return


def drop_empty_val_splits(config: ml_collections.ConfigDict, data: StageData) -> None:
  """Validation splits the dataset holds no records of are not evaluated (an empty split's
  loss would read 0 and its scores nan), and the run says so. Raises ConfigError before
  training when the empty one is early_stop.split and it decides the result (early stopping,
  or the drift guard's rollback)."""
  empty = [split for split, source in data.val_sources.items() if not len(source)]
  if not empty:
    return
  where = f"the dataset at {data.dataset.dataset_dir}"
  decides = config.early_stop.patience > 0 or config.guard.drift_action == "rollback"
  if config.early_stop.split in empty and decides:
    raise base_config.ConfigError(
        f"early_stop.split={config.early_stop.split!r} holds no records in {where}, so early stopping "
        "and the drift guard's rollback have nothing to pick the result by. Name a validation split with "
        "records (--config.early_stop.split=...), turn them off (--config.early_stop.patience=0 and a "
        "guard.drift_action other than rollback), or give the data recipe records of that category.")
  for split in empty:
    del data.val_sources[split]
  if jax.process_index() == 0:
    guarded = config.init_from and config.guard.drift_action != "off" and set(empty) & set(config.guard.drift_splits)
    message = (f"{', '.join(empty)} of {where} hold(s) no records: not evaluated (no loss, no scores"
               f"{', and the drift guard does not watch it' if guarded else ''})")
    logging.warning("%s", message)
    print(f"warning: {message}", flush=True)


# ------------------------------------------------------------------------------ Evaluation

# The evaluation settings that decide the decoded answers (not, e.g., eval.score_start).
_DECODING_KEYS = ("decode", "max_new_tokens", "batch_size", "accuracy_splits", "generation_splits")


class Evaluator:
  """Validation losses of every val split, and the decoded scores of a set of weights."""

  def __init__(self, config: ml_collections.ConfigDict, data: StageData, setup: train_step.StepSetup,
               writer: metrics.MetricsWriter):
    self.config, self.data, self.setup, self.writer = config, data, setup, writer
    self.batch_size = sharding.batch_size_per_process(config.train.eval_batch_size, setup.mesh)
    # The chance level of understanding accuracy: the training mix's most common answers.
    # It reads the whole mix, so it is read once, on the first scoring that needs it.
    self._chance_answers: dict[str, str] | None = None

  def losses(self, step: int, trainable: Any, frozen: Any) -> dict[str, float]:
    losses = {}
    for split, source in self.data.val_sources.items():
      total, count = 0.0, 0.0
      for batch in pipeline.eval_batches(source, self.data.encoder, batch_size=self.batch_size,
                                         num_threads=self.config.data.num_threads):
        loss_sum, n = self.setup.eval_step(trainable, frozen, sharding.to_global_batch(batch, self.setup.mesh))
        total, count = total + float(loss_sum), count + float(n)
      losses[split] = total / max(count, 1.0)
      self.writer.write(step, split, loss=losses[split])
    return losses

  def fingerprint(self) -> str:
    """What decides the decoded answers besides the weights: the validation data, the
    tokenizer (model.tokenizer's, else the dataset's), the decoding settings, the model's numerics and the mesh
    (its split decides the order of reductions). Greedy decoding is deterministic, so two
    evaluations with the same fingerprint and the same weights give the same answers."""
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
    if previous is None or set(previous) != set(losses):
      return self.scores(0, params, losses)
    scores = {split: {**previous[split], "loss": losses[split]} for split in losses}
    self._log(0, scores)
    return scores

  def _log(self, step: int, scores: dict[str, dict[str, Any]]) -> None:
    for split, values in scores.items():
      extra = {k: v for k, v in values.items() if k != "loss" and isinstance(v, float)}
      if extra:
        self.writer.write(step, split, **extra)

  def scores(self, step: int, params: Any, losses: dict[str, float]) -> dict[str, dict[str, float]]:
    """Losses plus decoded scores (format rate, prompt F1, accuracy) of `params`."""
    eval_cfg, dataset = self.config.eval, self.data.dataset
    if self._chance_answers is None and dataset.splits.get("train") and eval_cfg.decode and eval_cfg.accuracy_splits:
      self._chance_answers = evaluation.majority_answers(datasets.open_split(dataset, "train"))
    generator = decode.Generator(self.setup.graphdef, params, self.data.tokenizer, self.data.encoder,
                                 max_batch_size=eval_cfg.batch_size)
    scores = evaluation.evaluate(generator, self.data.val_sources, losses, eval_cfg, majority=self._chance_answers)
    self._log(step, scores)
    return scores


class Validation:
  """The stage's evaluations and the rules they drive.

  Holds the validation losses by step (the start's and every evaluation's), the scores the
  stage started from, the drift guard (stage 2: understanding must not drift from where the
  stage started) and early stopping (which also tracks the best in-bounds evaluation). All of
  it is saved in every checkpoint's meta (`state`), so it survives a lost metrics.jsonl.
  """

  def __init__(self, config: ml_collections.ConfigDict, evaluator: Evaluator, *, has_init: bool,
               val_start: dict[str, float], start_scores: dict, saved: dict):
    self.evaluator = evaluator
    self.val_start, self.start_scores = val_start, start_scores
    self.history = {int(s): v for s, v in (saved.get("val_history") or {}).items()}
    self.history[0] = val_start
    self.drift = stages.DriftGuard(config.guard, val_start if has_init else None)
    self.early_stop = stages.EarlyStopping(config.early_stop, saved.get("early_stop"))
    self.drift_log = list(saved.get("drift", []))

  def evaluate(self, step: int, trainable: Any, frozen: Any) -> tuple[StopTraining | None, float | None]:
    """Evaluates at `step`: (a stop the rules call for, the checkpoint's score for keeping the best)."""
    losses = self.history[step] = self.evaluator.losses(step, trainable, frozen)
    checked = self.drift.check(losses)
    if checked.changes:
      self.drift_log.append({"step": step, "changes": checked.changes, "within_bounds": checked.within_bounds})
    stop = None
    if self.early_stop.update(step, losses, checked.within_bounds):
      stop = StopTraining(
          "early_stop", step, f"{self.early_stop.split} did not improve for {self.early_stop.patience} "
          f"evaluation(s); best {self.early_stop.best_value:.4f} at step {self.early_stop.best_step}")
    if not checked.within_bounds:
      message = (f"understanding drifted past guard.drift_threshold={self.drift.threshold:.0%} from where "
                 f"this stage started ({checked.describe()}); lower optim.lr, cap train.steps, raise "
                 "data.replay_fraction or use LoRA (lora.rank)")
      if self.drift.action == "warn":
        logging.warning("step %d: %s", step, message)
        tqdm.tqdm.write(f"warning: step {step}: {message}")
      else:
        stop = StopTraining(f"drift_{self.drift.action}", step, message)
    tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return stop, losses.get(self.early_stop.split) if checked.within_bounds else None

  def state(self) -> dict[str, Any]:
    return {
        "start_scores": self.start_scores,
        "early_stop": self.early_stop.state(),
        "drift": self.drift_log,
        "val_start": self.val_start,
        "val_history": {
            str(s): v for s, v in self.history.items()
        },
    }


# ------------------------------------------------------------------------------ Starting point


@dataclasses.dataclass
class Start:
  """Where the loop starts: step 0 of a fresh run, or a resumed run's checkpoint."""
  step: int
  params: Any  # the model's plain weights (LoRA: the frozen base)
  trainable: Any
  frozen: Any
  opt_state: Any
  init_from: dict | None  # the checkpoint this stage started from (stages.load_init_params)
  saved: dict  # the resumed checkpoint's meta ({} for a fresh start)


def init_or_restore(setup: train_step.StepSetup, ckpts: checkpoint.Checkpoints, data: StageData,
                    init_checkpoint: str | None) -> Start:
  """A killed run restarted with the same command continues exactly where it stopped, from
  the newest checkpoint that reads back intact (damaged ones are moved aside); a fresh run
  starts from `init_checkpoint` (stage 2: stage 1's result) or from new weights."""
  view = setup.trainable
  if ckpts.all_steps():
    step, params, opt_state, saved, adapters = ckpts.restore_latest_intact(abstract_params=setup.abstract_params,
                                                                           abstract_opt_state=setup.abstract_opt_state,
                                                                           data_iter=data.train_iter,
                                                                           abstract_adapters=view.restore_target)
    if step is None:
      raise checkpoint.CheckpointError(
          f"no checkpoint under {ckpts.directory} reads back intact (the damaged ones are now in "
          f"{ckpts.directory.parent / 'corrupt_checkpoints'}); to train this stage from its start, "
          "use a new --workdir")
    if step:
      init_from = saved.get("init_from")
      base = lambda: (stages.load_init_params(init_from["checkpoint"], setup.abstract_params)[0]
                      if init_from else setup.init_params())
      trainable, frozen = view.resume(params, adapters, base)
      logging.info("resumed from %s at step %d", ckpts.directory / str(step), step)
      return Start(step, frozen if view.lora else params, trainable, frozen, opt_state, init_from, saved)
  init_from = None
  if init_checkpoint:
    params, init_from = stages.load_init_params(init_checkpoint, setup.abstract_params)
  else:
    params = setup.init_params()
  trainable, frozen = view.start(params)
  return Start(0, params, trainable, frozen, setup.init_opt_state(trainable), init_from, {})


# ------------------------------------------------------------------------------ The run


def run(config: ml_collections.ConfigDict, workdir: str) -> Summary:
  """Trains one stage in `workdir` (resuming what a killed run left there) and reports it.

  Process 0 holds the workdir's lock for the whole run (mgjax.locks): a second run on the
  same workdir is refused with locks.LockHeld naming the first. A finished run only reports
  what it made, without the lock or any write, so a read-only workdir still answers; an
  unfinished one there is refused with run_files.NotWritable.
  """
  base_config.check_train(config)  # before any data work or compiling
  started = time.time()
  try:
    finished = reports.read(workdir)
  except reports.ReportDamaged:
    finished = None  # rebuilt: _run sets it aside and finishes the run from its checkpoints
  if finished and finished.get("complete"):
    return _summary_from_report(config, workdir, finished, started)  # nothing to train: report what it made
  if jax.process_index() != 0:
    return _run(config, workdir, started)
  try:
    with locks.exclusive(workdir, "mgjax_run", f"workdir {workdir}"):
      return _run(config, workdir, started)
  except OSError as e:
    refused = run_files.not_writable(e, workdir)
    if refused is None:
      raise
    raise refused from None


def _run(config: ml_collections.ConfigDict, workdir: str, started: float) -> Summary:
  if jax.process_index() == 0:
    try:
      reports.read(workdir)
    except reports.ReportDamaged as e:
      moved = reports.set_aside(workdir)
      logging.warning("%s", e)
      print(f"warning: {workdir}/report.json is damaged: moved to {moved}; rewriting it", flush=True)
  # The checkpoint this stage starts from, checked before any data work; a resumed run
  # takes it from its own checkpoint's meta instead.
  init_checkpoint = (stages.init_checkpoint(config.init_from, config.get("init_from_step", -1))
                     if config.init_from and not checkpoint.has_checkpoints(workdir) else None)
  mesh = sharding.make_mesh(config.mesh)
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())
  data = open_data(config, workdir, mesh, init_checkpoint)
  drop_empty_val_splits(config, data)
  steps = total_steps(config, data.train_records)
  setup = train_step.setup(config, data.model_cfg, mesh, steps)
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=config.train.max_to_keep)
  start = init_or_restore(setup, ckpts, data, init_checkpoint)
  trainable, opt_state, frozen, init_from = start.trainable, start.opt_state, start.frozen, start.init_from
  num_params = sum(x.size for x in jax.tree.leaves(start.params))
  num_trainable = setup.trainable.count(start.params, trainable)
  # Stage N's TensorBoard steps continue after the stages it started from.
  global_offset = (init_from or {}).get("global_step", 0)
  writer = metrics.MetricsWriter(workdir, resume_step=start.step or None, tensorboard_offset=global_offset)
  evaluator = Evaluator(config, data, setup, writer)
  guard = stages.TrainingGuard(config.guard, config.optim)
  peak_tflops = throughput.peak_tflops_per_device(override=config.train.peak_tflops)
  meta = {
      "stage": config.stage,
      "config": config.to_dict(),
      "init_from": init_from,
      "tokenizer": data.tokenizer_record,
      "global_step_offset": global_offset,
      "dataset": {
          "name": data.dataset.name,
          "path": str(data.dataset.dataset_dir),
          "version": data.dataset.version
      }
  }

  # Traced under the mesh and the rules, the model pins activation shardings by logical
  # name (mgjax.models.axes.constrain): the batch stays split the way the data arrives, and
  # it avoids an XLA SPMD miscompile seen on CPU without the pins.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(setup.rules), preemption.PreemptionWatch() as sigterm:
    if start.step == 0:
      val_start = evaluator.losses(0, trainable, frozen)
      # Stage 2's starting point is stage 1's result: score it in full, as the "before".
      start_scores = (evaluator.start_scores(start.params, val_start, init_from)
                      if init_from and config.eval.score_start else {
                          split: {
                              "loss": loss
                          } for split, loss in val_start.items()
                      })
    else:
      # The guards' reference and the evaluations so far come from the checkpoint, so they
      # survive a lost or truncated metrics.jsonl (older checkpoints: from the metrics).
      val_start = start.saved.get("val_start") or metrics.val_losses_at(workdir, 0)
      start_scores = start.saved["start_scores"]
    validation = Validation(config, evaluator, has_init=bool(init_from), val_start=val_start, start_scores=start_scores,
                            saved=start.saved)
    if start.step and start.step not in validation.history:
      validation.history[start.step] = metrics.val_losses_at(workdir, start.step)
    if start.step == 0 and init_from:
      validation.early_stop.update(0, val_start, within_bounds=True)  # the starting point is a candidate result
    train_loss = (start.saved.get("train_loss", metrics.train_loss_at(workdir, start.step))
                  if start.step else float("nan"))
    window = throughput.Window(jax.process_count())
    progress = tqdm.tqdm(total=steps, initial=start.step, disable=jax.process_index() != 0,
                         desc=reports.stage_name(config.stage), dynamic_ncols=True)
    step, compiled_step, flops_per_device, stop = start.step, None, None, None
    # A run killed after early stopping or the drift guard ended it, before it reported: the
    # same command finishes it as it was ending, without training past the stop.
    ended = start.saved.get("stopped") or {}
    if ended.get("reason") in ("early_stop", "drift_stop", "drift_rollback"):
      stop = StopTraining(ended["reason"], ended["step"], ended["message"])
    pending = None  # the previous step's metrics, checked once the next step is dispatched
    try:
      while step < steps and not stop:
        step += 1
        local = next(data.train_iter)
        window.add_batch(local)
        batch = sharding.to_global_batch(local, mesh)
        if compiled_step is None:
          compiled_step = setup.train_step.lower(trainable, opt_state, frozen, batch).compile()
          flops_per_device = setup.flops_per_device(compiled_step, trainable, frozen, batch)
          sharding.wait_for_all_processes("mgjax: train step compiled")  # before its first collective
          window.reset_clock()  # rates measure training, not compiling
        trainable, opt_state, step_metrics = compiled_step(trainable, opt_state, frozen, batch)
        window.add_metrics(step_metrics)
        progress.update(1)
        if pending:
          check_step(guard, ckpts, *pending)  # the previous step, while this one runs
        pending = (step, step_metrics)
        is_eval = step % config.train.eval_every == 0 or step == steps
        # SIGTERM (spot VM preemption, a stopped job): the step in flight is done; log and save it.
        preempted = sigterm.requested(step)
        is_log = step % config.train.log_every == 0 or step == steps or preempted
        if is_eval or preempted or is_log or step % config.train.checkpoint_every == 0:
          check_step(guard, ckpts, *pending)  # nothing bad may be logged as good, or saved
          pending = None
        stop = StopTraining("preempted", step, f"{sigterm.signal_name} received") if preempted else None
        if is_log:
          logged = window.close(flops_per_device=flops_per_device, peak_tflops=peak_tflops, num_devices=mesh.size)
          train_loss, mean_loss = logged.pop("last_loss"), logged.pop("loss")
          writer.write(step, "train", loss=mean_loss, lr=float(setup.lr_schedule(step - 1)),
                       grad_norm=float(step_metrics["grad_norm"]), **logged)
          progress.set_postfix(loss=f"{mean_loss:.3f}",
                               **{k: f"{logged[k]:.3g}" for k in ("tflops_per_device", "mfu") if k in logged})
        score = None
        if is_eval:
          eval_started = time.time()
          eval_stop, score = validation.evaluate(step, trainable, frozen)
          stop = eval_stop or stop
          window.exclude(time.time() - eval_started)  # the next log's rates exclude evaluating
        if is_eval or step % config.train.checkpoint_every == 0 or stop:
          ckpts.save(
              step, params=setup.merged(trainable, frozen), opt_state=opt_state, data_iter=data.train_iter,
              adapters=setup.trainable.adapters(trainable), score=score, meta={
                  **meta, "step": step,
                  **validation.state(), "train_loss": train_loss,
                  "stopped": stop.as_dict() if stop else None
              })
        if stop:
          raise stop
    except StopTraining as e:
      stop = e
    progress.close()
    ckpts.wait()
    if stop and stop.reason in ("preempted", "guard"):
      writer.close()
      ckpts.close()
      raise _stopped_error(config, stop, steps, ckpts, sigterm.signal_name)

    result = stages.choose_result(config, validation.early_stop, stop and stop.reason, step, init_from, ckpts)
    result_params = (setup.merged(trainable, frozen) if result.step == step else stages.load_init_params(
        result.checkpoint, setup.abstract_params)[0])
    val_result = validation.history.get(result.step) or metrics.val_losses_at(workdir, result.step)
    # A stage that never beat its start hands the start on: its scores are already measured.
    decoded_start = init_from and config.eval.score_start
    end_scores = (start_scores if result.step == 0 and decoded_start else evaluator.scores(
        result.step, result_params, val_result))

  report = {
      "stage": config.stage,
      f"stage{config.stage}": end_scores,
      "complete": True,
      "result": {
          "step": result.step,
          "checkpoint": checkpoint.relative_to(result.checkpoint, workdir),
          "why": result.why
      },
      "stopped": stop.as_dict() if stop else None,
      "drift": validation.drift_log,
      "steps_trained": step,
      "params": {
          "total": int(num_params),
          "trained": int(num_trainable)
      },
      _start_key(config.stage, init_from): start_scores,
      "eval_fingerprint": evaluator.fingerprint(),
  }
  if init_from:  # stage 2 against stage 1's weights, answer by answer
    report["compared"] = evaluation.compare(end_scores, start_scores, config.eval.hold_margin)
    report["hold_margin"] = config.eval.hold_margin
    # Where report.png finds the stages before this one, and where it puts them.
    report["init_from_workdir"] = init_from["workdir"]
    report["init_from"] = init_from["checkpoint"]
    report["global_step_offset"] = global_offset
    if validation.drift.action in ("stop", "rollback"):  # bounds that end the run (report.png draws them)
      report["drift_bounds"] = {
          s: validation.drift.reference[s] * (1 + validation.drift.threshold) for s in validation.drift.splits
      }
  if jax.process_index() == 0:
    reports.write(workdir, report)
  ckpts.close()
  writer.close()
  return Summary(stage=config.stage, workdir=workdir, steps=step, train_loss=train_loss, val_loss_start=val_start,
                 val_loss_end=val_result, checkpoint=result.checkpoint, num_params=int(num_params),
                 num_trainable=int(num_trainable), seconds=time.time() - started,
                 init_from=init_from["checkpoint"] if init_from else None, report=report)


def check_step(guard: stages.TrainingGuard, ckpts: checkpoint.Checkpoints, at: int, step_metrics: dict) -> None:
  """Raises StopTraining('guard') when step `at`'s loss or gradient went wrong."""
  problem = guard.check(at, float(step_metrics["loss"]), float(step_metrics["grad_norm"]), float(step_metrics["count"]))
  if problem:
    # A checkpoint of the step before holds the very weights that gave this loss.
    ckpts.wait()
    if at - 1 in ckpts.all_steps():
      ckpts.delete(at - 1)
    last = ckpts.latest_step()
    raise StopTraining("guard", at, problem, str(ckpts.directory / str(last)) if last else None)


def _stopped_error(config, stop: StopTraining, steps: int, ckpts: checkpoint.Checkpoints,
                   signal_name: str) -> Exception:
  """What a preempted or guarded run raises to main (which prints it and exits)."""
  if stop.reason == "preempted":
    saved = str(ckpts.directory / str(stop.step))
    return preemption.Preempted(
        f"{reports.stage_name(config.stage)} stopped by {signal_name} after step {stop.step} of {steps}; "
        f"checkpoint {saved} holds everything needed: run the same command again to resume.", step=stop.step,
        checkpoint=saved, signal_name=signal_name)
  last = stop.last_good_checkpoint
  return stages.GuardTripped(
      f"stage {config.stage} stopped at step {stop.step}: {stop.message}\n" +
      (f"Last good checkpoint: {last} (nothing after it was saved)." if last else "No checkpoint was saved before it."),
      reason="guard", step=stop.step, checkpoint=last)


def _start_key(stage: int, init_from: Any) -> str:
  """The report key of a stage's starting scores: the stage it started from ("stage0",
  "stage1"), or "start" for a stage trained from scratch."""
  return f"stage{stage - 1}" if init_from and stage > 0 else "start"


def _summary_from_report(config, workdir: str, report: dict, started: float) -> Summary:
  result = dict(report["result"], checkpoint=checkpoint.result_checkpoint(workdir))
  stage_scores = report[f"stage{config.stage}"]
  start_scores = next((report[k] for k in (f"stage{config.stage - 1}", "start") if k in report), {})
  return Summary(stage=config.stage, workdir=workdir, steps=report["steps_trained"],
                 train_loss=metrics.train_loss_at(workdir, report["steps_trained"]), val_loss_start={
                     s: v["loss"] for s, v in start_scores.items()
                 }, val_loss_end={
                     s: v["loss"] for s, v in stage_scores.items()
                 }, checkpoint=result["checkpoint"], num_params=(report.get("params") or {}).get("total", 0),
                 num_trainable=(report.get("params") or {}).get("trained", 0), seconds=time.time() - started,
                 init_from=report.get("init_from"), report=report)
