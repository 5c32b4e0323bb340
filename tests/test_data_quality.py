"""Cleaning: filters, near-duplicate removal, mixing, and a build from a file full of bad input."""

import json
import pathlib
import random

import ml_collections
import pytest
import regex

from mgjax.data import build, datasets, dedup, filters, mixture, sample
from mgjax.data.records import Record

GOOD_PNG = sample.draw([("square", "blue", "center")])
OTHER_PNG = sample.draw([("circle", "red", "top left")])


def _rec(rid, *turns, source="s", category="text", images=()):
  messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
  return Record(id=rid, source=source, category=category, messages=messages, images=list(images))


def _quality(**overrides):
  return filters.Quality(filters.QualityConfig.from_dict(overrides), filters.pretoken_counter())


# ------------------------------------------------------------------------------ filters


def test_normalize_text():
  assert filters.normalize_text("  Cafe\u0301\u00a0au\u200b lait \r\n\r\n\r\n\r\n  indented  \r\nend\ufeff ") == \
      "Caf\u00e9 au lait\n\n  indented\nend"


def test_normalising_removes_every_bidi_control():
  # Unicode's own list (the regex module knows the property), all of it below U+3000.
  controls = regex.findall(r"\p{Bidi_Control}", "".join(map(chr, range(0x10000))))
  assert len(controls) == 12 and "\u202e" in controls and "\u2066" in controls
  # "Trojan Source" text: an override and isolates make it display in another order than
  # it reads.
  text = "access = \u202e\u2066 if admin \u2069\u2066 granted" + "".join(controls)
  assert filters.normalize_text(text) == "access =  if admin  granted"
  assert filters.normalize_text("\u05e9\u05dc\u05d5\u05dd (Hebrew)") == "\u05e9\u05dc\u05d5\u05dd (Hebrew)"


PROSE = ("The committee met on Tuesday to discuss next year's budget, and after a long debate about "
         "roads, schools and the new library, the members agreed to postpone the final vote until "
         "more detailed cost estimates from the city engineers were available for review.")


def test_quality_rules_name_their_kind():
  q = _quality(max_turn_tokens=60, max_conversation_tokens=100, min_turn_tokens=2)
  assert q.problem(_rec("ok", "What happened at the meeting?", PROSE)) == (None, None)
  cases = {
      "turn_too_short": _rec("a", "Why?", "No"),
      "turn_too_long": _rec("b", "Tell me.", PROSE + " " + PROSE),
      "conversation_too_long": _rec("c", "Tell me.", PROSE, "And then?", PROSE),
      "repetition": _rec("d", "Sing.", " ".join(["la la la la la land"] * 9)),
      "language": _rec("e", "Was ist heute passiert?",
                       "Der Ausschuss hat sich am Dienstag getroffen, um den Haushalt zu besprechen."),
      "bad_generation": _rec("f", "Draw a cat. <GEN>", "A cat sitting on a mat."),
      "empty_turn": _rec("g", "Hello?", " \u200b \n "),  # empty only once normalised
      "bad_alternation": Record("h", "s", "text", [{
          "role": "user",
          "content": "Hi there friend"
      }, {
          "role": "user",
          "content": "Anyone here?"
      }, {
          "role": "assistant",
          "content": "Yes, hello."
      }]),
  }
  for kind, record in cases.items():
    reason, got = q.problem(filters.normalize(record))
    assert got == kind, (kind, reason)
  # Short text is never judged by language; a wrong-language rule can be turned off.
  assert q.problem(_rec("i", "Hallo?", "Guten Tag.")) == (None, None)
  assert _quality(languages=None).problem(cases["language"]) == (None, None)
  with pytest.raises(ValueError, match="unknown keys.*max_turns"):
    filters.QualityConfig.from_dict({"max_turns": 3})


def test_repetition_fraction_separates_loops_from_prose():
  assert filters.repeated_fraction(PROSE, 5) == 0.0
  assert filters.repeated_fraction(" ".join(["the cat sat on the mat"] * 5), 5) == pytest.approx(24 / 30)


# ------------------------------------------------------------------------------ dedup


