#!/usr/bin/env bash
# The binding benchmark: UblkSharp's managed io_uring against liburing in C, same loops, same
# machine, interleaved repetitions; prints each figure and the median ratio. With --out DIR it also
# writes DIR/binding.json (the row shape bench/run.sh reads).
# usage: bench/binding.sh [REPS] [SECONDS] [--out DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pos=() json=''
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || { echo "usage: bench/binding.sh [REPS] [SECONDS] [--out DIR]" >&2; exit 2; }
      mkdir -p "$2"; json=$2/binding.json; shift 2;;
    *) pos+=("$1"); shift;;
  esac
done
reps=${pos[0]:-3}; secs=${pos[1]:-2}
[[ $reps =~ ^[1-9][0-9]*$ && $secs =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "usage: bench/binding.sh [REPS] [SECONDS] [--out DIR]" >&2; exit 2; }
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
python3 - "$out/results" "$json" "$(dpkg-query -W -f='${Version}' liburing-dev)" <<'PY'
import json, sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
# Per CPU-second is what the bar applies to: a shared host's other load steals wall-clock time from
# whichever side runs at that moment, not CPU time. Per wall-clock second is shown beside it.
CASES = {"nop_batch32_ops_per_cpu_s": ("io_uring NOP, batches of 32", "ops/CPU-s", 0.95),
         "nop_batch32_ops_per_s": ("io_uring NOP, batches of 32 (wall clock)", "ops/s", None),
         "read4k_qd32_ops_per_cpu_s": ("io_uring 4k read tmpfs qd32", "ops/CPU-s", 0.95),
         "read4k_qd32_ops_per_s": ("io_uring 4k read tmpfs qd32 (wall clock)", "ops/s", None)}
section = {"section": "binding", "note": f"managed io_uring binding vs liburing {sys.argv[3]} in C, same loops; "
           "median of per-repetition ratios", "rows": []}
for metric in sorted({r[1] for r in rows}, key=lambda m: list(CASES).index(m) if m in CASES else len(CASES)):
    ours = [float(r[2]) for r in rows if r[0] == "ublksharp" and r[1] == metric]
    peer = [float(r[2]) for r in rows if r[0] == "liburing" and r[1] == metric]
    ratios = [a / b for a, b in zip(ours, peer)]
    print(f"{metric:26} ublksharp {statistics.median(ours)/1e6:8.3f} M/s  liburing {statistics.median(peer)/1e6:8.3f} M/s  ratio {statistics.median(ratios):.3f}  (runs: {', '.join(f'{r:.3f}' for r in ratios)})")
    case, unit, bar = CASES.get(metric, (metric, "ops/s", None))
    section["rows"].append({"case": case, "unit": unit,
                            "ours": {"name": "UblkSharp binding", "value": statistics.median(ours), "runs": ours},
                            "peers": [{"name": "liburing", "value": statistics.median(peer), "runs": peer,
                                       "ratio": statistics.median(ratios), "ratio_runs": ratios}],
                            "bar": {"liburing": bar} if bar else {}})
if sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(section, f, indent=1)
PY
