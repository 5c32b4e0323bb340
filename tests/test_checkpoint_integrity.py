"""A damaged latest checkpoint: detected, kept aside, and the run resumes from the one before."""

import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest

from mgjax import checkpoint


def _biggest_file(folder: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bit(path: str) -> None:
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _drop_checksums(step: str) -> None:
  path = os.path.join(step, "meta", "metadata")
  meta = json.loads(open(path).read())
  del meta["checksums"]
  open(path, "w").write(json.dumps(meta))


CORRUPTIONS = {
    "truncated params file": lambda step: _truncate(_biggest_file(os.path.join(step, "params"))),
    "missing params file": lambda step: os.remove(_biggest_file(os.path.join(step, "params"))),
    "flipped bit in params": lambda step: _flip_bit(_biggest_file(os.path.join(step, "params"))),
    "flipped bit in optimizer state": lambda step: _flip_bit(_biggest_file(os.path.join(step, "opt_state"))),
    "missing item": lambda step: __import__("shutil").rmtree(os.path.join(step, "opt_state")),
    "empty meta": lambda step: open(os.path.join(step, "meta", "metadata"), "w").close(),
    # Every checkpoint `save` writes has them: without them the arrays cannot be checked.
    "meta without checksums": _drop_checksums,
    "missing data-iterator state": lambda step: os.remove(os.path.join(step, "data", "process_0-of-1.json")),
}


def _save_two(workdir):
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=3)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  rng = np.random.RandomState(0)
  saved = {}
  for step in (1, 2):
    next(it)
    params = {"w": jax.numpy.asarray(rng.randn(64, 64).astype(np.float32)), "b": jax.numpy.arange(64.0) * step}
    opt_state = {"m": jax.numpy.asarray(rng.randn(64, 64).astype(np.float32)), "count": jax.numpy.int32(step)}
    ckpts.save(step, params=params, opt_state=opt_state, data_iter=it, meta={"step": step})
    saved[step] = (params, opt_state)
  ckpts.wait()
  ckpts.close()
  return saved


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
  workdir = str(tmp_path)
  saved = _save_two(workdir)
  CORRUPTIONS[damage](os.path.join(workdir, "checkpoints", "2"))

  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=3)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  params, opt_state = saved[1]
  step, got_params, got_opt, meta, _ = ckpts.restore_latest_intact(abstract_params=_abstract(params),
                                                                   abstract_opt_state=_abstract(opt_state),
                                                                   data_iter=it)
  assert step == 1 and meta["step"] == 1
  np.testing.assert_array_equal(got_params["w"], params["w"])
  np.testing.assert_array_equal(got_opt["m"], opt_state["m"])
  assert next(it) == 1  # the data position of step 1: one element read
  # The damaged checkpoint is kept aside, not deleted, and no longer counts as a step.
  assert ckpts.all_steps() == [1]
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "2"))
  ckpts.close()


def test_a_checkpoint_that_does_not_fit_is_not_called_corrupt(tmp_path):
  workdir = str(tmp_path)
  saved = _save_two(workdir)
  params, opt_state = saved[2]
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=3)
  wrong = {"w": jax.ShapeDtypeStruct((32, 64), np.float32)}
  with pytest.raises(checkpoint.CheckpointError, match="does not fit the model") as e:
    ckpts.restore_latest_intact(abstract_params=wrong, abstract_opt_state=_abstract(opt_state),
                                data_iter=iter(grain.MapDataset.range(100).to_iter_dataset()))
  assert not isinstance(e.value, checkpoint.CheckpointCorrupt)
  assert ckpts.all_steps() == [1, 2] and not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def _garble(path: str) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(bytes((b * 7 + 13) & 0xFF for b in data))


FILE_DAMAGE = {"truncated": _truncate, "garbled": _garble, "deleted": os.remove}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A workdir with checkpoints 1 and 2, saved once; each test damages a copy."""
  workdir = str(tmp_path_factory.mktemp("two_checkpoints"))
  return workdir, _save_two(workdir)


def _resume(workdir, saved, capsys):
  """restore_latest_intact as the trainer calls it: (step, whether the restored arrays are that
  step's as saved, what it printed, the steps left)."""
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=3)
  params, opt_state = saved[1]
  step, got_params, got_opt, meta, _ = ckpts.restore_latest_intact(
      abstract_params=_abstract(params), abstract_opt_state=_abstract(opt_state),
      data_iter=iter(grain.MapDataset.range(100).to_iter_dataset()))
  exact = (meta["step"] == step and all(np.array_equal(got_params[k], saved[step][0][k]) for k in ("w", "b")) and
           np.array_equal(got_opt["m"], saved[step][1]["m"]))
  steps = ckpts.all_steps()
  ckpts.close()
  return step, exact, capsys.readouterr().out, steps


