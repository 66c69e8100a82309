"""Workers dying under load, overload and deadlines, against a live server with real processes."""

import asyncio
import os
import signal
import time

import aiohttp
import numpy as np
import pytest
from conftest import fastinfer_segments

from fastinfer.config import Config
from fastinfer.server.batcher import WorkerState
from fastinfer.server.main import Server
from fastinfer.server.workers import WorkerHandle


async def start(tmp_path, **options):
    config = Config(
        http_port=0,
        management_port=0,
        binary_port=0,
        grpc_port=0,
        cache_dir=str(tmp_path),
        shm_slot_bytes=1 << 20,
        worker_heartbeat_s=0.2,
        **options,
    )
    server = Server(config)
    await server.start()
    await server.wait_ready(60)
    return server


async def stop(server):
    await server.stop()
    assert not fastinfer_segments(), "shared memory left behind"


async def post(session, model, count, headers=None):
    async with session.post(
        f"/predictions/{model}", data=np.zeros(count, "<f4").tobytes(), headers=headers
    ) as response:
        return response.status, await response.json()


async def test_kill_9_under_load_every_request_is_answered(tmp_path):
    server = await start(tmp_path, models=("slow=echo:float32:4:0.05",), devices="cpu:2", shm_slots_per_worker=16)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            stop_at = time.monotonic() + 3.0
            statuses: list[tuple[int, str]] = []

            async def client():
                while time.monotonic() < stop_at:
                    status, body = await post(session, "slow", 4)
                    statuses.append((status, body.get("code", "ok") if isinstance(body, dict) else "ok"))

            clients = [asyncio.create_task(client()) for _ in range(16)]
            await asyncio.sleep(1.0)
            victim = server.supervisor.workers[0]
            old_pid = victim.pid
            os.kill(old_pid, signal.SIGKILL)
            async with asyncio.timeout(30):
                await asyncio.gather(*clients)
            async with asyncio.timeout(30):
                while not (server.supervisor.ready and victim.pid != old_pid):
                    await asyncio.sleep(0.05)
            status, _ = await post(session, "slow", 4)
            assert status == 200, "the restarted worker serves"
    finally:
        await stop(server)
    outcomes = set(statuses)
    assert outcomes <= {(200, "ok"), (502, "worker_died"), (503, "model_not_ready")}, outcomes
    assert (502, "worker_died") in outcomes, "the killed worker held requests, which failed at once"
    assert sum(status == 200 for status, _ in statuses) > 50


async def test_overload_is_refused_quickly_with_retry_after(tmp_path):
    server = await start(tmp_path, models=("slow=echo:float32:4:0.5",), queue_max_size=4, batch_max_size=1)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            started = time.monotonic()

            async def one():
                async with session.post("/predictions/slow", data=bytes(16)) as response:
                    return response.status, response.headers.get("Retry-After"), time.monotonic() - started

            results = await asyncio.gather(*(one() for _ in range(20)))
        refused = [r for r in results if r[0] == 503]
        assert len(refused) >= 10
        assert all(retry == "1" for _, retry, _ in refused)
        assert max(elapsed for _, _, elapsed in refused) < 1.0, "refusals come at once, not after a wait"
        assert sum(status == 200 for status, _, _ in results) >= 4
    finally:
        await stop(server)


async def test_deadline_header_gives_504_and_the_slot_back(tmp_path):
    server = await start(tmp_path, models=("slow=echo:float32:4:0.5",))
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            started = time.monotonic()
            status, body = await post(session, "slow", 4, headers={"X-Deadline-Ms": "100"})
            assert (status, body["code"]) == (504, "deadline_exceeded")
            assert time.monotonic() - started < 0.4
            status, body = await post(session, "slow", 4, headers={"X-Deadline-Ms": "soon"})
            assert status == 400 and "X-Deadline-Ms" in body["message"]
        pool = server.supervisor.pool
        async with asyncio.timeout(5):
            while pool.free_count != pool.slot_count:
                await asyncio.sleep(0.05)
    finally:
        await stop(server)


