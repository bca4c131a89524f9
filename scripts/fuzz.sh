#!/usr/bin/env bash
# A long fuzz run of the image readers and the model-directory loader: the same properties as the
# test suite (tests/io/test_fuzz.py, tests/test_modeldir.py), with many more examples. Each example
# must end in a named error (ImageError, ModelDirError) or a valid image/model.
#   bash scripts/fuzz.sh            # 5000 examples per property (a few minutes on 2 cores)
#   BSLDM_FUZZ_EXAMPLES=500 bash scripts/fuzz.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export BSLDM_FUZZ_EXAMPLES="${BSLDM_FUZZ_EXAMPLES:-5000}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests/io/test_fuzz.py \
  "tests/test_modeldir.py::test_fuzz_mutated_config" \
  "tests/test_modeldir.py::test_fuzz_mutated_safetensors_header"
