"""Fixtures of the archive tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


class InProcessBuilder:
    """The tuner's builder (BuilderInput in, artifact paths out), with MetaSchedule's own build and
    export functions, in this process: no worker processes to start, each of which imports TVM's
    tensor intrinsics first (tens of seconds)."""

    def build(self, inputs: list) -> list:
        from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

        return [
            SimpleNamespace(artifact_path=default_export(default_build(item.mod, item.target, None))) for item in inputs
        ]

    def close(self) -> None:
        pass


@pytest.fixture
def in_process_builder() -> InProcessBuilder:
    return InProcessBuilder()
