#!/usr/bin/env bash
# Install everything needed (scripts/install.sh test) and run all tests: the C++ unit tests
# (CMake + ctest), then the Python suite (pytest). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh" test
cd "$root"
# monai-generative (the original VQGAN) pins an old monai; 1.4.0 runs it, so both skip dependency
# resolution. Both are test-only references.
.venv/bin/python -c "import generative, monai" 2>/dev/null ||
  .venv/bin/python -m pip install -q --no-deps "monai==1.4.0" "monai-generative==0.2.3"

echo "== C++ unit tests (ctest)" >&2
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake -j2 > /dev/null
ctest --test-dir build/cmake --output-on-failure

echo "== Python tests (pytest)" >&2
.venv/bin/python -m pytest -q "$@"
