"""What the front costs per request, against the least a Python front can cost, under the load of
the serving benchmark (SqueezeNet, 602 KB tensors, 32 binary-protocol clients, every core busy).

1. ``fastinfer serve --devices cpu:N`` loaded by ``fastinfer bench``: the front's and the client's
   CPU time per request, read from /proc.
2. The floor: a minimal uvloop server (in this file) that receives each REQUEST frame into one
   buffer and answers it with a prepared RESPONSE after a fixed delay — no batching, no worker, no
   checks — loaded the same way while the compiled model runs in one pinned single-threaded
   process per core, as the workers would; the rate those processes keep, against their rate
   alone, is the most that any front of this kind leaves to the model here.

    python scripts/front_cost.py --duration-s 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving

SHAPE, INPUT = "1,3,224,224", "data_0"


def serve_floor(port: int, delay_s: float) -> None:
    """The minimal front: frames in, a prepared reply out ``delay_s`` later (standing in for the queue)."""
    import numpy as np
    import uvloop

    from fastinfer.protocol import HEADER, FrameType, encode_frame, pack_tensors

    descriptors, parts = pack_tensors({"softmaxout_1": np.zeros((1, 1000, 1, 1), np.float32)})
    envelope = {"model": "squeezenet", "outputs": descriptors}
    reply = b"".join(bytes(part) for part in encode_frame(FrameType.RESPONSE, 0, envelope, parts))
    magic, version, frame_type, flags, _, envelope_length, payload_length = HEADER.unpack_from(reply)
    body = reply[HEADER.size :]

    class Floor(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = memoryview(bytearray(4 << 20))
            self.have, self.need, self.request_id = 0, HEADER.size, None

        def get_buffer(self, sizehint):
            return self.buffer[self.have : self.need]

        def buffer_updated(self, nbytes):
            self.have += nbytes
            if self.have < self.need:
                return
            if self.request_id is None:
                *_, self.request_id, envelope_bytes, payload_bytes = HEADER.unpack_from(self.buffer)
                self.need = HEADER.size + envelope_bytes + payload_bytes
                if self.have < self.need:
                    return
            loop.call_later(delay_s, self.answer, self.request_id)
            self.have, self.need, self.request_id = 0, HEADER.size, None

        def answer(self, request_id):
            header = HEADER.pack(magic, version, frame_type, flags, request_id, envelope_length, payload_length)
            self.transport.write(header + body)

    loop = uvloop.new_event_loop()
    loop.run_until_complete(loop.create_server(Floor, "127.0.0.1", port))
    print("ready", flush=True)
    loop.run_forever()


def cpu_per_request(processes: dict[str, psutil.Process], client: subprocess.Popen, begin: float, end: float) -> dict:
    """CPU microseconds per request of each process (and the client) between the time.time()s
    ``begin`` and ``end``, inside the client's run; then wait for the client's end."""
    processes = {**processes, "client": psutil.Process(client.pid)}
    time.sleep(max(0.0, begin - time.time()))
    before = {name: p.cpu_times() for name, p in processes.items()}
    time.sleep(max(0.0, end - time.time()))
    after = {name: p.cpu_times() for name, p in processes.items()}
    result = json.loads(client.communicate()[0])
    rate, wall = result["throughput_rps"], end - begin
    used = {n: (after[n].user + after[n].system - before[n].user - before[n].system) / wall for n in processes}
    return {"rate": rate, **{name: 1e6 * share / rate for name, share in used.items()}}


def bench_client(url: str, concurrency: int, seconds: float) -> subprocess.Popen:
    command = bench_serving.bench_command(url, "squeezenet", concurrency, seconds, SHAPE, INPUT)
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def measure_fastinfer(archive: Path, folder: Path, workers: int, concurrency: int, seconds: float) -> dict:
    server, urls = bench_serving.start_fastinfer(archive, folder, f"cpu:{workers}")
    try:
        client = bench_client(urls["fastinfer binary"], concurrency, seconds)
        now = time.time()
        return cpu_per_request({"front": psutil.Process(server.pid)}, client, now + 1.5, now + seconds - 1)
    finally:
        server.terminate()
        server.wait(30)


def measure_floor(
    archive: Path, folder: Path, cores: list[list[int]], concurrency: int, seconds: float, delay_s: float
) -> dict:
    port = 18591
    floor = subprocess.Popen(
        [sys.executable, __file__, "--serve-floor", str(port), str(delay_s)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
        client = bench_client(f"tcp://127.0.0.1:{port}", concurrency, seconds + 10)  # outlasts the model's window
        time.sleep(1)
        rates: dict[int, float] = {}
        window: queue.Queue[float] = queue.Queue()
        models = threading.Thread(
            target=lambda: rates.update(
                bench_serving.measure_in_children(archive, folder, cores, seconds, on_start=window.put)
            )
        )
        models.start()  # the model processes load, then measure for `seconds` while the client runs
        begin = window.get(timeout=60)
        measured = cpu_per_request({"front": psutil.Process(floor.pid)}, client, begin, begin + seconds)
        models.join()
        return {**measured, "model": max(rates.values())}
    finally:
        floor.kill()
        floor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=150.0, help="the floor's answer delay (32 clients / ~210/s)")
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "DELAY_S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(int(args.serve_floor[0]), float(args.serve_floor[1]))
        return
    cores = [[core] for core in sorted(os.sched_getaffinity(0))]  # one model process per core, as the workers
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        archive = bench_serving.squeezenet_archive(folder, "1")
        alone = max(bench_serving.measure_in_children(archive, folder, cores, args.duration_s).values())
        served = measure_fastinfer(archive, folder, len(cores), args.concurrency, args.duration_s)
        floor = measure_floor(archive, folder, cores, args.concurrency, args.duration_s, args.delay_ms / 1000)
    print(f"the model alone, one pinned process per core ({len(cores)}): {alone:.1f} samples/s")
    print("| front | requests/s | of the model alone | front CPU per request | client CPU per request |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row, rate in (
        ("fastinfer serve", served, served["rate"]),
        ("minimal front, the model in its own processes", floor, floor["model"]),
    ):
        print(f"| {name} | {row['rate']:.1f} | {rate / alone:.0%} | {row['front']:.0f} us | {row['client']:.0f} us |")


if __name__ == "__main__":
    main()
