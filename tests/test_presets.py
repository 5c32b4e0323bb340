"""The real Mini-Gemini presets build abstractly (shapes only) at their published sizes."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from mgjax import config_files, presets
from mgjax.models import abstract_model, num_image_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published parameter counts, each also worked out from the released config.json:
# Gemma-2B (google/gemma-2b-it): embed 256000*2048 (tied) + 18 layers * (q,o 2*2048*2048,
#   k,v 2*2048*256, mlp 3*2048*16384, 2 norms 2*2048) + final norm 2048 = 2,506,172,416.
# Vicuna-7B v1.5 (Llama-2-7B): 2 * 32000*4096 (embed, lm_head) + 32 * (4*4096^2 +
#   3*4096*11008 + 2*4096) + 4096 = 6,738,415,616.
# Llama-3-8B-Instruct: 2 * 128256*4096 + 32 * (2*4096^2 + 2*4096*1024 + 3*4096*14336 +
#   2*4096) + 4096 = 8,030,261,248.
# Vicuna-13B v1.5 (Llama-2-13B): 2 * 32000*5120 + 40 * (4*5120^2 + 3*5120*13824 + 2*5120) + 5120
#   = 13,015,864,320.
# Mixtral-8x7B-Instruct-v0.1: 2 * 32000*4096 + 32 * (2*4096^2 + 2*4096*1024 + 8 experts *
#   3*4096*14336 + router 4096*8 + 2*4096) + 4096 = 46,702,792,704.
# Nous-Hermes-2-Yi-34B: 2 * 64000*7168 + 60 * (2*7168^2 + 2*7168*1024 + 3*7168*20480 + 2*7168)
#   + 7168 = 34,388,917,248.
LLM_PARAMS = {
    "mgm_2b": 2_506_172_416,
    "mgm_7b": 6_738_415_616,
    "mgm_8b": 8_030_261_248,
    "mgm_13b": 13_015_864_320,
    "mgm_8x7b": 46_702_792_704,
    "mgm_34b": 34_388_917_248
}
# Every released model, and its HD variant (the same weights, more visual tokens).
PRESETS = sorted([*LLM_PARAMS, *(f"{name}_hd" for name in LLM_PARAMS)])
TEMPLATES = {
    "mgm_2b": "gemma",
    "mgm_7b": "vicuna_v1",
    "mgm_13b": "vicuna_v1",
    "mgm_8b": "llama_3",
    "mgm_8x7b": "mistral_instruct",
    "mgm_34b": "chatml_direct"
}
# HF CLIPVisionModel of openai/clip-vit-large-patch14-336 has 303,507,456 parameters; mgjax
# builds no post_layernorm (2*1024), which the penultimate-layer features never read.
CLIP_L14_336_PARAMS = 303_507_456 - 2 * 1024
# timm convnext_large: 197,767,336 with its classifier head (norm 2*1536, fc 1536*1000+1000),
# which OpenCLIP/Mini-Gemini drop: 196,227,264 for stem + stages.
CONVNEXT_L_TRUNK_PARAMS = 197_767_336 - (2 * 1536 + 1536 * 1000 + 1000)
# Patch info mining: query LayerNorm+Linear(1024->1024), key and value LayerNorm+Linear(2880->1024).
MINING_PARAMS = (2 * 1024 + 1024 * 1024 + 1024) + 2 * (2 * 2880 + 2880 * 1024 + 1024)


def _count(state) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_abstractly_at_published_size(name):
  cfg = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), f"model={name}")
  model_cfg = cfg.model
  base, hd = name.removesuffix("_hd"), name.endswith("_hd")
  # Trained as the released model: its template, padded images, model_max_length, towers.
  assert model_cfg.template == TEMPLATES[base]
  assert cfg.data.pad_to_square and cfg.data.seq_len == (4096 if hd else 2048)
  assert cfg.optim.freeze == ("vision_lowres/.*", "vision_highres/.*")
  assert model_cfg.vision_highres.image_size == (1536 if hd else 768)
  assert num_image_tokens(model_cfg) == (5 if hd else 1) * 576
  model = abstract_model(model_cfg)
  params = nnx.state(model, nnx.Param)
  # Abstract: shapes only, nothing allocated.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))

  counts = {part: _count(params[part]) for part in params}
  hidden = model_cfg.llm.hidden
  # The presets add 128 vocabulary rows (room for <image>) to the input and output embeddings.
  added_rows = 128 * hidden * (1 if model_cfg.llm.tie_embeddings else 2)
  assert counts["llm"] == LLM_PARAMS[base] + added_rows
  assert counts["vision_lowres"] == CLIP_L14_336_PARAMS
  assert counts["vision_highres"] == CONVNEXT_L_TRUNK_PARAMS
  assert counts["mining"] == MINING_PARAMS
  assert counts["projector"] == 1024 * hidden + hidden + hidden * hidden + hidden
  assert set(counts) == {"llm", "vision_lowres", "vision_highres", "mining", "projector"}
  assert model.vision_highres.feature_channels == 2880


def test_visual_tokens_have_the_published_shapes():
  """576 CLIP tokens of width 1024 mine 8x8 windows of a 192x192x2880 map (shapes only)."""
  cfg = config_files.preset("models", "mgm_2b")
  model = abstract_model(cfg)
  lo = jax.ShapeDtypeStruct((1, 336, 336, 3), np.float32)
  hi = jax.ShapeDtypeStruct((1, 768, 768, 3), np.float32)
  graphdef, state = nnx.split(model)

  def shapes(state, lo, hi):
    m = nnx.merge(graphdef, state)
    return (m.vision_lowres(lo), m.vision_highres.feature_map(hi), m.encode_images(lo, hi))

  lowres, highres, tokens = jax.eval_shape(shapes, state, lo, hi)
  assert lowres.shape == (1, 576, 1024)
  assert highres.shape == (1, 192, 192, 2880)
  assert tokens.shape == (1, 576, 2048)


# Each preset's optimizer, sequence length and global batch, as Mini-Gemini's training scripts
# (dvlab-research/MGM, scripts/<family>/train/*.sh) set them. Every script: --weight_decay 0.,
# --warmup_ratio 0.03, --lr_scheduler_type cosine (to 0: end_lr_factor 0), no betas (HF
# AdamW's 0.9, 0.999), and no clipping (DeepSpeed's gradient_clipping, absent from its
# zero*.json, defaults to 0, so HF's max_grad_norm never applies): grad_clip 0. Global batch:
# per-device batch x gradient accumulation x 32 GPUs, 256 to pretrain, 128 to fine-tune.
# An HD model reuses its base's pretraining (--pretrain_mm_mlp_adapter of the 768 px run);
# pretraining with the HD preset itself needs its 4096 tokens: 5 x 576 image tokens exceed 2048.
X2 = (("(mining|projector)/.*", 2.0),)  # --lr_multi "model.mm_projector:2,model.vlm_uni:2"
# yapf: disable
MGM_TRAINING = [
    # preset, phase, MGM script, lr, lr_multipliers, weight_decay, warmup_ratio, end_lr_factor, b1, b2, grad_clip,
    # data.seq_len (model_max_length), data.batch_size (global)
    ("mgm_2b", "pretrain", "scripts/gemma/train/stage_1_2_full_gemma_v2b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_2b", "stage1", "scripts/gemma/train/stage_1_2_full_gemma_v2b_336_hr_768.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_2b_hd", "pretrain", "scripts/gemma/train/stage_1_2_full_gemma_v2b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_2b_hd", "stage1", "scripts/gemma/train/stage_2_full_gemma_v2b_672_hr_1536.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
    ("mgm_7b", "pretrain", "scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_7b", "stage1", "scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_7b_hd", "pretrain", "scripts/llama/train/stage_1_2_full_v7b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_7b_hd", "stage1", "scripts/llama/train/stage_2_full_v7b_672_hr_1536.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
    ("mgm_13b", "pretrain", "scripts/llama/train/stage_1_2_full_v13b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_13b", "stage1", "scripts/llama/train/stage_1_2_full_v13b_336_hr_768.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_13b_hd", "pretrain", "scripts/llama/train/stage_1_2_full_v13b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_13b_hd", "stage1", "scripts/llama/train/stage_2_full_v13b_672_hr_1536.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
    ("mgm_8b", "pretrain", "scripts/llama3/train/stage_1_2_full_v8b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_8b", "stage1", "scripts/llama3/train/stage_1_2_full_v8b_336_hr_768.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_8b_hd", "pretrain", "scripts/llama3/train/stage_1_2_full_v8b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_8b_hd", "stage1", "scripts/llama3/train/stage_2_full_v8b_672_hr_1536.sh", 2e-5, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
    ("mgm_8x7b", "pretrain", "scripts/mixtral/train/stage_1_2_full_mixtral_8x7b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_8x7b", "stage1", "scripts/mixtral/train/stage_1_2_full_mixtral_8x7b_336_hr_768.sh", 1e-5, X2, 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_8x7b_hd", "pretrain", "scripts/mixtral/train/stage_1_2_full_mixtral_8x7b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_8x7b_hd", "stage1", "scripts/mixtral/train/stage_2_full_mixtral_8x7b_672_hr_1536.sh", 1e-5, X2, 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
    ("mgm_34b", "pretrain", "scripts/yi/train/stage_1_2_full_yi34b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 256),
    ("mgm_34b", "stage1", "scripts/yi/train/stage_1_2_full_yi34b_336_hr_768.sh", 1e-5, X2, 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 2048, 128),
    ("mgm_34b_hd", "pretrain", "scripts/yi/train/stage_1_2_full_yi34b_336_hr_768.sh", 1e-3, (), 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 256),
    ("mgm_34b_hd", "stage1", "scripts/yi/train/stage_2_full_yi34b_672_hr_1536.sh", 1e-5, X2, 0.0, 0.03, 0.0, 0.9, 0.999, 0.0, 4096, 128),
]
# yapf: enable
FIELDS = ("optim.lr", "optim.lr_multipliers", "optim.weight_decay", "optim.warmup_ratio", "optim.end_lr_factor",
          "optim.b1", "optim.b2", "optim.grad_clip", "data.seq_len", "data.batch_size")


def _stage_config(phase: str, preset: str):
  return config_files.load_config_file(os.path.join(REPO, "configs", f"{phase}.py"), f"model={preset}")


def _values(c, fields=FIELDS) -> dict:
  return {f: c[f.split(".")[0]][f.split(".")[1]] for f in fields}


def test_the_table_covers_every_preset_and_phase():
  assert sorted({(row[0], row[1]) for row in MGM_TRAINING}) == sorted(
      (name, phase) for name in PRESETS for phase in ("pretrain", "stage1"))


@pytest.mark.parametrize("row", MGM_TRAINING, ids=[f"{row[0]}-{row[1]}" for row in MGM_TRAINING])
def test_presets_train_as_mini_geminis_scripts(row):
  preset, phase, script, *expected = row
  c = _stage_config(phase, preset)
  assert _values(c) == dict(zip(FIELDS, expected)), script
  # --num_train_epochs 1, one conversation a row (MGM does not pack, so batch and epoch count
  # conversations), and weights and optimizer state split over every device.
  assert (c.train.epochs, c.data.packing, c.data.max_images) == (1.0, False, 1), script
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_stage_2_runs_at_half_stage_1s_rate_on_its_schedule(preset):
  stage1, stage2 = _stage_config("stage1", preset), _stage_config("stage2", preset)
  assert stage2.optim.lr == stage1.optim.lr / 2
  same = [f for f in FIELDS if f != "optim.lr"] + ["train.epochs", "data.packing", "data.max_images"]
  assert _values(stage2, same) == _values(stage1, same)
  assert stage2.data.train_split == "train_generation" and stage2.train.epochs == 1.0
  # What keeps the short run from undoing stage 1: early stopping and the drift guard.
  assert stage2.early_stop.patience > 0 and stage2.guard.drift_action == "rollback"


def test_the_sample_keeps_its_tuned_values_and_a_preset_without_training_the_defaults(tmp_path):
  sample = {
      phase: _values(_stage_config(phase, "sample"), FIELDS + ("optim.warmup_steps",))
      for phase in ("pretrain", "stage1", "stage2")
  }
  assert sample["pretrain"] == {
      **sample["pretrain"], "optim.lr": 1e-3,
      "optim.end_lr_factor": 0.0,
      "optim.weight_decay": 0.0,
      "optim.warmup_ratio": 0.03
  }
  tuned = {
      "optim.lr": 1e-3,
      "optim.warmup_steps": 50,
      "optim.warmup_ratio": 0.0,
      "optim.end_lr_factor": 0.1,
      "optim.weight_decay": 0.01,
      "optim.b1": 0.9,
      "optim.b2": 0.95,
      "optim.grad_clip": 1.0,
      "data.batch_size": 16
  }
  assert sample["stage1"] == {**sample["stage1"], **tuned}
  assert sample["stage2"] == {**sample["stage2"], **tuned, "optim.lr": 1e-4, "optim.warmup_steps": 10}
  # A preset of one's own without `training` trains on base_config's and the stage files' defaults.
  own = tmp_path / "own.py"
  own.write_text(
      "from mgjax import config_files\n\n\ndef get_config(arg=None):\n  model = config_files.preset('models', 'sample')\n"
      "  del model['training']\n  return model\n")
  for phase in ("pretrain", "stage1", "stage2"):
    assert _values(_stage_config(phase, str(own)), FIELDS + ("optim.warmup_steps",)) == sample[phase]


def test_a_training_value_the_config_does_not_have_is_an_error():
  c = _stage_config("stage1", "sample")
  c.unlock()
  c.model.training.stage1.optim.lrr = 1e-5
  with pytest.raises(ValueError, match=r"model.training.stage1.optim.lrr: the config has no field optim.lrr"):
    presets.apply_training(c, "stage1")


def test_grad_clip_zero_leaves_the_gradients_unclipped():
  """Mini-Gemini's runs are not clipped (grad_clip 0): the updates are AdamW's own, not zeros."""
  from mgjax import optim

  params = {"w": jax.numpy.ones((4, 4))}
  grads = {"w": jax.numpy.full((4, 4), 100.0)}
  c = _stage_config("stage1", "mgm_7b").optim
  updates = {}
  for clip in (0.0, -1.0, 1.0):
    c.grad_clip = clip
    tx, _ = optim.make(c, 100, params)
    state = tx.init(params)
    for _ in range(3):  # past the warmup's zero first rate
      update, state = tx.update(grads, state, params)
    updates[clip] = np.asarray(update["w"])
  assert np.abs(updates[0.0]).min() > 0
  np.testing.assert_array_equal(updates[0.0], updates[-1.0])
  # Adam's update does not depend on the gradient's scale: clipping to 1 changes nothing but
  # eps's share, so unclipped and clipped agree closely; with clip_by_global_norm(0) they were 0.
  np.testing.assert_allclose(updates[0.0], updates[1.0], rtol=1e-4)


def test_real_size_presets_split_their_state_over_every_device_and_their_batches_divide():
  """Every mgm preset (>= 2.5B parameters) runs FSDP over all devices without mesh flags; the
  batch is split over data x fsdp, so its global batches still divide over any slice up to
  their size. The sample stays data parallel."""
  from mgjax import sharding

  for preset in PRESETS:
    for phase in ("pretrain", "stage1", "stage2"):
      c = _stage_config(phase, preset)
      for n in (1, 2, 4, 8, 16, 32, 64, 128):
        assert sharding.mesh_shape(c.mesh, n) == (1, n, 1) and c.data.batch_size % n == 0, (preset, phase, n)
  assert sharding.mesh_shape(_stage_config("stage1", "sample").mesh, 8) == (8, 1, 1)
