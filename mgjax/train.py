"""The trainer: one stage of the recipe, from its config to its report.

  run(config, workdir):
    starting point -> mesh -> data -> step setup -> init or restore -> loop -> result -> report

The loop, each step: next batch -> train step -> guard check (one step behind, so the host
never waits for the device) -> log -> evaluate (drift guard, early stopping) -> checkpoint.
It ends at the last step or when `stages.StopTraining` is raised (guard, preemption, early stop,
drift); the reason decides what follows.

Every stage runs through `run`; what makes stage 2 a stage 2 (params-only start from stage
1, its own schedule and split, the drift guard's reference) is config plus mgjax.stages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import tqdm
from flax import nnx

from mgjax import base_config, checkpoint, locks, metrics, preemption, reports, run_files, sharding, stage_data, stages
from mgjax import throughput, train_step
from mgjax.evaluators import compare, suite


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


def check_before_data(config: ml_collections.ConfigDict) -> None:
  """What stops a run before any data work, so mgjax.main and mgjax.recipe call it before they
  build a missing dataset: config values that cannot run, and an LLM tokenizer or template
  that cannot train."""
  base_config.check_train(config)
  stage_data.llm_tokenizer(config)


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


def init_or_restore(setup: train_step.StepSetup, ckpts: checkpoint.Checkpoints, data: stage_data.StageData,
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


def finished_report(workdir: str) -> dict | None:
  """report.json of the finished stage in `workdir`, else None (none, unfinished, or damaged:
  the run rebuilds it from its checkpoints). `run` then only reports what it made."""
  try:
    report = reports.read(workdir) or {}
  except reports.ReportDamaged:
    report = {}
  return report if report.get("complete") else None


def run(config: ml_collections.ConfigDict, workdir: str) -> Summary:
  """Trains one stage in `workdir` (resuming what a killed run left there) and reports it.

  Process 0 holds the workdir's lock for the whole run (mgjax.locks): a second run on the
  same workdir is refused with locks.LockHeld naming the first. A finished run only reports
  what it made, without the lock or any write, so a read-only workdir still answers; an
  unfinished one there is refused with run_files.NotWritable.
  """
  base_config.check_train(config)  # before any data work or compiling
  started = time.time()
  finished = finished_report(workdir)
  if finished:
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
  data = stage_data.open_data(config, workdir, mesh, init_checkpoint)
  stage_data.drop_empty_val_splits(config, data)
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
  evals = suite.Suite(config, data, setup, writer)
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
      val_start = evals.losses(0, trainable, frozen)
      # Stage 2's starting point is stage 1's result: score it in full, as the "before".
      start_scores = (evals.start_scores(start.params, val_start, init_from)
                      if init_from and config.eval.score_start else {
                          split: {
                              "loss": loss
                          } for split, loss in val_start.items()
                      })
    else:
      # The guards' reference and the evaluations so far come from the checkpoint, so they
      # survive a lost or truncated metrics.jsonl.
      val_start = start.saved["val_start"]
      start_scores = start.saved["start_scores"]
    validation = stages.Validation(config, evals, has_init=bool(init_from), val_start=val_start,
                                   start_scores=start_scores, saved=start.saved)
    if start.step == 0 and init_from:
      validation.early_stop.update(0, val_start, within_bounds=True)  # the starting point is a candidate result
    train_loss = start.saved["train_loss"] if start.step else float("nan")
    window = throughput.Window(jax.process_count())
    progress = tqdm.tqdm(total=steps, initial=start.step, disable=jax.process_index() != 0,
                         desc=reports.stage_name(config.stage), dynamic_ncols=True)
    step, compiled_step, step_flops, stop = start.step, None, None, None
    # A run killed after early stopping or the drift guard ended it, before it reported: the
    # same command finishes it as it was ending, without training past the stop.
    ended = start.saved.get("stopped") or {}
    if ended.get("reason") in ("early_stop", "drift_stop", "drift_rollback"):
      stop = stages.StopTraining(ended["reason"], ended["step"], ended["message"])
    pending = None  # the previous step's metrics, checked once the next step is dispatched
    try:
      while step < steps and not stop:
        step += 1
        local = next(data.train_iter)
        window.add_batch(local)
        batch = sharding.to_global_batch(local, mesh)
        if compiled_step is None:
          compiled_step = setup.train_step.lower(trainable, opt_state, frozen, batch).compile()
          step_flops = setup.step_flops(compiled_step, batch)  # model and hardware FLOPs (mgjax.flops)
          sharding.wait_for_all_processes("mgjax: train step compiled")  # before its first collective
          window.reset_clock()  # rates measure training, not compiling
        trainable, opt_state, step_metrics = compiled_step(trainable, opt_state, frozen, batch)
        window.add_metrics(step_metrics)
        progress.update(1)
        if pending:
          stages.check_step(guard, ckpts, *pending)  # the previous step, while this one runs
        pending = (step, step_metrics)
        is_eval = step % config.train.eval_every == 0 or step == steps
        # SIGTERM (spot VM preemption, a stopped job): the step in flight is done; log and save it.
        preempted = sigterm.requested(step)
        is_log = step % config.train.log_every == 0 or step == steps or preempted
        if is_eval or preempted or is_log or step % config.train.checkpoint_every == 0:
          stages.check_step(guard, ckpts, *pending)  # nothing bad may be logged as good, or saved
          pending = None
        stop = stages.StopTraining("preempted", step, f"{sigterm.signal_name} received") if preempted else None
        if is_log:
          logged = window.close(flops=step_flops, peak_tflops=peak_tflops, num_devices=mesh.size)
          train_loss, mean_loss = logged.pop("last_loss"), logged.pop("loss")
          writer.write(step, "train", loss=mean_loss, lr=float(setup.lr_schedule(step - 1)),
                       grad_norm=float(step_metrics["grad_norm"]), **logged)
          progress.set_postfix(loss=f"{mean_loss:.3f}",
                               **{k: f"{logged[k]:.3g}" for k in ("mfu", "hfu") if k in logged})
        score = None
        if is_eval:
          eval_started = time.time()
          eval_stop, score = validation.evaluate(step, trainable, frozen)
          if evals.due(step) and not preempted:  # decoded evaluators config.evals runs every N steps
            evals.periodic(step, setup.merged(trainable, frozen))
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
    except stages.StopTraining as e:
      stop = e
    progress.close()
    ckpts.wait()
    if stop and stop.reason in ("preempted", "guard"):
      writer.close()
      ckpts.close()
      raise stages.stopped_error(config, stop, steps, ckpts, sigterm.signal_name)

    result = stages.choose_result(config, validation.early_stop, stop and stop.reason, step, init_from, ckpts)
    result_params = (setup.merged(trainable, frozen) if result.step == step else stages.load_init_params(
        result.checkpoint, setup.abstract_params)[0])
    val_result = validation.history.get(result.step)
    if val_result is None:  # resumed with fewer train.steps than it had trained: the result is now
      val_result = evals.losses(result.step, trainable, frozen)
    # A stage that never beat its start hands the start on: its scores are already measured.
    decoded_start = init_from and config.eval.score_start
    end_scores = (start_scores if result.step == 0 and decoded_start else evals.scores(
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
      "eval_fingerprint": evals.fingerprint(),
  }
  if init_from:  # stage 2 against stage 1's weights, answer by answer
    report["compared"] = compare.compare(end_scores, start_scores, config.eval.hold_margin)
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
                     s: v["loss"] for s, v in start_scores.items() if "loss" in v
                 }, val_loss_end={
                     s: v["loss"] for s, v in stage_scores.items() if "loss" in v
                 }, checkpoint=result["checkpoint"], num_params=(report.get("params") or {}).get("total", 0),
                 num_trainable=(report.get("params") or {}).get("trained", 0), seconds=time.time() - started,
                 init_from=report.get("init_from"), report=report)
