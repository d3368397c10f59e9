"""Hugging Face `config.json` <-> `ModelConfig`, per model family.

Families (`model_type` in config.json): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, and the
dense llama and qwen2 (a `ModelConfig` with moe=None: the sources of sparse upcycling). Every field that changes
the forward pass is either mapped or refused with one error naming config.json and the field, before any
weight is read. Fields that only matter for training in transformers (dropout, router jitter) or for its
runtime (use_cache, initializer_range, token ids) are not model architecture and are ignored.

MoE layers come in **dropless** (capacity_factor = eval_capacity_factor = None): Hugging Face's MoE blocks
drop no token, so any capacity would change the model. The balance loss is set to what transformers adds
when training with `output_router_logits=True`: `router_aux_loss_coef * E * sum_e f_e P_e` over the whole
batch, with f counting all k choices (summing to k) -- ours counts f summing to 1, hence
`balance_loss_coef = router_aux_loss_coef * k`, `balance_loss_scope='batch'`, and no z-loss. transformers
adds no balance loss for DeepSeek-V2 and V3 (V3 balances through its correction bias), so theirs is 0.

RoPE: plain (`rope_type='default'`) for every family; DeepSeek-V2 and V3 also YaRN (`rope_type`/`type`
'yarn', as their releases ship), mapped onto ModelConfig's rope_scaling/yarn_* fields with transformers
5.23.0's defaults and precedence (moe_jax/rope.py); any other scaling is refused naming the field.

Sliding-window attention (Mixtral's `sliding_window`, Qwen's `use_sliding_window`) equals full causal
attention on sequences no longer than the window, so the window becomes `max_seq_len`.
"""
from __future__ import annotations

from typing import Any, Optional

from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig

FAMILIES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Dense families (no MoE layer; the sources of sparse upcycling, moe_jax.upcycle): the attention and SwiGLU
# MLP of the MoE families above, one FFN per layer.
DENSE_FAMILIES = ("llama", "qwen2")


class HFConfigError(ValueError):
    """A config.json field moe_jax cannot honour (named in the message, with the fix)."""


def _fail(path: str, field: str, value, why: str) -> HFConfigError:
    return HFConfigError(f"{path}: {field}={value!r}: {why}")


def family_of(hf: dict, path: str = "config.json") -> str:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _fail(path, "model_type", model_type,
                    f"unsupported architecture; moe_jax reads {sorted(FAMILIES)} (config.json's model_type).")
    return model_type


