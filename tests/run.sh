#!/usr/bin/env bash
# The test command (README; .ci/run calls exactly this): install spoco-vol and its test
# dependencies into .venv, start the services the tests use for real (as root: Debian's
# slurm-wlm and munge are installed, /etc/slurm and /etc/munge written, and munged,
# slurmctld and slurmd started on loopback), run the suite, and stop the daemons it
# started when it ends (passed, failed or interrupted).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
if [ "$(id -u)" = 0 ]; then
    started=$(mktemp)
    trap 'bash tests/services/stop_daemons.sh "$started"' EXIT
    SPOCO_VOL_STARTED="$started" bash tests/services/start_slurm.sh
    export SPOCO_VOL_REQUIRE_SERVICES=1  # from here on a missing SLURM or gateway fails the tests
fi
.venv/bin/python -m pytest -q tests "$@"
