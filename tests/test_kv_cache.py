"""The KV cache's layouts and write paths (model/kv_cache.py) against references:
a NumPy loop for the writes, the teacher-forced forward for cached passes and
decoding, and the compiled decode loop's instructions for what a pass copies."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax import decode
from mtcot_jax.model import api
from mtcot_jax.model.kv_cache import KVCache, LayerCache

LAYOUTS = ("bkds", "bksd")


def _write_reference(cache_k, cache_v, new_k, new_v, slots, layout, layer):
  """NumPy: token t of row b into slot slots[b, t] of every kv head, unless past S."""
  k, v = np.array(cache_k), np.array(cache_v)
  lk, lv = (k, v) if layer is None else (k[layer], v[layer])
  S = lk.shape[2]
  for b, t in np.ndindex(*slots.shape):
    s = slots[b, t]
    if s < S:
      lk[b, :, s] = new_k[b, t]
      if layout == "bkds":
        lv[b, :, :, s] = new_v[b, t]
      else:
        lv[b, :, s] = new_v[b, t]
  return k, v


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stacked", [False, True])
def test_write_equals_reference(layout, stacked):
  """Both write paths (aligned: dynamic-update-slice; ragged: scatter), both
  layouts, one layer's arrays or its slice of the stacked ones: slots past the
  capacity dropped, every other slot untouched."""
  B, K, S, Dh, T, L = 2, 2, 7, 4, 3, 3
  rng = np.random.default_rng(0)
  v_shape = (B, K, Dh, S) if layout == "bkds" else (B, K, S, Dh)
  lead = (L,) if stacked else ()
  cache_k = rng.normal(size=lead + (B, K, S, Dh)).astype(np.float32)
  cache_v = rng.normal(size=lead + v_shape).astype(np.float32)
  new_k, new_v = (rng.normal(size=(B, T, K, Dh)).astype(np.float32) for _ in range(2))
  layer = 1 if stacked else None
  write = jax.jit(lambda c, k, v: c.write(k, v))
  cases = [(True, [0, 0]), (True, [2, 2]), (True, [S - 2, S - 2]), (True, [S + 1, S + 1]),
           (False, [1, S - 1]), (False, [S - 3, 0])]
  for aligned, starts in cases:
    slots = np.asarray(starts)[:, None] + np.arange(T)[None, :]
    c = LayerCache(jnp.asarray(cache_k), jnp.asarray(cache_v), jnp.asarray(slots, jnp.int32),
                   layer=None if layer is None else jnp.int32(layer), layout=layout,
                   aligned=aligned)
    got = write(c, jnp.asarray(new_k), jnp.asarray(new_v))
    want_k, want_v = _write_reference(cache_k, cache_v, new_k, new_v, slots, layout, layer)
    np.testing.assert_array_equal(got.k, want_k, err_msg=f"keys {aligned} {starts}")
    np.testing.assert_array_equal(got.v, want_v, err_msg=f"values {aligned} {starts}")


def _cached_logits(cfg, params, tokens, prompt_lens, total, layout, block=2):
  """The prompt in one aligned pass into an empty cache, then blocks of up to
  `block` tokens a row (ragged); (B, T, V) logits at every real position."""
  B = tokens.shape[0]
  cache = KVCache.empty(cfg.model, B, tokens.shape[1] + block, layout=layout)
  step = jax.jit(lambda p, c, t, n, aligned: api.extend(cfg, p, c, t, n, aligned=aligned),
                 static_argnums=4)
  got = np.zeros(tokens.shape + (cfg.model.vocab_size,), np.float32)
  pos, n, width = np.zeros(B, int), np.asarray(prompt_lens), max(prompt_lens)
  while np.any(pos < total):
    toks = np.zeros((B, width), np.int32)
    for b in range(B):
      toks[b, : n[b]] = tokens[b, pos[b]: pos[b] + n[b]]
    out = step(params, cache, jnp.asarray(toks), jnp.asarray(n, jnp.int32), bool(pos.sum() == 0))
    cache = out.cache
    for b in range(B):
      got[b, pos[b]: pos[b] + n[b]] = out.logits[b, : n[b]]
    pos += n
    n, width = np.minimum(block, total - pos), block
  return got


@pytest.mark.parametrize("scan", [False, True])
def test_cached_passes_equal_teacher_forced(tiny_cfg, tiny_params, scan):
  """Cached passes in either layout, scanned or unrolled layers, ragged rows and
  one row, give the teacher-forced forward's logits."""
  cfg = tiny_cfg.replace(model={"scan_layers": scan})
  params = api.to_scan_layout(tiny_params) if scan else tiny_params
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.model.vocab_size, (3, 9)).astype(np.int32)
  ref = np.asarray(mt.forward(tiny_cfg, tiny_params, tokens, with_head=False).logits)
  for layout in LAYOUTS:
    for rows, prompt_lens, total in (([0, 1, 2], [2, 5, 3], [9, 8, 7]), ([1], [4], [9])):
      got = _cached_logits(cfg, params, tokens[rows], prompt_lens, np.asarray(total), layout)
      for i, b in enumerate(rows):
        np.testing.assert_allclose(got[i, : total[i]], ref[b, : total[i]], atol=2e-5, rtol=2e-5,
                                   err_msg=f"{layout}, rows {rows}, row {b}")


