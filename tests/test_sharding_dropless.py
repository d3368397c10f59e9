"""Dropless expert parallelism on 8 simulated CPU devices: the padded exchange's output, losses, metrics and
gradients equal the single-device dropless layer's, under skewed routing that a capacity buffer would drop;
the ragged exchange lowers for TPU and GPU (ragged_all_to_all in the lowered module); bad settings fail
before compile, naming the field."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import sharding as sh
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer

RTOL, ATOL = 1e-5, 1e-6
B, L, D = 8, 16, 16


def dropless(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=32, num_experts=8, num_experts_per_token=2, capacity_factor=None,
                eval_capacity_factor=None, expert_backend="ragged_dot", router_init_scale=3.0)
    return MoEConfig(**{**base, **kw})


def assert_trees_close(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        y = np.asarray(y)
        scale = float(np.max(np.abs(y))) if y.size and y.dtype.kind == "f" else 0.0
        np.testing.assert_allclose(np.asarray(x), y, rtol=RTOL, atol=max(ATOL, RTOL * scale),
                                   err_msg=jax.tree_util.keystr(path))


def layer_fn(cfg: MoEConfig, plan):
    """jit((params, x) -> ((loss, (y, aux)), grads wrt (params, x))) and the initial params."""
    graphdef, params, rest = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)

    def loss_fn(params, x_BLD):
        model = sh.apply_expert_parallel(nnx.merge(graphdef, params, rest), plan)
        y_BLD, aux = model(x_BLD, train=True)
        return 0.5 * jnp.sum(y_BLD ** 2) + aux.losses["aux_loss"], (y_BLD, aux)

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), params


def skewed_input(cfg: MoEConfig, params, skew: float):
    """Tokens pushed along expert 0's gate column: with skew 3, most choices go to expert 0."""
    w_DE = np.asarray(params["router"]["w_DE"][...])
    x_BLD = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, L, D)))
    return jnp.asarray(x_BLD + skew * w_DE[:, 0] / np.linalg.norm(w_DE[:, 0]))


