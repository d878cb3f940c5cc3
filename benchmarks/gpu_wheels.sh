#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a lent GPU machine and its image lacks, written to .whl/ (git-ignored),
# which the device call carries (carry [".whl"]); gpu_check.sh installs them there when a module is missing.
#   bash benchmarks/gpu_wheels.sh [DEST]          # default DEST: .whl
# The machine's image (the device tool's KINDS.md) holds torch, transformers, numpy, PyYAML, Pillow, safetensors and
# tokenizers, but not omegaconf, nor the ANTLR runtime omegaconf parses with. The versions are the ones installed
# here (those the tests ran with); both are pure Python, so their wheels fit the machine's Python (3.12). PyPI has
# the ANTLR runtime as a source archive only: pip builds its wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DEST="${1:-.whl}"
PACKAGES="omegaconf antlr4-python3-runtime"
SPECS="" PREFIXES=""  # a wheel's file name starts with its name, '-' written '_'
for name in $PACKAGES; do
  version="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)" || {
    echo "gpu_wheels.sh: $name is not installed for $PY; run 'make venv' first (or set PYTHON)" >&2
    exit 2
  }
  SPECS="$SPECS $name==$version"
  PREFIXES="$PREFIXES ${name//-/_}"
done
mkdir -p "$DEST"
for prefix in $PREFIXES; do rm -f "$DEST/$prefix"-*.whl; done  # one version of each: two stop the install there
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" $SPECS
WROTE=""
for prefix in $PREFIXES; do
  for wheel in "$DEST/$prefix"-*.whl; do
    case "$wheel" in
      *-none-any.whl) WROTE="$WROTE $wheel" ;;
      *) echo "gpu_wheels.sh: $wheel is not a pure-Python wheel; it may not fit the machine's Python" >&2; exit 1 ;;
    esac
  done
done
echo "wrote$WROTE"
if [ "$DEST" = ".whl" ]; then
  echo "the device call: command 'bash benchmarks/gpu_check.sh', carry [\".whl\"]"
else  # the device call carries only paths of this repository that git ignores, such as .whl
  echo "gpu_check.sh reads them with WHEELS=$DEST"
fi
