"""Mini-Gemini's HD path (model.image_grid >= 2, model.image_global) equals MGM's code.

References, transcribed from Mini-Gemini (dvlab-research/MGM; MGM itself needs deepspeed and
a CUDA stack): mgm/model/mgm_arch.py `encode_images` and `unified_resampler` with the
towers as MGM runs them (transformers' CLIPVisionModel, penultimate layer without the class
token; a ConvNeXt's stages upsampled to stage 0 and concatenated, OpenCLIPVisionTower.
backbone), and mgm/train/train.py `LazySupervisedDataset.__getitem__` (= mgm/eval/
model_vqa.py) for the low-res views: the normalised high-res image resized to grid * crop
size, cut into row-major crops, plus that image resized to the crop size (the global view).
Tiny random float32 weights, every one perturbed away from its init.
"""

import os
import types

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers
from flax import nnx
from PIL import Image

from mgjax import config_files
from mgjax.convert import vision_weights
from mgjax.data import build, datasets, images, pipeline
from mgjax.models import vlm
from mgjax.models.mining import downsample_bilinear
from mgjax.train_step import make_loss_fn
from mgjax.run_files import resolve_model_config
from test_vision_parity import _perturb, _state  # the towers' torch helpers

torch = pytest.importorskip("torch")
F = torch.nn.functional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_ATOL = 1e-5  # float32, whole HD encode path (towers, mining, projector)

VIT = dict(image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp=64)
CONVNEXT = dict(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1))


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _timm_names(hf_state: dict) -> dict:
  """transformers ConvNext names -> timm's (what load_convnext reads; same tensors)."""
  out = {}
  for name, value in hf_state.items():
    if name.startswith(("layernorm.", "pooler")):
      continue  # the pooled-output norm, which MGM never runs
    for old, new in (("embeddings.patch_embeddings.", "stem.0."), ("embeddings.layernorm.", "stem.1."),
                     ("encoder.stages.", "stages."), (".downsampling_layer.", ".downsample."), (".layers.", ".blocks."),
                     (".dwconv.", ".conv_dw."), (".layernorm.", ".norm."), (".pwconv1.", ".mlp.fc1."),
                     (".pwconv2.", ".mlp.fc2."), (".layer_scale_parameter", ".gamma")):
      name = name.replace(old, new)
    out[name] = value
  return out


