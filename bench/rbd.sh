#!/usr/bin/env bash
# RBD export head to head, on a throwaway single-node cluster (tests/ceph/cluster.sh) on loopback:
#   ours       ublksharp serve -t rbd (NBD over a Unix socket)     driven by fio --ioengine=nbd
#   qemu-nbd   qemu-nbd rbd:POOL/IMAGE (NBD over a Unix socket)    driven by fio --ioengine=nbd
#   fio rbd    fio --ioengine=rbd, straight on librbd (no NBD hop: the ceiling)
# Each has its own image (the exclusive lock allows one writer), written in full first so reads
# reach the OSD. Workloads: 4k random read and write at queue depth 32. Each repetition runs
# every (workload, peer) pair once, interleaved; the report is the median over repetitions.
# Writes $out/rbd.json: {"section":"rbd","rows":[{case, unit, ours{name,value,p50_us,p99_us}, peers[{name,value,ratio}]}]}
#
# usage: bench/rbd.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=/tmp/ublksharp-bench-rbd-$(date +%Y%m%d-%H%M%S)
reps=3 seconds=10 size=256M
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2;;
    --reps) reps=$2; shift 2;;
    --seconds) seconds=$2; shift 2;;
    --size) size=$2; shift 2;;
    *) echo "usage: bench/rbd.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE]" >&2; exit 2;;
  esac
done
for t in fio qemu-nbd rbd ceph-mon ceph-osd python3 dotnet; do
  command -v "$t" >/dev/null || { echo "bench/rbd.sh: $t is missing (apt-get install -y fio qemu-utils qemu-block-extra ceph-mon ceph-osd ceph-common)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw rbd || { echo "bench/rbd.sh: this fio has no rbd engine" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d /tmp/ublksharp-bench-rbd.XXXXXX)
cluster=$work/ceph
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$root/tests/ceph/cluster.sh" stop "$cluster" || true
  rm -rf "$work"
}
trap cleanup EXIT

dotnet build "$root/src/UblkSharp.Cli" -c Release -nologo -v quiet >/dev/null
cli="$root/src/UblkSharp.Cli/bin/Release/net10.0/UblkSharp.Cli.dll"

"$root/tests/ceph/cluster.sh" start "$cluster" --block-size 4G | tee "$out/cluster.txt"
conf=$cluster/ceph.conf
export CEPH_CONF=$conf # fio's rbd engine reads the default configuration
for img in ours qemu fio; do
  rbd -c "$conf" create --size "$size" "rbd/$img"
  rbd -c "$conf" bench --io-type write --io-pattern seq --io-size 4M --io-threads 4 --io-total "$size" "rbd/$img" >/dev/null 2>&1
done

declare -A sock pid
start() { # name command...
  local name=$1; shift
  sock[$name]=$work/$name.sock
  "$@" >"$out/$name.log" 2>&1 &
  pid[$name]=$!; pids+=("$!")
  for _ in $(seq 400); do [ -S "${sock[$name]}" ] && return; sleep 0.05; done
  echo "bench/rbd.sh: $name did not start; its log:" >&2; cat "$out/$name.log" >&2; exit 1
}
start ours dotnet "$cli" serve -t rbd --pool rbd --image ours --conf "$conf" --workers 32 --listen "unix://$work/ours.sock"
start qemu-nbd qemu-nbd -f raw -t -e 8 -x '' --cache=writeback -k "$work/qemu-nbd.sock" "rbd:rbd/qemu:conf=$conf"

results=$out/results.csv
echo "rep,workload,peer,iops,p50_us,p99_us" >"$results"
parse() { # fio-json rep workload peer
  python3 - "$@" >>"$results" <<'EOF'
import json, sys
path, rep, workload, peer = sys.argv[1:]
text = open(path).read()
job = json.loads(text[text.index('{'):])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
pct = side["clat_ns"].get("percentile", {})
print(f'{rep},{workload},{peer},{side["iops"]:.0f},{pct.get("50.000000", 0) / 1000:.0f},{pct.get("99.000000", 0) / 1000:.0f}')
EOF
}
common=(--iodepth=32 --size="$size" --time_based --runtime="$seconds" --ramp_time=2 --output-format=json)
for rep in $(seq "$reps"); do
  for rw in randread randwrite; do
    for peer in ours qemu-nbd fio-rbd; do
      f=$out/fio-$rep-$rw-$peer.json
      if [ "$peer" = fio-rbd ]; then
        fio --name=rbd --ioengine=rbd --clientname=admin --pool=rbd --rbdname=fio --rw="$rw" --bs=4k "${common[@]}" --output="$f" >/dev/null
      else
        fio --name=nbd --ioengine=nbd --uri="nbd+unix:///?socket=${sock[$peer]}" --rw="$rw" --bs=4k "${common[@]}" --output="$f" >/dev/null
      fi
      parse "$f" "$rep" "4k $rw qd32" "$peer"
    done
  done
done

python3 - "$results" "$out/rbd.json" <<'EOF'
import csv, json, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def med(workload, peer, key):
    return statistics.median(float(r[key]) for r in rows if r["workload"] == workload and r["peer"] == peer)
out = {"section": "rbd", "rows": []}
for workload in ("4k randread qd32", "4k randwrite qd32"):
    ours = med(workload, "ours", "iops")
    peers = []
    for peer, name in (("qemu-nbd", "qemu-nbd rbd"), ("fio-rbd", "fio rbd")):
        v = med(workload, peer, "iops")
        peers.append({"name": name, "value": round(v), "ratio": round(ours / v, 2) if v else None})
    out["rows"].append({"case": workload, "unit": "IOPS",
                        "ours": {"name": "ublksharp serve -t rbd", "value": round(ours),
                                 "p50_us": round(med(workload, "ours", "p50_us")), "p99_us": round(med(workload, "ours", "p99_us"))},
                        "peers": peers})
json.dump(out, open(sys.argv[2], "w"), indent=1)
for r in out["rows"]:
    print(f'{r["case"]:>20}: ours {r["ours"]["value"]} IOPS (p50 {r["ours"]["p50_us"]} us, p99 {r["ours"]["p99_us"]} us); '
          + "; ".join(f'{p["name"]} {p["value"]} (ratio {p["ratio"]})' for p in r["peers"]))
EOF
echo "results: $out/rbd.json"
