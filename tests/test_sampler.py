"""The on-device sampler against plain numpy implementations of vLLM's sampling semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpage import sampler
from jaxpage.sampler import RowSpec, SamplerPlan
from jaxpage.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_CONTEXT = 512


@functools.partial(jax.jit, static_argnums=2)
def _sample(logits, arrays, plan):
    return sampler.sample(logits, arrays, plan)


@functools.partial(jax.jit, static_argnums=2)
def _filtered(logits, arrays, plan):
    return sampler.filtered_logits(logits, arrays, plan)


def device_arrays(plan, rows):
    return {k: jnp.asarray(v) for k, v in sampler.host_arrays(plan, rows).items()}


def run(rows, logits, *, plan=None, num_rows=None):
    """Sample `rows` (logits padded with zero rows up to the bucket) -> numpy SamplerOutput."""
    plan = plan or sampler.plan_for(rows, num_rows or len(rows), MAX_CONTEXT)
    logits = np.asarray(logits, np.float32)
    padded = np.zeros((plan.num_rows, logits.shape[1]), np.float32)
    padded[:len(logits)] = logits
    out = _sample(jnp.asarray(padded), device_arrays(plan, rows), plan)
    return jax.tree.map(np.asarray, out)


def filtered(rows, logits, *, plan=None):
    plan = plan or sampler.plan_for(rows, len(rows), MAX_CONTEXT)
    return np.asarray(_filtered(jnp.asarray(logits, jnp.float32), device_arrays(plan, rows), plan))


def row(seed=0, step=0, prompt=(), output=(), eos=(), **params):
    return RowSpec(SamplingParams(**params), seed, step, list(prompt), list(output), tuple(eos))


# ---- numpy references -----------------------------------------------------------------------

def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_penalise(logits, prompt, output, presence, frequency, repetition):
    x = np.array(logits, np.float32)
    for t in set(prompt) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] = x[t] - frequency * output.count(t) - presence
    return x


def np_keep(scaled, *, min_p=0.0, top_k=0, top_p=1.0):
    """Tokens kept by min_p, then top_k, then top_p (ties at a boundary all kept)."""
    p = np_softmax(scaled)
    keep = p >= min_p * p.max()
    if top_k:
        keep &= np.array([np.sum(scaled > s) < top_k for s in scaled])
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        keep &= np.array([q[q > q[t]].sum() < top_p for t in range(len(q))])
    return keep


def random_logits(rng, rows, vocab, scale=2.0):
    return (scale * rng.standard_normal((rows, vocab))).astype(np.float32)


# ---- tests ----------------------------------------------------------------------------------

def test_greedy_rows_pick_the_argmax():
    logits = random_logits(np.random.default_rng(0), 5, 300)
    rows = [row(seed=i, temperature=0.0, min_p=0.3 * (i % 2)) for i in range(5)]
    np.testing.assert_array_equal(run(rows, logits).token_ids, logits.argmax(1))
    # The same greedy rows inside a plan that sorts and penalises still pick the argmax.
    plan = SamplerPlan(8, MAX_LOGPROBS, True, 256)
    np.testing.assert_array_equal(run(rows, logits, plan=plan).token_ids[:5], logits.argmax(1))


def test_temperature_divides_the_logits():
    logits = random_logits(np.random.default_rng(1), 2, 50)
    rows = [row(temperature=0.5), row(temperature=2.0)]
    np.testing.assert_allclose(filtered(rows, logits), logits / np.array([[0.5], [2.0]]),
                               rtol=1e-6)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_keeps_tokens_with_probability_at_least_min_p_times_the_max(min_p):
    rng = np.random.default_rng(2)
    logits = random_logits(rng, 6, 40)
    rows = [row(temperature=t, min_p=min_p) for t in (0.3, 0.7, 1.0, 1.3, 2.0, 5.0)]
    out = filtered(rows, logits)
    for r, spec in enumerate(rows):
        scaled = logits[r] / spec.params.temperature
        np.testing.assert_array_equal(np.isfinite(out[r]), np_keep(scaled, min_p=min_p))
        np.testing.assert_allclose(out[r][np.isfinite(out[r])], scaled[np.isfinite(out[r])],
                                   rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 7, 39, 40, 1000])
def test_top_k_keeps_the_k_largest(top_k):
    logits = random_logits(np.random.default_rng(3), 4, 40)
    rows = [row(seed=i, temperature=0.9, top_k=top_k) for i in range(4)]
    out = filtered(rows, logits)
    for r in range(4):
        expected = np_keep(logits[r] / 0.9, top_k=top_k)
        assert expected.sum() == min(top_k, 40)
        np.testing.assert_array_equal(np.isfinite(out[r]), expected)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p):
    logits = random_logits(np.random.default_rng(4), 4, 64)
    rows = [row(seed=i, temperature=t, top_p=top_p) for i, t in enumerate((0.5, 1.0, 1.0, 3.0))]
    out = filtered(rows, logits)
    for r, spec in enumerate(rows):
        expected = np_keep(logits[r] / spec.params.temperature, top_p=top_p)
        np.testing.assert_array_equal(np.isfinite(out[r]), expected)


def test_ties_at_a_top_k_or_top_p_boundary_are_all_kept():
    logits = np.log(np.array([[0.25, 0.25, 0.25, 0.15, 0.1]] * 2, np.float32))
    rows = [row(temperature=1.0, top_k=2), row(temperature=1.0, top_p=0.4)]
    keep = np.isfinite(filtered(rows, logits))
    np.testing.assert_array_equal(keep, [[1, 1, 1, 0, 0]] * 2)
    for r, spec in enumerate(rows):
        p = spec.params
        np.testing.assert_array_equal(keep[r], np_keep(logits[r], top_k=p.top_k, top_p=p.top_p))


def test_min_p_top_k_top_p_combined_match_numpy():
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 32, 50)
    rows = [row(seed=i, temperature=float(rng.uniform(0.2, 2.0)),
                min_p=float(rng.choice([0, 0.02])), top_k=int(rng.choice([0, 3, 10, 30])),
                top_p=float(rng.choice([1.0, 0.6, 0.9])))
            for i in range(32)]
    out = filtered(rows, logits)
    for r, spec in enumerate(rows):
        p = spec.params
        expected = np_keep(logits[r] / p.temperature, min_p=p.min_p, top_k=p.top_k, top_p=p.top_p)
        np.testing.assert_array_equal(np.isfinite(out[r]), expected, err_msg=str(p))


def np_keep_fast(scaled, *, top_k=0, top_p=1.0):
    """np_keep for long rows: tails from one sort instead of a sum per token."""
    keep = np.ones(len(scaled), bool)
    if top_k:
        keep &= len(scaled) - np.searchsorted(np.sort(scaled), scaled, side="right") < top_k
    if top_p < 1.0:
        q = np.where(keep, np_softmax(scaled), 0.0)
        order = np.sort(q)  # ascending; mass strictly above q[t] = total - cumsum through q[t]
        above = q.sum() - np.cumsum(order)[np.searchsorted(order, q, side="right") - 1]
        keep &= above < top_p * q.sum()
    return keep


@pytest.mark.parametrize("vocab", [3000, 5003])
def test_top_k_and_top_p_over_many_chunks_with_ties_bans_and_signed_zeros(vocab):
    rng = np.random.default_rng(vocab)
    logits = random_logits(rng, 6, vocab)
    logits[1] = np.round(logits[1])               # heavy ties everywhere
    logits[2, rng.choice(vocab, vocab // 2, replace=False)] = -np.inf  # half the row banned
    logits[3] = np.where(rng.random(vocab) < 0.5, -0.0, 0.0)  # a flat row of signed zeros
    logits[3, :5] = [3.0, 2.0, 2.0, 1.0, 1.0]
    logits[4] *= 0.01                             # nearly flat: a nucleus of thousands of tokens
    settings = [(40, 1.0), (0, 0.9), (1000, 0.95), (3, 0.5), (0, 0.95), (vocab, 0.3)]
    rows = [row(seed=i, temperature=1.0, top_k=k, top_p=p) for i, (k, p) in enumerate(settings)]
    out = filtered(rows, logits)
    for r, (k, p) in enumerate(settings):
        expected = np_keep_fast(logits[r], top_k=k, top_p=p)
        np.testing.assert_array_equal(np.isfinite(out[r]), expected, err_msg=f"row {r}")
    assert np.isfinite(out[4]).sum() > 1000


def test_ordered_keys_sort_like_the_floats_and_map_back():
    x = np.array([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-30, 2.5, 3e38, np.inf], np.float32)
    keys = np.asarray(sampler._ordered_keys(jnp.asarray(x)))
    assert (np.diff(keys.astype(np.int64)) >= 0).all() and keys[4] == keys[5]
    np.testing.assert_array_equal(np.asarray(sampler._key_values(jnp.asarray(keys))),
                                  np.where(x == 0, 0.0, x))


def test_penalties_match_numpy_with_duplicate_tokens():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 4, 30)
    settings = [dict(repetition_penalty=1.3), dict(presence_penalty=0.7),
                dict(frequency_penalty=-0.4), dict(repetition_penalty=0.8, presence_penalty=-1.5,
                                                   frequency_penalty=0.9)]
    rows = []
    for i, s in enumerate(settings):
        prompt = list(rng.integers(0, 30, 12)) + [5, 5]
        output = list(rng.integers(0, 30, 9)) + [7, 7, 7]
        rows.append(row(seed=i, step=len(output), prompt=prompt, output=output, temperature=1.0,
                        **s))
    out = filtered(rows, logits)
    for r, (spec, s) in enumerate(zip(rows, settings)):
        p = spec.params
        expected = np_penalise(logits[r], list(spec.prompt_token_ids), list(spec.output_token_ids),
                               p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
        np.testing.assert_allclose(out[r], expected, rtol=1e-6, atol=1e-6, err_msg=str(s))


def test_penalties_change_the_greedy_choice():
    logits = np.array([[0.0, 3.0, 2.0, 1.0]], np.float32)
    rows = [row(temperature=0.0, output=[1, 1], step=2, frequency_penalty=0.6)]
    # 3.0 - 2 * 0.6 = 1.8 < 2.0
    assert run(rows, logits).token_ids[0] == 2


def test_penalties_applied_beforehand_sample_exactly_as_penalties_applied_inside():
    # The runner applies penalties in an executable of its own and hands `sample` the result.
    rng = np.random.default_rng(16)
    logits = jnp.asarray(random_logits(rng, 4, 300))
    rows = [row(seed=i, step=2, temperature=t, top_k=k, logprobs=2, prompt=[1, 2], output=[3, 4],
                eos=(5,), min_tokens=3, repetition_penalty=1.4, frequency_penalty=0.5)
            for i, (t, k) in enumerate([(0.0, 0), (0.8, 0), (1.0, 20), (0.6, 3)])]
    plan = sampler.plan_for(rows, 4, MAX_CONTEXT)
    arrays = device_arrays(plan, rows)
    inside = _sample(logits, arrays, plan)
    beforehand = jax.jit(sampler.sample, static_argnums=2)(
        logits, arrays, plan, jax.jit(sampler.penalise)(logits, arrays))
    for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(beforehand)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = np.array([[0.0, 9.0, 1.0, 8.0, 2.0]] * 3, np.float32)
    params = dict(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    rows = [row(step=0, eos=(1,), **params), row(step=1, eos=(1,), **params),
            row(step=2, eos=(1,), **params)]
    out = run(rows, logits)
    np.testing.assert_array_equal(out.token_ids, [4, 4, 1])
    banned = filtered(rows[:1], logits[:1])[0]
    assert np.isneginf(banned[[1, 3]]).all() and np.isfinite(banned[[0, 2, 4]]).all()
    # Even a sampled row never draws a banned id.
    sampled = [row(seed=s, step=0, eos=(1,), temperature=1.0, min_tokens=1, stop_token_ids=[3])
               for s in range(64)]
    assert not np.isin(run(sampled, np.repeat(logits[:1], 64, 0)).token_ids, [1, 3]).any()


def test_seeded_draws_are_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 3, 500, scale=0.5)
    probe = [row(seed=11, step=3, temperature=1.0), row(seed=22, step=0, temperature=0.8),
             row(seed=33, step=5, temperature=1.2, min_p=0.01)]
    alone = run(probe, logits).token_ids
    np.testing.assert_array_equal(run(probe, logits).token_ids, alone)
    # Reversed order, extra rows that switch on filtering/penalties/logprobs, a bigger bucket.
    others = [row(seed=1, temperature=1.0, top_k=5, logprobs=3),
              row(seed=2, temperature=0.0, repetition_penalty=1.5, prompt=[1, 2], output=[3])]
    mixed_rows = [others[0], probe[2], others[1], probe[1], probe[0]]
    mixed_logits = np.stack([logits[0] + 1, logits[2], logits[1] - 1, logits[1], logits[0]])
    mixed = run(mixed_rows, mixed_logits, num_rows=8).token_ids
    np.testing.assert_array_equal(mixed[[4, 3, 1]], alone)
    # Another seed or step draws from another stream.
    moved = [row(seed=12, step=3, temperature=1.0), row(seed=22, step=1, temperature=0.8),
             row(seed=34, step=5, temperature=1.2, min_p=0.01)]
    assert (run(moved, logits).token_ids != alone).any()


def test_row_key_is_fold_in_of_the_seed_key_and_step():
    rows = [row(seed=1234, step=7), row(seed=2**40 + 5, step=0)]
    arrays = sampler.host_arrays(SamplerPlan(2), rows)
    keys = sampler.row_keys(jnp.asarray(arrays["seed"]), jnp.asarray(arrays["step_index"]))
    expected = [jax.random.fold_in(jax.random.key(1234, impl="threefry2x32"), 7),
                # a 64-bit seed: key data is its (high, low) 32-bit halves
                jax.random.fold_in(jax.random.wrap_key_data(
                    jnp.array([2**8, 5], jnp.uint32), impl="threefry2x32"), 0)]
    for got, want in zip(keys, expected):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_sampling_frequencies_match_the_filtered_distribution():
    num = 4000
    base = np.array([2.0, 1.5, 1.2, 1.0, 0.3, -0.5, -3.0, 0.9], np.float32)
    params = dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.02)
    rows = [row(seed=100 + i, step=i % 7, **params) for i in range(num)]
    counts = np.bincount(run(rows, np.tile(base, (num, 1))).token_ids, minlength=len(base))
    scaled = base / 0.8
    keep = np_keep(scaled, min_p=0.02, top_k=6, top_p=0.9)
    assert 2 <= keep.sum() < len(base)
    expected = np.where(keep, np_softmax(np.where(keep, scaled, -np.inf)), 0.0) * num
    assert counts[~keep].sum() == 0, "a filtered-out token was drawn"
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 25.0, (counts, expected.round(1))  # df <= 5: p ~ 1e-4


def test_logprobs_are_raw_log_softmax_and_top_ids_the_true_top_k():
    rng = np.random.default_rng(8)
    logits = random_logits(rng, 3, 64)
    rows = [row(seed=1, temperature=1.3, logprobs=5, repetition_penalty=1.4, output=[0, 1], step=2),
            row(seed=2, temperature=0.0, logprobs=0), row(seed=3, temperature=0.5, top_k=4)]
    out = run(rows, logits)
    log_softmax = np.log(np.stack([np_softmax(x) for x in logits]))
    np.testing.assert_allclose(out.logprobs, log_softmax[np.arange(3), out.token_ids], atol=1e-5)
    assert out.top_ids.shape == (3, MAX_LOGPROBS)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(out.top_logprobs,
                               np.take_along_axis(log_softmax, out.top_ids, axis=1), atol=1e-5)
    no_logprobs = run([row(temperature=0.0)], logits[:1])
    assert no_logprobs.top_ids.shape == (1, 0) and no_logprobs.top_logprobs.shape == (1, 0)


LARGE_VOCAB = 3 * sampler.VOCAB_CHUNK + 5  # several draw chunks and a padded last one


def test_inverse_cdf_draw_follows_the_distribution_across_chunks():
    # Mass on a few tokens in the first, a middle and the last (padded) chunk; a stratified grid
    # of uniforms must hit each token in proportion to its probability.
    kept = np.array([3, sampler.VOCAB_CHUNK - 1, sampler.VOCAB_CHUNK, LARGE_VOCAB - 1])
    x = np.full(LARGE_VOCAB, -np.inf, np.float32)
    x[kept] = [1.0, 0.2, -0.5, 0.7]
    n = 20_000
    u = (np.arange(n) + 0.5) / n
    filtered = jnp.asarray(np.broadcast_to(x, (n, LARGE_VOCAB)))
    draws = np.asarray(sampler.inverse_cdf_draw(filtered, jnp.full((n,), 1.0), jnp.asarray(u)))
    assert set(np.unique(draws)) <= set(kept.tolist())
    np.testing.assert_allclose([np.mean(draws == k) for k in kept], np_softmax(x[kept]), atol=2e-4)


def test_uniforms_at_the_ends_of_the_interval_pick_the_first_and_last_kept_tokens():
    x = np.full((2, LARGE_VOCAB), -np.inf, np.float32)
    x[:, [10, sampler.VOCAB_CHUNK + 7]] = [0.0, -1.0]  # -inf after the last one, and padding
    u = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))])
    draws = sampler.inverse_cdf_draw(jnp.asarray(x), jnp.zeros(2), u)
    np.testing.assert_array_equal(draws, [10, sampler.VOCAB_CHUNK + 7])


def test_logprobs_over_several_chunks_with_and_without_penalties():
    logits = random_logits(np.random.default_rng(32), 3, LARGE_VOCAB)
    rows = [row(seed=1, temperature=0.0, logprobs=2),
            row(seed=2, temperature=0.9, logprobs=2, presence_penalty=2.0, repetition_penalty=2.0,
                output=[int(logits[1].argmax())]),  # the penalty lowers the raw maximum
            row(seed=3, temperature=1.0, logprobs=2)]
    log_softmax = np.log(np.stack([np_softmax(x) for x in logits]))
    for plan_rows in (rows[:1] + rows[2:], rows):  # without and with a penalty plan
        out = run(plan_rows, logits[:len(plan_rows)])
        picked = log_softmax[np.arange(len(plan_rows)), out.token_ids]
        np.testing.assert_allclose(out.logprobs, picked, atol=1e-4)
        assert out.token_ids[0] == logits[0].argmax()


@pytest.mark.parametrize("vocab", [300, LARGE_VOCAB])
def test_top_k_rows_is_jax_top_k_with_ties_across_chunks(vocab):
    x = np.random.default_rng(33).integers(-4, 4, (3, vocab)).astype(np.float32)  # many ties
    x[1, -1] = x[1, 0] = 9.0  # a tie between the first and the last (padded) chunk
    got = sampler.top_k_rows(jnp.asarray(x), MAX_LOGPROBS)
    want = jax.lax.top_k(jnp.asarray(x), MAX_LOGPROBS)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_padded_rows_are_greedy_and_leave_real_rows_unchanged():
    rng = np.random.default_rng(9)
    logits = random_logits(rng, 2, 100)
    rows = [row(seed=5, temperature=1.0, top_p=0.7), row(seed=6, temperature=0.7)]
    exact = run(rows, logits).token_ids
    plan = sampler.plan_for(rows, 8, MAX_CONTEXT)
    arrays = sampler.host_arrays(plan, rows)
    assert (arrays["temperature"][2:] == 0).all() and (arrays["top_p"][2:] == 1).all()
    padded_logits = np.concatenate([logits, random_logits(rng, 6, 100)])
    out = jax.tree.map(np.asarray, _sample(jnp.asarray(padded_logits),
                                           device_arrays(plan, rows), plan))
    np.testing.assert_array_equal(out.token_ids[:2], exact)
    np.testing.assert_array_equal(out.token_ids[2:], padded_logits[2:].argmax(1))
    assert np.isfinite(out.logprobs).all()


def test_plan_for_picks_the_smallest_listed_plan_and_host_arrays_match_the_specs():
    rng = np.random.default_rng(10)
    plans = set(sampler.all_plans([1, 4, 16], MAX_CONTEXT))
    assert len(plans) == len(sampler.all_plans([1, 4, 16], MAX_CONTEXT))
    choices = [dict(temperature=0.0), dict(temperature=0.9, top_k=5), dict(top_p=0.5),
               dict(temperature=0.0, top_k=3), dict(logprobs=2), dict(logprobs=0),
               dict(repetition_penalty=1.1), dict(presence_penalty=0.5), dict(min_tokens=3),
               dict(min_p=0.1)]
    for trial in range(40):
        n = int(rng.integers(1, 5))
        picked = [choices[i] for i in rng.integers(0, len(choices), n)]
        history = int(rng.choice([3, 200, 500]))
        rows = [row(seed=trial, step=1, prompt=[2] * history, output=[3, 4], eos=(1,), **c)
                for c in picked]
        plan = sampler.plan_for(rows, 4, MAX_CONTEXT)
        assert plan in plans
        assert plan.filtering == any(
            c.get("temperature", 1.0) > 0 and ("top_k" in c or "top_p" in c) for c in picked)
        assert (plan.num_logprobs > 0) == any(c.get("logprobs") for c in picked)
        assert (plan.penalty_len > 0) == any(k in c for c in picked for k in (
            "repetition_penalty", "presence_penalty", "min_tokens"))
        arrays = sampler.host_arrays(plan, rows)
        assert [(k, v.shape, v.dtype) for k, v in arrays.items()] == sampler.array_specs(plan)
        assert all(v.dtype in (np.int32, np.uint32, np.float32) for v in arrays.values())


def test_plans_that_do_not_fit_the_rows_are_rejected():
    with pytest.raises(ValueError, match="num_rows"):
        sampler.plan_for([row()] * 3, 2, MAX_CONTEXT)
    with pytest.raises(ValueError, match="filtering"):
        sampler.host_arrays(SamplerPlan(1), [row(top_k=3)])
    with pytest.raises(ValueError, match="logprobs"):
        sampler.host_arrays(SamplerPlan(1), [row(logprobs=1)])
    with pytest.raises(ValueError, match="penalty_len"):
        sampler.host_arrays(SamplerPlan(1), [row(presence_penalty=1.0, output=[1], step=1)])
    with pytest.raises(ValueError, match="max_context"):
        sampler.plan_for([row(repetition_penalty=1.2, prompt=[0] * 900)], 1, MAX_CONTEXT)
    with pytest.raises(ValueError, match="num_rows"):
        _sample(jnp.zeros((3, 10)), device_arrays(SamplerPlan(2), []), SamplerPlan(2))


def test_no_plan_sorts_and_only_logprobs_take_top_k_of_the_vocabulary():
    def walk(jaxpr):  # primitive names, nested jaxprs (jit, scan, ...) included
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    def primitives(plan):
        arrays = device_arrays(plan, [row(temperature=0.7, min_p=0.1)])
        jaxpr = jax.make_jaxpr(sampler.sample, static_argnums=2)(jnp.zeros((4, 64)), arrays, plan)
        return set(walk(jaxpr.jaxpr))

    assert not {"sort", "top_k"} & primitives(SamplerPlan(4))
    assert not {"sort", "top_k"} & primitives(SamplerPlan(4, filtering=True, penalty_len=256))
    assert "top_k" in primitives(SamplerPlan(4, num_logprobs=MAX_LOGPROBS))