class _TorchMGM(torch.nn.Module):
  """MGM's HD encoder: encode_images and unified_resampler as mgm_arch.py writes them
  (self.get_model() is this module; the towers and modules under MGM's names)."""

  def __init__(self, width: int, aux: int, hidden: int, grid: int, global_view: bool):
    super().__init__()
    nn = torch.nn
    torch.manual_seed(0)
    self.clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(hidden_size=VIT["width"], intermediate_size=VIT["mlp"],
                                      num_hidden_layers=VIT["layers"], num_attention_heads=VIT["heads"],
                                      image_size=VIT["image_size"], patch_size=VIT["patch_size"]))
    self.convnext = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=list(CONVNEXT["dims"]), depths=list(CONVNEXT["depths"]),
                                    layer_scale_init_value=1.0))
    self.vlm_uni_query_projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
    self.vlm_uni_aux_projector = nn.Sequential(nn.LayerNorm(aux), nn.Linear(aux, width))
    self.vlm_uni_val_projector = nn.Sequential(nn.LayerNorm(aux), nn.Linear(aux, width))
    self.mm_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    self.config = types.SimpleNamespace(image_grid=grid, image_global=global_view)
    _perturb(self, 1)
    self.eval()

  def get_model(self):
    return self

  def get_vision_tower(self):  # CLIPVisionTower: hidden_states[-2], select_feature 'patch'
    return lambda images: self.clip(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]

  def get_vision_tower_aux(self):  # OpenCLIPVisionTower.backbone

    def backbone(images):
      stages = self.convnext(pixel_values=images, output_hidden_states=True).hidden_states[1:]
      target_size = stages[0].shape[-2:]
      return torch.cat(
          [stages[0]] +
          [F.interpolate(s.float(), size=target_size, mode="bilinear", align_corners=False) for s in stages[1:]], dim=1)

    return backbone

  # -- mgm/model/mgm_arch.py, MGMMetaForCausalLM (unchanged but for the names above) --
  def encode_images(self, images, images_aux=None):
    image_grid = getattr(self.config, "image_grid", 1)
    image_global = getattr(self.config, "image_global", False)
    if image_grid > 1:
      batch_size = images.shape[0]
      if image_global:
        global_images = images[:, -1:].flatten(0, 1).contiguous()
        grid_images = images[:, :-1].flatten(0, 1).contiguous()
        images = torch.cat([grid_images, global_images], dim=0)
      else:
        images = images.flatten(0, 1).contiguous()
    image_features = self.get_model().get_vision_tower()(images)
    if image_global:
      image_feat_global = image_features[-len(global_images):]
      image_features = image_features[:len(grid_images)]
    if images_aux is not None:
      image_aux_features_raw = self.get_model().get_vision_tower_aux()(images_aux).to(
          dtype=image_features.dtype, device=image_features.device)
      if image_global:
        image_aux_features_global = F.interpolate(image_aux_features_raw.float(), scale_factor=1 / image_grid,
                                                  mode="bilinear",
                                                  align_corners=False).to(dtype=image_aux_features_raw.dtype)
        image_feat_global, image_aux_feat_global = self.unified_resampler(image_feat_global, image_aux_features_global)
      if image_grid > 1:
        image_aux_features_raw = image_aux_features_raw.reshape(*image_aux_features_raw.shape[:2], image_grid,
                                                                image_aux_features_raw.shape[-2] // image_grid,
                                                                image_grid,
                                                                image_aux_features_raw.shape[-1] // image_grid)
        image_aux_features_raw = image_aux_features_raw.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(0,
                                                                                                        1).contiguous()
      image_features, image_aux_features = self.unified_resampler(image_features, image_aux_features_raw)
      if image_grid > 1:
        image_features = image_features.reshape(batch_size, image_grid**2, *image_features.shape[1:])
        image_features = image_features.flatten(1, 2).contiguous()
        image_aux_features = image_aux_features.reshape(batch_size, image_grid**2, *image_aux_features.shape[1:])
        image_aux_features = image_aux_features.flatten(1, 2).contiguous()
      if image_global:  # add global features, [global, local]
        image_features = torch.cat([image_feat_global, image_features], dim=1)
        image_aux_features = torch.cat([image_aux_feat_global, image_aux_features], dim=1)
      image_features = image_features + image_aux_features
    return self.get_model().mm_projector(image_features)

  def unified_resampler(self, images, images_aux):
    patch_num = int(images.shape[1]**0.5)
    patch_size = images_aux.shape[-1] // patch_num
    images_aux = images_aux.permute(0, 2, 3, 1)
    images_aux = images_aux.reshape(len(images_aux), patch_num, patch_size, patch_num, patch_size, images_aux.shape[-1])
    images_aux = images_aux.permute(0, 1, 3, 2, 4, 5)
    images_aux = images_aux.reshape(len(images_aux), patch_num**2, patch_size**2, images_aux.shape[-1]).contiguous()
    embed_query = self.get_model().vlm_uni_query_projector(images)
    embed_aux = self.get_model().vlm_uni_aux_projector(images_aux)
    embed_value = self.get_model().vlm_uni_val_projector(images_aux)
    embed_att = embed_query[:, :, None] @ (embed_aux.transpose(-1, -2) / (embed_aux.shape[-1]**0.5))
    embed_att = embed_att.nan_to_num()
    embed_feat = (embed_att.softmax(-1) @ embed_value).mean(2)
    return images, embed_feat


def _build(cfg: ml_collections.ConfigDict, fill: str) -> vlm.MiniGemini:
  """MiniGemini(cfg) with weights set by numpy: XLA:CPU spends tens of seconds compiling
  even this tiny model's random init, which these tests do not need.

  fill='nan': every weight NaN, for a model whose used weights are all imported (one the
  import missed would turn the output NaN). fill='random': a small random model (matrices
  and layer scales N(0, 0.02), norm scales 1, biases 0).
  """
  graphdef, state = nnx.split(vlm.abstract_model(cfg))
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = path[-1].key
    if fill == "nan":
      return np.full(x.shape, np.nan, x.dtype)
    if name in ("scale", "bias"):
      return np.full(x.shape, 1.0 if name == "scale" else 0.0, x.dtype)
    return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _hd_config(grid: int, global_view: bool, highres: int, hidden: int = 40) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(
          vocab_size=64, image_token_id=5, dtype="float32", image_grid=grid, image_global=global_view,
          llm=dict(family="llama", hidden=hidden, layers=1, heads=2, kv_heads=1, head_dim=8, mlp=32, rope_theta=10000.0,
                   norm_eps=1e-5, tie_embeddings=False, remat="none", rope_scaling=None, qkv_bias=False),
          vision_lowres=dict(kind="clip", **VIT,
                             feature_layer=-2), vision_highres=dict(kind="convnext", image_size=highres, **CONVNEXT)))


