"""The review page in a real browser, and a rebuild that honours the verdicts exported from it.

Headless Chromium from the system packages (Debian's chromium and chromium-driver; .ci/run
installs them), driven by Selenium with the system chromedriver named explicitly, so nothing
is downloaded.
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import grain
import pytest

from mgjax import config_files
from mgjax.data import build, datasets, prompts, records, review, verdicts

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

_ODD_ID = "sep\u2028line\u2029para\u0085end"
_LONG = ("The river bends twice before it reaches the old mill, where the water slows and turns green under the "
         "willows. Children fish there in summer, and in winter the pond freezes thick enough to skate on. The "
         "miller's house has a red door, a slate roof and a garden of beans, onions and tall yellow sunflowers.")


def _extra_source(root: pathlib.Path) -> dict:
  """Records that exercise every part of the page: a near-duplicate, a record the language
  filter drops, a generation answer without a prompt, one whose prompt ignores the request,
  and one that cannot be trained on (a blank answer)."""
  rows = [
      ("mill", [("user", "Describe the mill by the river."), ("assistant", _LONG)]),
      ("mill_again", [("user", "Describe the mill by the river."), ("assistant", _LONG.replace("sunflowers",
                                                                                               "roses"))]),
      ("french", [("user", "Peux-tu me décrire le moulin au bord de la rivière, s'il te plaît ?"),
                  ("assistant", "Le moulin se trouve au bord de la rivière, sous les saules, avec une porte rouge "
                   "et un toit d'ardoise.")]),
      ("no_prompt", [("user", "Draw a green hexagon. <GEN>"), ("assistant", "Here is a hexagon for you.")]),
      ("off_prompt", [("user", "Draw a purple elephant wearing a tall hat. <GEN>"),
                      ("assistant", "<h>A red circle on a plain white background, simple vector illustration.</h>")]),
      ("blank_answer", [("user", "Anything to add?"), ("assistant", "   ")]),
      # Ids a person may well have: one ending in "#<n>" like mixing's copies, one holding
      # the line and paragraph separators JSON.stringify leaves as they are.
      ("post#2", [("user", "What colour is a ripe tomato?"), ("assistant", "A ripe tomato is red.")]),
      (_ODD_ID, [("user", "How many legs does a spider have?"), ("assistant", "A spider has eight legs.")]),
  ]
  (root / "extra").mkdir(parents=True, exist_ok=True)
  (root / "extra/messages.jsonl").write_text("".join(
      json.dumps({
          "id": rid,
          "messages": [{
              "role": r,
              "content": c
          } for r, c in turns]
      }) + "\n" for rid, turns in rows))
  # Bad records on purpose: the build must not stop for the share it rejects.
  return dict(name="extra", format="messages_jsonl", path="extra/messages.jsonl", min_kept_share=0)


def _config():
  cfg = config_files.load_config_file(str(REPO / "configs/data/sample.py"), "tiny")
  cfg.name = "sample_review"  # its own dataset folder
  cfg.sample.update(n_understanding=24, n_generation=16, n_text=16, n_caption=8)
  cfg.val_per_category = dict(understanding=4, generation=4, text=4, caption=4)
  cfg.tokenizer.vocab_size = 300
  cfg.num_workers = 1  # a pool costs more than it saves on a build this small
  return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  cfg = _config()
  cfg.sources = list(cfg.sources) + [_extra_source(data_dir / cfg.sample.dir)]
  return cfg, build.build(cfg, str(data_dir))


def _ids(dataset) -> set[str]:
  out = set()
  for split in records.SPLITS:
    ds = grain.MapDataset.source(datasets.open_split(dataset, split))
    out |= {ds[i]["id"].decode() for i in range(len(ds))}
  return out


def _rejected(dataset) -> list[dict]:
  return [json.loads(l) for l in pathlib.Path(dataset.rejected).read_text().splitlines()]


@pytest.fixture(scope="module")
def browser():
  if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver (.ci/run "
                "installs them)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _record(driver, rid):
  from selenium.webdriver.common.by import By
  return driver.find_element(By.CSS_SELECTOR, f'.record[data-id="{rid}"]')


def test_build_keeps_the_turns_and_ids_the_page_needs(built):
  _, dataset = built
  rejected = {r["id"]: r for r in _rejected(dataset) if r["source"] == "extra"}
  assert rejected["extra:mill_again"]["kind"] == "near_duplicate"
  assert rejected["extra:mill_again"]["duplicate_of"] == "extra:mill"
  assert rejected["extra:mill_again"]["messages"][1]["content"].endswith("roses.")
  assert rejected["extra:french"]["kind"] == "language" and rejected["extra:french"]["messages"][0]["role"] == "user"
  assert rejected["extra:no_prompt"]["kind"] == "bad_generation"
  assert rejected["extra:blank_answer"]["kind"] == "empty_turn"
  assert rejected["extra:blank_answer"]["messages"][0]["content"] == "Anything to add?"
  card = json.loads(pathlib.Path(dataset.data_card).read_text())
  g = card["generation_prompts"]
  assert g["requests"] == 16 + 1 and g["missing_prompt"] == 0  # the one without a prompt was rejected
  assert g["low_coverage"][0]["id"] == "extra:off_prompt" and g["low_coverage"][0]["coverage"] == 0.0
  assert "review" not in card and "review" not in json.loads(
      (pathlib.Path(dataset.dataset_dir) / "build_config.json").read_text())


def test_page_in_a_browser_exports_verdicts_that_the_next_build_applies(built, browser, tmp_path):
  from selenium.webdriver.common.by import By

  cfg, dataset = built
  page = review.write(cfg, dataset.data_dir, str(tmp_path / "review.html"), per_group=3)
  browser.get(pathlib.Path(page).as_uri())

  # Records, thumbnails and rejections render.
  assert len(browser.find_elements(By.CSS_SELECTOR, "#kept .record, .grid .record")) > 10
  thumbs = browser.find_elements(By.CSS_SELECTOR, "img.thumb")
  assert thumbs and all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
  kinds = {k.get_attribute("data-kind") for k in browser.find_elements(By.CSS_SELECTOR, ".kind")}
  assert {"language", "bad_generation", "near_duplicate"} <= kinds
  assert "no <h>...</h> prompt" in browser.find_element(By.CSS_SELECTOR, '.kind[data-kind="bad_generation"]').text
  assert browser.find_element(By.CSS_SELECTOR, "mark.prompt").text.startswith("<h>")
  blank = _record(browser, "extra:blank_answer")  # shown, but no verdict can overrule a structural problem
  assert "Anything to add?" in blank.text and not blank.find_elements(By.CSS_SELECTOR, "button")
  assert "0 below 0.5" not in browser.find_element(By.ID, "prompt-summary").text  # the off-prompt request counts
  flagged = browser.find_element(By.ID, "flagged").find_element(By.XPATH, "..").text
  assert "extra:off_prompt" in flagged

  # Keep a record the language filter dropped; drop a kept one, with a note.
  french = _record(browser, "extra:french")
  french.find_element(By.CSS_SELECTOR, "button.keep").click()
  off = _record(browser, "extra:off_prompt")
  off.find_element(By.CSS_SELECTOR, "input.note").send_keys("prompt ignores the request")
  off.find_element(By.CSS_SELECTOR, "button.drop").click()
  assert "v-keep" in french.get_attribute("class") and "v-drop" in off.get_attribute("class")
  assert browser.find_element(By.ID, "count").text == "2"
  browser.find_element(By.ID, "export-btn").click()
  exported = browser.find_element(By.ID, "export").get_attribute("value")
  assert [json.loads(l) for l in exported.splitlines()] == [
      {
          "id": "extra:french",
          "source": "extra",
          "verdict": "keep",
          "note": ""
      },
      {
          "id": "extra:off_prompt",
          "source": "extra",
          "verdict": "drop",
          "note": "prompt ignores the request"
      },
  ]

  # Verdicts survive a reload (kept in the browser), a cleared one too.
  browser.refresh()
  assert browser.find_element(By.ID, "count").text == "2"
  _record(browser, "extra:off_prompt").find_element(By.CSS_SELECTOR, "button.drop").click()  # a second click clears
  browser.refresh()
  assert browser.find_element(By.ID, "count").text == "1"
  assert "v-keep" in _record(browser, "extra:french").get_attribute("class")

  # The next build: the config names the file, with three more verdicts written by hand: keep
  # a near-duplicate, keep a record that cannot be trained on, drop an id that no longer exists.
  review_file = tmp_path / "review.jsonl"
  more = [("extra:mill_again", "keep"), ("extra:blank_answer", "keep"), ("extra:gone", "drop")]
  review_file.write_text(exported +
                         "".join(json.dumps({
                             "id": i,
                             "source": "extra",
                             "verdict": v
                         }) + "\n" for i, v in more))
  cfg.review = str(review_file)
  with pytest.raises(ValueError, match=r"differs in \['review'\]"):  # the old build no longer matches
    datasets.load_built(cfg, dataset.data_dir)
  assert "not the one this build applied; rebuild" in review.Page(cfg, dataset.data_dir).stale
  # New verdicts change the content: replacing the build takes an explicit overwrite.
  with pytest.raises(datasets.ConfigChanged, match=r"differs in \['review'\]\); refusing to overwrite it"):
    build.build(cfg, dataset.data_dir)
  again = build.build(cfg, dataset.data_dir, overwrite=True)
  before, after = _ids(dataset), _ids(again)
  assert after == (before | {"extra:french", "extra:mill_again"}) - {"extra:off_prompt"}
  by_id = {r["id"]: r for r in _rejected(again) if r["id"]}
  assert by_id["extra:off_prompt"]["kind"] == "review"
  assert by_id["extra:off_prompt"]["reason"] == "dropped in review: prompt ignores the request"
  assert "extra:french" not in by_id and "extra:mill_again" not in by_id
  assert by_id["extra:blank_answer"]["kind"] == "empty_turn"  # a keep verdict cannot overrule that
  card = json.loads(pathlib.Path(again.data_card).read_text())
  extra = card["sources"]["extra"]
  assert extra["rejected"] == {"bad_generation": 1, "empty_turn": 1, "review": 1} and extra["duplicates"] == 0
  assert extra["read"] == extra["kept"] + sum(extra["rejected"].values()) + extra["duplicates"]
  assert card["review"] == {
      "file": str(review_file),
      "copy": "review.jsonl",
      "verdicts": 5,
      "keep": 3,
      "drop": 2,
      "applied": {
          "dropped": 1,
          "kept": 2
      },
      "kept_against": {
          "language": 1,
          "near_duplicate": 1
      },
      "refused": [{
          "id": "extra:blank_answer",
          "source": "extra",
          "kind": "empty_turn",
          "reason": "turn 1: empty assistant turn"
      }],
      "not_found": 1,
      "not_found_ids": ["extra:gone"],
  }
  assert datasets.load_built(cfg, dataset.data_dir) is not None
  # The file's content decides, not its path: a moved copy still matches, an edited one does not.
  moved = tmp_path / "moved.jsonl"
  moved.write_bytes(review_file.read_bytes())
  cfg.review = str(moved)
  assert datasets.load_built(cfg, dataset.data_dir) is not None
  with moved.open("a") as f:
    f.write(json.dumps({"id": "extra:mill", "source": "extra", "verdict": "drop"}) + "\n")
  with pytest.raises(ValueError, match=r"differs in \['review'\]"):
    datasets.load_built(cfg, dataset.data_dir)
  cfg.review = str(review_file)
  md = (pathlib.Path(again.dataset_dir) / "data_card.md").read_text()
  assert "applied: 1 dropped (rejected as `review`), 2 kept (against language: 1, near_duplicate: 1); 1 keep verdicts " \
         "refused" in md
  assert "1 ids no longer found: `extra:gone`" in md

  # The page of the new build shows what the review did and starts from its verdicts.
  page = review.write(cfg, dataset.data_dir, str(tmp_path / "review2.html"), per_group=3)
  browser.get(pathlib.Path(page).as_uri())
  assert "dropped 1, kept 2 (against language: 1, near_duplicate: 1)" in browser.find_element(By.ID,
                                                                                              "review-report").text
  assert browser.find_element(By.ID, "count").text == "5" and not browser.find_elements(By.ID, "stale")
  kinds = {k.get_attribute("data-kind") for k in browser.find_elements(By.CSS_SELECTOR, ".kind")}
  assert "review" in kinds and "language" not in kinds


def test_ids_with_a_hash_number_or_line_separators_show_and_export_exactly(built, browser, tmp_path):
  from selenium.webdriver.common.by import By

  cfg, dataset = built
  page = review.write(cfg, dataset.data_dir, str(tmp_path / "odd.html"), per_group=100)
  browser.get(pathlib.Path(page).as_uri())
  browser.execute_script("localStorage.clear()")  # another test's work on this dataset
  browser.refresh()
  assert "ripe tomato" in _record(browser, "extra:post#2").text
  odd = browser.execute_script(
      "return [...document.querySelectorAll('.record')].find((e) => e.dataset.id === arguments[0]);",
      "extra:" + _ODD_ID)
  assert odd is not None and "spider" in odd.text
  odd.find_element(By.CSS_SELECTOR, "button.keep").click()
  note = "legs\u2029counted\u0085twice\u2028"
  browser.execute_script(
      "const n = arguments[0].querySelector('input.note'); n.value = arguments[1];"
      "n.dispatchEvent(new Event('input', {bubbles: true}));", odd, note)
  browser.find_element(By.ID, "export-btn").click()
  exported = browser.find_element(By.ID, "export").get_attribute("value")
  read_back = verdicts.parse(exported.encode(), "review.jsonl")  # every line, the odd one too
  assert read_back[("extra", "extra:" + _ODD_ID)] == verdicts.Verdict("extra:" + _ODD_ID, "extra", "keep", note)
  assert len(read_back) == len(exported.split("\n")) - 1


def test_review_file_errors_name_the_line_and_the_fix(tmp_path):
  bad = tmp_path / "review.jsonl"
  bad.write_text('{"id": "a", "source": "s", "verdict": "keep"}\n{"id": "b", "source": "s", "verdict": "maybe"}\n')
  with pytest.raises(ValueError, match=r"review.jsonl: line 2: verdict 'maybe' is not one of \('keep', 'drop'\)"):
    verdicts.read(str(bad))
  bad.write_text('{"id": "a", "source": "s", "verdict": "keep"}\n{"id": "a", "source": "s", "verdict": "drop"}\n')
  with pytest.raises(ValueError, match="line 2: id 'a' of source 's' is marked drop here and keep on line 1"):
    verdicts.read(str(bad))
  with pytest.raises(FileNotFoundError, match="no such file"):
    verdicts.read(str(tmp_path / "missing.jsonl"))


def test_prompt_coverage_counts_the_requests_content_words():
  assert prompts.content_words("Please draw two red circles on a white background. <GEN>") == [
      "two", "red", "circle", "white", "background"
  ]
  assert prompts.coverage("Draw two red circles. <GEN>", "Two flat red circles, evenly spaced") == 1.0
  assert prompts.coverage("Draw a purple elephant. <GEN>", "A purple square") == 0.5
  checks = prompts.check([{
      "role": "user",
      "content": "Draw a cat. <GEN>"
  }, {
      "role": "assistant",
      "content": "<h> </h>"
  }])
  assert checks[0]["present"] and checks[0]["empty"]


def test_command_line_help_exits_zero():
  result = subprocess.run([sys.executable, "-m", "mgjax.data.review", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and "--per_group" in result.stdout


def test_command_line_prints_the_page_and_nothing_else(data_dir, tmp_path):
  cfg = config_files.load_config_file(str(REPO / "configs/data/sample.py"), "tiny")
  build.ensure_built(cfg, data_dir)
  out = tmp_path / "page.html"
  result = subprocess.run([
      sys.executable, "-m", "mgjax.data.review", "--config=configs/data/sample.py:tiny", f"--data_dir={data_dir}",
      f"--out={out}"
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == f"review page {out}\n" and out.exists()
  # Nothing of TFDS's opening of each split ("Load dataset info", "fields info differ").
  assert "dataset_info" not in result.stderr and "differ" not in result.stderr, result.stderr


def test_page_folds_mixing_copies_and_keeps_ids_that_only_look_like_copies(tmp_path):
  cfg = _config()
  cfg.name = "sample_review_mixed"
  cfg.mixture = dict(by="category", counts=dict(text=30))  # the text left for train, repeated
  root = tmp_path / "data"
  (root / cfg.sample.dir / "extra").mkdir(parents=True)
  rows = [("post", "What colour is a ripe tomato?", "A ripe tomato is red."),
          ("post#1", "What colour is a ripe lemon?", "A ripe lemon is yellow.")]
  (root / cfg.sample.dir / "extra/messages.jsonl").write_text("".join(
      json.dumps({
          "id": rid,
          "messages": [{
              "role": "user",
              "content": q
          }, {
              "role": "assistant",
              "content": a
          }]
      }) + "\n" for rid, q, a in rows))
  cfg.sources = list(cfg.sources) + [dict(name="extra", format="messages_jsonl", path="extra/messages.jsonl")]
  dataset = build.build(cfg, str(root))
  train = datasets.open_split(dataset, "train")
  in_train = [train[i]["id"].decode() for i in range(len(train))]
  # Mixing names no copy after another record: tomato's copy is extra:post#1#1 beside the
  # lemon record extra:post#1, whose own copy is extra:post#1#1#1.
  assert in_train.count("extra:post#1") == 1 and len(in_train) == len(set(in_train))
  assert {"extra:post#1#1", "extra:post#1#1#1"} <= set(in_train)
  ids = _ids(dataset)
  originals = {i for i in ids if not re.search(r"#\d+$", i)} | {"extra:post#1"}
  page = review.Page(cfg, str(root))
  page.scan()
  assert set(page.where) == originals  # each record once, as itself, copies folded
  assert "lemon" in page.record("extra:post#1")["turns"][0]["html"]
  assert "tomato" in page.record("extra:post")["turns"][0]["html"]
