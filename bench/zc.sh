#!/usr/bin/env bash
# The zero-copy benchmark (issue 13's 7.3 section): one boot of Linux 7.3 (tools/ublksharp-vm -k 7.3)
# runs bench/zc-guest.sh, which measures the loop target over a RAM block device (brd, O_DIRECT) with
# zero copy (AUTO_BUF_REG) on and off, and with BATCH_IO, against the kernel loop driver with direct
# IO over the same device, the null target with BATCH_IO on and off, the loop target on a tmpfs file
# (as auto serves it, and zero copy on the ring) against kernel loop, and the cow target with zero
# copy on and off, in REPS interleaved repetitions. Prints medians (IOPS, MiB/s, p50/p99 completion latency,
# CPU per IO) and the ratios the issue's bars are about; --out DIR keeps runs.txt and summary.txt.
# --rows picks workloads by name (comma-separated, e.g. sr128k-qd16,rr4k-qd64,null4k-qd64). --profile
# then records a perf profile of the whole guest while each device of the bar rows serves its
# workload (after the timed runs, so it costs them nothing): samples by thread and the top symbols,
# one profile-ROW-DEVICE.txt each, printed and kept with --out.
# usage: bench/zc.sh [--reps N] [--runtime SECONDS] [--rows LIST] [--profile] [--out DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=3 runtime=5 out='' rows=all profile=0
all_rows=sr128k-qd16,sw128k-qd16,rr4k-qd64,null4k-qd64,null4k-qd1,tmpfs-sr128k,tmpfs-rr4k,cow-sr128k,cow-sw128k
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=1; shift; continue;;
    --reps|--runtime|--out|--rows) [ $# -ge 2 ] || { sed -n 's/^# usage: //p' "$0" >&2; exit 2; };;
    *) sed -n 's/^# usage: //p' "$0" >&2; exit 2;;
  esac
  case $1 in --reps) reps=$2;; --runtime) runtime=$2;; --out) out=$2;; --rows) rows=$2;; esac
  shift 2
done
[[ $reps =~ ^[1-9][0-9]*$ && $runtime =~ ^[0-9]+$ && $runtime -ge 3 ]] || { echo "zc: --reps >= 1, --runtime >= 3" >&2; exit 2; }
if [ "$rows" != all ]; then
  IFS=, read -ra picked <<<"$rows"
  for r in "${picked[@]}"; do
    [[ ,$all_rows, == *,$r,* ]] || { echo "zc: unknown row '$r' (rows: $all_rows)" >&2; exit 2; }
  done
fi
[ $profile = 0 ] || command -v perf >/dev/null || { echo "zc: --profile needs perf (apt-get install -y linux-perf)" >&2; exit 1; }
cli=$root/artifacts/cli/ublksharp
[ -x "$cli" ] || "$root/tools/publish-cli" "$root/artifacts/cli" >/dev/null
raw=$(mktemp -d /tmp/zc.XXXXXX); trap 'rm -rf "$raw"' EXIT
if [ $profile = 1 ]; then
  # perf finds the native CLI's symbols through its debug link, which names the file before the rename.
  cp "$cli" "$raw/ublksharp"; cp "$root/artifacts/cli/ublksharp.dbg" "$raw/UblkSharp.Cli.dbg"; cli=$raw/ublksharp
fi
# 26 fio runs a repetition, each about runtime + 4 s under TCG, plus boot, set-up, filling the disk and
# the profiles (7 at most, each about runtime + 60 s with perf's report under TCG).
"$root/tools/ublksharp-vm" -k 7.3 -t $((reps * 26 * (runtime + 20) + 600 + profile * 7 * (runtime + 90))) --rw "$raw" -- \
  "bash $root/bench/zc-guest.sh $raw $reps $runtime $cli $rows $profile" || vmrc=$?
# A run that failed part-way still reports the runs it finished.
[ -s "$raw/runs.txt" ] || { echo "zc: the guest recorded no runs (exit ${vmrc:-0})" >&2; exit 1; }
python3 - "$raw/runs.txt" <<'PY' | tee "$raw/summary.txt"
import collections, statistics as st, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    rep, name, dev, *v = line.split()
    runs[(name, dev)].append([float(x) for x in v])
med = {k: [st.median(c) for c in zip(*v)] for k, v in runs.items()}
names = sorted({n for n, _ in med}, key=["sr128k-qd16", "sw128k-qd16", "rr4k-qd64", "null4k-qd64", "null4k-qd1",
                                        "tmpfs-sr128k", "tmpfs-rr4k", "cow-sr128k", "cow-sw128k"].index)
print(f"medians of {len(next(iter(runs.values())))} runs; IOPS, MiB/s, p50/p99 clat (us), guest CPU us per IO")
for n in names:
    for d in ("ublk-zc", "ublk-zcb", "ublk-copy", "kloop", "null-batch", "null-nobatch", "ublk-tmpfs", "ublk-tmpfs-zc", "kloop-tmpfs", "cow-zc", "cow-copy"):
        if (n, d) in med:
            i, bw, p50, p99, cpu = med[(n, d)]
            print(f"  {n:12} {d:10} {i:8.0f} IOPS {bw:8.1f} MiB/s  p50 {p50:8.1f}  p99 {p99:8.1f}  cpu {cpu:7.2f}")
    z, zb, c, k, nb, nn = (med.get((n, d), [0])[0] for d in ("ublk-zc", "ublk-zcb", "ublk-copy", "kloop", "null-batch", "null-nobatch"))
    if z and c and k:
        print(f"  {n:12} zero copy vs kernel loop {z / k:.2f}x, vs copy {z / c:.2f}x; copy vs kernel loop {c / k:.2f}x")
    if zb and z and k:
        print(f"  {n:12} zero copy + batch vs kernel loop {zb / k:.2f}x, vs zero copy alone {zb / z:.2f}x")
    if nb and nn:
        print(f"  {n:12} null with batch vs without {nb / nn:.2f}x")
    t, tz, kt, cz, cc = (med.get((n, d), [0])[0] for d in ("ublk-tmpfs", "ublk-tmpfs-zc", "kloop-tmpfs", "cow-zc", "cow-copy"))
    if t and tz and kt:
        print(f"  {n:12} tmpfs: as auto serves it vs kernel loop {t / kt:.2f}x, zero copy on the ring vs kernel loop {tz / kt:.2f}x")
    if cz and cc:
        print(f"  {n:12} cow zero copy vs copy {cz / cc:.2f}x")
PY
for f in "$raw"/profile-*.txt; do [ -e "$f" ] && { echo; echo "== ${f##*/}"; cat "$f"; }; done
[ -z "$out" ] || { mkdir -p "$out"; cp "$raw/runs.txt" "$raw/summary.txt" "$out/"; cp "$raw"/profile-*.txt "$out/" 2>/dev/null || true; }
[ "${vmrc:-0}" = 0 ] || { echo "zc: the guest failed (exit $vmrc); the figures above are the runs it finished" >&2; exit 1; }
