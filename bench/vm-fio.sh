#!/usr/bin/env bash
# The device benchmark: one boot of tools/ublksharp-vm runs fio (bench/vm-fio-guest.sh) against our
# ublk targets and their peers on the same data -- the kernel loop driver over a tmpfs file, and fio
# on that file itself -- in interleaved repetitions. Prints medians of IOPS (MiB/s for 128k), p50/p99
# completion latency, CPU per IO and the ratio to each peer; writes the figures as JSON to --out (a
# file, or a directory to get vm-fio-DATE.json in; default /tmp, so nothing lands in the repo),
# with each daemon's RSS idle and under load.
# UBLKSRV=/path/to/ublk: a ublksrv binary (built by you; this script never builds fetched code)
# joins as a peer with its null and loop targets. It must run in the guest as it is (the guest
# sees the host's root read-only): a static build, or one whose libraries are installed.
# --only cow runs only the cow rows (cow vs loop over one backing file on ext4); --cow-args "ARGS"
# adds options to the cow device's `add` (e.g. "--writeback 1" or "--allocate 0"), to compare settings.
# usage: bench/vm-fio.sh [--reps N] [--runtime SECONDS] [--engine io_uring|libaio] [--out PATH]
#                   [--timeout SECONDS] [--no-build] [--only cow] [--cow-args ARGS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reps=3 runtime=5 engine=io_uring out=/tmp timeout='' build=1 only= cow_args=
usage() { sed -n 's/^# \(usage: \|  \)//p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0; shift; continue;;  # measure the CLI as built (e.g. while the tree is mid-edit)
    --reps|--runtime|--engine|--out|--timeout|--only|--cow-args) [ $# -ge 2 ] || usage;;
    *) usage;;
  esac
  case $1 in --reps) reps=$2;; --runtime) runtime=$2;; --engine) engine=$2;; --out) out=$2;; --timeout) timeout=$2;; --only) only=$2;; --cow-args) cow_args=$2;; esac
  shift 2
done
[[ $reps =~ ^[1-9][0-9]*$ && $runtime =~ ^[0-9]+$ && $runtime -ge 3 ]] || { echo "vm-fio: --reps >= 1, --runtime >= 3" >&2; exit 2; }
[[ $only =~ ^(|cow)$ ]] || { echo "vm-fio: --only cow is the one subset" >&2; exit 2; }
[ -d "$out" ] && out=$out/vm-fio-$(date +%Y%m%d-%H%M%S).json
# 19 fio runs a repetition (24 with ublksrv; 4 with --only cow), each about runtime + 3 s under TCG
# on a quiet host (several times that when it is busy), plus boot, device set-up and warm-up.
runs=$([ "$only" = cow ] && echo 4 || echo $((${UBLKSRV:+5} + 19)))
timeout=${timeout:-$((reps * runs * (runtime + 12) + 600))}

dll=$root/src/UblkSharp.Cli/bin/Release/net10.0/UblkSharp.Cli.dll
if [ ! -f "$dll" ] || { [ "$build" = 1 ] && [ -n "$(find "$root/src" -name '*.cs' -newer "$dll" -print -quit)" ]; }; then
  log=$(dotnet build "$root/src/UblkSharp.Cli" -c Release -nologo -v quiet 2>&1) || { echo "$log"; exit 1; }
fi
# The guest writes its results into a host temp dir shared read-write (the repo stays read-only).
raw=$(mktemp -d /tmp/vm-fio.XXXXXX); trap 'rm -rf "$raw"' EXIT
ublksrv=''
if [ -n "${UBLKSRV:-}" ]; then
  [ -x "$UBLKSRV" ] && [ -f "$UBLKSRV" ] || { echo "vm-fio: UBLKSRV=$UBLKSRV is not an executable file" >&2; exit 2; }
  # A copy in the shared directory: the guest's /tmp is its own, so a host path there would not show.
  cp "$UBLKSRV" "$raw/ublk"; ublksrv=$raw/ublk
else
  echo "vm-fio: UBLKSRV not set, so no ublksrv peer (UBLKSRV=/path/to/ublk adds one; it is never built here)"