def _variant(i, words=40):
  """A long sentence with word i changed: ~90% of its 5-gram shingles match the original."""
  base = PROSE.split()[:words]
  base[words // 2] = f"changed{i}"
  return " ".join(base)


def test_index_finds_exact_and_near_duplicates_and_respects_images():
  cfg = dedup.DedupConfig(threshold=0.7)
  index = dedup.Index(cfg)
  first = _rec("first", "Summarise the meeting.", PROSE)
  assert index.add("first", dedup.signature(first, cfg)) is None
  # Case and spacing do not make a new record.
  kind, of, _ = index.add("x", dedup.signature(_rec("x", "summarise  THE meeting.", PROSE.upper()), cfg))
  assert (kind, of) == ("exact_duplicate", "first")
  near = _rec("near", "Summarise the meeting.", PROSE.replace("Tuesday", "Wednesday"))
  true_j = dedup.jaccard(dedup.shingles(dedup.words(first), 5), dedup.shingles(dedup.words(near), 5))
  kind, of, sim = index.add("near", dedup.signature(near, cfg))
  assert (kind, of) == ("near_duplicate", "first") and abs(sim - true_j) < 0.15 and true_j > 0.7
  different = _rec("other", "What is the capital of France?", "Paris is the capital of France.")
  assert index.add("other", dedup.signature(different, cfg)) is None
  # The same question about two different pictures is two records; about the same picture, one.
  q = ("<image>\nWhat shape is this?", "A square.")
  assert index.add("img1", dedup.signature(_rec("img1", *q, images=[GOOD_PNG]), cfg)) is None
  assert index.add("img2", dedup.signature(_rec("img2", *q, images=[OTHER_PNG]), cfg)) is None
  assert index.add("img3", dedup.signature(_rec("img3", *q, images=[GOOD_PNG]), cfg))[:2] == \
      ("exact_duplicate", "img1")


def test_lsh_recall_against_all_pairs_on_variants():
  # 8 random 60-word texts, each with 20 copies that have 1-3 words changed (Jaccard
  # about 0.6-0.95 to their original), and 40 unrelated texts. The naive baseline keeps a
  # record unless its exact Jaccard with a record kept before it reaches the threshold;
  # the LSH index must agree on nearly all and flag nothing far below the threshold.
  rng = random.Random(0)
  vocab = [f"w{i}" for i in range(3000)]
  texts = []
  for _ in range(8):
    base = rng.choices(vocab, k=60)
    texts.append(" ".join(base))
    for _ in range(20):
      copy = list(base)
      for pos in rng.sample(range(60), rng.randint(1, 3)):
        copy[pos] = rng.choice(vocab)
      texts.append(" ".join(copy))
  texts += [" ".join(rng.choices(vocab, k=60)) for _ in range(40)]
  recs = [_rec(f"r{i}", "Explain.", t) for i, t in enumerate(texts)]
  sets = [dedup.shingles(dedup.words(r), 5) for r in recs]
  kept, best = [], []
  for i, s in enumerate(sets):
    best.append(max([dedup.jaccard(s, sets[j]) for j in kept], default=0.0))
    if best[-1] < 0.8:
      kept.append(i)
  truth = {i for i, j in enumerate(best) if j >= 0.8}
  cfg = dedup.DedupConfig(threshold=0.8)
  index = dedup.Index(cfg)
  flagged = {i for i, r in enumerate(recs) if index.add(r.id, dedup.signature(r, cfg)) is not None}
  assert len(truth) >= 40 and len(recs) - len(truth) >= 40  # both kinds well represented
  assert len(flagged & truth) / len(truth) >= 0.9
  assert all(best[i] >= 0.65 for i in flagged)


# ------------------------------------------------------------------------------ mixing


def test_hold_out_is_stratified_by_source_and_mix_hits_targets():
  recs = [_rec(f"a{i}", "q", "a", source="a") for i in range(30)] + \
         [_rec(f"b{i}", "q", "a", source="b") for i in range(10)] + \
         [_rec(f"g{i}", "q <GEN>", "<h>p</h>", source="g", category="generation") for i in range(7)]
  pool, val = mixture.hold_out(recs, {"text": 8, "generation": 2, "understanding": 4}, seed=0)
  assert sorted(r.source for r in val["val_text"]) == ["a"] * 6 + ["b"] * 2
  assert len(val["val_generation"]) == 2 and val["val_understanding"] == []
  train, report = mixture.mix(pool, mixture.MixConfig.from_dict({"counts": {"text": 16, "generation": 12}}), 0)
  assert report == {
      "generation": {
          "available": 5,
          "target": 12,
          "taken": 12,
          "factor": 2.4
      },
      "text": {
          "available": 32,
          "target": 16,
          "taken": 16,
          "factor": 0.5
      }
  }
  ids = [r.id for r in train]
  assert len(ids) == len(set(ids)) == 28
  gen = sorted(i.split("#")[0] for i in ids if i.startswith("g"))
  assert all(gen.count(g) in (2, 3) for g in set(gen)) and len(set(gen)) == 5  # every record, then a sample
  held = {r.id for v in val.values() for r in v}
  assert not held & {i.split("#")[0] for i in ids}
  weighted, report = mixture.mix(pool,
                                 mixture.MixConfig.from_dict({
                                     "weights": {
                                         "text": 3,
                                         "generation": 1
                                     },
                                     "total": 40
                                 }), 0)
  assert report["text"]["taken"] == 30 and report["generation"]["taken"] == 10 and len(weighted) == 40
  with pytest.raises(ValueError, match="no training records"):
    mixture.mix(pool, mixture.MixConfig.from_dict({"counts": {"understanding": 3}}), 0)


# ------------------------------------------------------------------------------ a build from bad input


def _bad_input_files(root: pathlib.Path) -> dict[str, str]:
  """A messages_jsonl file with good records and every kind of bad one; {line: expected kind}."""
  images = root / "images"
  images.mkdir(parents=True)
  (images / "good.png").write_bytes(GOOD_PNG)
  (images / "other.png").write_bytes(OTHER_PNG)
  (images / "corrupt.png").write_bytes(GOOD_PNG[:60])  # a truncated download
  (root / "secret.png").write_bytes(GOOD_PNG)

  def conv(*turns, images=None, rid=None):
    row = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}
    if images:
      row["images"] = images
    if rid:
      row["id"] = rid
    return json.dumps(row).encode()

  lines = [
      (conv("<image>\nWhat colour is the square?", "Blue.", images=["good.png"]), None),
      (conv("What happened at the meeting?", PROSE), None),
      (b'{"messages": [{"role": "user", "content": "unterminated', "invalid_json"),
      (conv("<image>\nWhat is this?", "A cat.", images=["missing.png"]), "missing_image"),
      (conv("<image>\nWhat is this?", "A square.", images=["corrupt.png"]), "corrupt_image"),
      (conv("<image>\nWhat is this?", "A square.", images=["../secret.png"]), "image_path_escapes_root"),
      (conv("Hello?", "   "), "empty_turn"),
      (json.dumps({
          "messages": [{
              "role": "human",
              "content": "Hi"
          }, {
              "role": "bot",
              "content": "Yo"
          }]
      }).encode(), "bad_role"),
      (conv("Is this UTF-8?", "No").replace(b"No", b"N\xff\xfeo"), "not_utf8"),
      (conv("Draw a red circle on white. <GEN>", "<h>A red circle on a white background</h>"), None),
      (conv("What happened at the meeting?", PROSE.replace("Tuesday", "Wednesday")), "near_duplicate"),
      (conv("<image>\nWhat colour is the square?", "Blue.", images=["good.png"]), "exact_duplicate"),
      (conv("<image>\nWhat colour is the square?", "Blue.", images=["other.png"]), None),  # other picture
      (conv("Was ist passiert?",
            "Der Ausschuss hat sich am Dienstag getroffen, um den Haushalt zu besprechen."), "language"),
      (conv("Draw a cat. <GEN>", "A cat on a mat."), "bad_generation"),
      (json.dumps({
          "messages": [{
              "role": "assistant",
              "content": "I speak first."
          }, {
              "role": "user",
              "content": "Odd."
          }]
      }).encode(), "bad_alternation"),
  ]
  (root / "chat.jsonl").write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
  return {f"line {i}": kind for i, (_, kind) in enumerate(lines, start=1)}


