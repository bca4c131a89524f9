#!/usr/bin/env bash
# Create .venv (if missing) and install bsldm_fast into it with its C++ extension, CPU build.
#   bash scripts/install.sh [EXTRAS]      e.g. EXTRAS=test
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU build this project
# develops against; an unpinned torch from PyPI is a multi-GB CUDA build).
# Re-running is cheap: the package is rebuilt only when setup.py, csrc/ or the extras change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="$root/.venv"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "installing $torch_spec (CPU) ..." >&2
  "$py" -m pip install -q "$torch_spec"
fi

stamp="$venv/.bsldm_fast-installed"
want="$( (echo "extras=$extras"; cat "$root/setup.py"; find "$root/csrc" -type f | sort | xargs cat) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import bsldm_fast._C" 2>/dev/null; then
  exit 0
fi
echo "building bsldm_fast and its C++ extension ..." >&2
# The extension links against the installed torch, so it is built without build isolation.
"$py" -m pip install -q "setuptools>=64" wheel ninja pybind11
target="$root"
[ -n "$extras" ] && target="$root[$extras]"
"$py" -m pip install -q --no-build-isolation -e "$target"
echo "$want" > "$stamp"
