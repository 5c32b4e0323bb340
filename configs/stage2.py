"""Stage 2: start from stage 1's params and specialise on the generation subset.

A fresh optimizer with a lower, shorter schedule: the generation subset is small and
one-note, so a stage-1-sized schedule would overfit it and drag understanding along. The
optimizer, batch and length come from the model preset's `training["stage2"]`
(mgjax.presets.apply_training; an mgm preset: half its stage-1 learning rate with stage 1's
warmup and cosine to 0, one epoch of the generation subset); the values here are the defaults
for a preset without them.

  python -m mgjax.main --config=configs/stage2.py --workdir=runs/stage2 --config.init_from=runs/stage1
"""

from mgjax import base_config, config_files, presets


def get_config(arg=None):
  args = config_files.parse_arg(arg, model="sample", data="sample")
  c = base_config.base_config(model=args.model, data=args.data)
  c.stage = 2
  c.workdir = "runs/stage2"
  c.init_from = "runs/stage1"
  c.data.train_split = "train_generation"
  # The sample's stage 1 cosine ends at 1e-4; starting stage 2 above that (with a fresh Adam, whose
  # first updates are full-size in every direction) shook understanding loose in the
  # sample runs: 2e-4 drifted val_understanding +7%, 1e-4 +3%, at the same format rate.
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10
  c.train.steps = 100
  c.train.eval_every = 25
  c.train.checkpoint_every = 50
  # Keep the best val_generation checkpoint (stage 1's own result is a candidate too) and
  # stop after two evaluations without improvement.
  c.early_stop.patience = 2
  # Understanding and text may not get >10% worse than stage 1 left them: stop and hand on
  # the best checkpoint that stayed within bounds.
  c.guard.drift_action = "rollback"
  presets.apply_training(c, "stage2")
  c.lock()
  return c