# (grid, global view, high-res size): MGM-HD's layout (2x2 and a global view); a 3x3 grid
# without one (the global map's 1/3 resize is checked on its own below).
@pytest.mark.parametrize("grid,global_view,highres", [(2, True, 128), (3, False, 96)])
def test_hd_encode_images_equals_mgm(grid, global_view, highres):
  width, aux, hidden = VIT["width"], sum(CONVNEXT["dims"]), 40
  ref = _TorchMGM(width, aux, hidden, grid, global_view)
  tensors = {f"model.{k}": v for k, v in _state(ref).items()}
  cfg = _hd_config(grid, global_view, highres, hidden)
  model = _build(cfg, "nan")  # every weight encode_images uses is imported below
  vision_weights.load_vit(model.vision_lowres, {
      k[len("model.clip."):]: v for k, v in tensors.items() if k.startswith("model.clip.")
  })
  vision_weights.load_convnext(
      model.vision_highres,
      _timm_names({
          k[len("model.convnext."):]: v for k, v in tensors.items() if k.startswith("model.convnext.")
      }))
  vision_weights.load_mining(model.mining, tensors)
  vision_weights.load_projector(model.projector, tensors)

  views = grid * grid + int(global_view)
  rng = np.random.default_rng(grid)
  lowres = rng.standard_normal((2, views, VIT["image_size"], VIT["image_size"], 3)).astype(np.float32)
  high = rng.standard_normal((2, highres, highres, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref.encode_images(torch.from_numpy(lowres.transpose(0, 1, 4, 2, 3).copy()),
                                 torch.from_numpy(high.transpose(0, 3, 1, 2).copy())).numpy()
  ours = nnx.jit(lambda m, a, b: m.encode_images(a, b))(model, lowres, high)
  tokens = (VIT["image_size"] // VIT["patch_size"])**2
  assert vlm.num_image_tokens(cfg) == views * tokens
  assert ours.shape == expected.shape == (2, views * tokens, hidden)
  diff = _max_diff(ours, expected)
  print(f"max abs diff HD encode_images grid={grid} global={global_view}: {diff:.2e} "
        f"(|features| max {np.abs(expected).max():.2f})")
  assert diff <= PARITY_ATOL, diff
  # The last input view feeds the first tokens when it is the global view (MGM's
  # [global, crops] order), else the last ones; changing it changes those tokens alone.
  bump = np.zeros_like(lowres)
  bump[:, -1] = 1.0
  bumped = nnx.jit(lambda m, a, b: m.encode_images(a, b))(model, lowres + bump, high)
  last = slice(0, tokens) if global_view else slice((views - 1) * tokens, None)
  rest = slice(tokens, None) if global_view else slice(0, (views - 1) * tokens)
  assert _max_diff(bumped[:, last], ours[:, last]) > 1e-3
  assert _max_diff(bumped[:, rest], ours[:, rest]) == 0


@pytest.mark.parametrize("grid", [2, 3])
def test_global_map_is_torch_interpolate_without_antialias(grid):
  """downsample_bilinear = F.interpolate(scale_factor=1/grid, bilinear, align_corners=False);
  jax.image.resize (antialiased when downsampling) would not be."""
  x = np.random.default_rng(0).standard_normal((2, 12 * grid, 6 * grid, 5)).astype(np.float32)
  with torch.no_grad():
    ref = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), scale_factor=1 / grid, mode="bilinear",
                        align_corners=False).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(jax.jit(downsample_bilinear, static_argnums=1)(x, grid))
  assert ours.shape == ref.shape == (2, 12, 6, 5)
  assert _max_diff(ours, ref) <= 1e-6
  resized = jax.image.resize(x, ref.shape, method="bilinear")  # antialiased: another map
  assert _max_diff(resized, ref) > 0.1
  # bfloat16 maps are resized in float32 and cast back, as MGM's .float() ... .to(dtype).
  half = downsample_bilinear(jnp.asarray(x, jnp.bfloat16), grid)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(half, np.float32),
      np.asarray(
          downsample_bilinear(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), grid).astype(jnp.bfloat16), np.float32))


