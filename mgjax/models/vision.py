"""The two vision towers of Mini-Gemini, NHWC throughout.

VisionTransformer: CLIP ViT or SigLIP ViT (HF CLIPVisionModel's / SiglipVisionModel's
computation and names, minus the post-layernorm and pooling head no feature layer reads),
returning the patch tokens of one hidden layer without the class token.
ConvNeXt: timm/OpenCLIP ConvNeXt trunk returning its stage outputs, plus Mini-Gemini's high-res
map (every stage upsampled to 1/4 of the input and concatenated on channels).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import constrain, partitioned
from mgjax.models import attention
from mgjax.models.layers import activation, layer_norm, linear

_CONV_NAMES = ("conv_kernel", "conv_kernel", "conv_in", "conv_out")
# Activations between blocks: split over the batch only (see axes.constrain).
_TOKENS = ("batch", None, None)
_NHWC = ("batch", None, None, None)


def _conv(n_in: int, n_out: int, kernel: int, *, stride: int = 1, padding="VALID", use_bias: bool = True,
          dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(n_in, n_out, (kernel, kernel), strides=stride, padding=padding, use_bias=use_bias, dtype=dtype,
                  rngs=rngs, kernel_init=partitioned(nnx.initializers.lecun_normal(), _CONV_NAMES),
                  bias_init=partitioned(nnx.initializers.zeros, ("conv_out",)))


class Mlp(nnx.Module):
  """fc1 -> act -> fc2 (CLIP's and timm ConvNeXt's MLP)."""

  def __init__(self, width: int, mlp: int, *, act: str, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.act = act
    self.fc1 = linear(width, mlp, ("vision_embed", "vision_mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = linear(mlp, width, ("vision_mlp", "vision_embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation(self.act)(self.fc1(x)))


class VisionAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biases (CLIP)."""

  def __init__(self, width: int, heads: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, attention_kernel: str = "auto"):
    if width % heads:
      raise ValueError(f"vision width {width} is not divisible by heads {heads}")
    head_dim = width // heads
    self.attention_kernel = attention.check(attention_kernel)

    def proj():
      return nnx.LinearGeneral(
          width, (heads, head_dim), dtype=dtype, rngs=rngs,
          kernel_init=partitioned(nnx.initializers.lecun_normal(), ("vision_embed", "vision_heads", "head_dim")),
          bias_init=partitioned(nnx.initializers.zeros, ("vision_heads", "head_dim")))

    self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
    self.out_proj = nnx.LinearGeneral((heads, head_dim), width, axis=(-2, -1), dtype=dtype, rngs=rngs,
                                      kernel_init=partitioned(nnx.initializers.lecun_normal(),
                                                              ("vision_heads", "head_dim", "vision_embed")),
                                      bias_init=partitioned(nnx.initializers.zeros, ("vision_embed",)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out_proj(
        attention.bidirectional_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                          implementation=self.attention_kernel))


class VisionEncoderLayer(nnx.Module):
  """Pre-LN transformer block."""

  def __init__(self, width: int, heads: int, mlp: int, *, act: str, norm_eps: float, dtype: jnp.dtype, rngs: nnx.Rngs,
               attention_kernel: str = "auto"):
    self.layer_norm1 = layer_norm(width, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.self_attn = VisionAttention(width, heads, dtype=dtype, rngs=rngs, attention_kernel=attention_kernel)
    self.layer_norm2 = layer_norm(width, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(width, mlp, act=act, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


# What sets CLIP's and SigLIP's ViTs apart, per `kind` (everything else is shared).
VIT_KINDS: dict[str, dict] = {
    # OpenAI CLIP (HF CLIPVisionModel): a class token, a bias-free patch conv, a layernorm
    # before the encoder ("pre_layrnorm" in HF), quick_gelu, LayerNorm eps 1e-5.
    "clip": dict(class_token=True, patch_bias=False, pre_norm=True, act="quick_gelu", norm_eps=1e-5),
    # SigLIP (HF SiglipVisionModel): patch tokens only, a patch conv with bias, no
    # pre-encoder norm, tanh-approximated GELU, LayerNorm eps 1e-6.
    "siglip": dict(class_token=False, patch_bias=True, pre_norm=False, act="gelu_tanh", norm_eps=1e-6),
}


def run_in_order(layers: Sequence[nnx.Module], x: jax.Array, names: tuple[str | None, ...], *, scan: bool) -> jax.Array:
  """x through `layers` (modules of one structure) one after another, each output pinned to the
  logical axes `names`.

  scan: as one jax.lax.scan over the layers' weights, stacked where it is traced, so the compiler
  builds one layer's program instead of one per layer: unrolled, a ViT-L's 23 layers and a
  ConvNeXt-L's 27-block stage take most of mgm_8b's TPU compile. The weights keep their
  per-layer layout (checkpoints, converters); the stacked copy lives while the tower runs.
  """
  if not scan or len(layers) < 2:
    for layer in layers:
      x = constrain(layer(x), names)
    return x
  graphdef, _ = nnx.split(layers[0])
  stacked = jax.tree.map(lambda *weights: jnp.stack(weights), *(nnx.split(layer)[1] for layer in layers))

  def body(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
    return constrain(nnx.merge(graphdef, state)(x), names), None

  return jax.lax.scan(body, x, stacked)[0]


class VisionTransformer(nnx.Module):
  """CLIP or SigLIP ViT returning [B, (image_size/patch_size)^2, width] patch tokens.

  feature_layer indexes the hidden states as HF's output_hidden_states does (0 = the
  embeddings, after CLIP's pre-layernorm; L = the last layer's output, before any
  post-layernorm): -2, the penultimate layer, is what LLaVA and Mini-Gemini feed the LLM.
  CLIP's class token is dropped from the output (MGM's select_feature='patch'). Layers
  after feature_layer are kept (so released weights load unchanged) but never run; the
  post-layernorm and SigLIP's pooling head are not built since no feature layer reads them.
  """

  def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp: int,
               feature_layer: int = -2, kind: str = "clip", act: str | None = None, norm_eps: float | None = None,
               dtype: jnp.dtype = jnp.float32, attention_kernel: str = "auto", scan_layers: bool = False,
               rngs: nnx.Rngs):
    if kind not in VIT_KINDS:
      raise ValueError(f"model.vision_lowres.kind={kind!r}: expected one of {sorted(VIT_KINDS)}")
    spec = VIT_KINDS[kind]
    act = act or spec["act"]
    norm_eps = spec["norm_eps"] if norm_eps is None else norm_eps
    if image_size % patch_size:
      raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    activation(act)  # fail at construction on an unknown name
    if not -(layers + 1) <= feature_layer <= layers:
      raise ValueError(f"feature_layer {feature_layer} out of range for {layers} layers")
    self.kind = kind
    self.image_size = image_size
    self.patch_size = patch_size
    self.grid = image_size // patch_size
    self.num_layers_run = feature_layer % (layers + 1) if feature_layer < 0 else feature_layer
    self.scan_layers = bool(scan_layers)
    self.patch_embedding = _conv(3, width, patch_size, stride=patch_size, use_bias=spec["patch_bias"], dtype=dtype,
                                 rngs=rngs)
    if spec["class_token"]:
      self.class_embedding = nnx.Param(
          partitioned(nnx.initializers.normal(width**-0.5), ("vision_embed",))(rngs.params(), (width,)))
    else:
      self.class_embedding = None
    self.position_embedding = nnx.Embed(
        self.grid**2 + int(spec["class_token"]), width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(nnx.initializers.normal(0.02), ("pos", "vision_embed")))
    self.pre_layernorm = (layer_norm(width, eps=norm_eps, dtype=dtype, rngs=rngs) if spec["pre_norm"] else None)
    self.layers = nnx.List([
        VisionEncoderLayer(width, heads, mlp, act=act, norm_eps=norm_eps, dtype=dtype, rngs=rngs,
                           attention_kernel=attention_kernel) for _ in range(layers)
    ])

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, S, S, 3] (already normalised) -> patch tokens [B, (S/P)^2, width]."""
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"low-res images are {h}x{w}, the tower expects {self.image_size}")
    x = self.patch_embedding(images)  # [B, g, g, width]
    x = x.reshape(b, self.grid * self.grid, x.shape[-1])
    if self.class_embedding is not None:
      cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embedding.embedding[...].astype(x.dtype)[None]
    if self.pre_layernorm is not None:
      x = self.pre_layernorm(x)
    x = constrain(x, _TOKENS)
    x = run_in_order(self.layers[:self.num_layers_run], x, _TOKENS, scan=self.scan_layers)
    return x[:, 1:] if self.class_embedding is not None else x


class DepthwiseConv(nnx.Module):
  """k x k depthwise conv, 'SAME' padding, stride 1, with bias; nnx.Conv's parameter layout
  (kernel [k, k, 1, C], bias [C]) so timm weights load the same way.

  Written as a sum of k*k shifted products instead of a grouped convolution: in jax 0.10.2
  the SPMD partitioner returns the weight gradient of a grouped conv multiplied by the number
  of replicas of the batch split (2x on the (data, fsdp, tensor) test mesh). Same FLOPs.
  """

  def __init__(self, dim: int, kernel: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if kernel % 2 == 0:
      raise ValueError(f"depthwise kernel size {kernel} must be odd for SAME padding")
    self.dtype = dtype
    self.kernel = nnx.Param(
        partitioned(nnx.initializers.lecun_normal(), _CONV_NAMES)(rngs.params(), (kernel, kernel, 1, dim)))
    self.bias = nnx.Param(partitioned(nnx.initializers.zeros, ("conv_out",))(rngs.params(), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel.shape[0]
    h, w = x.shape[1:3]
    pad = k // 2
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = self.kernel[...].astype(self.dtype)
    # f32 accumulation over the k*k taps, whatever the compute dtype.
    out = self.bias[...].astype(jnp.float32)
    for i in range(k):
      for j in range(k):
        out = out + (xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]).astype(jnp.float32)
    return out.astype(self.dtype)


class ConvNeXtBlock(nnx.Module):
  """x + gamma * mlp(norm(dwconv7x7(x)))  (timm ConvNeXt block, channels-last MLP)."""

  def __init__(self, dim: int, *, ls_init: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.conv_dw = DepthwiseConv(dim, 7, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(dim, eps=1e-6, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, 4 * dim, act="gelu", dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(partitioned(nnx.initializers.constant(ls_init), ("norm",))(rngs.params(), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.mlp(self.norm(self.conv_dw(x)))
    return x + y * self.gamma[...].astype(y.dtype)


class ConvNeXtStage(nnx.Module):
  """Optional downsample (LayerNorm, conv k=2 s=2) then blocks."""

  def __init__(self, dim_in: int, dim: int, depth: int, *, downsample: bool, ls_init: float, dtype: jnp.dtype,
               scan_blocks: bool = False, rngs: nnx.Rngs):
    if downsample:
      self.downsample_norm = layer_norm(dim_in, eps=1e-6, dtype=dtype, rngs=rngs)
      self.downsample_conv = _conv(dim_in, dim, 2, stride=2, dtype=dtype, rngs=rngs)
    else:
      self.downsample_norm = self.downsample_conv = None
    self.blocks = nnx.List([ConvNeXtBlock(dim, ls_init=ls_init, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.scan_blocks = bool(scan_blocks)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.downsample_conv is not None:
      x = self.downsample_conv(self.downsample_norm(x))
    return run_in_order(self.blocks, x, _NHWC, scan=self.scan_blocks)


class ConvNeXt(nnx.Module):
  """ConvNeXt trunk (stem conv k=4 s=4 + LayerNorm, then stages), NHWC.

  timm's ConvNeXt (what OpenCLIP's convnext_* models wrap as visual.trunk) without its
  norm_pre and head, which Mini-Gemini removes too. ls_init is timm's layer-scale init
  (1e-6); image_size, when given, is checked on input.
  """

  def __init__(self, *, dims: Sequence[int], depths: Sequence[int], image_size: int | None = None,
               ls_init: float = 1e-6, kind: str = "convnext", dtype: jnp.dtype = jnp.float32, scan_blocks: bool = False,
               rngs: nnx.Rngs):
    if kind != "convnext":
      raise ValueError(f"model.vision_highres.kind={kind!r}: only 'convnext' is built")
    dims, depths = tuple(dims), tuple(depths)
    if len(dims) != len(depths):
      raise ValueError(f"ConvNeXt dims {dims} and depths {depths} differ in length")
    self.dims = dims
    self.image_size = image_size
    self.stem_conv = _conv(3, dims[0], 4, stride=4, dtype=dtype, rngs=rngs)
    self.stem_norm = layer_norm(dims[0], eps=1e-6, dtype=dtype, rngs=rngs)
    self.stages = nnx.List([
        ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0, ls_init=ls_init, dtype=dtype,
                      scan_blocks=scan_blocks, rngs=rngs) for i in range(len(dims))
    ])

  @property
  def feature_channels(self) -> int:
    """Channels of `feature_map`: the sum of the stage widths."""
    return sum(self.dims)

  def __call__(self, images: jax.Array) -> list[jax.Array]:
    """images [B, S, S, 3] -> stage outputs [B, S/4/2^i, S/4/2^i, dims[i]]."""
    if self.image_size is not None and images.shape[1:3] != (self.image_size,) * 2:
      raise ValueError(f"high-res images are {images.shape[1]}x{images.shape[2]}, "
                       f"the tower expects {self.image_size}")
    x = constrain(self.stem_norm(self.stem_conv(images)), _NHWC)
    outputs = []
    for stage in self.stages:
      x = stage(x)
      outputs.append(x)
    return outputs

  def feature_map(self, images: jax.Array) -> jax.Array:
    """Mini-Gemini's high-res map [B, S/4, S/4, sum(dims)].

    Bilinear upsampling with half-pixel centres, as torch's interpolate(align_corners=False)
    that the reference uses; when only upsampling, jax.image.resize's antialias is a no-op.
    """
    outputs = self(images)
    b, h, w, _ = outputs[0].shape
    resized = [outputs[0]] + [jax.image.resize(o, (b, h, w, o.shape[-1]), method="bilinear") for o in outputs[1:]]
    return constrain(jnp.concatenate(resized, axis=-1), _NHWC)
