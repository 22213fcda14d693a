#!/usr/bin/env bash
# Our null target against an earlier build of ours, in one VM boot (issue 13's "the 6.12 path gets
# faster too"): publishes REV's CLI and this tree's, both native (tools/publish-cli, as users run
# them), boots Linux 6.12 (or --kernel 7.3), and runs bench/vs-build-guest.sh: 4k randread at qd1
# and qd64 on a null device of each build, REPS interleaved repetitions, every daemon on CPU 0 and
# fio on CPU 1. Then a perf profile of this tree's queue thread at each depth says where its time
# goes per IO (perf's cpu-clock samples, split user/kernel and by symbol). Prints medians, the ratio
# new/old per workload and the profiles; --out DIR keeps runs.txt, summary.txt and profile-*.txt.
# usage: bench/vs-build.sh REV [--reps N] [--runtime SECONDS] [--kernel 6.12|7.3] [--out DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n 's/^# usage: //p' "$0" >&2; exit 2; }
[ $# -ge 1 ] && [[ $1 != -* ]] || usage
rev=$1 reps=3 runtime=8 kernel=6.12 out=''; shift
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || usage
  case $1 in --reps) reps=$2;; --runtime) runtime=$2;; --kernel) kernel=$2;; --out) out=$2;; *) usage;; esac
  shift 2
done
[[ $reps =~ ^[1-9][0-9]*$ && $runtime =~ ^[0-9]+$ && $runtime -ge 3 && $kernel =~ ^(6\.12|7\.3)$ ]] ||
  { echo "vs-build: --reps >= 1, --runtime >= 3, --kernel 6.12 or 7.3" >&2; exit 2; }
old=$(git -C "$root" rev-parse --verify --quiet "$rev^{commit}") || { echo "vs-build: $rev is not a commit here" >&2; exit 2; }
command -v perf >/dev/null || { echo "vs-build: perf is missing (apt-get install -y linux-perf)" >&2; exit 1; }
raw=$(mktemp -d /var/tmp/vs-build.XXXXXX) wt=$(mktemp -d /var/tmp/vs-build-src.XXXXXX)
trap 'git -C "$root" worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"; rm -rf "$raw"' EXIT
echo "vs-build: publishing ${old:0:12} and this tree" >&2
git -C "$root" worktree add -q --detach "$wt" "$old"
"$wt/tools/publish-cli" "$raw/old" >/dev/null
"$root/tools/publish-cli" "$raw/new" >/dev/null
# perf finds the native CLI's symbols through its debug link, which names the file before the rename.
cp "$raw/new/ublksharp.dbg" "$raw/new/UblkSharp.Cli.dbg"
# 4 fio runs a repetition, each about runtime + 5 s under TCG, plus 2 profiles, boot and set-up.
"$root/tools/ublksharp-vm" -k "$kernel" -t $((reps * 4 * (runtime + 20) + 400)) --rw "$raw" -- \
  "bash $root/bench/vs-build-guest.sh $raw $reps $runtime"
python3 - "$raw/runs.txt" "${old:0:12}" <<'PY' | tee "$raw/summary.txt"
import collections, statistics as st, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    rep, name, build, *v = line.split()
    runs[(name, build)].append([float(x) for x in v])
med = {k: [st.median(c) for c in zip(*v)] for k, v in runs.items()}
print(f"medians of {len(next(iter(runs.values())))} runs; IOPS, p50/p99 clat (us), daemon CPU us per IO (user + kernel)")
for n in ("null4k-qd1", "null4k-qd64"):
    for b, label in (("old", sys.argv[2]), ("new", "this tree")):
        i, p50, p99, usr, sysc = med[(n, b)]
        print(f"  {n:12} {label:12} {i:8.0f} IOPS  p50 {p50:7.1f}  p99 {p99:7.1f}  daemon {usr:6.2f} + {sysc:6.2f} us/IO")
    print(f"  {n:12} this tree vs {sys.argv[2]}: {med[(n, 'new')][0] / med[(n, 'old')][0]:.2f}x IOPS")
PY
for f in "$raw"/profile-*.txt; do echo "== ${f##*/}"; cat "$f"; done
[ -z "$out" ] || { mkdir -p "$out"; cp "$raw"/runs.txt "$raw"/summary.txt "$raw"/profile-*.txt "$out/"; }