# ------------------------------------------------------------------------- preprocessing


def _clip_reference(image: Image.Image, size: int) -> torch.Tensor:
  """transformers' CLIPImageProcessor (PIL backend) at `size`, [3, size, size]."""
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={
      "height": size,
      "width": size
  })
  return torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0].copy())


def _mgm_views(image_aux: torch.Tensor, crop: int, grid: int, global_view: bool) -> torch.Tensor:
  """LazySupervisedDataset.__getitem__ (= model_vqa.py): `image` from `image_aux`."""
  image = F.interpolate(image_aux[None], size=[crop * grid, crop * grid], mode="bilinear", align_corners=False)[0]
  raw_image = image.reshape(3, grid, crop, grid, crop)
  raw_image = raw_image.permute(1, 3, 0, 2, 4)
  raw_image = raw_image.reshape(-1, 3, crop, crop)
  if global_view:
    global_image = F.interpolate(image[None], size=[crop, crop], mode="bilinear", align_corners=False)
    raw_image = torch.cat([raw_image, global_image], dim=0)  # [image_crops, image_global]
  return raw_image.contiguous()


def _synthetic_photo() -> Image.Image:
  """A wide image with smooth gradients and noise (every pixel differs from its neighbours)."""
  rng = np.random.default_rng(7)
  y, x = np.mgrid[0:150, 0:200]
  pixels = np.stack([x * 255 / 200, y * 255 / 150, (x + y) % 256], -1) + rng.integers(-40, 40, (150, 200, 3))
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("grid,global_view,crop,highres", [(2, True, 48, 160), (3, False, 32, 128),
                                                           (2, True, 336, 1536)])
def test_views_equal_mini_geminis_crops(grid, global_view, crop, highres):
  photo = os.path.join(REPO, "..", "shared", "data", "images", "extreme_ironing.jpg")
  if crop == 336:  # MGM-HD's own sizes, on a real photo when the shared data is there
    if not os.path.exists(photo):
      pytest.skip(f"{photo} is absent")
    image = Image.open(photo)
  else:
    image = _synthetic_photo()
  lowres, high = images.mgm_views(image, crop, highres, grid=grid, global_view=global_view)
  ref_aux = _clip_reference(image, highres)
  ref = _mgm_views(ref_aux, crop, grid, global_view).numpy().transpose(0, 2, 3, 1)
  views = grid * grid + int(global_view)
  assert lowres.shape == ref.shape == (views, crop, crop, 3) and lowres.dtype == np.float32
  assert high.shape == (highres, highres, 3)
  assert _max_diff(high, ref_aux.numpy().transpose(1, 2, 0)) <= 1e-6
  # Two float32 resizes in torch, float64 sums of float32 taps here: a few ulp per view.
  diff = _max_diff(lowres, ref)
  print(f"max abs diff views grid={grid} global={global_view} {crop}/{highres}: {diff:.2e}")
  assert diff <= 1e-5, diff
  # The crops are distinct tiles of the image, not copies of one view.
  assert min(_max_diff(lowres[0], lowres[k]) for k in range(1, views)) > 0.1


