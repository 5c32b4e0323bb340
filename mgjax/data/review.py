"""A page for a person to look at a built dataset and judge its records.

  python -m mgjax.data.review --config=configs/data/sample.py --data_dir=DIR [--out=review.html]

writes one self-contained HTML file (styles, script and image thumbnails inline; it opens
from disk or a bucket, no server) with:

  - the data card's counts, plots, generation prompt checks and what a review file did;
  - per source and category, a seeded random sample of kept records as conversations
    (images as thumbnails, the `<h>...</h>` prompt of generation samples highlighted,
    each prompt's checks beside it);
  - rejected records grouped by kind, and near-duplicate clusters with the record kept
    beside the ones dropped;
  - generation samples the prompt checks flag (low coverage, unexpected language, a prompt
    that answers many different requests).

Every record with an id can be marked keep or drop with a note; "Export" downloads the
verdicts as review.jsonl (see mgjax.data.verdicts), which the data config's `review=PATH`
hands to the next build. Verdicts of the config's current review file are loaded into
the page, so a second pass starts from the first one's.

The page samples: a dataset of any size reads once (ids, sources and categories, and the
text of generation samples for their checks), and only the sampled records are rendered.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import random
import re
from typing import Any

from absl import app, flags, logging
from etils import epath
import jinja2
import markupsafe
import ml_collections
from PIL import Image

from mgjax.data import datasets, images, prompts, records, verdicts
from mgjax.data.records import GEN_MARKER, IMAGE_PLACEHOLDER

_COPY = re.compile(r"(.*)#\d+", re.DOTALL)  # mixing's ids for repeated copies: `<id>#<k>`


def _thumbnail(data: bytes, size: int) -> str:
  """A small JPEG of an encoded image, as a data URI."""
  with Image.open(io.BytesIO(data)) as img:
    img = images.to_rgb(img)  # as training sees it (a 16-bit PNG is not clipped to white)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png(path: epath.Path) -> str:
  return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_MARKUP = re.compile("(" + "|".join(re.escape(t) for t in (IMAGE_PLACEHOLDER, GEN_MARKER)) + r"|<h>.*?</h>)", re.DOTALL)


def _turn_html(text: str) -> markupsafe.Markup:
  """A turn's text, escaped, with the prompt, image slots and <GEN> marked up."""
  parts = []
  for piece in _MARKUP.split(text):
    if not piece:
      continue
    if piece == IMAGE_PLACEHOLDER:
      parts.append(markupsafe.Markup('<span class="slot">&lt;image&gt;</span>'))
    elif piece == GEN_MARKER:
      parts.append(markupsafe.Markup('<span class="gen">&lt;GEN&gt;</span>'))
    elif piece.startswith("<h>"):
      parts.append(markupsafe.Markup('<mark class="prompt">{}</mark>').format(piece))
    else:
      parts.append(markupsafe.escape(piece))
  return markupsafe.Markup("").join(parts)


def _content_digest(example: dict[str, Any]) -> bytes:
  """What makes two split examples the same record: source, turns and images."""
  h = hashlib.blake2b(digest_size=16)
  m = example["messages"]
  for part in [example["source"], *m["role"], *m["content"], *example["images"]]:
    h.update(len(part).to_bytes(8, "little"))
    h.update(part)
  return h.digest()


def _decode(example: dict[str, Any]) -> dict[str, Any]:
  """A split example (UTF-8 bytes) as plain strings."""
  text = lambda b: b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b)
  m = example["messages"]
  return {
      "id": text(example["id"]),
      "source": text(example["source"]),
      "category": text(example["category"]),
      "messages": [{
          "role": text(r),
          "content": text(c)
      } for r, c in zip(m["role"], m["content"])],
      "images": list(example["images"]),
  }


