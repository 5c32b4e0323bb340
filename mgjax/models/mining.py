"""Mini-Gemini's patch info mining and the MLP projector into the LLM.

PatchInfoMining follows MGM's `unified_resampler`: each low-res token is one query that
attends over the high-res features inside its own window of the high-res map, and the
attended value is added to the low-res feature. MGM's modules map to ours as
vlm_uni_query_projector -> query_projector, vlm_uni_aux_projector -> key_projector,
vlm_uni_val_projector -> value_projector (each Sequential(LayerNorm, Linear) -> norm, linear).

`downsample_bilinear` is the high-res map of MGM's global view (HD models, image_global).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.models.axes import constrain
from mgjax.models.layers import exact_gelu, layer_norm, linear


class NormLinear(nnx.Module):
  """LayerNorm then Linear (MGM's Sequential(nn.LayerNorm, nn.Linear))."""

  def __init__(self, n_in: int, n_out: int, names: tuple[str, str], *, norm_eps: float, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.norm = layer_norm(n_in, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.linear = linear(n_in, n_out, names, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(self.norm(x))


class PatchInfoMining(nnx.Module):
  """Low-res tokens [B, g*g, W] mine their own windows of a high-res map [B, H, H, C]."""

  def __init__(self, lowres_width: int, highres_channels: int, *, norm_eps: float = 1e-5,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    # Logical names pair axes that land on different mesh axes (fsdp x tensor), see axes.py.
    self.query_projector = NormLinear(lowres_width, lowres_width, ("vision_embed", "vision_mlp"), norm_eps=norm_eps,
                                      dtype=dtype, rngs=rngs)
    self.key_projector = NormLinear(highres_channels, lowres_width, ("conv_out", "vision_mlp"), norm_eps=norm_eps,
                                    dtype=dtype, rngs=rngs)
    self.value_projector = NormLinear(highres_channels, lowres_width, ("conv_out", "vision_mlp"), norm_eps=norm_eps,
                                      dtype=dtype, rngs=rngs)

  def __call__(self, lowres: jax.Array, highres: jax.Array) -> jax.Array:
    """lowres [B, N, W] (row-major g x g grid), highres [B, H, H, C] -> [B, N, W]."""
    b, n, _ = lowres.shape
    grid = math.isqrt(n)
    h, w, c = highres.shape[1:]
    if grid * grid != n or h != w or h % grid:
      raise ValueError(f"{n} low-res tokens need a square grid dividing the {h}x{w} high-res map")
    win = h // grid
    # [B, g, win, g, win, C] -> [B, g*g, win*win, C]: token (r, c) gets rows r*win.. and
    # columns c*win.., matching the row-major order of the ViT's patch tokens.
    windows = highres.reshape(b, grid, win, grid, win, c).transpose(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(b, n, win * win, c)
    query = self.query_projector(lowres)  # [B, N, W]
    key = self.key_projector(windows)  # [B, N, win^2, W]
    value = self.value_projector(windows)
    scores = jnp.einsum("bnw,bnkw->bnk", query, key, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * key.shape[-1]**-0.5, axis=-1).astype(value.dtype)
    mined = jnp.einsum("bnk,bnkw->bnw", probs, value)
    return constrain(lowres + mined.astype(lowres.dtype), ("batch", None, None))


class Projector(nnx.Module):
  """Linear -> GELU -> Linear into the LLM's width (LLaVA's mlp2x_gelu; HF names linear_1/2)."""

  def __init__(self, vision_width: int, hidden: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.linear_1 = linear(vision_width, hidden, ("vision_mlp", "embed"), dtype=dtype, rngs=rngs)
    self.linear_2 = linear(hidden, hidden, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(self.linear_2(exact_gelu(self.linear_1(x))), ("batch", None, None))


def _linear_taps(n_in: int, factor: int) -> tuple[int, int, np.float32, np.float32]:
  """Torch's bilinear taps (align_corners=False) along one axis of n_in pixels scaled by
  1/factor, as (first lo index, first hi index, w_lo, w_hi): output pixel i reads pixels
  lo + factor * i and hi + factor * i.

  As torch's CPU kernel: source position factor * (i + 0.5) - 0.5 clamped at 0, in float32
  (torch uses 1/scale_factor, exactly `factor` for an integer factor), lo its floor, hi =
  lo + 1 clipped to the last pixel, w_hi the fraction, w_lo = 1 - w_hi. For an integer
  factor dividing n_in the taps are the same for every output pixel, shifted by factor.
  """
  n_out = n_in // factor
  src = np.float32(factor) * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  w_hi = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
  step = factor * np.arange(n_out)
  if not (np.array_equal(lo, lo[0] + step) and np.array_equal(hi, hi[0] + step) and (w_hi == w_hi[0]).all()):
    raise ValueError(f"{n_in} pixels by 1/{factor}: taps are not a regular stride")
  return int(lo[0]), int(hi[0]), np.float32(1) - w_hi[0], w_hi[0]


def downsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """NHWC [B, H, W, C] -> [B, H // factor, W // factor, C], as torch's
  F.interpolate(NCHW, scale_factor=1/factor, mode='bilinear', align_corners=False).

  Computed in float32 and cast back, as MGM's `.float()` ... `.to(dtype)`. Plain two-tap
  interpolation, no antialiasing: jax.image.resize antialiases when downsampling (it
  would average over the whole footprint), torch's interpolate does not. The taps are
  strided slices (factor 2: pixels 2i and 2i+1, half each); columns are weighted first,
  then rows, in the order torch sums h0 * (w0 * x00 + w1 * x01) + h1 * (...).
  """
  h, w = x.shape[1:3]
  if h % factor or w % factor:
    raise ValueError(f"a {h}x{w} map does not divide by {factor}")
  dtype = x.dtype
  x = x.astype(jnp.float32)
  lo, hi, w_lo, w_hi = _linear_taps(w, factor)
  x = x[:, :, lo::factor][:, :, :w // factor] * w_lo + x[:, :, hi::factor][:, :, :w // factor] * w_hi
  lo, hi, w_lo, w_hi = _linear_taps(h, factor)
  x = x[:, lo::factor][:, :h // factor] * w_lo + x[:, hi::factor][:, :h // factor] * w_hi
  return x.astype(dtype)
