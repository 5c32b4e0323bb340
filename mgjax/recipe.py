"""The whole two-stage recipe in one command (the README's quickstart):

  python -m mgjax.recipe [--workdir=runs/sample] [--stage1_steps=N] [--stage2_steps=N]

Stage 1 trains on the whole mix, stage 2 starts from stage 1's params on the generation
subset; both use the default configs (configs/stage1.py, configs/stage2.py), so this is
exactly the two `python -m mgjax.main` commands in the README, run back to back.
"""

from __future__ import annotations

import os

from absl import app, flags

from mgjax import config as mgjax_config, runtime

_WORKDIR = flags.DEFINE_string("workdir", "runs/sample", "Parent folder: stage 1 goes to WORKDIR/stage1, stage 2 to WORKDIR/stage2.")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", None, "Override configs/stage1.py's train.steps.")
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", None, "Override configs/stage2.py's train.steps.")


def scores_table(report: dict) -> str:
  """Stage 1 and stage 2 side by side, per capability (from stage 2's report.json)."""
  rows = [f"{'split':<18}{'score':<22}{'stage 1':>10}{'stage 2':>10}"]
  for split, scores in report["stage2"].items():
    for name in sorted(scores, key=lambda n: (n != "loss", n)):
      if name.startswith("num_"):
        continue
      before = report["stage1"].get(split, {}).get(name, float("nan"))
      rows.append(f"{split:<18}{name:<22}{before:>10.3f}{scores[name]:>10.3f}")
  return "\n".join(rows)


def main(argv: list[str]) -> None:
  del argv
  runtime.setup()
  from mgjax import train

  stage1_dir, stage2_dir = (os.path.join(_WORKDIR.value, s) for s in ("stage1", "stage2"))
  stage1 = mgjax_config.load_config_file(os.path.join(mgjax_config.CONFIGS_DIR, "stage1.py"), "")
  stage2 = mgjax_config.load_config_file(os.path.join(mgjax_config.CONFIGS_DIR, "stage2.py"), "")
  if _STAGE1_STEPS.value:
    stage1.train.steps = _STAGE1_STEPS.value
  if _STAGE2_STEPS.value:
    stage2.train.steps = _STAGE2_STEPS.value
  stage2.init_from = stage1_dir

  summaries = [train.run(stage1, stage1_dir), train.run(stage2, stage2_dir)]
  print("\n" + "\n\n".join(s.format() for s in summaries))
  print("\n" + scores_table(summaries[1].report))
  print(f"\nreport: {os.path.join(stage2_dir, 'report.md')}")
  print(f"\nstage 1: python -m mgjax.main --config=configs/stage1.py --workdir={stage1_dir}"
        f"\nstage 2: python -m mgjax.main --config=configs/stage2.py --workdir={stage2_dir} --config.init_from={stage1_dir}")


if __name__ == "__main__":
  runtime.restart_with_malloc_tunables()  # first: glibc reads its tunables at process start
  app.run(main)
