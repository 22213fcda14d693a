#!/usr/bin/env bash
# NBD servers head to head with fio's nbd engine (libnbd), over Unix sockets, on the same data:
#   ours-mem   ublksharp serve -t mem          vs  nbdkit     nbdkit memory plugin
#   ours-loop  ublksharp serve -t loop FILE    vs  qemu-nbd   qemu-nbd on the same kind of FILE (tmpfs)
# Every export is filled with the same random image first. Workloads: 4k random read and write at
# queue depth 32, 128k sequential read and write at depth 32. Each repetition runs every
# (workload, server) pair once, interleaved, so drift in machine load hits all servers alike; the
# report is the median over repetitions, with ratios, and the servers' CPU time per IO.
# Writes DIR/report.md (table) and DIR/nbd.json (rows for the benchmark suite). The defaults take
# about 3-4 minutes; --quick (one repetition) about a minute and a half.
#
# usage: bench/nbd.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE] [--quick]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=/tmp/ublksharp-bench-nbd-$(date +%Y%m%d-%H%M%S)
reps=3 seconds=2 size=256M
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2;;
    --reps) reps=$2; shift 2;;
    --seconds) seconds=$2; shift 2;;
    --size) size=$2; shift 2;;
    --quick) reps=1; shift;;
    *) echo "usage: bench/nbd.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE] [--quick]" >&2; exit 2;;
  esac
done
for t in fio nbdkit qemu-nbd nbdcopy python3 dotnet; do
  command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t is missing (apt-get install -y fio nbdkit qemu-utils libnbd-bin)" >&2; exit 1; }
