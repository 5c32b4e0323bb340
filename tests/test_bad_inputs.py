"""Bad inputs never crash or hang the dataset builder or the weight converter.

Every bad record is rejected with its file, its place in the file and a reason, while the
good records around it are built, and the data card still adds up (read = kept +
rejected + duplicates). Bad configs (a source path that is a directory or a FIFO, a
tokenizer that is not on disk) stop the build at once, saying what to fix.
"""

import gzip
import itertools
import json
import logging
import os
import pathlib
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mgjax import locks
from mgjax.convert import files
from mgjax.convert.files import WeightsError
from mgjax.data import build, datasets, sources
from test_data_sources import _msg  # an OpenAssistant message, as the reader tests write them

REPO = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ bad records

_WORDS = ("apple river stone cloud green tiger paper seven window garden music silver orange bridge "
          "candle forest winter summer rocket planet yellow circle square market").split()
_texts = itertools.count()


def _text(kind):
  """A sentence no other call returns, far from every other one (so none is a duplicate)."""
  return f"{kind} " + " ".join(random.Random(next(_texts)).choices(_WORDS, k=12)) + "?"


def _lima_line(k):
  del k
  return json.dumps({"conversations": [_text("Question"), _text("Answer")]})


def _llava(k, **over):
  return {
      "id": f"ok{k}",
      "conversations": [{
          "from": "human",
          "value": _text("Question")
      }, {
          "from": "gpt",
          "value": _text("Answer")
      }],
      **over
  }


def _tree(k, **prompt_over):
  return {
      "message_tree_id": f"t{k}",
      "prompt": _msg(f"p{k}", "prompter", _text("Question"),
                     replies=[_msg(f"a{k}", "assistant", _text("Answer"), rank=0)], **prompt_over)
  }


def _flat(k, **over):
  """One question-answer tree of the flat message export, as two lines."""
  return [
      json.dumps({
          "message_id": f"fp{k}",
          "parent_id": None,
          "role": "prompter",
          "text": _text("Question"),
          "lang": "en",
          "message_tree_id": f"ft{k}",
          **over
      }),
      json.dumps({
          "message_id": f"fa{k}",
          "parent_id": f"fp{k}",
          "role": "assistant",
          "text": _text("Answer"),
          "lang": "en",
          "rank": 0
      })
  ]


def _deep_flat_chain(n):
  rows, parent = [], None
  for i in range(n):
    rows.append(
        json.dumps({
            "message_id": f"c{i}",
            "parent_id": parent,
            "role": "prompter" if i % 2 == 0 else "assistant",
            "text": f"turn {i} {_WORDS[i % 24]}",
            "lang": "en"
        }))
    parent = f"c{i}"
  return rows


def _lines(*rows):
  return ("\n".join(rows) + "\n").encode()


def _png(path):
  Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


