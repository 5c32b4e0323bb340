"""Quality control for records a reader produced: normalise text, then apply rules.

Each rule that drops a record names itself with a short `kind` (the data card counts
by it) and a reason that says what was wrong and which option changes the rule:

  empty_turn, bad_alternation, ...  the structural checks of `records.check`, rerun since
                                    normalising can empty a turn
  turn_too_short, turn_too_long,    lengths in tokens of the configured tokenizer
  conversation_too_long
  repetition                        a turn made mostly of repeated word n-grams
  language                          a detector (py3langid, its model ships in the wheel)
                                    is confident the text is not in `languages`
  bad_generation                    a `<GEN>` request whose answer has no `<h>...</h>` prompt

Everything here is a pure function of one record, so it runs in worker processes.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
import zlib
from typing import Any, Callable, Mapping

import regex

from mgjax.data import records
from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common

# Unicode spaces that editors and scrapers leave in text; tokenizers treat each as its
# own rare symbol.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# C0/C1 control characters except tab and newline, the BOM, zero-width space and the bidi
# controls (Unicode's Bidi_Control: marks, embeddings, overrides, isolates): invisible, and
# never meant as content. An override (U+202E) makes text display other than it reads, so
# a reviewer would see one thing and the model learn another.
_INVISIBLE = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\ufeff\u200b"
                        "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_BLANK_LINES = re.compile(r"\n{3,}")
_MARKUP = re.compile(re.escape(records.IMAGE_PLACEHOLDER) + "|" + re.escape(records.GEN_MARKER) + "|</?h>")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """The rules' thresholds; the data config's `filters` dict sets any of them."""
  min_turn_tokens: int = 1
  max_turn_tokens: int = 8192
  max_conversation_tokens: int = 32768
  # None turns the language rule off (e.g. for a multilingual source).
  languages: tuple[str, ...] | None = ("en",)
  # The detector is unreliable on short text ("R-I-V-E-R."): below this many characters,
  # and below this confidence, a record is kept.
  language_min_chars: int = 50
  language_min_confidence: float = 0.9
  # Share of a turn's words inside a word 10-gram seen earlier in the turn. Loops ("la la
  # la ...", a paragraph pasted over and over) score 0.8-0.9; real OpenAssistant answers
  # with choruses, weekly plans or code reach about 0.4 (5-grams at Gopher's 0.15-0.3
  # dropped those). Short turns are exempt: a 30-word picture description ("a red circle
  # at the top left, a blue square at the top right") repeats by nature.
  repetition_ngram: int = 10
  max_repeated_fraction: float = 0.5
  repetition_min_words: int = 50
  # zlib ratio under which a long turn is a character-level loop ("aaaa...", ")))))").
  min_compression_ratio: float = 0.1
  repetition_min_chars: int = 500

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "QualityConfig":
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"data config filters: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if d.get("languages") is not None:
      d["languages"] = (d["languages"],) if isinstance(d["languages"], str) else tuple(d["languages"])
    return cls(**d)


def normalize_text(text: str) -> str:
  """NFC, one kind of space and newline, no invisible characters, no trailing blanks.

  Indentation is kept: code and lists in answers depend on it.
  """
  text = unicodedata.normalize("NFC", text)
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _INVISIBLE.sub("", _ODD_SPACES.sub(" ", text))
  text = "\n".join(line.rstrip() for line in text.split("\n"))
  return _BLANK_LINES.sub("\n\n", text).strip()


def normalize(record: Record) -> Record:
  record.messages = [{"role": m["role"], "content": normalize_text(m["content"])} for m in record.messages]
  return record


def repeated_fraction(text: str, n: int) -> float:
  """Share of words that belong to an n-gram seen earlier in the text."""
  words = [w.lower() for w in _WORD.findall(text)]
  if len(words) < n:
    return 0.0
  seen, covered = set(), [False] * len(words)
  for i in range(len(words) - n + 1):
    gram = tuple(words[i:i + n])
    if gram in seen:
      covered[i:i + n] = [True] * n
    seen.add(gram)
  return sum(covered) / len(words)


TokenCounter = Callable[[list[str]], list[int]]

# GPT-2's pre-tokenizer pattern, the one byte-level BPE (tokenizers' ByteLevel) splits by.
_PRETOKEN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def pretoken_counter() -> TokenCounter:
  """Counts byte-level BPE pre-tokens: the units merges never cross, so a lower bound on
  the tokens of any byte-level BPE. Used when the build trains its own tokenizer, which
  does not exist yet when records are filtered. (The regex, not tokenizers' ByteLevel,
  since building the offsets ByteLevel returns costs 3x more.)"""
  return lambda texts: [sum(1 for _ in _PRETOKEN.finditer(t)) for t in texts]


def tokenizer_counter(tokenizer_dir: str) -> TokenCounter:
  """Counts tokens of a saved Hugging Face tokenizer (loaded offline)."""
  from mgjax.data import chat_tokenizers
  tok = chat_tokenizers.load(tokenizer_dir)
  return lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


class _LanguageDetector:
  """py3langid with normalised probabilities, loaded once per process on first use."""
  _identifier = None

  @classmethod
  def classify(cls, text: str) -> tuple[str, float]:
    if cls._identifier is None:
      from py3langid import langid
      cls._identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    lang, prob = cls._identifier.classify(text)
    return lang, float(prob)


class Quality:
  """Normalises a record and returns it, or the Rejection of the first rule it fails."""

  def __init__(self, config: QualityConfig, count_tokens: TokenCounter):
    self.config = config
    self.count_tokens = count_tokens

  def __call__(self, record: Record, file: str, where: str) -> Record | Rejection:
    reason, kind = self.problem(normalize(record))
    if reason is None:
      return record
    return Rejection(record.source, file, where, reason, kind=kind, id=record.id, messages=record.messages)

  def problem(self, record: Record) -> tuple[str | None, str | None]:
    """(reason, kind) of the first rule the (normalised) record fails, else (None, None)."""
    c = self.config
    reason = records.check(record)
    if reason is not None:
      return reason, _common.check_kind(reason)
    texts = [m["content"] for m in record.messages]
    lengths = self.count_tokens(texts)
    for i, (m, n) in enumerate(zip(record.messages, lengths)):
      if n < c.min_turn_tokens:
        return (f"turn {i} ({m['role']}) has {n} tokens, fewer than min_turn_tokens={c.min_turn_tokens}",
                "turn_too_short")
      if n > c.max_turn_tokens:
        return (f"turn {i} ({m['role']}) has {n} tokens, more than max_turn_tokens={c.max_turn_tokens}",
                "turn_too_long")
    if sum(lengths) > c.max_conversation_tokens:
      return (f"{sum(lengths)} tokens in all, more than max_conversation_tokens={c.max_conversation_tokens}",
              "conversation_too_long")
    for i, text in enumerate(texts):
      if len(_WORD.findall(text)) >= c.repetition_min_words:
        frac = repeated_fraction(text, c.repetition_ngram)
        if frac > c.max_repeated_fraction:
          return (f"turn {i}: {frac:.0%} of its words repeat an earlier {c.repetition_ngram}-word sequence "
                  f"(max_repeated_fraction={c.max_repeated_fraction})", "repetition")
      if len(text) >= c.repetition_min_chars:
        raw = text.encode("utf-8")
        ratio = len(zlib.compress(raw)) / len(raw)
        if ratio < c.min_compression_ratio:
          return (f"turn {i}: compresses to {ratio:.2f} of its size, a character-level loop "
                  f"(min_compression_ratio={c.min_compression_ratio})", "repetition")
    if c.languages is not None:
      # The first 1000 characters decide as well as the whole and cost a fraction.
      text = _MARKUP.sub(" ", "\n".join(texts))[:1000]
      if len(text.strip()) >= c.language_min_chars:
        lang, prob = _LanguageDetector.classify(text)
        if lang not in c.languages and prob >= c.language_min_confidence:
          return (f"language detected as {lang!r} ({prob:.2f}), not in languages={list(c.languages)}; "
                  f"set filters.languages (None turns the rule off)", "language")
    for i, m in enumerate(record.messages[:-1]):
      if m["role"] == "user" and m["content"].endswith(records.GEN_MARKER):
        answer = record.messages[i + 1]["content"]
        if not re.search(re.escape(records.PROMPT_OPEN) + r".+?" + re.escape(records.PROMPT_CLOSE), answer, re.DOTALL):
          return (f"turn {i} asks for an image ({records.GEN_MARKER}) but the answer has no "
                  f"{records.PROMPT_OPEN}...{records.PROMPT_CLOSE} prompt", "bad_generation")
    return None, None
