"""Autoregressive generation with the fixed-size decode cache: greedy, temperature and top-k sampling.

    ids = generate(model, prompt_BL, max_new_tokens=32)                          # greedy
    ids = generate(model, prompt_BL, max_new_tokens=32, temperature=0.8, rng=key)  # sampled

Returns the prompt followed by the new tokens, <int32>[B, L + max_new_tokens]. The prompt is fed in
one prefill call, then one jitted step per token. Both take the model as (graphdef, state), so they
are traced once per (model structure, batch, prompt length, cache length, sampling mode) and reused
across tokens and across calls; the cache has a fixed size and a position index, so a step's shapes
never change (tests check, through the jit caches of `_prefill` and `_step`, that a step is compiled
once, not per token).

MoE layers run in eval mode on the tokens of each call (see transformer.py for when that routes every
token as the full forward pass does). Expert-choice and Soft MoE routers with grouping='tokens' mix
tokens of one group, so their one-token decode groups differ from training's: prefer
grouping='position' for them.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.transformer import DecodeCache, Transformer
from moe_jax.types import Array

def select_next(logits_BV: Array, key: Optional[Array], temperature: Array, *, greedy: bool,
                top_k: Optional[int]) -> Array:
    """<float32>[B, V] -> <int32>[B]: argmax, or a draw from softmax(logits / temperature) over the top_k."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy", "top_k"))
def _prefill(graphdef, state, prompt_BL, cache, key, temperature, *, greedy, top_k):
    logits_BLV, cache = nnx.merge(graphdef, state).decode(prompt_BL, cache)
    return select_next(logits_BLV[:, -1], key, temperature, greedy=greedy, top_k=top_k), cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy", "top_k"))
def _step(graphdef, state, token_B, cache, key, temperature, *, greedy, top_k):
    logits_BLV, cache = nnx.merge(graphdef, state).decode(token_B[:, None], cache)
    return select_next(logits_BLV[:, -1], key, temperature, greedy=greedy, top_k=top_k), cache


def _check(model: Transformer, prompt_BL, max_new_tokens, temperature, rng, top_k, cache_len) -> int:
    cfg = model.cfg
    if prompt_BL.ndim != 2 or prompt_BL.shape[1] < 1 or not jnp.issubdtype(prompt_BL.dtype, jnp.integer):
        raise ValueError("generate: prompt must be <int>[batch, length >= 1], "
                         f"got {prompt_BL.dtype}{list(prompt_BL.shape)}.")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0.")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy).")
    if temperature > 0 and rng is None:
        raise ValueError("generate: temperature > 0 samples; pass rng=jax.random.key(seed).")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"generate: top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}] or None.")
    B, L = prompt_BL.shape
    cache_len = cfg.max_seq_len if cache_len is None else cache_len
    if L + max_new_tokens > cache_len:
        raise ValueError(f"generate: {L} prompt + {max_new_tokens} new tokens exceed the cache of {cache_len} "
                         "positions; pass a larger cache_len (at most ModelConfig.max_seq_len) or generate fewer.")
    moe = cfg.moe
    if moe is not None and moe.group_size is not None:
        # tokens grouping splits the B * L prefill tokens and the B step tokens; position grouping the batch
        for n in ((B * L, B) if moe.grouping == "tokens" else (B,)):
            if n % moe.group_size:
                raise ValueError(
                    f"generate: MoEConfig.group_size={moe.group_size} does not divide the {n} tokens a decode "
                    f"call routes (batch {B}, prompt {L}, then 1 token per sequence); decode with a model "
                    "whose MoEConfig.group_size is None (one sequence per group) or a divisor of the batch.")
    return cache_len


def generate(model: Transformer, prompt_BL: Array, *, max_new_tokens: int, temperature: float = 0.0,
             rng: Optional[Array] = None, top_k: Optional[int] = None, cache_len: Optional[int] = None) -> Array:
    """Prompt <int>[B, L] -> <int32>[B, L + max_new_tokens]. temperature 0: greedy; > 0: sampled with `rng`
    (token t uses fold_in(rng, t)); top_k keeps the k most likely tokens. cache_len defaults to max_seq_len."""
    prompt_BL = jnp.asarray(prompt_BL)
    cache_len = _check(model, prompt_BL, max_new_tokens, temperature, rng, top_k, cache_len)
    prompt_BL = prompt_BL.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt_BL
    greedy = temperature == 0
    key = jax.random.key(0) if rng is None else rng  # unused when greedy
    temp = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
    graphdef, state = nnx.split(model)
    cache: DecodeCache = model.init_cache(prompt_BL.shape[0], cache_len)
    token_B, cache = _prefill(graphdef, state, prompt_BL, cache, jax.random.fold_in(key, 0), temp,
                              greedy=greedy, top_k=top_k)
    out = [token_B]
    for t in range(1, max_new_tokens):
        token_B, cache = _step(graphdef, state, token_B, cache, jax.random.fold_in(key, t), temp,
                               greedy=greedy, top_k=top_k)
        out.append(token_B)
    return jnp.concatenate([prompt_BL, jnp.stack(out, axis=1)], axis=1)
