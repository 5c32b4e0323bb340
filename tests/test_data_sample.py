"""The generated sample sources: deterministic by seed, in the real formats, learnable."""

import io
import json
import pathlib
import re

from PIL import Image

from mgjax.data import sample, sources
from mgjax.data.records import Record, Rejection

SIZES = dict(n_understanding=40, n_generation=30, n_text=40)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_content(tmp_path):
  sample.write_sample_sources(str(tmp_path / "a"), seed=3, **SIZES)
  sample.write_sample_sources(str(tmp_path / "b"), seed=3, **SIZES)
  sample.write_sample_sources(str(tmp_path / "c"), seed=4, **SIZES)
  a, b, c = (_files(tmp_path / x) for x in "abc")
  assert a == b
  assert a.keys() == c.keys() and a["mgm/understanding.json"] != c["mgm/understanding.json"]


def test_sizes_formats_and_conventions(tmp_path):
  paths = sample.write_sample_sources(str(tmp_path), seed=0, **SIZES)
  und = json.loads(pathlib.Path(paths["understanding"]).read_text())
  assert len(und) == 40
  for rec in und:
    conv = rec["conversations"]
    assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    img = Image.open(io.BytesIO((pathlib.Path(paths["images"]) / rec["image"]).read_bytes()))
    assert img.format == "PNG" and img.size == (128, 128)
  assert any(len(r["conversations"]) > 2 for r in und)  # some multi-turn

  gen = json.loads(pathlib.Path(paths["generation"]).read_text())
  assert len(gen) == 30
  for rec in gen:
    user, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    assert user.endswith(" <GEN>") and "image" not in rec
    assert re.fullmatch(r"<h>[^<>]+</h>", answer)

  lima_rows = [json.loads(l) for l in pathlib.Path(paths["lima"]).read_text().splitlines()]
  trees = [json.loads(l) for l in pathlib.Path(paths["oasst"]).read_text().splitlines()]
  assert len(lima_rows) + len(trees) == 40


def test_generation_prompt_is_a_function_of_the_request(tmp_path):
  # Different phrasings of the same request must map to the same prompt, or the model
  # could not learn it.
  paths = sample.write_sample_sources(str(tmp_path), seed=0, n_understanding=1, n_generation=400, n_text=2)
  by_what = {}
  for rec in json.loads(pathlib.Path(paths["generation"]).read_text()):
    user, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    template = next(
        t for t in sample._REQUESTS if re.fullmatch(re.escape(t).replace(re.escape("{what}"), "(.+)") + " <GEN>", user))
    what = re.fullmatch(re.escape(template).replace(re.escape("{what}"), "(.+)") + " <GEN>", user).group(1)
    by_what.setdefault(what, set()).add(answer)
  assert all(len(answers) == 1 for answers in by_what.values())
  assert len(by_what) > 50


def test_generation_prompts_are_composed_not_copied(tmp_path):
  # A colour asked for by any of its names is written with its one canonical name, which
  # a model can only do by mapping it, not by copying the request's words.
  paths = sample.write_sample_sources(str(tmp_path), seed=0, n_understanding=1, n_generation=400, n_text=2)
  mapped = 0
  for rec in json.loads(pathlib.Path(paths["generation"]).read_text()):
    user, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    for colour, names in sample._COLOUR_WORDS.items():
      for name in names:
        if re.search(rf"\b{re.escape(name)}\b", user.replace("sky-blue", "")):
          assert re.search(rf"\b{colour}\b", answer), (user, answer)
          if name != colour:
            mapped += 1
            assert name not in answer, (user, answer)
    assert answer.endswith(tuple(f"{style}.</h>" for style in sample._STYLES)), answer
  assert mapped > 100


def test_readers_apply_their_rules_to_the_sample(tmp_path):
  paths = sample.write_sample_sources(str(tmp_path), seed=0, n_understanding=2, n_generation=2, n_text=200)
  items = list(sources.read(paths["oasst"], format="oasst_trees", source="oasst"))
  rejected = [r for r in items if isinstance(r, Rejection)]
  assert {r.kind for r in rejected} == {"language"} and len(rejected) == 2  # trees 13 and 63 are German
  texts = [m["content"] for r in items if isinstance(r, Record) for m in r.messages]
  assert "[spam removed by moderators]" not in texts and "Whatever." not in texts
  assert not any(t in ("I am not sure.", "I don't know, sorry.") for t in texts)  # rank-1 alternatives
  raw = pathlib.Path(paths["oasst"]).read_text()
  assert '"deleted": true' in raw and '"rank": 1' in raw and '"review_result": false' in raw

  lima = list(sources.read(paths["lima"], format="lima", source="lima"))
  assert all(isinstance(r, Record) and r.messages[-1]["role"] == "assistant" for r in lima)
  assert "One more question" in pathlib.Path(paths["lima"]).read_text()  # dropped unanswered turns exist
