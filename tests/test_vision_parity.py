"""The vision side equals its references: towers imported from torch weights, mining and
projector against MGM's computation, the whole VLM under the 8-device mesh.

References: transformers' CLIPVisionModel and SiglipVisionModel, and for ConvNeXt
transformers' ConvNextModel with its weights renamed to timm's names (timm itself needs
torchvision, whose PyPI wheels for torch 2.13 are CUDA builds that fail to load next to the
CPU torch; see README). Tiny random configs, float32; every weight is perturbed away from
its init (norms at 1/0, layer scale at a constant) so a misplaced tensor shows.
"""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mgjax.convert import files
from mgjax.convert import vision_weights
from mgjax.models import MiniGemini, logical_shardings, num_image_tokens
from mgjax.models.mining import PatchInfoMining, Projector
from mgjax.models.vision import ConvNeXt, VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # float32 features within 1e-4 max abs of transformers'


def _perturb(model, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _roundtrip(tensors: dict, tmp_path, name: str) -> dict[str, np.ndarray]:
  """Through a safetensors folder, as users have them."""
  folder = str(tmp_path / name)
  files.write_weights(folder, tensors)
  return files.load_tensors(folder)


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _images(seed: int, n: int, size: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------- CLIP / SigLIP

VIT = dict(image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp=64)


def _hf_vit(kind: str):
  common = dict(hidden_size=VIT["width"], intermediate_size=VIT["mlp"], num_hidden_layers=VIT["layers"],
                num_attention_heads=VIT["heads"], image_size=VIT["image_size"], patch_size=VIT["patch_size"])
  torch.manual_seed(0)
  if kind == "clip":
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
  else:
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
  _perturb(model, 1)
  return model.eval()


def _hf_hidden_states(model, images: np.ndarray):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("naming", ["current", "vision_model"])
def test_vit_features_equal_transformers(kind, naming, tmp_path):
  hf = _hf_vit(kind)
  tensors = _state(hf)
  if naming == "vision_model":  # older files / whole CLIPModel: the tower under vision_model.
    tensors = {f"vision_model.{k}": v for k, v in tensors.items()}
    tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((8, 4), np.float32)
    tensors["logit_scale"] = np.zeros((), np.float32)
  tensors = _roundtrip(tensors, tmp_path, f"{kind}_{naming}")
  images = _images(0, 2, VIT["image_size"])
  hidden = _hf_hidden_states(hf, images)
  for feature_layer in (-2, -1, 1):
    vit = VisionTransformer(**VIT, kind=kind, feature_layer=feature_layer, rngs=nnx.Rngs(0))
    vision_weights.load_vit(vit, tensors, source=str(tmp_path))
    ours = nnx.jit(lambda m, x: m(x))(vit, images)
    expected = hidden[feature_layer][:, 1:] if kind == "clip" else hidden[feature_layer]
    assert ours.shape == expected.shape == (2, 16, VIT["width"])
    diff = _max_diff(ours, expected)
    print(f"max abs diff {kind} {naming} layer {feature_layer}: {diff:.2e}")
    assert diff < ATOL, (kind, naming, feature_layer, diff)


def test_vit_import_names_every_mismatch(tmp_path):
  clip = _state(_hf_vit("clip"))
  # A SigLIP checkpoint for a CLIP config: no class token or pre-layernorm, a patch bias.
  siglip = _state(_hf_vit("siglip"))
  vit = VisionTransformer(**VIT, kind="clip", rngs=nnx.Rngs(0))
  with pytest.raises(vision_weights.CheckpointMismatch) as err:
    vision_weights.load_vit(vit, siglip, source="siglip-folder")
  msg = str(err.value)
  assert "siglip-folder" in msg and "embeddings.class_embedding" in msg
  assert "pre_layrnorm.weight" in msg and "embeddings.patch_embedding.bias" in msg
  # A missing tensor and a wrong shape (a config with a wider MLP).
  del clip["encoder.layers.1.mlp.fc2.bias"]
  wide = VisionTransformer(**{**VIT, "mlp": 128}, rngs=nnx.Rngs(0))
  with pytest.raises(vision_weights.CheckpointMismatch) as err:
    vision_weights.load_vit(wide, clip)
  msg = str(err.value)
  assert "missing tensors: encoder.layers.1.mlp.fc2.bias" in msg
  assert "encoder.layers.0.mlp.fc1.weight (64, 32)" in msg
  # Not a vision tower at all.
  with pytest.raises(vision_weights.CheckpointMismatch, match="no clip vision tower"):
    vision_weights.load_vit(vit, {"model.embed_tokens.weight": np.zeros((4, 4), np.float32)})


# ------------------------------------------------------------------------- ConvNeXt

CONVNEXT = dict(dims=(8, 16, 24, 32), depths=(1, 2, 1, 1))


def _hf_convnext():
  torch.manual_seed(0)
  cfg = transformers.ConvNextConfig(hidden_sizes=list(CONVNEXT["dims"]), depths=list(CONVNEXT["depths"]),
                                    layer_scale_init_value=1.0)
  model = transformers.ConvNextModel(cfg)
  _perturb(model, 2)
  return model.eval()


def _timm_names(hf_state: dict) -> dict:
  """transformers ConvNext names -> timm ConvNeXt names (the same tensors, same layouts)."""
  out = {}
  for name, value in hf_state.items():
    if name.startswith("layernorm.") or name.startswith("pooler"):
      continue  # the pooled-output norm: timm's head.norm, which MGM never runs
    for old, new in (("embeddings.patch_embeddings.", "stem.0."), ("embeddings.layernorm.", "stem.1."),
                     ("encoder.stages.", "stages."), (".downsampling_layer.", ".downsample."), (".layers.", ".blocks."),
                     (".dwconv.", ".conv_dw."), (".layernorm.", ".norm."), (".pwconv1.", ".mlp.fc1."),
                     (".pwconv2.", ".mlp.fc2."), (".layer_scale_parameter", ".gamma")):
      name = name.replace(old, new)
    out[name] = value
  return out


@pytest.mark.parametrize("naming", ["timm", "open_clip", "mgm"])
def test_convnext_stages_and_highres_map_equal_reference(naming, tmp_path):
  hf = _hf_convnext()
  tensors = _timm_names(_state(hf))
  if naming == "open_clip":  # the whole CLIP model file: the trunk under visual.trunk.
    tensors = {f"visual.trunk.{k}": v for k, v in tensors.items()}
    tensors["visual.trunk.head.norm.weight"] = np.ones((32,), np.float32)
    tensors["visual.head.mlp.fc1.weight"] = np.zeros((4, 32), np.float32)
    tensors["text.token_embedding.weight"] = np.zeros((8, 4), np.float32)
  elif naming == "mgm":  # OpenCLIPVisionTower's vision_stem / vision_stages
    tensors = {"model.vision_tower_aux.vision_" + k: v for k, v in tensors.items()}
  tensors = _roundtrip(tensors, tmp_path, naming)
  net = ConvNeXt(**CONVNEXT, rngs=nnx.Rngs(0))
  vision_weights.load_convnext(net, tensors, source=naming)

  images = _images(1, 2, 64)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    stages = list(out.hidden_states[1:])  # after each stage
    # Mini-Gemini's map (OpenCLIPVisionTower.backbone): stages upsampled to stage 0's size.
    size = stages[0].shape[-2:]
    mgm_map = torch.cat(
        [stages[0]] +
        [torch.nn.functional.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in stages[1:]],
        dim=1)
  ours = nnx.jit(lambda m, x: m(x))(net, images)
  for i, (a, b) in enumerate(zip(ours, stages)):
    diff = _max_diff(a, b.numpy().transpose(0, 2, 3, 1))
    print(f"max abs diff convnext {naming} stage {i}: {diff:.2e}")
    assert diff < ATOL, (naming, i, diff)
  fmap = nnx.jit(lambda m, x: m.feature_map(x))(net, images)
  assert fmap.shape == (2, 16, 16, sum(CONVNEXT["dims"]))
  diff = _max_diff(fmap, mgm_map.numpy().transpose(0, 2, 3, 1))
  print(f"max abs diff convnext {naming} feature_map: {diff:.2e}")
  assert diff < ATOL, (naming, "feature_map", diff)


def test_convnext_import_names_every_mismatch():
  tensors = _timm_names(_state(_hf_convnext()))
  tensors["stages.1.blocks.0.extra.weight"] = np.zeros((3,), np.float32)
  net = ConvNeXt(dims=CONVNEXT["dims"], depths=(1, 2, 2, 1), rngs=nnx.Rngs(0))  # one block more
  with pytest.raises(vision_weights.CheckpointMismatch) as err:
    vision_weights.load_convnext(net, tensors, source="convnext.safetensors")
  msg = str(err.value)
  assert "convnext.safetensors" in msg
  assert "stages.2.blocks.1.conv_dw.weight" in msg and "stages.2.blocks.1.gamma" in msg
  assert "unexpected tensors: stages.1.blocks.0.extra.weight" in msg


# ------------------------------------------------------------------------- mining + projector


class _TorchMGM(torch.nn.Module):
  """Mini-Gemini's mining and projector written from MGM's unified_resampler and
  mlp2x_gelu (not imported: MGM needs deepspeed and a CUDA stack), under MGM's names."""

  def __init__(self, width: int, aux: int, hidden: int):
    super().__init__()
    nn = torch.nn
    self.vlm_uni_query_projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
    self.vlm_uni_aux_projector = nn.Sequential(nn.LayerNorm(aux), nn.Linear(aux, width))
    self.vlm_uni_val_projector = nn.Sequential(nn.LayerNorm(aux), nn.Linear(aux, width))
    self.mm_projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))

  def forward(self, tokens, aux_map):  # tokens [B, N, W]; aux_map NCHW [B, C, H, H]
    b, n, _ = tokens.shape
    grid = int(n**0.5)
    win = aux_map.shape[-1] // grid
    windows = aux_map.permute(0, 2, 3, 1).reshape(b, grid, win, grid, win, -1)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(b, n, win * win, -1)
    query = self.vlm_uni_query_projector(tokens)
    key = self.vlm_uni_aux_projector(windows)
    value = self.vlm_uni_val_projector(windows)
    att = query[:, :, None] @ (key.transpose(-1, -2) / key.shape[-1]**0.5)
    mined = (att.nan_to_num().softmax(-1) @ value).mean(2)
    return self.mm_projector(tokens + mined)