# name -> (format, file name, file bytes, options, expected rejections [(record, kind)], records kept)
CASES = {
    "llava_from_list": ("llava_json", "from_list.json",
                        json.dumps([
                            _llava(0),
                            _llava(1, conversations=[{
                                "from": ["human"],
                                "value": "q"
                            }, {
                                "from": "gpt",
                                "value": "a"
                            }]),
                            _llava(2)
                        ]).encode(), {}, [("record 1 (id=ok1)", "bad_role")], 2),
    "llava_from_dict": ("llava_json", "from_dict.json",
                        json.dumps([
                            _llava(0),
                            _llava(1, conversations=[{
                                "from": {
                                    "a": 1
                                },
                                "value": "q"
                            }, {
                                "from": "gpt",
                                "value": "a"
                            }]),
                            _llava(2)
                        ]).encode(), {}, [("record 1 (id=ok1)", "bad_role")], 2),
    "llava_nul_image_path":
        ("llava_json", "nul.json", json.dumps([_llava(0), _llava(1, image="a\u0000.png"),
                                               _llava(2)]).encode(), {
                                                   "image_root": "images"
                                               }, [("record 1 (id=ok1)", "bad_image_path")], 2),
    "llava_fifo_image": ("llava_json", "fifo_image.json",
                         json.dumps([_llava(0, image="good.png"),
                                     _llava(1, image="pipe.png"),
                                     _llava(2)]).encode(), {
                                         "image_root": "images"
                                     }, [("record 1 (id=ok1)", "missing_image")], 2),
    "llava_lone_surrogate":
        ("llava_json", "surrogate.json",
         ("[" + json.dumps(_llava(0)) + ', {"id": "s", "conversations": [{"from": "human", '
          '"value": "bad \\ud800 text"}, {"from": "gpt", "value": "a"}]}, ' + json.dumps(_llava(2)) + "]").encode(), {},
         [("record 1 (id=s)", "not_utf8")], 2),
    "llava_surrogate_id":
        ("llava_json", "surrogate_id.json",
         ("[" + json.dumps(_llava(0)) + ", " + json.dumps(_llava(1))[:-1].replace('"ok1"', '"\\udc00x"') + "}, " +
          json.dumps(_llava(2)) + "]").encode(), {}, [("record 1 (id=\uffffx)", "not_utf8")], 2),
    "llava_100k_deep":
        ("llava_json", "deep.json", ("[" + json.dumps(_llava(0)) + ', {"id": "deep", "conversations": ' +
                                     "[" * 100_000 + "]" * 100_000 + "}, " + json.dumps(_llava(2)) + "]").encode(), {},
         [("record 1", "bad_schema")], 2),
    # 1 x 100000 pixels: a few hundred bytes, billions of pixels once resized for a tower.
    "llava_strip_image": ("llava_json", "strip.json",
                          json.dumps([_llava(0, image="good.png"),
                                      _llava(1, image="strip.png"),
                                      _llava(2)]).encode(), {
                                          "image_root": "images"
                                      }, [("record 1 (id=ok1)", "bad_image_size")], 2),
    # Valid JSON as Python writes it: a BOM, NaN, Infinity and integers past 64 bits lose nothing.
    "llava_nan_and_big_ints":
        ("llava_json", "nan.json", b"\xef\xbb\xbf" +
         json.dumps([_llava(0, score=float("nan")),
                     _llava(1, n=2**64, m=[float("inf"), -float("inf")]),
                     _llava(2)]).encode(), {}, [], 3),
    "llava_not_gzip":
        ("llava_json", "plain.json.gz", json.dumps([_llava(0)]).encode(), {}, [("whole file", "unreadable_file")], 0),
    "lima_lone_surrogate": ("lima", "surrogate.jsonl",
                            _lines(_lima_line(0), '{"conversations": ["bad \\ud800", "answer"]}',
                                   _lima_line(2)), {}, [("line 2", "not_utf8")], 2),
    "lima_4301_digits": ("lima", "digits.jsonl",
                         _lines(_lima_line(0), '{"conversations": ["Q", "A"], "n": ' + "9" * 4301 + "}",
                                _lima_line(2)), {}, [("line 2", "invalid_json")], 2),
    "lima_not_gzip": ("lima", "plain.jsonl.gz", _lines(_lima_line(0)), {}, [("whole file", "unreadable_file")], 0),
    "lima_truncated_gzip": ("lima", "cut.jsonl.gz", gzip.compress(_lines(*[_lima_line(k) for k in range(400)]))[:2000],
                            {}, None, None),  # checked below: the lines before the cut are kept
    "oasst_lang_list": ("oasst_trees", "lang.jsonl",
                        _lines(json.dumps(_tree(0)), json.dumps(_tree(1, lang=["en"])),
                               json.dumps(_tree(2))), {}, [("line 2 (tree t1)", "bad_schema")], 2),
    "oasst_role_list": ("oasst_trees", "role.jsonl",
                        _lines(
                            json.dumps(_tree(0)),
                            json.dumps({
                                "message_tree_id": "t1",
                                "prompt": _msg("p", ["prompter"], "Q", replies=[_msg("a", "assistant", "A", rank=0)])
                            }), json.dumps(_tree(2))), {}, [("line 2 (tree t1)", "bad_schema")], 2),
    "oasst_mixed_rank":
        ("oasst_trees", "rank.jsonl",
         _lines(
             json.dumps(_tree(0)),
             json.dumps({
                 "message_tree_id": "t1",
                 "prompt": _msg("p", "prompter", "Q",
                                replies=[_msg("a", "assistant", "A", rank=0),
                                         _msg("b", "assistant", "B", rank="1")])
             }), json.dumps(_tree(2))), {}, [("line 2 (tree t1)", "bad_schema")], 2),
    "oasst_3000_deep_tree": ("oasst_trees", "deep.jsonl", None, {}, [("line 2", "invalid_json")], 2),
    "oasst_flat_parent_list":
        ("oasst_messages", "parent_list.jsonl",
         _lines(*_flat(0), json.dumps({
             "message_id": "x",
             "parent_id": ["fp0"],
             "role": "assistant",
             "text": "A"
         }), *_flat(1)), {}, [("line 3", "bad_schema")], 2),
    # 8 lines: two good trees, a message that is its own parent, a two-message loop and a
    # reply under the loop; every line is accounted for.
    "oasst_flat_cycles":
        ("oasst_messages", "cycles.jsonl",
         _lines(*_flat(0), json.dumps({
             "message_id": "self",
             "parent_id": "self",
             "role": "prompter",
             "text": "Q"
         }), json.dumps({
             "message_id": "x",
             "parent_id": "y",
             "role": "prompter",
             "text": "Q"
         }), json.dumps({
             "message_id": "y",
             "parent_id": "x",
             "role": "assistant",
             "text": "A"
         }), json.dumps({
             "message_id": "z",
             "parent_id": "y",
             "role": "prompter",
             "text": "Q"
         }), *_flat(1)), {}, [("line 3 (message self)", "parent_cycle"), ("line 4 (message x)", "parent_cycle"),
                              ("line 5 (message y)", "parent_cycle"), ("line 6 (message z)", "parent_cycle")], 2),
    # A rejection whose id spells a lone surrogate is still written to rejected.jsonl.
    "oasst_flat_surrogate_id":
        ("oasst_messages", "surrogate_id.jsonl",
         _lines(*_flat(0), '{"message_id": "\\udc00", "parent_id": "gone", "role": "prompter", "text": "Q"}',
                *_flat(1)), {}, [("line 3 (message \udc00)", "orphan_message")], 2),
    "oasst_flat_3000_deep": ("oasst_messages", "chain.jsonl", _lines(*_flat(0), *_deep_flat_chain(3000)), {}, [], 2),
}


