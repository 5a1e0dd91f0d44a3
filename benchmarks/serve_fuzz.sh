#!/usr/bin/env bash
# The service's schema fuzz at 400 Hypothesis examples per endpoint (the default suite runs 120): no 5xx,
# every refusal a 4xx naming the field. Prints the status counts per endpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
QARM_FUZZ_EXAMPLES="${QARM_FUZZ_EXAMPLES:-400}" python -m pytest -q -s -p no:randomly tests/test_serve_fuzz.py "$@"
