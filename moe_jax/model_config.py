"""`ModelConfig`: the typed, validated fields of a decoder-only (MoE) transformer, and its derived values.

Which layers are MoE, the head widths, what the KV cache holds per token: computed here and nowhere
else. Validated on construction, so a bad field fails with a message naming the field and the fix
before anything is traced or compiled.

MoE placement: layer i (0-based) is an MoE layer iff `moe` is set, i >= first_dense_layers and
(i - first_dense_layers) % moe_every == 0. So
    moe_every=1, first_dense_layers=0   every layer is MoE (Mixtral)
    moe_every=1, first_dense_layers=3   DeepSeek-V3 (first 3 layers dense)
    moe_every=2, first_dense_layers=1   Switch / GShard: the odd layers 1, 3, 5, ... are MoE
    moe_every=2, first_dense_layers=0   layers 0, 2, 4, ...

Layer stacking: with scan_layers, the layers after the dense prefix run as `scan_periods` repetitions of
`layer_period` (= moe_every) layers under one scan, the remainder unrolled (moe_jax/layer_stack.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp

from moe_jax import rope
from moe_jax.moe_config import ACTIVATIONS, MoEConfig

NORMS = ("rmsnorm", "layernorm")
ATTENTIONS = ("mha", "mla")
QK_NORMS = ("head", "full")
ROPE_SCALINGS = ("yarn",)
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "save_dots", "offload")


def _err(field: str, value, fix: str) -> ValueError:
    return ValueError(f"ModelConfig.{field}={value!r}: {fix}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: pre-norm blocks of attention + FFN (dense `FeedForward` or `MoELayer`).

    Attention: 'mha' is multi-head / grouped-query attention with RoPE on the whole head
    (num_kv_heads < num_heads: GQA, Ainslie et al. 2023); 'mla' is DeepSeek-V2's Multi-head Latent
    Attention (arXiv 2405.04434): keys and values come from a per-token latent c_KV of width
    kv_lora_rank (RMS-normalised), re-expanded per head into qk_nope_head_dim keys and v_head_dim
    values, plus one RoPE key of width qk_rope_head_dim shared by all heads; queries are compressed to
    q_lora_rank first when it is set.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int  # hidden width of the dense FFN layers
    num_kv_heads: Optional[int] = None  # GQA key/value heads; None = num_heads (MHA). 'mha' only.
    head_dim: Optional[int] = None  # None = d_model // num_heads
    activation: str = "swiglu"  # dense FFN activation (MoE experts take theirs from MoEConfig)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # RoPE scaling: None (plain RoPE) | 'yarn' (YaRN, arXiv 2309.00071; DeepSeek-V2/V3's long context), with the
    # yarn_* fields below as Hugging Face's rope_scaling names them (moe_jax/rope.py has the formulas).
    rope_scaling: Optional[str] = None
    yarn_factor: float = 1.0  # s: context extension factor ('factor')
    yarn_original_max_len: Optional[int] = None  # L0, the pretraining context ('original_max_position_embeddings')
    yarn_beta_fast: float = 32.0  # rotations below which features are interpolated ('beta_fast')
    yarn_beta_slow: float = 1.0  # rotations above which they keep their frequency ('beta_slow')
    yarn_mscale: float = 0.0  # 'mscale'; 0 = absent
    yarn_mscale_all_dim: float = 0.0  # 'mscale_all_dim'; 0 = absent (then no softmax scale correction)
    yarn_attention_factor: Optional[float] = None  # 'attention_factor': cos/sin factor; None = from the mscales
    yarn_truncate: bool = True  # 'truncate': round the ramp's ends to whole features

    attention: str = "mha"  # mha (incl. GQA) | mla
    q_lora_rank: Optional[int] = None  # MLA: query latent width; None = no query compression
    kv_lora_rank: Optional[int] = None  # MLA: width of the cached latent c_KV (required for 'mla')
    qk_nope_head_dim: Optional[int] = None  # MLA: per-head key/query width without RoPE; None = head_dim
    qk_rope_head_dim: Optional[int] = None  # MLA: decoupled RoPE key/query width (required for 'mla')
    v_head_dim: Optional[int] = None  # MLA: per-head value width; None = head_dim
    attention_bias: bool = False  # biases on the query/key/value projections (Qwen2-MoE); 'mha' only
    qk_norm: Optional[str] = None  # RMSNorm of queries and keys before RoPE: None | 'head' (over each head's
    #                                width: Qwen3-MoE) | 'full' (over the whole projection: OLMoE); 'mha' only

    moe: Optional[MoEConfig] = None  # None = dense model
    moe_every: int = 1  # P: every P-th layer after the dense prefix is MoE
    first_dense_layers: int = 0  # N: the first N layers are dense
    moe_output_norm: bool = False  # normalise the MoE output before the residual add (fine-grained experts)

    # DeepSeek-V3 multi-token prediction (arXiv 2412.19437, section 2.2; moe_jax/mtp.py): D sequential
    # training-only modules; module k predicts token i + k + 1. 0 = none (no parameters, no loss).
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3  # lambda: L_MTP = lambda / D * sum_k L_MTP^k (DeepSeek-V3: 0.3, later 0.1)

    tie_embeddings: bool = False  # logits = x @ embed^T instead of a separate unembedding
    # Layer stacking (moe_jax/layer_stack.py): scan the repeated periods of moe_every layers (after the dense
    # prefix) over stacked parameters, one period compiled instead of every layer; same numerics as unrolled.
    scan_layers: bool = False
    # Rematerialisation per block (unrolled) or per scanned period: none | full (recompute everything) |
    # save_dots (keep every matmul output) | offload (the same, kept in host memory)
    remat: str = "none"
    dtype: str = "float32"  # compute dtype; the router and the logits are float32 regardless
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            if not getattr(self, name) > 0:
                raise _err(name, getattr(self, name), "must be > 0.")
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("attention", ATTENTIONS),
                              ("dtype", DTYPES), ("param_dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise _err(name, getattr(self, name), f"set {name} to one of {allowed}.")
        if not self.norm_eps > 0:
            raise _err("norm_eps", self.norm_eps, "must be > 0 (e.g. 1e-6).")
        if not self.rope_theta > 0:
            raise _err("rope_theta", self.rope_theta, "must be > 0 (e.g. 10000.0).")
        self._check_rope_scaling()
        if self.head_dim is None and self.d_model % self.num_heads:
            raise _err("num_heads", self.num_heads,
                       f"does not divide d_model={self.d_model}; choose one that does or set head_dim.")
        if self.head_dim is not None and not self.head_dim > 0:
            raise _err("head_dim", self.head_dim, "must be > 0, or None for d_model // num_heads.")
        if self.attention == "mha":
            self._check_mha()
        else:
            self._check_mla()
        self._check_moe()
        self._check_mtp()
        self._check_attention_extras()
        self._check_layer_stack()

    def _check_rope_scaling(self):
        yarn_fields = ("yarn_factor", "yarn_original_max_len", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale",
                       "yarn_mscale_all_dim", "yarn_attention_factor", "yarn_truncate")
        if self.rope_scaling is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in yarn_fields:
                if getattr(self, name) != defaults[name]:
                    raise _err(name, getattr(self, name), "is a YaRN field, but rope_scaling=None (plain RoPE); set "
                                                          "rope_scaling='yarn' or leave it at its default.")
            return
        if self.rope_scaling not in ROPE_SCALINGS:
            raise _err("rope_scaling", self.rope_scaling, f"set rope_scaling to one of {ROPE_SCALINGS} or None "
                                                          "(plain RoPE).")
        if not self.yarn_factor >= 1:
            raise _err("yarn_factor", self.yarn_factor, "must be >= 1 (the context extension factor, e.g. 40).")
        if self.yarn_original_max_len is None or not self.yarn_original_max_len > 0:
            raise _err("yarn_original_max_len", self.yarn_original_max_len,
                       "is required for rope_scaling='yarn' and must be > 0 (the pretraining context, e.g. 4096).")
        if not 0 < self.yarn_beta_slow <= self.yarn_beta_fast:
            raise _err("yarn_beta_slow", self.yarn_beta_slow,
                       f"must be > 0 and <= yarn_beta_fast={self.yarn_beta_fast} (YaRN: 1 and 32).")
        for name in ("yarn_mscale", "yarn_mscale_all_dim"):
            if not getattr(self, name) >= 0:
                raise _err(name, getattr(self, name), "must be >= 0 (0 = absent).")
        if self.yarn_attention_factor is not None and not self.yarn_attention_factor > 0:
            raise _err("yarn_attention_factor", self.yarn_attention_factor, "must be > 0, or None (from the mscales).")

    def _check_mha(self):
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) is not None:
                raise _err(name, getattr(self, name),
                           "is a Multi-head Latent Attention field; set attention='mla' or leave it None.")
        kv = self.kv_heads
        if not kv > 0 or self.num_heads % kv:
            raise _err("num_kv_heads", self.num_kv_heads,
                       f"must be > 0 and divide num_heads={self.num_heads} (each kv head serves "
                       "num_heads / num_kv_heads query heads); None means num_heads.")
        if self.qk_head_dim % 2:
            raise _err("head_dim", self.qk_head_dim, "must be even: RoPE rotates pairs of features.")

    def _check_mla(self):
        if self.num_kv_heads is not None:
            raise _err("num_kv_heads", self.num_kv_heads,
                       "does not apply to attention='mla' (keys/values come from the shared latent); "
                       "leave it None.")
        for name in ("kv_lora_rank", "qk_rope_head_dim"):
            if getattr(self, name) is None:
                raise _err(name, None, "is required for attention='mla' (DeepSeek-V2: kv_lora_rank=512, "
                                       "qk_rope_head_dim=64).")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise _err(name, value, "must be > 0.")
        if self.qk_rope_head_dim % 2:
            raise _err("qk_rope_head_dim", self.qk_rope_head_dim, "must be even: RoPE rotates pairs of features.")

    def _check_attention_extras(self):
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise _err("qk_norm", self.qk_norm, f"set qk_norm to one of {QK_NORMS} or None (no q/k norm).")
        if self.attention == "mla":
            for name in ("attention_bias", "qk_norm"):
                if getattr(self, name):
                    raise _err(name, getattr(self, name), "applies to attention='mha' only; leave it at its default "
                                                          "for 'mla' (MLA normalises its latents instead).")

    def _check_moe(self):
        if self.moe_every < 1:
            raise _err("moe_every", self.moe_every, "must be >= 1 (1 = every layer after the dense prefix).")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            raise _err("first_dense_layers", self.first_dense_layers, f"must be in [0, num_layers={self.num_layers}].")
        if self.moe is None:
            return
        if not isinstance(self.moe, MoEConfig):
            raise _err("moe", type(self.moe).__name__, "must be a MoEConfig or None (use ModelConfig.from_dict "
                                                       "to build one from a mapping).")
        if self.moe.d_model != self.d_model:
            raise _err("moe", f"MoEConfig(d_model={self.moe.d_model})",
                       f"its d_model must equal ModelConfig.d_model={self.d_model}.")
        if not self.moe_layer_indices:
            raise _err("first_dense_layers", self.first_dense_layers,
                       f"leaves no MoE layer among {self.num_layers}; lower it, or set moe=None for a dense model.")

    def _check_mtp(self):
        if isinstance(self.mtp_depth, bool) or not isinstance(self.mtp_depth, int) or self.mtp_depth < 0:
            raise _err("mtp_depth", self.mtp_depth, "must be an integer >= 0 (0 = no multi-token prediction; "
                                                    "DeepSeek-V3 uses 1).")
        if self.mtp_depth >= self.max_seq_len:
            raise _err("mtp_depth", self.mtp_depth,
                       f"must be < max_seq_len={self.max_seq_len}: MTP module k sees the first L - k positions "
                       "of a sequence of L inputs; lower mtp_depth.")
        if not (isinstance(self.mtp_loss_weight, (int, float)) and self.mtp_loss_weight >= 0):
            raise _err("mtp_loss_weight", self.mtp_loss_weight, "must be a number >= 0 (DeepSeek-V3: 0.3, then 0.1).")
        if self.mtp_depth > 0 and self.mtp_loss_weight == 0:
            raise _err("mtp_loss_weight", self.mtp_loss_weight,
                       f"is 0 with mtp_depth={self.mtp_depth}: the MTP modules would get no training signal; "
                       "set mtp_loss_weight > 0 (e.g. 0.3) or mtp_depth=0.")

    def _check_layer_stack(self):
        if not isinstance(self.scan_layers, bool):
            raise _err("scan_layers", self.scan_layers, "must be True or False (True: scan the repeated layers).")
        if self.remat not in REMATS:
            raise _err("remat", self.remat, f"set remat to one of {REMATS} ('none': keep every activation).")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """From a plain mapping (e.g. `ml_collections.ConfigDict.to_dict()`); `moe` may be a mapping too."""
        fields = dict(fields)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields: {sorted(known)}.")
        moe = fields.get("moe")
        if isinstance(moe, Mapping):
            fields["moe"] = MoEConfig(**dict(moe))
        return cls(**fields)

    # ---- derived values: the one place they are computed ----
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def base_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head (MLA: nope + rope parts)."""
        if self.attention == "mla":
            return self.nope_head_dim + self.qk_rope_head_dim
        return self.base_head_dim

    @property
    def nope_head_dim(self) -> int:
        return self.qk_nope_head_dim or self.base_head_dim

    @property
    def value_head_dim(self) -> int:
        if self.attention == "mla":
            return self.v_head_dim or self.base_head_dim
        return self.base_head_dim

    @property
    def rope_dim(self) -> int:
        """Features per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.base_head_dim

    def rope_frequencies(self) -> tuple[Optional[tuple], float]:
        """(inverse frequencies of the `rope_dim` RoPE features as a tuple of float32 values, or None for plain
        RoPE (theta^(-2i/P), computed in the attention), factor on cos and sin)."""
        if self.rope_scaling is None:
            return None, 1.0
        freqs = rope.yarn_inv_freq(self.rope_dim, self.rope_theta, self.yarn_factor, self.yarn_original_max_len,
                                   self.yarn_beta_fast, self.yarn_beta_slow, self.yarn_truncate)
        factor = rope.yarn_attention_factor(self.yarn_factor, self.yarn_mscale, self.yarn_mscale_all_dim,
                                            self.yarn_attention_factor)
        return tuple(freqs.tolist()), factor

    @property
    def softmax_factor(self) -> float:
        """YaRN's m(s, mscale_all_dim)^2 on the attention softmax scale (DeepSeek); 1 without it."""
        if self.rope_scaling != "yarn":
            return 1.0
        return rope.yarn_softmax_factor(self.yarn_factor, self.yarn_mscale_all_dim)

    @property
    def softmax_scale(self) -> float:
        """Attention scores are multiplied by this: 1 / sqrt(qk_head_dim) * softmax_factor."""
        scale = 1.0 / math.sqrt(self.qk_head_dim)
        return scale if self.softmax_factor == 1.0 else scale * self.softmax_factor

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        if self.moe is None:
            return ()
        N, P = self.first_dense_layers, self.moe_every
        return tuple(i for i in range(N, self.num_layers) if (i - N) % P == 0)

    @property
    def mtp_layer_indices(self) -> tuple[int, ...]:
        """Layer indices of the MTP modules' blocks: num_layers, ..., num_layers + mtp_depth - 1 (after the
        main layers, as in DeepSeek-V3's checkpoint, where the MTP block is layer 61 of 0..60)."""
        return tuple(range(self.num_layers, self.num_layers + self.mtp_depth))

    @property
    def layer_period(self) -> int:
        """P, the layers of one repetition of the placement pattern: moe_every (1 for a dense model)."""
        return self.moe_every if self.moe is not None else 1

    @property
    def scan_periods(self) -> int:
        """n, the periods of `layer_period` layers after the dense prefix: with `scan_layers`, layers
        [first_dense_layers, first_dense_layers + n P) run under one scan; the prefix and the remainder unrolled."""
        return (self.num_layers - self.first_dense_layers) // self.layer_period

    def is_moe_layer(self, i: int) -> bool:
        """Main layer i per the placement rule; an MTP block (i in `mtp_layer_indices`) is an MoE layer
        whenever the model has MoE layers (DeepSeek-V3's MTP block is a full MoE decoder layer)."""
        return i in self.moe_layer_indices or (self.moe is not None and i in self.mtp_layer_indices)

    @property
    def cache_numbers_per_token(self) -> int:
        """Numbers one layer's decode cache holds per token: MHA/GQA 2 * num_kv_heads * head_dim (K and V);
        MLA kv_lora_rank + qk_rope_head_dim (the latent c_KV and the shared RoPE key)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.kv_heads * (self.qk_head_dim + self.value_head_dim)

    @property
    def compute_dtype(self):
        """The `dtype` field as a `jnp.dtype`."""
        return jnp.dtype(self.dtype)

    @property
    def param_jnp_dtype(self):
        """The `param_dtype` field (a string, recorded in run configs) as a `jnp.dtype`."""
        return jnp.dtype(self.param_dtype)
