"""Array aliases and the axis-letter glossary: every letter of an einsum string or a shape suffix
means one thing, here, everywhere in the project.

Tokens and routing
    B  batch (sequences)                   L  sequence length (query positions)
    T  tokens in a batch (B * L = G * S)   V  vocabulary
    G  token groups (routing happens within a group; for a loss, the sets of tokens it averages over)
    S  tokens per group                    D  model width (d_model)
    E  routed experts                      K  experts per token (top-k; K = E for expert choice)
    C  expert capacity: buffer slots per expert per group (Soft MoE: slots per expert)
    F  expert hidden width (d_ff of one expert)
Expert buffers
    X  rows per expert of a capacity buffer `[E, X, D]` (G * C, or one device's share of them)
    M  rows of a buffer flattened over experts: `E * X`, or the dropless rows sorted by expert
Attention
    H  query heads                         N  key/value heads (N = H for MHA; GQA: H = N * R)
    R  query heads per key/value head      J  key positions (the sequence, or the whole decode cache)
    Q  query/key head width                U  value head width
    O  MLA per-head query/key width without RoPE
    P  RoPE width (MLA: the decoupled query/key part)
    A  MLA query latent width (q_lora_rank)
    Z  MLA key/value latent width (kv_lora_rank)
Grouped-matmul kernels (pallas_kernels/metadata.py)
    I  work items of one kernel call       Y  row tiles
    W  local groups: the groups (experts) whose weights one kernel call holds

A digit is an axis of that size (`gate_T1`, `kth_B1`). A lowercase letter is
a part of its capital's axis (`x_mD`: one step's block of the M rows). An axis that flattens several
is not given a letter: the code says it in a comment (`# [G, E * C + 1]`) or reshapes first.

A tensor whose shape is not obvious carries it in its name: `dispatch_GSEC`, `w_in_EDF`,
`slot_GSK`. Capacity buffers are laid out expert-major, `[E, G, C, D]`, so that expert FFNs are one
batched matmul over E without a transpose.
"""
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
