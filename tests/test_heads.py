"""The head interface (`model/heads.py`): the decode chain with its own KV cache
against the chain recomputed over its whole prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt

from mtcot_jax.model.heads import head_for

B, S, K = 3, 12, 5


@pytest.mark.parametrize("context", [0, -1, 3])
def test_cached_chain_equals_recomputed(tiny_cfg, context):
  """Depth by depth, `chain_step` (one element through the head, the earlier
  ones read from the chain's cache) gives the features `chain` computes over the
  whole prefix: the projection head, the head with context over all positions
  and over a window of 3, rows at different positions (ragged lengths). Float32
  sums in another order: agreement to ~1e-7 of features of size ~1-3; 1e-5 is
  far below what a wrong mask or slot (a change of order 1) gives."""
  cfg = tiny_cfg.replace(head={"context": context})
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x,
                        mt.init_params(cfg, jax.random.key(0)))
  head = head_for(cfg)
  rng = np.random.default_rng(0)
  D = cfg.model.d_model
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  state = head.decode_state(B, S)
  if context:
    sources_BxSxD = tuple(normal(B, S, D) for _ in cfg.head.source_layers)
    state = head.remember(params, state, sources_BxSxD, jnp.broadcast_to(jnp.arange(S), (B, S)))
  sources = tuple(normal(B, D) for _ in cfg.head.source_layers)
  lengths = jnp.array([4, 7, S])
  chain_BxK = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (B, K)), jnp.int32)
  want = np.asarray(head.chain(params, state, sources, chain_BxK, lengths))
  chain = head.chain_start(params, state, sources, lengths, K)
  for j in range(K):
    got, chain = head.chain_step(params, state, chain, chain_BxK[:, j], j)
    np.testing.assert_allclose(np.asarray(got), want[:, j], atol=1e-5, rtol=0, err_msg=str(j))
