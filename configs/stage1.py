"""Stage 1: fine-tune the whole VLM on the whole instruction mix (split `train`).

Mini-Gemini's fine-tuning (its scripts' second phase). The optimizer, batch and length of the
run come from the model preset's `training["stage1"]` (mgjax.presets.apply_training; an mgm
preset: its script's learning rate and AdamW, global batch 128, one epoch); the values here and
in base_config are the defaults for a preset without them.

  python -m mgjax.main --config=configs/stage1.py --workdir=runs/stage1
  python -m mgjax.main --config=configs/stage1.py:model=sample --config.train.steps=100
"""

from mgjax import base_config, config_files, presets


def get_config(arg=None):
  args = config_files.parse_arg(arg, model="sample", data="sample")
  c = base_config.base_config(model=args.model, data=args.data)
  c.stage = 1
  c.workdir = "runs/stage1"
  c.data.train_split = "train"
  c.optim.lr = 1e-3
  c.data.packing = True
  c.data.max_images = 4
  c.train.steps = 500
  # Pretraining's result has only learnt to caption: asked the validation questions it
  # answers nonsense until max_new_tokens, so decoding it costs much and tells nothing.
  c.eval.score_start = False
  presets.apply_training(c, "stage1")
  c.lock()
  return c
