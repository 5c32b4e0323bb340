"""The data card: what a build read, dropped, kept and mixed, as JSON, Markdown and plots.

  data_card.json   {"sources": {name: {"read", "kept", "rejected": {kind: n}, "duplicates", ...}},
                    "splits": {split: n}, "mixing": ..., "composition": ..., "tokens": ..., "turns": ...}
                   with read = kept + sum(rejected) + duplicates for every source
                   "generation_prompts": the checks of mgjax.data.prompts over the kept generation samples,
                   "review": what the data config's review file did (mgjax.data.verdicts), when it names one
  data_card.md     the same as tables, with the plots
  records_by_source.png, token_lengths.png, turns_per_conversation.png

Plots are drawn on bare matplotlib Figures (no pyplot), so building never touches a
notebook's backend.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable, Sequence

from etils import epath
from matplotlib.figure import Figure
import numpy as np

from mgjax import atomic
from mgjax.data import filters, prompts
from mgjax.data.records import CATEGORIES

PLOTS = ("records_by_source.png", "token_lengths.png", "turns_per_conversation.png")
# Training lengths the card counts longer conversations against (data.seq_len's usual
# values), beside the data config's own `seq_len` when it names one.
SEQ_LENS = (512, 1024, 2048, 4096)
_CHUNK = 1024  # records whose text is counted at once


def _token_counter(tokenizer_dir: str | None) -> tuple[filters.TokenCounter, str]:
  if tokenizer_dir:
    return filters.tokenizer_counter(tokenizer_dir), f"tokens of {tokenizer_dir}"
  return filters.pretoken_counter(), "byte-level pre-tokens (no tokenizer configured)"


def _stats(values: list[int]) -> dict[str, float]:
  if not values:
    return {"n": 0}
  a = np.asarray(values)
  return {
      "n": int(a.size),
      "mean": round(float(a.mean()), 1),
      "p50": int(np.percentile(a, 50)),
      "p95": int(np.percentile(a, 95)),
      "max": int(a.max())
  }


def over_seq_len(tokens: dict[str, dict[str, list[int]]], seq_lens: Sequence[int]) -> dict[str, dict[str, int]]:
  """{split: {seq_len: conversations longer than it}} from the card's per-record lengths."""
  return {
      split: {
          str(n): sum(length > n for lengths in cats.values() for length in lengths) for n in seq_lens
      } for split, cats in tokens.items()
  }


def summarize(splits: dict[str, Sequence[Any]], tokenizer_dir: str | None,
              messages: Callable[[Any], list[dict[str, str]]], seq_len: int | None = None) -> dict[str, Any]:
  """Composition, token lengths and turn counts of the splits, and how many conversations
  are longer than each of SEQ_LENS and `seq_len` (the length training will cut at).

  Split items need `category` and `source`; `messages(item)` gives an item's turns (read
  from disk in a build, a chunk at a time, so no split's text is held whole).
  """
  count, unit = _token_counter(tokenizer_dir)
  composition = {s: {} for s in splits}
  tokens: dict[str, dict[str, list[int]]] = {s: collections.defaultdict(list) for s in splits}
  turns: dict[str, dict[str, list[int]]] = {s: collections.defaultdict(list) for s in splits}
  for split, items in splits.items():
    for start in range(0, len(items), _CHUNK):
      chunk = items[start:start + _CHUNK]
      turns_of = [messages(r) for r in chunk]
      lengths = count(["\n".join(m["content"] for m in ms) for ms in turns_of])
      for r, ms, n in zip(chunk, turns_of, lengths):
        composition[split].setdefault(r.category, collections.Counter())[r.source] += 1
        turns[split][r.category].append(len(ms))
        tokens[split][r.category].append(n)
  return {
      "composition": {
          s: {
              c: dict(sorted(v.items())) for c, v in sorted(cats.items())
          } for s, cats in composition.items()
      },
      "token_unit": unit,
      "tokens": {
          s: {
              c: _stats(v) for c, v in sorted(cats.items())
          } for s, cats in tokens.items()
      },
      "turns": {
          s: {
              c: dict(sorted(collections.Counter(v).items())) for c, v in sorted(cats.items())
          } for s, cats in turns.items()
      },
      "over_seq_len": over_seq_len(tokens, sorted({*SEQ_LENS, *([int(seq_len)] if seq_len else [])})),
      "_raw_tokens": tokens,
  }