done
mkdir -p "$out"
work=$(mktemp -d /dev/shm/ublksharp-bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

dotnet build "$root/src/UblkSharp.Cli" -c Release -nologo -v quiet >/dev/null
cli="$root/src/UblkSharp.Cli/bin/Release/net10.0/UblkSharp.Cli.dll"

# The same random image for everyone; the file-backed servers get their own copies on tmpfs.
head -c "$(numfmt --from=iec "$size")" /dev/urandom >"$work/data.img"
cp "$work/data.img" "$work/ours.img"
cp "$work/data.img" "$work/qemu.img"

declare -A sock pid
start() { # name command...
  local name=$1; shift
  sock[$name]=$work/$name.sock
  "$@" >"$out/$name.log" 2>&1 &
  pid[$name]=$!; pids+=("$!")
  # Ready means accepting: a socket file exists from bind(), before listen().
  for _ in $(seq 400); do [ -S "${sock[$name]}" ] && nbdinfo --size "nbd+unix:///?socket=${sock[$name]}" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "bench/nbd.sh: $name did not start; its log:" >&2; cat "$out/$name.log" >&2; exit 1
}
start ours-mem dotnet "$cli" serve -t mem --size "$size" --listen "unix://$work/ours-mem.sock"
start ours-loop dotnet "$cli" serve -t loop -f "$work/ours.img" --listen "unix://$work/ours-loop.sock"
start nbdkit nbdkit -f -U "$work/nbdkit.sock" memory "$size"
start qemu-nbd qemu-nbd -f raw -t -e 8 -x '' -k "$work/qemu-nbd.sock" "$work/qemu.img"
servers=(ours-mem nbdkit ours-loop qemu-nbd)
for s in ours-mem nbdkit; do nbdcopy "$work/data.img" "nbd+unix:///?socket=${sock[$s]}"; done

workloads=("randread 4k" "randwrite 4k" "read 128k" "write 128k")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results=$out/results.csv
echo "rep,workload,server,iops,mib_s,server_cpu_us_per_io,p50_us,p99_us" >"$results"
for rep in $(seq "$reps"); do
  for w in "${workloads[@]}"; do
    read -r rw bs <<<"$w"
    for s in "${servers[@]}"; do
      before=$(cpu_ticks "${pid[$s]}")
      fio --name=nbd --ioengine=nbd --uri="nbd+unix:///?socket=${sock[$s]}" --rw="$rw" --bs="$bs" --iodepth=32 \
        --size="$size" --time_based --runtime="$seconds" --ramp_time=1 --output-format=json --output="$out/fio-$rep-$rw-$bs-$s.json" >/dev/null
      after=$(cpu_ticks "${pid[$s]}")
      python3 - "$out/fio-$rep-$rw-$bs-$s.json" "$rep" "$rw $bs" "$s" "$((after - before))" "$(getconf CLK_TCK)" "$seconds" >>"$results" <<'EOF'
import json, sys
path, rep, workload, server, ticks, hz, seconds = sys.argv[1:]
text = open(path).read()
job = json.loads(text[text.index('{'):])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
ios = side["total_ios"]
cpu_us = int(ticks) / int(hz) * 1e6
# CPU time covers the ramp too: scale the IOs of the measured window to the whole run.
ios_all = ios * (float(seconds) + 1) / float(seconds)
pct = side["clat_ns"].get("percentile", {})
p50, p99 = pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000
print(f"{rep},{workload},{server},{side['iops']:.0f},{side['bw_bytes'] / 2**20:.1f},{cpu_us / ios_all if ios_all else 0:.1f},{p50:.1f},{p99:.1f}")
EOF
      echo "rep $rep: $rw $bs $s: $(tail -1 "$results" | cut -d, -f4) IOPS" >&2
    done
  done
done

python3 - "$results" "$out/report.md" "$out/nbd.json" <<'EOF'
import csv, json, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med, lat = {}, {}
for w in dict.fromkeys(r["workload"] for r in rows):
    for s in dict.fromkeys(r["server"] for r in rows):
        sel = [r for r in rows if r["workload"] == w and r["server"] == s]
        med[w, s] = (statistics.median(float(r["iops"]) for r in sel), statistics.median(float(r["mib_s"]) for r in sel),
                     statistics.median(float(r["server_cpu_us_per_io"]) for r in sel))
        lat[w, s] = (statistics.median(float(r["p50_us"]) for r in sel), statistics.median(float(r["p99_us"]) for r in sel))
lines = ["| workload | ours-mem | nbdkit (memory) | ours ÷ nbdkit | ours-loop | qemu-nbd | ours-loop ÷ qemu-nbd | ours-mem ÷ qemu-nbd |",
         "|---|---|---|---|---|---|---|---|"]
def cell(w, s):
    iops, mib, cpu = med[w, s]
    return f"{iops:,.0f} IOPS ({mib:,.0f} MiB/s, {cpu:.1f} µs CPU/IO)"
for w in dict.fromkeys(r["workload"] for r in rows):
    lines.append(f"| {w} qd32 | {cell(w, 'ours-mem')} | {cell(w, 'nbdkit')} | **{med[w, 'ours-mem'][0] / med[w, 'nbdkit'][0]:.2f}×** | "
                 f"{cell(w, 'ours-loop')} | {cell(w, 'qemu-nbd')} | **{med[w, 'ours-loop'][0] / med[w, 'qemu-nbd'][0]:.2f}×** | "
                 f"{med[w, 'ours-mem'][0] / med[w, 'qemu-nbd'][0]:.2f}× |")
reps = len({r["rep"] for r in rows})
text = "\n".join(lines) + f"\n\nMedians of {reps} interleaved repetitions; fio nbd engine, 1 job (1 connection), iodepth 32, Unix sockets; " \
       "CPU/IO is the server process's user+system time per IO.\n"
open(sys.argv[2], "w").write(text)
print(text)

# For the benchmark suite: per workload, ours over memory vs nbdkit's memory plugin, and ours over
# a file vs qemu-nbd over the same kind of file. The bars (issue 5) apply at 4k.
names = {"ours-mem": "ublksharp serve -t mem", "nbdkit": "nbdkit memory",
         "ours-loop": "ublksharp serve -t loop (tmpfs file)", "qemu-nbd": "qemu-nbd (tmpfs file)"}
def entry(w, s):
    return {"name": names[s], "value": round(med[w, s][0]), "p50_us": lat[w, s][0], "p99_us": lat[w, s][1]}
def case(w):
    rw, bs = w.split()
    return f"{bs} {rw} qd32" if bs == "4k" else f"{bs} sequential {rw} qd32"
out_rows = []
for w in dict.fromkeys(r["workload"] for r in rows):
    small = w.endswith(" 4k")
    for ours, peer, bar, suffix in (("ours-mem", "nbdkit", 1.0, ""), ("ours-loop", "qemu-nbd", 1.5, ", file")):
        row = {"case": case(w) + suffix, "unit": "IOPS", "ours": entry(w, ours),
               "peers": [dict(entry(w, peer), ratio=round(med[w, ours][0] / med[w, peer][0], 3))]}
        # Also against qemu-nbd: ours over memory (the issue's "same data" comparison at 4k).
        if ours == "ours-mem":
            row["peers"].append(dict(entry(w, "qemu-nbd"), ratio=round(med[w, ours][0] / med[w, "qemu-nbd"][0], 3)))
        if small:
            row["bar"] = {names[peer]: bar} if ours == "ours-loop" else {"nbdkit memory": 1.0, names["qemu-nbd"]: 1.5}
        out_rows.append(row)
json.dump({"section": "nbd", "repetitions": reps, "rows": out_rows}, open(sys.argv[3], "w"), indent=1)
EOF
echo "results: $out (results.csv, report.md, nbd.json, fio JSON, server logs)" >&2
