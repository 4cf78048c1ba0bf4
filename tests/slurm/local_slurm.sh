#!/usr/bin/env bash
# A real one-node SLURM on localhost for the tests: Debian's slurm-wlm daemons + munge.
#
#   bash tests/slurm/local_slurm.sh start STATE_DIR    # installs (apt) if missing, writes the config, starts
#   bash tests/slurm/local_slurm.sh stop STATE_DIR
#
# Everything it writes lives in STATE_DIR (slurm.conf, spool, state, logs); the daemons read
# SLURM_CONF=STATE_DIR/slurm.conf, which the caller exports for sbatch/squeue/submitit.  Exit code
# 3 and one line on stderr when SLURM cannot be installed or started here (the tests then skip
# with that line).  Needs root (apt, munged, slurmd) as on this project's machines and CI.
set -euo pipefail
action=${1:?start|stop}
state=$(mkdir -p "${2:?state dir}" && cd "$2" && pwd)
conf=$state/slurm.conf

cant() { echo "local SLURM unavailable: $*" >&2; exit 3; }

if [[ $action == stop ]]; then
  for pidfile in "$state"/slurmd.pid "$state"/slurmctld.pid; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  [[ $(id -u) == 0 ]] || cant "slurm-wlm is not installed and installing it needs root"
  command -v apt-get >/dev/null || cant "slurm-wlm is not installed and there is no apt-get"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge) \
    >"$state/apt.log" 2>&1 || cant "apt-get install slurmctld slurmd slurm-client munge failed (see $state/apt.log)"
fi

# munge: one daemon per machine, shared by every state dir.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; } >/dev/null 2>&1 \
    || cant "cannot create /etc/munge/munge.key"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null || true
  (su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force) || cant "munged did not start"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null 2>&1 || cant "munge does not answer"
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$state/spool" "$state/state" "$state/log"
cat >"$conf" <<EOF
# Written by tests/slurm/local_slurm.sh: one node, this machine.
ClusterName=mema-local
SlurmctldHost=$host
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
# A requeued job waits out its credential's lifetime before it may start again (default 120 s);
# a short one, and a scheduler that looks every second, let the requeue tests see it at once.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$state/state
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

export SLURM_CONF=$conf
bash "$0" stop "$state"
sleep 0.5
slurmctld -i -f "$conf" || cant "slurmctld did not start (see $state/log/slurmctld.log)"
slurmd -f "$conf" || cant "slurmd did not start (see $state/log/slurmd.log)"
for _ in $(seq 120); do
  if sinfo -h -N -o "%T" 2>/dev/null | grep -Eq "^(idle|mixed|allocated)"; then
    echo "SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
cant "the node did not come up idle within 60 s: $(sinfo -h -N -o '%T %E' 2>&1 | head -1); see $state/log/"