def test_mining_and_projector_equal_mgm(tmp_path):
  width, aux, hidden = 32, 48, 40
  torch.manual_seed(0)
  ref = _TorchMGM(width, aux, hidden)
  _perturb(ref, 3)
  tensors = _roundtrip({f"model.{k}": v for k, v in _state(ref).items()}, tmp_path, "mgm")
  mining = PatchInfoMining(width, aux, rngs=nnx.Rngs(0))
  projector = Projector(width, hidden, rngs=nnx.Rngs(0))
  vision_weights.load_mining(mining, tensors)
  vision_weights.load_projector(projector, tensors)

  rng = np.random.default_rng(4)
  tokens = rng.standard_normal((2, 16, width)).astype(np.float32)  # 4x4 grid
  aux_map = rng.standard_normal((2, 32, 32, aux)).astype(np.float32)  # 8x8 windows
  with torch.no_grad():
    expected = ref(torch.from_numpy(tokens), torch.from_numpy(aux_map.transpose(0, 3, 1, 2)))
  ours = nnx.jit(lambda m, p, t, a: p(m(t, a)))(mining, projector, tokens, aux_map)
  diff = _max_diff(ours, expected.numpy())
  print(f"max abs diff mining+projector: {diff:.2e}")
  assert diff < ATOL, diff

  del tensors["model.vlm_uni_val_projector.1.bias"]
  with pytest.raises(vision_weights.CheckpointMismatch,
                     match=r"missing tensors: model\.vlm_uni_val_projector\.1\.bias"):
    vision_weights.load_mining(mining, tensors)