@pytest.fixture(scope="module")
def dparams(tiny_params):
  """Larger weights: a random model whose greedy output is diverse."""
  return jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, tiny_params)


@pytest.mark.parametrize("layout,scan,rows", [("bksd", True, 4), ("bksd", False, 1),
                                             ("bkds", True, 1)])
def test_greedy_decoding_equals_teacher_forcing(tiny_cfg, dparams, layout, scan, rows):
  """k=0 greedy decoding with decode.kv_layout (the accelerators' layout on this
  CPU too), scanned or unrolled layers, ragged prompts and one row: every token
  is the teacher-forced forward's argmax at the position before it."""
  P, lens = 6, np.array([6, 3, 5, 2])[:rows]
  prompt = np.random.default_rng(0).integers(6, tiny_cfg.model.vocab_size, (rows, P))
  prompt = np.where(np.arange(P)[None] < lens[:, None], prompt, 0).astype(np.int32)
  cfg = tiny_cfg.replace(model={"scan_layers": scan}, decode={"kv_layout": layout})
  params = api.to_scan_layout(dparams) if scan else dparams
  res = jax.tree.map(np.asarray, decode.generate(
      cfg, params, prompt, lens, jax.random.key(0), k=0, max_cot_tokens=8, max_answer_tokens=3,
      think_end_id=7))
  seq = np.zeros((rows, P + res.tokens.shape[1]), np.int32)
  for b in range(rows):
    seq[b, : lens[b]] = prompt[b, : lens[b]]
    seq[b, lens[b]: lens[b] + res.lengths[b]] = res.tokens[b, : res.lengths[b]]
  argmax = np.asarray(mt.forward(tiny_cfg, dparams, seq, with_head=False).logits).argmax(-1)
  checked = 0
  for b in range(rows):
    for i in range(res.lengths[b]):
      if res.cot_forced[b] and res.phase[b, i] == 0 and res.phase[b, i + 1] != 0:
        continue                                                   # budget forcing's </think>
      assert res.tokens[b, i] == argmax[b, lens[b] + i - 1], (b, i)
      checked += 1
  assert checked >= 4 * rows


# ---------------------------------------------------------------- what a pass copies

_COMPUTATION = re.compile(r"^(ENTRY )?%?(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_CONTROL = re.compile(r"(?:body|condition|true_computation|false_computation)=%?([\w.-]+)"
                      r"|branch_computations=\{([^}]*)\}")
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_NO_BUFFER = {"parameter", "get-tuple-element", "bitcast", "tuple"} | _IN_PLACE


