#!/usr/bin/env bash
# The whole benchmark suite in one command. Every figure is a ratio against a peer measured in the
# same run (the same VM boot for the ublk devices), median of 3+ interleaved repetitions:
#   vm       ublk null/loop/mem targets vs kernel loop over a tmpfs file and fio on the file
#            (bench/vm-fio.sh; UBLKSRV=/path/to/ublk adds a ublksrv peer), plus the daemons' RSS
#   binding  the io_uring binding vs liburing in C (bench/binding.sh)
#   micro    BenchmarkDotNet over the per-IO hot path, bytes allocated per IO (bar: 0)
#   nbd      the NBD server vs nbdkit and qemu-nbd (bench/nbd.sh)
#   nbd-tls  the NBD server over TLS vs qemu-nbd over TLS, same certificates (bench/nbd-tls.sh)
#   rbd      serve -t rbd vs qemu-nbd rbd: and fio's rbd engine, on a throwaway Ceph cluster (bench/rbd.sh)
# Prints one table and writes DIR/bench.json, DIR/bench.md and DIR/bench.svg (bench/report.py).
# --update-readme also refreshes README.md's Performance table and docs/bench/latest.{svg,json}.
# usage: bench/run.sh [--quick] [--out DIR] [--skip vm,binding,micro,nbd,nbd-tls,rbd] [--update-readme]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
quick=0 out=/tmp/ublksharp-bench-$(date +%Y%m%d-%H%M%S) skip=, update=()
usage() { sed -n 's/^# usage: //p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; shift;;
    --update-readme) update=(--update-readme); shift;;
    --out|--skip) [ $# -ge 2 ] || usage; [ "$1" = --out ] && out=$2 || skip=,$2,; shift 2;;
    *) usage;;
  esac
done
mkdir -p "$out"; out=$(cd "$out" && pwd)
rm -f "$out/missing.txt"
# The VM's fio runs are 3 s either way (each costs several more in fio start-up under TCG); the NBD
# section takes its own defaults' 3 repetitions of 2 s (about 3-4 minutes), which --quick keeps too.
if [ "$quick" = 1 ]; then
  binding=(3 1) micro=(--quick) vm=(--reps 3 --runtime 3) nbd=(--reps 3 --seconds 2) rbd=(--reps 3 --seconds 3)
else
  binding=(5 2) micro=() vm=(--reps 3 --runtime 3) nbd=(--reps 3 --seconds 2) rbd=(--reps 3 --seconds 5)
fi
start=$(date +%s)
declare -A took
section() {  # name command...: runs one section; a failure is noted and the others still run
  local name=$1 t0 rc=0; shift
  if [[ $skip == *,$name,* ]]; then echo "$name: skipped (--skip)" >>"$out/missing.txt"; return; fi
  echo "=== $name: $*" >&2
  t0=$(date +%s)
  "$@" >"$out/$name.log" 2>&1 || rc=$?
  took[$name]=$(($(date +%s) - t0))
  tail -n 25 "$out/$name.log" >&2
  [ "$rc" = 0 ] || echo "$name: failed (exit $rc), see $out/$name.log" >>"$out/missing.txt"
  echo "=== $name: ${took[$name]} s" >&2
}

echo "bench/run.sh: results in $out" >&2
log=$(dotnet build "$root/src/UblkSharp.Cli" -c Release -nologo -v quiet 2>&1) &&
  log=$(dotnet build "$root/bench/UblkSharp.Bench" -c Release -nologo -v quiet 2>&1) || { echo "$log"; exit 1; }

section binding "$root/bench/binding.sh" "${binding[@]}" --out "$out"
rm -rf "$out/micro"
section micro dotnet "$root/bench/UblkSharp.Bench/bin/Release/net10.0/UblkSharp.Bench.dll" micro "${micro[@]}" --artifacts "$out/micro"
section vm "$root/bench/vm-fio.sh" --no-build "${vm[@]}" --out "$out/vm-fio.json"
# Linux 7.3: zero copy on and off against the kernel loop driver over brd (its figures stay in zc.log and zc/).
section zc "$root/bench/zc.sh" --reps 3 --out "$out/zc"
# nbd.sh, nbd-tls.sh and rbd.sh write DIR/NAME.json in the suite's row shape.
for name in nbd nbd-tls rbd; do
  rm -f "$out/$name.json"
  args=("${nbd[@]}"); [ $name = rbd ] && args=("${rbd[@]}")
  section $name "$root/bench/$name.sh" --out "$out/$name" "${args[@]}"
  if [ -f "$out/$name/$name.json" ]; then cp "$out/$name/$name.json" "$out/$name.json"
  elif [[ $skip != *,$name,* ]]; then echo "$name: bench/$name.sh wrote no $name.json" >>"$out/missing.txt"; fi
done

wall=$(($(date +%s) - start))
python3 -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], map(int, sys.argv[2::2])))))' \
  $(for k in "${!took[@]}"; do echo "$k ${took[$k]}"; done) >"$out/timings.json"
python3 "$root/bench/report.py" "$out" --wall "$wall" "${update[@]}"
