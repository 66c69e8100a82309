"""Python clients of the binary protocol: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

They import neither TVM nor server code, so a client install stays light.
"""

from fastinfer.client.aio import AsyncClient
from fastinfer.client.binary import InferenceServerError
from fastinfer.client.blocking import Client

__all__ = ["AsyncClient", "Client", "InferenceServerError"]
