"""An image the build keeps is one training can decode and resize; the rest are rejected
with the reason, before they are decoded. 16-bit grayscale images keep their picture.

A 1 x 100000 PNG is a few hundred bytes, and resizing its shorter side to a tower's 768
px would make it 76.8M pixels long; an image over PIL's pixel limit is refused from its
header alone. A 16-bit grayscale PNG (PIL's mode I;16) would come out almost white from
PIL's convert("RGB"), which clips every value above 255.
"""

import io
import json
import time

import numpy as np
from PIL import Image

from mgjax.data import images, sources
from mgjax.data.pipeline import preprocess_image
from mgjax.data.records import Record, Rejection


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", optimize=True)
  return buffer.getvalue()


def _read_with_images(tmp_path, names):
  rows = [{
      "id": name,
      "image": name,
      "conversations": [{
          "from": "human",
          "value": "<image>\nWhat is shown?"
      }, {
          "from": "gpt",
          "value": "A picture."
      }]
  } for name in names]
  (tmp_path / "data.json").write_text(json.dumps(rows))
  items = list(sources.read(str(tmp_path / "data.json"), format="llava_json", source="src", image_root=str(tmp_path)))
  return [r for r in items if isinstance(r, Record)], [r for r in items if isinstance(r, Rejection)]


def test_an_extreme_strip_is_rejected_at_build_time_with_the_reason(tmp_path):
  strip = _png(Image.new("L", (1, 100_000), 128))
  assert len(strip) < 1000
  (tmp_path / "strip.png").write_bytes(strip)
  (tmp_path / "wide.png").write_bytes(_png(Image.new("RGB", (2100, 100), (10, 20, 30))))  # 21:1
  (tmp_path / "banner.png").write_bytes(_png(Image.new("RGB", (728, 90), (10, 20, 30))))  # 8:1, a web banner
  recs, rejs = _read_with_images(tmp_path, ["strip.png", "banner.png", "wide.png"])
  assert [r.id for r in recs] == ["src:banner.png"]
  assert [(r.record, r.kind) for r in rejs] == [("record 0 (id=strip.png)", "bad_image_size"),
                                                ("record 2 (id=wide.png)", "bad_image_size")]
  assert "strip.png is 1 x 100000 pixels, an aspect ratio of 100000:1, more than 20:1" in rejs[0].reason
  assert "crop it" in rejs[0].reason and "21:1" in rejs[1].reason


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
  # 1-bit, so the file and the test stay small; decoded as RGB it would be 270 MB.
  big = Image.new("1", (10_000, 9_000), 1)
  (tmp_path / "big.png").write_bytes(_png(big))
  start = time.time()
  recs, rejs = _read_with_images(tmp_path, ["big.png"])
  assert time.time() - start < 2
  assert not recs and rejs[0].kind == "bad_image_size"
  assert "is 10000 x 9000 pixels (90.0M), more than 89.5M; downscale it" in rejs[0].reason
  assert images.size_problem(4000, 3000) is None  # a 12 MP photo


def _gray16() -> tuple[bytes, np.ndarray]:
  """A 16-bit grayscale PNG: a ramp over the whole 0..65535 range, and its values."""
  ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
  data = _png(Image.fromarray(ramp))
  assert Image.open(io.BytesIO(data)).mode == "I;16"
  return data, ramp


def test_a_16_bit_grayscale_png_keeps_its_intensities():
  data, ramp = _gray16()
  rgb = np.asarray(images.decode(data))
  assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], ramp >> 8)
  # What PIL's own conversion gives: white wherever the value passes 255.
  assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 255).mean() > 0.99
  # The same picture as its 8-bit version, all the way to the towers' input.
  eight = _png(Image.fromarray((ramp >> 8).astype(np.uint8)))
  np.testing.assert_array_equal(preprocess_image(data, 32, images.CLIP_MEAN, images.CLIP_STD),
                                preprocess_image(eight, 32, images.CLIP_MEAN, images.CLIP_STD))


def test_8_bit_images_decode_as_pil_converts_them():
  rng = np.random.default_rng(0)
  for mode, shape in (("RGB", (20, 30, 3)), ("L", (20, 30)), ("RGBA", (20, 30, 4))):
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).convert(mode)
    data = _png(image)
    np.testing.assert_array_equal(np.asarray(images.decode(data)), np.asarray(image.convert("RGB")))


def test_the_review_page_shows_a_16_bit_png_as_training_sees_it():
  """The review page's thumbnail is the decoded picture, not PIL's white clip."""
  import base64

  from mgjax.data import review

  data, ramp = _gray16()
  uri = review._thumbnail(data, 64)
  thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"), dtype=float)
  # JPEG is lossy: the ramp's mean and its spread survive, a white page would not.
  assert abs(thumb.mean() - (ramp >> 8).mean()) < 4 and thumb.std() > 50