fi
# The host's load is kept with the results: TCG figures move with whatever else the host runs.
load0=$(cut -d' ' -f1-3 /proc/loadavg) start=$(date +%s) rc=0
"$root/tools/ublksharp-vm" -t "$timeout" --rw "$raw" -- "ONLY=$only COW_ARGS='$cow_args' bash $root/bench/vm-fio-guest.sh $raw $reps $runtime $engine $ublksrv" || rc=$?
wall=$(($(date +%s) - start)) load1=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$rc" = 0 ] || echo "vm-fio: the guest failed (exit $rc); summarising what it finished" >&2

python3 - "$raw" "$out" "$wall" "$reps" "$runtime" "$engine" "$(nproc)" "$load0" "$load1" <<'PY'
import datetime, json, os, statistics as st, sys
raw, out, wall, reps, runtime, engine, ncpu, load0, load1 = sys.argv[1:]
wall, reps, runtime = int(wall), int(reps), int(runtime)
# (title, workload, ours, peers); workloads as in vm-fio-guest.sh. A peer run serves several cases.
# ublksrv-null / ublksrv-loop are there only when UBLKSRV was given.
CASES = [("null 4k randread qd1", "rr4k-qd1", "ublk-null", ["kloop", "file", "ublksrv-null"]),
         ("null 4k randread qd64", "rr4k-qd64", "ublk-null", ["kloop", "file", "ublksrv-null"]),
         ("loop 4k randread qd64", "rr4k-qd64", "ublk-loop", ["kloop", "ublksrv-loop"]),
         ("loop 4k randwrite qd64", "rw4k-qd64", "ublk-loop", ["kloop", "ublksrv-loop"]),
         ("loop 128k read qd16", "sr128k-qd16", "ublk-loop", ["kloop", "ublksrv-loop"]),
         ("loop 128k write qd16", "sw128k-qd16", "ublk-loop", ["kloop", "ublksrv-loop"]),
         ("mem 4k randread qd64", "rr4k-qd64", "ublk-mem", ["kloop"]),
         ("mem 4k randwrite qd64", "rw4k-qd64", "ublk-mem", ["kloop"]),
         # cow vs loop over the same backing file (on ext4, so both use their ring).
         ("cow 4k randread qd64", "rr4k-qd64", "ublk-cow", ["ublk-loop-fs"]),
         ("cow 4k randwrite qd64", "rw4k-qd64", "ublk-cow", ["ublk-loop-fs"])]
path = lambda name: os.path.join(raw, name)
read = lambda name: open(path(name)).read() if os.path.exists(path(name)) else ""
meta = dict(l.split(None, 1) for l in read("meta.txt").splitlines())
hz = float(meta.get("hz", 100))
runs = {}  # (workload, device) -> {rep: figures}
for line in read("runs.txt").splitlines():
    rep, wl, dev, b0, c0, d0, t0, b1, c1, d1, t1 = line.split()
    job = json.load(open(path(f"{rep}-{wl}-{dev}.json")))["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] >= job["write"]["io_bytes"] else job["write"]
    pct, iops, window = side["clat_ns"].get("percentile", {}), side["iops"], float(t1) - float(t0)
    per_io = lambda j0, j1: (int(j1) - int(j0)) / hz / window / iops * 1e6 if iops else None
    runs.setdefault((wl, dev), {})[int(rep)] = {
        "iops": iops, "mibs": side["bw"] / 1024, "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
        # CPU over a window of the steady part: all CPUs (fio included), CPU 0 alone (the server's
        # when pinned: our daemon or loop's workers), and our daemon's share of one CPU.
        "cpu_us_per_io": per_io(b0, b1), "cpu0_us_per_io": per_io(c0, c1),
        "daemon_cpu_pct": (int(d1) - int(d0)) / hz / window * 100 if dev.startswith("ublk") else None,
        # How much longer than asked the guest's sleep over that window took: TCG vCPUs starved by
        # other load on the host stretch it, and such runs measure the host more than the device.
        "stretch": window / max(runtime - 1, 1)}
med = lambda xs: st.median(xs) if xs else None
fmt = lambda x, spec: "-" if x is None else format(x, spec)
KEYS = ("iops", "mibs", "p50_us", "p99_us", "cpu_us_per_io", "cpu0_us_per_io", "daemon_cpu_pct")
stretch = sorted(v["stretch"] for r in runs.values() for v in r.values()) or [0]
result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "wall_s": wall, "reps": reps,
          "runtime_s": runtime, "engine": engine, "guest": meta, "affinity": read("affinity.txt"),
          "host": {"cpus": int(ncpu), "loadavg_before": load0, "loadavg_after": load1},
          "stretch": {"median": med(stretch), "max": stretch[-1]}, "cases": [], "rss_kib": {}}
