"""Array aliases and the axis-letter glossary used in every einsum string and tensor name.

    B  batch (sequences)              L  sequence length
    D  model width (d_model)          F  expert hidden width (d_ff of one expert)
    E  routed experts                 C  expert capacity (buffer slots per expert per group)
    K  experts per token (top-k)      G  token groups (routing happens within a group)
    S  tokens per group               H  attention heads
    T  tokens in a batch (B * L = G * S)

A tensor whose shape is not obvious carries it in its name: `dispatch_GSEC`, `w_in_EDF`,
`slot_GSK`. Capacity buffers are laid out expert-major, `[E, G, C, D]`, so that expert FFNs are one
batched matmul over E without a transpose.
"""
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
