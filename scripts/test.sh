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

# Real DICOM peers for tests/node: dcmtk (echoscu, storescu, storescp) and Orthanc, from the
# distribution. Skipped when present or BSLDM_NO_APT=1; if apt-get fails, those tests skip, saying why.
if [ "${BSLDM_NO_APT:-0}" != 1 ] && ! { command -v storescu && command -v Orthanc; } >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  if command -v apt-get > /dev/null &&
     { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
         --no-install-recommends dcmtk orthanc; } > /dev/null 2>&1; then
    # The tests start their own Orthanc on free ports; the package's system service is not needed.
    { command -v systemctl && $sudo systemctl disable --now orthanc; } > /dev/null 2>&1 || true
  else
    echo "could not install dcmtk and orthanc with apt-get; tests/node skips what needs them" >&2
  fi
fi

echo "== C++ unit tests (ctest)" >&2
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cmake -j2 > /dev/null
ctest --test-dir build/cmake --output-on-failure

echo "== Python tests (pytest)" >&2
.venv/bin/python -m pytest -q "$@"
