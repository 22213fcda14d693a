#!/usr/bin/env bash
# NBD over TLS head to head: ublksharp serve vs qemu-nbd, the same x509 certificates (RSA 2048, made
# here with openssl), one TCP loopback connection each, each over its own copy of the same random
# image on tmpfs (`serve -t loop` against `qemu-nbd -f raw`). The client is fio's nbd engine
# (libnbd, GnuTLS): libnbd refuses a certificate directory named in a URI from fio, so it is found
# where libnbd looks by default, $HOME/.pki/libnbd, with HOME pointed at a directory made here.
# Workloads: 4k random read and write at queue depth 32 (the bar: ours ≥ 1.5× qemu-nbd at 4k
# randread), 128k sequential read at depth 32. Each repetition runs every (workload, server) pair
# once, interleaved, so drift in machine load hits both alike; the report is the median with ratios
# and the servers' CPU time per IO. Plain (no TLS) rows of ours are in bench/nbd.sh.
# Writes DIR/report.md and DIR/nbd-tls.json. The defaults take about 1-2 minutes.
#
# usage: bench/nbd-tls.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE] [--quick]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=/tmp/ublksharp-bench-nbd-tls-$(date +%Y%m%d-%H%M%S)
reps=3 seconds=3 size=256M
usage="usage: bench/nbd-tls.sh [--out DIR] [--reps N] [--seconds S] [--size SIZE] [--quick]"
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2;;
    --reps) reps=$2; shift 2;;
    --seconds) seconds=$2; shift 2;;
    --size) size=$2; shift 2;;
    --quick) reps=1; shift;;
    *) echo "$usage" >&2; exit 2;;
  esac
done
for t in fio qemu-nbd nbdinfo openssl python3 dotnet; do
  command -v "$t" >/dev/null || { echo "bench/nbd-tls.sh: $t is missing (apt-get install -y fio qemu-utils libnbd-bin openssl)" >&2; exit 1; }
