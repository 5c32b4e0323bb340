"""Pretraining (alignment): the phase before stage 1. Image-caption pairs teach the projector
and patch info mining to speak the frozen LLM's language; nothing else moves.

As Mini-Gemini's first phase runs it (`--tune_mm_mlp_adapter True` in its scripts): captions
in LLaVA JSON (the data config's `caption` sources: splits train_caption and val_caption),
the model preset's pretraining template (`plain` for Vicuna, Mixtral and Yi: the image, then
the caption, loss on the caption; MGM-2B and MGM-8B pretrain in their chat templates),
learning rate 1e-3 on a cosine to 0 with 3% warmup, no weight decay. The optimizer, batch and
length of the run come from the model preset's `training["pretrain"]` (mgjax.presets.apply_training;
an mgm preset: its script's AdamW, global batch 256, one epoch); the values below are the
defaults for a preset without them. Stage 1 then starts from this phase's weights:

  python -m mgjax.main --config=configs/pretrain.py --workdir=runs/pretrain
  python -m mgjax.main --config=configs/stage1.py --workdir=runs/stage1 --config.init_from=runs/pretrain
"""

import ml_collections

from mgjax import base_config, config_files, presets

# What the pretraining phase trains: Mini-Gemini's mm_projector and its vlm_uni_* (mining).
TRAINED = ("mining", "projector")


def get_config(arg=None):
  args = config_files.parse_arg(arg, model="sample", data="sample")
  c = base_config.base_config(model=args.model, data=args.data)
  c.stage = 0
  c.workdir = "runs/pretrain"
  c.model.template = c.model.get("pretrain_template", "plain")
  c.data.train_split = "train_caption"
  c.data.val_splits = ("val_caption",)
  # Captions are short and every one has its image: one conversation per row wastes little.
  c.data.packing = True
  c.data.max_images = 4
  # Everything but mining and the projector: the LLM and both towers stay as they are.
  c.optim.freeze = ("llm/.*", "vision_lowres/.*", "vision_highres/.*")
  # Mini-Gemini's pretraining optimizer, for a preset that names none in model.training.
  c.optim.lr = 1e-3
  c.optim.lr_multipliers = ()  # a preset's multipliers are for fine-tuning (MGM: --lr_multi there only)
  c.optim.end_lr_factor = 0.0
  c.optim.weight_decay = 0.0
  c.optim.warmup_ratio = 0.03
  c.train.steps = 150
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  # The phase is judged by its caption loss; the instruction sets' decoded scores come later.
  c.eval.decode = False
  c.evals = ml_collections.ConfigDict()
  c.early_stop.split = "val_caption"
  c.guard.drift_splits = ()
  presets.apply_training(c, "pretrain")
  c.lock()
  return c
