"""The worker process: owns its cores, loads the models, runs requests from its slots.

Started by the front as ``python -m fastinfer.worker FD`` (a fresh interpreter, never a fork of
a process that loaded TVM), with one end of a socketpair as FD. It pins itself to its cores and
sets TVM's thread count before TVM is imported, answers ``ready`` once every model is warm, and
exits when the front closes the channel or dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys

from fastinfer.errors import FastInferError
from fastinfer.shm import SlotMap
from fastinfer.worker.channel import BlockingChannel

log = logging.getLogger("fastinfer.worker")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the closed channel still ends the worker
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _own_cores(cores: list[int]) -> None:
    if cores:
        os.sched_setaffinity(0, cores)
    os.environ["TVM_NUM_THREADS"] = str(max(1, len(cores)))


def serve(channel: BlockingChannel) -> int:
    init = channel.recv()
    if init is None:
        return 0
    logging.basicConfig(
        level=init["log_level"].upper(), format=f"%(asctime)s worker[{init['index']}] %(levelname)s %(message)s"
    )
    _own_cores(init["cores"])

    from fastinfer.worker.model import load_model  # imports numpy; TVM comes later, after pinning

    slots = SlotMap(init["shm_name"], init["slot_count"], init["slot_bytes"])
    slots.open()
    try:
        models = {
            name: load_model(
                name,
                path,
                cache_dir=init["cache_dir"],
                num_cores=max(1, len(init["cores"])),
                max_image_pixels=init["max_image_pixels"],
            )
            for name, path in init["models"].items()
        }
    except FastInferError as error:
        log.error("%s", error.message)
        channel.send({"op": "failed", "message": error.message})
        return 3
    channel.send({"op": "ready", "pid": os.getpid(), "models": {n: m.signature.to_dict() for n, m in models.items()}})

    while True:
        message = channel.recv()
        if message is None or message["op"] == "stop":
            return 0
        request_id = message["id"]
        try:
            model = models[message["model"]]
            reply = model.infer(message["kind"], slots.view(message["slot"]), message["nbytes"])
            channel.send({"op": "result", "id": request_id, **reply})
        except FastInferError as error:
            channel.send(
                {"op": "error", "id": request_id, "code": error.code, "status": error.status, "message": error.message}
            )
        except Exception as error:  # a bug or a TVM failure must not take the worker down
            log.exception("request %s failed", request_id)
            channel.send(
                {"op": "error", "id": request_id, "code": "internal_error", "status": 500, "message": str(error)}
            )


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when workers stop
    _die_with_parent()
    sock = socket.socket(fileno=int(sys.argv[1]))
    sys.exit(serve(BlockingChannel(sock)))