done
mkdir -p "$out"
work=$(mktemp -d /dev/shm/ublksharp-bench-nbd-tls.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

dotnet build "$root/src/UblkSharp.Cli" -c Release -nologo -v quiet >/dev/null
cli="$root/src/UblkSharp.Cli/bin/Release/net10.0/UblkSharp.Cli.dll"

# One CA and one server certificate (for 127.0.0.1 and localhost), in the layout both servers read.
certs=$work/certs
mkdir -p "$certs" "$work/home/.pki/libnbd"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$certs/ca-key.pem" -out "$certs/ca-cert.pem" -days 2 -subj /CN=bench-ca 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$certs/server-key.pem" -out "$work/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$certs/ca-cert.pem" -CAkey "$certs/ca-key.pem" -CAcreateserial \
  -out "$certs/server-cert.pem" -days 2 -extfile "$work/server.ext" 2>/dev/null
cp "$certs/ca-cert.pem" "$work/home/.pki/libnbd/"

head -c "$(numfmt --from=iec "$size")" /dev/urandom >"$work/ours.img"
cp "$work/ours.img" "$work/qemu.img"

# Free loopback ports, picked by the kernel.
read -r port_ours port_qemu < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')

declare -A port pid
start() { # name port command...
  local name=$1; port[$name]=$2; shift 2
  "$@" >"$out/$name.log" 2>&1 &
  pid[$name]=$!; pids+=("$!")
  for _ in $(seq 400); do
    HOME=$work/home nbdinfo --size "nbds://127.0.0.1:${port[$name]}/" >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "bench/nbd-tls.sh: $name did not start; its log:" >&2; cat "$out/$name.log" >&2; exit 1
}
start ours "$port_ours" dotnet "$cli" serve -t loop -f "$work/ours.img" --listen "tcp://127.0.0.1:$port_ours" \
  --tls require --tls-certificates "$certs"
# verify-peer=off: qemu's server side asks for client certificates by default; ours does only with
# --tls-verify-peer, so both serve any client that trusts the CA.
start qemu-nbd "$port_qemu" qemu-nbd -f raw -t -e 8 -x '' -b 127.0.0.1 -p "$port_qemu" \
  --object "tls-creds-x509,id=tls0,dir=$certs,endpoint=server,verify-peer=off" --tls-creds tls0 "$work/qemu.img"
servers=(ours qemu-nbd)

workloads=("randread 4k" "randwrite 4k" "read 128k")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results=$out/results.csv
echo "rep,workload,server,iops,mib_s,server_cpu_us_per_io,p50_us,p99_us" >"$results"
for rep in $(seq "$reps"); do
  for w in "${workloads[@]}"; do
    read -r rw bs <<<"$w"
    for s in "${servers[@]}"; do
      before=$(cpu_ticks "${pid[$s]}")
      HOME=$work/home fio --name=nbd-tls --ioengine=nbd --uri="nbds://127.0.0.1:${port[$s]}/" --rw="$rw" --bs="$bs" --iodepth=32 \
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

python3 - "$results" "$out/report.md" "$out/nbd-tls.json" <<'EOF'
import csv, json, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {}
for w in dict.fromkeys(r["workload"] for r in rows):
    for s in dict.fromkeys(r["server"] for r in rows):
        sel = [r for r in rows if r["workload"] == w and r["server"] == s]
        med[w, s] = {k: statistics.median(float(r[k]) for r in sel) for k in ("iops", "mib_s", "server_cpu_us_per_io", "p50_us", "p99_us")}
        med[w, s]["all"] = [round(float(r["iops"])) for r in sel]
def cell(w, s):
    m = med[w, s]
    return f"{m['iops']:,.0f} IOPS ({m['mib_s']:,.0f} MiB/s, {m['server_cpu_us_per_io']:.1f} µs CPU/IO, p50/p99 {m['p50_us']:.0f}/{m['p99_us']:.0f} µs)"
lines = ["| workload, TLS | ours (serve -t loop) | qemu-nbd | ours ÷ qemu-nbd |", "|---|---|---|---|"]
out_rows = []
for w in dict.fromkeys(r["workload"] for r in rows):
    ratio = med[w, "ours"]["iops"] / med[w, "qemu-nbd"]["iops"]
    lines.append(f"| {w} qd32 | {cell(w, 'ours')} | {cell(w, 'qemu-nbd')} | **{ratio:.2f}×** |")
    row = {"case": f"{w.split()[1]} {w.split()[0]} qd32, TLS", "unit": "IOPS",
           "ours": {"name": "ublksharp serve -t loop --tls require", "value": round(med[w, "ours"]["iops"]), "runs": med[w, "ours"]["all"]},
           "peers": [{"name": "qemu-nbd --tls-creds (x509)", "value": round(med[w, "qemu-nbd"]["iops"]), "runs": med[w, "qemu-nbd"]["all"], "ratio": round(ratio, 3)}]}
    if w == "randread 4k":
        row["bar"] = {"qemu-nbd --tls-creds (x509)": 1.5}
    out_rows.append(row)
reps = len({r["rep"] for r in rows})
text = "\n".join(lines) + f"\n\nMedians of {reps} interleaved repetitions; fio nbd engine (libnbd, GnuTLS), 1 connection over TCP loopback, " \
       "iodepth 32, x509 RSA 2048; CPU/IO is the server process's user+system time per IO.\n"
bar = med["randread 4k", "ours"]["iops"] / med["randread 4k", "qemu-nbd"]["iops"]
text += f"\nBar: 4k randread ours ÷ qemu-nbd ≥ 1.5×: {bar:.2f}× ({'met' if bar >= 1.5 else 'MISSED'})\n"
open(sys.argv[2], "w").write(text)
print(text)
json.dump({"section": "nbd-tls", "repetitions": reps, "rows": out_rows}, open(sys.argv[3], "w"), indent=1)
EOF
echo "results: $out (results.csv, report.md, nbd-tls.json, fio JSON, server logs)" >&2
