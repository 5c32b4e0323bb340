"""Mini-Gemini's patch info mining and the MLP projector into the LLM.

PatchInfoMining follows MGM's `unified_resampler`: each low-res token is one query that
attends over the high-res features inside its own window of the high-res map, and the
attended value is added to the low-res feature. MGM's modules map to ours as
vlm_uni_query_projector -> query_projector, vlm_uni_aux_projector -> key_projector,
vlm_uni_val_projector -> value_projector (each Sequential(LayerNorm, Linear) -> norm, linear).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import constrain
from mgjax.models.layers import exact_gelu, layer_norm, linear


class NormLinear(nnx.Module):
  """LayerNorm then Linear (MGM's Sequential(nn.LayerNorm, nn.Linear))."""

  def __init__(self, n_in: int, n_out: int, names: tuple[str, str], *, norm_eps: float,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.norm = layer_norm(n_in, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.linear = linear(n_in, n_out, names, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(self.norm(x))


class PatchInfoMining(nnx.Module):
  """Low-res tokens [B, g*g, W] mine their own windows of a high-res map [B, H, H, C]."""

  def __init__(self, lowres_width: int, highres_channels: int, *, norm_eps: float = 1e-5,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    # Logical names pair axes that land on different mesh axes (fsdp x tensor), see axes.py.
    self.query_projector = NormLinear(lowres_width, lowres_width,
                                      ('vision_embed', 'vision_mlp'), norm_eps=norm_eps,
                                      dtype=dtype, rngs=rngs)
    self.key_projector = NormLinear(highres_channels, lowres_width, ('conv_out', 'vision_mlp'),
                                    norm_eps=norm_eps, dtype=dtype, rngs=rngs)
    self.value_projector = NormLinear(highres_channels, lowres_width,
                                      ('conv_out', 'vision_mlp'), norm_eps=norm_eps,
                                      dtype=dtype, rngs=rngs)

  def __call__(self, lowres: jax.Array, highres: jax.Array) -> jax.Array:
    """lowres [B, N, W] (row-major g x g grid), highres [B, H, H, C] -> [B, N, W]."""
    b, n, _ = lowres.shape
    grid = math.isqrt(n)
    h, w, c = highres.shape[1:]
    if grid * grid != n or h != w or h % grid:
      raise ValueError(f'{n} low-res tokens need a square grid dividing the {h}x{w} high-res map')
    win = h // grid
    # [B, g, win, g, win, C] -> [B, g*g, win*win, C]: token (r, c) gets rows r*win.. and
    # columns c*win.., matching the row-major order of the ViT's patch tokens.
    windows = highres.reshape(b, grid, win, grid, win, c).transpose(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(b, n, win * win, c)
    query = self.query_projector(lowres)  # [B, N, W]
    key = self.key_projector(windows)  # [B, N, win^2, W]
    value = self.value_projector(windows)
    scores = jnp.einsum('bnw,bnkw->bnk', query, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * key.shape[-1] ** -0.5, axis=-1).astype(value.dtype)
    mined = jnp.einsum('bnk,bnkw->bnw', probs, value)
    return constrain(lowres + mined.astype(lowres.dtype), ('batch', None, None))


class Projector(nnx.Module):
  """Linear -> GELU -> Linear into the LLM's width (LLaVA's mlp2x_gelu; HF names linear_1/2)."""

  def __init__(self, vision_width: int, hidden: int, *, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.linear_1 = linear(vision_width, hidden, ('vision_mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.linear_2 = linear(hidden, hidden, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(self.linear_2(exact_gelu(self.linear_1(x))), ('batch', None, None))
