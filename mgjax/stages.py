"""What makes stage 2 a stage 2, and the guards that keep it in check.

Stage 2 starts from stage 1's *params only* (a fresh optimizer with its own, gentler
schedule) and records which checkpoint it started from, so every stage-2 result can be
traced back to the stage-1 run under it.

Specialising on the small, one-note generation subset fails in known ways: the loss
falls to 0 with NaN logits within a few steps (Mini-Gemini's own users reported it), or
the model forgets how to answer about images. So the trainer asks, after every step and
every evaluation:

  TrainingGuard   is the loss finite, and not collapsed to ~0?      -> stop, keep last good checkpoint
  DriftGuard      have val_understanding / val_text drifted from    -> warn, stop, or roll back
                  where stage 2 started (stage 1's final values)?
  EarlyStopping   has val_generation stopped improving?             -> stop, keep the best checkpoint

The classes hold plain numbers and make decisions; the trainer acts on them. Validation
ties the guards to the stage's evaluations; StopTraining carries the reason a run ends
early, check_step raises it for a bad step, and stopped_error turns it into what main prints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import logging
from etils import epath
import ml_collections
import tqdm

from mgjax import checkpoint, preemption, reports

DRIFT_ACTIONS = ("off", "warn", "stop", "rollback")


class GuardTripped(RuntimeError):
  """The run stopped because training went wrong; the message says what and what to change."""

  def __init__(self, message: str, *, reason: str, step: int, checkpoint: str | None):
    super().__init__(message)
    self.reason = reason
    self.step = step
    self.checkpoint = checkpoint


def init_checkpoint(init_from: str, init_from_step: int = -1) -> str:
  """The checkpoint folder a stage starts from: `init_from`'s result when it names a
  finished run (or its checkpoints/ folder), its checkpoint `init_from_step` when given (>= 0), or
  the checkpoints/<step> folder it names. Cheap (no arrays read), so a run checks it before
  any data work. Raises checkpoint.CheckpointError saying what to run or pass otherwise."""
  workdir, step = checkpoint.locate(init_from, require_finished=True, step=init_from_step)
  return str(epath.Path(workdir) / "checkpoints" / str(step))


def load_init_params(init_from: str, abstract_params: Any) -> tuple[Any, dict]:
  """Restores the params of `init_from`'s result checkpoint into the model's layout.

  `init_from` is a workdir, its checkpoints/ folder, or one checkpoints/<step> folder.
  Raises checkpoint.CheckpointError naming what to run when there is no checkpoint, and
  listing every mismatched parameter path when the shapes do not fit.
  """
  workdir, step = checkpoint.locate(init_from)
  source = checkpoint.Checkpoints(workdir, read_only=True)
  params, meta = source.restore_params(step, abstract_params)
  source.close()
  return params, {
      "workdir": workdir,
      "step": step,
      "checkpoint": str(source.directory / str(step)),
      "stage": meta.get("stage"),
      # Where the stage after it starts counting on TensorBoard: after every step before.
      "global_step": int(meta.get("global_step_offset", 0)) + step,
  }


@dataclasses.dataclass(frozen=True)
class Result:
  """The checkpoint a stage hands on (report.json's result), and why that one."""
  step: int
  checkpoint: str
  why: str


def choose_result(config: ml_collections.ConfigDict, early_stop: EarlyStopping, stop_reason: str | None, last_step: int,
                  init_from: dict | None, ckpts: checkpoint.Checkpoints) -> Result:
  """The best in-bounds evaluation under early stopping or after a drift rollback (stage 2's
  own start is a candidate: stage 2 must not make things worse), else the last step."""
  step, why = last_step, "last step"
  keep_best = config.early_stop.patience > 0 or stop_reason == "drift_rollback"
  if keep_best and early_stop.best_step is not None:
    step, why = early_stop.best_step, f"best {early_stop.split} loss within the drift bounds"
  if step == 0:
    return Result(0, init_from["checkpoint"], "no step improved on the checkpoint this stage started from")
  return Result(step, str(ckpts.directory / str(step)), why)


# ---------------------------------------------------------------------------------------
# After every step: a finite, non-collapsed loss
# ---------------------------------------------------------------------------------------


class TrainingGuard:
  """Stops on a NaN/Inf loss or gradient, on a loss collapsed below `collapse_loss`, and on
  batches with nothing to learn from (an empty loss mask also reads as loss 0)."""

  def __init__(self, guard_cfg: ml_collections.ConfigDict, optim_cfg: ml_collections.ConfigDict):
    self.collapse_loss = float(guard_cfg.collapse_loss)
    self.lr = optim_cfg.lr
    self.last_good: tuple[int, float] | None = None

  def check(self, step: int, loss: float, grad_norm: float, supervised_tokens: float) -> str | None:
    """Returns what went wrong at `step` (a message for the user), or None if all is well."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      last = (f"the last finite loss was {self.last_good[1]:.4f} at step {self.last_good[0]}"
              if self.last_good else "no step had a finite loss")
      return (f"non-finite training loss at step {step} (loss {loss}, grad norm {grad_norm}); {last}. "
              f"Usual causes: a learning rate too high for this stage (optim.lr={self.lr:g}; try 10x "
              "lower), no gradient clipping (optim.grad_clip), or bf16 overflow (model.dtype=float32 "
              "rules it out).")
    if supervised_tokens == 0:
      return (f"step {step} had no supervised tokens: the loss mask is empty, so the loss reads 0 "
              "and nothing is learned. Assistant turns are being cut off: raise data.seq_len, or "
              "check that the chat template marks assistant turns ({% generation %} blocks).")
    if loss < self.collapse_loss:
      return (f"training loss collapsed to {loss:.2e} at step {step} (guard.collapse_loss="
              f"{self.collapse_loss:g}): the model has memorised its training set, which on the "
              "small generation subset comes just before NaN logits. Lower optim.lr (now "
              f"{self.lr:g}), cap train.steps or train.epochs, replay some of the stage-1 mix "
              "(data.replay_fraction), or turn on early stopping (early_stop.patience).")
    self.last_good = (step, loss)
    return None


# ---------------------------------------------------------------------------------------
# After every evaluation: drift and early stopping
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class DriftCheck:
  within_bounds: bool
  # split -> relative change of its loss from the reference (+0.1: 10% worse)
  changes: dict[str, float]

  def describe(self) -> str:
    return ", ".join(f"{s} {c:+.1%}" for s, c in self.changes.items())


class DriftGuard:
  """Compares the understanding/text validation losses with stage 1's final ones.

  The reference is the evaluation at the start of the run, i.e. stage 1's final params
  on the same validation sets; a split whose loss rose by more than `threshold`
  (relative) is out of bounds.
  """

  def __init__(self, guard_cfg: ml_collections.ConfigDict, reference: dict[str, float] | None):
    if guard_cfg.drift_action not in DRIFT_ACTIONS:
      raise ValueError(f"guard.drift_action={guard_cfg.drift_action!r}: expected one of {DRIFT_ACTIONS}")
    self.action = guard_cfg.drift_action if reference else "off"
    self.threshold = float(guard_cfg.drift_threshold)
    self.splits = tuple(s for s in guard_cfg.drift_splits if reference and s in reference)
    self.reference = reference or {}

  def check(self, losses: dict[str, float]) -> DriftCheck:
    changes = {s: losses[s] / self.reference[s] - 1.0 for s in self.splits if s in losses}
    within = self.action == "off" or all(c <= self.threshold for c in changes.values())
    return DriftCheck(within_bounds=within, changes=changes)


class EarlyStopping:
  """Tracks the best evaluation of `split` (lower loss is better) among in-bounds ones.

  patience 0 keeps tracking the best (so the best checkpoint is kept and reported) but
  never stops the run.
  """

  def __init__(self, early_stop_cfg: ml_collections.ConfigDict, state: dict | None = None):
    self.split = early_stop_cfg.split
    self.patience = int(early_stop_cfg.patience)
    self.min_delta = float(early_stop_cfg.min_delta)
    state = state or {}
    self.best_step: int | None = state.get("best_step")
    best_value = state.get("best_value")
    self.best_value: float = math.inf if best_value is None else float(best_value)
    self.evals_without_improvement: int = state.get("evals_without_improvement", 0)

  def update(self, step: int, losses: dict[str, float], within_bounds: bool) -> bool:
    """Records an evaluation; True when the run should stop."""
    value = losses.get(self.split)
    if value is None:  # an empty split, not evaluated: it decides nothing (stage_data.drop_empty_val_splits)
      return False
    if within_bounds and (self.best_step is None or value < self.best_value - self.min_delta):
      self.best_step, self.best_value = step, value
      self.evals_without_improvement = 0
    else:
      self.evals_without_improvement += 1
    return self.patience > 0 and self.evals_without_improvement >= self.patience

  def state(self) -> dict:
    return {
        "best_step": self.best_step,
        "best_value": None if self.best_step is None else self.best_value,
        "evals_without_improvement": self.evals_without_improvement
    }


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


class Validation:
  """The stage's evaluations and the rules they drive.

  Holds the validation losses by step (the start's and every evaluation's), the scores the
  stage started from, the drift guard (stage 2: understanding must not drift from where the
  stage started) and early stopping (which also tracks the best in-bounds evaluation). All of
  it is saved in every checkpoint's meta (`state`), so it survives a lost metrics.jsonl.
  """

  def __init__(self, config: ml_collections.ConfigDict, evaluator: Any, *, has_init: bool, val_start: dict[str, float],
               start_scores: dict, saved: dict):
    self.evaluator = evaluator
    self.val_start, self.start_scores = val_start, start_scores
    self.history = {int(s): v for s, v in (saved.get("val_history") or {}).items()}
    self.history[0] = val_start
    self.drift = DriftGuard(config.guard, val_start if has_init else None)
    self.early_stop = EarlyStopping(config.early_stop, saved.get("early_stop"))
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


def check_step(guard: TrainingGuard, ckpts: checkpoint.Checkpoints, at: int, step_metrics: dict) -> None:
  """Raises StopTraining('guard') when step `at`'s loss or gradient went wrong."""
  problem = guard.check(at, float(step_metrics["loss"]), float(step_metrics["grad_norm"]), float(step_metrics["count"]))
  if problem:
    # A checkpoint of the step before holds the very weights that gave this loss.
    ckpts.wait()
    if at - 1 in ckpts.all_steps():
      ckpts.delete(at - 1)
    last = ckpts.latest_step()
    raise StopTraining("guard", at, problem, str(ckpts.directory / str(last)) if last else None)


def stopped_error(config, stop: StopTraining, steps: int, ckpts: checkpoint.Checkpoints, signal_name: str) -> Exception:
  """What a preempted or guarded run raises to main (which prints it and exits)."""
  if stop.reason == "preempted":
    saved = str(ckpts.directory / str(stop.step))
    return preemption.Preempted(
        f"{reports.stage_name(config.stage)} stopped by {signal_name} after step {stop.step} of {steps}; "
        f"checkpoint {saved} holds everything needed: run the same command again to resume.", step=stop.step,
        checkpoint=saved, signal_name=signal_name)
  last = stop.last_good_checkpoint
  return GuardTripped(
      f"stage {config.stage} stopped at step {stop.step}: {stop.message}\n" +
      (f"Last good checkpoint: {last} (nothing after it was saved)." if last else "No checkpoint was saved before it."),
      reason="guard", step=stop.step, checkpoint=last)
