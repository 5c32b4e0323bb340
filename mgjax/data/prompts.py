"""Checks of generation samples' text-to-image prompts, the ones a person would do by eye.

A generation sample is a user request ending in ` <GEN>` answered with a prompt between
`<h>` and `</h>`. For each one:

  prompt     present (the answer has <h>...</h>) and not blank
  language   py3langid's guess for the prompt, judged as the filters judge text: only on
             `language_min_chars`+ characters at `language_min_confidence`+, against the
             source's `filters.languages` (None: not judged)
  coverage   the share of the request's content words (words left after dropping function
             words and the words of asking, "draw", "picture", "please"...) that the prompt
             carries, compared case-blind and without a plural "s"; a prompt that drops the
             colour or the object the person asked for scores low

and over all of them, prompts that answer many different requests (a generator stuck on
one prompt) are counted. `report` gives the data card's `generation_prompts` section;
the review page shows the same per record.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable

import ml_collections
import numpy as np

from mgjax.data import filters
from mgjax.data.records import GEN_MARKER, PROMPT_CLOSE, PROMPT_OPEN

_PROMPT = re.compile(re.escape(PROMPT_OPEN) + r"(.*?)" + re.escape(PROMPT_CLOSE), re.DOTALL)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Function words, and the words people use to ask for a picture rather than to say what
# should be in it.
_STOP = frozenset("""
a an the and or but if of to in on at by for with from into onto about as is are be been being was were it its
this that these those there here i me my you your we our us he she they them his her their can could would will
shall should may might must do does did please kindly want like love need just some any one also so very
draw drawing paint painting sketch create generate make produce render show showing display give see picture
pictures image images photo photograph illustration illustrate depict depicting art artwork visualize imagine
""".split())
REPEATED_MIN_REQUESTS = 5  # a prompt answering this many different requests is flagged
LOW_COVERAGE = 0.5  # below this share of the request's content words, a prompt is listed


def extract(answer: str) -> str | None:
  """The text between the first <h> and </h> of an answer; None where there is none."""
  m = _PROMPT.search(answer)
  return None if m is None else m.group(1)


def _stem(word: str) -> str:
  word = word.lower()
  return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> list[str]:
  """The request's words that say what to draw, stemmed, in order, without repeats."""
  text = text.replace(GEN_MARKER, " ")
  out = []
  for w in _WORD.findall(text):
    s = _stem(w)
    if w.lower() not in _STOP and s not in _STOP and s not in out:
      out.append(s)
  return out


def coverage(request: str, prompt: str) -> float | None:
  """Share of the request's content words found in the prompt; None if it has none."""
  wanted = content_words(request)
  if not wanted:
    return None
  have = {_stem(w) for w in _WORD.findall(prompt)}
  return sum(w in have for w in wanted) / len(wanted)


def pairs(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
  """(request, answer) of each user turn that asks for an image."""
  return [(m["content"], messages[i + 1]["content"])
          for i, m in enumerate(messages[:-1])
          if m["role"] == "user" and m["content"].rstrip().endswith(GEN_MARKER)]


def check(messages: list[dict[str, str]], quality: filters.QualityConfig | None = None) -> list[dict[str, Any]]:
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
      cov = coverage(request, prompt)
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


def _normal(prompt: str) -> str:
  return " ".join(_WORD.findall(prompt.lower()))


def report(conversations: Iterable[tuple[str, str, list[dict[str, str]]]],
           qualities: dict[str, filters.QualityConfig] | None = None) -> dict[str, Any]:
  """The card's `generation_prompts` section over (id, source, messages) of generation samples."""
  qualities = qualities or {}
  n = missing = empty = checked = unexpected = 0
  scores, low = [], []
  requests_of = collections.defaultdict(set)  # normalised prompt -> distinct requests
  ids_of = collections.defaultdict(list)
  for record_id, source, messages in conversations:
    for r in check(messages, qualities.get(source)):
      n += 1
      missing += not r["present"]
      empty += r["empty"]
      if r["language"] is not None:
        checked += 1
        unexpected += not r["language_ok"]
      if r["coverage"] is not None:
        scores.append(r["coverage"])
        if r["coverage"] < LOW_COVERAGE:
          low.append({"id": record_id, "coverage": r["coverage"], "request": r["request"], "prompt": r["prompt"]})
      if r["prompt"] and r["prompt"].strip():
        key = _normal(r["prompt"])
        requests_of[key].add(_normal(r["request"]))
        ids_of[key].append(record_id)
  repeated = sorted(((len(reqs), key) for key, reqs in requests_of.items() if len(reqs) >= REPEATED_MIN_REQUESTS),
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
          f"below_{LOW_COVERAGE}": len(low)
      },
      "low_coverage": sorted(low, key=lambda r: r["coverage"])[:20],
      "repeated": {
          "min_requests": REPEATED_MIN_REQUESTS,
          "prompts": len(repeated),
          "records": sum(len(ids_of[key]) for _, key in repeated),
          "top": [{
              "prompt": key,
              "requests": k,
              "ids": ids_of[key][:10]
          } for k, key in repeated[:10]]
      },
  }