class Page:
  """Collects what the page shows from a built dataset."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, data_dir: str, *, seed: int = 0, per_group: int = 8,
               per_kind: int = 10, clusters: int = 10, flagged: int = 20, thumb: int = 160):
    self.cfg, self.data_dir = data_cfg, str(data_dir)
    self.rng = random.Random(seed)
    self.per_group, self.per_kind, self.clusters, self.n_flagged, self.thumb = per_group, per_kind, clusters, flagged, thumb
    self.dir = datasets.dataset_dir(data_cfg, data_dir)
    if not (self.dir / "data_card.json").exists():
      raise FileNotFoundError(f"no finished build at {self.dir}; build it first: python -m mgjax.data.build "
                              f"--config=<this data config> --data_dir={data_dir}")
    self.card = json.loads((self.dir / "data_card.json").read_text())
    self.dataset = datasets.BuiltDataset(name=self.card["name"], version=self.card["version"], data_dir=self.data_dir,
                                         dataset_dir=str(self.dir), tokenizer_dir=self.card["tokenizer"],
                                         splits=self.card["splits"])
    self.stale = self._stale()
    self.qualities = prompts.qualities(data_cfg)
    # The config's settings as they are now: a new threshold or synonym shows on the next
    # page without a rebuild (the card keeps the build's).
    self.prompt_checks = prompts.settings(data_cfg)
    self.lexicon = prompts.Lexicon(self.prompt_checks.synonyms)
    self.prior_bytes = self._prior_bytes()
    self.prior = verdicts.parse(self.prior_bytes, self._prior_name) if self.prior_bytes else {}
    self._sources: dict[str, Any] = {}

  def _prior_bytes(self) -> bytes | None:
    """The verdicts the page starts from: the config's review file, or where this machine
    does not have it, the copy the build applied."""
    review_path = verdicts.path(self.cfg)
    copy = self.dir / verdicts.COPY
    self._prior_name = review_path
    if not review_path:
      return None
    if not epath.Path(review_path).exists() and copy.is_file():
      self._prior_name = str(copy)
      return copy.read_bytes()
    return verdicts.read_bytes(review_path) if epath.Path(review_path).exists() else None

  def _prior_digest(self) -> str:
    return verdicts.digest(self.prior_bytes)[:16] if self.prior_bytes else "none"

  def _stale(self) -> str | None:
    """Why the build does not reflect the config's review file (set or edited since), or None."""
    stored_path = self.dir / "build_config.json"
    if not stored_path.exists():
      return None
    review_path = verdicts.path(self.cfg)
    if review_path and not epath.Path(review_path).exists() and not (self.dir / verdicts.COPY).is_file():
      return f"the review file {review_path} does not exist; no verdicts are loaded"
    if json.loads(stored_path.read_text()).get("review") == verdicts.fingerprint(self.cfg, self.dir):
      return None
    return (
        f"the review file ({verdicts.path(self.cfg) or 'none'}) is not the one this build applied; rebuild "
        "(python -m mgjax.data.build with a new version, or --overwrite) to apply it. Its verdicts are loaded below.")

  def _split(self, split: str):
    if split not in self._sources:
      self._sources[split] = datasets.open_split(self.dataset, split)
    return self._sources[split]

  def _read(self, split: str, index: int) -> dict[str, Any]:
    return _decode(self._split(split)[index])

  def scan(self) -> None:
    """One pass over the splits: where each record is, by source and category, and the
    checks of every generation sample. Mixing's repeated copies (`<id>#<k>`, the same
    record as `<id>`) are shown once, as their original; a record whose own id ends in
    `#<k>` is shown like any other."""
    self.where: dict[str, tuple[str, int]] = {}
    kinds: dict[str, tuple[str, str]] = {}  # id -> (source, category)
    self.checks: dict[str, list[dict[str, Any]]] = {}

    def add(rid, split, i, src, cat, ex):
      self.where[rid], kinds[rid] = (split, i), (src, cat)
      if cat == "generation":
        self.checks[rid] = prompts.check(_decode(ex)["messages"], self.qualities.get(src), self.lexicon)

    # Ids of the form `<id>#<k>`, decided once all is read: a copy has its original's content.
    # (A record's own id can equal a copy's name; then both are in the split.)
    maybe_copies: dict[str, list[tuple[str, int, str, str, bytes]]] = collections.defaultdict(list)
    for split in records.SPLITS:
      if split == "train_generation":  # the generation part of train, read there
        continue
      source = self._split(split)
      for i in range(len(source)):
        ex = source[i]
        rid = ex["id"].decode("utf-8", "surrogateescape")
        src, cat = ex["source"].decode("utf-8", "surrogateescape"), ex["category"].decode("utf-8", "surrogateescape")
        if _COPY.fullmatch(rid):
          maybe_copies[rid].append((split, i, src, cat, _content_digest(ex)))
        elif rid not in self.where:
          add(rid, split, i, src, cat, ex)
    digests: dict[str, bytes] = {}

    def copy_of(rid: str, src: str, content: bytes) -> bool:
      # Mixing names a copy <id>#<k>, adding #<k> again where a record already has that
      # name (post's copy is post#1#1 beside a record post#1): any shorter name may be its original.
      while match := _COPY.fullmatch(rid):
        rid = match.group(1)
        if rid in self.where and kinds[rid][0] == src:
          if rid not in digests:
            digests[rid] = _content_digest(self._split(self.where[rid][0])[self.where[rid][1]])
          if digests[rid] == content:
            return True
      return False

    for rid in sorted(maybe_copies, key=len):  # an original named like a copy comes before its own copies
      for split, i, src, cat, content in maybe_copies[rid]:
        if not copy_of(rid, src, content):
          add(rid, split, i, src, cat, self._split(split)[i])
          break
    self.groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for rid, key in kinds.items():
      self.groups[key].append(rid)
    requests_of = collections.defaultdict(set)
    for cs in self.checks.values():
      for c in cs:
        if c["prompt"] and c["prompt"].strip():
          requests_of[" ".join(c["prompt"].lower().split())].add(" ".join(c["request"].lower().split()))
    for cs in self.checks.values():
      for c in cs:
        key = " ".join((c["prompt"] or "").lower().split())
        c["repeats"] = len(requests_of.get(key, ()))

  def record(self, rid: str) -> dict[str, Any]:
    """A kept record as the template renders it."""
    split, index = self.where[rid]
    r = self._read(split, index)
    return self._view(r["id"], r["source"], r["category"], r["messages"], r["images"], where=split)

  def _view(self, rid, source, category, messages, images, *, where, reason=None, kind=None):
    checks = self.checks.get(rid) if rid else None
    if checks is None and messages and prompts.pairs(messages):
      checks = prompts.check(messages, self.qualities.get(source), self.lexicon)
    return {
        "id": rid,
        "source": source,
        "category": category,
        "where": where,
        "reason": reason,
        "kind": kind,
        "turns": [{
            "role": m["role"],
            "html": _turn_html(m["content"])
        } for m in messages or []],
        "images": [_thumbnail(b, self.thumb) for b in images],
        "checks": checks or [],
        "repeated_min": self.prompt_checks.repeated_min_requests,
        "low_coverage": self.prompt_checks.low_coverage,
    }

  def kept(self) -> list[dict[str, Any]]:
    out = []
    for (source, category), ids in sorted(self.groups.items()):
      pick = sorted(self.rng.sample(ids, min(self.per_group, len(ids))))
      out.append({"source": source, "category": category, "total": len(ids), "records": [self.record(i) for i in pick]})
    return out

  def rejected(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rejections by kind (a sample each, those with their turns first) and near-duplicate
    clusters (the kept record and the dropped copies)."""
    counts = collections.Counter()
    # Rejections with their turns are a bounded sample already (see verdicts.SAMPLE_PER_KIND);
    # the rest, possibly millions, go through a reservoir per kind.
    with_text: dict[str, list[dict]] = collections.defaultdict(list)
    without: dict[str, list[dict]] = collections.defaultdict(list)
    without_seen = collections.Counter()
    clusters: dict[str, list[dict]] = collections.defaultdict(list)
    path = self.dir / "rejected.jsonl"
    with path.open() as f:
      for line in f:
        r = json.loads(line)
        kind = r.get("kind", "invalid")
        counts[kind] += 1
        r.setdefault("messages", None)
        r.setdefault("id", None)
        if r["messages"] is not None:
          with_text[kind].append(r)
          if r.get("duplicate_of"):
            clusters[r["duplicate_of"]].append(r)
          continue
        without_seen[kind] += 1
        slot = len(without[kind]) if len(without[kind]) < self.per_kind else self.rng.randrange(without_seen[kind])
        if slot < len(without[kind]):
          without[kind][slot] = r
        elif slot < self.per_kind:
          without[kind].append(r)
    kinds = []
    for kind, total in counts.most_common():
      pool = with_text[kind]
      pick = self.rng.sample(pool, min(self.per_kind, len(pool)))
      rest = without[kind]
      pick += self.rng.sample(rest, min(self.per_kind - len(pick), len(rest)))
      kinds.append({
          "kind": kind,
          "total": total,
          # A record dropped in review can be kept again; one with a structural problem cannot.
          "overridable": kind in verdicts.OVERRIDABLE or kind == verdicts.REVIEW_KIND,
          "records": [
              self._view(r["id"], r["source"], None, r["messages"], [], where=f"{r['file']}: {r['record']}",
                         reason=r["reason"], kind=kind) for r in pick
          ]
      })
    shown = []
    for first in sorted(self.rng.sample(sorted(clusters), min(self.clusters, len(clusters)))):
      kept = self.record(first) if first in self.where else None
      shown.append({
          "first": first,
          "kept": kept,
          "dropped": [
              self._view(r["id"], r["source"], kept["category"] if kept else None, r["messages"], [],
                         where=f"{r['file']}: {r['record']}", reason=r["reason"], kind=r["kind"])
              for r in clusters[first]
          ]
      })
    return kinds, shown

  def flagged(self) -> dict[str, list[dict[str, Any]]]:
    """Generation samples whose prompt checks fail, worst first."""
    low, lang, repeated = [], [], []
    for rid, cs in self.checks.items():
      for c in cs:
        if c["coverage"] is not None and c["coverage"] < self.prompt_checks.low_coverage:
          low.append((c["coverage"], rid))
        if c["language_ok"] is False:
          lang.append((0, rid))
        if c["repeats"] >= self.prompt_checks.repeated_min_requests:
          repeated.append((-c["repeats"], rid))
    pick = lambda xs: [self.record(rid) for _, rid in sorted(set(xs))[:self.n_flagged]]
    return {
        f"low coverage (below {self.prompt_checks.low_coverage})": pick(low),
        "unexpected language": pick(lang),
        "repeated prompt": pick(repeated)
    }

  def context(self) -> dict[str, Any]:
    self.scan()
    kinds, clusters = self.rejected()
    plots = [(p, _png(self.dir / p)) for p in self.card["plots"] if (self.dir / p).exists()]
    return {
        "card": self.card,
        "stale": self.stale,
        "plots": plots,
        "kept": self.kept(),
        "rejected": kinds,
        "clusters": clusters,
        "flagged": self.flagged(),
        "prior": [vars(v) for v in self.prior.values()],
        "review_path": verdicts.path(self.cfg),
        # Work in progress is kept in the browser per dataset and starting review file: a page
        # made after the file changed starts from the new file, not from older work.
        "storage_key": f"mgjax-review/{self.card['name']}/{self.card['version']}/{self._prior_digest()}",
        "low": prompts.low_count(self.card["generation_prompts"]["coverage"]),
    }


def render(context: dict[str, Any]) -> str:
  env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
  return env.from_string(_TEMPLATE).render(**context)


def write(data_cfg: ml_collections.ConfigDict, data_dir: str, out: str | None = None, **options) -> str:
  """Writes the page for the build of data_cfg under data_dir; returns its path (default:
  review.html beside the data card)."""
  page = Page(data_cfg, data_dir, **options)
  out = out or str(page.dir / "review.html")
  epath.Path(out).write_text(render(page.context()))
  return out


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Review: {{ card.name }} {{ card.version }}</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header,main{max-width:1200px;margin:0 auto;padding:0 16px}
h1{font-size:22px;margin:16px 0 4px} h2{margin:28px 0 8px;border-bottom:2px solid #ccc} h3{margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right}
#bar{position:sticky;top:0;z-index:5;background:#283845;color:#fff;padding:8px 16px;display:flex;gap:12px;align-items:center}
#bar button{font-size:14px} #bar input{width:260px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px;margin:8px 0}
.plots img{max-width:32%;background:#fff;border:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:10px;align-items:start}
.record{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;position:relative}
.record.v-keep{border:3px solid #2e8b57} .record.v-drop{border:3px solid #c0392b;opacity:.75}
.meta{font-size:12px;color:#666;word-break:break-all} .reason{color:#a33;font-size:13px;margin:4px 0}
.turn{margin:4px 0;padding:4px 6px;border-radius:4px;white-space:pre-wrap;word-wrap:break-word;max-height:220px;overflow:auto}
.turn.user{background:#eef3fb} .turn.assistant{background:#f3f3f3} .turn.system{background:#fbf6e9}
.role{font-weight:600;font-size:11px;text-transform:uppercase;color:#567;display:block}
mark.prompt{background:#ffe08a;padding:0 2px} .slot,.gen{color:#fff;background:#7a6;border-radius:3px;padding:0 3px;font-size:11px}
.gen{background:#a67}
img.thumb{border:1px solid #ccc;margin:2px;vertical-align:top}
.checks{font-size:12px;margin:4px 0} .ok{color:#2e7d32} .bad{color:#c62828;font-weight:600}
.verdict{display:flex;gap:6px;margin-top:6px;align-items:center} .verdict input{flex:1}
.verdict button.on{font-weight:700;outline:2px solid #333}
.cluster{display:grid;grid-template-columns:1fr 1fr;gap:10px;margin-bottom:14px}
textarea#export{width:100%;height:90px;font-family:monospace}
.hidden{display:none}
</style></head><body>
<div id="bar"><b>Review {{ card.name }} {{ card.version }}</b>
<span><span id="count">0</span> verdicts</span>
<button id="export-btn" type="button">Export review.jsonl</button>
<input id="filter" placeholder="show records containing...">
</div>
<header>
<h1>{{ card.name }} {{ card.version }}</h1>
{% if stale %}<div class="warn" id="stale">{{ stale }}</div>{% endif %}
<p>Mark a record <b>keep</b> (it is kept although a filter or de-duplication would drop it) or <b>drop</b>
(rejected as <code>review</code>), with a note; export the verdicts and set the data config's
<code>review=PATH</code> to that file for the next build.{% if review_path %} Verdicts from <code>{{ review_path }}</code>
({{ prior|length }}) are loaded.{% endif %}</p>
<textarea id="export" readonly placeholder="the exported review.jsonl appears here"></textarea>
</header>
<main>
<h2 id="card">Data card</h2>
<table><tr><th>source</th><th>read</th><th>kept</th><th>rejected</th><th>duplicates</th></tr>
{% for name, s in card.sources.items() %}<tr><td>{{ name }}</td><td class="n">{{ s.read }}</td><td class="n">{{ s.kept }}</td>
<td>{% for k, v in s.rejected.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% else %}0{% endfor %}</td>
<td class="n">{{ s.duplicates }}</td></tr>{% endfor %}</table>
<table><tr><th>split</th><th>records</th></tr>{% for s, n in card.splits.items() %}<tr><td>{{ s }}</td><td class="n">{{ n }}</td></tr>{% endfor %}</table>
{% if card.review is defined %}{% set r = card.review %}
<h3>Review applied by this build</h3>
<p id="review-report"><code>{{ r.file }}</code>: {{ r.verdicts }} verdicts ({{ r.keep }} keep, {{ r.drop }} drop);
dropped {{ r.applied.dropped }}, kept {{ r.applied.kept }}{% if r.kept_against %} (against {% for k, v in r.kept_against.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}){% endif %};
{{ r.refused|length }} refused; {{ r.not_found }} ids no longer found{% if r.not_found %}: {{ r.not_found_ids|join(", ") }}{% endif %}.</p>
{% endif %}
{% set g = card.generation_prompts %}
<h3>Generation prompts</h3>
<p id="prompt-summary">{{ g.requests }} image requests: {{ g.missing_prompt }} without a prompt, {{ g.empty_prompt }} empty;
language checked on {{ g.language.checked }}, unexpected on {{ g.language.unexpected }};
coverage of request words mean {{ g.coverage.mean }}, p10 {{ g.coverage.p10 }}, {{ low[1] }} below {{ low[0] }};
{{ g.repeated.prompts }} prompts answer {{ g.repeated.min_requests }}+ different requests ({{ g.repeated.records }} records).</p>
<div class="plots">{% for name, uri in plots %}<img src="{{ uri }}" alt="{{ name }}">{% endfor %}</div>

{% macro rec(r, can=true) %}
<div class="record" data-id="{{ r.id or '' }}" data-source="{{ r.source }}">
<div class="meta">{{ r.id or "(no id)" }} · {{ r.source }}{% if r.category %} · {{ r.category }}{% endif %} · {{ r.where }}</div>
{% if r.reason %}<div class="reason"><b>{{ r.kind }}</b>: {{ r.reason }}</div>{% endif %}
{% for uri in r.images %}<img class="thumb" src="{{ uri }}" alt="image {{ loop.index }}">{% endfor %}
{% for t in r.turns %}<div class="turn {{ t.role }}"><span class="role">{{ t.role }}</span>{{ t.html }}</div>{% else %}<div class="meta">(text not kept for this rejection)</div>{% endfor %}
{% for c in r.checks %}<div class="checks">prompt:
{% if not c.present %}<span class="bad">missing</span>{% elif c.empty %}<span class="bad">empty</span>{% else %}
coverage <span class="{{ 'bad' if c.coverage is not none and c.coverage < r.low_coverage else 'ok' }}">{{ c.coverage }}</span>;
language {% if c.language is none %}not judged{% else %}<span class="{{ 'ok' if c.language_ok else 'bad' }}">{{ c.language }}</span>{% endif %}
{% if c.repeats is defined and c.repeats >= r.repeated_min %}; <span class="bad">answers {{ c.repeats }} requests</span>{% endif %}
{% endif %}</div>{% endfor %}
{% if can and r.id %}<div class="verdict"><button type="button" class="keep">keep</button><button type="button" class="drop">drop</button>
<input class="note" placeholder="note"></div>{% endif %}
</div>
{% endmacro %}

<h2 id="kept">Kept records (a sample per source and category)</h2>
{% for g in kept %}<h3>{{ g.source }} · {{ g.category }} <small>({{ g.records|length }} of {{ g.total }})</small></h3>
<div class="grid">{% for r in g.records %}{{ rec(r) }}{% endfor %}</div>{% endfor %}

<h2 id="rejected">Rejected records, by kind</h2>
{% for k in rejected %}<div class="kind" data-kind="{{ k.kind }}"><h3>{{ k.kind }} <small>({{ k.records|length }} of {{ k.total }}{% if not k.overridable %}; a structural problem: no verdict overrules it{% endif %})</small></h3>
<div class="grid">{% for r in k.records %}{{ rec(r, k.overridable) }}{% endfor %}</div></div>{% else %}<p>None.</p>{% endfor %}

<h2 id="duplicates">Duplicate clusters</h2>
{% for c in clusters %}<div class="cluster"><div><h3>kept: {{ c.first }}</h3>{% if c.kept %}{{ rec(c.kept) }}{% else %}<p class="meta">not in the built splits (mixed out)</p>{% endif %}</div>
<div><h3>dropped as duplicates</h3>{% for r in c.dropped %}{{ rec(r) }}{% endfor %}</div></div>{% else %}<p>None.</p>{% endfor %}

<h2 id="flagged">Generation samples the prompt checks flag</h2>
{% for name, rs in flagged.items() %}<h3>{{ name }} <small>({{ rs|length }})</small></h3>
{% if rs %}<div class="grid">{% for r in rs %}{{ rec(r) }}{% endfor %}</div>{% else %}<p>None.</p>{% endif %}{% endfor %}
</main>
<script>
const PRIOR = {{ prior|tojson }};
const KEY = {{ storage_key|tojson }};
// By source and id: two sources may hold records of the same id.
const keyOf = (source, id) => JSON.stringify([source, id]);
const verdicts = new Map();  // keyOf(source, id) -> {id, source, verdict, note}
let saved = null;  // this page's verdicts from an earlier visit (they started from PRIOR)
try { saved = JSON.parse(localStorage.getItem(KEY)); } catch (e) { /* storage off: verdicts live in the page only */ }
for (const v of (Array.isArray(saved) ? saved : PRIOR)) verdicts.set(keyOf(v.source, v.id), v);

function save() {
  try { localStorage.setItem(KEY, JSON.stringify([...verdicts.values()])); } catch (e) {}
  document.getElementById("count").textContent = verdicts.size;
  paint();
}
function paint() {
  for (const el of document.querySelectorAll(".record[data-id]")) {
    const v = verdicts.get(keyOf(el.dataset.source, el.dataset.id));
    el.classList.toggle("v-keep", !!v && v.verdict === "keep");
    el.classList.toggle("v-drop", !!v && v.verdict === "drop");
    const keep = el.querySelector("button.keep"), drop = el.querySelector("button.drop"), note = el.querySelector("input.note");
    if (keep) keep.classList.toggle("on", !!v && v.verdict === "keep");
    if (drop) drop.classList.toggle("on", !!v && v.verdict === "drop");
    if (note && v && document.activeElement !== note) note.value = v.note || "";
  }
}
document.addEventListener("click", (e) => {
  const b = e.target.closest("button.keep, button.drop");
  if (!b) return;
  const el = b.closest(".record");
  const verdict = b.classList.contains("keep") ? "keep" : "drop";
  const key = keyOf(el.dataset.source, el.dataset.id), old = verdicts.get(key);
  if (old && old.verdict === verdict) verdicts.delete(key);  // a second click clears it
  else verdicts.set(key, {id: el.dataset.id, source: el.dataset.source, verdict: verdict,
                          note: el.querySelector("input.note").value});
  save();
});
document.addEventListener("input", (e) => {
  if (e.target.id === "filter") {
    const q = e.target.value.toLowerCase();
    for (const el of document.querySelectorAll(".record")) el.classList.toggle("hidden", !!q && !el.textContent.toLowerCase().includes(q));
    return;
  }
  if (!e.target.classList.contains("note")) return;
  const el = e.target.closest(".record"), v = verdicts.get(keyOf(el.dataset.source, el.dataset.id));
  if (v) { v.note = e.target.value; save(); }
});
document.getElementById("export-btn").addEventListener("click", () => {
  const keys = [...verdicts.keys()].sort();
  const text = keys.map((k) => { const v = verdicts.get(k);
    return JSON.stringify({id: v.id, source: v.source, verdict: v.verdict, note: v.note || ""}); }).join("\n") + (keys.length ? "\n" : "");
  document.getElementById("export").value = text;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], {type: "application/jsonl"}));
  a.download = "review.jsonl";
  document.body.appendChild(a); a.click(); a.remove();
});
save();
</script>
</body></html>
"""

# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

if __name__ == "__main__":
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Data config file, e.g. configs/data/sample.py.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset was built (python -m mgjax.data.build).")
  _OUT = flags.DEFINE_string("out", None, "The HTML file to write; default review.html beside the data card.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples the page shows.")
  _PER_GROUP = flags.DEFINE_integer("per_group", 8, "Kept records shown per source and category.")
  _PER_KIND = flags.DEFINE_integer("per_kind", 10, "Rejected records shown per kind.")
  _CLUSTERS = flags.DEFINE_integer("clusters", 10, "Duplicate clusters shown.")
  _FLAGGED = flags.DEFINE_integer("flagged", 20, "Generation samples shown per failed prompt check.")
  _THUMB = flags.DEFINE_integer("thumb", 160, "Thumbnail size in pixels (longer side).")
  flags.mark_flags_as_required(["config", "data_dir"])

  def main(argv):
    del argv
    # TFDS logs every split it opens at INFO (and that its module name differs from the
    # writer's); the page is the output.
    logging.set_verbosity(logging.WARNING)
    out = write(_CONFIG.value, _DATA_DIR.value, _OUT.value, seed=_SEED.value, per_group=_PER_GROUP.value,
                per_kind=_PER_KIND.value, clusters=_CLUSTERS.value, flagged=_FLAGGED.value, thumb=_THUMB.value)
    print(f"review page {out}")

  from mgjax import runtime
  app.run(main, flags_parser=runtime.parse_flags)
