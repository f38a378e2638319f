"""On-device token sampling for a batch of rows, each with its own SamplingParams.

The host describes a step's rows with `RowSpec`s, picks a `SamplerPlan` (the static shape and
feature set of one compiled sampler), and packs the per-row settings into fixed-dtype arrays;
`sample` turns the model's logits into token ids and logprobs on the device.

Semantics follow vLLM / OpenAI, in this order:
  1. penalties on the raw logits: repetition (prompt and output tokens; logit > 0 -> logit / r,
     else logit * r), then frequency and presence (output tokens only:
     logit - frequency * count - presence * [count > 0]);
  2. min_tokens: while step_index < min_tokens, eos and stop token ids get -inf;
  3. temperature 0 (below GREEDY_EPS) -> argmax of the penalised logits; otherwise divide by the
     temperature, keep the tokens that pass min_p (p >= min_p * p_max), then top_k, then top_p
     (on the distribution left by the previous filters), and draw by inverse transform
     sampling: one uniform per row, found in the rows' cumulative softmax.
Filters are value thresholds, so tokens tied at a boundary are all kept or all dropped: top_k
keeps t iff fewer than k tokens have a larger logit; top_p keeps t iff the tokens strictly more
likely than t hold less than top_p of the (filtered) mass.

Randomness: row key = fold_in(jax.random.key(seed, impl="threefry2x32"), step_index), with the
seed taken modulo 2**64, and the row's uniform = jax.random.uniform(row key), so a row's tokens
depend only on its seed, its step and its logits, not on the batch around it. Logprobs are
those of the model's raw distribution (log_softmax of the logits before penalties, temperature
and filters), as vLLM reports them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpage.sampling_params import MAX_LOGPROBS, SamplingParams

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
MIN_TOKEN_LIST_BUCKET = 256
BAN_ROOM = 256  # token-list slots past max_context for the ids min_tokens bans
VOCAB_CHUNK = 2048  # tokens per chunk of the inverse-CDF draw's first level


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """Static choices of one compiled sampler.

    num_rows:      rows of logits (a row bucket)
    num_logprobs:  0, or MAX_LOGPROBS when some row asks for top logprobs
    filtering:     some sampled row uses top_k or top_p (two threshold searches of the vocabulary)
    penalty_len:   0 when no row uses penalties or min_tokens bans, else the bucketed length of
                   the per-row token lists (prompt tokens, output tokens, banned ids)
    """

    num_rows: int
    num_logprobs: int = 0
    filtering: bool = False
    penalty_len: int = 0


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row of a sampling step, as the host knows it."""

    params: SamplingParams
    seed: int
    step_index: int  # tokens this sample has generated so far: its position in its random stream
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_ids: tuple[int, ...] = ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """token_ids i32[R]; logprobs f32[R] of the chosen ids; top_ids i32[R, K] and
    top_logprobs f32[R, K] (K = plan.num_logprobs)."""

    token_ids: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


# ---- host side --------------------------------------------------------------------------------

def token_list_buckets(max_context: int) -> list[int]:
    """Lengths the per-row token lists are padded to: 256 * 8**k up to half the limit, then the
    limit (max_context + BAN_ROOM). Few buckets keep the plans few; the lists are cheap anyway."""
    if max_context < 1:
        raise ValueError(f"max_context must be positive, got {max_context}")
    limit = max_context + BAN_ROOM
    buckets, size = [], MIN_TOKEN_LIST_BUCKET
    while 2 * size <= limit:
        buckets.append(size)
        size *= 8
    return buckets + [limit]


def all_plans(row_buckets: Sequence[int], max_context: int) -> list[SamplerPlan]:
    """Every plan `plan_for` can return for these row buckets (the runner compiles them all)."""
    if not row_buckets or any(r < 1 for r in row_buckets):
        raise ValueError(f"row_buckets must be positive sizes, got {list(row_buckets)}")
    lens = [0] + token_list_buckets(max_context)
    return [SamplerPlan(r, k, f, n) for r in sorted(set(row_buckets)) for k in (0, MAX_LOGPROBS)
            for f in (False, True) for n in lens]


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_EPS


def _uses_filters(params: SamplingParams) -> bool:
    return not _is_greedy(params) and (params.top_k > 0 or params.top_p < 1.0)


