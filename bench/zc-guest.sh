#!/usr/bin/env bash
# Runs in the guest (bench/zc.sh boots Linux 7.3): the loop target over a RAM block device (brd's
# /dev/ram0, opened O_DIRECT) with zero copy on and off, against the kernel loop driver over the same
# device with direct IO; the null target with BATCH_IO on and off; the tmpfs rows (a file on the
# guest's tmpfs: the loop target as auto serves it, through its mapping, and on the ring with zero
# copy, against kernel loop on the same file); and the cow target over a tmpfs backing file with zero
# copy on and off; REPS interleaved repetitions of each workload. One line per run into
# OUT/runs.txt: rep workload device iops MiB/s p50_us p99_us cpu_us_per_io. ROWS (comma-separated
# workload names, or all) picks workloads; PROFILE=1 then writes OUT/profile-ROW-DEVICE.txt for the
# devices of the bar rows: a perf profile of the whole guest while the device serves the workload.
set -euo pipefail
out=$1 reps=$2 rt=$3 cli=$4 rows=${5:-all} profile=${6:-0}
picked() { [ "$rows" = all ] || [[ ,$rows, == *,$1,* ]]; }
log() { echo "zc-guest: $*" >&2; }
[ -b /dev/ram0 ] || { log "no /dev/ram0 (brd)"; exit 1; }
declare -A dev
dev[kloop]=$(losetup --direct-io=on -f --show /dev/ram0)
add() {  # name args...
  local name=$1 path; shift
  path=$("$cli" add -q 1 -d 128 --max-io 1M "$@") || { log "add $*: failed"; exit 1; }
  dev[$name]=$path
  "$cli" list | grep -F "$path" >&2
}
loop=(-t loop -f /dev/ram0 --direct-io)
add ublk-zc "${loop[@]}" --zero-copy on --batch off
add ublk-zcb "${loop[@]}" --zero-copy on --batch on
add ublk-copy "${loop[@]}" --zero-copy off --batch off
add null-batch -t null --size 1G --batch on
add null-nobatch -t null --size 1G --batch off
tmpfile=/tmp/zc-tmpfs.img
dd if=/dev/urandom of=$tmpfile bs=1M count=256 status=none
dev[kloop-tmpfs]=$(losetup -f --show $tmpfile)
add ublk-tmpfs -t loop -f $tmpfile
add ublk-tmpfs-zc -t loop -f $tmpfile --io ring --zero-copy on
# cow: a fresh overlay over the tmpfs file, so reads come from the backing file through the target.
add cow-zc -t cow -f /tmp/zc-a.cow --create --backing $tmpfile --io ring --zero-copy on
add cow-copy -t cow -f /tmp/zc-b.cow --create --backing $tmpfile --io ring --zero-copy off
for d in "${!dev[@]}"; do echo none >"/sys/block/${dev[$d]#/dev/}/queue/scheduler" 2>/dev/null || true; done
# The device's data first: reads of a never-written brd page cost nothing, which would flatter reads.
dd if=/dev/urandom of=/dev/ram0 bs=1M count=512 oflag=direct status=none
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
run() {  # rep name device rw bs qd
  local f=/tmp/zc-$1-$2-$3.json a b
  a=$(busy)
  fio --name=zc --filename="${dev[$3]}" --rw="$4" --bs="$5" --iodepth="$6" --ioengine=io_uring --direct=1 --size=256M \
    --runtime="$rt" --ramp_time=1 --time_based --output-format=json --output="$f" >/dev/null
  b=$(busy)
  python3 - "$f" "$1" "$2" "$3" "$((b - a))" "$(getconf CLK_TCK)" "$rt" >>"$out/runs.txt" <<'PY'
import json, sys
f, rep, name, d, jiffies, hz, rt = sys.argv[1:]
j = json.load(open(f))["jobs"][0]
io = j["read"] if j["read"]["total_ios"] else j["write"]
pct = io["clat_ns"].get("percentile", {})
ios = io["total_ios"]
# CPU of the whole guest over the run (ramp included), per IO: the daemon's, the kernel's and fio's.
cpu = int(jiffies) / int(hz) * 1e6 / max(1, ios * (int(rt) + 1) / int(rt))
print(rep, name, d, round(io["iops"]), round(io["bw_bytes"] / 2**20, 1), round(pct.get("50.000000", 0) / 1000, 1),
      round(pct.get("99.000000", 0) / 1000, 1), round(cpu, 2))
PY
  rm -f "$f"
  log "$(tail -1 "$out/runs.txt")"
}
W=("sr128k-qd16 read 128k 16 ublk-zc ublk-zcb ublk-copy kloop" "sw128k-qd16 write 128k 16 ublk-zc ublk-zcb ublk-copy kloop"
   "rr4k-qd64 randread 4k 64 ublk-zc ublk-zcb ublk-copy kloop" "null4k-qd64 randread 4k 64 null-batch null-nobatch"
   "null4k-qd1 randread 4k 1 null-batch null-nobatch"
   "tmpfs-sr128k read 128k 16 ublk-tmpfs ublk-tmpfs-zc kloop-tmpfs" "tmpfs-rr4k randread 4k 64 ublk-tmpfs ublk-tmpfs-zc kloop-tmpfs"
   "cow-sr128k read 128k 16 cow-zc cow-copy" "cow-sw128k write 128k 16 cow-zc cow-copy")
