"""Checks of generation samples' text-to-image prompts, the ones a person would do by eye.

A generation sample is a user request ending in ` <GEN>` answered with a prompt between
`<h>` and `</h>`. For each one:

  prompt     present (the answer has <h>...</h>) and not blank
  language   py3langid's guess for the prompt, judged as the filters judge text: only on
             `language_min_chars`+ characters at `language_min_confidence`+, against the
             source's `filters.languages` (None: not judged)
  coverage   the share of the request's content words (words left after dropping function
             words and the words of asking, "draw", "picture", "please"...) that the prompt
             carries, compared case-blind, plurals folded, and each word or phrase read as
             what a prompt would call it (LEXICON: "scarlet" is red, "a pair of" two, "disc"
             a circle, "backdrop" a background, "gray" grey; the data config's
             `prompt_checks.synonyms` adds more); a prompt that drops the colour or the
             object the person asked for scores low

and over all of them, prompts that answer many different requests (a generator stuck on
one prompt) are counted. The data config's `prompt_checks` (Settings) sets where a
coverage is low and how many requests make a prompt repeated. `report` gives the data
card's `generation_prompts` section; the review page shows the same per record.

The lexicon is a small table, not a thesaurus: WordNet would need a data download, and it
holds "crimson" under red but not "three-sided shape" under triangle nor "backdrop" under
background. On the bundled sample's 1,200 generation requests (every prompt correct by
construction) nothing is flagged, and a prompt swapped for another request's is flagged
with the precision and recall tests/test_prompt_checks.py measures (README: Reviewing the
data).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Mapping

import ml_collections
import numpy as np

from mgjax.data import filters
from mgjax.data.records import GEN_MARKER, PROMPT_CLOSE, PROMPT_OPEN

_PROMPT = re.compile(re.escape(PROMPT_OPEN) + r"(.*?)" + re.escape(PROMPT_CLOSE), re.DOTALL)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Function words, and the words people use to ask for a picture rather than to say what
# should be in it.
_STOP = frozenset("""
a an the and or but if of to in on at by for with from into onto about against as is are be been being was were it its
this that these those there here i me my you your we our us he she they them his her their can could would will
shall should may might must do does did please kindly want like love need just some any one also so very
draw drawing drawn paint painting painted sketch create generate make produce render rendered show showing display
give see picture pictures image images photo photograph illustration illustrate depict depicting art artwork
visualize imagine style styled simple
""".split())
# What a prompt calls a thing -> other words and phrases a request may use for it. Words
# are matched case-blind with plurals folded; a hyphen is a space ("jet-black").
LEXICON: dict[str, tuple[str, ...]] = {
    # colours
    "red": ("crimson", "scarlet", "ruby", "cherry red", "vermilion", "carmine", "blood red"),
    "green": ("emerald", "grass green", "lime green", "jade", "forest green"),
    "blue": ("navy", "navy blue", "azure", "cobalt", "sapphire", "royal blue"),
    "yellow": ("lemon", "lemon yellow", "golden", "gold", "canary yellow"),
    "purple": ("violet", "plum", "lilac", "lavender", "mauve"),
    "orange": ("tangerine", "amber"),
    "white": ("snow white", "ivory"),
    "black": ("jet black", "pitch black", "ebony"),
    "grey": ("gray",),
    "light blue": ("sky blue", "pale blue", "baby blue"),
    "beige": ("sand coloured", "sand colored", "sand colour", "sand color"),
    # shapes
    "circle": ("disc", "disk", "round dot", "dot"),
    "square": ("box", "square tile"),
    "triangle": ("three sided shape", "wedge"),
    "rectangle": ("oblong",),
    # counts (one is a function word: "a" says as much)
    "one": ("single", "1"),
    "two": ("pair", "couple", "2"),
    "three": ("trio", "3"),
    "four": ("quartet", "4"),
    "five": ("5",),
    "six": ("6",),
    # places
    "top": ("above", "upper"),
    "bottom": ("below", "beneath", "under", "underneath", "lower"),
    "center": ("centre", "middle"),
    "background": ("backdrop",),
    # styles, and British and American spellings
    "watercolour": ("watercolor",),
    "colour": ("color",),
    "vector": ("flat vector", "clip art", "clipart", "vector art"),
    "pencil": ("graphite",),
    "pixel": ("8 bit", "16 bit"),
    "3d": ("cgi", "3d rendered"),
    "oil": ("oil paint",),
}
REPEATED_MIN_REQUESTS = 5  # default: a prompt answering this many different requests is flagged
LOW_COVERAGE = 0.5  # default: below this share of the request's content words, a prompt is listed


@dataclasses.dataclass(frozen=True)
class Settings:
  """The data config's `prompt_checks` (each key optional)."""
  low_coverage: float = LOW_COVERAGE
  repeated_min_requests: int = REPEATED_MIN_REQUESTS
  # More of LEXICON: {what a prompt calls it: [what a request may say instead, ...]}.
  synonyms: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "Settings":
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    if set(d) - known:
      raise ValueError(f"data config prompt_checks: unknown keys {sorted(set(d) - known)} (known: {sorted(known)})")
    low = d.get("low_coverage", LOW_COVERAGE)
    if isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 <= low <= 1:
      raise ValueError(f"data config prompt_checks.low_coverage={low!r}: a share of the request's words, 0 to 1")
    repeated = d.get("repeated_min_requests", REPEATED_MIN_REQUESTS)
    if isinstance(repeated, bool) or not isinstance(repeated, int) or repeated < 2:
      raise ValueError(f"data config prompt_checks.repeated_min_requests={repeated!r}: a whole number, 2 or more")
    synonyms = {}
    for k, v in dict(d.get("synonyms") or {}).items():
      v = (v,) if isinstance(v, str) else v
      if not isinstance(k, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f'data config prompt_checks.synonyms: {k!r}: {v!r}; each entry is "what a prompt calls it": '
                         '["what a request may say instead", ...]')
      synonyms[k] = tuple(v)
    return cls(float(low), repeated, synonyms)


