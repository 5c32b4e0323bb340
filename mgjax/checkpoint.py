"""Checkpoints with orbax: WORKDIR/checkpoints/<step>/{params,opt_state,data,meta[,adapters]}.

`params` and `opt_state` are array trees (saved asynchronously, sharded as they live),
`data` is the grain iterator position (one file per process), `meta` a JSON dict
(stage, step, config, dataset, and for stage 2 the checkpoint it started from).
`params` are always plain model weights, whatever trained them; a LoRA run adds its
`adapters` (and `opt_state` is theirs), so it can resume.
Full resume (`Checkpoints.restore`) is kept apart from the params-only load that starts
stage 2 (`restore_params`), as MaxText does.

Retention: the latest `max_to_keep` checkpoints, plus the best evaluated one (the
lowest `score` passed to `save`), which early stopping and the drift guard's rollback
hand on as the run's result. The result is named in WORKDIR/report.json; `locate`
returns it.

Integrity: orbax stores no checksums, so `save` puts a checksum of every array item in
`meta` ("checksums": per item, 64 bits of a keyed sum over every element's bit pattern and
its place in the tree; a changed, swapped or moved element changes it) and `restore`
recomputes and compares it. `restore_latest_intact` resumes from the newest checkpoint that
restores and matches, and moves each one that does not (any truncated, garbled or missing
file, orbax's own metadata included; a changed element; an empty meta; a missing item or
data-iterator state) to WORKDIR/corrupt_checkpoints/<step>, kept for a post-mortem, never
deleted.
"""

from __future__ import annotations

import math
import os
from typing import Any

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mgjax import reports, sharding

# Array items saved with a checksum (see the module docstring).
_CHECKSUMMED = ("params", "opt_state", "adapters")


def _not_read_only_notice(record) -> bool:
  """Orbax warns on every read-only open (stage 2 reading stage 1, predict, export): reading a
  finished run's checkpoints is what read-only is for, not something to warn about."""
  return not str(record.msg).startswith("Given directory is read only")


logging.get_absl_logger().addFilter(_not_read_only_notice)


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model."""


class CheckpointCorrupt(CheckpointError):
  """A checkpoint whose files cannot be read back as they were written."""


class ResultMissing(CheckpointError):
  """A run's report.json names a result checkpoint that is no longer there."""


