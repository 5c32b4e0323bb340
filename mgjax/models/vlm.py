"""MiniGemini: low-res ViT + high-res ConvNeXt -> patch info mining -> projector -> decoder LM.

Attribute names (vision_lowres, vision_highres, mining, projector, llm) are the roots of the
parameter paths the trainer freezes by regex, e.g. 'vision_.*' or 'llm/layers/0/self_attn/.*'.
"""

import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mgjax.models.axes import constrain
from mgjax.models.llm import DecoderLM
from mgjax.models.mining import PatchInfoMining, Projector, downsample_bilinear
from mgjax.models.vision import ConvNeXt, VisionTransformer


def image_grid(cfg: ml_collections.ConfigDict) -> tuple[int, bool]:
  """(model.image_grid, model.image_global): Mini-Gemini's HD input layout.

  image_grid g >= 2 feeds the low-res tower g x g crops of the image (each mining its own
  window of the high-res map) and, with image_global, a global view of the whole image too
  (mining the high-res map downsampled by g), as MGM's HD models (e.g. MGM-7B-HD: g=2 with
  a global view). The defaults (1, False) are the plain model with one low-res view.
  """
  grid = int(cfg.get("image_grid", 1))
  global_view = bool(cfg.get("image_global", False))
  if grid < 1:
    raise ValueError(f"model.image_grid={grid} must be >= 1")
  if global_view and grid < 2:
    raise ValueError("model.image_global=True needs model.image_grid >= 2 (as in Mini-Gemini, "
                     "the global view is the whole image next to its grid crops)")
  return grid, global_view


def num_image_views(cfg: ml_collections.ConfigDict) -> int:
  """Low-res views per image: image_grid^2 crops plus the global view if image_global."""
  grid, global_view = image_grid(cfg)
  return grid * grid + int(global_view)