_YARN_KEYS = ("rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "attention_factor",
              "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def _rope(hf: dict, path: str, yarn: bool = False) -> dict:
    """ModelConfig's RoPE fields from transformers 5.x's `rope_parameters` or the older top-level
    `rope_theta`/`rope_scaling` (which transformers 5.23.0 takes instead of rope_parameters when both are set).
    yarn: the family's attention implements YaRN as transformers does (DeepSeek-V2/V3); else plain RoPE only."""
    source = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(source) or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    field = f"{source}.{'rope_type' if params.get('rope_type') else 'type'}"
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return dict(rope_theta=theta)
    if rope_type != "yarn" or not yarn:
        raise _fail(path, field, rope_type, "only plain RoPE ('default')" + (" and 'yarn'" if yarn else "") +
                    " is implemented for this family; use a checkpoint without this RoPE scaling.")
    for key in params:
        if key not in _YARN_KEYS:
            raise _fail(path, f"{source}.{key}", params[key], "is not a YaRN parameter moe_jax implements "
                                                              f"({', '.join(_YARN_KEYS)}).")
    # transformers: a top-level original_max_position_embeddings wins, else the dict's, else max_position_embeddings
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings")
    if original is None:
        raise _fail(path, f"{source}.original_max_position_embeddings", None, "is required for YaRN.")
    factor = params.get("factor")
    if factor is None:  # transformers: the ratio of the context lengths
        factor = float(_need(hf, path, "max_position_embeddings")) / float(original)
    attention_factor = params.get("attention_factor")
    return dict(rope_theta=theta, rope_scaling="yarn", yarn_factor=float(factor), yarn_original_max_len=int(original),
                yarn_beta_fast=float(params.get("beta_fast") or 32), yarn_beta_slow=float(params.get("beta_slow") or 1),
                yarn_mscale=float(params.get("mscale") or 0.0),
                yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                yarn_attention_factor=None if attention_factor is None else float(attention_factor),
                yarn_truncate=bool(params.get("truncate", True)))


def _rope_out(cfg: ModelConfig) -> dict:
    """config.json's RoPE fields for `cfg` (the inverse of `_rope`)."""
    params: dict[str, Any] = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        params.update(factor=cfg.yarn_factor, original_max_position_embeddings=cfg.yarn_original_max_len,
                      beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        for key, value in (("mscale", cfg.yarn_mscale), ("mscale_all_dim", cfg.yarn_mscale_all_dim)):
            if value:
                params[key] = value
        if cfg.yarn_attention_factor is not None:
            params["attention_factor"] = cfg.yarn_attention_factor
        if not cfg.yarn_truncate:
            params["truncate"] = False
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta}


def _need(hf: dict, path: str, field: str):
    if hf.get(field) is None:
        raise _fail(path, field, None, "is required in config.json for this family.")
    return hf[field]


def _deepseek_v3(hf: dict, path: str, common: dict, moe_common: dict) -> ModelConfig:
    """DeepSeek-V3: MLA, sigmoid scores with a selection-only correction bias, group-limited top-k (top-2 sum
    per group), shared experts, the first `first_k_dense_replace` layers dense."""
    for field, want in (("attention_bias", False), ("moe_layer_freq", 1), ("scoring_func", "sigmoid"),
                        ("topk_method", "noaux_tc"), ("rms_norm_eps", 1e-6)):
        if field in hf and hf[field] != want:
            why = ("the latent norms use transformers' default 1e-6 while the block norms use rms_norm_eps; "
                   "ModelConfig has one norm_eps" if field == "rms_norm_eps" else f"only {want!r} is implemented")
            raise _fail(path, field, hf[field], why + ".")
    E = int(hf.get("n_routed_experts") or _need(hf, path, "num_local_experts"))
    moe = dict(moe_common, d_ff=int(_need(hf, path, "moe_intermediate_size")), num_experts=E, score_fn="sigmoid",
               normalize_topk=bool(hf.get("norm_topk_prob", True)), use_correction_bias=True,
               routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
               n_expert_groups=int(hf.get("n_group") or 1), topk_groups=int(hf.get("topk_group") or 1),
               group_score="top2_sum", num_shared_experts=int(hf.get("n_shared_experts") or 0),
               shared_d_ff=int(hf["moe_intermediate_size"]), balance_loss_coef=0.0)
    return _mla_config(hf, common, moe, int(hf.get("first_k_dense_replace") or 0))


def _deepseek_v2(hf: dict, path: str, common: dict, moe_common: dict) -> ModelConfig:
    """DeepSeek-V2 (transformers' DeepseekV2ForCausalLM): MLA (a plain query projection when q_lora_rank is null,
    as in V2-Lite), softmax scores, top-k over all experts (`topk_method='greedy'`) or over the experts of the
    `topk_group` groups with the highest best-expert score ('group_limited_greedy'), no renormalisation, weights
    scaled by routed_scaling_factor, shared experts, the first `first_k_dense_replace` layers dense.

    moe_layer_freq P (DeepSeek's own code: layer i >= first_k_dense_replace is MoE iff i % P == 0) maps onto
    moe_every when first_k_dense_replace is a multiple of P; transformers 5.23.0 ignores the field and builds an
    MoE layer everywhere after the dense prefix, so only P = 1 checkpoints load there (and only those export)."""
    for field, want in (("attention_bias", False), ("mlp_bias", False), ("scoring_func", "softmax"),
                        ("norm_topk_prob", False), ("rms_norm_eps", 1e-6)):
        if hf.get(field) is not None and hf[field] != want:
            why = {"rms_norm_eps": "the latent norms use transformers' default 1e-6 while the block norms use "
                                   "rms_norm_eps; ModelConfig has one norm_eps",
                   "norm_topk_prob": "transformers 5.23.0's DeepSeek-V2 router never renormalises the top-k "
                                     "weights, while DeepSeek's own code does: the checkpoint is ambiguous"
                   }.get(field, f"only {want!r} is implemented")
            raise _fail(path, field, hf[field], why + ".")
    H = common["num_heads"]
    if hf.get("num_key_value_heads") not in (None, H):
        raise _fail(path, "num_key_value_heads", hf["num_key_value_heads"],
                    f"MLA expands keys and values for every head; it must equal num_attention_heads={H}.")
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise _fail(path, "topk_method", method, "DeepSeek-V2 routes with 'greedy' or 'group_limited_greedy'.")
    groups = (1, 1)
    if method == "group_limited_greedy":
        groups = (int(_need(hf, path, "n_group")), int(_need(hf, path, "topk_group")))
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    every = int(hf.get("moe_layer_freq") or 1)
    if first_dense % every:
        raise _fail(path, "moe_layer_freq", every, f"MoE layers at i % {every} == 0 after first_k_dense_replace="
                                                   f"{first_dense} do not map onto ModelConfig.moe_every "
                                                   "(first_k_dense_replace must be a multiple of moe_layer_freq).")
    F = int(_need(hf, path, "moe_intermediate_size"))
    moe = dict(moe_common, d_ff=F, num_experts=int(_need(hf, path, "n_routed_experts")), score_fn="softmax",
               normalize_topk=False, routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
               n_expert_groups=groups[0], topk_groups=groups[1], group_score="max",
               num_shared_experts=int(hf.get("n_shared_experts", 2)), shared_d_ff=F, balance_loss_coef=0.0)
    return _mla_config(hf, common, moe, first_dense, every)


def _mla_config(hf: dict, common: dict, moe: dict, first_dense: int, every: int = 1) -> ModelConfig:
    D, H = common["d_model"], common["num_heads"]
    return ModelConfig(**dict(common, head_dim=None if D % H == 0 else int(hf["v_head_dim"]), num_kv_heads=None),
                       attention="mla", q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=int(hf["kv_lora_rank"]),
                       qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                       v_head_dim=int(hf["v_head_dim"]), moe=MoEConfig(**moe), first_dense_layers=first_dense,
                       moe_every=every)


def model_config_from_hf(hf: dict, *, path: str = "config.json", expert_backend: str = "ragged_dot",
                         max_seq_len: Optional[int] = None, param_dtype: str = "float32",
                         dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face config.json dict (raises `HFConfigError` naming the field)."""
    family = family_of(hf, path)
    if family in ("deepseek_v2", "deepseek_v3"):
        if family == "deepseek_v3" and hf.get("rope_interleave") is False:
            raise _fail(path, "rope_interleave", False, "only DeepSeek's interleaved RoPE layout is mapped.")
        D, H = int(_need(hf, path, "hidden_size")), int(_need(hf, path, "num_attention_heads"))
        K = int(_need(hf, path, "num_experts_per_tok"))
        seq = int(hf.get("max_position_embeddings", 4096))
        common = dict(vocab_size=int(_need(hf, path, "vocab_size")), d_model=D, num_layers=int(_need(
            hf, path, "num_hidden_layers")), num_heads=H, d_ff=int(_need(hf, path, "intermediate_size")),
            activation="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            **_rope(hf, path, yarn=True), max_seq_len=seq if max_seq_len is None else min(seq, max_seq_len),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=param_dtype)
        if hf.get("hidden_act", "silu") != "silu":
            raise _fail(path, "hidden_act", hf["hidden_act"], "only SiLU-gated (SwiGLU) FFNs are implemented.")
        moe_common = dict(d_model=D, num_experts_per_token=K, router="top_k", capacity_factor=None,
                          eval_capacity_factor=None, expert_backend=expert_backend, activation="swiglu",
                          balance_loss_scope="batch", z_loss_coef=0.0)
        return (_deepseek_v3 if family == "deepseek_v3" else _deepseek_v2)(hf, path, common, moe_common)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(path, "hidden_act", act, "only SiLU-gated (SwiGLU) FFNs are implemented ('silu').")
    if hf.get("mlp_bias"):
        raise _fail(path, "mlp_bias", True, "FFN biases are not implemented for these families.")
    D, H = int(_need(hf, path, "hidden_size")), int(_need(hf, path, "num_attention_heads"))
    head_dim = hf.get("head_dim")
    head_dim = None if head_dim is None or int(head_dim) * H == D else int(head_dim)
    kv = hf.get("num_key_value_heads")
    kv = None if kv is None or int(kv) == H else int(kv)
    seq = int(hf.get("max_position_embeddings", 4096))
    window = None
    if family == "mixtral":
        window = hf.get("sliding_window")
    elif family in ("qwen2_moe", "qwen3_moe", "qwen2") and hf.get("use_sliding_window"):
        window = hf.get("sliding_window")
        if hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
            raise _fail(path, "max_window_layers", hf.get("max_window_layers"),
                        "sliding windows on only some layers are not implemented; set use_sliding_window=false.")
    if window is not None:
        seq = min(seq, int(window))
    if max_seq_len is not None:
        seq = min(seq, max_seq_len)
    qk_norm, bias = None, False
    if family == "qwen2_moe":
        bias = bool(hf.get("qkv_bias", True))
    elif family == "qwen3_moe":
        qk_norm = "head"
        if hf.get("attention_bias"):
            raise _fail(path, "attention_bias", True, "Qwen3-MoE's attention biases (including o_proj's) are not "
                                                      "implemented.")
    elif family == "olmoe":
        qk_norm = "full"
        if hf.get("attention_bias"):
            raise _fail(path, "attention_bias", True, "OLMoE's attention biases (including o_proj's) are not "
                                                      "implemented.")
        if hf.get("clip_qkv") is not None:
            raise _fail(path, "clip_qkv", hf["clip_qkv"], "clipping q/k/v is not implemented; use null.")
    elif family == "mixtral" and hf.get("attention_bias"):
        raise _fail(path, "attention_bias", True, "Mixtral has no attention biases.")
    elif family == "qwen2":
        bias = True  # transformers' Qwen2Attention: q/k/v biases always, none on o_proj
    elif family == "llama" and hf.get("attention_bias"):
        raise _fail(path, "attention_bias", True, "Llama's attention biases (including o_proj's) are not implemented.")
    if family in DENSE_FAMILIES:
        return ModelConfig(
            vocab_size=int(_need(hf, path, "vocab_size")), d_model=D,
            num_layers=int(_need(hf, path, "num_hidden_layers")), num_heads=H,
            d_ff=int(_need(hf, path, "intermediate_size")), num_kv_heads=kv, head_dim=head_dim,
            activation="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **_rope(hf, path),
            max_seq_len=seq, attention="mha", attention_bias=bias, moe=None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=param_dtype)

    L = int(_need(hf, path, "num_hidden_layers"))
    # transformers 5.x saves Qwen3-MoE's num_experts as num_local_experts (an attribute map); released files
    # have num_experts.
    E = int(_need(hf, path, "num_local_experts" if family == "mixtral" or "num_experts" not in hf else "num_experts"))
    K = int(_need(hf, path, "num_experts_per_tok"))
    first_dense, every = 0, 1
    if family in ("qwen2_moe", "qwen3_moe"):
        every = int(hf.get("decoder_sparse_step", 1) or 1)
        dense_only = sorted(int(i) for i in (hf.get("mlp_only_layers") or []))
        first_dense = every - 1  # HF: layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
        if dense_only:
            if every != 1 or dense_only != list(range(len(dense_only))):
                raise _fail(path, "mlp_only_layers", dense_only,
                            "only a prefix of dense layers (0, 1, ..., n-1) with decoder_sparse_step=1 maps onto "
                            "ModelConfig.first_dense_layers / moe_every.")
            first_dense = len(dense_only)
    expert_width = hf["moe_intermediate_size"] if family in ("qwen2_moe", "qwen3_moe") else hf["intermediate_size"]
    normalize = True if family == "mixtral" else bool(hf.get("norm_topk_prob", False))
    moe = dict(d_model=D, d_ff=int(expert_width), num_experts=E, num_experts_per_token=K, router="top_k",
               score_fn="softmax", normalize_topk=normalize, capacity_factor=None, eval_capacity_factor=None,
               expert_backend=expert_backend, activation="swiglu", balance_loss_scope="batch",
               balance_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)) * K, z_loss_coef=0.0)
    if family == "qwen2_moe":
        moe.update(num_shared_experts=1, shared_d_ff=int(_need(hf, path, "shared_expert_intermediate_size")),
                   shared_expert_gate=True)
    return ModelConfig(
        vocab_size=int(_need(hf, path, "vocab_size")), d_model=D, num_layers=L, num_heads=H,
        d_ff=int(hf.get("intermediate_size") or expert_width), num_kv_heads=kv, head_dim=head_dim,
        activation="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        **_rope(hf, path), max_seq_len=seq, attention="mha", attention_bias=bias, qk_norm=qk_norm,
        moe=MoEConfig(**moe), moe_every=every, first_dense_layers=first_dense,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=param_dtype)


def hf_config_from_model(cfg: ModelConfig, family: str, *, extra: Optional[dict] = None) -> dict[str, Any]:
    """A config.json dict for `family` describing `cfg` (raises HFConfigError if the family cannot express it).

    `extra`: fields copied through unchanged (token ids, the original config's bookkeeping)."""
    if family not in FAMILIES:
        raise _fail("--family", "model_type", family, f"choose one of {sorted(FAMILIES)}.")
    m = cfg.moe
    where = f"ModelConfig (export to {family})"
    if family in DENSE_FAMILIES:
        return _dense_config(cfg, family, where, extra)
    if m is None:
        raise _fail(where, "moe", None, f"a dense model has no MoE family to export to; use {DENSE_FAMILIES}.")
    if family in ("deepseek_v2", "deepseek_v3"):
        return _deepseek_config(cfg, family, where, extra)
    checks = [("rope_scaling", cfg.rope_scaling, None),
              ("attention", cfg.attention, "mha"), ("norm", cfg.norm, "rmsnorm"), ("activation", m.activation, "swiglu"),
              ("router", m.router, "top_k"), ("score_fn", m.score_fn, "softmax"), ("granularity", m.granularity, 1),
              ("topk_order", m.topk_order, "softmax_topk"), ("n_expert_groups", m.n_expert_groups, 1),
              ("routed_scaling_factor", m.routed_scaling_factor, 1.0), ("expert_bias", m.expert_bias, False),
              ("use_correction_bias", m.use_correction_bias, False), ("moe_output_norm", cfg.moe_output_norm, False),
              ("qk_norm", cfg.qk_norm, {"qwen3_moe": "head", "olmoe": "full"}.get(family)),
              ("attention_bias", cfg.attention_bias, family == "qwen2_moe" and cfg.attention_bias)]
    if family == "mixtral":
        checks.append(("normalize_topk", m.normalize_topk, True))
    if family == "qwen2_moe":
        checks += [("num_shared_experts", m.num_shared_experts, 1), ("shared_expert_gate", m.shared_expert_gate, True)]
    else:
        checks.append(("num_shared_experts", m.num_shared_experts, 0))
    for field, value, want in checks:
        if value != want:
            raise _fail(where, field, value, f"{family} needs {want!r}.")
    if family in ("mixtral", "olmoe") and (cfg.first_dense_layers, cfg.moe_every) != (0, 1):
        raise _fail(where, "first_dense_layers", cfg.first_dense_layers, f"{family} has an MoE FFN in every layer.")
    if family in ("qwen2_moe", "qwen3_moe") and cfg.moe_every > 1 and cfg.first_dense_layers != cfg.moe_every - 1:
        raise _fail(where, "first_dense_layers", cfg.first_dense_layers,
                    "Qwen-MoE places MoE layers at (i + 1) % decoder_sparse_step == 0 or after a dense prefix.")
    K = m.num_experts_per_token
    hf: dict[str, Any] = {
        "model_type": family, "architectures": [FAMILIES[family]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.base_head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": K,
        "router_aux_loss_coef": m.balance_loss_coef / K, "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
        "attention_dropout": 0.0, "output_router_logits": False,
    }
    if family == "mixtral":
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff, sliding_window=None)
    else:
        hf.update(num_experts=m.num_experts, norm_topk_prob=m.normalize_topk)
    if family in ("qwen2_moe", "qwen3_moe"):
        dense_prefix = cfg.first_dense_layers if cfg.moe_every == 1 else 0
        hf.update(moe_intermediate_size=m.d_ff, intermediate_size=cfg.d_ff, decoder_sparse_step=cfg.moe_every,
                  mlp_only_layers=list(range(dense_prefix)), use_sliding_window=False)
    if family == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=m.shared_width, qkv_bias=cfg.attention_bias)
    if family == "qwen3_moe":
        hf.update(attention_bias=False)
    if family == "olmoe":
        hf.update(intermediate_size=m.d_ff, attention_bias=False, clip_qkv=None)
    for key, value in (extra or {}).items():
        hf.setdefault(key, value)
    return hf


def _deepseek_config(cfg: ModelConfig, family: str, where: str, extra: Optional[dict]) -> dict[str, Any]:
    m = cfg.moe
    v3 = family == "deepseek_v3"
    checks = [("attention", cfg.attention, "mla"), ("norm", cfg.norm, "rmsnorm"), ("norm_eps", cfg.norm_eps, 1e-6),
              ("activation", m.activation, "swiglu"), ("router", m.router, "top_k"),
              ("score_fn", m.score_fn, "sigmoid" if v3 else "softmax"), ("topk_order", m.topk_order, "softmax_topk"),
              ("granularity", m.granularity, 1), ("use_correction_bias", m.use_correction_bias, v3),
              ("moe_every", cfg.moe_every, 1), ("moe_output_norm", cfg.moe_output_norm, False),
              ("shared_expert_gate", m.shared_expert_gate, False), ("shared_d_ff", m.shared_d_ff or m.d_ff, m.d_ff),
              ("expert_bias", m.expert_bias, False)]
    if v3 or m.n_expert_groups > 1:
        checks.append(("group_score", m.group_score, "top2_sum" if v3 else "max"))
    if not v3:
        checks += [("normalize_topk", m.normalize_topk, False),
                   ("num_shared_experts", m.num_shared_experts > 0, True)]
    for field, value, want in checks:
        if value != want:
            raise _fail(where, field, value, f"{family} needs {want!r}.")
    hf: dict[str, Any] = {
        "model_type": family, "architectures": [FAMILIES[family]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads, "n_shared_experts": m.num_shared_experts,
        "n_routed_experts": m.num_experts, "routed_scaling_factor": m.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank, "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.value_head_dim, "qk_nope_head_dim": cfg.nope_head_dim, "n_group": m.n_expert_groups,
        "topk_group": m.topk_groups, "num_experts_per_tok": m.num_experts_per_token,
        "first_k_dense_replace": cfg.first_dense_layers, "norm_topk_prob": m.normalize_topk, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, **_rope_out(cfg),
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }
    if v3:
        hf.update(rope_interleave=True, num_mtp_layers=0)
    else:
        hf.update(topk_method="group_limited_greedy" if m.n_expert_groups > 1 else "greedy", mlp_bias=False)
    for key, value in (extra or {}).items():
        hf.setdefault(key, value)
    return hf


def _dense_config(cfg: ModelConfig, family: str, where: str, extra: Optional[dict]) -> dict[str, Any]:
    checks = [("moe", cfg.moe, None), ("rope_scaling", cfg.rope_scaling, None), ("attention", cfg.attention, "mha"),
              ("norm", cfg.norm, "rmsnorm"), ("activation", cfg.activation, "swiglu"), ("qk_norm", cfg.qk_norm, None),
              ("attention_bias", cfg.attention_bias, family == "qwen2")]
    for field, value, want in checks:
        if value != want:
            raise _fail(where, field, value, f"{family} needs {want!r}.")
    hf: dict[str, Any] = {
        "model_type": family, "architectures": [FAMILIES[family]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.base_head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
        "attention_dropout": 0.0,
    }
    hf.update(dict(attention_bias=False, mlp_bias=False) if family == "llama" else dict(use_sliding_window=False))
    for key, value in (extra or {}).items():
        hf.setdefault(key, value)
    return hf