def _mix(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit over
  the output (uint32 products wrap, as the hash wants)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _words(leaf: jax.Array) -> jax.Array:
  """A leaf's bit patterns as uint32 words (64-bit elements as two)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if leaf.dtype == jnp.bool_:
    return leaf.astype(jnp.uint32)
  bits = leaf.dtype.itemsize * 8
  if bits in (8, 16, 32):
    return jax.lax.bitcast_convert_type(leaf, getattr(jnp, f"uint{bits}")).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(leaf, jnp.uint32)


@jax.jit
def _checksum(tree: Any) -> jax.Array:
  """Two 32-bit lanes, each the wrapping sum over every element of _mix(its bits ^ a key of its
  place: leaf number and index within the leaf). For a fixed place _mix is a bijection, so any
  one changed element always changes both sums; a swap or move changes them unless the
  mixed values collide (about 2**-64). A sum is the same in any order, so it does not depend
  on how the arrays are sharded (save and restore may shard them differently)."""
  lanes = jnp.zeros(2, jnp.uint32)
  for n, leaf in enumerate(x for x in jax.tree.leaves(tree) if hasattr(x, "dtype")):
    # An optimizer state kept in host memory (optim.offload) is summed on the device, a leaf
    # at a time: XLA computes only on device memory.
    words = _words(jax.device_put(leaf, jax.memory.Space.Device)).ravel()
    place = _mix(jnp.arange(words.size, dtype=jnp.uint32) ^ _mix(jnp.uint32(n + 1) * jnp.uint32(0x9E3779B9)))
    first = _mix(words ^ place)
    second = _mix(first ^ jnp.uint32(0x5BD1E995) ^ (place >> 7))
    lanes = lanes + jnp.stack([jnp.sum(first, dtype=jnp.uint32), jnp.sum(second, dtype=jnp.uint32)])
  return lanes


_barriers = 0  # barrier names must be unique within a run; every process counts the same calls


def checksum(tree: Any) -> str:
  """The checksum of an array tree as 16 hex digits (see _checksum).

  With several processes the sum is one program over every process's shards. Its reduction
  is the first collective of a resumed run, and gloo gives a new device group only 30 s to
  meet: processes that restored at different speeds timed out there. So each compiles it
  first, then all meet at the coordinator's barrier (mgjax.sharding), then run it together.
  """
  if jax.process_count() == 1:
    lanes = _checksum(tree)
  else:
    global _barriers
    compiled = _checksum.lower(tree).compile()
    _barriers += 1
    sharding.wait_for_all_processes(f"mgjax: checkpoint checksum {_barriers}")
    lanes = compiled(tree)
  first, second = (int(x) for x in np.asarray(lanes))
  return f"{first:08x}{second:08x}"


def path_str(path: tuple) -> str:
  """"llm/layers/0/self_attn/q_proj/kernel" for a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


class Checkpoints:
  """The checkpoints of one workdir."""

  def __init__(self, workdir: str, *, max_to_keep: int | None = None, read_only: bool = False):
    # Orbax only takes absolute paths; a relative workdir (the README's `runs/sample`) is
    # relative to where the command runs. Cloud paths (gs://...) are absolute already.
    root = workdir if "://" in str(workdir) else os.path.abspath(workdir)
    self.directory = epath.Path(root) / "checkpoints"
    policies = ocp.checkpoint_managers
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=max_to_keep),
        # BestN keeps the highest values; a lower score (a validation loss) is better.
        policies.BestN(get_metric_fn=lambda m: -m["score"], n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        read_only=read_only,
        create=not read_only,
        enable_async_checkpointing=True,
        preservation_policy=keep,
        save_interval_steps=0 if read_only else 1,
        # A save cut short (a kill, a second Ctrl-C, a full disk) leaves a tmp folder; the
        # next run's manager removes it. One process only: with several, a resumed run's
        # collectives went out of step between the processes and timed out.
        cleanup_tmp_directories=not read_only and jax.process_count() == 1)
    # Handlers named up front, so a manager that has not saved anything yet (a resumed
    # run, stage 2 reading stage 1) can read the items' metadata.
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "adapters": ocp.StandardCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, *, params: Any, opt_state: Any, data_iter: Any, meta: dict, adapters: Any = None,
           score: float | None = None) -> None:
    """Starts an asynchronous save; arrays are copied off first, so training goes on.

    `score` (lower is better; None for a step that was not evaluated or is out of the
    drift guard's bounds) ranks the checkpoint for the keep-the-best retention.
    """
    arrays = {"params": params, "opt_state": opt_state, "adapters": adapters}
    meta = dict(meta, checksums={k: checksum(v) for k, v in arrays.items() if v is not None})
    items = dict(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta),
    )
    if adapters is not None:
      items["adapters"] = ocp.args.StandardSave(adapters)
    metrics = {"score": float(score)} if score is not None and math.isfinite(score) else None
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, *, abstract_params: Any, abstract_opt_state: Any, data_iter: Any,
              abstract_adapters: Any = None):
    """Full resume: params, optimizer state, data position (restored into data_iter), meta,
    and the LoRA adapters when `abstract_adapters` is given (else None)."""
    check_params_fit(self, step, abstract_params)
    items = dict(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore(),
    )
    if abstract_adapters is not None:
      items["adapters"] = ocp.args.StandardRestore(abstract_adapters)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # whatever orbax, tensorstore or grain raise for unreadable files
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)} cannot be read: "
                              f"{type(e).__name__}: {_first_line(e)}") from e
    meta = restored["meta"]
    if not isinstance(meta, dict) or "step" not in meta:
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)}: its meta item is empty or not a dict")
    _check_checksums(self.directory / str(step), meta, restored)
    return (restored["params"], restored["opt_state"], meta,
            restored["adapters"] if abstract_adapters is not None else None)

  def restore_latest_intact(self, **restore_args):
    """`restore` of the newest checkpoint that reads back intact, as (step, params, opt_state,
    meta, adapters); (None, ...) when there is none. Each corrupt one on the way is moved to
    WORKDIR/corrupt_checkpoints/<step> and a warning says so. A checkpoint that does not fit
    the model stops the run (a config change, not damage) unless one before it fits: the
    checkpoints of one run share their model, so then its metadata was damaged."""
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, **restore_args))
      except CheckpointCorrupt as e:
        problem = str(e)
      except CheckpointError:
        if not self._an_earlier_one_fits(step, restore_args["abstract_params"]):
          raise
        problem = (f"checkpoint {self.directory / str(step)}: its metadata no longer matches the model the "
                   "checkpoints before it fit (damaged after it was written)")
      moved = self.set_aside(step)
      logging.warning("%s; moved it to %s and resuming from the checkpoint before it", problem, moved)
      print(f"warning: {problem}\n  moved to {moved}; resuming from the checkpoint before it", flush=True)
    return (None, None, None, None, None)

  def _an_earlier_one_fits(self, step: int, abstract_params: Any) -> bool:
    for earlier in sorted((s for s in self.all_steps() if s < step), reverse=True):
      try:
        check_params_fit(self, earlier, abstract_params)
        return True
      except CheckpointError:  # does not fit either, or its own metadata is damaged
        continue
    return False

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoints/<step> to corrupt_checkpoints/<step> (a numbered suffix when taken)."""
    target_dir = self.directory.parent / "corrupt_checkpoints"
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      target = target_dir / str(step)
      n = 1
      while target.exists():
        target, n = target_dir / f"{step}.{n}", n + 1
      (self.directory / str(step)).rename(target)
    else:
      target = target_dir / str(step)
    self._manager.reload()
    return target

  def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
    """Params and meta of one checkpoint (the next stage's start, predict, export), checked
    against the checksum they were saved with."""
    check_params_fit(self, step, abstract_params)
    where = self.directory / str(step)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    except Exception as e:  # whatever orbax or tensorstore raise for unreadable files
      raise CheckpointCorrupt(f"checkpoint {where} cannot be read: {type(e).__name__}: {_first_line(e)}") from e
    meta = restored["meta"]
    if not isinstance(meta, dict):
      raise CheckpointCorrupt(f"checkpoint {where}: its meta item is empty or not a dict")
    _check_checksums(where, meta, {"params": restored["params"]})
    return restored["params"], meta

  def param_metadata(self, step: int) -> Any:
    """The saved params' tree of ArrayMetadata (shape, dtype, sharding), read without loading."""
    try:
      metadata = self._manager.item_metadata(step)["params"]
    except Exception as e:  # a truncated or garbled _METADATA, _sharding, ...: orbax raises what its parser does
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)}: its metadata cannot be read: "
                              f"{type(e).__name__}: {_first_line(e)}") from e
    if metadata is None:
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)}: its params item is missing")
    return metadata

  def meta(self, step: int) -> dict:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)}: its meta item cannot be read: "
                              f"{type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(meta, dict):
      raise CheckpointCorrupt(f"checkpoint {self.directory / str(step)}: its meta item is empty or not a dict")
    return meta

  def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    metadata = self.param_metadata(step)
    leaves = jax.tree_util.tree_leaves_with_path(metadata, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): tuple(m.shape) for p, m in leaves}

  def delete(self, step: int) -> None:
    self._manager.delete(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _check_checksums(where: epath.Path, meta: dict, restored: Any) -> None:
  """Raises CheckpointCorrupt when a restored item's checksum differs from the one `save` put in
  meta, or meta has none for it. An import's checkpoint (python -m mgjax.convert import-*, meta
  "imported") is written without them, so it is not checked. Every process gets the same sums,
  so all of them agree on the verdict."""
  if meta.get("imported"):
    return
  sums = meta.get("checksums")
  for item in sorted(k for k in _CHECKSUMMED if restored.get(k) is not None):
    saved = sums.get(item) if isinstance(sums, dict) else None
    if saved is None:
      raise CheckpointCorrupt(f"checkpoint {where}: its meta holds no checksum of {item} (damaged after it "
                              "was written)")
    found = checksum(restored[item])
    if found != saved:
      raise CheckpointCorrupt(f"checkpoint {where}: {item} reads back changed (checksum "
                              f"{found}, saved {saved}): a file was damaged after it was written")


def check_params_fit(checkpoints: Checkpoints, step: int, abstract_params: Any) -> None:
  """Stops with every mismatched parameter path before orbax tries to restore."""
  saved = checkpoints.param_shapes(step)
  wanted = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  problems = [
      f"  {p}: checkpoint {saved[p]} vs model {wanted[p]}" for p in sorted(wanted)
      if p in saved and saved[p] != wanted[p]
  ]
  problems += [
      f"  {p}: missing from the checkpoint (model wants {wanted[p]})" for p in sorted(wanted) if p not in saved
  ]
  problems += [f"  {p}: in the checkpoint {saved[p]} but not in the model" for p in sorted(saved) if p not in wanted]
  if problems:
    shown = problems[:40] + ([f"  ... and {len(problems) - 40} more"] if len(problems) > 40 else [])
    raise CheckpointError(
        f"checkpoint {checkpoints.directory / str(step)} does not fit the model: {len(problems)} "
        "mismatched parameter(s):\n" + "\n".join(shown) +
        "\nUse the model config the checkpoint was trained with (see its meta/ item), or start from a matching checkpoint."
    )


def relative_to(path: str, workdir: str) -> str:
  """`path` as report.json stores it: relative to the workdir for local paths (so a workdir
  copied or moved with its siblings still points at its checkpoints), else as it is."""
  if "://" in str(path) or "://" in str(workdir):
    prefix = str(workdir).rstrip("/") + "/"
    return str(path)[len(prefix):] if str(path).startswith(prefix) else str(path)
  return os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))


