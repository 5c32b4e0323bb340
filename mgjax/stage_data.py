"""What a stage reads: the built dataset (the same on every process), the tokenizer checked
against the checkpoints the stage resumes or starts from, the train iterator and the
validation splits.

The trainer opens a built dataset and never builds one (mgjax.main and mgjax.recipe build a
missing one first: mgjax.data.build.build_if_missing).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
from etils import epath

from mgjax import base_config, checkpoint, run_files, sharding
from mgjax.data import chat_tokenizers, datasets, pipeline, shared_build
from mgjax.models import attention, vlm


@dataclasses.dataclass
class StageData:
  """The built dataset and what the run reads from it."""
  dataset: datasets.BuiltDataset
  tokenizer: Any
  model_cfg: ml_collections.ConfigDict  # config.model resolved for this tokenizer and platform
  encoder: pipeline.ConversationEncoder
  train_iter: Any
  train_records: int
  val_sources: dict[str, Any]
  tokenizer_record: dict[str, Any]  # checkpoints' meta "tokenizer" (_tokenizer_record)


def open_data(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
              init_checkpoint: str | None = None) -> StageData:
  """Opens the built dataset (the same on every process), checks the tokenizer is the one
  the checkpoints resumed or started from were trained with, saves it into the workdir, and
  opens the train iterator and the validation splits."""
  template = config.model.get("template", "")
  own = llm_tokenizer(config)
  # Built before the run (mgjax.main builds a missing one); every process checks it sees the same build.
  dataset = shared_build.open_shared_build(config.data.recipe, config.data.data_dir)
  tokenizer = own if own is not None else chat_tokenizers.apply_template(chat_tokenizers.load(dataset.tokenizer_dir),
                                                                         template)
  record = _tokenizer_record(tokenizer, config.model.get("tokenizer") or dataset.tokenizer_dir, template, dataset)
  _refuse_other_tokenizer(record, workdir, init_checkpoint)  # before the workdir's copy is replaced
  if jax.process_index() == 0:
    run_files.save_tokenizer(tokenizer, workdir)
  model_cfg = run_files.resolve_model_config(config.model, tokenizer)
  # The attention kernel for this platform and row layout (cuDNN's takes unpacked rows only).
  model_cfg.attention = attention.for_run(model_cfg.get("attention", "auto"), mesh.devices.flat[0].platform,
                                          packed=config.data.packing)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  local_batch = sharding.batch_size_per_process(config.data.batch_size, mesh)
  accum = config.train.grad_accum_steps
  if local_batch % accum or (config.data.batch_size // accum) % sharding.batch_shards(mesh):
    raise ValueError(f"train.grad_accum_steps={accum} must split data.batch_size={config.data.batch_size} into "
                     f"micro-batches that still divide over the {sharding.batch_shards(mesh)} batch shards of the mesh")
  train_source = datasets.open_split(dataset, config.data.train_split)
  if not len(train_source):  # else the first batch ends the run in a bare StopIteration
    recipe, split = config.data.recipe, config.data.train_split
    why = ("pretraining trains on image-caption pairs, and the recipe names no source with category='caption' "
           "(add one, e.g. dict(name=..., format='llava_json', path=..., image_root=..., category='caption'), and "
           "bump its version), or start stage 1 from the LLM instead"
           if split == "train_caption" else f"its sources left nothing for it (see {dataset.data_card})")
    raise ValueError(f"data recipe {recipe.name!r} (version {recipe.version}) has no {split} records: {why}")
  replay_source = (datasets.open_split(dataset, config.data.replay_split) if config.data.replay_fraction > 0 else None)
  train_iter = pipeline.train_iterator(train_source, encoder, batch_size=local_batch, seed=config.seed,
                                       num_threads=config.data.num_threads, prefetch=config.data.prefetch,
                                       replay_source=replay_source, replay_fraction=config.data.replay_fraction,
                                       packing=config.data.packing)
  val_sources = {split: datasets.open_split(dataset, split) for split in config.data.val_splits}
  splits = {config.data.train_split: train_source, **val_sources}
  pipeline.check_lengths(config.data, encoder, splits, log=jax.process_index() == 0)  # over data.seq_len
  return StageData(dataset, tokenizer, model_cfg, encoder, train_iter, len(train_source), val_sources, record)


def llm_tokenizer(config: ml_collections.ConfigDict):
  """The LLM's own tokenizer (model.tokenizer) with the conversation format (model.template;
  '' keeps the tokenizer's own) and the special tokens the pipeline needs, or None when the
  dataset's trained tokenizer is used. Raises at once for a missing folder or a template that
  cannot train, naming the field and the fix."""
  if not config.model.get("tokenizer"):
    return None
  try:
    own = chat_tokenizers.load(config.model.tokenizer)
  except FileNotFoundError as e:  # chat_tokenizers.check_local's reason, with the field and the fix
    raise FileNotFoundError(
        f"model.tokenizer={config.model.tokenizer!r} is not a folder holding the LLM's own tokenizer. Point "
        "--config.model.tokenizer at the LLM's Hugging Face folder or at OUT/tokenizer of `python -m "
        "mgjax.convert import-llm --out=OUT` (for mgm_smol: `python -m mgjax.convert fetch-smollm2` writes "
        f"models/SmolLM2-135M-Instruct). ({e})") from None
  return chat_tokenizers.apply_template(own, config.model.get("template", ""))


def _tokenizer_record(tokenizer, source: str, template: str, dataset: datasets.BuiltDataset) -> dict[str, Any]:
  return {
      "fingerprint": chat_tokenizers.fingerprint(tokenizer),
      "path": str(source),
      "template": template,
      "dataset": f"{dataset.name} {dataset.version}"
  }


def _recorded_tokenizer(workdir: str, step: int) -> dict[str, Any] | None:
  """The tokenizer record in a checkpoint's meta; None for a checkpoint without one (an
  import's) or whose meta does not read (the restore decides what to do with that one)."""
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    return ckpts.meta(step).get("tokenizer")
  except checkpoint.CheckpointError:
    return None
  finally:
    ckpts.close()


