"""The whole recipe in one command (the README's quickstart):

  python -m mgjax.recipe [--workdir=runs/sample] [--pretrain_steps=N] [--stage1_steps=N]
                         [--stage2_steps=N] [--data=sample] [--data_dir=DIR]

Three phases, each from the one before: pretraining (configs/pretrain.py: image-caption
pairs align the projector and patch info mining to the frozen LLM), stage 1
(configs/stage1.py: the whole instruction mix) and stage 2 (configs/stage2.py: the
generation subset, kept in check). This is exactly the three `python -m mgjax.main`
commands it prints at the end, run back to back.
"""

from __future__ import annotations

import os

from absl import app, flags
import ml_collections

from mgjax import config_files, runtime

_WORKDIR = flags.DEFINE_string("workdir", "runs/sample",
                               "Parent folder: the phases go to WORKDIR/pretrain, WORKDIR/stage1 and WORKDIR/stage2.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Override configs/pretrain.py's train.steps.")
_STAGE1_STEPS = flags.DEFINE_integer("stage1_steps", None, "Override configs/stage1.py's train.steps.")
_STAGE2_STEPS = flags.DEFINE_integer("stage2_steps", None, "Override configs/stage2.py's train.steps.")
_DATA = flags.DEFINE_string("data", "sample", "The data preset (configs/data/NAME.py[:ARG]) of all three phases.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Override data.data_dir (where the dataset is built) of all three phases.")

PHASES = ("pretrain", "stage1", "stage2")


def phase_configs(data: str = "sample", data_dir: str | None = None,
                  steps: dict[str, int | None] | None = None) -> dict[str, ml_collections.ConfigDict]:
  """The three phases' configs (configs/pretrain.py, stage1.py, stage2.py) on one dataset."""
  configs = {}
  for phase in PHASES:
    c = config_files.load_config_file(os.path.join(config_files.CONFIGS_DIR, f"{phase}.py"), f"data={data}")
    if data_dir:
      c.data.data_dir = data_dir
    if (steps or {}).get(phase):
      c.train.steps = steps[phase]
    configs[phase] = c
  return configs


def run(configs: dict[str, ml_collections.ConfigDict], workdir: str) -> list:
  """Trains the phases in order, each starting from the one before's result; returns their
  train.Summary objects. Builds each phase's dataset first where it is missing."""
  from mgjax import run_stage, train

  for phase in PHASES:  # what would stop an unfinished phase, before any phase builds or trains
    if not train.finished_report(os.path.join(workdir, phase)):
      train.check_before_data(configs[phase])
  summaries = []
  previous = None
  for phase in PHASES:
    config = configs[phase]
    if previous is not None:
      config.init_from = previous
    previous = os.path.join(workdir, phase)
    summaries.append(run_stage.run(config, previous))
  return summaries


def scores_table(report: dict) -> str:
  """Stage 1 and stage 2 side by side, per capability (from stage 2's report.json): each
  decoded score with its 95% interval, and stage 2's paired difference to stage 1."""
  from mgjax import reports  # after training: the report module loads jax and matplotlib's users

  cell = lambda scores, name: reports.format_score(scores.get(name), scores.get(f"{name}_ci95"))
  rows = [f"{'split':<18}{'score':<22}{'stage 1':>22}{'stage 2':>22}   stage 2 - stage 1 [95%]"]
  compared = report.get("compared") or {}
  for split, scores in report["stage2"].items():
    names = [n for n, v in scores.items() if isinstance(v, float)]
    for name in sorted(names, key=lambda n: (n != "loss", n)):
      row = f"{split:<18}{name:<22}{cell(report['stage1'].get(split, {}), name):>22}{cell(scores, name):>22}"
      diff = compared.get(split, {}).get(name)
      if diff:
        row += f"   {reports.format_difference(diff)}"
      rows.append(row)
  return "\n".join(rows)


def main(argv: list[str]) -> None:
  del argv
  runtime.setup()
  workdir = _WORKDIR.value
  configs = phase_configs(_DATA.value, _DATA_DIR.value, {
      "pretrain": _PRETRAIN_STEPS.value,
      "stage1": _STAGE1_STEPS.value,
      "stage2": _STAGE2_STEPS.value
  })
  summaries = run(configs, workdir)
  print("\n" + "\n\n".join(s.format() for s in summaries))
  print("\n" + scores_table(summaries[-1].report))
  print(f"\nreport: {os.path.join(workdir, 'stage2', 'report.md')}")
  data = "" if _DATA.value == "sample" else f":data={_DATA.value}"
  data_dir = f" --config.data.data_dir={_DATA_DIR.value}" if _DATA_DIR.value else ""
  print("\nthe same, phase by phase:")
  for phase in PHASES:
    init = configs[phase].init_from
    print(f"  python -m mgjax.main --config=configs/{phase}.py{data} --workdir={os.path.join(workdir, phase)}" +
          data_dir + (f" --config.init_from={init}" if init else ""))


if __name__ == "__main__":
  runtime.restart_with_malloc_tunables()  # first: glibc reads its tunables at process start
  app.run(main, flags_parser=runtime.parse_flags)
