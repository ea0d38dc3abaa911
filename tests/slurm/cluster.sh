#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests that go through sbatch.
#   tests/slurm/cluster.sh start   install (Debian's slurm-wlm + munge, as root) if needed,
#                                  configure from nproc/memory, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop    stop the daemons (state stays in $VPT_SLURM_DIR)
#   tests/slurm/cluster.sh status  exit 0 when the node answers idle/mixed/allocated
# Idempotent: `start` on a running cluster only checks it. Without root or without the
# packages it exits 0 with a line saying so: the Slurm tests then skip with that reason.
set -uo pipefail
DIR=${VPT_SLURM_DIR:-/tmp/vpt_dml_slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

say() { echo "slurm-cluster: $*"; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }

install() {
  installed && return 0
  if [ "$(id -u)" != 0 ]; then say "not root: cannot install slurm-wlm; Slurm tests will skip"; return 1; fi
  say "installing slurm-wlm and munge (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) \
    > "$DIR/apt.log" 2>&1 || { say "apt-get failed (see $DIR/apt.log); Slurm tests will skip"; return 1; }
}

up() { timeout 5 sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

configure() {
  local cpus mem
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc honours OMP_NUM_THREADS
  # leave 1 GiB to the system; RealMemory in MB
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 1024 ))
  mkdir -p "$DIR"/{state,spool,log} /etc/slurm /var/run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /var/run/munge /var/log/munge /var/lib/munge 2>/dev/null
  chmod 400 /etc/munge/munge.key
  cat > "$CONF.new" <<CONF
# written by vpt_dml tests/slurm/cluster.sh: a one-node test cluster
ClusterName=vpt-dml-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s): short here
# so that a test's requeue resumes within seconds. It is also the job-step credential's
# lifetime, ample on one idle node.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# a job whose BeginTime passed (a requeued one) starts within seconds, not at the next
# 30-60 s scheduling pass
SchedulerParameters=sched_interval=5,bf_interval=5
# finished jobs stay visible to scontrol show job for 5 minutes (no accounting: the
# sweep's parent reads their final state there)
MinJobAge=300
KillWait=10
InactiveLimit=0
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  rm -f /etc/slurm/cgroup.conf  # proctrack/linuxproc + task/none: no cgroups needed
}

start() {
  mkdir -p "$DIR"
  install || exit 0
  configure
  if up && cmp -s "$CONF.new" "$CONF"; then
    rm -f "$CONF.new"; say "running ($HOST idle in partition cpu)"; exit 0
  fi
  # first start, or the configuration changed (this script was edited): (re)start
  up && stop_daemons
  mv "$CONF.new" "$CONF"
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>>"$DIR/log/munged.log" \
    || /usr/sbin/munged --force 2>>"$DIR/log/munged.log"
  pgrep -x slurmctld >/dev/null || slurmctld -c 2>>"$DIR/log/slurmctld.err"
  pgrep -x slurmd >/dev/null || slurmd -c 2>>"$DIR/log/slurmd.err"
  for _ in $(seq 60); do
    if up; then say "started: node $HOST, partition cpu, $(env -u OMP_NUM_THREADS nproc) CPUs (state in $DIR)"; exit 0; fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
    sleep 1
  done
  say "did not come up in 60 s (logs in $DIR/log); Slurm tests will skip"
  exit 0
}

stop_daemons() {
  # by the pid files the daemons wrote (never by name: other processes may share it)
  local f pid
  for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  for _ in $(seq 20); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || return 0
    sleep 0.5
  done
}

stop() {
  stop_daemons
  say "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) up ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
