"""Prometheus metrics of the server, under vLLM's names with a `jaxpage:` prefix.

Gauges and counters of the engine (requests running/waiting, KV cache use, token totals, prefix
cache) are read from the latest EngineStats snapshot at scrape time; latency histograms and the
finished-request counter are fed by the engine thread as outputs arrive.
"""

from __future__ import annotations

import math
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxpage.outputs import RequestOutput

PREFIX = "jaxpage:"
FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    """Every metric the server exports, in its own registry (so several servers can coexist)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._stats = None
        self._stats_lock = threading.Lock()
        self.registry.register(_EngineStatsCollector(self))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc.
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between two consecutive token steps of a request.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds",
                             "Time from arrival to the end of a request that was not aborted.",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.success = Counter(PREFIX + "request_success",
                               "Finished sequences (one per choice), by finish reason.",
                               ["finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self.success.labels(finished_reason=reason)

    def set_stats(self, stats) -> None:
        """Store the engine's latest EngineStats; scrapes report it."""
        with self._stats_lock:
            self._stats = stats

    @property
    def stats(self):
        with self._stats_lock:
            return self._stats

    def observe(self, out: RequestOutput, previous_token_time: float | None) -> float | None:
        """Record the latencies one DELTA output shows; returns the time of the request's latest
        token, to pass back with its next output."""
        m = out.metrics
        if m is None:
            return previous_token_time
        if any(c.token_ids for c in out.outputs) and m.last_token_time is not None:
            if previous_token_time is None:
                if m.first_token_time is not None:
                    self.ttft.observe(m.first_token_time - m.arrival_time)
            elif m.last_token_time > previous_token_time:
                self.itl.observe(m.last_token_time - previous_token_time)
            previous_token_time = m.last_token_time
        if out.finished:
            reasons = [c.finish_reason or "abort" for c in out.outputs]
            for reason in reasons:
                self.success.labels(finished_reason=reason).inc()
            if "abort" not in reasons:
                end = m.finished_time if m.finished_time is not None else time.monotonic()
                self.e2e.observe(end - m.arrival_time)
        return previous_token_time

    def render(self) -> tuple[bytes, str]:
        """(Prometheus text exposition, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector(Collector):
    """Reads the latest EngineStats snapshot at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self):
        stats = self._metrics.stats
        if stats is None:
            return
        yield GaugeMetricFamily(PREFIX + "num_requests_running",
                                "Sequences in the running batch.", value=stats.num_running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                "Sequences waiting to be scheduled.", value=stats.num_waiting)
        usage = max((u.usage for u in stats.kv.values()), default=0.0)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                                "KV cache use of the fullest layer group (1 = full).",
                                value=usage if math.isfinite(usage) else 0.0)
        pages = {name: GaugeMetricFamily(PREFIX + f"kv_cache_pages_{name}",
                                         f"KV cache pages {name}, per layer group.",
                                         labels=["group"])
                 for name in ("total", "used", "free")}
        for group, u in sorted(stats.kv.items()):
            pages["total"].add_metric([group], u.pages_total)
            pages["used"].add_metric([group], u.pages_used)
            pages["free"].add_metric([group], u.pages_free)
        yield from pages.values()
        counters = (
            ("num_preemptions", "Sequences preempted for lack of KV pages.", "num_preemptions"),
            ("prompt_tokens", "Prompt tokens processed.", "prompt_tokens_total"),
            ("generation_tokens", "Tokens generated.", "generation_tokens_total"),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
        )
        for name, doc, field in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(stats, field, 0))
