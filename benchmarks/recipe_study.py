"""The recipe study: do the recipe's claims hold on the sample, over several seeds?

  python benchmarks/recipe_study.py [--workdir=runs/study] [--seeds=0,1,2] [--arms=a,b,c,d,e]
                                    [--data=sample] [--data_dir=DIR] [--stage1_steps=N] [--stage2_steps=N]

Per seed (config.seed: the weights' initialisation and the order batches are drawn in),
one pretraining run (configs/pretrain.py), then five arms from it:

  a  recipe        stage 1 (configs/stage1.py), then stage 2 (configs/stage2.py) from its result
  b  direct        generation data only (train_generation) with stage 1's settings, for
                   stage 1's + stage 2's steps: specialising straight away
  c  stage 1 only  stage 1 for stage 1's + stage 2's steps: the same compute on the mix
  d  uncontrolled  from a's stage 1: stage 2 at stage 1's learning rate for 5x stage 2's
                   steps, no early stop, drift guard off
  e  guarded       d with the drift guard on (rollback) and a quarter of each batch
                   replayed from the stage-1 mix

a, b and c spend the same steps after pretraining. Every run is an ordinary
`mgjax.train.run` in WORKDIR/seed<S>/<run>, so an interrupted study resumes where it
stopped (finished runs are not trained again). Each arm's scores are its last run's
report (its result checkpoint, decoded on the validation sets); across seeds they are
summarised by their mean and a 95% t-interval (n seeds, t with n-1 degrees of freedom),
and arms are compared seed by seed (same seed, same pretraining). Stage 2's own claims are
also read from each seed's paired bootstrap over answers (report.json `compared`).

Writes WORKDIR/study.json (every number), study.md (the tables and the verdict on each
claim, as pasted into benchmarks/RESULTS.md) and study.png.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mgjax import recipe, reports, runtime, stages  # noqa: E402  (after the path above)

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed); each gets its own pretraining.")
_ARMS = flags.DEFINE_list(
    "arms", list("abcde"), "Which arms to run (a recipe, b direct, c stage 1 only, "
    "d uncontrolled stage 2, e guarded stage 2 with replay).")
flags.FLAGS.set_default("workdir", "runs/study")

ARMS = {
    "a": "recipe (stage 1 -> stage 2)",
    "b": "direct (generation data only)",
    "c": "stage 1 only, same steps",
    "d": "stage 2 uncontrolled",
    "e": "stage 2 guarded + replay",
}
# The run whose report holds each arm's result, and the runs each needs first.
_LAST_RUN = {"a": "a_stage2", "b": "b_direct", "c": "c_stage1_long", "d": "d_uncontrolled", "e": "e_guarded"}
_NEEDS = {
    "a_stage1": "pretrain",
    "a_stage2": "a_stage1",
    "b_direct": "pretrain",
    "c_stage1_long": "pretrain",
    "d_uncontrolled": "a_stage1",
    "e_guarded": "a_stage1"
}
UNCONTROLLED_FACTOR = 5  # d and e train this many times stage 2's steps
REPLAY_FRACTION = 0.25  # e's share of each batch drawn from the stage-1 mix
HOLD_MARGIN = 0.02  # "costs no understanding": no drop beyond this (configs' eval.hold_margin)
# (split, score, higher is better) shown per arm.
SCORES = (("val_generation", "prompt_f1", True), ("val_generation", "prompt_exact", True),
          ("val_generation", "format_rate", True), ("val_understanding", "accuracy", True),
          ("generation_intent", "intent_recall", True), ("generation_intent", "intent_precision", True),
          ("val_text", "loss", False), ("val_generation", "loss", False))
# Student's t for a two-sided 95% interval, by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_configs(seed: int, data: str, data_dir: str | None, steps: dict[str, int | None]) -> dict:
  """Every run's config for one seed (init_from is set when it runs)."""
  phases = recipe.phase_configs(data, data_dir, steps)
  s1, s2 = phases["stage1"].train.steps, phases["stage2"].train.steps
  configs = {"pretrain": phases["pretrain"], "a_stage1": phases["stage1"], "a_stage2": phases["stage2"]}

  direct = recipe.phase_configs(data, data_dir, steps)["stage1"]
  direct.data.train_split = "train_generation"
  direct.train.steps = s1 + s2
  # At stage 1's learning rate the generation subset alone is memorised within these steps
  # (training loss under 1e-4, where the collapse guard would end the run): the arm is to
  # show where direct specialisation ends up, so that guard is off here (NaN still stops it).
  direct.guard.collapse_loss = 0.0
  configs["b_direct"] = direct

  longer = recipe.phase_configs(data, data_dir, steps)["stage1"]
  longer.train.steps = s1 + s2
  configs["c_stage1_long"] = longer

  for name, guarded in (("d_uncontrolled", False), ("e_guarded", True)):
    c = recipe.phase_configs(data, data_dir, steps)["stage2"]
    c.optim.lr = phases["stage1"].optim.lr
    c.train.steps = UNCONTROLLED_FACTOR * s2
    c.train.eval_every = c.train.checkpoint_every = max(s2 // 2, 1)
    c.early_stop.patience = 0
    c.guard.drift_action = "rollback" if guarded else "off"
    if guarded:
      c.data.replay_fraction = REPLAY_FRACTION
    configs[name] = c
  for c in configs.values():
    c.seed = seed
  return configs


def runs_needed(arms: list[str]) -> list[str]:
  """The runs the arms need, each after the run it starts from."""
  needed = []

  def add(run):
    if run in needed:
      return
    if run in _NEEDS:
      add(_NEEDS[run])
    needed.append(run)

  for arm in arms:
    add(_LAST_RUN[arm])
  return needed


def run_seed(seed: int, arms: list[str], workdir: str, data: str, data_dir: str | None,
             steps: dict[str, int | None]) -> dict[str, dict]:
  """Trains (or finds finished) every run of one seed; returns {run: its report}."""
  from mgjax import run_stage

  configs = run_configs(seed, data, data_dir, steps)
  out = {}
  for run in runs_needed(arms):
    config, run_dir = configs[run], os.path.join(workdir, run)
    if run in _NEEDS:
      if "failed" in out[_NEEDS[run]]:
        out[run] = {"failed": f"{_NEEDS[run]} failed"}
        continue
      config.init_from = os.path.join(workdir, _NEEDS[run])
    finished = (reports.read(run_dir) or {}).get("complete")
    started = time.time()
    try:
      summary = run_stage.run(config, run_dir)
    except stages.GuardTripped as e:  # a finding of the study, not a reason to stop it
      print(f"seed {seed} {run}: {e}", flush=True)
      out[run] = {"failed": str(e).splitlines()[0]}
      continue
    seconds = time.time() - started
    print(f"seed {seed} {run}: {summary.steps} steps, {seconds:.0f} s", flush=True)
    if not finished:  # the study's compute time is the sum of its runs'
      with open(os.path.join(run_dir, "study_seconds.txt"), "w") as f:
        f.write(f"{seconds:.0f}\n")
    out[run] = summary.report
  return out


def run_seconds(workdir: str, seeds: list[str], arms: list[str]) -> float:
  """The study's compute time: the sum of the seconds each of its runs took to train."""
  total = 0.0
  for seed in seeds:
    for run in runs_needed(arms):
      path = os.path.join(workdir, f"seed{seed}", run, "study_seconds.txt")
      if os.path.exists(path):
        with open(path) as f:
          total += float(f.read())
  return total


def arm_scores(report: dict) -> dict[str, float]:
  """An arm's scores: its last run's own column (the result checkpoint's evaluation); NaN
  for a run a guard stopped."""
  column = report[f"stage{report['stage']}"] if "failed" not in report else {}
  return {f"{split}/{score}": column.get(split, {}).get(score, float("nan")) for split, score, _ in SCORES}


def mean_interval(values: list[float]) -> dict[str, float]:
  """Mean, 95% t-interval over seeds, and the seeds' range."""
  x = np.asarray(values, np.float64)
  if not np.isfinite(x).all():
    return {k: float("nan") for k in ("mean", "lo", "hi", "min", "max")}
  half = _T95.get(x.size - 1, 1.96) * x.std(ddof=1) / np.sqrt(x.size) if x.size > 1 else float("nan")
  return {
      "mean": float(x.mean()),
      "lo": float(x.mean() - half),
      "hi": float(x.mean() + half),
      "min": float(x.min()),
      "max": float(x.max())
  }


def summarise(reports_by_seed: dict[int, dict[str, dict]], arms: list[str]) -> dict:
  seeds = sorted(reports_by_seed)
  per_arm = {arm: {seed: arm_scores(reports_by_seed[seed][_LAST_RUN[arm]]) for seed in seeds} for arm in arms}
  if "a" in arms:  # stage 1 of the recipe, for reference
    per_arm["a1"] = {seed: arm_scores(reports_by_seed[seed]["a_stage1"]) for seed in seeds}
  table = {
      arm: {
          key: mean_interval([scores[seed][key] for seed in seeds]) for key in scores[seeds[0]]
      } for arm, scores in per_arm.items()
  }

  def difference(x: str, y: str, key: str) -> dict[str, float] | None:
    if x not in per_arm or y not in per_arm:
      return None
    return mean_interval([per_arm[x][s][key] - per_arm[y][s][key] for s in seeds])

  stage2 = {}
  for seed in seeds:
    compared = reports_by_seed[seed].get("a_stage2", {}).get("compared") or {}
    stage2[seed] = {
        key: compared.get(split, {}).get(score) for key, (split, score) in {
            "prompt_f1": ("val_generation", "prompt_f1"),
            "prompt_exact": ("val_generation", "prompt_exact"),
            "accuracy": ("val_understanding", "accuracy"),
            "intent_recall": ("generation_intent", "intent_recall"),
        }.items()
    }
  claims = judge_claims(difference, stage2, seeds)
  return {"seeds": seeds, "per_seed": per_arm, "table": table, "stage2_paired": stage2, "claims": claims}


def _direction(interval: dict[str, float] | None, higher: bool, margin: float | None = None) -> str:
  """What the 95% interval of (arm - other) over seeds says about a claim, oriented so that
  "better" is positive: better (margin None) when it is all above 0; no worse (a margin)
  when no loss beyond the margin is inside it."""
  if interval is None or not np.isfinite(interval["mean"]):
    return "not measured"
  lo, hi = (interval["lo"], interval["hi"]) if higher else (-interval["hi"], -interval["lo"])
  if margin is None:
    return "supported" if lo > 0 else "contradicted" if hi < 0 else "not shown (interval includes 0)"
  return ("supported"
          if lo >= -margin else "contradicted" if hi < -margin else f"not shown (interval reaches past -{margin})")


def judge_claims(difference, stage2: dict, seeds: list[int]) -> list[dict]:
  """Each of the recipe's claims, the measurement that tests it and what it says."""
  claims = []

  def add(claim: str, measured: str, interval, verdict: str):
    claims.append({"claim": claim, "measured": measured, "interval": interval, "verdict": verdict})

  for score in ("prompt_f1", "prompt_exact"):
    per_seed = [stage2[s][score] for s in seeds if stage2[s][score]]
    if per_seed:
      verdicts = [d["verdict"] for d in per_seed]
      add(f"Stage 2 sharpens generation ({score})", f"stage 2 - stage 1 {score}, paired over answers, per seed",
          [d["ci95"] for d in per_seed],
          "supported" if all(v == "improved" for v in verdicts) else f"not shown in every seed ({', '.join(verdicts)})")
  per_seed_acc = [stage2[s]["accuracy"] for s in seeds if stage2[s]["accuracy"]]
  if per_seed_acc:
    verdicts = [d["verdict"] for d in per_seed_acc]
    add(
        "Understanding holds through stage 2 (no drop beyond 0.02)",
        "stage 2 - stage 1 accuracy, paired over answers, per seed", [d["ci95"] for d in per_seed_acc],
        "supported" if all(
            v in ("held", "improved") for v in verdicts) else f"not in every seed ({', '.join(verdicts)})")
  f1, acc, text = "val_generation/prompt_f1", "val_understanding/accuracy", "val_text/loss"
  margin = HOLD_MARGIN
  for claim, x, y, key, higher, within in (
      ("Progressive training beats direct specialisation on generation", "a", "b", f1, True, None),
      ("Progressive training keeps understanding that direct specialisation loses", "a", "b", acc, True, None),
      ("Specialising beats the same steps on the whole mix, for generation", "a", "c", f1, True, None),
      (f"Specialising costs no understanding beyond {margin} against the same steps on the mix", "a", "c", acc, True,
       margin),
      ("An uncontrolled stage 2 loses understanding", "a", "d", acc, True, None),
      ("An uncontrolled stage 2 forgets text", "a", "d", text, False, None),
      ("The guard and replay keep understanding an uncontrolled stage 2 loses", "e", "d", acc, True, None),
      ("The guard and replay keep text an uncontrolled stage 2 forgets", "e", "d", text, False, None),
  ):
    interval = difference(x, y, key)
    add(claim, f"{x} - {y}, {key}, per seed", interval, _direction(interval, higher, within))
  return claims


def markdown(study: dict, seconds: float) -> str:
  seeds = study["seeds"]
  fmt = lambda m: f"{m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"
  lines = [
      f"Mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) with the 95% t-interval over seeds; "
      f"{seconds / 60:.0f} min in all.", "",
      "| arm | " + " | ".join(f"{split.removeprefix('val_')} {score}" for split, score, _ in SCORES) + " |",
      "| --- |" + " --- |" * len(SCORES)
  ]
  names = {"a1": "a, its stage 1", **ARMS}
  for arm in [a for a in ("a1", *ARMS) if a in study["table"]]:
    row = study["table"][arm]
    lines.append(f"| {arm}: {names[arm]} | " + " | ".join(fmt(row[f"{s}/{n}"]) for s, n, _ in SCORES) + " |")
  lines += ["", "| claim | measured | 95% interval | verdict |", "| --- | --- | --- | --- |"]
  for c in study["claims"]:
    interval = c["interval"]
    if isinstance(interval, dict):
      shown = f"{interval['mean']:+.3f} [{interval['lo']:+.3f}, {interval['hi']:+.3f}]"
    elif interval:
      shown = "; ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in interval)
    else:
      shown = "-"
    lines.append(f"| {c['claim']} | {c['measured']} | {shown} | {c['verdict']} |")
  if "a1" in study["table"]:
    lines += ["", quickstart_table(study)]
  return "\n".join(lines) + "\n"


def quickstart_table(study: dict) -> str:
  """Arm a is the quickstart (seed 0 is its default): stage 1 and stage 2 over the seeds, as
  the README shows them, with each seed's paired difference from its own report."""
  seeds = study["seeds"]
  by_seed = {int(k): v for k, v in study["stage2_paired"].items()}  # JSON keys are strings
  span = lambda m: f"{m['mean']:.3f} ({m['min']:.3f}-{m['max']:.3f})"
  lines = [
      f"The recipe (arm a) over seeds {', '.join(map(str, seeds))}: mean (lowest-highest seed), and stage 2 "
      "minus stage 1 on the same answers per seed, with its 95% bootstrap interval over validation records:", "",
      "| split | score | stage 1 | stage 2 | stage 2 - stage 1, per seed |", "| --- | --- | --- | --- | --- |"
  ]
  for split, score, _ in SCORES:
    key = f"{split}/{score}"
    paired = ""
    if score in ("prompt_f1", "prompt_exact", "accuracy", "intent_recall"):
      paired = "; ".join(reports.format_difference(d) for d in (by_seed[s][score] for s in seeds) if d)
    lines.append(f"| {split} | {score} | {span(study['table']['a1'][key])} | {span(study['table']['a'][key])} | "
                 f"{paired} |")
  return "\n".join(lines)


def chart(study: dict) -> bytes:
  """One panel per score: each arm's mean with its 95% t-interval over seeds, and the seeds
  themselves as dots beside it."""
  import io

  from matplotlib.figure import Figure

  arms = [a for a in ("a1", *ARMS) if a in study["table"]]
  fig = Figure(figsize=(3.4 * len(SCORES), 3.4))
  axes = fig.subplots(1, len(SCORES), squeeze=False)[0]
  for ax, (split, score, higher) in zip(axes, SCORES):
    key = f"{split}/{score}"
    for i, arm in enumerate(arms):
      m = study["table"][arm][key]
      # Points, not bars: the axis zooms to the arms' differences instead of starting at 0.
      ax.errorbar(i, m["mean"], yerr=[[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]], fmt="o",
                  color="tab:gray" if arm == "a1" else "tab:blue", capsize=4)
      seeds = [study["per_seed"][arm][s][key] for s in study["seeds"]]
      ax.plot([i + 0.15] * len(seeds), seeds, "k.", markersize=3)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_title(f"{split.removeprefix('val_')} {score}" + (" (higher better)" if higher else " (lower better)"),
                 fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def main(argv: list[str]) -> None:
  del argv
  runtime.setup()
  workdir, arms = flags.FLAGS.workdir, [a for a in _ARMS.value if a]
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise app.UsageError(f"--arms: unknown {sorted(unknown)}; known: {', '.join(ARMS)}")
  steps = {
      "pretrain": flags.FLAGS.pretrain_steps,
      "stage1": flags.FLAGS.stage1_steps,
      "stage2": flags.FLAGS.stage2_steps
  }
  reports_by_seed = {
      int(seed): run_seed(int(seed), arms, os.path.join(workdir, f"seed{seed}"), flags.FLAGS.data, flags.FLAGS.data_dir,
                          steps) for seed in _SEEDS.value
  }
  study = summarise(reports_by_seed, arms)
  os.makedirs(workdir, exist_ok=True)
  seconds = run_seconds(workdir, _SEEDS.value, arms)
  study["seconds"] = seconds
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(study, f, indent=2, sort_keys=True)
  text = markdown(study, seconds)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(text)
  with open(os.path.join(workdir, "study.png"), "wb") as f:
    f.write(chart(study))
  print("\n" + text)
  print(f"written: {os.path.join(workdir, 'study.md')}, study.json, study.png")


if __name__ == "__main__":
  runtime.restart_with_malloc_tunables()
  app.run(main, flags_parser=runtime.parse_flags)