# ------------------------------------------------------------------------- whole VLM, 8 devices


def _tiny_vlm_config() -> ml_collections.ConfigDict:
  # Every sharded dimension even, so the (data=2, fsdp=2, tensor=2) mesh divides it.
  return ml_collections.ConfigDict(
      dict(
          vocab_size=256, image_token_id=5, dtype="float32",
          llm=dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, rope_theta=10000.0,
                   norm_eps=1e-5, tie_embeddings=False, remat="none", rope_scaling=None, qkv_bias=False),
          vision_lowres=dict(kind="clip", **VIT,
                             feature_layer=-2), vision_highres=dict(kind="convnext", image_size=64, **CONVNEXT)))


def test_vlm_with_imported_towers_is_the_same_on_the_8_device_mesh():
  assert jax.device_count() >= 8, "tests/conftest.py must set XLA_FLAGS before jax starts"
  cfg = _tiny_vlm_config()
  clip = _state(_hf_vit("clip"))
  convnext = _timm_names(_state(_hf_convnext()))
  single = MiniGemini(cfg, rngs=nnx.Rngs(0))
  vision_weights.load_vit(single.vision_lowres, clip)
  vision_weights.load_convnext(single.vision_highres, convnext)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  graphdef, state = nnx.split(single)
  sharded = nnx.merge(graphdef, jax.device_put(state, logical_shardings(state, mesh)))
  assert sharded.vision_lowres.layers[0].mlp.fc1.kernel[...].sharding.spec == P("fsdp", "tensor")

  n = num_image_tokens(cfg)
  rng = np.random.default_rng(5)
  ids = rng.integers(6, cfg.vocab_size, (4, 40)).astype(np.int32)
  ids[:2, 3:3 + n] = cfg.image_token_id
  lo, hi = _images(6, 4, 28)[:, None], _images(7, 4, 64)[:, None]
  forward = nnx.jit(lambda model, *a: model(*a))
  with jax.set_mesh(mesh):
    out = forward(sharded, *jax.device_put((ids, lo, hi), NamedSharding(mesh, P(("data", "fsdp")))))
  assert out.sharding.spec[0] == ("data", "fsdp")
  expected = forward(single, ids, lo, hi)
  assert _max_diff(out, expected) < ATOL
  # The image really reaches the logits (a zero-weight import would pass the above).
  assert _max_diff(forward(single, ids, lo * 2.0, hi), expected) > 1e-3
