#!/usr/bin/env bash
# Stop the daemons named in FILE (one per line, as start_slurm.sh records them), last
# started first, and remove FILE. Daemons that were running before the tests are not in it.
FILE=${1:?usage: stop_daemons.sh FILE}
[ -f "$FILE" ] || exit 0
for name in $(tac "$FILE"); do
    pkill -x "$name" 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x "$name" >/dev/null || break; sleep 0.1; done
done
rm -f "$FILE"
