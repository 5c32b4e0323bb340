"""The sample tokenizer: a small byte-level BPE the build trains on the sample text.

Real recipes use their LLM's own tokenizer; the sample has no LLM to borrow one from,
and a 1K vocabulary keeps the tiny model's embedding and logits cheap.

`<image>` is a single special token: the training pipeline finds its id and expands it
into the N visual tokens of the vision towers. Role markers are special tokens too, so
no user text can spell them.
"""

from __future__ import annotations

from typing import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mgjax.data import templates

SPECIAL_TOKENS = [templates.PAD, templates.BOS, templates.EOS, templates.IMAGE, *templates.ROLE_MARKERS.values()]


def train_sample_tokenizer(texts: Iterable[str], out_dir: str,
                           vocab_size: int = 1024) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `texts` and saves it, with the chat template, to out_dir.

  `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it back offline.
  Special token ids are fixed by their order: <pad>=0, <s>=1, </s>=2, <image>=3, then
  the role markers.
  """
  tok = tokenizers.Tokenizer(models.BPE())
  # add_prefix_space=False: the chat template puts no space after role markers, and the
  # words right after them should tokenise as they do at the start of any text.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=templates.BOS, eos_token=templates.EOS, pad_token=templates.PAD,
      additional_special_tokens=[templates.IMAGE, *templates.ROLE_MARKERS.values()],
      chat_template=templates.SAMPLE_CHAT_TEMPLATE, model_max_length=1 << 20)
  fast.save_pretrained(out_dir)
  return fast
