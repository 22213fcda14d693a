#!/bin/bash
# The guest half of bench/vm-fio.sh, run inside tools/ublksharp-vm: sets up the ublk devices and
# their peers over one tmpfs file, runs the fio matrix REPS times (interleaved, order rotated each
# repetition) and leaves each run's fio JSON plus CPU counters and the daemons' RSS in OUT for the
# host to summarise. UBLKSRV, when given, is a ublksrv `ublk` binary that joins as a peer (its null
# and loop targets); it is only run, never built.
# ONLY=cow (in the environment) runs only the cow set's workloads (bench/vm-fio.sh --only cow);
# COW_ARGS adds options to the cow device's `add` (bench/vm-fio.sh --cow-args).
# usage: bench/vm-fio-guest.sh OUT REPS RUNTIME ENGINE [UBLKSRV]
set -euo pipefail
out=$1 reps=$2 rt=$3 engine=$4 ublksrv=${5:-} only=${ONLY:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cli=(dotnet "$root/src/UblkSharp.Cli/bin/Release/net10.0/UblkSharp.Cli.dll")
img=/tmp/vm-fio.img
log() { echo "vm-fio: $*"; }


# Fairness: with 2+ CPUs every server (our daemons, the kernel loop workers) lives on CPU 0 and
# fio on CPU 1. With one CPU nothing is pinned.
fio=(fio) pin=()
if [ "$(nproc)" -ge 2 ]; then fio=(taskset -c 1 fio) pin=(taskset -c 0); fi

declare -A dev pid
add() { "${pin[@]}" "${cli[@]}" add "$@" -q 1 -d 128; }
ours=()
if [ "$only" != cow ]; then
  # Same data everywhere: 256 MiB of random bytes on tmpfs; the mem device gets a copy.
  dd if=/dev/urandom of=$img bs=1M count=256 status=none
  dev[file]=$img
  dev[kloop]=$(losetup --direct-io=off -f --show $img)
  dev[ublk-null]=$(add -t null -s 256M)
  dev[ublk-mem]=$(add -t mem -s 256M)
  dev[ublk-loop]=$(add -t loop -f $img)
  ours=(ublk-null ublk-mem ublk-loop)
fi
# The cow set: a COW overlay and a loop device over one backing file on ext4 (on a kernel loop
# device over tmpfs), not on tmpfs itself, where io_uring would punt every step to a worker: so both
# targets take their ring path, as over a file on a disk.
mkdir -p /tmp/cowfs
truncate -s 768M /tmp/cowfs.img
mkfs.ext4 -q -F /tmp/cowfs.img
mount -o loop /tmp/cowfs.img /tmp/cowfs
dd if=/dev/urandom of=/tmp/cowfs/base.img bs=1M count=256 status=none
dev[ublk-loop-fs]=$(add -t loop -f /tmp/cowfs/base.img)
# COW_ARGS (bench/vm-fio.sh --cow-args): more options for the cow device, to compare its settings.
read -ra cow_args <<<"${COW_ARGS:-}"
dev[ublk-cow]=$(add -t cow -f /tmp/cowfs/over.cow --create --backing /tmp/cowfs/base.img "${cow_args[@]}")
ours+=(ublk-loop-fs ublk-cow)
for d in "${ours[@]}"; do
  id=${dev[$d]#/dev/ublkb}
  pid[$d]=$(grep -o '"pid": *[0-9]*' "/run/ublksharp/$id.json" | grep -o '[0-9]*$')
done
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }  # KiB
# Memory per idle device: each device is its own daemon (1 queue, depth 128), before any IO.
for d in "${ours[@]}"; do echo "idle $d $(rss "${pid[$d]}")" >>"$out/rss.txt"; done
[ "$only" = cow ] || dd if=$img of="${dev[ublk-mem]}" bs=1M oflag=direct status=none

# The optional ublksrv peer: its null and loop targets, buffered like kernel loop (--direct-io=off).
peers=()
if [ -n "$ublksrv" ] && [ "$only" != cow ]; then
  ublksrv_pid() {  # the process holding the device's char device open
    local f
    for f in /proc/[0-9]*/fd/*; do
      if [ "$(readlink "$f" 2>/dev/null)" = "/dev/ublkc$1" ]; then f=${f#/proc/}; echo "${f%%/*}"; return; fi
    done
  }
  ublksrv_add() {  # name id args...
    local name=$1 id=$2; shift 2
    if "${pin[@]}" "$ublksrv" add -n "$id" -q 1 -d 128 "$@" >"$out/$name.log" 2>&1 && [ -b "/dev/ublkb$id" ]; then
      dev[$name]=/dev/ublkb$id pid[$name]=$(ublksrv_pid "$id")
      peers+=("$name")
      echo "idle $name $(rss "${pid[$name]}")" >>"$out/rss.txt"
      return 0
    fi
    return 1
  }
  ublksrv_add ublksrv-null 90 -t null || log "ublksrv: 'add -t null' failed: $(tail -3 "$out/ublksrv-null.log")"
  ublksrv_add ublksrv-loop 91 -t loop -f $img --buffered_io || ublksrv_add ublksrv-loop 91 -t loop -f $img ||
    log "ublksrv: 'add -t loop' failed: $(tail -3 "$out/ublksrv-loop.log")"
  printf '%s\n' "${peers[@]}" >"$out/ublksrv.txt"
fi
has() { [ -n "${dev[$1]:-}" ]; }
for d in "${ours[@]}" "${peers[@]}" ${dev[kloop]:+kloop}; do echo none >"/sys/block/${dev[$d]#/dev/}/queue/scheduler"; done

# Workloads: name rw bs iodepth, then the devices that run it (one run of each per repetition).
un=$(has ublksrv-null && echo ublksrv-null || true) ul=$(has ublksrv-loop && echo ublksrv-loop || true)
W=("rr4k-qd1 randread 4k 1 ublk-null kloop file $un"
   "rr4k-qd64 randread 4k 64 ublk-null ublk-loop ublk-mem kloop file $un $ul"
   "rw4k-qd64 randwrite 4k 64 ublk-loop ublk-mem kloop $ul"
   "sr128k-qd16 read 128k 16 ublk-loop kloop $ul"
   "sw128k-qd16 write 128k 16 ublk-loop kloop $ul")
C=("rr4k-qd64 randread 4k 64 ublk-cow ublk-loop-fs"
   "rw4k-qd64 randwrite 4k 64 ublk-cow ublk-loop-fs")
if [ "$only" = cow ]; then W=("${C[@]}"); else W+=("${C[@]}"); fi

affinity() {  # every daemon thread's CPU list, as "name=cpus"
  for d in "${ours[@]}" "${peers[@]}"; do
    printf '%s (pid %s):' "$d" "${pid[$d]}"
    for t in /proc/"${pid[$d]}"/task/*; do  # a thread may end meanwhile (the JIT's tiering thread does)
      awk -F'\t' '/^Name:/ {n = $2} /^Cpus_allowed_list:/ {c = $2} END {gsub(/ /, "_", n); if (c != "") printf " %s=%s", n, c}' \
        "$t/status" 2>/dev/null || true
    done
    echo
  done
}
{
  echo "kernel $(uname -r), $(nproc) CPUs"
  echo "daemon threads after 'taskset -c 0 ublksharp add':"; affinity
  if [ ${#pin[@]} -gt 0 ]; then
    # The queue thread re-pins itself to GET_QUEUE_AFFINITY (all CPUs for one queue): force CPU 0
    # on every thread, and keep the kernel's unbound workqueues (loop's workers) on CPU 0 too.
    for d in "${ours[@]}" "${peers[@]}"; do taskset -a -p -c 0 "${pid[$d]}" >/dev/null; done
    echo 1 >/sys/devices/virtual/workqueue/cpumask
    echo "after 'taskset -a -p -c 0 PID':"; affinity
    echo "unbound workqueue cpumask: $(cat /sys/devices/virtual/workqueue/cpumask)"
  fi
} | tee "$out/affinity.txt"

sample() {  # busy jiffies of all CPUs and of CPU 0 (the servers' CPU), jiffies of daemon $1, uptime
  awk '/^cpu0? / {printf "%d ", $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
  echo "$(if [ -n "$1" ]; then awk '{print $14 + $15}' "/proc/$1/stat"; else echo 0; fi) $(cut -d' ' -f1 /proc/uptime)"
}

fio_run() {  # device rw bs qd runtime ramp output [more fio options]
  "${fio[@]}" --name=vm-fio --filename="${dev[$1]}" --rw="$2" --bs="$3" --iodepth="$4" --ioengine="$engine" \
    --direct=1 --runtime="$5" --ramp_time="$6" --time_based --output-format=json --output="$7" "${@:8}"
}
cd /tmp  # fio's exec_prerun leaves its output file in the working directory
run() {  # rep workload device rw bs qd
  local f=$out/$1-$2-$3.json p=${pid[$3]:-} a b fp i=0
  rm -f /tmp/vm-fio.go
  # Each run starts clean: no run pays for writing back what the one before it left dirty.
  sync
  fio_run "$3" "$4" "$5" "$6" "$rt" 1 "$f" --exec_prerun="touch /tmp/vm-fio.go" & fp=$!
  # fio's start-up takes 1-3 s under TCG: sample CPU from 0.5 s after the ramp to 0.5 s before the end.
  while [ ! -e /tmp/vm-fio.go ] && kill -0 $fp 2>/dev/null && [ $((i += 1)) -lt 600 ]; do sleep 0.05; done
  sleep 1.5; a=$(sample "$p"); sleep "$((rt > 2 ? rt - 1 : 1))"; b=$(sample "$p")
  [ -z "$p" ] || echo "load $3 $(rss "$p")" >>"$out/rss.txt"  # the daemon's RSS under this load
  wait $fp
  echo "$1 $2 $3 $a $b" >>"$out/runs.txt"
  log "rep $1 $2 $3: $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(round(j["read"]["iops"] + j["write"]["iops"]), "IOPS")' "$f")"
}

# The profile: CPU time of each daemon's threads, io_uring's io-wq workers (iou-wrk-*, where the
# kernel punts IO it cannot do inline) summed as one. Sampled before the warm-up and after the
# runs; the host reports the difference (start-up's JIT under TCG is not the IO path's).
threads() {  # file
  local d
  for d in "${ours[@]}" "${peers[@]}"; do
    python3 - "$d" "${pid[$d]}" >>"$1" <<'PY'
import collections, glob, re, sys
dev, pid = sys.argv[1:]
ticks = collections.Counter()
for t in glob.glob(f"/proc/{pid}/task/*"):
    try:
        name = re.sub(r"^iou-wrk-\d+$", "iou-wrk", open(f"{t}/comm").read().strip()).replace(" ", "_")
        f = open(f"{t}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue  # the thread ended meanwhile
    ticks[name] += int(f[11]) + int(f[12])  # utime + stime
for name, n in ticks.most_common():
    print(dev, name, n)
PY
  done
}
threads "$out/threads0.txt"
printf 'hz %s\ncpus %s\nkernel %s\n' "$(getconf CLK_TCK)" "$(nproc)" "$(uname -r)" >"$out/meta.txt"
# Warm-up, not recorded: the daemons' JIT tiers and qemu's translation cache fill here, not in rep 1.
for d in "${!dev[@]}"; do fio_run "$d" randread 4k 64 2 0 /dev/null; done
start=$(date +%s)
for rep in $(seq "$reps"); do
  for w in "${W[@]}"; do
    read -r name rw bs qd devs <<<"$w"
    read -ra devs <<<"$devs"
    k=$((rep % ${#devs[@]}))
    for d in "${devs[@]:k}" "${devs[@]:0:k}"; do run "$rep" "$name" "$d" "$rw" "$bs" "$qd"; done
  done
done
log "fio matrix took $(($(date +%s) - start)) s"
echo "after the runs:" >>"$out/affinity.txt"; affinity >>"$out/affinity.txt"
threads "$out/threads.txt"
# No teardown: the guest is thrown away when this returns.
