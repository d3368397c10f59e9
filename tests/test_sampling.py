"""generate(): greedy and sampled tokens agree with a full forward pass over the generated sequence, are
deterministic for a given rng, and the decode step is traced once, not once per token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import sampling
from moe_jax.moe_config import MoEConfig
from moe_jax.model_config import ModelConfig
from moe_jax.sampling import generate
from moe_jax.transformer import Transformer

V = 64


def _cfg(**moe_kw):
    # eval_capacity_factor = E / k = 2: C = S, nothing drops, decode routes as the full pass does
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=4, num_experts_per_token=2, eval_capacity_factor=2.0,
                    min_capacity=1, **moe_kw)
    return ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                       max_seq_len=16, moe=moe, moe_every=1, first_dense_layers=1)


@pytest.fixture(scope="module")
def model():
    return Transformer(_cfg(), rngs=nnx.Rngs(params=jax.random.key(0, impl="rbg")))


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(5), (2, 4), 0, V)


forward = nnx.jit(lambda m, t: m(t)[0])


def test_greedy_is_argmax_of_the_full_forward_and_traces_once(model, prompt):
    compiled = lambda: {"prefill": sampling._prefill._cache_size(), "step": sampling._step._cache_size()}
    before = compiled()
    out = generate(model, prompt, max_new_tokens=7)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], prompt)
    # every generated token is the argmax of the full (uncached) model's logits given the tokens before it
    logits = forward(model, out[:, :-1])
    np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:], axis=-1))
    # jit cache entries: one per compiled signature, so a step re-traced per token would add several
    assert compiled()["step"] - before["step"] <= 1  # 6 steps, at most one compilation
    assert compiled()["prefill"] - before["prefill"] <= 1
    traced = compiled()
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=7), out)  # deterministic
    assert compiled() == traced  # a second call reuses both compilations


def test_sampling_follows_rng_and_temperature(model, prompt):
    rng = jax.random.key(11)
    out = generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=rng)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=rng), out)
    other = generate(model, prompt, max_new_tokens=6, temperature=2.0, rng=jax.random.key(12))
    assert not np.array_equal(other, out)  # 12 draws at T = 2 over 64 tokens: equal by chance ~never
    # token t is the categorical draw with key fold_in(rng, t) from the full model's logits / T
    logits = forward(model, out[:, :-1])[:, 3:]
    draw = jax.jit(jax.vmap(lambda t, l: jax.random.categorical(jax.random.fold_in(rng, t), l / 2.0), (0, 1), 1))
    np.testing.assert_array_equal(out[:, 4:], draw(jnp.arange(6), logits))


def test_top_k_keeps_the_k_most_likely():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 4.0, 0.0]])
    one = sampling.select_next(logits, jax.random.key(0), jnp.float32(5.0), greedy=False, top_k=1)
    np.testing.assert_array_equal(one, [1, 0])  # only the argmax survives, at any temperature
    keys = jax.random.split(jax.random.key(1), 400)
    two = jax.vmap(lambda k: sampling.select_next(logits, k, jnp.float32(5.0), greedy=False, top_k=2))(keys)
    assert set(np.unique(two[:, 0])) == {1, 3} and set(np.unique(two[:, 1])) == {0, 2}  # never outside the top 2


def test_generate_errors(model, prompt):
    assert generate(model, prompt, max_new_tokens=0).shape == (2, 4)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="cache_len"):
        generate(model, prompt, max_new_tokens=13)  # 4 + 13 > max_seq_len 16
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, rng=jax.random.key(0), top_k=0)
    grouped = nnx.eval_shape(lambda: Transformer(_cfg(group_size=4), rngs=nnx.Rngs(params=0)))
    with pytest.raises(ValueError, match=r"MoEConfig\.group_size=4"):
        generate(grouped, prompt, max_new_tokens=2)  # a step routes 2 tokens: groups of 4 do not fit
