"""Shared KV pages: prefix caching, parallel samples (copy-on-write) and beam search."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_utils import make_engine, run_all, tiny_model
from jaxpage.attention import AttentionMetadata
from jaxpage.engine import OutputKind
from jaxpage.kv_cache import init_kv_cache
from jaxpage.sampling_params import SamplingParams

PAGE = 4


def shared_prefix_workload(seed: int, n: int = 16):
    """Requests built from a few system prompts / few-shot prefixes plus distinct questions."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(3, 500, size=k).tolist() for k in (13, 26, 41)]
    return [(prefixes[i % 3] + rng.integers(3, 500, size=int(rng.integers(1, 12))).tolist(),
             int(rng.integers(2, 10))) for i in range(n)]


def run_in_waves(engine, requests, wave: int = 4):
    """Submit requests a few at a time, so later ones find earlier ones' pages cached."""
    results, cached = {}, {}
    for start in range(0, len(requests), wave):
        for i in range(start, min(start + wave, len(requests))):
            prompt, max_tokens = requests[i]
            engine.add_request(f"r{i}", prompt_token_ids=prompt, output_kind=OutputKind.FINAL_ONLY,
                               params=SamplingParams(temperature=0.0, max_tokens=max_tokens))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].token_ids
                    cached[out.request_id] = out.num_cached_tokens
    return results, cached


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
@pytest.mark.parametrize("num_pages", [96, 40])
def test_outputs_are_identical_with_prefix_caching_on_and_off(family, num_pages):
    requests = shared_prefix_workload(seed=1)
    on = make_engine(family, num_pages=num_pages, enable_prefix_caching=True)
    off = make_engine(family, num_pages=num_pages, enable_prefix_caching=False)
    results_on, cached = run_in_waves(on, requests)
    results_off, _ = run_in_waves(off, requests)
    assert results_on == results_off
    assert sum(cached.values()) > 0, "the shared prefixes were never reused"
    assert on.stats().prefix_cache_hits == sum(cached.values())


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_num_cached_tokens_is_the_shared_full_page_length(family):
    engine = make_engine(family)
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 500, size=23).tolist()
    first, second = shared + [7, 8, 9], shared + [11, 12]
    run_all(engine, [(first, 3)])
    engine.add_request("b", prompt_token_ids=second, params=SamplingParams(max_tokens=2))
    engine.add_request("c", prompt_token_ids=[9] + shared, params=SamplingParams(max_tokens=2))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["b"].num_cached_tokens == (23 // PAGE) * PAGE  # only whole shared pages
    assert outs["c"].num_cached_tokens == 0  # a different first token shares nothing


def test_a_fully_cached_prompt_still_computes_its_last_token():
    engine = make_engine("gemma3")
    prompt = list(range(3, 3 + 4 * PAGE))  # exactly four pages
    first = run_all(engine, [(prompt, 5)])["r0"]
    engine.add_request("again", prompt_token_ids=prompt,
                       params=SamplingParams(temperature=0.0, max_tokens=5))
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    assert out.num_cached_tokens == 3 * PAGE and out.outputs[0].token_ids == first


def test_window_layers_reuse_only_pages_still_inside_the_window():
    """Gemma 3 local layers (window 8, pages of 4) release pages early; a reuse must not rely on
    local pages that were released and then evicted, and still give the same tokens."""
    engine = make_engine("gemma3", num_pages=40)
    rng = np.random.default_rng(9)
    shared = rng.integers(3, 500, size=30).tolist()
    reference = run_all(make_engine("gemma3", enable_prefix_caching=False),
                        [(shared + [5], 6)])["r0"]
    run_all(engine, [(shared + [6], 6)])
    local_pool = engine.kv.pools["local"]
    filler = [(rng.integers(3, 500, size=20).tolist(), 4) for _ in range(3)]
    run_all(engine, filler)  # recycles the idle local pages (the local pool is the small one)
    assert local_pool.num_cached_idle < local_pool.num_pages - 1
    engine.add_request("x", prompt_token_ids=shared + [5],
                       params=SamplingParams(temperature=0.0, max_tokens=6))
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    assert out.outputs[0].token_ids == reference
    assert out.num_cached_tokens % PAGE == 0 and out.num_cached_tokens <= 28


def test_parallel_samples_share_prompt_pages_and_copy_the_partial_page_on_write():
    engine = make_engine("gemma3", max_num_seqs=8)
    prompt = list(range(3, 3 + 4 * PAGE + 2))  # 4 full pages + a partial page of 2 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    engine.add_request("p", prompt_token_ids=prompt, params=params,
                       output_kind=OutputKind.FINAL_ONLY)
    engine.step()  # prefill + first token of each sample
    seqs = engine.requests["p"].sequences
    assert len(seqs) == 4
    for _ in range(3):
        engine.step()
    full_prompt_pages = len(prompt) // PAGE
    per_sample = sum(math.ceil(s.num_computed_tokens / PAGE) - full_prompt_pages for s in seqs)
    assert engine.stats().kv["global"].pages_used == full_prompt_pages + per_sample
    tables = [engine.kv.block_table(s.seq_id, "global") for s in seqs]
    assert all(t[:full_prompt_pages] == tables[0][:full_prompt_pages] for t in tables)
    assert len({t[full_prompt_pages] for t in tables}) == 4, "each sample owns its partial page"
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) == 4, "n=4 gives four different samples"
    again = run_all(make_engine("gemma3", max_num_seqs=8, enable_prefix_caching=False),
                    [(prompt, 12)], lambda _: params)
    assert again["r0"] == samples[0], "seeded samples are reproducible"