def _refuse_other_tokenizer(record: dict[str, Any], workdir: str, init_checkpoint: str | None) -> None:
  """Raises ValueError when the checkpoint a run resumes (the newest with a record) or starts
  from (init_checkpoint) was trained with another tokenizer: its token ids would be read as
  other text, and training would go on with exit 0 and a different loss."""
  if checkpoint.has_checkpoints(workdir):
    steps = checkpoint.Checkpoints(workdir, read_only=True)
    candidates = [(workdir, step) for step in sorted(steps.all_steps(), reverse=True)]
    steps.close()
    fix = ("resume with the data version and model.tokenizer/model.template it was trained with (e.g. "
           "--config.data.recipe.version=...), or train this stage from its start in a new --workdir")
  elif init_checkpoint:
    folder = epath.Path(init_checkpoint)
    candidates = [(str(folder.parent.parent), int(folder.name))]
    fix = ("start from a checkpoint trained with this run's tokenizer, or train with the data version and "
           "model.tokenizer/model.template that checkpoint used (e.g. --config.data.recipe.version=...)")
  else:
    return
  for where, step in candidates:
    saved = _recorded_tokenizer(where, step)
    if saved is None:
      continue
    if saved["fingerprint"] != record["fingerprint"]:
      describe = lambda r: (f"{r['path']} (data {r['dataset']}, template {r['template'] or 'its own'!r}, "
                            f"fingerprint {r['fingerprint'][:12]})")
      raise ValueError(f"checkpoint {epath.Path(where) / 'checkpoints' / str(step)} was trained with tokenizer "
                       f"{describe(saved)}, but this run's tokenizer is {describe(record)}: the same token ids "
                       f"would mean other text. To continue from it, {fix}")
    return


def drop_empty_val_splits(config: ml_collections.ConfigDict, data: StageData) -> None:
  """Validation splits the dataset holds no records of are not evaluated (an empty split's
  loss would read 0 and its scores nan), and the run says so. Raises ConfigError before
  training when the empty one is early_stop.split and it decides the result (early stopping,
  or the drift guard's rollback)."""
  empty = [split for split, source in data.val_sources.items() if not len(source)]
  if not empty:
    return
  where = f"the dataset at {data.dataset.dataset_dir}"
  decides = config.early_stop.patience > 0 or config.guard.drift_action == "rollback"
  if config.early_stop.split in empty and decides:
    raise base_config.ConfigError(
        f"early_stop.split={config.early_stop.split!r} holds no records in {where}, so early stopping "
        "and the drift guard's rollback have nothing to pick the result by. Name a validation split with "
        "records (--config.early_stop.split=...), turn them off (--config.early_stop.patience=0 and a "
        "guard.drift_action other than rollback), or give the data recipe records of that category.")
  for split in empty:
    del data.val_sources[split]
  if jax.process_index() == 0:
    guarded = config.init_from and config.guard.drift_action != "off" and set(empty) & set(config.guard.drift_splits)
    message = (f"{', '.join(empty)} of {where} hold(s) no records: not evaluated (no loss, no scores"
               f"{', and the drift guard does not watch it' if guarded else ''})")
    logging.warning("%s", message)
    print(f"warning: {message}", flush=True)