def _write_case(root, name):
  fmt, file, data, opts, _, _ = CASES[name]
  if name == "oasst_3000_deep_tree":
    # Written as text: json.dumps itself cannot nest this deep.
    opening = "".join(f'{{"message_id": "m{i}", "role": "{"prompter" if i % 2 == 0 else "assistant"}", '
                      f'"text": "t", "lang": "en", "rank": 0, "replies": [' for i in range(3000))
    deep = '{"message_tree_id": "deep", "prompt": ' + opening + "]}" * 3000 + "}"
    data = _lines(json.dumps(_tree(0)), deep, json.dumps(_tree(2)))
  (root / file).write_bytes(data)
  spec = dict(name=name, format=fmt, path=file, filters=dict(languages=None))
  if "image_root" in opts:
    spec["image_root"] = opts["image_root"]
  return spec


def _config(root, specs, **over):
  c = ml_collections.ConfigDict()
  c.name = "bad_inputs"
  c.version = "1.0.0"
  c.seed = 0
  # Names no "text" category: a mapping that leaves a category out holds none of it out.
  c.val_per_category = {"understanding": 1}
  c.sources_root = str(root)
  c.sources = specs
  c.tokenizer = ml_collections.ConfigDict(dict(train=False, path=""))
  c.num_workers = 1
  c.min_kept_share = 0  # most of each source is bad on purpose
  c.update(over)
  return c


