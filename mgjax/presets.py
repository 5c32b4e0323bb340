"""The Mini-Gemini preset builder: what configs/models/mgm_*.py share (model, optimizer, batches),
and how a preset's per-phase `training` values reach a stage's config."""

from __future__ import annotations

import ml_collections

# The optimizer of every Mini-Gemini training script (scripts/*/train/*.sh): --weight_decay 0.,
# --warmup_ratio 0.03, --lr_scheduler_type cosine (linear warmup, then cosine to 0); no script
# sets the betas, so Hugging Face's AdamW defaults hold (0.9, 0.999; eps 1e-8, optax's too).
# No clipping: every script runs under DeepSpeed, where the Trainer leaves clipping to DeepSpeed
# (accelerate's clip_grad_norm_ does nothing) and HF's max_grad_norm (1.0) reaches it only by
# filling a gradient_clipping "auto" entry, which MGM's configs (scripts/zero2.json,
# zero2_offload.json, zero3.json) lack: DeepSpeed's default, 0.0 (off), applies. grad_clip 0
# is optim's "no clipping".
MGM_OPTIM = dict(weight_decay=0.0, warmup_ratio=0.03, end_lr_factor=0.0, b1=0.9, b2=0.999, grad_clip=0.0)
# Global batches (per-device batch x gradient accumulation x the scripts' 8, 16 or 32 GPUs).
MGM_PRETRAIN_BATCH, MGM_FINETUNE_BATCH = 256, 128


def mgm_training(lr: float, lr_multipliers: tuple = ()) -> dict:
  """A Mini-Gemini preset's `training` (see apply_training): the three phases as its scripts
  train them, stage 2 (mgjax's own, not in MGM's scripts) relative to stage 1.

  lr: the fine-tuning learning rate (MGM's stage-2 --learning_rate: mgjax's stage 1).
  lr_multipliers: optim.lr_multipliers of fine-tuning (MGM's --lr_multi, passed there only).
  """

  def phase(rate: float, multipliers: tuple, batch_size: int, every: int) -> dict:
    # One epoch (--num_train_epochs 1) of one conversation per row: MGM does not pack, and with
    # packing data.batch_size and train.epochs would count rows of several conversations.
    # Thousands of steps: a checkpoint (84 GB for a 7B with its Adam moments) and a decoded
    # evaluation every `every` steps, not the sample's every 100 (MGM's fine-tuning saves
    # every 1000 steps, --save_steps 1000; it evaluates nothing during training).
    return dict(optim=dict(MGM_OPTIM, lr=rate,
                           lr_multipliers=multipliers), data=dict(batch_size=batch_size, packing=False, max_images=1),
                train=dict(epochs=1.0, eval_every=every, checkpoint_every=every))

  return dict(
      # --tune_mm_mlp_adapter: only mining and the projector train, at 1e-3, no --lr_multi.
      pretrain=phase(1e-3, (), MGM_PRETRAIN_BATCH, 1000),
      stage1=phase(lr, lr_multipliers, MGM_FINETUNE_BATCH, 1000),
      # Stage 2 starts a fresh Adam, whose first updates are full-size in every direction, from
      # stage 1's weights, whose cosine ended at 0: in the sample runs, starting stage 2 above
      # stage 1's final rate shook understanding loose. Half stage 1's peak, warmed up, keeps the
      # first steps small while still moving on the generation subset (~13K conversations, ~1%
      # of the stage-1 mix, so one epoch of it is short by construction); early stopping and
      # the drift guard (configs/stage2.py) watch the rest.
      stage2=phase(lr / 2, lr_multipliers, MGM_FINETUNE_BATCH, 25),
  )


