"""Hugging Face checkpoints in and out (moe_jax.hf), checked against transformers to the logit.

Fixtures: tests/fixtures/hf_models/<family>/ -- tiny random models saved by transformers 5.23.0 (torch
2.13.0 CPU) with their logits, every MoE layer's expert ids and 20 greedy tokens, written by
tests/fixtures/make_hf_models.py. These tests need numpy and safetensors only, never torch.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.hf import HFConfigError, hf_config_from_model, load_hf, model_config_from_hf, save_hf
from moe_jax.hf import files as hf_files
from moe_jax.sampling import generate

FIXTURES = Path(__file__).parent / "fixtures" / "hf_models"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2")
FIXTURE_NAMES = FAMILIES + ("deepseek_v3_yarn",)  # a fixture's family is its config.json's model_type
DENSE = ("llama", "qwen2")  # dense models (moe=None): the sources of sparse upcycling
ATOL = 1e-4


def family_of(fixture: str) -> str:
    return json.loads((FIXTURES / fixture / "config.json").read_text())["model_type"]


def reference(family: str) -> dict:
    with np.load(FIXTURES / family / "reference.npz") as f:
        out = {k: f[k] for k in f.files}
    out["meta"] = json.loads(str(out["meta"]))
    return out


def _load(family: str, **kw):
    return load_hf(str(FIXTURES / family), log=lambda s: None, **kw)


@nnx.jit
def logits_and_experts(model, tokens_BL):
    """(logits <float32>[B, L, V], per MoE layer in depth order the router's top-k expert ids <int>[B * L, K]
    sorted ascending), in one compiled call."""
    B, L = tokens_BL.shape
    logits_BLV, _ = model(tokens_BL, train=False)
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    x = jnp.take(model.embed_VD[...], tokens_BL, axis=0)
    experts = []
    for block in model.blocks:
        if block.is_moe:
            h, _ = block.attn(block.attn_norm(x), positions_BL)
            y = block.ffn_norm(x + h)
            expert_GSK, _, _ = block.ffn.router.choices(block.ffn.router.logits(y), None)
            experts.append(jnp.sort(expert_GSK.reshape(B * L, -1), -1))
        x, _, _ = block(x, positions_BL, tokens_BL, train=False, rng=None)
    return logits_BLV, experts


@pytest.mark.parametrize("family", FIXTURE_NAMES)
def test_logits_routing_and_greedy_match_transformers(family):
    """Logits (atol 1e-4), every MoE layer's expert ids (exact) and the 20 greedy tokens (exact).

    The greedy sequence rides in the same batch as the logits check: by causality the logits at position t
    of greedy[:, :-1] are those of the prefix greedy[:, :t + 1], so argmax at t = P - 1 ... P + 18 must give
    the 20 tokens HF's full-forward greedy loop chose (one compiled call per family instead of 21)."""
    ref = reference(family)
    model, info = _load(family)
    assert info.family == family_of(family)
    assert model.cfg.moe.capacity_factor is None and model.cfg.moe.eval_capacity_factor is None  # dropless
    greedy = ref["greedy"]
    P = ref["prompt"].shape[1]
    tokens = np.concatenate([ref["input_ids"], greedy[:, :-1]])  # [3, 24]
    logits, ours = logits_and_experts(model, jnp.asarray(tokens))
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits[:2], ref["logits"], atol=ATOL, rtol=0)
    assert len(ours) == len(ref["expert_ids"]) >= 1
    for layer_ours, layer_hf in zip(ours, ref["expert_ids"]):
        np.testing.assert_array_equal(np.asarray(layer_ours)[: layer_hf.shape[0]], layer_hf)
    np.testing.assert_array_equal(logits[2, P - 1:].argmax(-1), greedy[0, P:])


