"""The load tests' CPU pinning: a server started on given CPUs runs only there (and so do the workers it forks),
which is what lets `benchmarks/efficiency.py --server-cpus 0 --loadgen-cpus 1` compare the server with the bare
graph on the same core while the load generator works on another."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "loadtest"))
from streams import cpu_list  # noqa: E402

from msssm_serve.server.launcher import LocalServer  # noqa: E402


def test_cpu_list_reads_numbers_and_ranges():
    assert cpu_list("0") == {0}
    assert cpu_list("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError):
        cpu_list("one")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning apart needs two CPUs")
def test_a_server_started_on_one_cpu_runs_there_with_its_workers(model_dir, tmp_path):
    cpu = max(os.sched_getaffinity(0))
    with LocalServer(model_dir, tmp_path / "server.log", workers=2, cpus={cpu}) as server:
        root = psutil.Process(server.process.pid)
        processes = [root, *root.children(recursive=True)]
        assert len(processes) >= 3  # the supervisor and its two workers
        assert all(p.cpu_affinity() == [cpu] for p in processes)
    assert os.sched_getaffinity(0) != {cpu}  # the caller itself was not pinned


def test_the_batcher_path_benchmark_drives_real_streams_through_the_batcher(model_dir):
    """benchmarks/efficiency.py's no-socket figure: every stream's every hop goes through the server's batcher and
    comes back as a prediction (a round waits for each), so a rate comes out only if the batcher serves them all."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from efficiency import batcher_path

    rate = batcher_path(str(model_dir), workers=1, streams=16, seconds=0.5)
    assert rate > 1000  # samples/s: 16 streams x 25 samples per round, many rounds in half a second


@pytest.mark.parametrize("per_connection", [1, 4])
def test_the_stream_load_test_measures_every_hop_of_every_stream(server, per_connection):
    """loadtest/streams.py's clients, each stream on its own /stream connection or four to a /gateway connection:
    every stream opens, every hop completed in the measured span comes back and is timed, nothing fails."""
    import asyncio
    import random

    import httpx
    from streams import StreamRun, tiled_records

    class NoSampler:  # the server's CPU is not what this test looks at
        def window(self, t0, t1):
            return {}

    hop = int(httpx.get(server.url + "/model").json()["default_hop"])
    random.seed(0)
    run = StreamRun(server.ws_url, 12, hop, {"hop": hop}, 100, warmup=1.0, duration=3.0,
                    per_connection=per_connection, tick_s=0.02)
    result = asyncio.run(run.go(tiled_records(), NoSampler()))
    assert result["connected"] == 12 and result["failures"] == 0, result
    # 12 streams x 4 hops/s x 3 s, each timed once
    assert result["expected_hops"] >= 12 * 4 * 3 - 12 and result["count"] == result["expected_hops"], result
    assert result["achieved_frames_per_s"] == pytest.approx(12 * 4, rel=0.15)
