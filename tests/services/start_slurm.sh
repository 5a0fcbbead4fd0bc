#!/usr/bin/env bash
# A single-node SLURM cluster on loopback for the tests (real slurmctld + slurmd + munged).
# Installs Debian's slurm-wlm and munge when missing (needs root and the package registry).
# Idempotent: does nothing if `sinfo` already answers. Prints the partition it made.
# With SPOCO_VOL_STARTED=FILE, the names of the daemons it started (not those already
# running) are appended to FILE, for tests/services/stop_daemons.sh.
set -euo pipefail
if sinfo -h >/dev/null 2>&1; then
    sinfo -h -o "%P %a %D %T"; exit 0
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    (apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null))
fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
mkdir -p /etc/slurm /run/munge /run/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=spoco-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
started() { [ -z "${SPOCO_VOL_STARTED:-}" ] || echo "$1" >> "$SPOCO_VOL_STARTED"; }
pgrep -x munged >/dev/null || { runuser -u munge -- munged && started munged; }
pgrep -x slurmctld >/dev/null || { slurmctld && started slurmctld; }
pgrep -x slurmd >/dev/null || { slurmd && started slurmd; }
for _ in $(seq 50); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|alloc"; then break; fi
    sleep 0.2
done
sinfo -h -o "%P %a %D %T"