async def test_a_crash_loop_stops_restarting_and_health_says_so(tmp_path):
    server = await start(
        tmp_path, models=("echo=echo:float32:4",), restart_max_count=2, restart_window_s=60, worker_start_timeout_s=30
    )
    try:
        worker = server.supervisor.workers[0]
        kills = 0
        while worker.state is not WorkerState.FAILED and kills < 5:
            pid = worker.pid
            os.kill(pid, signal.SIGKILL)
            kills += 1
            async with asyncio.timeout(30):
                while worker.state is not WorkerState.FAILED and (
                    worker.pid == pid or worker.state is not WorkerState.READY
                ):
                    await asyncio.sleep(0.05)
        assert worker.state is WorkerState.FAILED
        assert kills == 3, "two restarts were allowed, the third death ends it"
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            async with session.get("/ping") as response:
                assert response.status == 503
                body = await response.json()
            assert body["status"] == "Unhealthy" and "not restarting" in body["failure"]
            status, error = await post(session, "echo", 4)
            assert status == 503 and error["code"] == "model_not_ready"
    finally:
        await stop(server)


async def test_a_hung_worker_is_killed_and_restarted(tmp_path):
    server = await start(tmp_path, models=("echo=echo:float32:4",))
    try:
        worker = server.supervisor.workers[0]
        pid = worker.pid
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no heartbeat
        async with asyncio.timeout(30):
            while not (worker.pid != pid and worker.state is WorkerState.READY):
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            assert (await post(session, "echo", 4))[0] == 200
    finally:
        await stop(server)


@pytest.fixture(autouse=True)
def no_stray_segments():
    yield
    assert not fastinfer_segments()


def test_a_failure_while_answering_a_batch_leaves_the_worker_channel_open(caplog):
    handle = WorkerHandle(0, [0], {}, slot_fd=-1)
    told = []

    def broken(reply, error):
        told.append((reply, error))
        raise RuntimeError("a bug in answering")

    handle._pending = {1: (broken, 0.0), 2: (broken, 0.0)}
    handle._on_message({"op": "done", "id": 1})  # the channel's data_received would see no exception
    handle._on_lost()
    assert [type(error).__name__ for _, error in told] == ["NoneType", "WorkerDied"]
    assert caplog.text.count("answering a batch failed") == 2


async def test_a_busy_front_loop_does_not_kill_healthy_workers(tmp_path):
    """Workers are judged by their heartbeats: a front loop that was blocked for ten beats read
    none meanwhile, which once got both healthy workers killed."""
    server = await start(tmp_path, models=("echo=echo:float32:4",), devices="cpu:2")
    try:
        pids = [w.pid for w in server.supervisor.workers]
        time.sleep(10 * server.config.worker_heartbeat_s)  # the loop does nothing else meanwhile
        await asyncio.sleep(4 * server.config.worker_heartbeat_s)  # the watch runs again, twice
        assert [w.pid for w in server.supervisor.workers] == pids
        assert all(w.state is WorkerState.READY for w in server.supervisor.workers)
    finally:
        await stop(server)


async def test_a_reload_applies_the_new_devices_and_batch_limits(tmp_path):
    """A reload once started the new workers with the devices and batch limits of the start."""
    import dataclasses

    from fastinfer.server.service import Service
    from fastinfer.server.systemd import Notifier

    server = await start(tmp_path, models=("echo=echo:float32:4",), devices="cpu:1", batch_max_size=8)
    try:
        reloaded = dataclasses.replace(server.config, devices="cuda:0", gpu_batch_max_size=16)
        service = Service(server, lambda: reloaded, Notifier(None))
        launched = []
        real_launch = server.supervisor._launch

        def launch(generation):
            launched.append((server.supervisor.config.device_list(), server.supervisor.config.batch_limits()))
            real_launch(generation)

        server.supervisor._launch = launch  # type: ignore[method-assign]
        await service.reload()  # no GPU here: the new worker may fail; the old ones go on either way
        assert launched == [(["cuda:0"], (16, reloaded.gpu_batch_max_delay_s))]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
            assert (await post(session, "echo", 4))[0] == 200
    finally:
        await stop(server)