@pytest.mark.parametrize("damage", sorted(FILE_DAMAGE))
def test_any_damaged_file_of_a_checkpoint_resumes_from_an_intact_one(two_checkpoints, tmp_path, capsys, damage):
  """Every file of the latest checkpoint in turn, orbax's own metadata included: the resume
  never stops and never returns other values than a checkpoint saved. Either the damaged file
  was not needed (the latest checkpoint restores exactly) or the run falls back to the one
  before with a warning naming the damaged checkpoint, which is kept aside."""
  template, saved = two_checkpoints
  latest = os.path.join(template, "checkpoints", "2")
  files = sorted(os.path.relpath(os.path.join(r, f), latest) for r, _, fs in os.walk(latest) for f in fs)
  fell_back = set()
  for name in files:
    workdir = str(tmp_path / f"case{len(fell_back)}_{files.index(name)}")
    shutil.copytree(template, workdir)
    FILE_DAMAGE[damage](os.path.join(workdir, "checkpoints", "2", name))
    step, exact, out, steps = _resume(workdir, saved, capsys)
    assert exact, f"{damage} {name}: restored step {step} does not hold what was saved"
    if step == 1:
      fell_back.add(name)
      assert os.path.join(workdir, "checkpoints",
                          "2") in out and "resuming from the checkpoint before it" in out, (name, out)
      assert steps == [1] and os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "2")), name
    else:
      assert step == 2 and steps == [1, 2], (damage, name, step, steps)
  # What a restore needs: the arrays, the data position, the meta and orbax's metadata.
  needed = {
      "params/_METADATA", "params/manifest.ocdbt", "opt_state/_METADATA", "meta/metadata", "data/process_0-of-1.json"
  }
  if damage != "deleted":  # orbax reads the shardings when they are there, and does without them
    needed |= {"params/_sharding", "opt_state/_sharding"}
  assert needed <= fell_back, needed - fell_back


def test_metadata_that_names_other_parameters_is_damage_when_the_checkpoint_before_fits(
    two_checkpoints, tmp_path, capsys):
  """Valid JSON that no longer describes the model (a parameter dropped from params/_METADATA):
  the checkpoints of one run share their model, so with the one before fitting it is damage."""
  template, saved = two_checkpoints
  workdir = str(tmp_path / "run")
  shutil.copytree(template, workdir)
  path = os.path.join(workdir, "checkpoints", "2", "params", "_METADATA")
  metadata = json.loads(open(path).read())
  del metadata["tree_metadata"]["('b',)"]
  open(path, "w").write(json.dumps(metadata))
  step, exact, out, steps = _resume(workdir, saved, capsys)
  assert step == 1 and exact and steps == [1]
  assert "checkpoints/2: its metadata no longer matches the model" in out


def test_checksum_sees_swapped_elements_and_does_not_depend_on_sharding():
  rng = np.random.RandomState(0)
  w = rng.randn(8, 16).astype(np.float32)
  tree = {"w": w, "b": np.arange(16, dtype=np.int32), "flag": np.array([True, False])}
  base = checkpoint.checksum(tree)
  assert len(base) == 16 and base == checkpoint.checksum(jax.tree.map(np.copy, tree))
  swapped = w.copy()
  swapped[0, 0], swapped[3, 5] = w[3, 5], w[0, 0]
  assert checkpoint.checksum(dict(tree, w=swapped)) != base
  assert checkpoint.checksum(dict(tree, w=np.ascontiguousarray(w.T))) != base  # the same elements in another order
  assert checkpoint.checksum(dict(tree, b=tree["b"][::-1].copy())) != base
  # Two leaves of the same shape trading places.
  pair = {"a": w, "b": w + 1}
  assert checkpoint.checksum(pair) != checkpoint.checksum({"a": w + 1, "b": w})
  flipped = w.copy()
  flipped.view(np.uint32)[2, 2] ^= 1 << 31
  assert checkpoint.checksum(dict(tree, w=flipped)) != base
  # The same array split over 8 devices, as a sharded run saves it.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  assert checkpoint.checksum(dict(tree, w=sharded)) == base
