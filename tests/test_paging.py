"""The page allocator and scheduler on the host alone: invariants under random workloads."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxpage.kv_cache import NULL_PAGE
from jaxpage.paging import KVCacheManager, PagePool
from jaxpage.request import Request, Sequence
from jaxpage.sampling_params import SamplingParams
from jaxpage.scheduler import Scheduler

PAGE = 4
WINDOW = 10


def make_manager(global_pages=40, local_pages=20, max_context=200):
    return KVCacheManager(page_size=PAGE, num_pages={"global": global_pages, "local": local_pages},
                          windows={"global": None, "local": WINDOW}, max_context=max_context)


def make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    request = Request(f"r{seq_id}", None, list(range(3, 3 + prompt_len)),
                      SamplingParams(max_tokens=max_tokens), eos_token_ids=(1,))
    seq = Sequence(seq_id, request, 0, list(request.prompt_token_ids), seed=0)
    request.sequences.append(seq)
    return seq


def check_invariants(kv: KVCacheManager, live_ids) -> None:
    """Reference counts equal table references; free + held = all; tables cover the same pages."""
    for group, pool in kv.pools.items():
        refs = {}
        for seq_id in live_ids:
            for page in kv.block_table(seq_id, group):
                if page != NULL_PAGE:
                    refs[page] = refs.get(page, 0) + 1
        for page in range(1, pool.num_pages):
            assert pool.ref_counts[page] == refs.get(page, 0), (group, page)
        assert pool.num_free + len(refs) == pool.num_pages - 1
        assert pool.ref_counts[NULL_PAGE] == 0
    for seq_id in live_ids:
        assert len(kv.block_table(seq_id, "local")) == len(kv.block_table(seq_id, "global"))


def test_page_pool_hands_out_each_page_once_and_never_the_null_page():
    pool = PagePool(6)
    pages = pool.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5] and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.incref(pages[0])
    pool.decref(pages[0])
    assert pool.num_free == 0
    pool.decref(pages[0])
    assert pool.num_free == 1 and pool.allocate(1) == [pages[0]]


def test_allocation_is_all_or_nothing_across_groups():
    kv = make_manager(global_pages=10, local_pages=3)
    assert kv.allocate(1, 0, 8)   # 2 pages in each group
    assert not kv.allocate(2, 0, 8)  # global could give 2 pages, local has none left
    assert kv.block_table(2, "global") == [] and kv.pools["global"].num_free == 7


def test_local_pages_behind_the_window_are_released_as_decoding_moves_on():
    kv = make_manager()
    assert kv.allocate(1, 0, 12)  # prompt of 12 tokens: pages 0..2
    kv.commit(1, list(range(12)), 12)
    for pos in range(12, 60):  # decode one token at a time
        assert kv.allocate(1, pos, 1)
        kv.commit(1, list(range(pos + 1)), pos + 1)
        held = kv.num_held_pages(1, "local")
        assert held <= math.ceil(WINDOW / PAGE) + 1
        table = kv.block_table(1, "local")
        first_visible = max(0, pos - WINDOW + 1)
        # every page the query at `pos` can see is still held
        assert all(table[p] != NULL_PAGE for p in range(first_visible // PAGE, pos // PAGE + 1))
    assert kv.num_held_pages(1, "global") == 15


@pytest.mark.parametrize("num_decode_steps", [1, 3])
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                          st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=60),
       st.integers(1, 24))
def test_random_add_step_abort_keeps_invariants_and_frees_everything(num_decode_steps, ops, budget):
    kv = make_manager(global_pages=30, local_pages=14)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=budget,
                      num_decode_steps=num_decode_steps, max_model_len=200)
    live: dict[int, Sequence] = {}
    next_id = 0

    def step():
        out = sched.schedule()
        assert out.num_tokens <= budget and len(out.scheduled) <= 4
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            seq = item.seq
            assert item.start == seq.num_computed_tokens
            assert item.num_steps == 1 or (item.num_new_tokens == 1 and out.is_decode_only)
            assert len(kv.block_table(seq.seq_id, "global")) * PAGE >= item.end
            seq.num_computed_tokens = item.end
            kv.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if item.samples:
                seq.token_ids += [7] * item.num_steps
                assert seq.num_output_tokens <= seq.params.max_tokens
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.remove(seq)
                    live.pop(seq.seq_id)
        check_invariants(kv, live)

    for op, a, b in ops:
        if op == "add":
            # admission rule of the engine: a request must fit in the whole cache on its own
            if math.ceil((a + b) / PAGE) <= 29:
                live[next_id] = seq = make_seq(next_id, a, b)
                sched.add(seq)
                next_id += 1
        elif op == "step":
            step()
        elif live:
            victim = live.pop(sorted(live)[a % len(live)])
            sched.remove(victim)
            check_invariants(kv, live)
    for _ in range(2000):
        if not live:
            break
        step()
    assert not live, "every admitted request finishes"

    assert all(p.num_free == p.num_pages - 1 for p in kv.pools.values())
    assert sched.num_unfinished == 0


def test_running_out_of_pages_preempts_the_newest_sequence_and_recomputes_it_later():
    kv = make_manager(global_pages=9, local_pages=9)  # 8 usable pages = 32 tokens
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = make_seq(0, 14, 10), make_seq(1, 14, 10)
    sched.add(old)
    sched.add(new)
    out = sched.schedule()  # both prompts fit: 4 + 4 pages
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        item.seq.token_ids.append(7)
    preempted = []
    while not preempted:
        out = sched.schedule()
        preempted = out.preempted
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.token_ids.append(7)
    assert preempted == [new] and new.num_computed_tokens == 0 and sched.waiting[0] is new
    assert [item.seq for item in out.scheduled] == [old]
    assert kv.block_table(new.seq_id, "global") == []
    check_invariants(kv, [old.seq_id])