@pytest.mark.parametrize("family", DENSE)
def test_dense_logits_and_greedy_match_transformers(family):
    """Llama and Qwen2 load as dense ModelConfigs: logits (atol 1e-4) and the 20 greedy tokens (exact), the
    greedy sequence in the same batch as in the MoE test above."""
    ref = reference(family)
    model, info = _load(family)
    assert info.family == family and model.cfg.moe is None and not model.cfg.moe_layer_indices
    assert ref["expert_ids"].shape[0] == 0
    P = ref["prompt"].shape[1]
    tokens = np.concatenate([ref["input_ids"], ref["greedy"][:, :-1]])
    logits = np.asarray(nnx.jit(lambda m, t: m(t, train=False)[0])(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(logits[:2], ref["logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(logits[2, P - 1:].argmax(-1), ref["greedy"][0, P:])


def test_dense_fixtures_exercise_each_family_feature():
    llama, qwen2 = _load("llama")[0].cfg, _load("qwen2")[0].cfg
    assert llama.head_dim == 16 and llama.kv_heads == 2 and not llama.attention_bias and not llama.tie_embeddings
    assert qwen2.attention_bias and qwen2.tie_embeddings and qwen2.rope_theta == 1e6 and qwen2.d_ff == 48


def test_kv_cache_decoding_matches_transformers_greedy():
    """The decode path (prefill, then one token at a time through the KV cache) on the model with the most
    features (q/k/v biases, a shared expert, a dense layer, tied embeddings)."""
    ref = reference("qwen2_moe")
    model, _ = _load("qwen2_moe")
    ids = generate(model, jnp.asarray(ref["prompt"]), max_new_tokens=20, cache_len=32)
    np.testing.assert_array_equal(np.asarray(ids), ref["greedy"])


def test_fixtures_exercise_each_family_feature():
    """The fixtures hold what they are meant to test (else a parity pass could be vacuous)."""
    cfgs = {f: _load(f)[0].cfg for f in FAMILIES}
    assert cfgs["mixtral"].moe.normalize_topk and cfgs["mixtral"].kv_heads == 2
    q2 = cfgs["qwen2_moe"]
    assert q2.attention_bias and q2.tie_embeddings and q2.first_dense_layers == 1 and q2.moe_layer_indices == (1,)
    assert q2.moe.shared_expert_gate and q2.moe.shared_d_ff == 40 and not q2.moe.normalize_topk
    assert q2.d_ff == 48 and q2.norm_eps == 1e-6
    q3 = cfgs["qwen3_moe"]
    assert q3.qk_norm == "head" and q3.head_dim == 16 and q3.moe.normalize_topk and q3.rope_theta == 1e6
    assert cfgs["olmoe"].qk_norm == "full" and not cfgs["olmoe"].moe.normalize_topk
    ds = cfgs["deepseek_v3"]
    assert ds.attention == "mla" and ds.q_lora_rank == 16 and ds.first_dense_layers == 1
    assert ds.moe.score_fn == "sigmoid" and ds.moe.use_correction_bias and ds.moe.n_expert_groups == 4
    assert ds.moe.routed_scaling_factor == 2.5 and ds.moe.num_shared_experts == 1
    v2 = cfgs["deepseek_v2"]
    assert v2.attention == "mla" and v2.q_lora_rank is None and v2.first_dense_layers == 1
    assert v2.moe_layer_indices == (1, 2) and v2.moe.score_fn == "softmax" and not v2.moe.use_correction_bias
    assert v2.moe.n_expert_groups == 4 and v2.moe.topk_groups == 2 and v2.moe.group_score == "max"
    assert v2.moe.routed_scaling_factor == 2.0 and not v2.moe.normalize_topk and v2.moe.shared_width == 32
    assert v2.rope_scaling == "yarn" and v2.yarn_mscale == v2.yarn_mscale_all_dim == 0.707
    yarn = _load("deepseek_v3_yarn")[0].cfg
    L = reference("deepseek_v3_yarn")["input_ids"].shape[1]
    assert yarn.rope_scaling == "yarn" and yarn.yarn_original_max_len == 16 < L
    inv_freq, factor = yarn.rope_frequencies()
    # theta^(-2/8) = 0.1 is neither kept (0.1) nor interpolated (0.1 / 4): it sits on the ramp
    assert 0.1 / 4 < inv_freq[1] < 0.1 and factor != 1.0 and yarn.softmax_factor != 1.0


def test_deepseek_v3_needs_the_rope_permutation_and_the_bias():
    """Loading DeepSeek-V3's RoPE rows without the interleave permutation, or without the correction bias,
    changes the logits by far more than the tolerance: the parity above tests both."""
    from moe_jax.hf import weights

    ref = reference("deepseek_v3")
    model, _ = _load("deepseek_v3")
    tokens = jnp.asarray(ref["input_ids"])
    attn = model.blocks[0].attn
    saved = np.asarray(attn.w_kr_DP[...])
    attn.w_kr_DP[...] = jnp.asarray(saved[:, np.argsort(weights.rope_order(0, 4))])  # HF's interleaved order
    logits, _ = logits_and_experts(model, tokens)
    assert np.abs(np.asarray(logits)[:2] - ref["logits"]).max() > 1e-2
    attn.w_kr_DP[...] = jnp.asarray(saved)
    router = model.blocks[1].ffn.router
    router.correction_bias_E[...] = jnp.zeros_like(router.correction_bias_E[...])
    logits, experts = logits_and_experts(model, tokens)
    assert np.any(np.asarray(experts[0])[:48] != ref["expert_ids"][0])


def test_yarn_matters_in_the_deepseek_v3_yarn_fixture(tmp_path):
    """Without YaRN (plain RoPE), or with YaRN but without mscale_all_dim (no softmax correction, another
    cos/sin factor), the fixture's logits are off by far more than the tolerance: its parity tests YaRN."""
    ref = reference("deepseek_v3_yarn")
    params = json.loads((FIXTURES / "deepseek_v3_yarn" / "config.json").read_text())["rope_parameters"]
    no_mscale = {k: v for k, v in params.items() if k != "mscale_all_dim"}
    for i, rope in enumerate(({"rope_type": "default", "rope_theta": params["rope_theta"]}, no_mscale)):
        d = _copy("deepseek_v3_yarn", tmp_path / str(i))
        _edit_config(d, rope_parameters=rope)
        model, _ = load_hf(str(d), log=lambda s: None)
        logits, _ = logits_and_experts(model, jnp.asarray(ref["input_ids"]))
        assert np.abs(np.asarray(logits)[:2] - ref["logits"]).max() > 1e-2, rope


def test_released_style_rope_scaling_reads_like_rope_parameters(tmp_path):
    """DeepSeek's released config.json files carry `rope_scaling` with `type` and a top-level rope_theta (no
    rope_parameters); transformers 5.23.0 reads them as the same YaRN, and so do we."""
    want = _load("deepseek_v3_yarn")[0].cfg
    d = _copy("deepseek_v3_yarn", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    theta = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    (d / "config.json").write_text(json.dumps(dict(cfg, rope_scaling=params, rope_theta=theta)))
    assert model_config_from_hf(json.loads((d / "config.json").read_text())) == want


# The architecture fields of the released config.json files (deepseek-ai/DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-V3).
_RELEASED_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096,
                  "type": "yarn"}
_RELEASED_V2 = dict(model_type="deepseek_v2", first_k_dense_replace=1, hidden_act="silu", kv_lora_rank=512,
                    max_position_embeddings=163840, moe_layer_freq=1, n_shared_experts=2, norm_topk_prob=False,
                    num_experts_per_tok=6, qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-6,
                    rope_theta=10000, scoring_func="softmax", tie_word_embeddings=False, v_head_dim=128,
                    vocab_size=102400, attention_bias=False, aux_loss_alpha=0.001, seq_aux=True,
                    rope_scaling=dict(_RELEASED_YARN, mscale=0.707, mscale_all_dim=0.707))
RELEASED = {
    "DeepSeek-V2-Lite": dict(_RELEASED_V2, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             n_group=1, topk_group=1, n_routed_experts=64, num_attention_heads=16,
                             num_key_value_heads=16, num_hidden_layers=27, q_lora_rank=None,
                             routed_scaling_factor=1.0, topk_method="greedy"),
    "DeepSeek-V2": dict(_RELEASED_V2, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        n_group=8, topk_group=3, n_routed_experts=160, num_attention_heads=128,
                        num_key_value_heads=128, num_hidden_layers=60, q_lora_rank=1536, routed_scaling_factor=16.0,
                        topk_method="group_limited_greedy"),
    "DeepSeek-V3": dict(model_type="deepseek_v3", first_k_dense_replace=3, hidden_act="silu", hidden_size=7168,
                        intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840,
                        moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256,
                        n_shared_experts=1, norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8,
                        num_hidden_layers=61, num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-6, rope_theta=10000,
                        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_group=4, topk_method="noaux_tc",
                        vocab_size=129280, v_head_dim=128, tie_word_embeddings=False,
                        rope_scaling=dict(_RELEASED_YARN, mscale=1.0, mscale_all_dim=1.0)),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_deepseek_configs_map(name):
    """The released configs (rope_scaling YaRN, factor 40 over 4096) map, with no weight read."""
    cfg = model_config_from_hf(RELEASED[name])
    m = 0.1 * (0.707 if "V2" in name else 1.0) * np.log(40) + 1
    assert cfg.rope_scaling == "yarn" and cfg.yarn_factor == 40 and cfg.yarn_original_max_len == 4096
    assert cfg.softmax_factor == pytest.approx(m * m) and cfg.rope_frequencies()[1] == 1.0  # mscale == mscale_all_dim
    assert cfg.max_seq_len == 163840
    if name == "DeepSeek-V2":
        assert (cfg.moe.n_expert_groups, cfg.moe.topk_groups, cfg.moe.group_score) == (8, 3, "max")
        assert cfg.moe.routed_scaling_factor == 16.0 and cfg.moe.shared_width == 2 * 1536
    if name == "DeepSeek-V2-Lite":
        assert cfg.q_lora_rank is None and cfg.moe.n_expert_groups == 1 and cfg.moe.num_experts == 64


def test_deepseek_v2_moe_layer_freq_follows_deepseeks_placement():
    """DeepSeek's code: layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    hf = json.loads((FIXTURES / "deepseek_v2" / "config.json").read_text())
    cfg = model_config_from_hf(dict(hf, num_hidden_layers=7, first_k_dense_replace=2, moe_layer_freq=2))
    assert cfg.moe_layer_indices == (2, 4, 6) == tuple(i for i in range(7) if i >= 2 and i % 2 == 0)
    with pytest.raises(HFConfigError, match="moe_every"):  # transformers 5.23.0 would build MoE layers 2..6
        hf_config_from_model(cfg, "deepseek_v2")


def test_deepseek_v3_mtp_layers_are_skipped_with_a_note(tmp_path):
    src = hf_files.CheckpointReader(str(FIXTURES / "deepseek_v3"))
    tensors = {n: src.get(n) for n in src.names()}
    tensors["model.layers.2.eh_proj.weight"] = np.zeros((32, 64), np.float32)  # layer 2 == num_hidden_layers
    hf_files.write_checkpoint(str(tmp_path), json.loads((FIXTURES / "deepseek_v3" / "config.json").read_text()),
                              tensors)
    notes = []
    load_hf(str(tmp_path), log=notes.append)
    assert len(notes) == 1 and "skipped 1 tensors" in notes[0] and "multi-token-prediction" in notes[0]


@pytest.mark.parametrize("family", FIXTURE_NAMES + DENSE)
def test_export_import_round_trip_is_bit_exact(family, tmp_path):
    model, _ = _load(family)
    out = tmp_path / "export"
    save_hf(model, str(out), family=family_of(family), max_shard_bytes=40_000)  # several shards + an index
    assert (out / hf_files.INDEX).exists()
    again, _ = load_hf(str(out), log=lambda s: None)
    assert again.cfg == model.cfg
    a, b = nnx.to_flat_state(nnx.state(model)), dict(nnx.to_flat_state(nnx.state(again)))
    assert len(a) == len(b)
    for path, v in a:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(b[path][...]), err_msg=str(path))
    # And the exported tensors are the fixture's, name for name (the layout HF's from_pretrained reads).
    src, dst = hf_files.CheckpointReader(str(FIXTURES / family)), hf_files.CheckpointReader(str(out))
    assert src.names() == dst.names()
    for name in src.names():
        np.testing.assert_array_equal(src.get(name), dst.get(name), err_msg=name)


def _copy(family: str, tmp_path) -> Path:
    d = tmp_path / family
    shutil.copytree(FIXTURES / family, d)
    return d


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_names_model_type(tmp_path):
    d = _copy("mixtral", tmp_path)
    _edit_config(d, model_type="gpt2")
    with pytest.raises(HFConfigError, match=r"config.json: model_type='gpt2'.*unsupported"):
        load_hf(str(d))


@pytest.mark.parametrize("family,changes,field", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type"),
    ("deepseek_v3_yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),  # first_k_dense_replace=1 is not a multiple of 2
])
def test_unhonourable_config_field_is_named(family, changes, field, tmp_path):
    d = _copy(family, tmp_path)
    _edit_config(d, **changes)
    with pytest.raises(HFConfigError, match=rf"config.json: {field}="):
        load_hf(str(d))


def test_missing_shard_and_missing_tensor_and_wrong_shape(tmp_path):
    model, _ = _load("mixtral")
    out = tmp_path / "sharded"
    files = save_hf(model, str(out), family="mixtral", max_shard_bytes=40_000)
    assert len(files) > 2
    (out / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match=files[1]):
        load_hf(str(out))
    # A tensor of the wrong shape: config.json says 4 heads of 8, the weights are for another width.
    d = _copy("mixtral", tmp_path)
    _edit_config(d, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*shape \[16, 32\].*\[32, 32\]"):
        load_hf(str(d))
    # A tensor missing: a config that announces q/k norms the weights do not have.
    d = _copy("qwen2_moe", tmp_path / "b")
    _edit_config(d, model_type="qwen3_moe", attention_bias=False)
    with pytest.raises(ValueError, match=r"[qk]_norm.weight' is missing"):
        load_hf(str(d))


def test_tensors_the_config_does_not_announce_are_refused(tmp_path):
    d = _copy("qwen2_moe", tmp_path)
    _edit_config(d, qkv_bias=False)  # the biases are in the file: loading without them would change the model
    with pytest.raises(ValueError, match=r"no parameter for.*self_attn\.[qkv]_proj\.bias"):
        load_hf(str(d))


def _write_raw_safetensors(path, tensors: dict):
    """An independent minimal safetensors writer (header JSON + raw little-endian bytes), for float8."""
    header, blobs, offset = {}, [], 0
    codes = {"float8_e4m3fn": "F8_E4M3", "float32": "F32"}
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype.name], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_float8_weights_are_dequantised_per_block(tmp_path):
    import ml_dtypes

    # A 3 x 5 weight in blocks of 2 x 2 (scales 2 x 3; the last row/column blocks are partial).
    w = np.array([[1, 2, 0.5, -1, 4], [-2, 0.25, 3, 1, -0.5], [8, -4, 1.5, 2, 0.75]], np.float32)
    scale = np.array([[0.5, 2.0, 10.0], [3.0, -1.0, 0.125]], np.float32)
    _write_raw_safetensors(tmp_path / "model.safetensors",
                           {"w.weight": w.astype(ml_dtypes.float8_e4m3fn), "w.weight_scale_inv": scale})
    reader = hf_files.CheckpointReader(str(tmp_path))
    got = reader.get("w.weight")
    # Each entry times the scale of its 2 x 2 block: row 0 = [1*.5, 2*.5, .5*2, -1*2, 4*10].
    want = np.array([[0.5, 1.0, 1.0, -2.0, 40.0], [-1.0, 0.125, 6.0, 2.0, -5.0], [24.0, -12.0, -1.5, -2.0, 0.09375]])
    np.testing.assert_array_equal(got, want.astype(np.float32))
    _write_raw_safetensors(tmp_path / "model.safetensors", {"w.weight": w.astype(ml_dtypes.float8_e4m3fn)})
    with pytest.raises(ValueError, match="w.weight_scale_inv"):
        hf_files.CheckpointReader(str(tmp_path)).get("w.weight")



def test_load_onto_a_mesh_places_each_tensor_with_the_run_sharding(eight_devices):
    """load_hf(mesh=...) on 8 CPU devices (expert 2 x fsdp 2 x model 2): every variable carries the NamedSharding
    the training run's state gets (rule table over the abstract train state's paths, as init_sharded lays it
    out), holds only its slice on each device, equals the unsharded load bit for bit, and the forward matches."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from moe_jax import sharding as sh
    from moe_jax.train.state import init_state, make_optimizer
    from moe_jax.train.config import TrainConfig
    from moe_jax.transformer import Transformer

    mesh = sh.make_mesh(sh.ShardingConfig(expert=2, fsdp=2, model=2))
    plain, _ = _load("mixtral")
    placed, _ = _load("mixtral", mesh=mesh)
    state = jax.eval_shape(lambda: init_state(Transformer(plain.cfg, rngs=nnx.Rngs(params=0)),
                                              make_optimizer(TrainConfig()))[1])
    shardings = sh.tree_shardings(state, mesh)  # what distributed.init_sharded_state gives a training run
    want = {path: jax.tree.leaves(s)[0] for tree in (shardings.params, shardings.rest)
            for path, s in nnx.to_flat_state(tree)}
    got = list(nnx.to_flat_state(nnx.state(placed)))
    assert len(got) == len(want) == len(list(nnx.to_flat_state(nnx.state(plain))))
    for path, v in got:
        assert v[...].sharding == want[path], path
    ref = dict(nnx.to_flat_state(nnx.state(plain)))
    for path, v in got:
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(ref[path][...]), err_msg=str(path))
    w = placed.blocks[0].ffn.experts.w_in_EDF[...]  # [E 4, D 32, F 32] over expert x fsdp x model
    assert w.sharding.spec == P("expert", "fsdp", "model")
    assert {s.data.shape for s in w.addressable_shards} == {(2, 16, 16)}
    assert placed.embed_VD[...].sharding.spec == P("model", "fsdp")
    assert placed.final_norm.scale[...].sharding == NamedSharding(mesh, P())
    tokens = jnp.asarray(reference("mixtral")["input_ids"])
    np.testing.assert_allclose(np.asarray(placed(tokens, train=False)[0]), reference("mixtral")["logits"],
                               atol=ATOL, rtol=0)


def test_a_mesh_axis_that_does_not_divide_a_tensor_is_named(eight_devices, monkeypatch):
    """Before any weight is read."""
    from moe_jax import sharding as sh

    def no_read(self, name):
        raise AssertionError(f"{name} was read")

    monkeypatch.setattr(hf_files.CheckpointReader, "get", no_read)
    mesh = sh.make_mesh(sh.ShardingConfig(model=8))  # the Mixtral fixture has 2 kv heads
    with pytest.raises(ValueError, match=r"w_k_DNQ: its 'kv_heads' dimension of size 2 does not divide.*config.mesh"):
        _load("mixtral", mesh=mesh)


# ---- live: only where torch and transformers import ----

@pytest.mark.parametrize("family", FIXTURE_NAMES + DENSE)
def test_live_transformers_loads_our_export(family, tmp_path):
    """transformers' from_pretrained reads what save_hf writes, and gives the fixture's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _ = _load(family)
    save_hf(model, str(tmp_path), family=family_of(family))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ref = reference(family)
    with torch.no_grad():
        logits = hf(torch.as_tensor(ref["input_ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, ref["logits"], atol=ATOL, rtol=0)