def settings(data_cfg: ml_collections.ConfigDict) -> Settings:
  """The data config's prompt check settings (`prompt_checks`; defaults without it)."""
  value = data_cfg.get("prompt_checks")
  return Settings.from_dict(value.to_dict() if hasattr(value, "to_dict") else value)


def extract(answer: str) -> str | None:
  """The text between the first <h> and </h> of an answer; None where there is none."""
  m = _PROMPT.search(answer)
  return None if m is None else m.group(1)


def _stem(word: str) -> str:
  """A word lowercased with a plural folded: circles, boxes, cherries -> circle, box, cherry."""
  word = word.lower()
  if len(word) > 4 and word.endswith("ies"):
    return word[:-3] + "y"
  if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("x", "ch", "sh", "ss", "z")):
    return word[:-2]
  return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


class Lexicon:
  """LEXICON (and a config's synonyms) as word sequences: each phrase, its words folded, ->
  the folded words of what a prompt calls it."""

  def __init__(self, extra: Mapping[str, Iterable[str]] | None = None):
    fold = lambda phrase: tuple(_stem(w) for w in _WORD.findall(phrase))
    self.phrases: dict[tuple[str, ...], tuple[str, ...]] = {}
    for table in (LEXICON, extra or {}):
      for name, others in table.items():
        for other in others:
          if fold(other):
            self.phrases[fold(other)] = fold(name)
    self.longest = max(map(len, self.phrases), default=0)

  def terms(self, text: str) -> list[str]:
    """The text's content words, each phrase the lexicon knows read as its name, in order,
    without repeats."""
    words = _WORD.findall(text.replace(GEN_MARKER, " "))
    out, i = [], 0
    while i < len(words):
      for n in range(min(self.longest, len(words) - i), 0, -1):
        name = self.phrases.get(tuple(_stem(w) for w in words[i:i + n]))
        if name is not None:
          found, i = [w for w in name if w not in _STOP], i + n
          break
      else:
        w, i = words[i].lower(), i + 1
        found = [] if w in _STOP or _stem(w) in _STOP else [_stem(w)]
      out += [w for w in found if w not in out]
    return out


_DEFAULT_LEXICON = Lexicon()


def content_words(text: str, lexicon: Lexicon | None = None) -> list[str]:
  """The request's words that say what to draw, in what a prompt calls them, in order,
  without repeats."""
  return (lexicon or _DEFAULT_LEXICON).terms(text)


def coverage(request: str, prompt: str, lexicon: Lexicon | None = None) -> float | None:
  """Share of the request's content words found in the prompt; None if it has none."""
  lexicon = lexicon or _DEFAULT_LEXICON
  wanted = lexicon.terms(request)
  if not wanted:
    return None
  have = set(lexicon.terms(prompt)) | {_stem(w) for w in _WORD.findall(prompt)}
  return sum(w in have for w in wanted) / len(wanted)