def test_grid_one_is_the_plain_pair_and_global_needs_a_grid():
  image = _synthetic_photo()
  plain = images.mgm_pair(image, 32, 64)
  for a, b in zip(images.mgm_views(image, 32, 64), plain):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="image_grid >= 2"):
    images.mgm_views(image, 32, 64, grid=1, global_view=True)
  with pytest.raises(ValueError, match="image_global=True needs model.image_grid >= 2"):
    vlm.num_image_tokens(_hd_config(1, True, 64))


def test_mgm_7b_hd_sizes():
  """MGM-7B-HD: CLIP-L/14 at 336 on 2x2 crops + a global view, ConvNeXt-L at 1536: 2880
  visual tokens per image."""
  cfg = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "model=mgm_7b")
  model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
  assert vlm.num_image_tokens(model_cfg) == 576 and vlm.lowres_image_shape(model_cfg) == (336, 336, 3)
  model_cfg.image_grid, model_cfg.image_global = 2, True
  model_cfg.vision_highres.image_size = 1536
  assert vlm.num_image_tokens(model_cfg) == 2880
  assert vlm.lowres_image_shape(model_cfg) == (5, 336, 336, 3)


def test_plan_batch_for_an_hd_config():
  """mgjax.plan's abstract batch has the pipeline's HD shapes, and the train loss takes it."""
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
  config.data.seq_len = 256
  b, m = config.data.batch_size, config.data.max_images
  assert pipeline.batch_spec(config.data, config.model)["images_lowres"].shape == (b, m, 32, 32, 3)
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  model_cfg.image_grid, model_cfg.image_global = 2, True
  batch = pipeline.batch_spec(config.data, model_cfg)
  assert batch["images_lowres"].shape == (b, m, 5, 32, 32, 3)
  assert batch["images_highres"].shape == (b, m, 64, 64, 3)
  assert batch["input_ids"].shape == (b, 256)
  graphdef, state = nnx.split(vlm.abstract_model(model_cfg))
  total, count = jax.eval_shape(make_loss_fn(graphdef), state, batch)
  assert total.shape == count.shape == ()
  config.data.seq_len = 80  # 5 views x 16 tokens: no room for the text
  with pytest.raises(ValueError, match="cannot hold one image's 80 tokens"):
    pipeline.batch_spec(config.data, model_cfg)
  model_cfg.vision_highres.image_size = 48  # a 12x12 map cannot split into 2 x 4x4 windows
  with pytest.raises(ValueError, match="must split into the 8x8 low-res grid"):
    vlm.abstract_model(model_cfg)


# ------------------------------------------------------------------------- pipeline + loss


@pytest.fixture(scope="module")
def hd_setup(data_dir):
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"), "data=sample:tiny")
  config.data.seq_len = 256  # a conversation plus 5 views x 16 tokens of its image
  config.data.max_images = 1  # one image slot per row keeps the CPU forward small
  dataset = build.ensure_built(config.data.recipe, data_dir)  # conftest: built once a session
  tokenizer = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_dir)
  model_cfg = resolve_model_config(config.model, tokenizer)
  model_cfg.image_grid, model_cfg.image_global = 2, True
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  return config, dataset, tokenizer, model_cfg, encoder


def _example(source, category: bytes, with_images: bool):
  for i in range(len(source)):
    if source[i]["category"] == category and bool(len(source[i]["images"])) == with_images:
      return source[i]
  raise AssertionError(f"no {category} example")