def _plot_records(out: epath.Path, composition: dict[str, dict[str, dict[str, int]]]) -> None:
  sources = sorted({s for cats in composition.values() for by in cats.values() for s in by})
  fig = Figure(figsize=(8, 0.5 + 0.45 * max(len(sources), 1)))
  ax = fig.add_subplot()
  left = np.zeros(len(sources))
  for cat in CATEGORIES:
    n = np.array([
        sum(composition[s].get(cat, {}).get(src, 0) for s in composition if s != "train_generation") for src in sources
    ])
    ax.barh(np.arange(len(sources)), n, left=left, label=cat)
    left += n
  # Names as written: matplotlib would read "$...$" in a source's name as math, and stop
  # the build on math it cannot parse.
  ax.set_yticks(np.arange(len(sources)), sources, parse_math=False)
  ax.set_xlabel("records (train, with mixing, + validation)")
  ax.set_title("Records by source and category")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(str(out / "records_by_source.png"), dpi=100)


def _plot_tokens(out: epath.Path, tokens: dict[str, dict[str, list[int]]], unit: str) -> None:
  fig = Figure(figsize=(8, 4))
  ax = fig.add_subplot()
  for cat in CATEGORIES:
    values = [n for s, cats in tokens.items() if s != "train_generation" for n in cats.get(cat, [])]
    if values:
      ax.hist(values, bins=40, alpha=0.6, label=f"{cat} (n={len(values)})")
  ax.set_xlabel(f"conversation length ({unit})", parse_math=False)  # the unit names a tokenizer's path
  ax.set_ylabel("records")
  ax.set_title("Token lengths by category")
  ax.legend()
  fig.tight_layout()
  fig.savefig(str(out / "token_lengths.png"), dpi=100)


def _plot_turns(out: epath.Path, turns: dict[str, dict[str, dict[int, int]]]) -> None:
  fig = Figure(figsize=(8, 4))
  ax = fig.add_subplot()
  width = 0.8 / len(CATEGORIES)
  for i, cat in enumerate(CATEGORIES):
    hist = collections.Counter()
    for s, cats in turns.items():
      if s != "train_generation":
        hist.update(cats.get(cat, {}))
    if hist:
      xs = sorted(hist)
      ax.bar(np.array(xs) + (i - 1) * width, [hist[x] for x in xs], width=width, label=cat)
  ax.set_xlabel("turns per conversation")
  ax.set_ylabel("records")
  ax.set_title("Turns per conversation")
  ax.legend()
  fig.tight_layout()
  fig.savefig(str(out / "turns_per_conversation.png"), dpi=100)