# RSS: each daemon right after 'add' (idle, 1 queue, depth 128), and the median and peak over its fio runs.
for line in read("rss.txt").splitlines():
    kind, dev, kib = line.split()
    r = result["rss_kib"].setdefault(dev, {"idle": None, "load": []})
    if kind == "idle":
        r["idle"] = int(kib)
    else:
        r["load"].append(int(kib))
for r in result["rss_kib"].values():
    r["load_median"], r["load_max"] = med(r["load"]), max(r["load"], default=None)
# Where each daemon's CPU went, by thread, from before the warm-up to the end of the runs.
result["threads_cpu_s"] = {}
t0 = {tuple(l.split()[:2]): int(l.split()[2]) for l in read("threads0.txt").splitlines()}
for line in read("threads.txt").splitlines():
    dev, name, ticks = line.split()
    result["threads_cpu_s"].setdefault(dev, {})[name] = (int(ticks) - t0.get((dev, name), 0)) / hz
print(f"\n{'case':24}{'device':11}{'IOPS|MiB/s':>11}{'p50 us':>9}{'p99 us':>9}{'cpu/IO':>8}{'cpu0/IO':>8}{'daemon%':>8}"
      "   ratio to peer: throughput; p50")
for title, wl, ours, peers in CASES:
    if (wl, ours) not in runs:
        continue  # not in this run (--only)
    peers = [p for p in peers if (wl, p) in runs or not p.startswith("ublksrv")]
    key = "mibs" if wl.startswith("s") else "iops"  # sequential 128k: MiB/s
    case = {"case": title, "workload": wl, "metric": key, "devices": {}, "ratios": {}}
    for dev in [ours] + peers:
        r = runs.get((wl, dev), {})
        m = {k: med([v[k] for v in r.values() if v[k] is not None]) for k in KEYS}
        case["devices"][dev] = {"runs": r, "median": m}
        ratios = ""
        for peer in peers if dev == ours else []:
            b = runs.get((wl, peer), {})
            both = sorted(set(r) & set(b))
            tr = [r[i][key] / b[i][key] for i in both if b[i][key]]
            lr = [r[i]["p50_us"] / b[i]["p50_us"] for i in both if b[i]["p50_us"]]
            case["ratios"][peer] = {"throughput": med(tr), "p50": med(lr), "throughput_runs": tr, "p50_runs": lr}
            ratios += f"  {peer} {fmt(med(tr), '.2f')}; {fmt(med(lr), '.2f')}"
        print(f"{title if dev == ours else '':24}{dev:11}{fmt(m[key], ',.0f' if key == 'iops' else '.1f'):>11}"
              f"{fmt(m['p50_us'], '.1f'):>9}{fmt(m['p99_us'], '.1f'):>9}{fmt(m['cpu_us_per_io'], '.1f'):>8}"
              f"{fmt(m['cpu0_us_per_io'], '.1f'):>8}{fmt(m['daemon_cpu_pct'], '.0f'):>8}{ratios}")
    result["cases"].append(case)
print(f"""
medians of {reps} interleaved repetitions of {runtime} s, fio {engine} direct=1; ratio = ours / peer per repetition, median.
cpu/IO: busy us of all guest CPUs (fio too) per IO; cpu0/IO: of CPU 0 alone (the server's: our daemon or loop's
workers); daemon%: our daemon's CPU. Wall time {wall} s; host load {load0} before, {load1} after ({ncpu} CPUs);
guest timer stretch median {med(stretch):.2f}, max {stretch[-1]:.2f}{' -- a busy host: read with care' if med(stretch) > 1.2 else ''}""")
print("daemon RSS (MiB): " + "; ".join(f"{d} idle {fmt(r['idle'] and r['idle'] / 1024, '.1f')}, under load {fmt(r['load_max'] and r['load_max'] / 1024, '.1f')}"
                                      for d, r in sorted(result["rss_kib"].items())))
for d, t in sorted(result["threads_cpu_s"].items()):
    print(f"{d} CPU by thread (s, warm-up and runs): " + ", ".join(f"{n} {v:.1f}" for n, v in sorted(t.items(), key=lambda kv: -kv[1]) if v))
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(f"JSON: {out}")
PY
exit "$rc"
