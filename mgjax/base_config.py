"""The training config every stage shares (configs/pretrain.py, stage1.py and stage2.py start from
it), and the checks a config must pass before a run does any work."""

from __future__ import annotations

import ml_collections

from mgjax.config_files import preset
# CLIP's normalisation constants; both towers of Mini-Gemini use them.
from mgjax.data.images import CLIP_MEAN, CLIP_STD


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
  from mgjax.evaluators import suite  # the evaluators' names and settings (loads jax: only when checking)

  problems += suite.check(c)
  if problems:
    raise ConfigError("config cannot run: " + "; ".join(problems) + ". Fix them with --config.<field>=VALUE.")


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
  # Splash attention's block sizes and backward kernels (mgjax.models.attention.splash_block_sizes):
  # auto takes, for the TPU generation compiled for, the settings of MaxText's tuned recipes (v5e,
  # v6e: 2048 blocks, fused backward kernel; v5p: 2048 blocks) when LIBTPU_INIT_ARGS raises the
  # scoped VMEM limit as those recipes do (--xla_tpu_scoped_vmem_limit_kib=98304; without it they
  # do not compile), else MaxText's default 512 blocks; or a generation ('default' | 'v5e' | 'v5p' |
  # 'v6e'), or BlockSizes fields over 'default' or a generation named first: 'v6e,block_q=1024',
  # 'block_q=1024,use_fused_bwd_kernel=true'. Blocks are cut to the sequence; sizes are multiples
  # of 128 that divide it.
  c.model.splash_blocks = c.model.get("splash_blocks", "auto")
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
  # Keep the optimizer state (Adam's moments) in the host's memory between steps, as MaxText's
  # optimizer_memory_host_offload: each step fetches it to the device for the update and puts the
  # new state back. Frees the moments' device memory (twice the trainable weights in float32)
  # for host-device transfers every step (on a CPU, where host and device memory are one, it
  # changes nothing but the copies).
  c.optim.offload = False
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
  # Inside the chunked loss, split the output projection over the vocabulary across every
  # device instead of gathering it whole on each (mgjax.loss): no gathered [hidden, vocab] copy
  # and no unsharded float32 partial of its gradient while the loss runs, for an all-gather of
  # each chunk's hidden states. It lowers the peak only where the loss is the peak (a shallow
  # decoder under a large vocabulary); a full-depth one peaks at the end of the backward pass,
  # where it was measured to add a little (benchmarks/RESULTS.md), hence off by default. Needs
  # the vocabulary to divide by the device count (else the gathered path runs).
  c.train.loss_vocab_sharded = False
  # MFU and HFU in the log are measured against this per-device peak in TFLOP/s; 0: the vendor's
  # bf16 peak for known TPUs/GPUs, the measured matmul rate on CPU (mgjax.throughput).
  c.train.peak_tflops = 0.0

  # Scores beyond loss, by decoding the validation sets with the KV cache: how to decode.
  c.eval = ml_collections.ConfigDict()
  c.eval.decode = True  # False: losses only
  c.eval.max_new_tokens = 96
  c.eval.batch_size = 32
  c.eval.score_start = True
  # A stage "held" a score when the 95% interval of its paired difference to where the stage
  # started rules out a drop larger than this (mgjax.stats.verdict).
  c.eval.hold_margin = 0.02
  # The decoded evaluators (mgjax/evaluators/, by name), each with its splits and how often
  # it runs: always at the stage's start and on its result (report.json and report.md, with
  # 95% intervals), and every `every` steps (a multiple of train.eval_every; 0: never between)
  # into metrics.jsonl and TensorBoard.
  c.evals = ml_collections.ConfigDict()
  # Short answers checkable by exact match (the sample's): accuracy and its chance level.
  c.evals.understanding = dict(splits=("val_understanding",), every=0)
  # Generation requests (" <GEN>" -> "<h>prompt</h>"): format rate, prompt F1 and exact match.
  c.evals.generation = dict(splits=("val_generation",), every=0)
  # Requests and ordinary questions together: a prompt exactly when an image is asked for.
  c.evals.generation_intent = dict(splits=("val_generation", "val_understanding", "val_text"), every=0)

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