def reads_output_tokens(params: SamplingParams) -> bool:
    """Whether sampling reads the generated tokens themselves (penalties), not just their count."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def samples_ahead(params: SamplingParams, step_index: int) -> bool:
    """Whether a row can sample several steps in one launch, each step's token feeding the next
    on the device: its plan needs no token lists (penalties; min_tokens bans, which hold until
    step min_tokens) and no top logprobs. Beam search rows never can."""
    return not (reads_output_tokens(params) or params.min_tokens > step_index or params.logprobs
                or params.use_beam_search)


def _banned_ids(row: RowSpec) -> list[int]:
    if row.step_index >= row.params.min_tokens:
        return []
    return sorted(set(row.eos_token_ids) | set(row.params.stop_token_ids))


def _token_lists(row: RowSpec) -> tuple[list[int], list[int], list[int]]:
    """(prompt, output, banned) token lists the row's penalties and bans need on the device."""
    p = row.params
    prompt = list(row.prompt_token_ids) if p.repetition_penalty != 1.0 else []
    output = list(row.output_token_ids) if reads_output_tokens(p) else []  # copied only when read
    return prompt, output, _banned_ids(row)


def plan_for(rows: Sequence[RowSpec], num_rows: int, max_context: int) -> SamplerPlan:
    """The smallest plan (of `all_plans`) with `num_rows` rows that can serve these rows."""
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit the row bucket num_rows={num_rows}")
    needed = max((sum(map(len, _token_lists(r))) for r in rows), default=0)
    penalty_len = 0
    if needed:
        fitting = [b for b in token_list_buckets(max_context) if b >= needed]
        if not fitting:
            raise ValueError(
                f"a row needs {needed} penalty/ban token slots, more than max_context={max_context}"
                f" + {BAN_ROOM} (too many prompt+output tokens or stop_token_ids)")
        penalty_len = fitting[0]
    return SamplerPlan(
        num_rows=num_rows,
        num_logprobs=MAX_LOGPROBS if any(r.params.logprobs for r in rows) else 0,
        filtering=any(_uses_filters(r.params) for r in rows),
        penalty_len=penalty_len,
    )