def _markdown(card: dict[str, Any]) -> str:
  lines = [
      f"# Data card: {card['name']} {card['version']}", "", "## Sources", "",
      "Every record read is kept, rejected (with its reason in `rejected.jsonl`) or a "
      "duplicate of an earlier one (also in `rejected.jsonl`, with the id it duplicates).", "",
      "| source | format | read | kept | rejected | duplicates |", "| --- | --- | ---: | ---: | --- | ---: |"
  ]
  for name, s in card["sources"].items():
    rejected = ", ".join(f"{k}: {v}" for k, v in s["rejected"].items()) or "0"
    dups = ", ".join(f"{k}: {v}" for k, v in s["duplicate_kinds"].items())
    lines.append(f"| {name} | {s['format']} | {s['read']} | {s['kept']} | {rejected} | "
                 f"{s['duplicates']}{f' ({dups})' if dups else ''} |")
  lines += [
      "", f"## Mixing (by {card['mixing']['by']})", "",
      "Validation sets were held out per category (stratified by source) before mixing. A factor above 1 "
      "repeats records (upsampling), below 1 samples them (downsampling).", "",
      "| group | available for training | target | taken | factor |", "| --- | ---: | ---: | ---: | ---: |"
  ]
  for g, m in card["mixing"]["groups"].items():
    lines.append(f"| {g} | {m['available']} | {m['target']} | {m['taken']} | {m['factor']} |")
  lines += ["", "## Splits", "", "| split | records | by category and source |", "| --- | ---: | --- |"]
  for split, n in card["splits"].items():
    comp = "; ".join(
        f"{c}: " + ", ".join(f"{s} {k}" for s, k in by.items()) for c, by in card["composition"][split].items())
    lines.append(f"| {split} | {n} | {comp} |")
  lines += [
      "", f"## Lengths ({card['token_unit']}, whole conversation)", "",
      "| split | category | n | mean | p50 | p95 | max |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  ]
  for split, cats in card["tokens"].items():
    for c, st in cats.items():
      lines.append(f"| {split} | {c} | {st['n']} | {st.get('mean', '')} | {st.get('p50', '')} | "
                   f"{st.get('p95', '')} | {st.get('max', '')} |")
  lengths = list(next(iter(card["over_seq_len"].values()), {}))
  lines += [
      "", "Conversations longer than a training length (data.seq_len) are cut or dropped (data.truncation); "
      "these counts are of the text alone: the chat template and image tokens come on top.", "",
      "| split | " + " | ".join(f"> {n}" for n in lengths) + " |", "| --- |" + " ---: |" * len(lengths)
  ]
  for split, over in card["over_seq_len"].items():
    lines.append(f"| {split} | " + " | ".join(str(over[n]) for n in lengths) + " |")
  lines += _markdown_checks(card)
  lines += [
      "", "![records by source](records_by_source.png)", "", "![token lengths](token_lengths.png)", "",
      "![turns per conversation](turns_per_conversation.png)", ""
  ]
  return "\n".join(lines)


def _markdown_checks(card: dict[str, Any]) -> list[str]:
  """The generation prompt checks and the review's effect, as Markdown lines."""
  g = card["generation_prompts"]
  cov = g["coverage"]
  low, n_low = prompts.low_count(cov)
  lines = [
      "", "## Generation prompts", "",
      f"{g['requests']} image requests in the kept generation samples: {g['missing_prompt']} without a "
      f"`<h>...</h>` prompt, {g['empty_prompt']} with an empty one; language checked on {g['language']['checked']}, "
      f"unexpected on {g['language']['unexpected']}; coverage of the request's content words: mean {cov['mean']}, "
      f"p10 {cov['p10']}, {n_low} below {low}; "
      f"{g['repeated']['prompts']} prompts answer {g['repeated']['min_requests']}+ different requests "
      f"({g['repeated']['records']} records)."
  ]
  review = card.get("review")
  if review:
    lines += [
        "", "## Review", "",
        f"`{review['file']}`: {review['verdicts']} verdicts ({review['keep']} keep, {review['drop']} drop); "
        f"applied: {review['applied']['dropped']} dropped (rejected as `review`), {review['applied']['kept']} kept" +
        (" (against " + ", ".join(f"{k}: {v}" for k, v in review["kept_against"].items()) +
         ")" if review["kept_against"] else "") + f"; {len(review['refused'])} keep verdicts refused (structural "
        f"problems); {review['not_found']} ids no longer found" +
        (": " + ", ".join(f"`{i}`" for i in review["not_found_ids"][:10]) if review["not_found"] else "") + "."
    ]
  return lines


def write(out: epath.Path, *, name: str, version: str, sources: dict[str, Any], splits: dict[str, Sequence[Any]],
          mixing: dict[str, Any], mix_by: str, kept: Sequence[Any], tokenizer_dir: str | None,
          messages: Callable[[Any], list[dict[str, str]]], review: dict[str, Any] | None = None,
          qualities: dict[str, filters.QualityConfig] | None = None, seq_len: int | None = None,
          prompt_checks: prompts.Settings | None = None) -> dict[str, Any]:
  """Writes the plots, data_card.md and, last, data_card.json (which marks a finished build).

  `splits` and `kept` hold records or spill entries; `messages` gives one's turns.
  `review` is the review file's report; `qualities` the sources' filter settings (for the
  expected language of generation prompts); `seq_len` (the data config's, if any) a
  training length the conversations' lengths are compared with."""
  out = epath.Path(out)
  summary = summarize(splits, tokenizer_dir, messages, seq_len)
  raw_tokens = summary.pop("_raw_tokens")
  card = {
      "name": name,
      "version": version,
      "sources": sources,
      "splits": {
          s: len(v) for s, v in splits.items()
      },
      "categories": dict(collections.Counter(r.category for r in kept)),
      "mixing": {
          "by": mix_by,
          "groups": mixing
      },
      **summary,
      "tokenizer": tokenizer_dir,
      "plots": list(PLOTS),
      "generation_prompts": prompts.report(((r.id, r.source, messages(r)) for r in kept if r.category == "generation"),
                                           qualities, prompt_checks),
  }
  if review is not None:
    card["review"] = review
  for s in sources.values():
    # The promise a reader of the card relies on; a failure here is a bug in the builder.
    if s["read"] != s["kept"] + sum(s["rejected"].values()) + s["duplicates"]:
      raise RuntimeError(f"builder bug: a source's counts do not add up (read != kept + rejected + duplicates): {s}")
  _plot_records(out, summary["composition"])
  _plot_tokens(out, raw_tokens, summary["token_unit"])
  _plot_turns(out, summary["turns"])
  (out / "data_card.md").write_text(_markdown(card))
  # Whole or not at all: a card cut short would mark a finished build that no one can read.
  atomic.write_bytes(out / "data_card.json", json.dumps(card, indent=1).encode())
  return card
