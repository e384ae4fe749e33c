"""Device mesh, logical-axis rules and the shardings they give.

Parameters and activations carry logical axis names (see `config.DEFAULT_RULES`);
the rule table in the config maps them to the mesh axes (data, fsdp, tensor).
Models receive a `Sharder`, the one place where activation constraints are made.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtcot_jax.config import Config, ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """The mesh shape with a -1 axis filled; raises ConfigError if it does not fit."""
  shape = list(mesh_cfg.shape)
  fixed = math.prod(a for a in shape if a != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh={dict(zip(AXES, mesh_cfg.shape))} does not fit {num_devices} devices: "
          f"the fixed axes' product {fixed} must divide the device count")
    shape[shape.index(-1)] = num_devices // fixed
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f"mesh={dict(zip(AXES, mesh_cfg.shape))} needs {math.prod(shape)} devices but "
        f"{num_devices} are available; accepted: axis sizes whose product is {num_devices} "
        "(or one axis -1)")
  return tuple(shape)


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices).

  Also checks that the global batch splits over the batch axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg.mesh, len(devices))
  batch_split = batch_shards(cfg, shape)
  if cfg.train.batch_size % batch_split:
    raise ConfigError(
        f"train.batch_size={cfg.train.batch_size} is not divisible by the {batch_split} "
        f"batch shards of mesh {dict(zip(AXES, shape))}; accepted: a multiple of {batch_split}")
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # noqa: BLE001 -- e.g. CPU devices without a topology
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, AXES)


def batch_shards(cfg: Config, shape: Sequence[int]) -> int:
  """How many ways the 'batch' logical axis is split on a mesh of `shape`."""
  rules = dict(cfg.mesh.rules)
  axes = rules.get("batch")
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  sizes = dict(zip(AXES, shape))
  return math.prod(sizes[a] for a in axes)


def logical_spec(names: Sequence[str | None], rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(tuple(names), rules)


@dataclasses.dataclass(frozen=True)
class Sharder:
  """Constrains activations to their logical sharding; a no-op without a mesh."""
  mesh: Mesh | None = None
  rules: tuple[tuple[str, Any], ...] = ()

  def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    if self.mesh is None:
      return x
    spec = logical_spec(names, self.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def sharding(self, names: Sequence[str | None]) -> NamedSharding | None:
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, logical_spec(names, self.rules))


def sharder(cfg: Config, mesh: Mesh | None) -> Sharder:
  return Sharder(mesh, cfg.mesh.rules if mesh is not None else ())


def tree_shardings(logical_specs, mesh: Mesh, rules):
  """Logical PartitionSpecs (a pytree) -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes, logical_specs, mesh: Mesh, rules) -> None:
  """Raises ConfigError if a parameter dimension does not split over its mesh axes."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  flat_specs = jax.tree_util.tree_leaves(
      logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, leaf), names in zip(flat_shapes, flat_specs):
    mesh_axes = logical_spec(tuple(names), rules)
    for dim, axes in zip(leaf.shape, mesh_axes):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      split = math.prod(sizes[a] for a in axes)
      if dim % split:
        raise ConfigError(
            f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} has a dimension "
            f"{dim} that the mesh axes {axes} (size {split}) cannot split; accepted: a mesh "
            f"whose axes divide it, or rules that map its logical axes {tuple(names)} elsewhere")
