#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with CPython 3.12 manylinux wheels of scripts/gpu_wheels.txt for the lent GPU machine,
# whose image has no package index: `run` it with carry [".whl"] and scripts/gpu_check.sh installs them itself.
#   scripts/gpu_wheels.sh            # minutes; prints the total size against the 64 MiB a call may carry
# A release with a binary wheel is downloaded; one published only as an sdist is built here with a Python 3.12
# (pyenv's, else python3.12 on PATH), pure-Python ones as py3-none-any. bitsandbytes keeps only its CPU and CUDA 13
# libraries (the image's torch is built for CUDA 13): its full wheel alone is 43 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
PY312=$(PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep -m1 '^3\.12' || true) pyenv which python3.12 2>/dev/null \
        || command -v python3.12 || true)
platforms=()
for p in 2_5 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${p}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
mkdir -p .whl
build=()
while read -r req; do
  case "$req" in ''|'#'*) continue;; esac
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       "${platforms[@]}" -d .whl "$req" >/dev/null 2>&1; then
    build+=("$req")
  fi
done < scripts/gpu_wheels.txt
if [ ${#build[@]} -gt 0 ]; then
  [ -n "$PY312" ] || { echo "no Python 3.12 here to build ${build[*]} (install one, e.g. pyenv install 3.12)" >&2; exit 2; }
  venv=$(mktemp -d); "$PY312" -m venv "$venv"; "$venv/bin/pip" install -q setuptools wheel
  for req in "${build[@]}"; do echo "building $req from its sdist" >&2; "$venv/bin/pip" wheel -q --no-deps -w .whl "$req"; done
  rm -rf "$venv"
fi
bnb=$(ls .whl/bitsandbytes-*.whl 2>/dev/null | head -1 || true)
if [ -n "$bnb" ] && unzip -l "$bnb" | grep -q 'libbitsandbytes_cuda12'; then
  tmp=$(mktemp -d); (cd "$tmp" && unzip -q "$OLDPWD/$bnb")
  find "$tmp/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  record=$(ls -d "$tmp"/*.dist-info)/RECORD
  grep -v -E 'libbitsandbytes_(cuda1[12]|rocm|xpu)' "$record" > "$record.new" && mv "$record.new" "$record"
  rm "$bnb"; (cd "$tmp" && zip -q -r "$OLDPWD/$bnb" .); rm -rf "$tmp"
fi
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((total / 1048576)) MiB; with the tracked tree $(((total + tree) / 1048576)) of 64 MiB"
