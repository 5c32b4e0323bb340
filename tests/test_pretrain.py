"""The pretraining phase (configs/pretrain.py) and the three-phase recipe on the tiny sample."""

import os

import jax
import numpy as np
from flax import nnx

from conftest import REPO, load_params
from mgjax import checkpoint, config_files, recipe
from mgjax import run_files
from mgjax.data import build
from mgjax.data import chat_tokenizers
from mgjax.models import vlm


def _tiny(phase: str, data_dir: str, steps: int):
  c = config_files.load_config_file(os.path.join(REPO, "configs", f"{phase}.py"), "data=sample:tiny")
  c.data.data_dir = data_dir
  c.data.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.log_every = 1
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = steps
  c.eval.decode = False
  c.mesh.num_devices = 1
  return c


def test_pretrain_config_is_mini_gemini_phase_one():
  c = config_files.load_config_file(os.path.join(REPO, "configs", "pretrain.py"), "model=mgm_7b")
  assert c.model.template == "plain" and c.data.train_split == "train_caption"
  assert c.optim.lr == 1e-3 and c.optim.warmup_ratio == 0.03 and c.optim.end_lr_factor == 0.0
  assert set(c.optim.freeze) == {"llm/.*", "vision_lowres/.*", "vision_highres/.*"}
  # MGM-2B and MGM-8B pretrain in their own chat templates, as Mini-Gemini's scripts do.
  for name, template in (("mgm_2b", "gemma"), ("mgm_8b", "llama_3")):
    c = config_files.load_config_file(os.path.join(REPO, "configs", "pretrain.py"), f"model={name}")
    assert c.model.template == template


def test_recipe_runs_three_phases_and_pretraining_moves_only_mining_and_projector(data_dir, tmp_path):
  configs = {phase: _tiny(phase, data_dir, steps=2) for phase in recipe.PHASES}
  summaries = recipe.run(configs, str(tmp_path))
  pretrain, stage1, stage2 = summaries
  assert [s.stage for s in summaries] == [0, 1, 2]
  assert set(pretrain.val_loss_end) == {"val_caption"}
  assert set(stage1.val_loss_end) == {"val_understanding", "val_generation", "val_text"}
  # Each phase starts from the one before.
  assert stage1.init_from.startswith(str(tmp_path / "pretrain" / "checkpoints"))
  assert stage2.init_from.startswith(str(tmp_path / "stage1" / "checkpoints"))
  assert "pretraining: 2 steps" in pretrain.format()

  # Pretraining changed mining and the projector, and nothing else, bit for bit.
  c = configs["pretrain"]
  dataset = build.ensure_built(c.data.recipe, data_dir)
  tok = chat_tokenizers.apply_template(chat_tokenizers.load(dataset.tokenizer_dir), "plain")
  model_cfg = run_files.resolve_model_config(c.model, tok)
  initial = jax.jit(lambda: nnx.split(vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(c.seed)))[1].to_pure_dict())()
  trained, _ = load_params(str(tmp_path / "pretrain"), 2)
  flat = lambda tree: {checkpoint.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  flat_initial, flat_trained = flat(initial), flat(trained)
  assert set(flat_initial) == set(flat_trained)
  changed = {name.split("/")[0] for name in flat_trained if not np.array_equal(flat_trained[name], flat_initial[name])}
  assert changed == {"mining", "projector"}
  assert pretrain.num_trainable == sum(x.size for k in ("mining", "projector") for x in jax.tree.leaves(initial[k]))


def test_lr_multipliers_scale_the_matching_updates_exactly():
  """MGM-8x7B/34B fine-tune mining and the projector at twice the learning rate."""
  from mgjax import optim

  c = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "model=mgm_34b")
  assert c.optim.lr_multipliers == (("(mining|projector)/.*", 2.0),)
  params = {"projector": {"kernel": jax.numpy.ones((4, 4))}, "llm": {"kernel": jax.numpy.ones((4, 4))}}
  grads = jax.tree.map(lambda p: p * 0.1, params)
  plain = c.optim.copy_and_resolve_references()  # the same optimizer without the multipliers
  plain.lr_multipliers = ()
  updates = {}
  for name, optim_cfg in (("plain", plain), ("x2", c.optim)):
    tx, _ = optim.make(optim_cfg, 100, params)
    state = tx.init(params)
    for _ in range(3):  # past the first step's zero learning rate
      u, state = tx.update(grads, state, params)
    updates[name] = u
  np.testing.assert_array_equal(updates["x2"]["projector"]["kernel"], 2 * updates["plain"]["projector"]["kernel"])
  np.testing.assert_array_equal(updates["x2"]["llm"]["kernel"], updates["plain"]["llm"]["kernel"])
  assert float(jax.numpy.abs(updates["plain"]["projector"]["kernel"]).max()) > 0


def test_mgm_optimizer_does_not_clip_and_a_bf16_first_moment_keeps_the_updates():
  """grad_clip 0 (Mini-Gemini's runs are not clipped) still trains; a bfloat16 first moment
  (optim.mu_dtype) is stored in bf16 and moves the weights as float32 does, to bf16's precision."""
  from mgjax import optim

  c = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "model=mgm_7b")
  assert c.optim.grad_clip == 0.0 and c.optim.mu_dtype == "float32"
  rng = np.random.default_rng(0)
  params = {"llm": {"kernel": jax.numpy.asarray(rng.normal(size=(8, 8)), jax.numpy.float32)}}
  grads = jax.tree.map(lambda p: 100.0 * p, params)  # global norm far above 1
  updates = {}
  for mu_dtype in ("float32", "bfloat16"):
    optim_cfg = c.optim.copy_and_resolve_references()
    optim_cfg.mu_dtype = mu_dtype
    tx, _ = optim.make(optim_cfg, 100, params)
    state = tx.init(params)
    moments = {x.dtype for x in jax.tree.leaves(state) if x.ndim == 2}
    assert moments == {jax.numpy.dtype(mu_dtype), jax.numpy.dtype("float32")}
    for _ in range(3):
      u, state = tx.update(grads, state, params)
    updates[mu_dtype] = np.asarray(u["llm"]["kernel"])
  np.testing.assert_allclose(updates["bfloat16"], updates["float32"], rtol=2e-2)
  # No clipping is not clipping to zero: the weights move (clip_by_global_norm(0) would stop them).
  assert np.abs(updates["float32"]).min() > 0
