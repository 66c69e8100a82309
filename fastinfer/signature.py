"""What a model takes and gives: tensor specs, preprocessing and postprocessing, as plain data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastinfer.preprocess import ImagePreprocess


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of one sample or batch: numpy dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class ModelSignature:
    """A served model as the front sees it. Shapes include the batch dimension."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocess: ImagePreprocess | None = None
    top_k: int = 0

    @property
    def takes_images(self) -> bool:
        return self.preprocess is not None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "top_k": self.top_k,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelSignature:
        pre = data.get("preprocess")
        preprocess = None
        if pre:
            preprocess = ImagePreprocess(
                resize_shorter=pre["resize_shorter"],
                crop=pre["crop"],
                mean=tuple(pre["mean"]),
                std=tuple(pre["std"]),
                layout=pre["layout"],
            )
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            preprocess=preprocess,
            top_k=data.get("top_k", 0),
        )
