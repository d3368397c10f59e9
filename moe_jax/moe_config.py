"""`MoEConfig`: the typed, validated fields of one MoE layer, and every value derived from them.

Layers take this dataclass, never a raw ConfigDict or a mesh. It is validated on construction, so a
bad field fails with a message naming the field and the fix before anything is traced or compiled.
Derived values (routed experts, k, expert width, tokens per routing group, capacity) are computed here
and nowhere else.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

ROUTERS = ("top_k", "expert_choice", "hash", "soft")
SCORE_FNS = ("softmax", "sigmoid")
TOPK_ORDERS = ("softmax_topk", "topk_softmax")
OVERFLOW_POLICIES = ("drop", "reduced_weight", "reroute", "renormalize")
PRIORITIES = ("position", "top_prob")
DISPATCHES = ("gather", "einsum")
EXPERT_BACKENDS = ("einsum", "ragged_dot", "blocked", "pallas")
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu", "geglu")
GROUPINGS = ("tokens", "position")
GROUP_SCORES = ("top2_sum", "max")
LOSS_SCOPES = ("group", "sequence", "batch")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name}={value!r} is not one of {allowed}; set {name} to one of them.")


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"MoEConfig.{name}={value!r} must be {bound}.")


# Measured on the CPU protocol (experiments/results/cpu, routers sweep) and before it at 2,000 steps: this gate
# trained worse than the dense model of equal active parameters.
TOPK_SOFTMAX_TOP1_WARNING = (
    "MoEConfig.topk_order='topk_softmax' with one expert per token: the softmax over the single chosen logit is "
    "always 1, so the combine weight carries no gradient to the router, which then learns only from the balance "
    "and z losses (routing stays close to arbitrary). Use topk_order='softmax_topk' (Switch: the output is scaled "
    "by the chosen expert's probability), or num_experts_per_token >= 2.")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer. Field groups: sizes, router, capacity, experts, shared experts, losses.

    Fine-grained segmentation (Dai et al. 2024, DeepSeekMoE; Krajewski et al. 2024): with granularity
    G every expert is split into G experts of width `d_ff / G` and each token picks `k * G` of them,
    so total and active expert parameters are unchanged. `num_experts` and `num_experts_per_token`
    are the values at G = 1; the layer uses `num_routed_experts` and `top_k`.
    """

    d_model: int
    d_ff: int  # hidden width of one expert at granularity 1
    num_experts: int = 8
    num_experts_per_token: int = 2
    granularity: int = 1

    # Router.
    router: str = "top_k"  # top_k | expert_choice | hash | soft
    score_fn: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    topk_order: str = "softmax_topk"  # softmax_topk (Mixtral, Switch) | topk_softmax: softmax(TopK(x W_g))
    normalize_topk: bool = False  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_expert_groups: int = 1  # group-limited routing (DeepSeek-V3): contiguous expert groups
    topk_groups: int = 1  # groups kept per token
    group_score: str = "top2_sum"  # a group's score: sum of its top-2 (DeepSeek-V3) | max (DeepSeek-V2)
    use_correction_bias: bool = False  # aux-loss-free balancing: a bias used for selection only
    bias_update_rate: float = 1e-3  # gamma in DeepSeek-V3's bias update
    jitter_eps: float = 0.0  # Switch: multiply router input by U(1 - eps, 1 + eps) in training
    logit_noise_std: float = 0.0  # Gaussian noise added to router logits in training
    router_init_scale: float = 1.0
    soft_slots_per_expert: int = 1  # Soft MoE slots per expert

    # Capacity and dispatch.
    capacity_factor: Optional[float] = 1.25  # training; None = dropless
    eval_capacity_factor: Optional[float] = 2.0  # evaluation; None = dropless
    min_capacity: int = 4
    group_size: Optional[int] = None  # tokens per routing group; None = one sequence (tokens) / batch (position)
    grouping: str = "tokens"  # tokens: consecutive tokens of the flattened batch | position: same position across sequences
    priority: str = "position"  # position order | top_prob: by the router's top probability (Riquelme et al. 2021)
    overflow: str = "drop"  # drop | reduced_weight | reroute | renormalize (drop, then kept weights share the total)
    overflow_buffer_factor: float = 2.0  # reduced_weight: buffer of ceil(factor * C) slots per expert
    max_reroute_rounds: Optional[int] = None  # reroute: None = E - k rounds (every expert can be tried)
    dispatch: str = "gather"  # gather (index) | einsum (Switch/GShard one-hot tensors)
    expert_backend: str = "einsum"  # capacity paths: einsum | blocked (CPU); dropless: blocked | ragged_dot | pallas
    dropless_block_size: int = 64  # dropless blocked backend: rows per expert padded to this multiple

    # Experts.
    activation: str = "swiglu"
    expert_bias: bool = False
    expert_init_scale: float = 1.0  # Switch Transformer uses 0.1 (truncated normal, fan-in scaled)

    # Shared (always-on) experts: DeepSeekMoE, Qwen-MoE.
    num_shared_experts: int = 0
    shared_d_ff: Optional[int] = None  # width of one shared expert; None = the routed expert width
    shared_expert_gate: bool = False  # Qwen-MoE: sigmoid(x w) scales the shared output per token

    # Auxiliary losses (returned, never added by the layer).
    balance_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    balance_loss_scope: str = "group"  # group | sequence | batch

    def __post_init__(self):
        _positive("d_model", self.d_model)
        _positive("d_ff", self.d_ff)
        _positive("num_experts", self.num_experts)
        _positive("num_experts_per_token", self.num_experts_per_token)
        _positive("granularity", self.granularity)
        for name, allowed in (
            ("router", ROUTERS), ("score_fn", SCORE_FNS), ("topk_order", TOPK_ORDERS),
            ("overflow", OVERFLOW_POLICIES), ("priority", PRIORITIES), ("dispatch", DISPATCHES),
            ("expert_backend", EXPERT_BACKENDS), ("activation", ACTIVATIONS), ("grouping", GROUPINGS),
            ("balance_loss_scope", LOSS_SCOPES), ("group_score", GROUP_SCORES),
        ):
            _choice(name, getattr(self, name), allowed)
        if self.d_ff % self.granularity:
            raise ValueError(
                f"MoEConfig.granularity={self.granularity} does not divide d_ff={self.d_ff}; "
                "choose a granularity that divides d_ff (experts have width d_ff / granularity).")
        if self.router in ("top_k", "hash") and self.top_k > self.num_routed_experts:
            raise ValueError(
                f"MoEConfig.num_experts_per_token={self.num_experts_per_token} (k={self.top_k} after "
                f"granularity) exceeds the {self.num_routed_experts} routed experts; lower k or add experts.")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"MoEConfig.{name}={value!r} must be > 0, or None for dropless routing.")
        if self.router in ("expert_choice", "soft"):
            for name in ("capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) is None:
                    raise ValueError(
                        f"MoEConfig.{name}=None (dropless) is not defined for router={self.router!r}: "
                        "expert choice and Soft MoE have fixed per-expert buffers; give a capacity factor.")
        _positive("min_capacity", self.min_capacity)
        if self.group_size is not None:
            _positive("group_size", self.group_size)
        if self.overflow_buffer_factor < 1:
            raise ValueError(f"MoEConfig.overflow_buffer_factor={self.overflow_buffer_factor} must be >= 1.")
        if self.max_reroute_rounds is not None:
            _positive("max_reroute_rounds", self.max_reroute_rounds, allow_zero=True)
        _positive("dropless_block_size", self.dropless_block_size)
        _positive("routed_scaling_factor", self.routed_scaling_factor)
        _positive("n_expert_groups", self.n_expert_groups)
        if self.num_routed_experts % self.n_expert_groups:
            raise ValueError(
                f"MoEConfig.n_expert_groups={self.n_expert_groups} does not divide the "
                f"{self.num_routed_experts} routed experts; experts form equal contiguous groups.")
        if not 1 <= self.topk_groups <= self.n_expert_groups:
            raise ValueError(
                f"MoEConfig.topk_groups={self.topk_groups} must be in [1, n_expert_groups={self.n_expert_groups}].")
        if self.n_expert_groups > 1 and self.router != "top_k":
            raise ValueError("MoEConfig.n_expert_groups > 1 (group-limited routing) needs router='top_k'.")
        if self.n_expert_groups > 1 and self.top_k > self.topk_groups * self.experts_per_group:
            raise ValueError(
                f"MoEConfig.topk_groups={self.topk_groups} groups of {self.experts_per_group} experts cannot "
                f"supply k={self.top_k} experts; raise topk_groups.")
        if self.overflow == "reroute" and self.router == "hash":
            raise ValueError(
                "MoEConfig.overflow='reroute' moves overflowed choices to the next-best expert by router score, "
                "but router='hash' has no scores; use overflow='drop' or 'reduced_weight'.")
        if self.overflow == "renormalize" and self.router not in ("top_k", "hash"):
            raise ValueError(
                f"MoEConfig.overflow='renormalize' rescales the kept choices of each token, but router="
                f"{self.router!r} makes no token choices; use router='top_k' (or 'hash'), or overflow='drop'.")
        if self.use_correction_bias and self.router != "top_k":
            raise ValueError("MoEConfig.use_correction_bias needs router='top_k'.")
        if self.topk_order == "topk_softmax" and self.score_fn != "softmax":
            raise ValueError("MoEConfig.topk_order='topk_softmax' is defined for score_fn='softmax' only.")
        if self.router == "top_k" and self.topk_order == "topk_softmax" and self.top_k == 1:
            warnings.warn(TOPK_SOFTMAX_TOP1_WARNING, UserWarning, stacklevel=3)
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"MoEConfig.jitter_eps={self.jitter_eps} must be in [0, 1).")
        _positive("logit_noise_std", self.logit_noise_std, allow_zero=True)
        _positive("soft_slots_per_expert", self.soft_slots_per_expert)
        _positive("router_init_scale", self.router_init_scale)
        _positive("expert_init_scale", self.expert_init_scale)
        for name in ("bias_update_rate", "balance_loss_coef", "z_loss_coef"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("num_shared_experts", self.num_shared_experts, allow_zero=True)
        if self.shared_d_ff is not None:
            _positive("shared_d_ff", self.shared_d_ff)
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError(
                "MoEConfig.shared_expert_gate=True gates the shared experts, but num_shared_experts=0; "
                "set num_shared_experts >= 1 or shared_expert_gate=False.")
        if self.router == "soft" and self.dispatch != "einsum":
            raise ValueError("MoEConfig.router='soft' mixes every token into every slot: set dispatch='einsum'.")
        dropless = self.capacity_factor is None or self.eval_capacity_factor is None
        if dropless and self.expert_backend == "einsum":
            raise ValueError(
                "MoEConfig.capacity_factor=None (dropless) needs expert_backend='blocked', 'ragged_dot' or 'pallas'; "
                "the 'einsum' backend runs fixed-capacity buffers.")
        if not dropless and self.expert_backend not in ("einsum", "blocked"):
            raise ValueError(
                f"MoEConfig.expert_backend={self.expert_backend!r} runs the dropless sorted path; "
                "set capacity_factor=None and eval_capacity_factor=None, or use expert_backend='einsum' "
                "(or 'blocked') for capacity buffers.")

    # ---- derived values: the one place they are computed ----
    @property
    def num_routed_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def top_k(self) -> int:
        return self.num_experts_per_token * self.granularity

    @property
    def expert_d_ff(self) -> int:
        return self.d_ff // self.granularity

    @property
    def experts_per_group(self) -> int:
        return self.num_routed_experts // self.n_expert_groups

    @property
    def shared_width(self) -> int:
        """Hidden width of all shared experts together (they run as one FFN)."""
        return self.num_shared_experts * (self.shared_d_ff or self.expert_d_ff)

    @property
    def balance_needs_batch_load(self) -> bool:
        """Whether the balance loss's f_i counts the whole batch (scope 'batch', token choices by a gate):
        then it is not a mean over microbatches, and a step over several must count the batch's load first."""
        return self.balance_loss_scope == "batch" and self.router == "top_k"

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def tokens_per_group(self, batch: int, length: int) -> int:
        """S, the tokens of one routing group of a `[batch, length]` batch: `group_size`, or by default one
        sequence (grouping='tokens': `length`) or one position across the batch (grouping='position': `batch`)."""
        if self.group_size is not None:
            return self.group_size
        return length if self.grouping == "tokens" else batch

    def capacity_factor_for(self, train: bool) -> Optional[float]:
        return self.capacity_factor if train else self.eval_capacity_factor

    def capacity(self, tokens_per_group: int, train: bool) -> Optional[int]:
        """Slots per expert per group: C = ceil(cf * S * k / E), at least `min_capacity`, at most S.

        Expert choice uses the same formula, with k read as the mean number of experts per token.
        `reduced_weight` enlarges the buffer to ceil(overflow_buffer_factor * C) (see capacity.py).
        Returns None for dropless routing.
        """
        if self.capacity_factor_for(train) is None:
            return None
        if self.router == "soft":
            return self.soft_slots_per_expert
        c = self.nominal_capacity(tokens_per_group, train)
        if self.overflow == "reduced_weight":
            c = math.ceil(self.overflow_buffer_factor * c - 1e-9)
        return min(c, tokens_per_group)

    def nominal_capacity(self, tokens_per_group: int, train: bool) -> Optional[int]:
        """C before `reduced_weight` enlarges the buffer (the share an expert's combine mass is held to)."""
        cf = self.capacity_factor_for(train)
        if cf is None:
            return None
        exact = cf * tokens_per_group * self.top_k / self.num_routed_experts
        return min(max(self.min_capacity, math.ceil(exact - 1e-9)), tokens_per_group)
