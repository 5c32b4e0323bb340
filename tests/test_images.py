"""Image preprocessing equals the references on real photos (../shared/data/images).

Reference: transformers' CLIPImageProcessor with its PIL backend (CLIPImageProcessorPil,
what CLIP, LLaVA and Mini-Gemini preprocessed with; transformers 5 picks a torchvision
backend when torchvision is installed, which resizes with torch's antialiased bicubic
and is not the training-time reference) and torch's interpolate for MGM's low-res input.
Tolerances: the CLIP path runs the same PIL resize and crop on the same uint8 pixels, so
only float32 rounding of (x/255 - mean)/std may differ (|x| < 2.2: a few ulp, < 1e-6);
the low-res resize sums 4 float32 products in another order than torch (< 1e-5).
"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from mgjax.data import images
from mgjax.data.pipeline import preprocess_image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = os.path.join(REPO, "..", "shared", "data", "images")
NAMES = ("extreme_ironing.jpg", "waterview.jpg")


def _photo(name: str) -> Image.Image:
  path = os.path.join(PHOTOS, name)
  if not os.path.exists(path):
    pytest.skip(f"{path} is absent (real photos live beside the project in ../shared/data)")
  return Image.open(path)


def _clip_processor(size: int):
  return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _reference(image: Image.Image, size: int) -> np.ndarray:
  pixels = _clip_processor(size)(images=image, return_tensors="np")["pixel_values"][0]
  return pixels.transpose(1, 2, 0)  # CHW -> HWC


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [336, 768, 32])
def test_clip_preprocess_equals_clip_image_processor(name, size):
  image = _photo(name)
  ours = images.clip_preprocess(image, size)
  ref = _reference(image, size)
  assert ours.shape == ref.shape == (size, size, 3) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_mgm_pair_equals_mini_geminis_inputs(name):
  """MGM: the CLIP processor at the high-res size (768), then the low-res (336) input by
  torch interpolate(bilinear, align_corners=False) of that normalised image."""
  image = _photo(name)
  lowres, highres = images.mgm_pair(image, 336, 768)
  ref_high = torch.from_numpy(_reference(image, 768).transpose(2, 0, 1)[None].copy())
  ref_low = torch.nn.functional.interpolate(ref_high, size=[336, 336], mode="bilinear", align_corners=False)
  assert np.abs(highres - ref_high[0].numpy().transpose(1, 2, 0)).max() <= 1e-6
  assert np.abs(lowres - ref_low[0].numpy().transpose(1, 2, 0)).max() <= 1e-5


def test_pad_to_square_centres_the_image_on_the_mean_colour():
  image = _photo("extreme_ironing.jpg").convert("RGB")  # 570 x 380
  square = images.expand_to_square(image)
  assert square.size == (570, 570)
  pixels = np.asarray(square)
  top = (570 - 380) // 2
  np.testing.assert_array_equal(pixels[top:top + 380], np.asarray(image))
  mean_rgb = [int(m * 255) for m in images.CLIP_MEAN]
  np.testing.assert_array_equal(pixels[0, 0], mean_rgb)
  np.testing.assert_array_equal(pixels[-1, -1], mean_rgb)
  lowres, highres = images.mgm_pair(image, 336, 768, pad_to_square=True)
  assert lowres.shape == (336, 336, 3) and highres.shape == (768, 768, 3)


def test_pipeline_uses_the_clip_processor():
  image = _photo("waterview.jpg")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")  # lossless, so the decoded pixels are the photo's
  ours = preprocess_image(buffer.getvalue(), 336, images.CLIP_MEAN, images.CLIP_STD)
  assert np.abs(ours - _reference(image, 336)).max() <= 1e-6