def array_specs(plan: SamplerPlan) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, shape, dtype) of every array `sample` reads for this plan, in packing order."""
    r = plan.num_rows
    specs = [("temperature", (r,), np.dtype(np.float32)),
             ("min_p", (r,), np.dtype(np.float32)),
             ("seed", (r, 2), np.dtype(np.uint32)),  # threefry key data: (high, low) 32 bits
             ("step_index", (r,), np.dtype(np.uint32))]
    if plan.filtering:
        specs += [("top_k", (r,), np.dtype(np.int32)), ("top_p", (r,), np.dtype(np.float32))]
    if plan.penalty_len:
        specs += [("penalties", (r, 3), np.dtype(np.float32)),  # presence, frequency, repetition
                  ("token_lists", (r, plan.penalty_len), np.dtype(np.int32)),
                  ("token_list_ends", (r, 3), np.dtype(np.int32))]  # prompt, output, banned ends
    return specs


def host_arrays(plan: SamplerPlan, rows: Sequence[RowSpec]) -> dict[str, np.ndarray]:
    """Per-row settings packed as `array_specs(plan)`; rows past len(rows) are greedy no-ops."""
    if len(rows) > plan.num_rows:
        raise ValueError(f"{len(rows)} rows do not fit plan.num_rows={plan.num_rows}")
    out = {name: np.zeros(shape, dtype) for name, shape, dtype in array_specs(plan)}
    if plan.filtering:
        out["top_p"][:] = 1.0
    if plan.penalty_len:
        out["penalties"][:, 2] = 1.0
    for i, row in enumerate(rows):
        p = row.params
        if p.logprobs and p.logprobs > plan.num_logprobs:
            raise ValueError(f"row {i} asks for {p.logprobs} logprobs but the plan has "
                             f"num_logprobs={plan.num_logprobs}")
        if row.step_index < 0:
            raise ValueError(f"row {i}: step_index must be non-negative, got {row.step_index}")
        out["temperature"][i] = 0.0 if _is_greedy(p) else p.temperature
        out["min_p"][i] = p.min_p
        seed = row.seed % (1 << 64)
        out["seed"][i] = (seed >> 32, seed & 0xFFFFFFFF)
        out["step_index"][i] = row.step_index
        if _uses_filters(p):
            if not plan.filtering:
                raise ValueError(f"row {i} uses top_k/top_p but the plan has filtering=False")
            out["top_k"][i], out["top_p"][i] = p.top_k, p.top_p
        lists = _token_lists(row)
        total = sum(map(len, lists))
        if total > plan.penalty_len:
            raise ValueError(f"row {i} needs {total} penalty/ban token slots but the plan has "
                             f"penalty_len={plan.penalty_len}")
        if total:
            ids = np.asarray([t for part in lists for t in part], np.int64)
            if ids.min() < 0 or ids.max() >= 2**31:
                raise ValueError(f"row {i}: token ids must be in [0, 2**31), got {ids.min()}..."
                                 f"{ids.max()}")
            out["token_lists"][i, :total] = ids
            out["token_list_ends"][i] = np.cumsum([len(part) for part in lists])
            out["penalties"][i] = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
    return out


# ---- device side ------------------------------------------------------------------------------

def row_keys(seed: jax.Array, step_index: jax.Array) -> jax.Array:
    """Typed PRNG keys [R]: fold_in(key(seed), step) from threefry key data seed u32[R, 2]."""
    keys = jax.random.wrap_key_data(seed.astype(jnp.uint32), impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(keys, step_index.astype(jnp.uint32))


def penalise(logits: jax.Array, arrays: dict[str, jax.Array]) -> jax.Array:
    """f32[R, V]: the logits after repetition, frequency and presence penalties and min_tokens
    bans, read from the plan's token lists ("penalties", "token_lists", "token_list_ends")."""
    num_rows, vocab = logits.shape
    tokens, ends = arrays["token_lists"], arrays["token_list_ends"]
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    prompt_end, output_end, ban_end = ends[:, 0:1], ends[:, 1:2], ends[:, 2:3]
    rows = jnp.arange(num_rows, dtype=jnp.int32)[:, None]

    def ids_where(mask):  # tokens outside the mask index past the vocabulary and are dropped
        return rows, jnp.where(mask, tokens, vocab)

    counts = jnp.zeros((num_rows, vocab), jnp.int32).at[
        ids_where((pos >= prompt_end) & (pos < output_end))].add(1, mode="drop")
    seen = jnp.zeros((num_rows, vocab), jnp.bool_).at[
        ids_where(pos < output_end)].set(True, mode="drop")
    banned = jnp.zeros((num_rows, vocab), jnp.bool_).at[
        ids_where((pos >= output_end) & (pos < ban_end))].set(True, mode="drop")

    presence, frequency, repetition = (arrays["penalties"][:, j:j + 1] for j in range(3))
    penalised = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = jnp.where(seen, penalised, logits)
    logits = logits - frequency * counts.astype(jnp.float32) - presence * (counts > 0)
    return jnp.where(banned, -jnp.inf, logits)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """u32 keys of f32 values in the same order (-0.0 counted as +0.0): the sign bit flipped for
    non-negative values, all bits flipped for negative ones."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _key_values(keys: jax.Array) -> jax.Array:
    """The f32 values of `_ordered_keys`."""
    bits = jnp.where(keys >> 31 == 1, keys ^ jnp.uint32(1 << 31), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# key bits one pass of `_largest_key_reaching` decides (divides 32); on the H200, 2 bits (16
# passes of 3 candidates) ran 1.05 ms at 64 x 262k and 4 bits 1.09 ms, compiling twice as long
_SEARCH_BITS = 2


@jax.jit
def _search_pass(keys: jax.Array, weights: jax.Array, target: jax.Array, found: jax.Array,
                 shift: jax.Array) -> jax.Array:
    """`found` [R] with the key bits at `shift` decided: the largest digit whose candidate's
    tail still reaches the target. Jitted so that all passes share one trace."""
    candidates = [(found | (jnp.uint32(j) << shift))[:, None]
                  for j in range(1, 1 << _SEARCH_BITS)]
    zero = jnp.zeros((), weights.dtype)
    tails = jax.lax.reduce(tuple(jnp.where(keys >= c, weights, zero) for c in candidates),
                           (zero,) * len(candidates),
                           lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,))
    # tails fall as the digit grows: the count of candidates still reaching it is the digit
    digit = sum((t >= target).astype(jnp.uint32) for t in tails)
    return found | (digit << shift)


def _largest_key_reaching(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """u32[R]: per row, the largest key s with sum(weights[keys >= s]) >= target, for keys and
    weights >= 0 of shape [R, V]. It is the key of a token whenever 0 < target <= the row's sum.

    A search from the top bit down, _SEARCH_BITS bits per pass, each pass one variadic
    reduction over all its candidates (a chunked two-stage version was slower), in place of
    sorting the vocabulary: 1.05 vs 2.2 ms for 64 x 262k on the H200 (benchmarks/NOTES.md)."""
    found = jnp.zeros(keys.shape[:1], jnp.uint32)
    for shift in range(32 - _SEARCH_BITS, -1, -_SEARCH_BITS):
        found = _search_pass(keys, weights, target, found, jnp.uint32(shift))
    return found


def _keep_threshold(scaled: jax.Array, peak: jax.Array, arrays: dict[str, jax.Array],
                    plan: SamplerPlan) -> jax.Array:
    """[R, 1] lowest temperature-scaled logit that min_p, top_k and top_p keep (`peak`: the
    rows' largest scaled logit, [R, 1])."""
    vocab = scaled.shape[1]
    threshold = peak + jnp.log(arrays["min_p"])[:, None]
    if not plan.filtering:
        return threshold
    keys = _ordered_keys(scaled)
    top_k = arrays["top_k"]
    # the k-th largest logit: the largest key that at least k tokens reach
    k = jnp.where(top_k <= 0, vocab, jnp.minimum(top_k, vocab))
    kth = _key_values(_largest_key_reaching(keys, jnp.ones_like(keys, jnp.int32), k))
    threshold = jnp.maximum(threshold, kth[:, None])
    # top_p keeps t iff the tokens above t hold less than top_p of the mass min_p and top_k
    # left, i.e. t reaches the largest key whose tail still holds top_p of it
    weights = jnp.where(scaled >= threshold, jnp.exp(scaled - peak), 0.0)
    top_p = arrays["top_p"]
    nucleus = _key_values(_largest_key_reaching(keys, weights, top_p * weights.sum(axis=1)))
    return jnp.maximum(threshold, jnp.where(top_p >= 1.0, -jnp.inf, nucleus)[:, None])


def _temperature_divisor(arrays: dict[str, jax.Array]) -> jax.Array:
    """[R, 1]: the rows' temperatures, 1 for greedy rows."""
    temperature = arrays["temperature"]
    return jnp.where(temperature < GREEDY_EPS, 1.0, temperature)[:, None]


def _scaled_logits(logits: jax.Array, arrays: dict[str, jax.Array], plan: SamplerPlan,
                   penalised: jax.Array | None) -> tuple[jax.Array, bool]:
    """f32[R, V] the rows draw from (penalised when penalties apply) divided by the temperature
    (by 1 for greedy rows), and whether penalties applied."""
    x = logits.astype(jnp.float32)
    if penalised is None and plan.penalty_len:
        penalised = penalise(x, arrays)
    drawn = x if penalised is None else penalised.astype(jnp.float32)
    return drawn / _temperature_divisor(arrays), penalised is not None


def filtered_logits(logits: jax.Array, arrays: dict[str, jax.Array],
                    plan: SamplerPlan) -> jax.Array:
    """f32[R, V] that each row draws from: the penalised logits divided by the temperature, -inf
    where min_p, top_k or top_p drop the token."""
    scaled, _ = _scaled_logits(logits, arrays, plan, None)
    return _filter(scaled, scaled.max(axis=1), arrays, plan)


def _filter(scaled: jax.Array, peak: jax.Array, arrays: dict[str, jax.Array],
            plan: SamplerPlan) -> jax.Array:
    """The scaled logits with -inf where the filters drop the token (`peak`: the rows' max [R])."""
    return jnp.where(scaled >= _keep_threshold(scaled, peak[:, None], arrays, plan), scaled,
                     -jnp.inf)


def _max_and_first_index(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max [R], index of the first max [R]) of f32[R, V] in one variadic reduction; NaN counts
    as the largest, as in jnp.argmax."""
    def pick(a, b):
        (av, ai), (bv, bi) = a, b
        a_nan, b_nan = jnp.isnan(av), jnp.isnan(bv)
        same = (av == bv) | (a_nan & b_nan)
        take_b = (b_nan & ~a_nan) | ((bv > av) & ~a_nan) | (same & (bi < ai))
        return jnp.where(take_b, bv, av), jnp.where(take_b, bi, ai)

    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jax.lax.reduce((x, index), (jnp.array(-jnp.inf, x.dtype), jnp.int32(0)), pick, (1,))


def _vocab_chunks(x: jax.Array) -> jax.Array:
    """f32[R, V] as [R, C, L] with L = min(V, VOCAB_CHUNK), padded with -inf past V."""
    rows, vocab = x.shape
    chunk = min(vocab, VOCAB_CHUNK)
    pad = -vocab % chunk
    x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf) if pad else x
    return x.reshape(rows, -1, chunk)


def _last_positive(w: jax.Array) -> jax.Array:
    """[R]: index of the last positive entry of each row of [R, N] (entries are >= 0)."""
    return w.shape[1] - 1 - jnp.argmax(w[:, ::-1] > 0, axis=1).astype(jnp.int32)


def inverse_cdf_draw(filtered: jax.Array, peak: jax.Array, u: jax.Array) -> jax.Array:
    """i32[R]: a draw from softmax(filtered) [R, V] per row by inverse transform sampling with the
    rows' uniforms u [R] in [0, 1); `peak` [R] is the rows' maximum.

    Two levels, so the vocabulary is read once: the mass of each chunk of VOCAB_CHUNK tokens
    (one reduction), the chunk where the cumulative mass passes u * total, then the token inside
    that chunk. Rounding can never pick a token of zero mass: both levels are clamped to the last
    chunk / token with mass."""
    chunks = _vocab_chunks(filtered)
    peak = peak[:, None]
    mass = jnp.exp(chunks - peak[:, :, None]).sum(axis=2)               # [R, C]
    cumulative = jnp.cumsum(mass, axis=1)
    target = u * cumulative[:, -1]
    c = jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=1), _last_positive(mass))
    before = jnp.take_along_axis(cumulative - mass, c[:, None], axis=1)[:, 0]
    weights = jnp.exp(jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0] - peak)
    j = jnp.sum(jnp.cumsum(weights, axis=1) <= (target - before)[:, None], axis=1)
    return c * chunks.shape[2] + jnp.minimum(j, _last_positive(weights))


def top_k_rows(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k(x, k) of f32[R, V] (ties: lower index first), as a top-k per vocabulary
    chunk and then one over the chunks' candidates: XLA's top-k of whole 262k-token rows took
    2.1 ms for 64 rows on the H200 (benchmarks/NOTES.md, session 6)."""
    chunks = _vocab_chunks(x)
    rows, num_chunks, chunk = chunks.shape
    if num_chunks == 1 or chunk < k:
        return jax.lax.top_k(x, k)
    values, index = jax.lax.top_k(chunks, k)  # [R, C, k], each chunk's in index order on ties
    index = index + (jnp.arange(num_chunks, dtype=index.dtype) * chunk)[None, :, None]
    values, pick = jax.lax.top_k(values.reshape(rows, num_chunks * k), k)
    return values, jnp.take_along_axis(index.reshape(rows, num_chunks * k), pick, axis=1)


def sample_with_keys(logits: jax.Array, arrays: dict[str, jax.Array], plan: SamplerPlan,
                     keys: jax.Array, penalised: jax.Array | None = None) -> SamplerOutput:
    """`sample` with the rows' typed PRNG keys [R] given directly ("seed"/"step_index" unused)."""
    num_rows = logits.shape[0]
    if num_rows != plan.num_rows:
        raise ValueError(f"logits have {num_rows} rows but plan.num_rows={plan.num_rows}")
    logits = logits.astype(jnp.float32)
    scaled, penalties_applied = _scaled_logits(logits, arrays, plan, penalised)
    peak, greedy_ids = _max_and_first_index(scaled)  # the filters always keep the maximum
    filtered = _filter(scaled, peak, arrays, plan)
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    token_ids = jnp.where(arrays["temperature"] < GREEDY_EPS, greedy_ids,
                          inverse_cdf_draw(filtered, peak, u))

    # log-normaliser of the raw logits; without penalties their max is the scaled one's times T
    raw_peak = (logits.max(axis=1) if penalties_applied
                else peak * _temperature_divisor(arrays)[:, 0])
    log_norm = raw_peak + jnp.log(
        jnp.exp(_vocab_chunks(logits) - raw_peak[:, None, None]).sum(axis=2).sum(axis=1))
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=1)[:, 0] - log_norm
    if plan.num_logprobs:
        top_logits, top_ids = top_k_rows(logits, plan.num_logprobs)
        top_logprobs = top_logits - log_norm[:, None]
    else:
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
        top_logprobs = jnp.zeros((num_rows, 0), jnp.float32)
    return SamplerOutput(token_ids, chosen, top_ids.astype(jnp.int32), top_logprobs)


def sample(logits: jax.Array, arrays: dict[str, jax.Array], plan: SamplerPlan,
           penalised: jax.Array | None = None) -> SamplerOutput:
    """Token ids (and raw logprobs) for logits f32[plan.num_rows, V] under the rows' settings.

    `penalised`: `penalise(logits, arrays)` when the caller computed it (the runner does, in an
    executable of its own, so that one sampling executable serves every token-list length); the
    rows then draw from it and the token lists are not read here."""
    return sample_with_keys(logits, arrays, plan, row_keys(arrays["seed"], arrays["step_index"]),
                            penalised)