def _computations(hlo: str) -> dict:
  """{name: [(instruction, opcode, element count, line)]} of compiled HLO text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      name = "ENTRY" if m.group(1) else m.group(2)
      comps[name] = []
      continue
    m = _INSTRUCTION.match(line)
    if m and name is not None:
      dims = [int(d) for d in m.group(3).split(",") if d]
      comps[name].append((m.group(1), m.group(4), int(np.prod(dims, dtype=np.int64)), line))
  return comps


def cache_sized_writes(hlo: str, layer_size: int, num_layers: int) -> list:
  """Every instruction of a loop body (a while's body or condition, a branch; not
  the program's entry, not inside fusions) that writes a buffer the size of one
  layer's keys or values or of all layers' stacked, other than in place (a
  dynamic-update-slice, a scatter, or a fusion of one of them into that buffer):
  [(computation, opcode, size in layers, what the fusion does)]."""
  comps = _computations(hlo)
  control = set()
  for line in hlo.splitlines():
    for m in _CONTROL.finditer(line):
      if m.group(1):
        control.add(m.group(1))
      else:
        control.update(c.strip().lstrip("%") for c in m.group(2).split(","))
  sizes = {layer_size: 1, layer_size * num_layers: num_layers}
  found = []
  for comp in sorted(control):
    for _, op, n, line in comps.get(comp, []):
      if n not in sizes or op in _NO_BUFFER:
        continue
      inner = set()
      if op == "fusion":
        fused = re.search(r"calls=%?([\w.-]+)", line).group(1)
        inner = {o for _, o, m, _ in comps[fused] if m == n}
        if inner & _IN_PLACE:
          continue
      found.append((comp, op, sizes[n], tuple(sorted(inner))))
  return found


def _decode_loop_hlo(cfg, params, B):
  """The compiled prefill + k=0 CoT loop (`Decoder.run_cot`) for B prompts."""
  dec = decode.decoder(cfg.replace(decode={"k": 0, "max_cot_tokens": 4, "max_answer_tokens": 2}))
  prompt = jnp.ones((B, 3), jnp.int32)
  return dec.run_cot.lower(dec, params, prompt, jnp.full((B,), 3, jnp.int32), jax.random.key(0),
                           dec.sample_values()).compile().as_text()


@pytest.mark.parametrize("B", [1, 2])
def test_decode_loop_copies_no_cache(tiny_cfg, tiny_params, B):
  """The compiled decode loop (the CPU's layout; one row and two) with
  scan_layers: no instruction in any loop body copies, stacks or unstacks a
  cache (the stacked cache is the layer scan's carry, written in place). What is
  left, per layer scan: one dynamic-slice of the layer's keys and one of its
  values for its attention to read, as the scan reads each layer's weights (a
  fusion into the dots on a TPU; XLA:CPU materialises both). The unrolled
  model's loop writes no cache-sized buffer but in place."""
  m = tiny_cfg.model
  for scan in (True, False):
    cfg = tiny_cfg.replace(model={"scan_layers": scan})
    params = api.to_scan_layout(tiny_params) if scan else tiny_params
    capacity = decode.decoder(cfg.replace(decode={"k": 0, "max_cot_tokens": 4,
                                                  "max_answer_tokens": 2})).capacity(3)
    layer_size = B * m.num_kv_heads * capacity * m.dh
    found = cache_sized_writes(_decode_loop_hlo(cfg, params, B), layer_size, m.num_layers)
    if not scan:
      assert found == [], found
      continue
    assert all(layers == 1 and op == "fusion" and "dynamic-slice" in inner
               for _, op, layers, inner in found), found
    per_body = {}
    for comp, *_ in found:
      per_body[comp] = per_body.get(comp, 0) + 1
    # the prefill's layer scan and the loop's: keys and values read once a layer
    assert len(per_body) == 2 and set(per_body.values()) == {2}, found


@pytest.mark.parametrize("scan", [False, True])
def test_aligned_writes_are_dynamic_update_slices(tiny_cfg, tiny_params, scan):
  """A pass declared aligned writes the cache by dynamic-update-slice, a ragged
  one by scatter (the program JAX hands XLA)."""
  cfg = tiny_cfg.replace(model={"scan_layers": scan})
  params = api.to_scan_layout(tiny_params) if scan else tiny_params
  cache = KVCache.empty(cfg.model, 2, 8)
  for aligned in (True, False):
    text = jax.jit(lambda p, c, t: api.extend(cfg, p, c, t, aligned=aligned)).lower(
        params, cache, jnp.ones((2, 3), jnp.int32)).as_text()
    n_dus, n_scatter = text.count("stablehlo.dynamic_update_slice"), text.count("stablehlo.scatter")
    if aligned:
      assert n_dus >= 2 and n_scatter == 0, (n_dus, n_scatter)
    else:
      assert n_scatter >= 2, (n_dus, n_scatter)


def test_bad_layouts_raise(tiny_cfg, tiny_params):
  """A cache of the wrong form for the model, an unknown layout, and a layout the
  native kernel cannot read are refused, each naming what is accepted."""
  scanned = tiny_cfg.replace(model={"scan_layers": True})
  plain_cache = KVCache.empty(tiny_cfg.model, 1, 4, stacked=False)
  with pytest.raises(ValueError, match="stacked exactly when scan_layers"):
    api.extend(scanned, api.to_scan_layout(tiny_params), plain_cache, jnp.ones((1, 1), jnp.int32))
  with pytest.raises(ValueError, match="accepted: 'bkds'"):
    KVCache.empty(tiny_cfg.model, 1, 4, layout="bsdk")
  with pytest.raises(mt.config.ConfigError, match="decode.kv_layout='bsdk'"):
    mt.load_config(None, ["decode.kv_layout=bsdk"])
  with pytest.raises(mt.config.ConfigError, match="auto or bkds with decode.cpu_kernel=native"):
    mt.load_config(None, ["decode.kv_layout=bksd", "decode.cpu_kernel=native",
                          "decode.weights_layout=out_in"])
