"""Normal clients beside hostile ones: what 200 slow or malicious clients cost everyone else.

One server (``fastinfer serve``, default limits) serves a TVM-compiled identity model (16 floats)
and a small image model. In each round, 32 normal clients (``fastinfer bench``, closed loop) run
alone, then again while hostile clients run:

- HTTP headers sent one byte a second; HTTP bodies stopped after 10 of 64 bytes, then trickled;
- binary payloads trickled a byte a second; binary requests of 256 samples stopped 10 bytes short
  (each once held every shared-memory slot);
- odd images, one a second each: 1x16000 and 16-bit PNGs, truncated JPEGs, empty bodies.

Each hostile client reconnects as soon as the server closes it, so the pressure stays on. Midway,
every port is asked whether it still answers (HTTP /ping, management /metrics, a binary PING).
Normal throughput and p99 are reported against the clean run of the same round.

    python scripts/bench_hostile.py --duration-s 10 --rounds 3 --hostile 200
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from bench_protocols import identity_model
from bench_serving import bench_command, wait_for_line
from onnx import TensorProto, helper
from PIL import Image

from fastinfer.protocol import FrameType, encode_frame, pack_tensors

SERVING_LINE = r"http://[^:]+:(\d+), management http://[^:]+:(\d+), binary tcp://[^:]+:(\d+)"
KINDS = ("http_slow_headers", "http_slow_body", "binary_trickle", "binary_stalled", "odd_images")


def image_model(folder: Path) -> Path:
    """A cheap image model (mean of each channel in each quadrant), with ImageNet preprocessing."""
    from fastinfer.archive.pack import BuildOptions, build_archive

    graph = helper.make_graph(
        [
            helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[112, 112], strides=[112, 112]),
            helper.make_node("Flatten", ["pooled"], ["y"]),
        ],
        "quadrants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "q.onnx"))
    labels = folder / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(12)))
    options = BuildOptions(
        name="quadrants", labels_path=str(labels), top_k=3, preprocess="imagenet", cache_dir=str(folder)
    )
    build_archive(folder / "q.onnx", folder / "q.fia", options)
    return folder / "q.fia"


def odd_images() -> list[bytes]:
    def encode(image: Image.Image, kind: str) -> bytes:
        out = io.BytesIO()
        image.save(out, kind)
        return out.getvalue()

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8))
    return [
        encode(Image.new("RGB", (1, 16000)), "PNG"),
        encode(Image.fromarray(np.full((300, 300), 40000, np.uint16)), "PNG"),
        encode(photo, "JPEG")[:2000],
        b"",
        b"\x89PNG\r\n\x1a\n" + bytes(100),
    ]


class Hostile:
    """The hostile clients of one phase, and what the server did to them."""

    def __init__(self, host: str, http_port: int, binary_port: int, count: int, kinds: tuple[str, ...] = KINDS):
        self.host, self.http_port, self.binary_port, self.count = host, http_port, binary_port, count
        self.kinds = kinds
        self.closed_by_server = dict.fromkeys(KINDS, 0)
        self.answers: dict[str, int] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        kinds = [self.kinds[i % len(self.kinds)] for i in range(self.count)]
        await asyncio.gather(*(self._forever(kind) for kind in kinds))

    async def _forever(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.binary_port if kind.startswith("binary") else self.http_port
                )
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                await getattr(self, kind)(reader, writer)
                self.closed_by_server[kind] += 1
            except (OSError, asyncio.IncompleteReadError):
                self.closed_by_server[kind] += 1
            finally:
                writer.close()

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
        """A byte a second until the server closes the connection (or the phase ends)."""
        for byte in data:
            if self.stop.is_set() or reader.at_eof():
                return
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if not await asyncio.wait_for(reader.read(1 << 16), 1.0):
                    return
            except TimeoutError:
                pass
        await self._wait_closed(reader)

    async def _wait_closed(self, reader: asyncio.StreamReader) -> None:
        while not self.stop.is_set():
            try:
                if not await asyncio.wait_for(reader.read(1 << 16), 0.5):
                    return
            except TimeoutError:
                pass

    async def http_slow_headers(self, reader, writer) -> None:
        await self._trickle(reader, writer, b"POST /predictions/identity HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 500)

    async def http_slow_body(self, reader, writer) -> None:
        writer.write(b"POST /predictions/identity HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n" + bytes(10))
        await self._trickle(reader, writer, bytes(54))

    async def binary_trickle(self, reader, writer) -> None:
        descriptors, parts = pack_tensors({"input": np.zeros((1, 16), np.float32)})
        frame = encode_frame(FrameType.REQUEST, 1, {"model": "identity", "inputs": descriptors}, parts)
        head = bytes(frame[0])
        writer.write(head)
        await self._trickle(reader, writer, bytes(64))

    async def binary_stalled(self, reader, writer) -> None:
        descriptors, parts = pack_tensors({"input": np.zeros((256, 16), np.float32)})
        frame = encode_frame(FrameType.REQUEST, 1, {"model": "identity", "inputs": descriptors}, parts)
        writer.write(bytes(frame[0]) + bytes(256 * 64 - 10))
        await self._wait_closed(reader)

    async def odd_images(self, reader, writer) -> None:
        for body in odd_images() * 1000:
            if self.stop.is_set():
                return
            writer.write(
                b"POST /predictions/quadrants HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            status_line = await asyncio.wait_for(reader.readline(), 30)
            if not status_line:
                return
            status = status_line.split()[1].decode()
            self.answers[status] = self.answers.get(status, 0) + 1
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(1.0)  # an attacker's probe, not a flood: load is not what this measures


async def ports_answer(host: str, http_port: int, management_port: int, binary_port: int) -> dict[str, float | None]:
    """Milliseconds each port took to answer (None: no answer within 5 s)."""

    async def http_get(port: int, path: str) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert b" 200 " in await reader.readline()
        writer.close()

    async def binary_ping() -> None:
        reader, writer = await asyncio.open_connection(host, binary_port)
        writer.write(bytes(encode_frame(FrameType.PING, 1)[0]))
        await reader.readexactly(25)
        writer.close()

    checks = {
        "http /ping": http_get(http_port, "/ping"),
        "management /metrics": http_get(management_port, "/metrics"),
        "binary PING": binary_ping(),
    }
    answered: dict[str, float | None] = {}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            await asyncio.wait_for(check, 5)
            answered[name] = (time.perf_counter() - started) * 1000
        except (TimeoutError, OSError, AssertionError, asyncio.IncompleteReadError):
            answered[name] = None
    return answered


async def normal_clients(url: str, seconds: float) -> dict:
    process = await asyncio.create_subprocess_exec(
        *bench_command(url, "identity", 32, seconds, "1,16", input_name="input"), stdout=subprocess.PIPE
    )
    out, _ = await process.communicate()
    return json.loads(out.decode().strip().splitlines()[-1])


async def phase(args, ports: dict[str, int], url: str, hostile_count: int) -> dict:
    hostile = Hostile("127.0.0.1", ports["http"], ports["binary"], hostile_count, tuple(args.kinds))
    task = asyncio.create_task(hostile.run())
    await asyncio.sleep(2.0 if hostile_count else 0)  # the hostile clients settle in first
    normal = asyncio.create_task(normal_clients(url, args.duration_s))
    await asyncio.sleep(args.duration_s / 2 + 1)
    answered = await ports_answer("127.0.0.1", ports["http"], ports["management"], ports["binary"])
    result = await normal
    hostile.stop.set()
    await task
    return {**result, "ports": answered, "closed_by_server": hostile.closed_by_server, "answers": hostile.answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hostile", type=int, default=200)
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="hostile kinds to run (odd_images adds image decoding to the worker: real work, not only a slow client)",
    )
    parser.add_argument("--protocols", nargs="+", choices=("binary", "http"), default=["binary", "http"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        identity_model(folder / "identity.onnx")
        images = image_model(folder)
        log = folder / "server.log"
        server = subprocess.Popen(
            [
                sys.executable, "-m", "fastinfer", "serve", "--models",
                f"identity={folder / 'identity.onnx'}", f"quadrants={images}",
                "--http-port", "0", "--management-port", "0", "--binary-port", "0", "--grpc-port", "0",
                "--cache-dir", str(folder),
            ],
            stderr=log.open("w"),
        )  # fmt: skip
        try:
            found = wait_for_line(log, SERVING_LINE, 300)
            wait_for_line(log, "ready: all workers are warm", 300)
            ports = {"http": int(found[1]), "management": int(found[2]), "binary": int(found[3])}
            urls = {"binary": f"tcp://127.0.0.1:{ports['binary']}", "http": f"http://127.0.0.1:{ports['http']}"}
            urls = {protocol: url for protocol, url in urls.items() if protocol in args.protocols}
            rows = []
            for number in range(1, args.rounds + 1):
                for protocol, url in urls.items():
                    clean = asyncio.run(phase(args, ports, url, 0))
                    attacked = asyncio.run(phase(args, ports, url, args.hostile))
                    row = {"round": number, "protocol": protocol, "clean": clean, "hostile": attacked}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            report(rows, args)
        finally:
            server.terminate()
            server.wait(30)


def report(rows: list[dict], args) -> None:
    print(f"\n32 normal clients, {args.duration_s:g} s, alone and beside {args.hostile} hostile ones", end="")
    print(f" ({', '.join(args.kinds)})", end="")
    print(f"; medians of {args.rounds} rounds")
    print("| protocol | clean req/s | hostile req/s | ratio | clean p99 (ms) | hostile p99 (ms) | p99 ratio ", end="")
    print("| ports answered |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for protocol in dict.fromkeys(row["protocol"] for row in rows):
        mine = [row for row in rows if row["protocol"] == protocol]
        clean = statistics.median(r["clean"]["throughput_rps"] for r in mine)
        hostile = statistics.median(r["hostile"]["throughput_rps"] for r in mine)
        ratio = statistics.median(r["hostile"]["throughput_rps"] / r["clean"]["throughput_rps"] for r in mine)
        clean_p99 = statistics.median(r["clean"]["p99_ms"] for r in mine)
        hostile_p99 = statistics.median(r["hostile"]["p99_ms"] for r in mine)
        p99_ratio = statistics.median(r["hostile"]["p99_ms"] / r["clean"]["p99_ms"] for r in mine)
        answered = all(v is not None for r in mine for v in r["hostile"]["ports"].values())
        slowest = max(v for r in mine for v in r["hostile"]["ports"].values() if v is not None)
        print(
            f"| {protocol} | {clean:.0f} | {hostile:.0f} | {ratio:.0%} | {clean_p99:.1f} | {hostile_p99:.1f} | "
            f"{p99_ratio:.2f}x | {'all' if answered else 'NOT ALL'} (slowest {slowest:.0f} ms) |"
        )


if __name__ == "__main__":
    main()