def result_checkpoint(workdir: str) -> str | None:
  """The run's result checkpoint folder, as its report.json names it (None: no report yet).

  Usually WORKDIR/checkpoints/<step>; when a stage 2 never improved on its start, the
  stage-1 checkpoint it started from. A relative path (what reports store) is taken
  relative to the workdir.
  """
  report = reports.read(workdir)
  if report is None:
    return None
  path = (report.get("result") or {}).get("checkpoint")
  if not path or "://" in path or os.path.isabs(path):
    return path
  if "://" in str(workdir):
    return f"{str(workdir).rstrip('/')}/{path}"
  return os.path.normpath(os.path.join(str(workdir), path))


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds any step (cheap: a folder listing, no orbax)."""
  folder = epath.Path(workdir) / "checkpoints"
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def finished(workdir: str) -> bool:
  """Whether the run in `workdir` completed (its report.json says so)."""
  return bool((reports.read(workdir) or {}).get("complete"))


def imported(workdir: str, step: int) -> bool:
  """Whether checkpoint `step` of `workdir` was written by an import (python -m mgjax.convert
  import-llm / import-mgm): whole weights to start a stage from, not a run cut short."""
  try:
    ckpts = Checkpoints(workdir, read_only=True)
    try:
      return bool(ckpts.meta(step).get("imported"))
    finally:
      ckpts.close()
  except (FileNotFoundError, KeyError, ValueError):  # no meta, or not one an import wrote
    return False


def locate(path: str, *, require_finished: bool = False, step: int = -1) -> tuple[str, int]:
  """Finds (workdir, step) for a workdir, its checkpoints/ folder, or one checkpoints/<step> folder.

  For a workdir: the run's result checkpoint (the best one when early stopping or a
  rollback chose it, as report.json says), else its latest checkpoint. With
  `require_finished` (starting the next stage from it) a run that has not finished is
  refused unless `step` (>= 0) names the checkpoint to take instead (init_from_step). An
  imported checkpoint (`python -m mgjax.convert import-*`, meta "imported") is a finished start.
  """
  p = epath.Path(path)
  if p.name.isdigit() and p.parent.name == "checkpoints":
    if not p.exists():
      raise CheckpointError(f"checkpoint {p} does not exist")
    return str(p.parent.parent), int(p.name)
  workdir = p.parent if p.name == "checkpoints" else p
  if step is not None and step >= 0:
    return locate(str(workdir / "checkpoints" / str(step)))
  result = result_checkpoint(str(workdir))
  steps = []
  if (workdir / "checkpoints").exists():
    ckpts = Checkpoints(str(workdir), read_only=True)
    steps = sorted(ckpts.all_steps())
    ckpts.close()
  if result and epath.Path(result).exists():
    return locate(result)
  if result:
    # Taking another checkpoint would silently change what the next stage (or predict)
    # starts from: the user decides which.
    others = f"its checkpoints: steps {', '.join(map(str, steps))}" if steps else "it holds no other checkpoint"
    pick = steps[-1] if steps else "N"
    raise ResultMissing(
        f"{workdir / 'report.json'} names {result} as the run's result, but that checkpoint is gone ({others}). "
        f"To start a stage from another one anyway, add --config.init_from_step={pick}; to predict or export "
        f"with it, pass {workdir / 'checkpoints' / str(pick)} instead of the workdir. Or rerun the stage in a new "
        "workdir to get its result back.")
  latest = steps[-1] if steps else None
  if latest is None:
    raise CheckpointError(f"no checkpoint found under {workdir / 'checkpoints'}. Each stage starts from the one before "
                          f"it: run that stage with --workdir={workdir} first (e.g. `python -m mgjax.main "
                          f"--config=configs/stage1.py --workdir={workdir}`), or point --config.init_from at a workdir "
                          "(or checkpoints/<step> folder) that holds one.")
  if require_finished and not finished(str(workdir)) and not imported(str(workdir), latest):
    raise CheckpointError(
        f"the run in {workdir} has not finished (no complete report.json; its latest checkpoint is step "
        f"{latest}), so it has no result to start from. Finish it (run its command again: it resumes), "
        f"or start from that checkpoint anyway with --config.init_from_step={latest}.")
  return str(workdir), latest
