#!/usr/bin/env bash
# Runs in the guest (bench/vs-build.sh): a null device from each build (OUT/old/ublksharp and
# OUT/new/ublksharp), 4k randread at qd1 and qd64, REPS interleaved repetitions (order alternated),
# every daemon pinned to CPU 0 and fio to CPU 1. One line per run into OUT/runs.txt: rep workload
# build iops p50_us p99_us daemon_user_us_per_io daemon_kernel_us_per_io. Then perf profiles of the
# new build's queue thread at each depth into OUT/profile-qdN.txt.
set -euo pipefail
out=$1 reps=$2 rt=$3
log() { echo "vs-build-guest: $*" >&2; }
[ "$(nproc)" -ge 2 ] || { log "needs 2 CPUs"; exit 1; }
declare -A dev pid
for b in old new; do
  dev[$b]=$(taskset -c 0 "$out/$b/ublksharp" add -t null --size 1G -q 1 -d 128) || { log "$b: add failed"; exit 1; }
  pid[$b]=$(grep -o '"pid": *[0-9]*' "/run/ublksharp/${dev[$b]#/dev/ublkb}.json" | grep -o '[0-9]*$')
  taskset -a -p -c 0 "${pid[$b]}" >/dev/null
  echo none >"/sys/block/${dev[$b]#/dev/}/queue/scheduler"
done
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }  # the daemon's user and kernel ticks
fio_run() {  # device qd runtime json
  taskset -c 1 fio --name=vs --filename="$1" --rw=randread --bs=4k --iodepth="$2" --ioengine=io_uring --direct=1 \
    --size=1G --runtime="$3" --ramp_time=1 --time_based --output-format=json --output="$4" >/dev/null
}
run() {  # rep qd build
  local f=/tmp/vs-$1-$2-$3.json u0 s0 u1 s1
  read -r u0 s0 < <(cpu "${pid[$3]}")
  fio_run "${dev[$3]}" "$2" "$rt" "$f"
  read -r u1 s1 < <(cpu "${pid[$3]}")
  python3 - "$f" "$1" "null4k-qd$2" "$3" "$((u1 - u0))" "$((s1 - s0))" "$hz" "$rt" >>"$out/runs.txt" <<'PY'
import json, sys
f, rep, name, b, u, s, hz, rt = sys.argv[1:]
io = json.load(open(f))["jobs"][0]["read"]
pct = io["clat_ns"].get("percentile", {})
# The daemon's CPU over the run (its ramp second included), per IO.
ios = max(1, io["total_ios"] * (int(rt) + 1) / int(rt))
per = lambda t: round(int(t) / int(hz) * 1e6 / ios, 2)
print(rep, name, b, round(io["iops"]), round(pct.get("50.000000", 0) / 1000, 1), round(pct.get("99.000000", 0) / 1000, 1), per(u), per(s))
PY
  rm -f "$f"
  log "$(tail -1 "$out/runs.txt")"
}
# Warm-up: the page tables, fio's start and the scheduler, for both.
for b in old new; do fio_run "${dev[$b]}" 64 2 /dev/null; done
for rep in $(seq 1 "$reps"); do
  order=(old new); [ $((rep % 2)) = 0 ] && order=(new old)
  for qd in 1 64; do for b in "${order[@]}"; do run "$rep" "$qd" "$b"; done; done
done
# Where the new build's queue thread spends its time: cpu-clock samples of the whole guest while fio
# runs, then the queue thread's share, split by user/kernel and by symbol.
for qd in 1 64; do
  taskset -c 1 fio --name=prof --filename="${dev[new]}" --rw=randread --bs=4k --iodepth=$qd --ioengine=io_uring --direct=1 \
    --size=1G --runtime=$((rt + 4)) --time_based --output-format=terse >/tmp/prof.fio &
  fp=$!
  sleep 2
  perf record -q -F 1999 -a -o /tmp/perf.data -- sleep "$rt" 2>/dev/null
  wait $fp
  ios=$(awk -F';' '{print $8}' /tmp/prof.fio)
  {
    echo "4k randread qd$qd: $ios IOPS under perf; samples by thread (all CPUs):"
    perf report -i /tmp/perf.data --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep . | head -6
    echo "ublk-q0 (the queue thread), as shares of its own samples, by binary ([kernel.kallsyms] is the kernel):"
    perf report -i /tmp/perf.data --no-children --comm ublk-q0 --percentage relative --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep . | head -6
    echo "ublk-q0, top symbols ([k] kernel, [.] user):"
    perf report -i /tmp/perf.data --no-children --comm ublk-q0 --percentage relative --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep . | head -25
  } >"$out/profile-qd$qd.txt"
done
for b in old new; do "$out/$b/ublksharp" del -n "${dev[$b]#/dev/ublkb}"; done
