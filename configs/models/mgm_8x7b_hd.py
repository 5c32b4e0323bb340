"""Mini-Gemini 8x7B HD (MGM-8x7B-HD): mgm_8x7b with a 2x2 grid of 336 px crops plus the
global view for CLIP and the ConvNeXt at 1536 px (mgjax.config.hd_variant), as
YanweiLi/MGM-8x7B-HD was trained.

Select with --config=configs/stage1.py:model=mgm_8x7b_hd.
"""

from mgjax import config as mgjax_config


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return mgjax_config.hd_variant(mgjax_config.preset("models", "mgm_8x7b"))
