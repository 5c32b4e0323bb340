"""Image preprocessing for Mini-Gemini's two towers, matching the references pixel for pixel.

- `clip_preprocess`: transformers' CLIPImageProcessor (its PIL backend, the one CLIP, LLaVA
  and Mini-Gemini were trained with): RGB, shortest side to `size` with PIL bicubic (the
  long side truncated as transformers does), centre crop, x 1/255, (x - mean) / std.
- `mgm_pair`: how Mini-Gemini builds both inputs from one image (MGM's train.py and
  process_images): the high-res (ConvNeXt) input is the same CLIP processor at the high-res
  size (OpenCLIP's convnext_large_d_320 uses OpenAI CLIP's mean/std, which MGM asserts),
  and the low-res (CLIP) input is that normalised image resized down by torch's
  interpolate(mode='bilinear', align_corners=False), without antialiasing.
  Optionally MGM's image_aspect_ratio='pad' first pastes the image centred on a square
  of the mean colour.
- `mgm_views`: the same with MGM's HD inputs (image_grid > 1): the normalised high-res
  image resized (as above) to grid * the low-res size, cut into grid x grid low-res crops
  (row-major), plus, with image_global, that resized image resized again to the low-res
  size; the views in MGM's order [crops..., global].

Arrays are HWC float32 (the models take NHWC). 16-bit grayscale images (PNG's, which PIL
opens as mode I;16) keep their intensities, scaled to 8 bits as PIL scales 16-bit colour.

`size_problem` is the build's check that an image is one training can afford: resizing
the shorter side to the tower's size makes an extreme strip (a 1 x 100000 PNG of a few
hundred bytes) billions of pixels long.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation, used by both towers of every Mini-Gemini release.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Limits on an image the build accepts. Pixels: PIL's own decompression-bomb limit (it
# warns above it, refuses above twice it). Aspect ratio: at 20:1, a 768 px tower resizes an
# image to 768 x 15360 (12M pixels, as much as a 12 MP photo); real photos, pages, charts
# and banners (728 x 90 is 8:1) stay well inside. Side: WebP's own limit; with
# image_aspect_ratio='pad' an image becomes a square of its longer side.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
MAX_ASPECT_RATIO = 20
MAX_SIDE = 16383


def size_problem(width: int, height: int) -> str | None:
  """Why an image of this size cannot be trained on, or None when it can."""
  if width < 1 or height < 1:
    return f"is {width} x {height} pixels, an empty image"
  if width * height > MAX_PIXELS:
    return (f"is {width} x {height} pixels ({width * height / 1e6:.1f}M), more than {MAX_PIXELS / 1e6:.1f}M; "
            "downscale it (training sees it at the towers' size, at most 1536 px)")
  ratio = max(width, height) / min(width, height)
  if ratio > MAX_ASPECT_RATIO:
    return (f"is {width} x {height} pixels, an aspect ratio of {ratio:.0f}:1, more than {MAX_ASPECT_RATIO}:1 "
            "(training resizes its shorter side to the tower's size, so its longer side would be "
            f"{ratio:.0f} times that); crop it into parts or drop the record")
  if max(width, height) > MAX_SIDE:
    return f"is {width} x {height} pixels, longer than {MAX_SIDE} px on a side; downscale it"
  return None


# PIL's modes of a 16-bit grayscale image (PNG gives I;16; older PIL gave I, 32-bit).
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
  """An RGB image of any PIL image. PIL's own convert("RGB") clips 16-bit gray values to
  255, turning nearly all of a 16-bit grayscale PNG white; those are scaled to 8 bits
  instead (the high byte, as PIL reduces 16-bit colour PNGs)."""
  if image.mode in _SIXTEEN_BIT_GRAY:
    pixels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    image = Image.fromarray((pixels >> 8).astype(np.uint8))
  return image.convert("RGB")


def decode(data: bytes | Image.Image) -> Image.Image:
  """Encoded image bytes (JPEG, PNG, ...), or an image another library already opened
  (lmms-eval hands over PIL images) -> an RGB PIL image."""
  if isinstance(data, Image.Image):
    return to_rgb(data)
  return to_rgb(Image.open(io.BytesIO(data)))


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize so the shorter side is `size`; the longer is int(size * long / short),
  truncated, as transformers' get_resize_output_image_size computes it."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_size = (size, new_long) if w <= h else (new_long, size)
  return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """The centre size x size of an HWC array (top/left offsets rounded down)."""
  h, w = pixels.shape[:2]
  if h < size or w < size:
    raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image")
  top, left = (h - size) // 2, (w - size) // 2
  return pixels[top:top + size, left:left + size]


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 HWC -> float32 (x / 255 - mean) / std."""
  scaled = (pixels.astype(np.float64) / 255.0).astype(np.float32)
  return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_preprocess(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """CLIPImageProcessor(size={'shortest_edge': size}, crop_size=size) -> [size, size, 3]."""
  resized = np.asarray(resize_shortest_side(to_rgb(image), size))
  return normalize(center_crop(resized, size), mean, std)


def expand_to_square(image: Image.Image, mean: Sequence[float] = CLIP_MEAN) -> Image.Image:
  """MGM's expand2square: the image centred on a square of the mean colour (int(m * 255))."""
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
  square.paste(image, ((side - w) // 2, (side - h) // 2))
  return square


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bilinear interpolation, align_corners=False."""
  # Source positions in float32, as torch computes them for float32 images: the rounding
  # of the scale moves far pixels by ~1e-4 of a pixel, which float64 would not reproduce.
  scale = np.float32(n_in) / np.float32(n_out)
  src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0)).astype(np.float64)  # torch clamps at 0
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in), np.float64)
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights


def bilinear_resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """HWC float -> [size, size, C] as torch's interpolate(bilinear, align_corners=False)."""
  rows = _bilinear_matrix(pixels.shape[0], size)
  cols = _bilinear_matrix(pixels.shape[1], size)
  # Two separable matmuls (rows, then columns); a single 3-operand einsum runs naively.
  out = np.tensordot(rows, pixels.astype(np.float64), axes=(1, 0))  # [size, W, C]
  out = np.tensordot(cols, out, axes=(1, 1))  # [size(cols), size(rows), C]
  return out.transpose(1, 0, 2).astype(np.float32)


def mgm_pair(image: Image.Image, lowres_size: int, highres_size: int, mean: Sequence[float] = CLIP_MEAN,
             std: Sequence[float] = CLIP_STD, *, pad_to_square: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mini-Gemini's (low-res, high-res) inputs of one image: [l, l, 3], [h, h, 3]."""
  if pad_to_square:
    image = expand_to_square(to_rgb(image), mean)
  highres = clip_preprocess(image, highres_size, mean, std)
  return bilinear_resize(highres, lowres_size), highres


def grid_crops(pixels: np.ndarray, grid: int) -> np.ndarray:
  """HWC [g*s, g*s, C] -> [g*g, s, s, C]: row-major tiles, as MGM's reshape(3, g, s, g, s)
  .permute(1, 3, 0, 2, 4)."""
  h, w, c = pixels.shape
  if h != w or h % grid:
    raise ValueError(f"cannot cut a {h}x{w} image into {grid}x{grid} square crops")
  s = h // grid
  return pixels.reshape(grid, s, grid, s, c).transpose(0, 2, 1, 3, 4).reshape(grid * grid, s, s, c)


def mgm_views(image: Image.Image, lowres_size: int, highres_size: int, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD, *, grid: int = 1, global_view: bool = False,
              pad_to_square: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Mini-Gemini's inputs of one image with its image_grid / image_global settings.

  grid 1 (no global view): `mgm_pair`, low-res [l, l, 3]. grid >= 2: low-res views
  [grid^2 + global_view, l, l, 3], the grid crops of the high-res image resized to
  grid * l, then the global view (that image resized to l), as MGM's train.py and
  model_vqa.py build `images`. The high-res input [h, h, 3] is the same in both.
  """
  if grid == 1 and not global_view:
    return mgm_pair(image, lowres_size, highres_size, mean, std, pad_to_square=pad_to_square)
  if grid < 2:
    raise ValueError(f"image_global needs image_grid >= 2 (got image_grid={grid})")
  if pad_to_square:
    image = expand_to_square(to_rgb(image), mean)
  highres = clip_preprocess(image, highres_size, mean, std)
  raw = bilinear_resize(highres, lowres_size * grid)
  views = grid_crops(raw, grid)
  if global_view:
    views = np.concatenate([views, bilinear_resize(raw, lowres_size)[None]], axis=0)
  return views, highres
