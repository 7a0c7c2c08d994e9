"""Sharded == unsharded on 8 fake CPU devices; role meshes are disjoint; bad meshes raise.

The model config has 8 query and 8 KV heads and 8-divisible mlp / vocab sizes, so every
mesh shape below really splits the weights (the plain tiny preset's 2 KV heads would be
replicated on a 4- or 8-way model axis, and the test would prove little).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dream_r_jax.models import KVCache
from dream_r_jax.models.params import path_str
from dream_r_jax.sharding import mesh as mesh_lib
from dream_r_jax.sharding import rules
from dream_r_jax.testing.models import Jitted, fake_devices, random_ids, sharding_config
from dream_r_jax.testing.models import tiny_model

ATOL = 1e-5
BATCH = 8  # divisible by every data-axis size below
AXES = ("data", "model")


@pytest.fixture(scope="module")
def reference():
  """The unsharded model (on one device), its inputs and logits."""
  assert len(fake_devices(8)) == 8
  model = tiny_model(cfg=sharding_config("qwen2"), seed=2)
  ids = random_ids(0, (BATCH, 12), model.cfg.vocab_size)
  return model, ids, np.asarray(Jitted(model)(ids))


def sharded_forward(model, mesh, rule_table):
  """shard_model + jit with in/out shardings; returns (fn, state)."""
  rules.shard_model(model, mesh, rule_table)
  graphdef, state = nnx.split(model)
  state_sh = rules.state_shardings(state, mesh, rule_table)
  ids_sh = rules.activation_sharding(mesh, "batch", None, rules=rule_table)
  out_sh = rules.activation_sharding(mesh, "batch", None, "vocab", rules=rule_table)

  @functools.partial(jax.jit, in_shardings=(state_sh, ids_sh), out_shardings=out_sh)
  def fwd(state, ids):
    return nnx.merge(graphdef, state)(ids)

  return fwd, state


def param_specs(state):
  return {path_str(p): x.sharding for p, x in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("shape, rule_name", [
    ((1, 8), "default"), ((2, 4), "default"), ((4, 2), "default"), ((8, 1), "default"),
    ((2, 4), "fsdp"), ((8, 1), "fsdp"),
])
def test_sharded_forward_equals_unsharded(reference, shape, rule_name):
  model0, ids, want = reference
  rule_table = {"default": rules.DEFAULT_RULES, "fsdp": rules.FSDP_RULES}[rule_name]
  model = tiny_model(cfg=model0.cfg, seed=2)  # a fresh copy: shard_model works in place
  mesh = mesh_lib.make_mesh(shape, AXES)
  fwd, state = sharded_forward(model, mesh, rule_table)
  got = fwd(state, jnp.asarray(ids))

  specs = param_specs(state)
  data, tp = shape
  fsdp = rule_name == "fsdp" and data > 1
  # Each device holds 1/tp of the heads (and, under FSDP, 1/data of the embed rows).
  q = specs["layers.0.attn.q_weight_dnh"]
  assert q.spec == P("data" if fsdp else None, "model", None)
  shard = state["layers"][0]["attn"]["q_weight_dnh"][...].addressable_shards[0].data
  assert shard.shape == (64 // (data if fsdp else 1), 8 // tp, 8)
  if tp > 1 or fsdp:
    assert not q.is_fully_replicated
  else:  # (8, 1) with pure tensor-parallel rules: weights replicated, only the batch splits.
    assert all(s.is_fully_replicated for s in specs.values())
  assert got.sharding.spec == P("data", None, "model")
  assert not got.sharding.is_fully_replicated
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_sharded_cached_decode_equals_unsharded(reference):
  """Prefill then extend with the cache split over batch (data) and KV heads (model)."""
  model0, ids, _ = reference
  lens = np.array([12, 7, 3, 12, 9, 1, 5, 11])
  cfg = model0.cfg
  want_cache = KVCache.init(cfg, BATCH, 16)
  ref = Jitted(model0)
  want1, want_cache = ref(ids, cache=want_cache, num_new=lens)
  want2, _ = ref(ids[:, :2], cache=want_cache)

  model = tiny_model(cfg=cfg, seed=2)
  mesh = mesh_lib.make_mesh((2, 4), AXES)
  rules.shard_model(model, mesh)
  graphdef, state = nnx.split(model)
  kv_sh = NamedSharding(mesh, P("data", None, "model", None))
  row_sh = NamedSharding(mesh, P("data"))
  cache = KVCache.init(cfg, BATCH, 16)
  cache_sh = KVCache(k=(kv_sh,) * cfg.num_layers, v=(kv_sh,) * cfg.num_layers,
                     lengths=row_sh, rope_delta=row_sh)
  cache = jax.device_put(cache, cache_sh)
  ids_sh = rules.activation_sharding(mesh, "batch", None)

  @functools.partial(jax.jit, in_shardings=(rules.state_shardings(state, mesh), ids_sh,
                                            cache_sh, row_sh),
                     out_shardings=(rules.activation_sharding(mesh, "batch", None, "vocab"),
                                    cache_sh),
                     donate_argnums=2)
  def step(state, ids, cache, num_new):
    return nnx.merge(graphdef, state)(ids, cache=cache, num_new=num_new)

  got1, cache = step(state, jnp.asarray(ids), cache, jnp.asarray(lens, jnp.int32))
  got2, cache = step(state, jnp.asarray(ids[:, :2]), cache, jnp.full((BATCH,), 2, jnp.int32))
  assert cache.k[0].sharding.spec == P("data", None, "model", None)
  np.testing.assert_array_equal(np.asarray(cache.lengths), lens + 2)
  valid = np.arange(12)[None] < lens[:, None]
  np.testing.assert_allclose(np.asarray(got1)[valid], np.asarray(want1)[valid], atol=ATOL,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(got2), np.asarray(want2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_draft, num_target", [(4, 4), (2, 6)])
def test_role_meshes_are_disjoint(num_draft, num_target):
  meshes = mesh_lib.role_meshes(num_draft, num_target)
  draft = mesh_lib.mesh_devices(meshes[mesh_lib.Role.DRAFT])
  target = mesh_lib.mesh_devices(meshes[mesh_lib.Role.TARGET])
  assert len(draft) == num_draft and len(target) == num_target
  assert not draft & target
  assert draft | target <= set(jax.devices())

  # Arrays (and a whole model) placed on a role's mesh live only on its devices, and a
  # computation on them stays there.
  for role, devices in ((mesh_lib.Role.DRAFT, draft), (mesh_lib.Role.TARGET, target)):
    mesh = meshes[role]
    x = jax.device_put(np.arange(24.0).reshape(2, 12), NamedSharding(mesh, P(None, "model")))
    assert x.sharding.device_set == devices
    assert {s.device for s in x.addressable_shards} == devices
    y = jax.jit(lambda a: a * 2)(x)
    assert y.sharding.device_set == devices
    np.testing.assert_array_equal(np.asarray(y), 2 * np.arange(24.0).reshape(2, 12))
    model = rules.shard_model(tiny_model(cfg=sharding_config("qwen2"), seed=0), mesh)
    for leaf in jax.tree_util.tree_leaves(nnx.state(model)):
      assert leaf.sharding.device_set == devices


def test_role_meshes_custom_shapes_and_bad_splits():
  meshes = mesh_lib.role_meshes(4, 4, draft_shape=(2, 2), target_shape=(4, 1))
  assert dict(meshes[mesh_lib.Role.DRAFT].shape) == {"data": 2, "model": 2}
  assert dict(meshes[mesh_lib.Role.TARGET].shape) == {"data": 4, "model": 1}
  with pytest.raises(ValueError, match="draft=6 and target=4"):
    mesh_lib.role_meshes(6, 4)
  with pytest.raises(ValueError, match="draft=0"):
    mesh_lib.role_meshes(0)
  with pytest.raises(ValueError, match=r"\(3, 1\).*2 available devices"):
    mesh_lib.role_meshes(2, 6, draft_shape=(3, 1))


def test_mesh_that_does_not_divide_devices_raises():
  with pytest.raises(ValueError, match=r"mesh shape \(3, 2\).*8 available devices"):
    mesh_lib.make_mesh((3, 2), AXES)
  with pytest.raises(ValueError, match=r"mesh shape \(4, 4\)"):
    mesh_lib.make_mesh((4, 4), AXES)
  with pytest.raises(ValueError, match="axis names"):
    mesh_lib.make_mesh((2, 2, 2), AXES)
  with pytest.raises(ValueError, match=r"\(0, 8\)"):
    mesh_lib.make_mesh((0, 8), AXES)
  assert dict(mesh_lib.make_mesh((2, 2), AXES, jax.devices()[:4]).shape) == {
      "data": 2, "model": 2}