def rows_to_peers(cfg, params, x_BLD, shards: int, n: int):
    """[batch shards, peers]: the choices each device sends to each of the n devices of its expert axis
    (host-side top-k of the router logits; the batch is split over `shards` devices in order)."""
    logits = np.asarray(x_BLD.reshape(-1, D) @ np.asarray(params["router"]["w_DE"][...]))
    experts = np.argsort(-logits, axis=-1)[:, :cfg.top_k].reshape(shards, -1)
    return np.stack([np.bincount(e // (cfg.num_routed_experts // n), minlength=n) for e in experts])


@functools.lru_cache(maxsize=None)
def reference(cfg: MoEConfig):
    """The single-device layer's jitted function, compiled once per config for the whole file."""
    return jax.jit(layer_fn(cfg, None)[0])


def run_both(cfg: MoEConfig, plan, *inputs):
    """For each input: ((loss, (y, aux)), grads) of the single-device layer and of the layer under `plan`."""
    got_fn, params = layer_fn(cfg, plan)
    got_fn = jax.jit(got_fn)
    return params, [(reference(cfg)(params, x), got_fn(params, x)) for x in inputs]


def assert_same(ref, got):
    """Loss, output, every loss and metric (aux_loss, balance and z-loss, loads) and every gradient."""
    (ref_loss, (ref_y, ref_aux)), ref_grads = ref
    (loss, (y, aux)), grads = got
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    np.testing.assert_allclose(y, ref_y, rtol=RTOL, atol=ATOL)
    assert_trees_close((aux.losses, aux.metrics), (ref_aux.losses, ref_aux.metrics))
    assert_trees_close(grads, ref_grads)  # every parameter (router, experts) and the input
    assert float(aux.metrics["dropped_fraction"]) == 0


@pytest.mark.parametrize("kw,sizes", [
    (dict(num_experts_per_token=1), dict(expert=8)),  # one expert per device
    (dict(expert_backend="blocked", dropless_block_size=4), dict(data=2, expert=4)),  # two per device, padded blocks
], ids=["top1_expert8", "top2_blocked_data2_expert4"])
def test_padded_exchange_matches_single_device_under_skewed_routing(eight_devices, kw, sizes):
    cfg = dropless(**kw)
    plan = sh.ExpertParallel(sh.make_mesh(sh.ShardingConfig(**sizes)))
    assert plan.exchange_kind == "padded"  # 'auto' on CPU
    params = layer_fn(cfg, None)[1]
    x_BLD = skewed_input(cfg, params, 3.0)
    _, [(ref, got)] = run_both(cfg, plan, x_BLD)
    assert_same(ref, got)
    # The routing is skewed: expert 0 takes over 40 % of the choices, 3x its share, more than a capacity
    # buffer at factor 1.0 holds (the capacity path would drop the rest).
    load_E = np.asarray(ref[0][1][1].metrics["routed_per_expert"])
    assert load_E[0] > 0.4 * load_E.sum() > 0 and load_E[0] > 3 * load_E.mean()


def test_bounded_padded_exchange_falls_back_when_routing_overflows(eight_devices):
    """Top-1 with dropless_buffer_factor=1.2 on expert=2 (x model=2: tensor-parallel experts, x data=2): each
    device holds 8 x 16 / 4 = 32 tokens, so buffers of ceil(1.2 * 32 / 2) = 20 rows per peer. Unskewed routing
    fits them (at most 19 rows to one peer); skewed routing overflows them (up to 32) and takes the
    worst-case exchange. Both equal the single-device layer (one compiled function, both branches)."""
    cfg = dropless(num_experts_per_token=1)
    plan = sh.ExpertParallel(sh.make_mesh(sh.ShardingConfig(data=2, expert=2, model=2)), dropless_buffer_factor=1.2)
    params = layer_fn(cfg, None)[1]
    balanced, skewed = skewed_input(cfg, params, 0.0), skewed_input(cfg, params, 3.0)
    assert plan.dropless(cfg.num_routed_experts).rows_per_peer(32) == 20
    # The expert axis pairs the devices of each data shard: rows each of the 4 batch shards sends to each peer.
    assert rows_to_peers(cfg, params, balanced, 4, 2).max() <= 20 < rows_to_peers(cfg, params, skewed, 4, 2).max()
    _, results = run_both(cfg, plan, balanced, skewed)
    for ref, got in results:
        assert_same(ref, got)


# ---- the ragged exchange: its arithmetic on CPU with an emulated collective; lowered for TPU and GPU ----

def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name, axis_index_groups=None):
    """`jax.lax.ragged_all_to_all` as its docstring specifies it, from all_gather and a scatter (XLA:CPU has no
    ragged all-to-all): slice i of each device goes to device i // (N / n), at that device's output_offsets[i]."""
    del recv_sizes, axis_index_groups
    n = jax.lax.axis_size(axis_name)
    N, M = input_offsets.shape[0], operand.shape[0]
    me = jax.lax.axis_index(axis_name)
    ops, in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)
                                   for a in (operand, input_offsets, send_sizes, output_offsets))
    mine = me * (N // n) + jnp.arange(N // n)  # the slices every source sends to this device
    r = jnp.arange(M)
    src_rows = jnp.minimum(in_off[:, mine, None] + r, M - 1)  # [n, N / n, M]
    rows = jnp.take_along_axis(ops[:, None], src_rows[..., None], axis=2)  # [n, N / n, M, D]
    dest = jnp.where(r < sizes[:, mine, None], out_off[:, mine, None] + r, output.shape[0])
    return output.at[dest.reshape(-1)].set(rows.reshape(-1, operand.shape[1]), mode="drop")


def test_ragged_exchange_arithmetic_matches_single_device(eight_devices, monkeypatch):
    """The ragged path's offsets and sizes (slices out, expert-major landing with block padding, and back),
    run through an emulation of ragged_all_to_all that follows its documented semantics: output, losses and
    gradients equal the single-device layer under skewed routing (the same case as the padded test)."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(sh.ExpertParallel, "platform", property(lambda self: None))  # let 'ragged' run here
    cfg = dropless(expert_backend="blocked", dropless_block_size=4)
    plan = sh.ExpertParallel(sh.make_mesh(sh.ShardingConfig(data=2, expert=4)), dropless_exchange="ragged")
    params = layer_fn(cfg, None)[1]
    _, [(ref, got)] = run_both(cfg, plan, skewed_input(cfg, params, 3.0))
    assert_same(ref, got)


def test_ragged_exchange_lowers_for_tpu_and_gpu(eight_devices):
    """Forward and backward of the layer with dropless_exchange='ragged' (receive buffers bounded, with the
    worst-case fallback) on an 8-way expert axis, exported for TPU and CUDA from this CPU-only machine (over
    the abstract mesh: XLA:CPU cannot run it). The module holds the ragged all-to-alls (out and back, and
    their transposes) and no plain all-to-all of rows."""
    cfg = dropless()
    mesh = sh.make_mesh(sh.ShardingConfig(expert=8))
    plan = sh.ExpertParallel(mesh.abstract_mesh, dropless_exchange="ragged", dropless_buffer_factor=2.0)
    assert plan.exchange_kind == "ragged"
    fn, params = layer_fn(cfg, plan)
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    exported = jax.export.export(
        jax.jit(fn), platforms=["tpu", "cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
    )(jax.tree.map(abstract, params), jax.ShapeDtypeStruct((B, L, D), jnp.float32))
    text = exported.mlir_module()
    assert exported.platforms == ("tpu", "cuda")
    # Dispatch and return, forward and backward, in both branches: the receive buffer bounded to
    # 8 x ceil(2.0 x 32 / 8) = 64 rows, and the worst case, 8 x 32 = 256 rows, where routing overflows it.
    assert text.count("@ragged_all_to_all") == 8
    assert {"tensor<64x16xf32>", "tensor<256x16xf32>"} <= set(re.findall(r"tensor<\d+x16xf32>", text))
    # benchmarks/collectives.py reads the same module: 8 ragged all-to-alls, each sending from the 16 x 2 = 32
    # sorted rows (32 x 16 floats = 2048 B) into a 64- or 256-row receive buffer (the return's: 32 rows).
    from benchmarks.collectives import parse_stablehlo_collectives

    ragged = [c for c in parse_stablehlo_collectives(text, 8) if c["op"] == "ragged-all-to-all"]
    assert len(ragged) == 8 and {c["group"] for c in ragged} == {8}
    assert {c["output_buffer_bytes"] for c in ragged} == {64 * 64, 256 * 64, 32 * 64}
    # Plain all-to-alls only of offsets (the transpose rule exchanges them), never of float rows.
    plain = [line for line in text.splitlines() if '"stablehlo.all_to_all"' in line]
    assert plain and all(re.search(r"\(tensor<\d+xi32>\) -> tensor<\d+xi32>", line) for line in plain), plain


# ---- settings that cannot work fail before compile, naming the field ----

def test_bad_dropless_settings_fail_naming_the_field(eight_devices):
    mesh = sh.make_mesh(sh.ShardingConfig(expert=8))
    with pytest.raises(ValueError, match=r"config.mesh.dropless_exchange='ragged': XLA:CPU does not implement"):
        sh.ExpertParallel(mesh, dropless_exchange="ragged")
    with pytest.raises(ValueError, match=r"config.mesh.dropless_exchange='sparse'"):
        sh.ShardingConfig(dropless_exchange="sparse")
    with pytest.raises(ValueError, match=r"config.mesh.dropless_buffer_factor=0"):
        sh.ShardingConfig(dropless_buffer_factor=0)
    # Dropless routing is no longer refused on an expert-parallel mesh.
    sh.check_moe_layout(dropless(), 8, 16, {"expert": 8})
