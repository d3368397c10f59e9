"""Grouped matmul kernels (pallas_kernels): metadata goldens, forward and both gradients against the
jnp reference under hypothesis-drawn group sizes, both lowerings in interpret mode, lowering for real
TPU / GPU targets, expert-parallel offsets, argument errors, and the MoE layer's backends agreeing.

Interpret mode costs per grid step (on a CPU, a grouped matmul of m=4096, k=n=1024 took 38 s with 128^3
tiles and 0.3 s with 512x1024x1024 tiles), so shapes are small and tiles are large; every jitted
function is built once per configuration and hypothesis varies only the traced group sizes.
"""
from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gmm, gmm_reference, kernel, metadata, tgmm, tgmm_reference

# m, k, n are not tile multiples (tiles 128 / 64): partial row tiles, a partial last k block, partial n.
M, K, N, E = 300, 200, 136, 6
TILING = {"mosaic": (128, 128, 128), "triton": (64, 64, 32)}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference entry


def _close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale)


def _operands(dtype, *, transpose_rhs=False, num_local=E, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((num_local, N, K) if transpose_rhs else (num_local, K, N)), dtype)
    c = jnp.asarray(rng.standard_normal((M, N)), dtype)  # cotangent: not all ones
    return x, w, c


def _value_and_grads(fn_name: str, lowering: str, transpose_rhs: bool, num_local: int):
    """jit(x, w, sizes, c, offset) -> (y, dx, dw) for the kernel or the reference (cached per config)."""
    return _value_and_grads_cached(fn_name, lowering if fn_name == "kernel" else None, transpose_rhs, num_local)


@functools.cache
def _value_and_grads_cached(fn_name, lowering, transpose_rhs, num_local):
    del num_local  # part of the cache key only: the shapes differ

    def f(x, w, sizes, c, offset):
        if fn_name == "kernel":
            y = lambda x, w: gmm(x, w, sizes, group_offset=offset, tiling=TILING[lowering],
                                 transpose_rhs=transpose_rhs, lowering=lowering, interpret=True)
        else:
            y = lambda x, w: gmm_reference(x, w, sizes, group_offset=offset, transpose_rhs=transpose_rhs)
        out, vjp = jax.vjp(y, x, w)
        return (out,) + vjp(c)
    return jax.jit(f)


def _sizes_from_cuts(total, cuts):
    """E group sizes summing to `total`: the gaps between sorted cut points in [0, total]."""
    edges = [0] + sorted(min(c, total) for c in cuts) + [total]
    return np.diff(edges).astype(np.int32)


group_sizes_st = st.builds(
    _sizes_from_cuts, st.integers(0, M + 40), st.lists(st.integers(0, M + 40), min_size=E - 1, max_size=E - 1))


# ---- metadata goldens ----

# sizes [3, 0, 9, 2], m = 16 rows, tm = 8: group 0 rows [0, 3), group 1 empty at 3, group 2 [3, 12),
# group 3 [12, 14), rows [14, 16) past the sum. Tile 0 = rows 0-7, tile 1 = rows 8-15.
SIZES_GOLDEN = np.int32([3, 0, 9, 2])


_gmm_metadata = jax.jit(metadata.gmm_metadata, static_argnames=("m", "tm", "num_local_groups"))
_tgmm_metadata = jax.jit(metadata.tgmm_metadata, static_argnames=("m", "tm", "num_local_groups"))


def _meta_np(meta):
    return {f: np.asarray(getattr(meta, f)) for f in
            ("tile_I", "group_I", "lo_I", "hi_I", "real_I", "first_I", "last_I", "num_items")}


