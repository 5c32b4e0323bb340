"""The training config every stage shares, and helpers to load config files.

Config files under configs/ are Python files with `get_config(arg)` (big_vision style):
`--config=configs/stage1.py:model=sample` passes "model=sample" as `arg`. Configs come
back locked, so a misspelt override (`--config.train.stpes=5`) is an error instead of a
silently ignored key.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import ml_collections

# CLIP's normalisation constants; both towers of Mini-Gemini use them.
from mgjax.data.images import CLIP_MEAN, CLIP_STD  # noqa: E402,F401  (re-exported)


def _configs_dir() -> str:
  """configs/ beside the package in a checkout (or an editable install), else the copy an
  installed package ships in PREFIX/share/mgjax/configs (setup.cfg's data_files), found from the
  package's own place (PREFIX/lib/pythonX.Y/site-packages/mgjax) so venvs, --user and --prefix
  installs all work."""
  package = pathlib.Path(__file__).resolve().parent
  checkout = package.parent / "configs"
  if (checkout / "stage1.py").exists():
    return str(checkout)
  for prefix in (*package.parents[3:4], pathlib.Path(sys.prefix)):  # parents[3]: PREFIX
    shipped = prefix / "share" / "mgjax" / "configs"
    if (shipped / "stage1.py").exists():
      return str(shipped)
  return str(checkout)  # nowhere: the error names the path a checkout would have


CONFIGS_DIR = _configs_dir()


class ConfigError(ValueError):
  """Config values that cannot run, named with what each must be."""


def check_train(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every train, early_stop or guard value a run cannot use, before
  any data work or compiling (else a step count of 0 ends in a ZeroDivisionError after
  minutes of compiling, and steps <= 0 in a TypeError)."""
  t, problems = c.train, []
  if t.epochs < 0:
    problems.append(f"train.epochs={t.epochs} must be 0 (count train.steps) or more")
  if not t.epochs and t.steps < 1:
    problems.append(f"train.steps={t.steps} must be at least 1 (or set train.epochs)")
  for key, what in (("eval_every", "to evaluate only at the end, set it to train.steps"),
                    ("checkpoint_every", "checkpoints also come with every evaluation"),
                    ("log_every", "the last step is always logged"), ("max_to_keep", "checkpoints kept"),
                    ("grad_accum_steps", "1: no accumulation"), ("eval_batch_size", "rows per evaluation batch")):
    if t[key] < 1:
      problems.append(f"train.{key}={t[key]} must be at least 1 ({what})")
  if c.early_stop.patience < 0:
    problems.append(f"early_stop.patience={c.early_stop.patience} must be 0 (never stop) or more")
  # The split picks the result checkpoint under early stopping or a drift rollback.
  if ((c.early_stop.patience > 0 or c.guard.drift_action == "rollback") and
      c.early_stop.split not in c.data.val_splits):
    problems.append(
        f"early_stop.split={c.early_stop.split!r} must be one of data.val_splits {tuple(c.data.val_splits)}")
  if problems:
    raise ConfigError("config cannot run: " + "; ".join(problems) + ". Fix them with --config.<field>=VALUE.")


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
  """Parses "key=value,key=value" from `--config=FILE:ARG` over the given defaults."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in values:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(values)}")
    values[key] = value
  return ml_collections.ConfigDict(values)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file by path and calls its get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f"_mgjax_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def preset(kind: str, name: str) -> ml_collections.ConfigDict:
  """Loads configs/<kind>/<name>.py, e.g. preset("models", "sample") or preset("data", "sample:tiny").

  A name ending in .py is a config file of your own, anywhere on disk (relative to the
  working directory), e.g. `--config=configs/stage1.py:data=/path/my_mix.py`.
  """
  name, _, arg = name.partition(":")
  if name.endswith(".py"):
    if not os.path.exists(name):
      raise ValueError(f"{kind} config file {os.path.abspath(name)} does not exist")
    return load_config_file(name, arg or None)
  path = os.path.join(CONFIGS_DIR, kind, f"{name}.py")
  if not os.path.exists(path):
    available = sorted(f[:-3] for f in os.listdir(os.path.join(CONFIGS_DIR, kind)) if f.endswith(".py"))
    raise ValueError(f"no {kind} preset {name!r}: {path} does not exist; available: {available}")
  return load_config_file(path, arg or None)


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


def base_config(model: str = "sample", data: str = "sample") -> ml_collections.ConfigDict:
  """Fields common to every stage; stage files change what makes them that stage."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 1
  # The run whose params this stage starts from (stage 1: pretraining's, stage 2: stage 1's):
  # a finished run's workdir (its result checkpoint), or one checkpoints/<step> folder.
  c.init_from = ""
  # >= 0: start from init_from's checkpoint of this step even though that run has not finished
  # (0 is a step like any other: an import's checkpoint); -1: its result.
  c.init_from_step = -1
  # Used when --workdir is not given.
  c.workdir = ""

  c.data = ml_collections.ConfigDict()
  # The dataset recipe (configs/data/*.py); main builds it under data_dir when missing.
  c.data.recipe = preset("data", data)
  c.data.data_dir = "data"
  c.data.train_split = "train"
  c.data.val_splits = ("val_understanding", "val_generation", "val_text")
  c.data.seq_len = 128  # the sample's longest conversation is ~75 tokens
  # A conversation longer than seq_len: "truncate" (cut after its last whole answer that
  # fits), "drop" (left out) or "error" (the run stops at start-up, naming the splits).
  c.data.truncation = "truncate"
  # At start-up the trainer counts, per split, the conversations longer than seq_len (in
  # up to this many evenly spaced examples) and warns above this share of them.
  c.data.length_check_examples = 1000
  c.data.truncation_warn = 0.01
  c.data.batch_size = 16  # global, across all processes
  # Several conversations per row (first-fit packing, attention masked per conversation):
  # short conversations stop wasting most of seq_len on padding.
  c.data.packing = False
  c.data.max_images = 1  # image slots per row (per packed row with packing); a conversation is cut before an image that has none
  c.data.num_threads = 2
  c.data.prefetch = 4
  c.data.image_mean = CLIP_MEAN
  c.data.image_std = CLIP_STD
  # Pad images to a square with the mean colour before the centre crop, as Mini-Gemini's
  # fine-tuning does (image_aspect_ratio "pad"), so nothing at the edges is cut away.
  c.data.pad_to_square = False
  # Stage 2: mix this fraction of `replay_split` (the stage-1 mix) into every batch's
  # draw, so specialising on generation keeps rehearsing understanding and text.
  c.data.replay_fraction = 0.0
  c.data.replay_split = "train"

  c.model = preset("models", model)
  # The attention kernel (mgjax.models.attention): auto | xla | splash | cudnn. auto takes
  # splash on TPU, cuDNN on GPU when rows are not packed, XLA otherwise.
  c.model.attention = c.model.get("attention", "auto")
  # The LLM's own tokenizer, a local folder (an imported LLM: its Hugging Face folder, or the
  # readied copy `import-llm` saves in OUT/tokenizer); '' takes the built dataset's (the sample
  # trains a small one for its tiny model).
  c.model.tokenizer = c.model.get("tokenizer", "")
  # A preset may name the sequence length its model is fine-tuned at (Mini-Gemini's
  # model_max_length, 2048); --config.data.seq_len still overrides it.
  if "seq_len" in c.model:
    c.data.seq_len = c.model.seq_len
  if "pad_to_square" in c.model:
    c.data.pad_to_square = c.model.pad_to_square

  # Generic defaults (the sample's stage 1); a preset's model.training sets its own per phase.
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  # > 0: warm up for this fraction of the steps instead (Mini-Gemini's --warmup_ratio 0.03).
  c.optim.warmup_ratio = 0.0
  c.optim.end_lr_factor = 0.1  # cosine decays to lr * end_lr_factor
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.grad_clip = 1.0  # clip the gradients' global norm to this; <= 0: no clipping
  # Adam's first moment in this dtype (optax's mu_dtype): "bfloat16" takes a quarter off the
  # optimizer state; the second moment stays float32 (its small values underflow in bf16).
  c.optim.mu_dtype = "float32"
  # Regexes over parameter paths like "vision_lowres/encoder/layers/0/mlp/fc1/kernel";
  # matching parameters are not updated (and get no optimizer state).
  # A model preset may name what its recipe freezes (Mini-Gemini: both vision towers).
  c.optim.freeze = tuple(c.model.get("freeze", ()))
  # ((regex, factor), ...): parameters whose path matches train at factor * the learning rate
  # (first match wins). A preset may name them here, or per phase in model.training (MGM-8x7B and
  # MGM-34B: mining and projector x2 when fine-tuning).
  c.optim.lr_multipliers = tuple(tuple(m) for m in c.model.get("lr_multipliers", ()))

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  c.train.max_to_keep = 2
  c.train.eval_batch_size = 32
  # A cap in epochs of train_split instead of steps (0: use train.steps).
  c.train.epochs = 0.0
  # Split each batch into this many micro-batches, summing their gradients: the same
  # update as the whole batch at a fraction of the activation memory.
  c.train.grad_accum_steps = 1
  # The output projection and loss run over this many tokens of the sequence at a time
  # (recomputed in the backward pass), so the [batch, seq_len, vocab] float32 logits never
  # exist at once; 0: the whole sequence at once.
  c.train.loss_chunk = 512
  # MFU in the log is measured against this per-device peak in TFLOP/s; 0: the vendor's
  # bf16 peak for known TPUs/GPUs, the measured matmul rate on CPU (mgjax.throughput).
  c.train.peak_tflops = 0.0

  # Scores beyond loss, by decoding the validation sets with the KV cache (mgjax.evaluate):
  # at the start and the end of each stage, into WORKDIR/report.json and report.md.
  c.eval = ml_collections.ConfigDict()
  c.eval.decode = True
  c.eval.max_new_tokens = 96
  c.eval.batch_size = 32
  # Splits whose answers are short and checkable by exact match (the sample's are).
  c.eval.accuracy_splits = ("val_understanding",)
  # Splits of generation requests (" <GEN>" -> "<h>prompt</h>"): format rate and prompt F1.
  c.eval.generation_splits = ("val_generation",)
  # Decode the weights a stage starts from too (the "before" of stage 2's report and its
  # paired differences); losses are always measured.
  c.eval.score_start = True
  # A stage "held" a score when the 95% interval of its paired difference to where the stage
  # started rules out a drop larger than this (mgjax.stats.verdict).
  c.eval.hold_margin = 0.02

  # Keeps the best checkpoint of `split` (lowest loss) as the run's result; with patience
  # > 0 also stops after that many evaluations without an improvement of min_delta.
  c.early_stop = ml_collections.ConfigDict()
  c.early_stop.split = "val_generation"
  c.early_stop.patience = 0
  c.early_stop.min_delta = 0.0

  c.guard = ml_collections.ConfigDict()
  # A training loss below this is a collapse (memorisation, then NaN logits): stop.
  c.guard.collapse_loss = 1e-4
  # Stage 2: how far (relative loss increase) these splits may drift from where the
  # run started (stage 1's final values) before `drift_action` fires:
  # off | warn (log it) | stop (end the run here) | rollback (end it, keep the best
  # checkpoint that was within bounds).
  c.guard.drift_splits = ("val_understanding", "val_text")
  c.guard.drift_threshold = 0.10
  c.guard.drift_action = "warn"

  # LoRA on the LLM: rank 0 trains the weights themselves; rank > 0 trains only low-rank
  # adapters on the matching kernels, merged into plain weights in every checkpoint.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  # (\d+/)? also matches a scanned decoder's stacked kernels (model.llm.scan_layers).
  c.lora.targets = (r"llm/layers/(\d+/)?(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",)

  c.mesh = ml_collections.ConfigDict()
  # Sizes of the mesh axes; -1 takes the devices left over.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # How many of the devices to use (0: all of them).
  c.mesh.num_devices = 0
  # A preset may name its own axis sizes (the mgm presets: FSDP over every device).
  for axis, size in (c.model.get("mesh") or {}).items():
    c.mesh[axis] = size
  # Logical axis names (on every weight) -> mesh axes, MaxText style: the models' own default
  # table, overridable here.
  from mgjax.models import axes  # the models (jax, flax) load only for a training config

  c.mesh.rules = axes.DEFAULT_LOGICAL_AXIS_RULES
  return c