def test_bad_input_build_keeps_every_good_record_and_explains_every_bad_one(tmp_path):
  sources_dir = tmp_path / "src"
  expected = _bad_input_files(sources_dir)
  cfg = ml_collections.ConfigDict(
      dict(name="bad_input", version="1.0.0", seed=0, sources_root=str(sources_dir), val_per_category=0, num_workers=2,
           sources=[dict(name="chat", format="messages_jsonl", path="chat.jsonl",
                         image_root="images")], tokenizer=dict(train=True, vocab_size=400, path=""),
           min_kept_share=0))  # three in four records are bad on purpose
  dataset = build.build(cfg, str(tmp_path / "data"))

  rejected = [json.loads(l) for l in pathlib.Path(dataset.rejected).read_text().splitlines()]
  got = {r["record"].split(" (")[0]: r["kind"] for r in rejected}
  assert got == {line: kind for line, kind in expected.items() if kind}
  for r in rejected:
    assert r["source"] == "chat" and r["file"] == str(sources_dir / "chat.jsonl") and r["reason"]
  by_kind = {r["kind"]: r for r in rejected}
  assert by_kind["exact_duplicate"]["duplicate_of"] == "chat:1"
  assert by_kind["near_duplicate"]["duplicate_of"] == "chat:2"
  assert "../secret.png" in by_kind["image_path_escapes_root"]["reason"]

  good = {f"chat:{line.split()[1]}" for line, kind in expected.items() if kind is None}
  built_ids = {e["id"].decode() for e in datasets.open_split(dataset, "train")}
  assert built_ids == good
  card = json.loads(pathlib.Path(dataset.data_card).read_text())
  chat = card["sources"]["chat"]
  assert chat["read"] == len(expected) == chat["kept"] + sum(chat["rejected"].values()) + chat["duplicates"]
  assert chat["kept"] == len(good) and chat["duplicates"] == 2
  assert card["splits"]["train"] == len(good) and card["categories"] == {"understanding": 2, "text": 1, "generation": 1}
  out = pathlib.Path(dataset.dataset_dir)
  for png in card["plots"]:
    assert (out / png).read_bytes().startswith(b"\x89PNG")
  md = (out / "data_card.md").read_text()
  assert "| chat | messages_jsonl | 16 | 4 |" in md and "![token lengths](token_lengths.png)" in md


