#!/usr/bin/env bash
# The binding benchmark: UblkSharp's managed io_uring against liburing in C, same loops, same
# machine, interleaved repetitions; prints each figure and the median ratio.
# usage: bench/binding.sh [REPS] [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=${1:-3}; secs=${2:-2}
if ! dpkg -s liburing-dev >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liburing-dev >/dev/null
fi
out=$(mktemp -d); trap 'rm -rf "$out" /dev/shm/ublksharp-bench.dat' EXIT
gcc -O2 -Wall -o "$out/liburing-bench" "$root/bench/peers/liburing-bench.c" -luring
dotnet build "$root/bench/UblkSharp.Bench" -c Release -nologo -v quiet >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
dll="$root/bench/UblkSharp.Bench/bin/Release/net10.0/UblkSharp.Bench.dll"
for i in $(seq "$reps"); do
  dotnet "$dll" binding --seconds "$secs" | sed 's/^/ublksharp /' >>"$out/results"
  "$out/liburing-bench" "$secs" | sed 's/^/liburing /' >>"$out/results"
done
python3 - "$out/results" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
for metric in sorted({r[1] for r in rows}):
    ours = [float(r[2]) for r in rows if r[0] == "ublksharp" and r[1] == metric]
    peer = [float(r[2]) for r in rows if r[0] == "liburing" and r[1] == metric]
    ratios = [a / b for a, b in zip(ours, peer)]
    print(f"{metric:24} ublksharp {statistics.median(ours)/1e6:8.3f} M/s  liburing {statistics.median(peer)/1e6:8.3f} M/s  ratio {statistics.median(ratios):.3f}  (runs: {', '.join(f'{r:.3f}' for r in ratios)})")
PY