def test_parallel_samples_are_reproducible_whatever_else_runs():
    params = SamplingParams(n=3, temperature=0.9, seed=2, max_tokens=8)
    prompt = [4, 9, 16, 25, 36]

    def samples(engine, others):
        for i, other in enumerate(others):
            engine.add_request(f"o{i}", prompt_token_ids=other, params=SamplingParams(max_tokens=5))
        engine.add_request("p", prompt_token_ids=prompt, params=params,
                           output_kind=OutputKind.FINAL_ONLY)
        result = None
        while engine.has_unfinished_requests():
            result = next((o for o in engine.step() if o.request_id == "p" and o.finished), result)
        return [c.token_ids for c in result.outputs]

    alone = samples(make_engine("gemma2"), [])
    assert samples(make_engine("gemma2", num_pages=30), [[7] * 20, [8] * 33, [5, 6]]) == alone


# -- beam search against a plain reference ------------------------------------------------------

def full_logprobs(model, tokens: list[int]) -> np.ndarray:
    """Log-probs of the next token after `tokens`, recomputing the whole prefix (no sharing)."""
    n = len(tokens)
    pages = -(-n // PAGE) + 1
    cache = init_kv_cache(model.config, {g: pages + 1 for g in model.config.layer_groups}, PAGE,
                          jnp.float32)
    table = np.arange(1, pages + 1, dtype=np.int32)[None]
    meta = AttentionMetadata.for_sequences([n], [n], {g: table for g in model.config.layer_groups})
    hidden, _ = model(jnp.asarray(tokens), jnp.arange(n), cache, meta)
    return np.asarray(jax.nn.log_softmax(model.logits(hidden[-1:]))[0], np.float64)


def reference_beam_search(model, prompt, *, width, max_tokens, eos, length_penalty, n):
    beams, finished = [([], 0.0)], []
    for step in range(1, max_tokens + 1):
        ranked = []
        for b, (toks, score) in enumerate(beams):
            lp = full_logprobs(model, prompt + toks)
            top = np.argsort(-lp, kind="stable")[:2 * width]
            ranked += [(score + lp[t], b, j, int(t)) for j, t in enumerate(top)]
        ranked.sort(key=lambda c: (-c[0], c[1], c[2]))
        new = []
        for rank, (total, b, _, tok) in enumerate(ranked):
            if tok in eos:
                if rank < width:
                    finished.append((beams[b][0] + [tok], total))
                continue
            new.append((beams[b][0] + [tok], total))
            if len(new) == width:
                break
        if step == max_tokens:
            finished += new
            break
        if not new:
            break
        if len(finished) >= width:
            norm = sorted((s / len(t) ** length_penalty for t, s in finished), reverse=True)
            if max(s for _, s in new) / step ** length_penalty <= norm[width - 1]:
                break
        beams = new
    finished.sort(key=lambda h: -h[1] / len(h[0]) ** length_penalty)
    return [t for t, _ in finished[:n]]


@pytest.mark.parametrize("family,width,length_penalty", [("gemma2", 3, 1.0), ("gemma3", 4, 0.5)])
def test_beam_search_matches_a_plain_reference_token_for_token(family, width, length_penalty):
    model = tiny_model(family)
    prompt = [17, 42, 5, 99, 3, 250, 7]
    eos = set(model.config.eos_ids)
    expected = reference_beam_search(model, prompt, width=width, max_tokens=7, eos=eos,
                                     length_penalty=length_penalty, n=2)
    engine = make_engine(family)
    engine.add_request("beam", prompt_token_ids=prompt, output_kind=OutputKind.FINAL_ONLY,
                       params=SamplingParams(use_beam_search=True, best_of=width, n=2,
                                             max_tokens=7, length_penalty=length_penalty))
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    assert [c.token_ids for c in out.outputs] == expected
    assert all(u.pages_used == 0 for u in engine.stats().kv.values())


def test_beams_share_pages_through_reference_counts():
    engine = make_engine("gemma3")
    prompt = list(range(3, 3 + 3 * PAGE))
    engine.add_request("beam", prompt_token_ids=prompt,
                       params=SamplingParams(use_beam_search=True, best_of=4, max_tokens=10,
                                             ignore_eos=True))
    for _ in range(4):
        engine.step()
    beams = [s for s in engine.requests["beam"].sequences if not s.finished]
    assert len(beams) == 4
    tables = [engine.kv.block_table(s.seq_id, "global") for s in beams]
    assert all(t[:3] == tables[0][:3] for t in tables), "the prompt pages are shared by all beams"
    distinct = {p for t in tables for p in t}
    assert engine.stats().kv["global"].pages_used == len(distinct) < sum(map(len, tables))
