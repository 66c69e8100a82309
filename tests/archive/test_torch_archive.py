"""PyTorch models in: exported with torch.export, archived (``fastinfer archive m.pt2`` and
``fastinfer.archive.from_torch``), served, and checked against PyTorch over HTTP and the binary protocol.

The models are built in code with seeded random weights (batch-norm statistics too), tiny so that
each compiles untuned in seconds; one server serves them all.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from conftest import running_server
from torch import nn

import fastinfer.archive
from fastinfer.archive.commands import describe
from fastinfer.archive.load import read_manifest
from fastinfer.archive.manifest import ArchiveError, Manifest
from fastinfer.archive.pack import BuildOptions
from fastinfer.archive.pytorch import build_archive
from fastinfer.cli import main as cli
from fastinfer.client import AsyncClient

BATCHES = (1, 4)


def randomized(module: nn.Module) -> nn.Module:
    """``module`` in eval mode, its batch norms given random running statistics (not 0 and 1)."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return module.eval()


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.classifier = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.features(image)).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or channels != out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 16, 1, bias=False),  # pointwise
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 6),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU()
        )
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class TwoInTwoOut(nn.Module):
    """An image and a feature vector in; named logits and an embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4 + 6, 8)
        self.logits = nn.Linear(8, 5)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = torch.relu(self.conv(image)).mean((2, 3))
        embedding = torch.tanh(self.mix(torch.cat([pooled, features], 1)))
        return {"logits": self.logits(embedding), "embedding": embedding}


# name -> (model class, per-sample input shapes, built through the CLI from a saved .pt2)
MODELS = {
    "cnn": (SmallCnn, [(3, 16, 16)], True),
    "resnet": (ResNetish, [(3, 16, 16)], False),
    "dwsep": (DepthwiseSeparable, [(3, 16, 16)], False),
    "mlp": (Mlp, [(16,)], True),
    "two": (TwoInTwoOut, [(3, 8, 8), (6,)], False),
}


def inputs_for(shapes: list[tuple[int, ...]], batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, *shape), dtype=np.float32) for shape in shapes]


def eager(module: nn.Module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(a) for a in arrays))
    values = result.values() if isinstance(result, dict) else [result]
    return [v.numpy() for v in values]


def save_program(module: nn.Module, shapes: list[tuple[int, ...]], path: Path, dynamic: bool = True) -> Path:
    """``module`` exported as a user would, its leading axis a dynamic batch (else batch 1), saved to ``path``."""
    batch = torch.export.Dim("batch")
    examples = tuple(torch.rand(2 if dynamic else 1, *shape) for shape in shapes)
    dynamic_shapes = tuple({0: batch} for _ in shapes) if dynamic else None
    return save(torch.export.export(module, examples, dynamic_shapes=dynamic_shapes), path)


def save(program, path: Path) -> Path:
    with warnings.catch_warnings(action="ignore", category=FutureWarning):  # torch's own deprecations
        torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """Every model archived once: name -> (archive, the PyTorch module it came from)."""
    folder = tmp_path_factory.mktemp("torch-archives")
    built = {}
    for index, (name, (cls, shapes, through_cli)) in enumerate(MODELS.items()):
        torch.manual_seed(index)
        module = randomized(cls())
        output = folder / f"{name}.fia"
        if through_cli:
            source = save_program(module, shapes, folder / f"{name}.pt2")
            argv = ["archive", str(source), "--name", name, "-o", str(output), "--cache-dir", str(folder)]
            assert cli(argv) == 0
        else:
            examples = tuple(torch.rand(1, *shape) for shape in shapes)
            fastinfer.archive.from_torch(module, examples, output, name=name, cache_dir=str(folder))
        built[name] = (output, module)
    return built


def test_manifest_records_the_source(archives):
    manifest = read_manifest(archives["two"][0])
    assert manifest.source_format == "torch.export" and manifest.torch_version == torch.__version__
    assert [(s.name, s.shape) for s in manifest.inputs] == [("image", (3, 8, 8)), ("features", (6,))]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", (5,)), ("embedding", (8,))]
    assert manifest.batch_sizes is None and manifest.build["source"] == "TwoInTwoOut.pt2"
    assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 3]
    assert manifest.build["verified"]["reference"] == f"PyTorch {torch.__version__}"
    text = describe(read_manifest(archives["cnn"][0]))
    assert f"from cnn.pt2 (torch.export, PyTorch {torch.__version__})" in text


def test_manifests_from_before_the_source_fields_load_as_onnx(archives):
    data = json.loads(read_manifest(archives["mlp"][0]).to_json())
    del data["source_format"], data["torch_version"]
    manifest = Manifest.from_json(json.dumps(data))
    assert manifest.source_format == "onnx" and manifest.torch_version is None


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_served_outputs_equal_pytorch(archives, tmp_path):
    models = tuple(f"{name}={path}" for name, (path, _) in archives.items())
    async with (
        running_server(tmp_path, models=models, batch_max_size=8) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http,
        AsyncClient(f"tcp://127.0.0.1:{server.binary.port}", timeout_s=60) as client,
    ):
        for seed, (name, (path, module)) in enumerate(archives.items()):
            manifest = read_manifest(path)
            for batch in BATCHES:
                arrays = inputs_for(MODELS[name][1], batch, seed)
                expected = eager(module, arrays)
                named = {spec.name: array for spec, array in zip(manifest.inputs, arrays, strict=True)}
                body = {
                    "inputs": [
                        {"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
                        for k, v in named.items()
                    ]
                }
                async with http.post(f"/v2/models/{name}/infer", json=body) as response:
                    assert response.status == 200, await response.text()
                    answer = {o["name"]: o for o in (await response.json())["outputs"]}
                binary = await client.infer(name, named)
                for spec, want in zip(manifest.outputs, expected, strict=True):
                    over_http = np.asarray(answer[spec.name]["data"], np.float32).reshape(answer[spec.name]["shape"])
                    for got in (over_http, binary[spec.name]):
                        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{name} batch {batch}")
        # /predictions takes one sample's raw tensor
        sample = inputs_for(MODELS["cnn"][1], 1, 99)[0]
        async with http.post(
            "/predictions/cnn", data=sample.tobytes(), headers={"Content-Type": "application/octet-stream"}
        ) as response:
            assert response.status == 200, await response.text()
            (output,) = (await response.json())["outputs"]
        got = np.asarray(output["data"], np.float32).reshape(output["shape"])
        np.testing.assert_allclose(got, eager(archives["cnn"][1], [sample])[0], rtol=1e-4, atol=1e-6)
        # Serving never needs PyTorch: the worker that ran all this has not even loaded it.
        async with http.get(f"http://127.0.0.1:{server.management_port}/workers") as response:
            pids = [worker["pid"] for worker in (await response.json())["workers"]]
        assert pids and not [pid for pid in pids if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]


def build_fails(tmp_path: Path, source: Path, match: str, **options) -> None:
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    with pytest.raises(ArchiveError, match=match):
        build_archive(source, out / "m.fia", BuildOptions(name="m", cache_dir=str(tmp_path / "cache"), **options))
    assert list(out.iterdir()) == [], "a failed build left files behind"


class Special(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x + 2.0)


def test_unsupported_operator_is_named_with_its_node(tmp_path):
    module = nn.Sequential(nn.Linear(4, 4), Special())
    source = save_program(module, [(4,)], tmp_path / "m.pt2")
    build_fails(
        tmp_path,
        source,
        r"cannot convert these operators: aten\.lgamma\.default at node lgamma in module '1' "
        r"\(return torch\.lgamma\(x \+ 2\.0\)\)",
    )


def test_not_an_exported_program(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip at all" * 8)
    build_fails(tmp_path, junk, "junk.pt2 is not a torch.export program: it is not even a zip")
    weights = tmp_path / "weights.pt2"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    build_fails(tmp_path, weights, r"not a torch.export program but a torch.save file .* torch\.export\.save")


def test_disagreement_names_the_largest_error_and_where(tmp_path, monkeypatch):
    from fastinfer.archive import pack

    real = pack._run_library

    def off_by_one_element(*args):
        outputs = real(*args)
        outputs[0][-1, 2] += 1.0
        return outputs

    monkeypatch.setattr(pack, "_run_library", off_by_one_element)
    source = save_program(Mlp().eval(), [(16,)], tmp_path / "m.pt2")
    build_fails(tmp_path, source, r"disagrees with PyTorch .* at batch 1: largest error .* output 'output' at \(0, 2\)")


def test_fixed_batch_program_serves_its_batch_only(tmp_path):
    source = save_program(Mlp().eval(), [(16,)], tmp_path / "m.pt2", dynamic=False)
    build_fails(tmp_path, source, "exported for batch 1 only; re-export it with a dynamic batch axis", batch_sizes=(4,))
    manifest = build_archive(source, tmp_path / "b1.fia", BuildOptions(name="m", cache_dir=str(tmp_path)))
    assert manifest.batch_sizes == (1,) and list(manifest.libraries) == ["1"]


def test_without_torch_the_cli_names_the_extra(tmp_path, monkeypatch, capsys):
    source = save_program(Mlp().eval(), [(16,)], tmp_path / "m.pt2")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert cli(["archive", str(source), "--name", "m", "-o", str(tmp_path / "m.fia")]) == 1
    assert "pip install 'fastinfer[torch]'" in capsys.readouterr().err
    assert not (tmp_path / "m.fia").exists()


def test_tuned_build_compiles_one_library_per_batch_size(tmp_path):
    """Tuning needs static shapes: the batch symbol is bound to each size, and each size is verified."""
    source = save_program(Mlp().eval(), [(16,)], tmp_path / "m.pt2")
    options = BuildOptions(name="m", batch_sizes=(1, 2), use_stored_records=True, cache_dir=str(tmp_path))
    manifest = build_archive(source, tmp_path / "m.fia", options)
    assert manifest.tuning is not None and manifest.batch_sizes == (1, 2)
    assert manifest.libraries == {"1": "lib/model-b1.so", "2": "lib/model-b2.so"}
    assert [c["batch"] for c in manifest.build["verified"]["checks"]] == [1, 2]


def test_input_shape_fixes_other_dynamic_dimensions(tmp_path):
    height, width = torch.export.Dim("height", min=4, max=64), torch.export.Dim("width", min=4, max=64)
    program = torch.export.export(
        SmallCnn().eval(), (torch.rand(1, 3, 16, 16),), dynamic_shapes=({2: height, 3: width},)
    )
    source = save(program, tmp_path / "m.pt2")
    build_fails(tmp_path, source, r"dynamic dimension at axis 2; .* --input-shape image=1,3,\?,\?")
    options = BuildOptions(name="m", input_shapes={"image": (1, 3, 8, 12)}, cache_dir=str(tmp_path))
    manifest = build_archive(source, tmp_path / "m.fia", options)
    assert manifest.inputs[0].shape == (3, 8, 12) and manifest.batch_sizes == (1,)


def test_bounded_batch_needs_sizes_within_its_range(tmp_path):
    batch = torch.export.Dim("batch", max=8)
    program = torch.export.export(Mlp().eval(), (torch.rand(2, 16),), dynamic_shapes=({0: batch},))
    source = save(program, tmp_path / "m.pt2")
    build_fails(tmp_path, source, r"takes batches \d\.\.8 only: choose sizes in it with --batch-sizes")
    build_fails(tmp_path, source, r"takes batches \d\.\.8; batch 16 is outside it", batch_sizes=(1, 16))
