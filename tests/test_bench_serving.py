"""The serving load generator (benchmarks/serving.py), against `jaxpage serve` of the demo model."""

from __future__ import annotations

import json
import math
import tempfile

import numpy as np
import pytest
from server_utils import MAX_MODEL_LEN, SMALL_FLAGS

from jaxpage.benchmarks import common, serving

NUM, OUT, RATE = 12, 8, 20.0


@pytest.fixture(scope="module")
def url():
    """A server started (and stopped) by the benchmark's own launcher."""
    with serving.launched_server(list(SMALL_FLAGS)) as server_url:
        yield server_url
    assert not serving._healthy(int(server_url.rsplit(":", 1)[1]))


# -- without a server -------------------------------------------------------------------------


def test_arrivals_are_a_poisson_process_at_the_rate():
    times = serving.arrival_times(4000, 20.0, seed=3)
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV = 1
    assert (serving.arrival_times(5, math.inf) == 0).all()


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_a_rate_that_is_not_positive_is_refused(rate):
    with pytest.raises(ValueError, match="rate"):
        serving.arrival_times(3, rate)


@pytest.mark.parametrize("bad", ["http://10.0.0.7:8000", "https://127.0.0.1:8000",
                                 "http://127.0.0.1", "http://example.com:80"])
def test_only_servers_on_this_machine_are_accepted(bad):
    with pytest.raises(ValueError, match="127.0.0.1"):
        serving.check_loopback(bad)
    assert serving.check_loopback("http://localhost:8123") == ("localhost", 8123)


def test_command_line_refuses_a_remote_url(capsys):
    with pytest.raises(SystemExit):
        serving.main(["--url", "http://192.168.1.2:8000"])
    assert "127.0.0.1" in capsys.readouterr().err


def test_prompts_are_random_ids_of_the_asked_lengths_fresh_for_every_seed():
    a, b = serving.random_prompts([16, 3], 1000, seed=0), serving.random_prompts([16, 3], 1000, 1)
    assert [len(p) for p in a] == [16, 3]
    assert all(10 <= t < 1000 for p in a + b for t in p)
    assert a[0] != b[0] and a == serving.random_prompts([16, 3], 1000, seed=0)


