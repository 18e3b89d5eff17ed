"""Prometheus metrics, in a registry per app so that several apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("msssm_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("msssm_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge("msssm_active_streams", "Open WebSocket streams", registry=r)
        self.batch_size = Histogram("msssm_batch_size", "Streams advanced per batched inference call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram("msssm_inference_seconds", "Time in onnxruntime per call", ["kind"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.samples = Counter("msssm_samples_processed", "Samples run through the model", ["kind"], registry=r)
        self.stream_closes = Counter("msssm_stream_closes", "Streams closed by the server", ["code"], registry=r)
        self.gc_pause_seconds = Histogram("msssm_gc_pause_seconds", "Garbage-collector pauses (every thread of the "
                                          "worker waits)", ["generation"], buckets=LATENCY_BUCKETS, registry=r)
        self.streams_on_loop = Gauge("msssm_streams_on_loop", "1: streams' graph calls run on the event loop's "
                                     "thread (a one-thread graph), 0: on the inference thread", registry=r)
        self.streams_shed = Counter("msssm_streams_shed", "Streams closed (1013) to bring a model back under its "
                                    "latency bound, the newest first", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