def pairs(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
  """(request, answer) of each user turn that asks for an image."""
  return [(m["content"], messages[i + 1]["content"])
          for i, m in enumerate(messages[:-1])
          if m["role"] == "user" and m["content"].rstrip().endswith(GEN_MARKER)]


def check(messages: list[dict[str, str]], quality: filters.QualityConfig | None = None,
          lexicon: Lexicon | None = None) -> list[dict[str, Any]]:
  """Per request of one conversation: its prompt and what the checks found."""
  quality = quality or filters.QualityConfig()
  out = []
  for request, answer in pairs(messages):
    prompt = extract(answer)
    r = {
        "request": request,
        "prompt": prompt,
        "present": prompt is not None,
        "empty": prompt is not None and not prompt.strip(),
        "coverage": None,
        "language": None,
        "language_ok": None
    }
    if prompt and prompt.strip():
      cov = coverage(request, prompt, lexicon)
      r["coverage"] = None if cov is None else round(cov, 3)
      if quality.languages is not None and len(prompt.strip()) >= quality.language_min_chars:
        lang, prob = filters._LanguageDetector.classify(prompt)
        r["language"] = lang
        r["language_ok"] = lang in quality.languages or prob < quality.language_min_confidence
    out.append(r)
  return out


def qualities(data_cfg: ml_collections.ConfigDict) -> dict[str, filters.QualityConfig]:
  """Each source's filter settings (the global `filters` with the source's own on top)."""
  base = dict(data_cfg.get("filters") or {})
  return {s["name"]: filters.QualityConfig.from_dict({**base, **dict(s.get("filters") or {})}) for s in data_cfg.sources}


def low_count(coverage_section: dict[str, Any]) -> tuple[float, int]:
  """(threshold, how many fell below it) of a card's `generation_prompts.coverage`."""
  threshold = coverage_section["threshold"]
  return threshold, coverage_section[f"below_{threshold}"]


def _normal(prompt: str) -> str:
  return " ".join(_WORD.findall(prompt.lower()))


def report(conversations: Iterable[tuple[str, str, list[dict[str, str]]]],
           qualities: dict[str, filters.QualityConfig] | None = None, checks: Settings | None = None) -> dict[str, Any]:
  """The card's `generation_prompts` section over (id, source, messages) of generation samples."""
  qualities, checks = qualities or {}, checks or Settings()
  lexicon = Lexicon(checks.synonyms)
  n = missing = empty = checked = unexpected = 0
  scores, low = [], []
  requests_of = collections.defaultdict(set)  # normalised prompt -> distinct requests
  ids_of = collections.defaultdict(list)
  for record_id, source, messages in conversations:
    for r in check(messages, qualities.get(source), lexicon):
      n += 1
      missing += not r["present"]
      empty += r["empty"]
      if r["language"] is not None:
        checked += 1
        unexpected += not r["language_ok"]
      if r["coverage"] is not None:
        scores.append(r["coverage"])
        if r["coverage"] < checks.low_coverage:
          low.append({"id": record_id, "coverage": r["coverage"], "request": r["request"], "prompt": r["prompt"]})
      if r["prompt"] and r["prompt"].strip():
        key = _normal(r["prompt"])
        requests_of[key].add(_normal(r["request"]))
        ids_of[key].append(record_id)
  repeated = sorted(
      ((len(reqs), key) for key, reqs in requests_of.items() if len(reqs) >= checks.repeated_min_requests),
      reverse=True)
  a = np.asarray(scores) if scores else None
  return {
      "requests": n,
      "missing_prompt": missing,
      "empty_prompt": empty,
      "language": {
          "checked": checked,
          "unexpected": unexpected
      },
      "coverage": {
          "n": len(scores),
          "mean": None if a is None else round(float(a.mean()), 3),
          "p10": None if a is None else round(float(np.percentile(a, 10)), 3),
          "threshold": checks.low_coverage,
          f"below_{checks.low_coverage}": len(low)
      },
      "low_coverage": sorted(low, key=lambda r: r["coverage"])[:20],
      "repeated": {
          "min_requests": checks.repeated_min_requests,
          "prompts": len(repeated),
          "records": sum(len(ids_of[key]) for _, key in repeated),
          "top": [{
              "prompt": key,
              "requests": k,
              "ids": ids_of[key][:10]
          } for k, key in repeated[:10]]
      },
  }