def _percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default), written out."""
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def test_summary_is_vllms_metrics_over_completed_requests():
    R = serving.RequestResult
    results = [R(10, 4, ok=True, ttft=0.1, e2e=0.4, output_tokens=4, itl=[0.1, 0.1, 0.1]),
               R(20, 4, ok=True, ttft=0.3, e2e=0.9, output_tokens=4, itl=[0.2, 0.3, 0.1]),
               R(30, 4, ok=True, ttft=0.2, e2e=0.2, output_tokens=1),
               R(40, 4, ok=True, ttft=0.5, e2e=1.1, output_tokens=3, itl=[0.6]),
               R(50, 4, error="HTTP 503: overloaded")]
    s = serving.summarize(results, duration=2.0)
    assert (s["completed"], s["failed"], s["short"]) == (4, 1, 2)
    assert (s["input_tokens"], s["output_tokens"]) == (100, 12)
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 6.0
    assert s["total_token_throughput"] == 56.0
    ttft, e2e = [100, 300, 200, 500], [400, 900, 200, 1100]
    tpot = [300 / 3, 600 / 3, 600 / 2]  # (e2e - ttft) / (tokens - 1); one token: no TPOT
    itl = [100, 100, 100, 200, 300, 100, 600]
    for name, ms in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        assert s[f"mean_{name}_ms"] == pytest.approx(sum(ms) / len(ms))
        assert s[f"median_{name}_ms"] == pytest.approx(_percentile(ms, 50))
        assert s[f"p99_{name}_ms"] == pytest.approx(_percentile(ms, 99))
    assert s["errors"] == ["HTTP 503: overloaded"]


def test_summary_of_nothing_completed_has_no_latencies():
    s = serving.summarize([serving.RequestResult(5, 2, error="refused")], duration=1.0)
    assert s["completed"] == 0 and s["failed"] == 1 and math.isnan(s["mean_ttft_ms"])


# -- against the demo server ------------------------------------------------------------------


def _check_request(r, max_tokens):
    assert r["error"] == ""
    assert r["output_tokens"] == max_tokens
    assert 0 < r["ttft"] < r["e2e"]


def test_poisson_load_completes_every_request_with_consistent_numbers(url, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    assert serving.main(["--url", url, "--workload", f"16x{OUT}", "--num-prompts", str(NUM),
                         "--rates", f"{RATE},inf", "--seed", "5"]) == 0
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".png"]
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert payload["model"] == "jaxpage-demo" and payload["benchmark"].startswith("serving")
    rows = {row["rate"]: row for row in payload["rows"]}
    assert set(rows) == {RATE, "inf"}
    for rate, row in rows.items():
        assert (row["completed"], row["failed"], row["short"]) == (NUM, 0, 0)
        assert row["output_tokens"] == NUM * OUT and row["input_tokens"] == NUM * 16
        assert row["duration_s"] > 0
        assert row["request_throughput"] == pytest.approx(NUM / row["duration_s"])
        assert row["output_throughput"] == pytest.approx(NUM * OUT / row["duration_s"])
        assert 0 < row["median_ttft_ms"] <= row["p99_ttft_ms"] < row["p99_e2el_ms"]
        assert 0 < row["mean_tpot_ms"] and 0 < row["mean_itl_ms"]
    for detail in payload["requests"]:
        for r in detail["requests"]:
            _check_request(r, OUT)
    poisson = next(d for d in payload["requests"] if d["rate"] == RATE)["requests"]
    starts = np.array([r["start"] for r in poisson])
    lateness = starts - serving.arrival_times(NUM, RATE, seed=5)
    assert (lateness >= 0).all() and (lateness < 0.5).all()  # sent at the Poisson arrivals
    assert rows[RATE]["duration_s"] >= starts[-1]


def test_inter_token_gaps_add_up_to_the_time_after_the_first_token(url):
    host, port = serving.check_loopback(url)
    model, _ = serving.served_model(url)
    results, duration = serving.run_load(url, model, [[11, 12, 13], [14, 15]], [6, 5],
                                         rate=math.inf)
    for r in results:
        assert r.ok and r.output_tokens == r.max_tokens and r.finish_reason == "length"
        assert 1 <= len(r.itl) <= r.output_tokens - 1  # a chunk may carry several tokens
        assert r.ttft + sum(r.itl) <= r.e2e
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / (r.output_tokens - 1))
    assert duration >= max(r.start + r.e2e for r in results) - 1e-9


def test_a_request_the_server_refuses_is_counted_as_failed(url):
    model, max_model_len = serving.served_model(url)
    assert max_model_len == MAX_MODEL_LEN
    results, _ = serving.run_load(url, model, [[11, 12], [11, 12]], [4, MAX_MODEL_LEN + 1],
                                  rate=math.inf)
    assert results[0].ok and not results[1].ok
    assert results[1].error.startswith("HTTP 400")
    summary = serving.summarize(results, 1.0)
    assert (summary["completed"], summary["failed"]) == (1, 1)


def test_workloads_longer_than_the_server_takes_stop_before_sending(url):
    with pytest.raises(SystemExit, match="max_model_len"):
        serving.main(["--url", url, "--workload", f"{MAX_MODEL_LEN}x8", "--num-prompts", "1"])


def test_a_server_that_cannot_start_is_reported_and_its_log_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="exited with 2:\n(.|\n)*max-queued-requests"):
        with serving.launched_server(["--max-queued-requests", "-1"]):
            pass
    assert len(list(tmp_path.glob("jaxpage-serving-bench-*.log"))) == 1


# -- --model: a registry model with random weights ----------------------------------------------


def test_stand_in_tokenizer_decodes_every_id_of_the_model(tmp_path):
    from jaxpage.demo import build_demo_tokenizer  # noqa: PLC0415
    from jaxpage.tokenizer import Tokenizer  # noqa: PLC0415

    demo = Tokenizer(build_demo_tokenizer(tmp_path / "demo.model"))
    tok = Tokenizer(serving.stand_in_tokenizer(3000, tmp_path / "stand-in.model"))
    assert tok.vocab_size == 3000
    assert (tok.bos_id, tok.eos_id, tok.end_of_turn_id) == (demo.bos_id, demo.eos_id,
                                                            demo.end_of_turn_id)
    assert tok.decode([100, 900]) == demo.decode([100, 900])  # the demo's pieces are kept
    assert tok.id_to_piece(2999) == "\u2581w2999"
    assert tok.decode([1500, 2999]).split() == ["w1500", "w2999"]
    small = Tokenizer(serving.stand_in_tokenizer(512, tmp_path / "small.model"))
    assert small.vocab_size == demo.vocab_size  # ids of a smaller model are all in it already


@pytest.mark.parametrize("bad, message", [
    (["--url", "http://127.0.0.1:8000"], "--model or --url"),
    (["--server-args", "--checkpoint out/x"], "--checkpoint"),
    (["--vocab-size", "600"], "512"),
])
def test_model_mode_refuses_conflicting_flags(bad, message, capsys):
    with pytest.raises(SystemExit):
        serving.main(["--model", "gemma2-tiny", *bad])
    assert message in capsys.readouterr().err


def test_model_mode_serves_a_random_checkpoint_it_writes_and_reuses(tmp_path):
    flags = ("--dtype float32 --attention-backend xla --page-size 16 --max-num-seqs 4 "
             "--max-num-batched-tokens 32 --num-pages 64")
    argv = ["--model", "gemma2-tiny", "--workdir", str(tmp_path / "work"), "--server-args", flags,
            "--workload", "12x4", "--num-prompts", "3", "--rates", "inf", "--json"]
    assert serving.main([*argv, str(tmp_path / "first.json")]) == 0
    checkpoint = tmp_path / "work" / "gemma2-tiny"
    assert (checkpoint / "jaxpage_config.json").is_file()
    assert (checkpoint / "tokenizer.model").is_file()
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["gemma2-tiny"]  # no leftovers
    stamp = (checkpoint / "jaxpage_config.json").stat().st_mtime_ns
    assert serving.main([*argv, str(tmp_path / "second.json")]) == 0
    assert (checkpoint / "jaxpage_config.json").stat().st_mtime_ns == stamp  # reused
    payload = json.loads((tmp_path / "second.json").read_text())
    assert payload["model"] == "gemma2-tiny" and payload["random_weights"] is True
    (row,) = payload["rows"]
    assert (row["completed"], row["failed"], row["short"]) == (3, 0, 0)
    assert row["output_tokens"] == 3 * 4


def test_model_mode_without_workdir_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with serving.random_checkpoint("gemma2-tiny") as checkpoint:
        assert (checkpoint / "jaxpage_config.json").is_file() and checkpoint.name == "gemma2-tiny"
    assert not checkpoint.exists() and list(tmp_path.iterdir()) == []
