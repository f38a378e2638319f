"""The Hugging Face transformers baseline (benchmarks/hf_baseline.py) on the CPU, tiny models."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from jaxpage.benchmarks import common
from jaxpage.benchmarks import hf_baseline as hb
from jaxpage.checkpoint import param_shapes
from jaxpage.models.config import get_config

TINY = ["gemma2-tiny", "gemma3-tiny"]
MIXED = [(12, 5), (7, 3), (20, 6), (7, 6), (3, 1)]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny shapes: one thread, so a busy shared CPU does not stall torch's thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", TINY)
def test_hf_model_has_as_many_parameters_as_ours(name):
    config = get_config(name)
    model = hb.hf_model(config, torch.float32, "cpu")
    ours = sum(math.prod(shape) for shape in param_shapes(config).values())
    assert sum(p.numel() for p in model.parameters()) == ours


@pytest.mark.parametrize("name, attention", [("gemma2-tiny", "eager"), ("gemma3-tiny", "sdpa")])
def test_hf_model_is_built_in_the_dtype_and_on_the_device_asked_for(name, attention):
    model = hb.hf_model(get_config(name), torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.parameters())
    # transformers' own choice: SDPA has no attention soft-cap, which Gemma 2 needs
    assert hb.attention_implementation(model) == attention


def test_gemma2_with_different_local_and_global_rope_is_refused():
    config = dataclasses.replace(get_config("gemma2-tiny"), rope_global_base=20_000.0)
    with pytest.raises(ValueError, match="one RoPE"):
        hb.hf_config(config)


def test_batches_hold_every_request_once_longest_cache_first_same_shape():
    lengths = MIXED * 3  # 15 requests
    batches = hb.plan_batches(lengths, 4)
    real = [k for b in batches for k in b.indices[:b.num_real]]
    assert sorted(real) == list(range(len(lengths)))
    assert [b.num_real for b in batches].count(4) == 3 and len(batches) == 4
    for b in batches:
        assert len(b.indices) == 4
        assert set(b.indices[b.num_real:]) <= {b.indices[b.num_real - 1]}  # fillers repeat
        assert b.new_tokens == max(lengths[k][1] for k in b.indices)
        assert b.width >= max(lengths[k][0] for k in b.indices)
        # mixed lengths: every batch is padded, so one decode graph (with a mask) serves all
        assert min(lengths[k][0] for k in b.indices) < b.width
    assert batches[0].cache_length == max(b.cache_length for b in batches)


def test_batches_group_requests_of_similar_output_length():
    lengths = [(8, o) for o in (1, 9, 2, 8, 3, 7, 4, 6)]
    batches = hb.plan_batches(lengths, 2)
    outputs = sorted(tuple(sorted(lengths[k][1] for k in b.indices)) for b in batches)
    assert outputs == [(1, 2), (3, 4), (6, 7), (8, 9)]


def test_fixed_length_batches_are_not_padded():
    batches = hb.plan_batches([(16, 4)] * 5, 2)
    assert [(b.width, b.new_tokens, b.num_real) for b in batches] == [(16, 4, 2)] * 2 + [
        (16, 4, 1)]


@pytest.mark.parametrize("max_batch, n, sizes", [(256, 1000, [256, 128, 64, 32, 16, 8, 4, 2, 1]),
                                                 (256, 100, [128, 64, 32, 16, 8, 4, 2, 1]),
                                                 (100, 1000, [64, 32, 16, 8, 4, 2, 1]),
                                                 (8, 1, [1])])
def test_batch_sizes_are_powers_of_two_down_from_one_batch_for_all(max_batch, n, sizes):
    assert hb.batch_sizes(max_batch, n) == sizes


@pytest.mark.parametrize("bad", [dict(max_batch=0, num_requests=3),
                                 dict(max_batch=4, num_requests=0)])
def test_batch_sizes_refuse_nonpositive_arguments(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        hb.batch_sizes(**bad)


@pytest.mark.parametrize("name", TINY)
def test_offline_run_reports_consistent_throughput(name):
    row = hb.run_hf_throughput(get_config(name), MIXED, num_requests=7, max_batch=4,
                               compile=False, device="cpu", dtype=torch.float32)
    lengths = [MIXED[k % len(MIXED)] for k in range(7)]
    out_tokens, in_tokens = sum(o for _, o in lengths), sum(i for i, _ in lengths)
    assert row["batch"] == 4 and row["num_batches"] == 2 and row["out_of_memory_at"] == []
    assert (row["output_tokens"], row["input_tokens"]) == (out_tokens, in_tokens)
    assert row["seconds"] > 0
    assert row["requests_per_s"] == pytest.approx(7 / row["seconds"])
    assert row["output_tokens_per_s"] == pytest.approx(out_tokens / row["seconds"])
    assert row["total_tokens_per_s"] == pytest.approx((in_tokens + out_tokens) / row["seconds"])
    # outputs 6 6 5 5 | 3 3 1 (+ a filler): each row runs its batch's longest output
    assert row["generated_tokens"] == 4 * 6 + 4 * 3
    assert row["compiled"] is False and row["compiled_graphs_timed"] == 0
    assert row["warmup_s"] > 0 and row["compile_s"] >= 0 and row["model"] == name


def test_running_out_of_memory_halves_the_batch(monkeypatch):
    real_generate, sizes_tried = hb._generate, []

    def generate(model, batch, *args):
        sizes_tried.append(len(batch.indices))
        if len(batch.indices) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(model, batch, *args)

    monkeypatch.setattr(hb, "_generate", generate)
    row = hb.run_hf_throughput(get_config("gemma2-tiny"), MIXED, num_requests=7, max_batch=8,
                               compile=False, device="cpu", dtype=torch.float32)
    assert row["out_of_memory_at"] == [8, 4] and row["batch"] == 2 and row["num_batches"] == 4
    assert sizes_tried[:2] == [8, 4] and set(sizes_tried[2:]) == {2}


def test_out_of_memory_wrapped_by_the_compiler_is_recognised():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert hb._is_oom(outer)
    assert not hb._is_oom(RuntimeError("shape mismatch"))


def test_other_errors_are_not_retried(monkeypatch):
    def generate(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(hb, "_generate", generate)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        hb.run_hf_throughput(get_config("gemma2-tiny"), MIXED, num_requests=3, max_batch=4,
                             compile=False, device="cpu", dtype=torch.float32)


def test_a_failing_compiler_leaves_an_uncompiled_run_that_says_so(monkeypatch, capsys):
    real_generate = hb._generate

    def generate(model, batch, prompts, pad_id, compile):
        if compile:
            raise RuntimeError("BackendCompilerFailed: no C compiler")
        return real_generate(model, batch, prompts, pad_id, compile)

    monkeypatch.setattr(hb, "_generate", generate)
    row = hb.run_hf_throughput(get_config("gemma3-tiny"), MIXED, num_requests=3, max_batch=4,
                               compile=True, device="cpu", dtype=torch.float32)
    assert row["compiled"] is False and "no C compiler" in row["compile_error"]
    assert row["batch"] == 4 and row["output_tokens"] == 5 + 3 + 6
    assert "running uncompiled" in capsys.readouterr().err


def test_a_batch_that_stops_early_is_an_error_not_a_faster_run():
    class StopsEarly:
        device = torch.device("cpu")

        def generate(self, input_ids, max_new_tokens, **kwargs):
            return torch.cat([input_ids, input_ids[:, :max_new_tokens - 1]], dim=1)

    batch = hb.plan_batches([(6, 4)], 1)[0]
    prompts = hb.random_prompts([(6, 4)], 512)
    with pytest.raises(RuntimeError, match="EOS was not ignored"):
        hb._generate(StopsEarly(), batch, prompts, 0, False)


@pytest.mark.parametrize("workload", [[], [(0, 4)], [(4, -1)]])
def test_bad_workloads_are_refused(workload):
    with pytest.raises(ValueError, match="workload"):
        hb.run_hf_throughput(get_config("gemma2-tiny"), workload, num_requests=2, max_batch=2,
                             compile=False, device="cpu")


def test_requests_longer_than_the_model_context_are_refused():
    with pytest.raises(ValueError, match="max_context"):
        hb.run_hf_throughput(get_config("gemma2-tiny"), [(500, 13)], num_requests=1,
                             max_batch=1, compile=False, device="cpu")


def test_command_line_prints_the_table_and_the_json_row_last(capsys):
    assert hb.main(["--model", "gemma3-tiny", "--workload", "9x3", "--num-requests", "3",
                    "--max-batch", "2", "--no-compile", "--device", "cpu", "--dtype", "float32",
                    "--json", "-"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[-1])
    assert row["workload"] == "9x3" and row["model"] == "gemma3-tiny"
    assert row["batch"] == 2 and row["output_tokens"] == 9 and row["input_tokens"] == 27
    assert lines[0].split()[:2] == ["workload", "batch"]


def test_command_line_writes_dated_json_and_plot_to_results(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    assert hb.main(["--model", "gemma2-tiny", "--workload", "5x2,sharegpt", "--num-requests", "2",
                    "--max-batch", "2", "--no-compile", "--device", "cpu",
                    "--dtype", "float32"]) == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".png"]
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["workload"] for r in payload["rows"]] == ["5x2", "sharegpt"]
    assert payload["rows"][1]["output_tokens"] == sum(
        o for _, o in common.workload("sharegpt", 2, seed=1))