def test_hd_forward_and_loss_through_the_pipeline(hd_setup):
  config, dataset, tokenizer, model_cfg, encoder = hd_setup
  source = datasets.open_split(dataset, "train")
  example = _example(source, b"understanding", with_images=True)
  n = vlm.num_image_tokens(model_cfg)
  assert n == 5 * 16 and encoder.num_image_tokens == n
  row = encoder(example)
  size, high = model_cfg.vision_lowres.image_size, model_cfg.vision_highres.image_size
  assert row["images_lowres"].shape == (config.data.max_images, 5, size, size, 3)
  assert row["images_highres"].shape == (config.data.max_images, high, high, 3)
  positions = np.nonzero(row["input_ids"] == encoder.image_token_id)[0]
  assert len(positions) == n and np.all(np.diff(positions) == 1)
  views, pixels = images.mgm_views(images.decode(example["images"][0]), size, high, config.data.image_mean,
                                   config.data.image_std, grid=2, global_view=True)
  np.testing.assert_array_equal(row["images_lowres"][0], views)
  np.testing.assert_array_equal(row["images_highres"][0], pixels)
  # Generation prompts (decode, predict) get the same views.
  prompt = encoder.encode_prompt([{"role": "user", "content": "<image>\nWhat is drawn?"}], [example["images"][0]])
  assert (prompt["input_ids"] == encoder.image_token_id).sum() == n
  np.testing.assert_array_equal(prompt["images_lowres"][0], views)
  # Packing moves whole images, views and all.
  examples = [source[i] for i in range(8)]
  packed = list(
      pipeline.pack(grain.MapDataset.source(examples).map(encoder.unpadded).to_iter_dataset(), encoder, num_bins=2))
  filled = 0
  for packed_row in packed:
    assert packed_row["images_lowres"].shape == row["images_lowres"].shape
    slots = int((packed_row["input_ids"] == encoder.image_token_id).sum()) // n
    assert packed_row["images_lowres"][:slots].any(axis=(1, 2, 3, 4)).all()
    assert not packed_row["images_lowres"][slots:].any()
    filled += slots
  assert filled > 0
  text_only = encoder(_example(source, b"generation", with_images=False))
  assert text_only["images_lowres"].shape == row["images_lowres"].shape and not text_only["images_lowres"].any()
  batch = {k: np.stack([row[k], text_only[k]]) for k in row}

  model = _build(model_cfg, "random")
  graphdef, params = nnx.split(model)
  loss_fn = make_loss_fn(graphdef)

  @jax.jit
  def run(params, batch):  # one compile: the training loss, and what the image tokens hold
    m = nnx.merge(graphdef, params)
    embeds = m.embed_inputs(batch["input_ids"], batch["images_lowres"], batch["images_highres"])
    return loss_fn(params, batch), embeds[0], m.encode_images(batch["images_lowres"][0], batch["images_highres"][0])

  (total, count), embeds, feats = run(params, batch)
  assert float(count) == batch["loss_mask"].sum() > 0
  mean = float(total) / float(count)
  # An untrained model: about ln(vocab) per token.
  assert np.isfinite(mean) and abs(mean - np.log(model_cfg.vocab_size)) < 1.0
  # The image tokens hold encode_images' HD features ([global, crops]) in order.
  assert feats.shape == (config.data.max_images, n, model_cfg.llm.hidden)
  # (A batch of 2 images vs 1 may round differently.)
  np.testing.assert_allclose(np.asarray(embeds[positions]), np.asarray(feats[0]), atol=1e-5, rtol=0)
  # A view changed alone changes its own 16 tokens and no other: the global view (input
  # view 4) the first 16, crop 1 (input view 1) tokens 32..47.
  for view, tokens in ((4, slice(0, 16)), (1, slice(32, 48))):
    changed = dict(batch, images_lowres=batch["images_lowres"].copy())
    changed["images_lowres"][0, 0, view] += 1.0
    _, changed_embeds, _ = run(params, changed)
    moved = np.abs(np.asarray(changed_embeds[positions] - embeds[positions])).max(axis=-1)
    assert (moved[tokens] > 0).all() and not np.delete(moved, np.arange(n)[tokens]).any(), view
