"""Every benchmark runs end to end at tiny sizes on the CPU and reports consistent numbers."""

import json

import pytest

from jaxpage.benchmarks import (coldstart, device_profile, gemm, hlo_layers, latency,
                                long_context, roofline, sampler, sharing, throughput)


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("jaxpage.benchmarks.common.RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    return tmp_path


def result(results_dir, name):
    (path,) = results_dir.glob(f"*-{name}.json")
    return json.loads(path.read_text())


def test_throughput_compares_jaxpage_with_the_contiguous_baseline(results_dir):
    throughput.main(["--model", "gemma2-tiny", "--workloads", "16x6", "--num-requests", "6",
                     "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--dtype", "float32"])
    rows = result(results_dir, "throughput-gemma2-tiny")["rows"]
    assert {r["system"] for r in rows} == {"jaxpage", "contiguous"}
    assert all(r["output_tokens_per_s"] > 0 for r in rows)
    assert (results_dir / next(results_dir.glob("*.json")).name).with_suffix(".png").exists()


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
