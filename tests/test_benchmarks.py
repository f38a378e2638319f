"""Every benchmark runs end to end at tiny sizes on the CPU and reports consistent numbers."""

import json

import pytest

from jaxpage.benchmarks import (coldstart, common, device_profile, floor, gemm, hlo_layers,
                                latency, long_context, roofline, sampler, sharing, throughput)
from jaxpage.models.config import get_config


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("jaxpage.benchmarks.common.RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    return tmp_path


def result(results_dir, name):
    (path,) = results_dir.glob(f"*-{name}.json")
    return json.loads(path.read_text())


def test_throughput_compares_jaxpage_with_the_contiguous_baseline_and_the_floor(results_dir):
    throughput.main(["--model", "gemma2-tiny", "--workloads", "16x6", "--num-requests", "6",
                     "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--dtype", "float32",
                     "--bandwidth-mib", "4", "--matmul-size", "64", "--profile-device"])
    out = result(results_dir, "throughput-gemma2-tiny")
    rows = out["rows"]
    assert {r["system"] for r in rows} == {"jaxpage", "contiguous"}
    assert all(r["output_tokens_per_s"] > 0 and r["of_floor"] > 0 for r in rows)
    assert out["hbm_bandwidth_TBps"] > 0 and out["matmul_TFLOPps"] > 0
    assert out["floors"]["16x6"]["floor_s"] > 0
    (mine,) = [r for r in rows if r["system"] == "jaxpage"]
    # 6 requests, at most 4 running at once: all the time is spent with 1-3 or 4-15 running
    assert sum(mine["seconds_running"].values()) == pytest.approx(mine["seconds"], rel=0.5)
    assert mine["seconds_running"]["16-63"] == 0
    assert "no device events" in out["device_profile"]["note"]  # the CPU has no device streams
    assert (results_dir / next(results_dir.glob("*.json")).name).with_suffix(".png").exists()


def test_seconds_running_adds_up_time_by_how_many_requests_ran():
    spans = [(0.0, 4.0), (1.0, 2.0), (1.0, 3.0), (6.0, 7.0)]  # nothing runs from 4 to 6
    assert throughput.seconds_running(spans, bins=(1, 2, 3)) == {"1-1": 3.0, "2-2": 1.0, "3+": 1.0}


def test_floor_counts_the_work_of_a_workload_once():
    config = get_config("gemma3-tiny")  # window layers and global layers
    w = config.sliding_window
    num_in, num_out = w + 5, 4
    cost = floor.request_cost(config, num_in, num_out)
    pairs = sum(q + 1 if t == "global" else min(q + 1, w)
                for t in config.layer_types for q in range(num_in))
    per_token = 2 * floor.matmul_params(config)
    logits = 2 * config.vocab_size * config.d_model
    assert cost.prefill_flops == (per_token * num_in + logits
                                  + 4 * config.num_heads * config.head_dim * pairs)
    assert cost.decode_flops == (per_token + logits) * (num_out - 1)
    # each decode step reads the keys and values its query sees, its own among them
    assert cost.kv_read_bytes == sum(common.decode_kv_read_bytes(config, c)
                                     for c in range(num_in + 1, num_in + num_out))
    lengths = [(num_in, num_out), (8, 3 * w)]
    out = floor.workload_floor(config, lengths, flops_per_s=1e12, bytes_per_s=1e11,
                               weight_bytes=10**8)
    assert out["serial_s"] == pytest.approx(floor.request_cost(config, 8, 3 * w).prefill_flops
                                            / 1e12 + (3 * w - 1) * 10**8 / 1e11)
    assert out["floor_s"] == max(out["work_s"], out["serial_s"])


def test_roofline_reports_mbu_and_host_overhead(results_dir):
    roofline.main(["--model", "gemma3-tiny", "--batches", "1,4", "--contexts", "24",
                   "--engine-batch", "4", "--engine-context", "24", "--bandwidth-mib", "16",
                   "--dtype", "float32", "--profile-device"])
    out = result(results_dir, "roofline-gemma3-tiny")
    assert len(out["rows"]) == 2 and all(0 < r["MBU"] for r in out["rows"])
    overhead = out["host_overhead"]
    assert overhead["engine_step_ms"] > 0 and overhead["num_decode_steps"] == 4
    assert overhead["device_burst_step_ms"] > 0  # per token step of the engine's 4-step bursts
    assert "no device events" in out["device_profile"]["note"]  # the CPU has no device streams
    assert all(v > 0 for v in out["device_profile"]["host_launch"].values())


_TWO_LAYER_HLO = """
%fused_norm (p0: bf16[4,8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %m = bf16[4,8]{1,0} multiply(%p0, %p0)
  ROOT %r = bf16[4,8]{1,0} rsqrt(%m)
}

%command_buffer (a: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %attn.1 = bf16[4,8]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"jaxpage_decode_bk32_s2"}
  %norm.1 = bf16[4,8]{1,0} fusion(%attn.1), kind=kLoop, calls=%fused_norm
  %attn.2 = bf16[4,8]{1,0} custom-call(%norm.1), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"jaxpage_decode_bk32_s2"}
  ROOT %norm.2 = bf16[4,8]{1,0} fusion(%attn.2), kind=kLoop, calls=%fused_norm
}

ENTRY %main (x: bf16[4,8], /*index=1*/y: bf16[4,8]) -> bf16[4,8] {
  %x = bf16[4,8]{1,0} parameter(0)
  ROOT %c = bf16[4,8]{1,0} call(%x), to_apply=%command_buffer
}
"""


def test_hlo_layers_lists_one_layer_of_launches_through_command_buffers():
    layer = hlo_layers.layer_ops(_TWO_LAYER_HLO, "jaxpage_decode")
    assert [line.split()[0] for line in layer] == ["attn.1", "norm.1"]
    assert "jaxpage_decode_bk32_s2" in layer[0]
    assert "kLoop [multiply, rsqrt]" in layer[1]


def test_device_profile_separates_busy_time_from_idle_gaps():
    # two steps: a 10 us gemm, 2 us idle, a 5 us fusion overlapping a 3 us Pallas kernel
    step = [(0, 10_000, "sm90_xmma_gemm"), (12_000, 5_000, "loop_add_fusion"),
            (13_000, 3_000, "jaxpage_decode_bk32_s3")]
    events = step + [(s + 20_000, d, n) for s, d, n in step]
    summary = device_profile.summarize(events, reps=2)
    assert summary["span_us_per_step"] == 18.5  # 0 .. 37 us over two steps
    assert summary["busy_us_per_step"] == 15.0
    assert summary["idle_us_per_step"] == 3.5
    assert summary["events_per_step"] == 3
    assert summary["by_kind"]["matmul"] == {"count": 1, "us": 10.0}
    assert summary["by_kind"]["jaxpage Pallas kernels"]["us"] == 3.0
    assert summary["top_kernels"][0]["name"] == "sm90_xmma_gemm"


def test_device_profile_splits_kernel_time_by_the_executable_it_ran_in():
    modules = [(0, 10_000, "jit_forward_t64(3)"), (20_000, 5_000, "jit_sample(4)"),
               (30_000, 10_000, "jit_forward_t64(5)")]
    kernels = [(1_000, 4_000, "sm90_xmma_gemm"), (6_000, 2_000, "jaxpage_decode_bk32_s2"),
               (21_000, 1_000, "loop_select_fusion"), (31_000, 3_000, "sm90_xmma_gemm"),
               (45_000, 1_000, "memcpy")]
    rows = device_profile.by_module(modules, kernels)
    assert [r["module"] for r in rows] == ["jit_forward_t64", "jit_sample", "(no module)"]
    assert rows[0]["runs"] == 2 and rows[0]["span_ms"] == 0.02
    assert rows[0]["kernel_ms"] == {"matmul": 0.007, "jaxpage Pallas kernels": 0.002}
    assert rows[2]["kernel_ms"] == {"memcpy/memset": 0.001}


def test_latency_reports_ttft_and_step_time(results_dir):
    latency.main(["--model", "gemma2-tiny", "--batches", "1,3", "--inputs", "8", "--output", "4",
                  "--max-num-batched-tokens", "16", "--dtype", "float32"])
    rows = result(results_dir, "latency-gemma2-tiny")["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(0 < r["ttft_ms"] < r["e2e_s"] * 1e3 for r in rows)


def test_long_context_capacity_matches_what_actually_runs(results_dir):
    long_context.main(["--model", "gemma3-tiny", "--context", "400", "--output", "100",
                       "--max-num-batched-tokens", "64", "--max-num-seqs", "16",
                       "--num-pages", "200", "--admit", "--dtype", "float32"])
    out = result(results_dir, "long-context-gemma3-tiny")
    assert out["fit_with_recycling"] > out["fit_without_recycling"]
    assert out["running_at_once"] == out["fit_with_recycling"]


def test_cold_start_is_faster_with_a_warm_compilation_cache(results_dir, tmp_path):
    coldstart.main(["--model", "gemma3-tiny", "--workdir", str(tmp_path / "work"),
                    "--max-num-seqs", "4", "--max-num-batched-tokens", "16"])
    cold, warm = result(results_dir, "coldstart-gemma3-tiny")["rows"]
    assert warm["compile_s"] < cold["compile_s"]
    # the cold run wrote every executable it compiled; the warm one loads them all
    assert cold["loaded"] == 0 and warm["compiled"] == 0 and warm["loaded"] == cold["compiled"]
    assert 0 < cold["first_token_s"] <= cold["wall_s"]
    assert cold["compile_by_kind"]["forward"]["count"] >= 1


def test_sampler_times_every_plan_against_one_read_pass(results_dir):
    sampler.main(["--rows", "4", "--vocab", "4100", "--reps", "2"])
    rows = result(results_dir, "sampler")["rows"]
    assert [r["case"] for r in rows] == ["one read pass (floor)", *sampler.CASES]
    plans = {r["case"]: r["plan"] for r in rows}
    assert plans["greedy"] == plans["temperature"] == "basic"
    assert plans["top_p=0.9"] == "filtering" and plans["logprobs=5"] == "logprobs=20"
    assert plans["penalties"].startswith("penalty_len=")
    assert all(r["device_us"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        sampler.main(["--cases", "nucleus"])


def test_sharing_reports_prefix_hits_and_memory_saved_by_forks(results_dir):
    sharing.main(["--model", "gemma2-tiny", "--dtype", "float32", "--num-requests", "8",
                  "--shot-tokens", "20", "--question-tokens", "6", "--output-tokens", "4",
                  "--sample-requests", "2", "--sample-prompt", "40", "--sample-output", "12",
                  "--widths", "2,4", "--max-num-seqs", "8", "--max-num-batched-tokens", "64"])
    out = result(results_dir, "sharing-gemma2-tiny")
    cached = {(r["shots"], r["prefix_caching"]): r["cached_prompt_tokens"] for r in out["prefix"]}
    assert cached[(1, True)] > 0 and cached[(5, True)] > cached[(1, True)]
    assert cached[(1, False)] == cached[(5, False)] == 0
    saved = {(r["mode"], r["width"]): r["memory_saved"] for r in out["memory"]}
    assert all(0 < v < 1 for v in saved.values())
    assert saved[("parallel sampling", 4)] > saved[("parallel sampling", 2)]


def test_contiguous_baseline_halves_its_batch_until_it_fits(monkeypatch):
    from jaxpage.benchmarks import contiguous  # noqa: PLC0415
    from jaxpage.models.config import get_config  # noqa: PLC0415
    import jax  # noqa: PLC0415

    tried = []

    def fake_run(model, lengths, prompts, batch, backend):
        tried.append(batch)
        if batch > 3:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
        return {"system": "contiguous", "batch": batch}

    monkeypatch.setattr(contiguous, "_run_static_batches", fake_run)
    model = type("M", (), {"config": get_config("gemma2-tiny")})()
    row = contiguous.run_contiguous(model, [(8, 4)] * 16, [[5] * 8] * 16,
                                    kv_budget_bytes=1 << 40, backend="xla", max_batch=16)
    assert tried == [16, 8, 4, 2] and row["batch"] == 2 and row["out_of_memory_at"] == [16, 8, 4]


def test_gemm_times_xla_and_the_pallas_kernel_on_every_projection(results_dir):
    gemm.main(["--models", "gemma2-tiny", "--m", "5", "--configs", "32x32x1,32x16x2x4",
               "--reps", "2", "--rotate-mib", "0", "--bandwidth-mib", "4"])
    rows = result(results_dir, "gemm")["rows"]
    assert [r["proj"] for r in rows] == [*gemm.PROJECTIONS, "layer"]
    assert [(r["K"], r["N"]) for r in rows[:5]] == [(64, 256), (128, 64), (64, 192), (96, 64),
                                                    (64, 96)]
    for r in rows[:5]:
        assert r["xla_us"] > 0 and r["pallas_us"] > 0 and r["floor_us"] > 0
        assert r["max_abs_diff_vs_f32"] < 0.05 and r["max_abs_diff_vs_xla"] < 0.05
    # a layer: the fused geglu stands in for gate_up
    assert rows[-1]["xla_us"] == sum(r["xla_us"] for r in rows[:5] if r["proj"] != "gate_up")
    # the pruned sweep on the real shapes tiles every weight exactly
    k, widths, _, _, _ = gemm.projection(gemm.get_config("gemma3-4b"), "qkv")
    tiles = gemm.candidates(k, 4096, widths, 64, full=False)
    assert tiles and all(all(w % bn == 0 for w in widths) and k % (bk * s) == 0
                         for bn, bk, s in tiles)
