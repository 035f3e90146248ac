#!/usr/bin/env bash
# The Python packages the pipeline needs that the GPU machine's image lacks, as wheels in .whl/
# (git-ignored), for a machine that has PyTorch, Triton and timm but cannot reach PyPI: carry
# .whl there and `bash infra/gpu-checks.sh` installs them first. Run here, in the repo root.
# DeepSpeed ships no wheel on PyPI: it is built here (pure Python with DS_BUILD_OPS=0).
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
py=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand; do
  pins+=("$name==$(version "$name")")
done
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$dest" "${pins[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel --no-deps --no-build-isolation -w "$dest" "deepspeed==$(version deepspeed)"
ls -l "$dest"