def apply_training(c: ml_collections.ConfigDict, phase: str) -> ml_collections.ConfigDict:
  """Sets what the model preset's `training[phase]` names (phase: pretrain, stage1, stage2):
  `{section: {key: value}}` over the same keys of the config, e.g.
  `stage1=dict(optim=dict(lr=2e-5), data=dict(batch_size=128), train=dict(epochs=1.0))`.

  The stage files call it last, so a preset's values win over the stage's generic defaults,
  and --config.* flags (applied after get_config) over both. A preset without `training`
  (or without this phase) keeps the defaults.
  """
  phases = c.model.get("training") or {}
  for section, values in (phases.get(phase) or {}).items():
    if section not in c or not isinstance(c[section], ml_collections.ConfigDict):
      raise ValueError(f"model.training.{phase}.{section}: the config has no section {section!r}")
    for key, value in values.items():
      if key not in c[section]:
        raise ValueError(f"model.training.{phase}.{section}.{key}: the config has no field {section}.{key}")
      if isinstance(c[section][key], tuple):  # lists (from a dict literal or JSON) become tuples
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      c[section][key] = value
  return c


def mini_gemini(*, llm: dict, vocab_size: int, template: str, pretrain_template: str = "plain", lr: float = 2e-5,
                lr_multipliers: tuple = ()) -> ml_collections.ConfigDict:
  """A released Mini-Gemini's `model` section (configs/models/mgm_*.py): its LLM, and what
  every Mini-Gemini shares, as its training scripts (scripts/*/train/*.sh) set it up.

  llm: the decoder (models/llm.py's keys; remat and scan_layers are added here).
  vocab_size: the LLM's vocabulary plus 128 rows for <image> and other added tokens (a
    multiple of 128 shards evenly; the importers pad the embedding to it).
  template: the fine-tuning conversation template (MGM's --version); pretrain_template the
    one its pretraining phase used (`plain` except where the script names the chat template).
  lr: the fine-tuning learning rate (MGM's --learning_rate of its fine-tuning: mgjax's stage 1).
  lr_multipliers: optim.lr_multipliers of its fine-tuning (MGM's --lr_multi).
  """
  return ml_collections.ConfigDict(
      dict(
          vocab_size=vocab_size,
          image_token_id=0,  # replaced by the tokenizer's <image> id when training starts
          # Mini-Gemini trains the LLM, mining and projector; both towers stay frozen.
          freeze=("vision_lowres/.*", "vision_highres/.*"),
          seq_len=2048,  # data.seq_len: Mini-Gemini's fine-tuning model_max_length
          # data.pad_to_square: every fine-tuning script passes --image_aspect_ratio pad.
          pad_to_square=True,
          dtype="bfloat16",  # compute dtype; params stay float32, logits are always float32
          template=template,
          pretrain_template=pretrain_template,
          training=mgm_training(lr, lr_multipliers),
          # Every Mini-Gemini has >= 2.5B parameters, 12 bytes each in float32 weights and Adam
          # moments (30 GB for the smallest): weights and optimizer state are split over every
          # device (FSDP, as MaxText defaults to; MGM's DeepSpeed runs use ZeRO-2/3). The batch is
          # split over data x fsdp either way, so data.batch_size divides as before.
          mesh=dict(data=1, fsdp=-1),
          llm=dict(llm, remat="full", scan_layers=True),
          # openai/clip-vit-large-patch14-336, penultimate layer, no class token: 576 x 1024 per view.
          vision_lowres=dict(kind="clip", image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp=4096,
                             feature_layer=-2),
          # OpenCLIP convnext_large_d_320 (laion2B-s29B-b131K-ft-soup) trunk, at --image_size_aux.
          vision_highres=dict(kind="convnext", image_size=768, dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3)),
          image_grid=1,
          image_global=False,
      ))


def hd_variant(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The HD variant (MGM-*-HD, scripts/*/train/stage_2_full_*_672_hr_1536.sh) of a preset:
  the low-res image as a 2x2 grid of 336 px crops plus the global view (image_grid=2,
  image_global=True: 5 x 576 visual tokens), the high-res tower at 1536 px, and
  model_max_length 4096 for the longer sequences."""
  model = ml_collections.ConfigDict(model.to_dict())
  model.seq_len = 4096
  model.vision_highres.image_size = 1536
  model.image_grid = 2
  model.image_global = True
  return model
