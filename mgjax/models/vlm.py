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
from mgjax.models.mining import PatchInfoMining, Projector
from mgjax.models.vision import ConvNeXt, VisionTransformer


def num_image_tokens(cfg: ml_collections.ConfigDict) -> int:
  """How many `image_token_id` copies stand for one image (cfg: the `model` section)."""
  vis = cfg.vision_lowres
  if vis.image_size % vis.patch_size:
    raise ValueError(f'model.vision_lowres.image_size {vis.image_size} is not a multiple of '
                     f'patch_size {vis.patch_size}')
  return (vis.image_size // vis.patch_size) ** 2


class MiniGemini(nnx.Module):
  """The Mini-Gemini VLM, built from the `model` config section."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.get('dtype', 'float32'))
    self.image_token_id = int(cfg.image_token_id)
    self.num_image_tokens = num_image_tokens(cfg)
    lowres = dict(cfg.vision_lowres)
    highres = dict(cfg.vision_highres)
    grid = lowres['image_size'] // lowres['patch_size']
    if highres['image_size'] % 4 or (highres['image_size'] // 4) % grid:
      raise ValueError(
        f"model.vision_highres.image_size {highres['image_size']}: its 1/4 map must split into "
        f'the {grid}x{grid} low-res grid (e.g. {4 * grid * 2})')
    # model.attention: the kernel for the decoder and the ViT (mgjax.models.attention).
    attention = cfg.get('attention', 'auto')
    self.vision_lowres = VisionTransformer(**lowres, dtype=dtype, attention=attention, rngs=rngs)
    self.vision_highres = ConvNeXt(**highres, dtype=dtype, rngs=rngs)
    self.mining = PatchInfoMining(lowres['width'], self.vision_highres.feature_channels,
                                  dtype=dtype, rngs=rngs)
    self.projector = Projector(lowres['width'], cfg.llm.hidden, dtype=dtype, rngs=rngs)
    self.llm = DecoderLM(vocab_size=cfg.vocab_size, **dict(cfg.llm), attention=attention, dtype=dtype,
                         rngs=rngs)

  def encode_images(self, images_lowres: jax.Array, images_highres: jax.Array) -> jax.Array:
    """[N, Hl, Wl, 3], [N, Hh, Wh, 3] -> visual tokens [N, num_image_tokens, hidden]."""
    lowres = self.vision_lowres(images_lowres)
    highres = self.vision_highres.feature_map(images_highres)
    return self.projector(self.mining(lowres, highres))

  def embed_inputs(self, input_ids: jax.Array, images_lowres: jax.Array,
                   images_highres: jax.Array) -> jax.Array:
    """Input embeddings [B, T, hidden]: token embeddings with the visual tokens in place.

    input_ids [B, T] hold num_image_tokens copies of image_token_id per image, images in order
    of appearance; images_* [B, M, H, W, 3] are normalised pixels, M may be 0. The k-th image
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
      embeds = constrain(jnp.where(is_image[..., None], placed, embeds), ('batch', None, None))
    return embeds

  def __call__(self, input_ids: jax.Array, images_lowres: jax.Array,
               images_highres: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, vocab]; inputs as in `embed_inputs`, positions and segment_ids
    as in DecoderLM.__call__."""
    return self.llm.logits(self.hidden_states(input_ids, images_lowres, images_highres,
                                              positions=positions, segment_ids=segment_ids))

  def hidden_states(self, input_ids: jax.Array, images_lowres: jax.Array,
                    images_highres: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
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
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
    tracer = partial_eval.DynamicJaxprTracer
    tracer._origin_msg  # pylint: disable=pointless-statement
  except (ImportError, AttributeError):  # another jax: build the slow way
    yield
    return
  with mock.patch.object(tracer, '_origin_msg', lambda self: ''):
    yield


def abstract_model(cfg: ml_collections.ConfigDict) -> MiniGemini:
  """MiniGemini with jax.ShapeDtypeStruct leaves (nothing allocated) from the `model`
  config: for parameter counts, sharding plans and ahead-of-time compilation."""
  with _cheap_tracer_errors():
    return nnx.eval_shape(lambda: MiniGemini(cfg, rngs=nnx.Rngs(0)))