def lowres_image_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One image's low-res input: [l, l, 3], or [views, l, l, 3] when image_grid >= 2
  (the grid crops row-major, then the global view: MGM's order)."""
  size = cfg.vision_lowres.image_size
  views = num_image_views(cfg)
  return (size, size, 3) if image_grid(cfg)[0] == 1 else (views, size, size, 3)


def num_image_tokens(cfg: ml_collections.ConfigDict) -> int:
  """How many `image_token_id` copies stand for one image (cfg: the `model` section):
  the low-res tokens of every view, (image_grid^2 + image_global) * (size / patch)^2."""
  vis = cfg.vision_lowres
  if vis.image_size % vis.patch_size:
    raise ValueError(f"model.vision_lowres.image_size {vis.image_size} is not a multiple of "
                     f"patch_size {vis.patch_size}")
  return num_image_views(cfg) * (vis.image_size // vis.patch_size)**2


class MiniGemini(nnx.Module):
  """The Mini-Gemini VLM, built from the `model` config section."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.get("dtype", "float32"))
    self.image_token_id = int(cfg.image_token_id)
    self.num_image_tokens = num_image_tokens(cfg)
    self.image_grid, self.image_global = image_grid(cfg)
    lowres = dict(cfg.vision_lowres)
    highres = dict(cfg.vision_highres)
    grid = lowres["image_size"] // lowres["patch_size"]
    # Each of the image_grid^2 crops mines a 1/image_grid share of the high-res map with
    # its own grid x grid tokens.
    cells = grid * self.image_grid
    if highres["image_size"] % 4 or (highres["image_size"] // 4) % cells:
      raise ValueError(f"model.vision_highres.image_size {highres['image_size']}: its 1/4 map must split into "
                       f"the {cells}x{cells} low-res grid (e.g. {4 * cells * 2})")
    # model.attention: the kernel for the decoder and the ViT (mgjax.models.attention).
    attention_kernel = cfg.get("attention", "auto")
    # model.llm.scan_layers scans the towers' repeated layers too (vision.run_in_order).
    scan = bool(cfg.llm.get("scan_layers", False))
    self.vision_lowres = VisionTransformer(**lowres, dtype=dtype, attention_kernel=attention_kernel, scan_layers=scan,
                                           rngs=rngs)
    self.vision_highres = ConvNeXt(**highres, dtype=dtype, scan_blocks=scan, rngs=rngs)
    self.mining = PatchInfoMining(lowres["width"], self.vision_highres.feature_channels, dtype=dtype, rngs=rngs)
    self.projector = Projector(lowres["width"], cfg.llm.hidden, dtype=dtype, rngs=rngs)
    # model.splash_blocks: splash's block sizes for the decoder (attention.splash_block_sizes).
    self.llm = DecoderLM(vocab_size=cfg.vocab_size, **dict(cfg.llm), attention_kernel=attention_kernel,
                         splash_blocks=cfg.get("splash_blocks", "auto"), dtype=dtype, rngs=rngs)

  def encode_images(self, images_lowres: jax.Array, images_highres: jax.Array) -> jax.Array:
    """Visual tokens [N, num_image_tokens, hidden] of N images, as MGM's encode_images.

    images_lowres [N, Hl, Wl, 3], or with image_grid g >= 2 [N, V, Hl, Wl, 3]: the g x g
    crops row-major, then the global view if image_global; images_highres [N, Hh, Wh, 3].
    Crop (r, c) mines the (r, c) block of the g x g split high-res map; the global view
    mines the map bilinearly downsampled by g (MGM's F.interpolate(scale_factor=1/g)).
    The tokens come out as MGM orders them: [global, crop 0, ..., crop g^2-1].
    """
    g = self.image_grid
    if g == 1:
      lowres = self.vision_lowres(images_lowres)
      highres = self.vision_highres.feature_map(images_highres)
      return self.projector(self.mining(lowres, highres))
    n, v = images_lowres.shape[:2]
    if v != g * g + int(self.image_global):
      raise ValueError(f"{v} low-res views per image; image_grid={g}, image_global="
                       f"{self.image_global} make {g * g + int(self.image_global)}")
    # One tower call for every view of every image (MGM batches crops and global views too).
    lowres = self.vision_lowres(images_lowres.reshape(n * v, *images_lowres.shape[2:]))
    lowres = lowres.reshape(n, v, *lowres.shape[1:])  # [N, V, tokens, W]
    highres = self.vision_highres.feature_map(images_highres)
    tokens, width = lowres.shape[2:]
    size, channels = highres.shape[1], highres.shape[3]
    win = size // g
    # [N, g, win, g, win, C] -> [N * g^2, win, win, C], crop index r * g + c.
    crop_maps = highres.reshape(n, g, win, g, win, channels).transpose(0, 1, 3, 2, 4, 5)
    crop_maps = crop_maps.reshape(n * g * g, win, win, channels)
    crops = self.mining(lowres[:, :g * g].reshape(n * g * g, tokens, width), crop_maps)
    feats = crops.reshape(n, g * g * tokens, width)
    if self.image_global:
      global_map = downsample_bilinear(highres, g)
      feats = jnp.concatenate([self.mining(lowres[:, g * g], global_map), feats], axis=1)
    return self.projector(feats)

  def embed_inputs(self, input_ids: jax.Array, images_lowres: jax.Array, images_highres: jax.Array) -> jax.Array:
    """Input embeddings [B, T, hidden]: token embeddings with the visual tokens in place.

    input_ids [B, T] hold num_image_tokens copies of image_token_id per image, images in order
    of appearance; images_* [B, M, H, W, 3] are normalised pixels (images_lowres
    [B, M, V, H, W, 3] with image_grid >= 2, see encode_images), M may be 0. The k-th image
    token of row b takes visual feature k of row b's images flattened to [M * N]; rows with
    fewer images pad the image arrays, which are then computed but never read. Extra image
    tokens beyond M * N (a pipeline bug) would reuse the last feature.
    """
    embeds = self.llm.embed(input_ids)
    b, m = images_lowres.shape[:2]
    if m:
      feats = self.encode_images(images_lowres.reshape(b * m, *images_lowres.shape[2:]),
                                 images_highres.reshape(b * m, *images_highres.shape[2:]))
      feats = feats.reshape(b, m * feats.shape[1], feats.shape[2]).astype(embeds.dtype)
      is_image = input_ids == self.image_token_id
      # Running count of image tokens = which visual feature each one takes.
      index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
      placed = jnp.take_along_axis(feats, index[..., None], axis=1)
      embeds = constrain(jnp.where(is_image[..., None], placed, embeds), ("batch", None, None))
    return embeds

  def __call__(self, input_ids: jax.Array, images_lowres: jax.Array, images_highres: jax.Array, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, vocab]; inputs as in `embed_inputs`, positions and segment_ids
    as in DecoderLM.__call__."""
    return self.llm.logits(
        self.hidden_states(input_ids, images_lowres, images_highres, positions=positions, segment_ids=segment_ids))

  def hidden_states(self, input_ids: jax.Array, images_lowres: jax.Array, images_highres: jax.Array, *,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """The decoder's final hidden states [B, T, hidden] (before the output projection)."""
    embeds = self.embed_inputs(input_ids, images_lowres, images_highres)
    return self.llm.hidden_states(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids)


@contextlib.contextmanager
def _cheap_tracer_errors():
  """Skips the origin message jax builds for a tracer's missing `.sharding`.

  Building a model under tracing, flax 0.12.8 asks every RNG counter update for
  `getattr(count, 'sharding', None)`; jax 0.10.2's tracer raises an AttributeError whose
  message walks the whole trace so far, so an abstract build is quadratic in the number of
  parameters (MGM-7B: 50 s instead of 2 s). The message is discarded by getattr anyway.
  """
  try:
    from jax._src.interpreters import partial_eval
    tracer = partial_eval.DynamicJaxprTracer
    getattr(tracer, "_origin_msg")  # the attribute this patch replaces must exist
  except (ImportError, AttributeError):  # another jax: build the slow way
    yield
    return
  with mock.patch.object(tracer, "_origin_msg", lambda self: ""):
    yield


def abstract_model(cfg: ml_collections.ConfigDict) -> MiniGemini:
  """MiniGemini with jax.ShapeDtypeStruct leaves (nothing allocated) from the `model`
  config: for parameter counts, sharding plans and ahead-of-time compilation."""
  with _cheap_tracer_errors():
    return nnx.eval_shape(lambda: MiniGemini(cfg, rngs=nnx.Rngs(0)))
