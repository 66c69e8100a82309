#!/usr/bin/env bash
# Build fastinfer's serving image from this checkout: the wheels of fastinfer and its dependencies
# go into a build context, so that the build itself needs no package index.
#
#   scripts/kserve/build-image.sh [--cuda] [--local-base] [--tag NAME]
#
# --cuda        the CUDA variant (tag ...:latest-cuda unless --tag)
# --toolchain   add a C++ compiler (Debian's g++), which serving an .onnx model needs: TVM links
#               the code it compiles at the first start (archives need none)
# --local-base  make the base image from Debian's packages (mmdebstrap) when it is not there, for
#               machines that reach Debian's mirror but no container registry
# Environment: PODMAN (default podman), PODMAN_FLAGS (global flags, e.g. --cgroup-manager=cgroupfs),
# BUILD_FLAGS (flags of `podman build`, e.g. --runtime runc), WHEELHOUSE (where downloaded wheels
# are kept between builds; default build/wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE=docker.io/library/debian:bookworm-slim
tag=ghcr.io/fastinfer/fastinfer:latest
extras=
toolchain=
local_base=
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) extras=gpu; tag=ghcr.io/fastinfer/fastinfer:latest-cuda ;;
        --local-base) local_base=1 ;;
        --toolchain) toolchain=g++ ;;
        --tag) tag="$2"; shift ;;
        *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
podman=(${PODMAN:-podman} ${PODMAN_FLAGS:-})
wheelhouse=${WHEELHOUSE:-build/wheelhouse}
context=build/image-context

if [ -n "$local_base" ] && ! "${podman[@]}" image exists "$BASE"; then
    # Debian bookworm with python3, as debian:bookworm-slim plus the Python the Containerfile adds.
    rootfs=$(mktemp --suffix=.tar)
    trap 'rm -f "$rootfs"' EXIT
    mmdebstrap --quiet --variant=minbase --include=python3 bookworm "$rootfs"
    "${podman[@]}" import "$rootfs" "$BASE"
fi

# The wheels for the image's Python (bookworm's 3.11 on x86-64), whatever Python runs this script.
rm -rf "$context" && mkdir -p "$context/wheels" "$wheelhouse"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$context/wheels" .
platform=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any)
wheel=$(ls "$context"/wheels/fastinfer-*.whl)
python3 -m pip download --quiet "${platform[@]}" --dest "$wheelhouse" --find-links "$wheelhouse" \
    "$wheel${extras:+[$extras]}" pip
# Only what this build needs: an older fastinfer wheel in the wheelhouse must not be picked.
for file in "$wheelhouse"/*.whl; do
    case "$(basename "$file")" in fastinfer-*) ;; *) ln -f "$file" "$context/wheels/" 2>/dev/null || cp "$file" "$context/wheels/" ;; esac
done

"${podman[@]}" build ${BUILD_FLAGS:-} --build-arg EXTRAS="$extras" --build-arg TOOLCHAIN="$toolchain" --file Containerfile --tag "$tag" "$context"
echo "$tag"
