"""A tokenizer ready for conversations: loaded from a local folder, given the chat template
training needs (one that marks the answers), and fingerprinted so a checkpoint knows which
tokenizer its token ids belong to. Training the sample's own tokenizer is the build's job
(mgjax.data.tokenizer_training).
"""

from __future__ import annotations

import hashlib
import json
import os

import transformers

from mgjax.data import templates

# A folder holds a tokenizer when it has one of these (fast, slow, or SentencePiece form).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                    "vocab.txt")


def check_local(tokenizer_dir: str) -> None:
  """Raises unless tokenizer_dir is a local folder holding a tokenizer.

  Tokenizers are read from disk only: a Hugging Face Hub id (or a typo) must fail at
  once, saying what to download and where, never start a network lookup.

  Raises:
    FileNotFoundError: not a folder, or one without tokenizer files.
  """
  path = str(tokenizer_dir)
  if not os.path.isdir(path):
    looks_like_hub_id = "://" not in path and not path.startswith((".", "/", "~")) and path.count("/") <= 1
    hub_id = path if looks_like_hub_id else "<hub id of the model>"
    local = f"tokenizers/{path.rsplit('/', 1)[-1]}" if looks_like_hub_id else path
    raise FileNotFoundError(
        f"tokenizer {path!r} is not a local folder (tokenizers are loaded from disk only, never from the "
        f"network). Download it first, e.g. `huggingface-cli download {hub_id} tokenizer.json "
        f"tokenizer_config.json special_tokens_map.json --local-dir {local}`, and set the tokenizer path "
        f"(data config tokenizer.path) to that folder")
  if not any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES):
    raise FileNotFoundError(f"tokenizer folder {path} holds no tokenizer (none of {list(_TOKENIZER_FILES)}; it holds "
                            f"{sorted(os.listdir(path))[:20]}); download the model's tokenizer files into it")


def load(tokenizer_dir: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a saved tokenizer from a local directory, never touching the network.

  Raises:
    FileNotFoundError: as `check_local`.
  """
  check_local(tokenizer_dir)
  return transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def apply_template(tokenizer: transformers.PreTrainedTokenizerBase,
                   name: str = "") -> transformers.PreTrainedTokenizerBase:
  """Readies a tokenizer (an LLM's own, usually) for the pipeline, in place, and returns it.

  - name (model.template, a key of templates.TEMPLATES) sets its chat template; "" keeps the
    tokenizer's own (the sample tokenizer carries the sample template).
  - Special tokens the template spells (e.g. <start_of_turn>) become single tokens: added
    as special tokens where the vocabulary lacks them, so no text can spell them either.
  - The template's end-of-answer token becomes eos where it is not eos already (Llama 3's
    <|eot_id|>, ChatML's <|im_end|>): generation stops where training taught answers to end.
  - `<image>` is added as a special token when missing: the pipeline expands it into the
    image's visual tokens.
  Added tokens grow len(tokenizer): model.vocab_size must cover it (`python -m mgjax.convert
  import-llm --vocab_size` pads an imported embedding).

  Raises:
    ValueError: an unknown template name; name '' for a tokenizer whose own chat template
      marks no answers ({% generation %} blocks: the loss mask would be empty), naming the
      template to use; or a tokenizer without a fast backend (assistant masks need its
      character offsets).
  """
  if name and name not in templates.TEMPLATES:
    raise ValueError(f"model.template={name!r}: unknown; known: {sorted(templates.TEMPLATES)} "
                     "(or '' for the tokenizer's own)")
  if not name and not marks_answers(tokenizer):
    raise ValueError(own_template_refusal(tokenizer))
  if not tokenizer.is_fast:
    raise ValueError(f"tokenizer {tokenizer.name_or_path} is not a fast tokenizer: the assistant "
                     "loss mask needs character offsets; load it with use_fast=True")
  chat_template, specials, end_of_answer = templates.TEMPLATES[name] if name else (None, (), None)
  vocab = tokenizer.get_vocab()
  # Present means text spelling it comes out as that one token; a vocabulary entry the
  # pre-tokenizer never produces (it splits at "<") does not count.
  missing = [t for t in (*specials, templates.IMAGE) if tokenizer.encode(t, add_special_tokens=False) != [vocab.get(t)]]
  if missing:
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
  if chat_template is not None:
    tokenizer.chat_template = chat_template
  if end_of_answer and tokenizer.eos_token != end_of_answer:
    tokenizer.eos_token = end_of_answer
  return tokenizer


# A marker in a tokenizer's own chat template -> mgjax's templates of that layout.
_LAYOUT_HINTS = (("SmolLM", ("smollm2", "chatml")), ("<|im_start|>", ("chatml",)), ("<|start_header_id|>",
                                                                                    ("llama_3_instruct", "llama_3")),
                 ("<start_of_turn>", ("gemma",)), ("[INST]", ("mistral_instruct",)), ("USER:", ("vicuna_v1",)))


def marks_answers(tokenizer: transformers.PreTrainedTokenizerBase) -> bool:
  """Whether the tokenizer's own chat template marks its answers ({% generation %} blocks), as
  the assistant loss mask needs."""
  return "{% generation %}" in (tokenizer.chat_template or "")


def matching_templates(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[str, ...]:
  """mgjax's templates (best first) with the layout of the tokenizer's own chat template."""
  own = tokenizer.chat_template or ""
  return next((names for marker, names in _LAYOUT_HINTS if marker in own), ())


def own_template_refusal(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
  """Why a tokenizer's own chat template cannot train (it marks no answers), and the
  model.template to set instead."""
  own = tokenizer.chat_template or ""
  hints = matching_templates(tokenizer)
  what = ("has no chat template" if not own else
          "has a chat template that marks no answers (no {% generation %} blocks), so the loss mask would be empty")
  suggestion = (f"its layout is that of {' or '.join(repr(n) for n in hints)}: set --config.model.template="
                f"{hints[0]}" if hints else "set --config.model.template to the LLM's conversation format")
  return (f"tokenizer {tokenizer.name_or_path} {what}; {suggestion} (known: {sorted(templates.TEMPLATES)})")


def fingerprint(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
  """sha256 of what decides which text a token id stands for: the vocabulary and merges with
  every added token (the fast backend's saved form). Equal for a tokenizer saved and loaded
  back; a checkpoint's ids mean the same text only under a tokenizer with the same
  fingerprint. The chat template is left out on purpose: phases of one recipe lay the same
  tokens out differently (pretraining's `plain` captions, then the LLM's conversations)."""
  backend = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(
      sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(backend.encode()).hexdigest()