def test_gmm_metadata_golden():
    # Segments: before [0, 0) (no item), g0 [0, 3), g1 empty (no item), g2 [3, 12), g3 [12, 14),
    # after [14, 16). g2 straddles tiles 0 and 1 -> two items; tile 1 is visited by g2, g3 and "after".
    # Items: (t0, g0, 0-3), (t0, g2, 3-8), (t1, g2, 8-12), (t1, g3, 12-14), (t1, after, 14-16):
    # 5 items of max 2 tiles + 4 groups + 1 = 7; the "after" item has real = 0 (writes zeros) and
    # its group clipped to 3; the 2 idle items repeat tile 1 / group 3 and own no rows.
    m = _meta_np(_gmm_metadata(jnp.asarray(SIZES_GOLDEN), m=16, tm=8, num_local_groups=4))
    assert int(m["num_items"]) == 5
    np.testing.assert_array_equal(m["tile_I"], [0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(m["group_I"], [0, 2, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(m["lo_I"], [0, 3, 8, 12, 14, 0, 0])
    np.testing.assert_array_equal(m["hi_I"], [3, 8, 12, 14, 16, 0, 0])
    np.testing.assert_array_equal(m["real_I"], [1, 1, 1, 1, 0, 0, 0])


def test_tgmm_metadata_golden():
    # Local groups only, empty g1 visited once (rows [3, 3) in tile 3 // 8 = 0) so its gradient is
    # written: (t0, g0, 0-3), (t0, g1, 3-3), (t0, g2, 3-8), (t1, g2, 8-12), (t1, g3, 12-14).
    # max items = 2 tiles + 4 groups - 1 = 5. g2 zeroes at its first item and stores at its last.
    m = _meta_np(_tgmm_metadata(jnp.asarray(SIZES_GOLDEN), m=16, tm=8, num_local_groups=4))
    assert int(m["num_items"]) == 5
    np.testing.assert_array_equal(m["tile_I"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(m["group_I"], [0, 1, 2, 2, 3])
    np.testing.assert_array_equal(m["lo_I"], [0, 3, 3, 8, 12])
    np.testing.assert_array_equal(m["hi_I"], [3, 3, 8, 12, 14])
    np.testing.assert_array_equal(m["real_I"], [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(m["first_I"], [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(m["last_I"], [1, 1, 0, 1, 1])


def test_metadata_golden_with_group_offset():
    # This device holds global groups 1 and 2 (offset 1, 2 local groups). Global group 0's rows
    # [0, 3) and rows [12, 16) (group 3 and past the sum) belong to no local group.
    # gmm items: (t0, none, 0-3), (t0, local 1, 3-8), (t1, local 1, 8-12), (t1, none, 12-16);
    # max = 2 + 2 + 1 = 5, one idle item.
    m = _meta_np(_gmm_metadata(jnp.asarray(SIZES_GOLDEN), m=16, tm=8, group_offset=1, num_local_groups=2))
    assert int(m["num_items"]) == 4
    np.testing.assert_array_equal(m["tile_I"][:4], [0, 0, 1, 1])
    np.testing.assert_array_equal(m["group_I"][:4], [0, 1, 1, 1])
    np.testing.assert_array_equal(m["lo_I"][:4], [0, 3, 8, 12])
    np.testing.assert_array_equal(m["hi_I"][:4], [3, 8, 12, 16])
    np.testing.assert_array_equal(m["real_I"], [0, 1, 1, 0, 0])
    # tgmm: local 0 (global 1) is empty at row 3 -> one item in tile 0; local 1 spans two tiles.
    t = _meta_np(_tgmm_metadata(jnp.asarray(SIZES_GOLDEN), m=16, tm=8, group_offset=1, num_local_groups=2))
    assert int(t["num_items"]) == 3
    np.testing.assert_array_equal(t["group_I"][:3], [0, 1, 1])
    np.testing.assert_array_equal(t["tile_I"][:3], [0, 0, 1])
    np.testing.assert_array_equal(t["real_I"], [0, 1, 1])


def test_tile_group_range_golden():
    # GPU view, tm = 8: tile 0 (rows 0-7) touches g0 [0,3) and g2 [3,12); the range [0, 3) includes
    # the empty g1, which the kernel skips. Tile 1 (rows 8-15) touches g2 and g3 -> [2, 4).
    glo, ghi, start, end = jax.jit(metadata.tile_group_range, static_argnames=("m", "tm", "num_local_groups"))(jnp.asarray(SIZES_GOLDEN), m=16, tm=8, num_local_groups=4)
    np.testing.assert_array_equal(glo, [0, 2])
    np.testing.assert_array_equal(ghi, [3, 4])
    np.testing.assert_array_equal(start, [0, 3, 3, 12])
    np.testing.assert_array_equal(end, [3, 3, 12, 14])


@pytest.mark.parametrize("m,tm,num_local", [(40, 8, 4), (40, 8, 2), (12, 1, 3)])
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=4, max_size=4), data=st.data())
def test_metadata_invariants(m, tm, num_local, sizes, data):
    """gmm: every row owned by exactly one item, each tile's items consecutive, item count within the
    static bound. tgmm: exactly the local groups' rows owned, one first/last per local group."""
    num_groups = len(sizes)
    offset = data.draw(st.integers(0, num_groups - num_local))
    gs = jnp.asarray(np.int32(sizes))
    ends = np.minimum(np.cumsum(sizes), m)
    starts = np.concatenate([[0], ends[:-1]])
    local_rows = np.zeros(m, bool)
    local_rows[starts[offset]:ends[offset + num_local - 1]] = True
    for kind in ("gmm", "tgmm"):
        build = _gmm_metadata if kind == "gmm" else _tgmm_metadata
        md = _meta_np(build(gs, m=m, tm=tm, group_offset=offset, num_local_groups=num_local))
        n_items = int(md["num_items"])
        assert 1 <= n_items <= len(md["tile_I"])
        owned = np.zeros(m, int)
        for i in range(len(md["tile_I"])):
            lo, hi, tile = md["lo_I"][i], md["hi_I"][i], md["tile_I"][i]
            if i >= n_items:
                assert lo == hi and md["real_I"][i] == md["first_I"][i] == md["last_I"][i] == 0
                continue
            assert tile * tm <= lo <= hi <= (tile + 1) * tm
            owned[lo:hi] += 1
            if md["real_I"][i]:  # a real item's rows are its group's rows
                g = offset + md["group_I"][i]
                assert starts[g] <= lo and hi <= ends[g]
        assert np.all(np.diff(md["tile_I"]) >= 0), "items of a tile must be consecutive"
        if kind == "gmm":
            np.testing.assert_array_equal(owned, np.ones(m, int))
        else:
            np.testing.assert_array_equal(owned, local_rows.astype(int))
            assert md["first_I"][:n_items].sum() == md["last_I"][:n_items].sum() == num_local


# ---- kernels against the reference ----

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lowering", ["mosaic", "triton"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=group_sizes_st)
@example(sizes=np.int32([0, 0, M, 0, 0, 0]))  # every row in one group, the others empty
@example(sizes=np.int32([0, 0, 0, 0, 0, 0]))  # nothing routed: all rows past the sum
@example(sizes=np.int32([37, 0, 91, 1, 0, 44]))  # sum 173 < m; sizes not tile multiples
@example(sizes=np.int32([200, 0, 0, 0, 150, 50]))  # sum 400 > m: cut at m (group 4 loses 50 rows)
def test_gmm_value_and_grads_match_reference(lowering, dtype, sizes):
    x, w, c = _operands(dtype)
    gs = jnp.asarray(sizes)
    off = jnp.int32(0)
    y, dx, dw = _value_and_grads("kernel", lowering, False, E)(x, w, gs, c, off)
    ry, rdx, rdw = _value_and_grads("reference", lowering, False, E)(x, w, gs, c, off)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    _close(y, ry, dtype)
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype)
    used = min(int(sizes.sum()), M)  # rows past the sum: exactly zero output and zero gradient
    assert not np.any(np.asarray(y[used:], np.float32)) and not np.any(np.asarray(dx[used:], np.float32))
    empty = np.flatnonzero(sizes == 0)
    assert not np.any(np.asarray(dw[empty], np.float32)), "empty groups get a zero weight gradient"


@pytest.mark.parametrize("lowering", ["mosaic", "triton"])
@settings(max_examples=6, deadline=None)
@given(sizes=group_sizes_st, offset=st.integers(0, 3))
def test_transposed_rhs_and_group_offset(lowering, sizes, offset):
    """transpose_rhs (rhs [E_local, n, k]) with a traced expert offset: 3 of the 6 groups are local."""
    x, w, c = _operands(jnp.float32, transpose_rhs=True, num_local=3, seed=1)
    args = (x, w, jnp.asarray(sizes), c, jnp.int32(offset))
    for got, want in zip(_value_and_grads("kernel", lowering, True, 3)(*args),
                         _value_and_grads("reference", lowering, True, 3)(*args)):
        _close(got, want, jnp.float32)


@pytest.mark.parametrize("lowering", ["mosaic", "triton"])
def test_expert_shards_sum_to_the_full_gmm(lowering):
    """Two devices' worth of experts (offset 0 and 3, 3 local groups each): every row is computed by
    exactly one shard and the other returns zeros there, so the shards' outputs add up to the full gmm
    and their weight gradients concatenate to the full weight gradient."""
    x, w, c = _operands(jnp.float32, seed=2)
    gs = jnp.int32([40, 0, 77, 63, 1, 90])
    f = jax.jit(lambda x, w, off: gmm(x, w, gs, group_offset=off, tiling=TILING[lowering], lowering=lowering,
                                      interpret=True))
    t = jax.jit(lambda x, c, off: tgmm(x.T, c, gs, num_local_groups=3, group_offset=off, tiling=TILING[lowering],
                                       lowering=lowering, interpret=True))
    parts = [f(x, w[s:s + 3], jnp.int32(s)) for s in (0, 3)]
    _close(parts[0] + parts[1], gmm_reference(x, w, gs), jnp.float32)
    dws = [t(x, c, jnp.int32(s)) for s in (0, 3)]
    _close(jnp.concatenate(dws), tgmm_reference(x.T, c, gs), jnp.float32)


def test_expert_parallel_shard_map(eight_devices):
    """Experts sharded over 8 devices, one each, offset = axis_index: psum of the local outputs and
    the gathered weight gradients match the unsharded reference (check_vma=False: interpreted kernel)."""
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    P = jax.sharding.PartitionSpec
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((8, 64, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((96, 32)), jnp.float32)
    gs = jnp.int32([10, 0, 30, 7, 0, 25, 20, 1])  # sum 93 < 96

    def local(x, w_local, gs, c):
        off = jax.lax.axis_index("expert")
        y, vjp = jax.vjp(lambda x, w: gmm(x, w, gs, group_offset=off, lowering="mosaic", interpret=True), x, w_local)
        dx, dw = vjp(c)
        return jax.lax.psum(y, "expert"), jax.lax.psum(dx, "expert"), dw

    rep = jax.sharding.NamedSharding(mesh, P())
    args = (jax.device_put(x, rep), jax.device_put(w, jax.sharding.NamedSharding(mesh, P("expert"))),
            jax.device_put(gs, rep), jax.device_put(c, rep))
    y, dx, dw = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert"), P(), P()),
                                      out_specs=(P(), P(), P("expert")), check_vma=False))(*args)
    ry, vjp = jax.vjp(lambda x, w: gmm_reference(x, w, gs), x, w)
    rdx, rdw = vjp(c)
    for got, want in ((y, ry), (dx, rdx), (dw, rdw)):
        _close(got, want, jnp.float32)


def test_tpu_interpreter_with_nan_garbage():
    """The TPU interpreter fills uninitialised memory and the out-of-bounds part of partial edge blocks
    with NaN: correct results show the k / row masks keep every garbage value out of the sums.
    k = n = 136 with 128-wide tiles: the second k and n blocks are 8 wide and 120 NaN."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((40, 136)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 136, 136)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((40, 136)), jnp.float32)
    gs = jnp.int32([0, 17, 20])  # sum 37 < 40; one row tile (tm >= m) padded to 40
    params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="uninitialized")
    y = kernel.gmm(x, w, gs, tiling=(128, 128, 128), lowering="mosaic", interpret=params)
    _close(y, gmm_reference(x, w, gs), jnp.float32)
    dw = kernel.tgmm(x.T, c, gs, tiling=(128, 128, 128), lowering="mosaic", interpret=params)
    _close(dw, tgmm_reference(x.T, c, gs), jnp.float32)


# ---- real targets: the kernels lower for TPU (Mosaic) and GPU (Triton) without the hardware ----

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("lowering,platform,target", [
    ("mosaic", "tpu", "tpu_custom_call"), ("triton", "cuda", "__gpu$xla.gpu.triton")])
def test_lowers_for_hardware(lowering, platform, target, dtype):
    """jit(grad) lowered for the hardware platform: gmm, gmm with transposed rhs (dx) and tgmm (dw)
    each become one kernel custom call; the lowering applies the hardware's block-shape rules."""
    x, w, c = _operands(dtype)
    sizes = jnp.int32([37, 0, 91, 1, 0, 44])

    def loss(x, w):  # needs the output itself, so the forward kernel is not dead code
        return 0.5 * jnp.sum(gmm(x, w, sizes, lowering=lowering, interpret=False).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(target) == 3


# ---- cost estimate and argument errors ----

def test_cost_estimate_golden():
    # gmm, m=300 k=200 n=136, tiles (128, 128, 128) -> 3 m tiles, 2 k tiles, 2 n tiles, 6 groups, bf16.
    # flops 2*300*200*136 = 16_320_000. Read: lhs once per n tile 300*200*2 = 120_000 elements, rhs a
    # [200, 128] slab per (item, n tile): (3 + 6) * 200 * 128 * 2 = 460_800 -> 580_800 * 2 bytes;
    # written 300*136*2 bytes = 81_600. Total 1_161_600 + 81_600 = 1_243_200.
    est = kernel.cost_estimate(kernel="gmm", m=300, k=200, n=136, num_groups=6, tiling=(128, 128, 128),
                               itemsize=2, out_itemsize=2)
    assert (est.flops, est.transcendentals, est.bytes_accessed) == (16_320_000, 0, 1_243_200)


def _call(**kw):
    x, w, _ = _operands(jnp.float32)
    args = dict(lhs=x, rhs=w, group_sizes=jnp.zeros((E,), jnp.int32), lowering="mosaic", interpret=True)
    args.update(kw)
    return gmm(args.pop("lhs"), args.pop("rhs"), args.pop("group_sizes"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(tiling=(128, 100, 128)), "tk=100 must be a multiple of 128"),
    (dict(tiling=(128, 128)), "three positive ints"),
    (dict(tiling=(64, 128, 128)), "tm=64 must be a multiple of 128 .* lhs_t"),  # only tgmm (dw) rejects it
    (dict(tiling=(128, 128, 128), lowering="triton"), None),
    (dict(tiling=(96, 64, 64), lowering="triton"), "tm=96 must be a power of two"),
    (dict(lowering="cuda"), "lowering='cuda' is not one of"),
    (dict(rhs=jnp.zeros((E, K, N), jnp.bfloat16)), "lhs dtype float32 != rhs dtype bfloat16"),
    (dict(rhs=jnp.zeros((E, K + 1, N))), "lhs has k=200 columns"),
    (dict(group_sizes=jnp.zeros((E - 1,), jnp.int32)), "rhs holds 6 groups but group_sizes has only 5"),
    (dict(group_sizes=jnp.zeros((E,), jnp.float32)), "group_sizes must be a 1-D integer array"),
    (dict(group_offset=1), r"group_offset=1 must be in \[0, 0\]"),
    (dict(lhs=jnp.zeros((M, K), jnp.int32)), "lhs dtype int32 is not one of"),
])
def test_argument_errors(kw, match):
    if match is None:  # the triton tiling is valid: no error (traced, not run)
        assert jax.eval_shape(lambda: _call(**kw)).shape == (M, N)
        return
    with pytest.raises(ValueError, match=match):
        _call(**kw)


# ---- the MoE layer: every expert backend computes the same function ----

def test_moe_layer_backends_agree():
    """Same parameters, same input: the pallas, ragged_dot and blocked dropless backends and the
    gather / einsum capacity paths (C = S, so nothing can drop) give the same output, the same
    gradients for the input and every parameter, and the same aux losses. Experts are SwiGLU with
    biases, so all three expert matmuls and both bias paths go through the kernel's custom_vjp."""
    import dataclasses

    from flax import nnx

    from moe_jax import MoEConfig, MoELayer

    B, L, D, F = 2, 16, 16, 32
    cap = MoEConfig(d_model=D, d_ff=F, num_experts=4, num_experts_per_token=2, min_capacity=1,
                    capacity_factor=4.0, eval_capacity_factor=4.0, expert_bias=True)  # C = min(S, 4*16*2/4) = S
    assert cap.capacity(L, True) == L
    variants = {
        "gather": cap,
        "einsum": dataclasses.replace(cap, dispatch="einsum"),
        **{b: dataclasses.replace(cap, capacity_factor=None, eval_capacity_factor=None, expert_backend=b,
                                  dropless_block_size=8) for b in ("ragged_dot", "blocked", "pallas")},
    }
    layers = {"gather": MoELayer(cap, rngs=nnx.Rngs(0))}
    for name, cfg in variants.items():
        if name != "gather":
            layers[name] = MoELayer(cfg, rngs=nnx.Rngs(1))
            nnx.update(layers[name], nnx.state(layers["gather"]))
    x = jax.random.normal(jax.random.key(0), (B, L, D))

    @nnx.jit
    def value_and_grads(layer, x):
        def loss(layer, x):
            y, aux = layer(x, train=True)
            return 0.5 * jnp.sum(y ** 2) + aux.losses["aux_loss"], (y, aux)

        (_, (y, aux)), (g_layer, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return y, aux.losses, g_x, nnx.state(g_layer, nnx.Param)

    results = {name: value_and_grads(layer, x) for name, layer in layers.items()}
    ref_leaves = jax.tree.leaves(results["gather"])
    assert all(np.abs(np.asarray(leaf)).max() > 0 for leaf in jax.tree.leaves(results["gather"][3])), \
        "every parameter gets a gradient (a test of the test)"
    for name, res in results.items():
        leaves = jax.tree.leaves(res)
        assert len(leaves) == len(ref_leaves)
        for a, b in zip(leaves, ref_leaves):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
