#!/usr/bin/env bash
# Every test UblkSharp has, from a fresh machine: installs what the tests need, builds with
# warnings as errors, checks formatting, runs the host tests, then boots Debian's 6.12 kernel
# under qemu (tools/ublksharp-vm) and runs the VM tests against the real ublk driver.
# Ends with one line "N passed, N failed"; exits non-zero if anything failed or did not run.
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
cd "$root"
export DOTNET_NOLOGO=1 DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1
passed=0; failed=0; skipped=0
log() { printf '\n=== %s\n' "$*"; }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }
summary() {
  echo
  echo "$passed passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
  [ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ]
  exit
}

# Adds the counts from an xunit v3 runner's summary line; a run without one counts as a failure.
count() { # name output-file
  local line
  line=$(grep -E 'Total: [0-9]+, Errors: [0-9]+, Failed: [0-9]+, Skipped: [0-9]+, Not Run: [0-9]+' "$2" | tail -1)
  if [ -z "$line" ]; then fail "$1: the test run printed no summary"; return; fi
  read -r total errors nfailed nskipped notrun < <(sed -E 's/.*Total: ([0-9]+), Errors: ([0-9]+), Failed: ([0-9]+), Skipped: ([0-9]+), Not Run: ([0-9]+).*/\1 \2 \3 \4 \5/' <<<"$line")
  passed=$((passed + total - nfailed - nskipped - notrun))
  failed=$((failed + nfailed + errors))
  skipped=$((skipped + nskipped + notrun))
  echo "$1: $((total - nfailed - nskipped - notrun)) passed, $((nfailed + errors)) failed, $((nskipped + notrun)) skipped"
}

log "prerequisites"
need=()
# The rbd target's tests start their own single-node Ceph cluster (tests/ceph/cluster.sh): ceph-mon,
# ceph-osd, ceph-common (the ceph and rbd tools), librbd1/librados2; qemu-block-extra gives qemu-nbd
# its rbd driver for the benchmark.
for p in gcc libc6-dev linux-libc-dev fio e2fsprogs util-linux user-mode-linux uml-utilities qemu-utils libnbd-bin python3-libnbd nbdkit nbd-client \
  ceph-mon ceph-osd ceph-common librbd1 librados2 qemu-block-extra iproute2 bc btrfs-progs xfsprogs; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]}"
fi
# Kernel, modules and initramfs for the VM tests (cached after the first run).
tools/ublksharp-vm --prepare || fail "preparing the VM (tools/ublksharp-vm --prepare)"

log "build"
if ! dotnet build UblkSharp.slnx -c Release -nologo -v quiet -warnaserror; then
  fail "dotnet build"; summary
fi
passed=$((passed + 1))

log "format"
if dotnet format UblkSharp.slnx --verify-no-changes --no-restore -v quiet; then passed=$((passed + 1)); else fail "dotnet format (run 'dotnet format UblkSharp.slnx')"; fi

# The benchmark report generator (bench/run.sh's table, JSON and chart) on made-up figures; no benchmark runs.
log "bench report self-test"
if python3 bench/report.py --self-test; then passed=$((passed + 1)); else fail "bench/report.py --self-test"; fi

log "host tests"
out=$(mktemp); trap 'rm -f "$out"' EXIT
dotnet tests/UblkSharp.Tests/bin/Release/net10.0/UblkSharp.Tests.dll -noColor 2>&1 | tee "$out"
count "host tests" "$out"

log "VM tests (Debian 6.12 kernel with ublk_drv, under qemu)"
if [ "${UBLKSHARP_SKIP_VM:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "VM tests NOT run (UBLKSHARP_SKIP_VM=1)"; skipped=$((skipped + 1))
else
  # One guest boot per test class: a device that hangs can only take its own class down, and each
  # boot is bounded in time. UBLKSHARP_VM_CLASSES narrows the run (a grep -E pattern).
  vmdll=tests/UblkSharp.VmTests/bin/Release/net10.0/UblkSharp.VmTests.dll
  classes=$(dotnet "$vmdll" -list classes -noColor 2>/dev/null | grep -E '^UblkSharp\.VmTests\.' | grep -E "${UBLKSHARP_VM_CLASSES:-.}")
  [ -n "$classes" ] || fail "no VM test classes found in $vmdll"
  for class in $classes; do
    echo "--- $class"
    start=$SECONDS
    tools/ublksharp-vm -t "${UBLKSHARP_VM_TIMEOUT:-1200}" -- "dotnet $vmdll -noColor -class $class" 2>&1 | tee "$out"
    count "$class" "$out"
    echo "($class took $((SECONDS - start)) s)"
  done
fi

summary
