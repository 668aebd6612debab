#!/usr/bin/env bash
# A Slurm on this machine, for tests/test_profile_slurm.py: munged, slurmctld and three slurmd
# started directly (no systemd). Partition `ci`: this host as one node with all its CPUs and
# memory, and 2 GPUs declared as generic resources without devices (no GPU here: it lets Slurm
# schedule and account a `--gpus` request). Partition `ci2`: two more nodes, node1 and node2,
# each a slurmd of its own on this host (Debian's Slurm is built with multiple-slurmd: one
# NodeName per daemon, each on its own port) with 1 CPU and 1 GRES gpu, named in /etc/hosts,
# so that a job can span two nodes (`--nodes=2`). Accounting: none (no slurmdbd); sacct
# then asks slurmctld, which keeps finished jobs for MinJobAge seconds. Needs root and the
# Debian packages slurmctld, slurmd, slurm-client and munge (.ci/services.sh installs them).
#   bash .ci/slurm.sh          # start (idempotent: a running cluster is left alone)
#   bash .ci/slurm.sh stop
set -euo pipefail
CONF=/etc/slurm
STATE=/var/lib/slurm-ci
NODE=$(hostname -s)

stop() {
    for pidfile in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

if [ "${1:-}" = stop ]; then
    stop
    exit 0
fi
if timeout 5 sinfo --noheader >/dev/null 2>&1; then
    exit 0
fi

mkdir -p "$CONF" "$STATE/ctld" "$STATE/d/$NODE" "$STATE/d/node1" "$STATE/d/node2" /var/log/slurm /run/munge
chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || (mungekey --create --force 2>/dev/null || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null)
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

MEM_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
cat > "$CONF/slurm.conf" <<EOF
ClusterName=refrag-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=900
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=ci Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
NodeName=node1 NodeHostname=$NODE NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=4000 Gres=gpu:1 State=UNKNOWN
NodeName=node2 NodeHostname=$NODE NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=4000 Gres=gpu:1 State=UNKNOWN
PartitionName=ci2 Nodes=node[1-2] MaxTime=INFINITE State=UP
EOF
touch "$STATE/gpu0" "$STATE/gpu1" "$STATE/gpu-node1" "$STATE/gpu-node2"   # stand-in devices
cat > "$CONF/gres.conf" <<EOF
NodeName=$NODE Name=gpu File=$STATE/gpu[0-1]
NodeName=node1 Name=gpu File=$STATE/gpu-node1
NodeName=node2 Name=gpu File=$STATE/gpu-node2
EOF
# the two extra nodes' names resolve to this host (torchrun's rendezvous is at the first node)
grep -q ' node1 node2$' /etc/hosts || echo '127.0.0.1 node1 node2' >> /etc/hosts
rm -f "$CONF/cgroup.conf"

slurmctld -c   # fresh state: no node or job from an earlier start
slurmd
slurmd -N node1
slurmd -N node2
for _ in $(seq 1 30); do
    if [ "$(sinfo --noheader --Node --format=%T 2>/dev/null | sort -u)" = idle ]; then
        echo "slurm: partition ci on $NODE is up ($(nproc) CPUs, ${MEM_MB} MB, 2 GRES gpus)"
        echo "slurm: partition ci2 is up (node1, node2 on this host: 1 CPU, 1 GRES gpu each)"
        exit 0
    fi
    sleep 1
done
echo ".ci/slurm.sh: Slurm did not come up; see /var/log/slurm/" >&2
tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-*.log >&2 || true
exit 1
