"""The worker process: owns its cores, loads the models, runs batches from shared memory.

Started by the front as ``python -m fastinfer.worker CHANNEL_FD SLOT_FD`` (a fresh interpreter,
never a fork of a process that loaded TVM), with one end of a socketpair as CHANNEL_FD and the
slot pool's anonymous memory as SLOT_FD. It pins itself to its cores and
sets TVM's thread count before TVM is imported, answers ``ready`` once every model is warm, beats
a heartbeat from a side thread, and exits when the front closes the channel or dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

from fastinfer.errors import FastInferError
from fastinfer.logs import configure_logging
from fastinfer.malloc import keep_freed_blocks
from fastinfer.shm import SlotMap
from fastinfer.signature import BatchLayout
from fastinfer.worker.channel import BlockingChannel, Done, Op, Run

if TYPE_CHECKING:
    from fastinfer.worker.model import LoadedModel

log = logging.getLogger("fastinfer.worker")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the closed channel still ends the worker
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _batch_limit(init: dict, model: str) -> int:
    return init.get("model_batch_limits", {}).get(model, init["batch_limit"])


def _own_cores(cores: list[int]) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(max(1, len(cores)))


def _without_torch() -> None:
    """Make PyTorch unimportable here: TVM's FFI imports it at its own import when it is installed
    (seconds of start-up and hundreds of MB per worker), and a worker never uses it — archives are
    compiled; a PyTorch program is converted by ``fastinfer archive``, not by the server."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # None: "import torch" fails


def _pin_slots(slots: SlotMap, nbytes: int) -> None:
    """Page-lock the slot segment for the GPU's copies (best effort; see fastinfer.worker.cuda)."""
    import numpy as np

    from fastinfer.worker.cuda import pin_host_memory

    if os.environ.get("FASTINFER_PIN_SLOTS", "1") == "0":
        return
    address = np.frombuffer(slots.view(0), np.uint8).ctypes.data  # the segment starts with slot 0
    reason = pin_host_memory(address, nbytes)
    if reason:
        log.info("slots not pinned, host-device copies are staged by the driver: %s", reason)
    else:
        log.info("slots pinned for the GPU's copies (%d MiB)", nbytes >> 20)


def _beat(channel: BlockingChannel, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            channel.send({"op": Op.BEAT})
        except OSError:
            return


def serve(channel: BlockingChannel, slot_fd: int) -> int:
    init = channel.recv()
    if init is None:
        return 0
    configure_logging(init["log_level"], prefix=f"worker[{init['index']}] ")
    _own_cores(init["cores"])
    _without_torch()

    slots = SlotMap(slot_fd, init["slot_count"], init["slot_bytes"])
    slots.open()
    try:
        started = time.monotonic()
        models = {name: _load(name, path, init) for name, path in init["models"].items()}
        layouts = {
            # the same rows as the front's batcher lays out: the model's own limit, else the server's
            name: BatchLayout.for_slot(model.signature, _batch_limit(init, name), init["slot_bytes"])
            for name, model in models.items()
        }
        for name, model in models.items():
            log.info("model %s: warming up (%.0f s)", name, time.monotonic() - started)
            model.warm_up(layouts[name].rows)
        log.info("models loaded and warm in %.0f s", time.monotonic() - started)
        if init.get("device", "cpu") != "cpu":
            _pin_slots(slots, init["slot_count"] * init["slot_bytes"])
    except (FastInferError, ValueError) as error:
        message = error.message if isinstance(error, FastInferError) else str(error)
        log.error("%s", message)
        channel.send({"op": Op.FAILED, "message": message})
        return 3
    channel.send({"op": Op.READY, "pid": os.getpid(), "models": {n: m.signature.to_dict() for n, m in models.items()}})

    stop = threading.Event()
    threading.Thread(target=_beat, args=(channel, init["heartbeat_s"], stop), daemon=True).start()
    try:
        while (request := channel.recv()) is not None and request["op"] != Op.STOP:
            channel.send(_run(request, models, layouts, slots))  # type: ignore[arg-type]  # a Run, by the protocol
    finally:
        stop.set()
    return 0


def _load(name: str, path: str, init: dict) -> LoadedModel:
    """Load one model; its errors name it, so the front can say which model cannot be served."""
    from fastinfer.worker.model import load_model  # after _own_cores(): TVM is imported inside

    log.info("model %s: loading %s", name, path or "the default model")
    try:
        return load_model(
            name,
            path,
            cache_dir=init["cache_dir"],
            num_cores=max(1, len(init["cores"])),
            max_image_pixels=init["max_image_pixels"],
            device=init.get("device", "cpu"),
        )
    except FastInferError as error:
        raise type(error)(f"model {name!r}: {error.message}", code=error.code, status=error.status) from error
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from error


def _run(message: Run, models: dict, layouts: dict, slots: SlotMap) -> Done:
    batch_id = message["id"]
    try:
        model = models[message["model"]]
        images = [None if image is None else slots.view(image[0])[: image[1]] for image in message["images"]]
        reply = model.run_batch(layouts[message["model"]], slots.view(message["slot"]), message["rows"], images)
        return {"op": Op.DONE, "id": batch_id, **reply}
    except Exception as error:  # a bug or a TVM failure fails the batch, not the worker
        log.exception("batch %s failed", batch_id)
        return {
            "op": Op.DONE,
            "id": batch_id,
            "error": {"code": "internal_error", "status": 500, "message": str(error)},
        }


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when workers stop
    _die_with_parent()
    keep_freed_blocks()  # decoded images are large blocks too
    sock = socket.socket(fileno=int(sys.argv[1]))
    reason = _not_from_parent(sock)
    if reason:
        log.error("%s; exiting", reason)
        sys.exit(2)
    sys.exit(serve(BlockingChannel(sock), int(sys.argv[2])))


def _not_from_parent(sock: socket.socket) -> str | None:
    """Why the channel does not lead to the front that spawned this worker (None when it does).

    The front made the socketpair, so its peer is the front's process, of our own user; anything
    else means the descriptors were not the ones the front passed."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if pid != os.getppid() or uid != os.getuid():
        return f"the control channel's peer is pid {pid} uid {uid}, not the front (pid {os.getppid()})"
    return None
