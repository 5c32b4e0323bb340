"""Data flows one way through mgjax: no module imports, directly or through others, a module
that imports it back (function-level imports count too: they are arrows all the same)."""
import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mgjax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """mgjax module -> the mgjax modules it imports (a package's __init__ stands for `from pkg import x`
  only when x is not a module of its own)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

  def owner(name: str) -> str:
    while name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets |= {owner(a.name) for a in node.names if a.name.startswith("mgjax")}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        if base.startswith("mgjax"):
          targets |= {owner(f"{base}.{a.name}") for a in node.names}
    graph[name] = targets - {name, "mgjax"}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """Every module `start` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for target in graph[todo.pop()] - seen:
      seen.add(target)
      todo.append(target)
  return seen


# Building a dataset: sample generation, reading sources, filters, de-duplication, mixing,
# Beam, tokenizer training, the data card's plots and the review page. mgjax.main and
# mgjax.recipe build a missing dataset before they call the trainer, which only opens one.
DATA_BUILDING = frozenset({
    "mgjax.data.build", "mgjax.data.sample", "mgjax.data.card", "mgjax.data.sources", "mgjax.data.filters",
    "mgjax.data.dedup", "mgjax.data.mixture", "mgjax.data.prepare", "mgjax.data.spill", "mgjax.data.builder",
    "mgjax.data.beam_build", "mgjax.data.tokenizer_training", "mgjax.data.review", "mgjax.data.prompts"
})


def test_the_checker_finds_what_a_module_reaches():
  assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_the_trainer_reaches_no_data_building_code():
  graph = import_graph()
  assert DATA_BUILDING <= set(graph)  # every name above is a module (a rename would empty the test)
  assert sorted(reachable(graph, "mgjax.train") & DATA_BUILDING) == []


def _package(module: str) -> str:
  """mgjax.data.sources.lima -> mgjax.data; mgjax.train -> mgjax."""
  parts = module.split(".")
  return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "mgjax"


# What each package may import from the rest of mgjax (README: Code map). mgjax/'s own
# modules may import every package.
MAY_IMPORT = {
    "mgjax.models": set(),
    "mgjax.data": {"mgjax.atomic", "mgjax.locks", "mgjax.runtime", "mgjax.sharding", "mgjax.models.vlm"},
    "mgjax.evaluators": {
        "mgjax.decode", "mgjax.stats", "mgjax.metrics", "mgjax.reports", "mgjax.sharding", "mgjax.data.datasets",
        "mgjax.data.pipeline", "mgjax.data.records"
    },
    "mgjax.convert": {
        "mgjax.checkpoint", "mgjax.run_files", "mgjax.config_files", "mgjax.runtime", "mgjax.data.chat_tokenizers",
        "mgjax.models.*"
    },
}


def _allowed(target: str, allowed: set[str]) -> bool:
  return target in allowed or any(a.endswith(".*") and target.startswith(a[:-1]) for a in allowed)


def test_each_package_imports_only_what_the_code_map_allows():
  outside = sorted((module, target) for module, targets in import_graph().items() if _package(module) in MAY_IMPORT
                   for target in targets
                   if _package(target) != _package(module) and not _allowed(target, MAY_IMPORT[_package(module)]))
  assert outside == []


def renamed_imports(root: pathlib.Path) -> list[str]:
  """`from mgjax... import x as y` and `import mgjax... as y` under root: a module read under
  another name than its own (to dodge a local of that name) sends a reader looking for a file
  that does not exist."""
  found = []
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        base = getattr(node, "module", None) or ""
        for alias in node.names:
          full = f"{base}.{alias.name}" if base else alias.name
          is_module = (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists()
          if full.startswith("mgjax") and is_module and alias.asname and alias.asname != alias.name:
            found.append(f"{path.relative_to(root.parent)}:{node.lineno} {full} as {alias.asname}")
  return found


def test_no_mgjax_module_is_imported_under_another_name():
  for root in ("mgjax", "tests", "benchmarks"):
    assert renamed_imports(PACKAGE.parent / root) == []


def test_no_two_mgjax_modules_share_a_name():
  names = [p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
  assert sorted({n for n in names if names.count(n) > 1}) == []


def test_the_checker_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_mgjax():
  assert cycles(import_graph()) == []


def test_the_trainer_does_not_load_the_builder_to_read_a_dataset():
  # Reading a built dataset needs TFDS and grain, not the builder's MinHash, language id and
  # plots: those load only when a build has to run.
  code = ("import sys, mgjax.train; "
          "print(sorted(m for m in ('mgjax.data.build', 'datasketch', 'py3langid', 'matplotlib') if m in sys.modules))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "[]"
