"""The package's import structure: `import mtcot_jax` (and a decode) reads neither
tfds, TensorFlow nor grain, the plot tool no orbax, no module imports itself
back through others (a cycle) at import time, and every import goes down the
layers of `LAYERS` (or stays within one)."""

import ast
import json
import os
import subprocess
import sys

from conftest import TINY

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "mtcot_jax")


def _modules(root: str) -> dict[str, str]:
  """{dotted module name: path} of every .py file under the package `root`."""
  out = {}
  top = os.path.dirname(os.path.abspath(root))
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def import_graph(root: str = PACKAGE, top_level: bool = True) -> dict[str, set[str]]:
  """{module: the package's modules it imports}, from the source (nothing is
  imported). `from a import b` counts as importing a.b where that is a module,
  else a. Only statements at module level with `top_level`, else every import,
  those inside functions too. A package's own __init__ run by importing one of
  its submodules is not an edge (it would make every package a cycle)."""
  modules = _modules(root)
  pkg = os.path.basename(os.path.normpath(root))

  def known(name: str) -> str:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for node in (tree.body if top_level else ast.walk(tree)):
      if isinstance(node, ast.Import):
        deps |= {known(a.name) for a in node.names if a.name.split(".")[0] == pkg}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:                 # relative: from its package, up level - 1 packages
          here = name if path.endswith("__init__.py") else name.rpartition(".")[0]
          here = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
          base = f"{here}.{base}" if base else here
        if base.split(".")[0] == pkg:
          deps |= {known(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else known(base)
                   for a in node.names}
    graph[name] = deps - {name, ""}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's), sorted."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while not comp or comp[-1] != v:
        comp.append(stack.pop())
        on.discard(comp[-1])
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def test_cycles_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_the_package():
  graph = import_graph()
  assert "mtcot_jax.config" in graph["mtcot_jax.sharding"]
  assert "mtcot_jax.data.tokenizer" in graph["mtcot_jax.data"]      # from-import of a module
  assert "mtcot_jax.errors" in graph["mtcot_jax.config"]
  # load_tokenizer reads a Hugging Face tokenizer file through a function-level import.
  assert "mtcot_jax.data.hf_tokenizer" not in graph["mtcot_jax.data.tokenizer"]
  assert "mtcot_jax.data.hf_tokenizer" in import_graph(top_level=False)["mtcot_jax.data.tokenizer"]


def test_no_import_cycle():
  found = cycles(import_graph())
  assert not found, "import cycles (each a set of modules importing one another): " + str(found)


# The package's layers, lowest first: a module may import from its own layer and
# those below, never from one above; imports inside functions count too. A name
# ending in `*` names every module that starts with the rest (`mtcot_jax.model*`:
# the package and its modules; `mtcot_jax.hf*`: hf.py and hf_format.py).
LAYERS = (
    # 0: the standard library only.
    ("mtcot_jax.tokens", "mtcot_jax.errors"),
    # 1: the typed config, its file format and its checks.
    ("mtcot_jax.config_io", "mtcot_jax.config_checks", "mtcot_jax.config"),
    # 2: what reads a config but no model: the mesh, the multi-host runtime, sampling.
    ("mtcot_jax.sharding", "mtcot_jax.distributed", "mtcot_jax.sampling"),
    # 3: the model. native/ (the C++ decode step) wraps the model's layers and is
    # loaded by decode/backend.py: the model's layer, not decode's.
    ("mtcot_jax.model*", "mtcot_jax.native"),
    # 4: decoding (uses the model) and the data (tasks, tokenizers, pipeline; the
    # model never reads it).
    ("mtcot_jax.decode*", "mtcot_jax.data*"),
    # 5: training and Hugging Face interop. train/loop.py imports hf (a run that
    # starts from a Hugging Face checkpoint), hf's import never trains: one layer.
    ("mtcot_jax.hf*", "mtcot_jax.gguf_format", "mtcot_jax.train*"),
    # 6: the programs on top: the experiment runner and report, tools, command lines.
    ("mtcot_jax.experiments*", "mtcot_jax.tools*", "mtcot_jax.cli*"),
    # 7: `import mtcot_jax`, the public API: it may import anything, nothing imports it.
    ("mtcot_jax",),
)


def layer_of(module: str, layers=LAYERS) -> int | None:
  """The index in `layers` of the entry naming `module`, None if none does."""
  for i, names in enumerate(layers):
    for name in names:
      if module == name.rstrip("*") or (name.endswith("*") and module.startswith(name[:-1])):
        return i
  return None


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """Every edge of `graph` from a module to one in a higher layer, as text."""
  out = []
  for module in sorted(graph):
    for dep in sorted(graph[module]):
      if layer_of(dep, layers) > layer_of(module, layers):
        out.append(f"{module} (layer {layer_of(module, layers)}) imports {dep} "
                   f"(layer {layer_of(dep, layers)})")
  return out


def test_layers_read_the_table():
  layers = (("a", "b*"), ("c*",), ("top",))
  assert [layer_of(m, layers) for m in ("a", "b", "b.x", "bee", "c.d.e", "top", "d")] == \
      [0, 0, 0, 0, 1, 2, None]
  graph = {"a": {"b.x"}, "b.x": {"c"}, "c.d.e": {"a", "top"}, "top": {"a"}}
  assert upward_imports(graph, layers) == ["b.x (layer 0) imports c (layer 1)",
                                           "c.d.e (layer 1) imports top (layer 2)"]
  assert layer_of("mtcot_jax.hf_format") == layer_of("mtcot_jax.train.loop") == 5
  assert layer_of("mtcot_jax.model.api") < layer_of("mtcot_jax.data.tokenizer")


def test_every_module_has_a_layer():
  missing = sorted(m for m in import_graph() if layer_of(m) is None)
  assert not missing, f"modules in no layer of LAYERS (add them where they belong): {missing}"


def test_imports_go_down_the_layers():
  up = upward_imports(import_graph(top_level=False))
  assert not up, "imports from a lower layer to a higher one (see LAYERS):\n" + "\n".join(up)


HEAVY = ("tensorflow", "grain", "orbax")   # tensorflow_datasets, tensorflow_metadata too

PROGRAM = f"""
import json, sys
import jax, numpy as np
import mtcot_jax as mt
import mtcot_jax.tools.plot
cfg = mt.load_config(None, {TINY!r})
params = mt.init_params(cfg, jax.random.key(0))
res = mt.generate(cfg, params, np.array([[1, 7, 4]]), np.array([3]), jax.random.key(1),
                  k=2, max_cot_tokens=3, max_answer_tokens=2)
jax.block_until_ready(res)
print(json.dumps([int(res.forward_passes[0]),
                  sorted({{m.split(".")[0] for m in sys.modules if m.startswith({HEAVY!r})}})]))
"""


def test_import_and_decode_read_no_tfds_grain_or_orbax():
  root = os.path.abspath(os.path.join(PACKAGE, ".."))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  passes, heavy = json.loads(out.stdout.strip().splitlines()[-1])
  assert passes >= 1                 # it decoded
  assert heavy == [], f"imported by `import mtcot_jax` and a decode: {heavy}"