def test_config_mistakes_fail_before_reading(tmp_path):
  (tmp_path / "a.jsonl").write_text("")
  base = dict(name="x", version="1.0.0", seed=0, sources_root=str(tmp_path), val_per_category=0,
              tokenizer=dict(train=True, vocab_size=400, path=""))
  for sources, message in [
      ([dict(name="a", format="lima", path="a.jsonl"),
        dict(name="a", format="lima", path="a.jsonl")], "unique"),
      ([dict(name="a", format="alpaca", path="a.jsonl")], "unknown format 'alpaca'"),
      ([dict(name="a", format="lima", path="nope.jsonl")], "nope.jsonl does not exist"),
      ([dict(name="a", format="lima", path="a.jsonl", filters=dict(min_words=3))], "unknown keys"),
  ]:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      build.build(ml_collections.ConfigDict(dict(base, sources=sources)), str(tmp_path / "data"))


OASST_REAL = pathlib.Path(__file__).resolve().parents[2] / "shared/data/oasst/en_100_tree.jsonl"


@pytest.mark.skipif(
    not OASST_REAL.exists(), reason=f"real OpenAssistant trees not found at {OASST_REAL} "
    "(../shared/data sits beside the repo on dev machines and CI, not in a fresh clone)")
def test_default_filters_keep_every_real_openassistant_thread():
  # Human-written answers with code, lists and song choruses: the default rules must not
  # mistake them for loops, wrong language or broken structure.
  from mgjax.data import sources
  q = _quality()
  threads = [
      r for r in sources.read(str(OASST_REAL), format="oasst_trees", source="oasst", threads="all")
      if isinstance(r, Record)
  ]
  assert len(threads) == 564
  assert [(r.id, q.problem(filters.normalize(r))) for r in threads if q.problem(filters.normalize(r))[0]] == []


def test_mixing_copies_never_take_the_id_of_a_record_of_the_same_source():
  """A source holding both `post` and `post#1`: repeating it names every copy uniquely."""
  import collections

  from mgjax.data import mixture
  from mgjax.data.records import Record

  pool = [
      Record(id=rid, source="forum", category="text", messages=[{
          "role": "user",
          "content": rid
      }]) for rid in ("post", "post#1", "reply")
  ]
  train, report = mixture.mix(pool, mixture.MixConfig.from_dict({"by": "source", "counts": {"forum": 8}}), seed=0)
  ids = [r.id for r in train]
  assert len(ids) == 8 and len(set(ids)) == 8, ids
  assert report["forum"]["taken"] == 8
  # 8 of 3 records: each twice, two of them a third time; copies keep their original's content.
  counts = collections.Counter(r.messages[0]["content"] for r in train)
  assert set(counts) == {"post", "post#1", "reply"} and sorted(counts.values()) == [2, 3, 3]