@pytest.fixture(scope="module")
def table_build(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  (root / "images").mkdir()
  _png(root / "images/good.png")
  Image.new("L", (1, 100_000)).save(root / "images/strip.png")
  os.mkfifo(root / "images/pipe.png")
  specs = [_write_case(root, name) for name in CASES]
  data_dir = tmp_path_factory.mktemp("data")
  # What the build logs, as a UTF-8 log file or terminal would have to take it.
  logged = []
  handler = logging.Handler(level=logging.WARNING)
  handler.emit = lambda record: logged.append(record.getMessage())
  logging.getLogger().addHandler(handler)
  start = time.time()
  try:
    built = build.build(_config(root, specs), str(data_dir))
  finally:
    logging.getLogger().removeHandler(handler)
  elapsed = time.time() - start
  rejected = [json.loads(line) for line in pathlib.Path(built.rejected).read_text().splitlines()]
  card = json.loads(pathlib.Path(built.data_card).read_text())
  return root, built, rejected, card, elapsed, logged


def test_rejection_warnings_can_be_written_as_utf8(table_build):
  """Records spelling lone surrogates (JSON's "\\ud800") are logged as escapes: a UTF-8 log
  file, terminal or pytest-xdist's report channel takes every line."""
  *_, logged = table_build
  rejections = [m for m in logged if m.startswith("rejected: ")]
  assert rejections and any("\\ud800" in m or "\\udc00" in m for m in rejections)
  for message in logged:
    message.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate


def test_the_table_builds_within_seconds(table_build):
  *_, elapsed, _ = table_build
  assert elapsed < 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_record_is_rejected_and_the_good_ones_kept(table_build, name):
  root, _, rejected, card, _, _ = table_build
  _, file, _, _, expected, kept = CASES[name]
  mine = [r for r in rejected if r["source"] == name]
  counts = card["sources"][name]
  assert counts["read"] == counts["kept"] + sum(counts["rejected"].values()) + counts["duplicates"]
  assert all(r["file"] == str(root / file) and r["reason"] for r in mine)
  if name == "lima_truncated_gzip":
    assert counts["kept"] > 5 and [r["kind"] for r in mine] == ["unreadable_file"]
    assert mine[0]["record"] == f"after line {counts['kept']}" and "download it again" in mine[0]["reason"]
    return
  assert sorted((r["record"], r["kind"]) for r in mine) == sorted(expected)
  assert counts["kept"] == kept


def test_parent_cycles_are_counted_line_by_line(table_build):
  _, _, _, card, _, _ = table_build
  # 8 lines: 2 threads kept, the 4 messages no root leads to rejected.
  assert card["sources"]["oasst_flat_cycles"]["read"] == 6


def test_rejection_reasons_say_what_is_wrong(table_build):
  _, _, rejected, _, _, _ = table_build
  reason = {r["source"]: r["reason"] for r in rejected}
  assert "'from' is ['human']" in reason["llava_from_list"]
  assert "NUL byte" in reason["llava_nul_image_path"]
  assert "FIFO" in reason["llava_fifo_image"]
  assert "lone surrogate" in reason["lima_lone_surrogate"]
  assert "nested more than" in reason["llava_100k_deep"]
  assert "rank is '1'" in reason["oasst_mixed_rank"]
  assert "parent_id is ['fp0']" in reason["oasst_flat_parent_list"]
  assert "not in its format" in reason["lima_not_gzip"] and "gzip -t" in reason["lima_not_gzip"]
  assert "aspect ratio of 100000:1" in reason["llava_strip_image"]
  assert "4300 digits" in reason["lima_4301_digits"]


def test_built_splits_hold_the_good_records(table_build):
  _, built, _, _, _, _ = table_build
  ids = set()
  for split in ("train", "val_understanding"):
    ids |= {e["id"].decode() for e in datasets.open_split(built, split)}
  assert {
      "lima_lone_surrogate:1", "lima_lone_surrogate:3", "llava_100k_deep:ok0", "llava_100k_deep:ok2",
      "llava_fifo_image:ok0", "oasst_flat_3000_deep:c0", "llava_nan_and_big_ints:ok1", "llava_strip_image:ok0"
  } <= ids


# ------------------------------------------------------------------------------ bad configs


def _one_source(tmp_path, path, **over):
  spec = dict(name="src", format="lima", path=str(path))
  return _config(tmp_path, [spec], **over)


def test_a_directory_as_source_stops_the_build_naming_it(tmp_path):
  (tmp_path / "dir.jsonl").mkdir()
  with pytest.raises(ValueError, match=r"source 'src': .*dir\.jsonl is a directory"):
    build.build(_one_source(tmp_path, tmp_path / "dir.jsonl"), str(tmp_path / "data"))


def test_a_fifo_as_source_stops_the_build_at_once(tmp_path):
  os.mkfifo(tmp_path / "pipe.jsonl")
  start = time.time()
  with pytest.raises(ValueError, match=r"pipe\.jsonl is a FIFO"):
    build.build(_one_source(tmp_path, tmp_path / "pipe.jsonl"), str(tmp_path / "data"))
  assert time.time() - start < 10
  with pytest.raises(ValueError, match="FIFO"):  # a reader called directly refuses it too
    list(sources.read(str(tmp_path / "pipe.jsonl"), format="lima", source="s"))


def test_a_source_of_blank_lines_explains_itself(tmp_path):
  (tmp_path / "blank.jsonl").write_text("\n\n  \n")
  with pytest.raises(
      ValueError, match=r"source 'src' \(.*blank\.jsonl\): no records at all \(an empty file, or "
      r"only blank lines\)"):
    build.build(_one_source(tmp_path, tmp_path / "blank.jsonl"), str(tmp_path / "data"))


def test_a_source_of_only_rejected_records_lists_them(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n')
  with pytest.raises(ValueError, match=r"read 1, rejected \{'empty_conversation': 1\}(.|\n)*line 1: empty"):
    build.build(_one_source(tmp_path, tmp_path / "bad.jsonl"), str(tmp_path / "data"))


def test_a_source_named_with_dollar_signs_builds_its_card(tmp_path):
  # matplotlib reads "$...$" as math; this is math it cannot parse.
  name = r"prices in $ and $\frac{$"
  (tmp_path / "ok.jsonl").write_bytes(_lines(*[_lima_line(k) for k in range(4)]))
  cfg = _one_source(tmp_path, tmp_path / "ok.jsonl")
  cfg.sources[0]["name"] = name
  built = build.build(cfg, str(tmp_path / "data"))
  card = json.loads(pathlib.Path(built.data_card).read_text())
  assert card["sources"][name]["kept"] == 4
  assert all((pathlib.Path(built.data_card).parent / plot).stat().st_size > 1000 for plot in card["plots"])


@pytest.mark.parametrize("path", ["gpt2", "meta-llama/Llama-3-8B", "/no/such/tokenizer"])
def test_a_tokenizer_not_on_disk_stops_the_build_with_what_to_download(tmp_path, path):
  (tmp_path / "ok.jsonl").write_bytes(_lines(_lima_line(0)))
  cfg = _one_source(tmp_path, tmp_path / "ok.jsonl", num_workers=2)
  cfg.tokenizer = ml_collections.ConfigDict(dict(train=False, path=path))
  start = time.time()
  with pytest.raises(FileNotFoundError, match=r"not a local folder(.|\n)*huggingface-cli download"):
    build.build(cfg, str(tmp_path / "data"))
  assert time.time() - start < 10


def test_a_worker_that_cannot_start_stops_the_build_with_the_cause(tmp_path):
  # A folder that looks like a tokenizer but is not one: the workers fail to load it.
  (tmp_path / "tok").mkdir()
  (tmp_path / "tok/tokenizer.json").write_text("{")
  (tmp_path / "ok.jsonl").write_bytes(_lines(*[_lima_line(k) for k in range(3)]))
  cfg = _one_source(tmp_path, tmp_path / "ok.jsonl", num_workers=2)
  cfg.tokenizer = ml_collections.ConfigDict(dict(train=False, path=str(tmp_path / "tok")))
  start = time.time()
  with pytest.raises(RuntimeError, match="a build worker process could not start: "):
    build.build(cfg, str(tmp_path / "data"))
  assert time.time() - start < 30


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mgjax import locks
    with locks.exclusive(sys.argv[1], sys.argv[2], "the first build"):
      print("locked", flush=True)
      time.sleep(60)
""")


def test_a_second_build_into_the_same_data_dir_is_refused(tmp_path):
  (tmp_path / "ok.jsonl").write_bytes(_lines(_lima_line(0)))
  cfg = _one_source(tmp_path, tmp_path / "ok.jsonl")
  data_dir = str(tmp_path / "data")
  first = subprocess.Popen(
      [sys.executable, "-c", _HOLD_LOCK, data_dir, build.lock_name(cfg)], stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert first.stdout.readline().strip() == "locked"
    with pytest.raises(
        locks.LockHeld, match=rf"data_dir .*data \(a build of bad_inputs 1.0.0\) is in use by another "
        rf"process: pid {first.pid} on"):
      build.build(cfg, data_dir)
    assert not (tmp_path / "data/mgjax_instructions").exists()  # refused before touching anything
  finally:
    first.kill()
    first.wait()
  # A lock whose holder died is free: flock locks end with their process.
  assert build.build(cfg, data_dir).splits["train"] == 1


# ------------------------------------------------------------------------------ bad weights


def _safetensors(header, body: bytes) -> bytes:
  raw = json.dumps(header).encode()
  return struct.pack("<Q", len(raw)) + raw + body


_F32 = np.arange(6, dtype=np.float32).tobytes()
SAFETENSORS = {
    "offsets past the end": ({
        "w": {
            "dtype": "F32",
            "shape": [2, 3],
            "data_offsets": [0, 48]
        }
    }, _F32 * 2 + b"", r"tensor w: shape \[2, 3\] of F32 needs 24 bytes"),
    "truncated body": ({
        "w": {
            "dtype": "F32",
            "shape": [2, 3],
            "data_offsets": [0, 24]
        }
    }, _F32[:10], r"tensor w: data_offsets \[0, 24\] end past the file's 10 bytes.*truncated"),
    "mismatched offsets": ({
        "w": {
            "dtype": "F32",
            "shape": [2, 3],
            "data_offsets": [0, 20]
        }
    }, _F32, r"tensor w: shape \[2, 3\] of F32 needs 24 bytes but data_offsets \[0, 20\] hold 20"),
    "negative offsets": ({
        "w": {
            "dtype": "F32",
            "shape": [2, 3],
            "data_offsets": [-24, 0]
        }
    }, _F32, r"tensor w: data_offsets \[-24, 0\] are not \[begin, end\]"),
    "huge shape": ({
        "w": {
            "dtype": "F32",
            "shape": [2**40, 2**40],
            "data_offsets": [0, 24]
        }
    }, _F32, r"tensor w: shape \[1099511627776, 1099511627776\] of F32 needs"),
    "header is a list": ([{
        "w": 1
    }], _F32, r"header is a JSON list, expected an object"),
    "lacks dtype": ({
        "w": {
            "shape": [2, 3],
            "data_offsets": [0, 24]
        }
    }, _F32, r"tensor w: header entry lacks \['dtype'\]"),
    "overlapping": ({
        "a": {
            "dtype": "F32",
            "shape": [6],
            "data_offsets": [0, 24]
        },
        "b": {
            "dtype": "F32",
            "shape": [3],
            "data_offsets": [12, 24]
        }
    }, _F32, r"tensors a and b overlap"),
    "unknown dtype": ({
        "w": {
            "dtype": ["F32"],
            "shape": [6],
            "data_offsets": [0, 24]
        }
    }, _F32, r"tensor w: dtype \['F32'\] is not one mgjax reads"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_damaged_safetensors_name_the_file_and_tensor(tmp_path, case):
  header, body, message = SAFETENSORS[case]
  file = tmp_path / "model.safetensors"
  file.write_bytes(_safetensors(header, body))
  with pytest.raises(WeightsError, match=message) as e:
    files.load_tensors(str(file))
  assert str(file) in str(e.value)


def test_a_cut_header_is_named(tmp_path):
  file = tmp_path / "model.safetensors"
  file.write_bytes(_safetensors({"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, _F32)[:30])
  with pytest.raises(WeightsError, match="truncated"):
    files.load_tensors(str(file))


_GOOD_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64
}
CONFIGS = {
    "missing num_hidden_layers": ({
        k: v for k, v in _GOOD_CONFIG.items() if k != "num_hidden_layers"
    }, r"num_hidden_layers is missing"),
    "missing vocab_size": ({
        k: v for k, v in _GOOD_CONFIG.items() if k != "vocab_size"
    }, r"vocab_size is missing"),
    "missing num_attention_heads": ({
        k: v for k, v in _GOOD_CONFIG.items() if k != "num_attention_heads"
    }, r"num_attention_heads is missing"),
    "layers as a string": ({
        **_GOOD_CONFIG, "num_hidden_layers": "32"
    }, r"num_hidden_layers is '32' \(str\), expected a positive integer"),
    "a list": ([_GOOD_CONFIG], r"holds a JSON list, expected an object"),
    "nested text_config": ({
        "model_type": "mgm",
        "text_config": {
            **_GOOD_CONFIG, "vocab_size": 1.5
        }
    }, r"text_config\.vocab_size is 1\.5"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_json_names_the_file_and_key(tmp_path, case):
  config, message = CONFIGS[case]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightsError, match=message) as e:
    files.read_config(str(tmp_path))
  assert str(tmp_path / "config.json") in str(e.value)


class _RunsCode:

  def __reduce__(self):
    return (os.system, ("echo this must never run",))


def test_a_malicious_pickle_is_refused_even_when_pickles_are_allowed(tmp_path):
  torch = pytest.importorskip("torch")
  file = tmp_path / "pytorch_model.bin"
  torch.save({"w": torch.zeros(2), "x": _RunsCode()}, file)
  with pytest.raises(WeightsError, match=r"holds more than tensors \(.*system.*\).*safetensors") as e:
    files.load_tensors(str(file), allow_pickle=True)
  assert "weights_only" not in str(e.value)
  raw = tmp_path / "raw.bin"
  raw.write_bytes(pickle.dumps({"x": _RunsCode()}))
  with pytest.raises(WeightsError, match="holds more than tensors") as e:
    files.load_tensors(str(raw), allow_pickle=True)
  assert "weights_only" not in str(e.value)
  garbage = tmp_path / "garbage.bin"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(WeightsError, match="garbage.bin"):
    files.load_tensors(str(garbage), allow_pickle=True)


def test_a_missing_llm_tokenizer_names_the_field_and_what_writes_it(tmp_path):
  """model.tokenizer (an imported LLM's own) that is not there stops the run at once, before
  any data work, saying which field and what command writes that folder."""
  from conftest import tiny_config
  from mgjax import train

  config = tiny_config(1, str(tmp_path / "data"), steps=1)
  config.model.tokenizer = "models/SmolLM2-135M-Instruct"
  with pytest.raises(FileNotFoundError, match=r"model\.tokenizer='models/SmolLM2-135M-Instruct' is not a folder.*"
                     r"fetch-smollm2"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists()
