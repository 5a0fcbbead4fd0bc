#!/usr/bin/env bash
# The test command (README; .ci/run calls exactly this): install spoco-vol and its test
# dependencies into .venv, start the services the tests use for real (a one-node SLURM
# cluster on loopback; needs root and Debian's packages), run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
if [ "$(id -u)" = 0 ]; then
    bash tests/services/start_slurm.sh
    export SPOCO_VOL_REQUIRE_SERVICES=1  # from here on a missing SLURM or gateway fails the tests
fi
.venv/bin/python -m pytest -q tests "$@"