for d in "${!dev[@]}"; do fio --name=warm --filename="${dev[$d]}" --rw=randread --bs=4k --iodepth=64 --ioengine=io_uring --direct=1 --runtime=2 --time_based >/dev/null; done
for rep in $(seq "$reps"); do
  for w in "${W[@]}"; do
    read -r name rw bs qd devs <<<"$w"
    picked "$name" || continue
    read -ra devs <<<"$devs"
    k=$((rep % ${#devs[@]}))
    for d in "${devs[@]:k}" "${devs[@]:0:k}"; do run "$rep" "$name" "$d" "$rw" "$bs" "$qd"; done
  done
done
# Where the time goes in the rows with a bar: cpu-clock samples of the whole guest (both CPUs, idle
# included as swapper) while one device serves the workload, by thread and by symbol.
P=("sr128k-qd16 read 128k 16 ublk-zc kloop" "rr4k-qd64 randread 4k 64 ublk-zc ublk-zcb kloop"
   "null4k-qd64 randread 4k 64 null-batch null-nobatch")
if [ "$profile" = 1 ]; then
  set +o pipefail  # head ends perf report's output early (SIGPIPE), which is not a failure here
  for p in "${P[@]}"; do
    read -r name rw bs qd devs <<<"$p"
    picked "$name" || continue
    for d in $devs; do
      fio --name=prof --filename="${dev[$d]}" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine=io_uring --direct=1 \
        --size=256M --runtime=$((rt + 4)) --time_based --output-format=json --output=/tmp/prof.json >/dev/null &
      fp=$!
      sleep 2
      perf record -q -F 999 -a -o /tmp/perf.data -- sleep "$rt" 2>/dev/null
      wait $fp
      {
        python3 - /tmp/prof.json "$name" "$d" <<'PY2'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
io = j["read"] if j["read"]["total_ios"] else j["write"]
print(f"{sys.argv[2]} on {sys.argv[3]}: {io['iops']:.0f} IOPS, {io['bw_bytes'] / 2**20:.0f} MiB/s under perf")
PY2
        echo "samples by thread (both CPUs; swapper is idle):"
        perf report -i /tmp/perf.data --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep . | head -8
        echo "top symbols by thread ([k] kernel, [.] user):"
        perf report -i /tmp/perf.data --no-children --sort comm,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep . | head -25
      } >"$out/profile-$name-$d.txt"
      log "profiled $name on $d"
    done
  done
fi
"$cli" del --all >&2
losetup -d "${dev[kloop]}" "${dev[kloop-tmpfs]}"
rm -f $tmpfile /tmp/zc-a.cow /tmp/zc-b.cow
