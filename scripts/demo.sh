#!/usr/bin/env bash
# The main job: bone-suppress the bundled sample chest X-rays with the bundled demo model.
# Installs what it needs (scripts/install.sh) on the first run. Results: outputs/demo/*.png
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install.sh"
cd "$root"
# outputs/demo belongs to this demo, so re-running it replaces the previous results.
.venv/bin/bsldm-fast suppress assets/szch_samples/cxr -o outputs/demo --overwrite "$@"
echo "soft-tissue images: $root/outputs/demo" >&2
