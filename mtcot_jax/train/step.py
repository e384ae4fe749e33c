"""Train state and the jitted, sharded train step (with gradient accumulation)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtcot_jax import sharding as shd
from mtcot_jax.config import Config
from mtcot_jax.model import api


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32
  params: Any            # {"main": ..., "head": ...}
  opt_state: Any
  key: jax.Array         # (2,) uint32 raw PRNG key data (saved as a plain array)


def create_state(cfg: Config, optimizer: optax.GradientTransformation, mesh: Mesh | None,
                 params=None) -> TrainState:
  """A fresh state (random params unless given; the step donates them), sharded by
  the rules on `mesh`."""
  key_init, key_run = jax.random.split(jax.random.key(cfg.train.seed))
  if params is None:
    params = api.init_params(cfg, key_init, mesh)
  opt_state = jax.jit(optimizer.init)(params)   # moments' shardings follow the params'
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     key=jax.random.key_data(key_run))
  if mesh is None:
    return state
  # Everything not laid out on the mesh (step, key, optimizer counts) is replicated.
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), state)


def state_shardings(state: TrainState):
  return jax.tree.map(lambda x: x.sharding, state)


def batch_sharding(cfg: Config, mesh: Mesh, ndim: int) -> NamedSharding:
  """Rows over the batch axes, the rest replicated."""
  return NamedSharding(mesh, shd.logical_spec(("batch",) + (None,) * (ndim - 1),
                                              cfg.mesh.rules))


def global_batch(cfg: Config, mesh: Mesh | None, host_batch: dict) -> dict:
  """Host-local numpy batches -> global jax arrays sharded over the batch axes."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, host_batch)
  return {k: jax.make_array_from_process_local_data(batch_sharding(cfg, mesh, v.ndim), v)
          for k, v in host_batch.items()}


LossFn = Callable[..., tuple[jax.Array, dict]]


def make_train_step(cfg: Config, mesh: Mesh | None, optimizer: optax.GradientTransformation,
                    loss_fn: LossFn, counts_fn: Callable, finalize_fn: Callable,
                    shardings=None):
  """A jitted `step(state, batch) -> (state, metrics)`.

  loss_fn(params, micro_batch, total, shard) -> (loss, metric sums); counts_fn(batch)
  -> the whole batch's normalisers; finalize_fn(sums, total) -> metric means.
  With train.grad_accum = A the batch is split into A interleaved micro-batches
  (rows i, i+A, ...: each device keeps its own rows) and their gradients summed.
  A step whose loss or gradient is not finite leaves the state unchanged and
  reports `finite = 0`.
  """
  A = cfg.train.grad_accum
  shard = shd.sharder(cfg, mesh)

  def step(state: TrainState, batch):
    total = counts_fn(batch)
    grad_fn = jax.value_and_grad(lambda p, mb: loss_fn(p, mb, total, shard), has_aux=True)
    if A == 1:
      (loss, sums), grads = grad_fn(state.params, batch)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, mb):
        (l, s), g = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, carry, (l, s, g)), None

      shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (loss, sums, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]), micro)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + finite.astype(jnp.int32),
                              params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
               **finalize_fn(sums, total)}
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  # The batch keeps the sharding `global_batch` gave it.
  return jax.jit(step, in_shardings=(shardings, None),
                 out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                 donate_argnums=0)
