"""A damaged latest checkpoint: detected, kept aside, and the run resumes from the one before."""

import os

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


CORRUPTIONS = {
    "truncated params file": lambda step: _truncate(_biggest_file(os.path.join(step, "params"))),
    "missing params file": lambda step: os.remove(_biggest_file(os.path.join(step, "params"))),
    "flipped bit in params": lambda step: _flip_bit(_biggest_file(os.path.join(step, "params"))),
    "flipped bit in optimizer state": lambda step: _flip_bit(_biggest_file(os.path.join(step, "opt_state"))),
    "missing item": lambda step: __import__("shutil").rmtree(os.path.join(step, "opt_state")),
    "empty meta": lambda step: open(os.path.join(step, "meta", "metadata"), "w").close(),
    "missing data-iterator state": lambda step: os.remove(os.path.join(step, "data", "process_0-of-1.json")),
}


def _save_two(workdir):
  ckpts = checkpoint.Checkpoints(workdir, max_to_keep=3)
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  rng = np.random.RandomState(0)
  saved = {}
  for step in (1, 2):
    next(it)
    params = {"w": jax.numpy.asarray(rng.randn(64, 64).astype(np.float32))}
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
