#!/usr/bin/env bash
# Every test UblkSharp has, from a fresh machine: installs what the tests need, builds with
# warnings as errors, checks formatting, runs the host tests, then boots Debian kernels under qemu
# (tools/ublksharp-vm) and runs the VM tests against the real ublk driver: every VM test class on
# Linux 6.12, and the classes (or methods) marked [Trait("kernel", "7.3")] on Linux 7.3.
# Ends with one line "N passed, N failed"; exits non-zero if anything failed or did not run.
# Env: UBLKSHARP_VM_CLASSES (a grep -E pattern) narrows the VM classes, UBLKSHARP_VM_KERNELS
# (default "6.12 7.3") the kernels, UBLKSHARP_VM_TIMEOUT (seconds, default 1200) bounds each boot;
# UBLKSHARP_SKIP_VM=1 skips the VM tests (counted as skipped). `./test.sh --self-test` checks only
# how runs are counted.
set -uo pipefail
root=$(cd "$(dirname "$0")" && pwd)
cd "$root"
export DOTNET_NOLOGO=1 DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1
passed=0; failed=0; skipped=0; began=$SECONDS
log() { printf '\n=== %s\n' "$*"; }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }
summary() {
  echo
  echo "(everything took $((SECONDS - began)) s)"
  echo "$passed passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
  [ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ]
  exit
}

# Adds the counts from an xunit v3 runner's summary line; a run without one counts as a failure.
# The run's exit code must agree with its summary (1 if a test failed, else 0): a runner that
# crashes after its summary, or a guest that times out (124) or gives no result (125) after it,
# adds a failure of its own.
count() { # name output-file exit-code
  local line want
  line=$(grep -E 'Total: [0-9]+, Errors: [0-9]+, Failed: [0-9]+, Skipped: [0-9]+, Not Run: [0-9]+' "$2" | tail -1)
  if [ -z "$line" ]; then fail "$1: the test run printed no summary (exit $3$(why "$3"))"; return; fi
  read -r total errors nfailed nskipped notrun < <(sed -E 's/.*Total: ([0-9]+), Errors: ([0-9]+), Failed: ([0-9]+), Skipped: ([0-9]+), Not Run: ([0-9]+).*/\1 \2 \3 \4 \5/' <<<"$line")
  passed=$((passed + total - nfailed - nskipped - notrun))
  failed=$((failed + nfailed + errors))
  skipped=$((skipped + nskipped + notrun))
  echo "$1: $((total - nfailed - nskipped - notrun)) passed, $((nfailed + errors)) failed, $((nskipped + notrun)) skipped"
  want=$((nfailed + errors > 0 ? 1 : 0))
  [ "$3" = "$want" ] || fail "$1: exited $3$(why "$3") after a summary that says it should exit $want"
}
why() {
  case $1 in
    124) echo " (ublksharp-vm: timed out in the guest)";;
    125) echo " (ublksharp-vm: the guest gave no result)";;
    *) [ "$1" -gt 128 ] 2>/dev/null && echo " (killed by signal $(($1 - 128)))";;
  esac
}
# Runs a test runner (or the VM harness running one) with its output shown and counted.
run_counted() { # name command...
  local name=$1 rc; shift
  "$@" 2>&1 | tee "$out"; rc=${PIPESTATUS[0]}
  count "$name" "$out" "$rc"
}
out=$(mktemp); trap 'rm -f "$out"' EXIT

# count()/run_counted() on fake runs: fails if an exit code or a missing summary were ignored.
self_test() {
  local sum='  X  Total: 3, Errors: 0, Failed: 0, Skipped: 0, Not Run: 0, Time: 1s' bad=0 got
  local sum1='  X  Total: 3, Errors: 0, Failed: 1, Skipped: 0, Not Run: 0, Time: 1s'
  check() { # "passed failed skipped" it must count, script of the fake run
    got=$(passed=0 failed=0 skipped=0; run_counted fake bash -c "$2" >/dev/null; echo "$passed $failed $skipped")
    [ "$got" = "$1" ] || { echo "self-test: counted '$got' for \`$2\`, expected '$1'"; bad=1; }
  }
  check "3 0 0" "echo '$sum'"
  check "2 1 0" "echo '$sum1'; exit 1"
  check "3 1 0" "echo '$sum'; exit 1"      # a runner that crashes after a clean summary
  check "3 1 0" "echo '$sum'; exit 134"
  check "3 1 0" "echo '$sum'; exit 124"    # a guest that hangs at power-off
  check "3 1 0" "echo '$sum'; exit 125"    # a guest that gives no result
  check "2 2 0" "echo '$sum1'; exit 125"
  check "0 1 0" "echo 'no summary'"
  check "0 1 0" "echo 'no summary'; exit 1"
  [ "$bad" = 0 ] && echo "self-test: every fake run counted as it should"
}
if [ "${1:-}" = --self-test ]; then self_test; exit; fi
[ $# = 0 ] || { echo "usage: ./test.sh [--self-test]" >&2; exit 2; }

log "prerequisites"
need=()
# The rbd target's tests start their own single-node Ceph cluster (tests/ceph/cluster.sh): ceph-mon,
# ceph-osd, ceph-common (the ceph and rbd tools), librbd1/librados2; qemu-block-extra gives qemu-nbd
# its rbd driver for the benchmark. TLS-PSK: libgnutls30 (the server binds it), libgnutls28-dev (the
# constants test reads gnutls.h), gnutls-bin (psktool makes the tests' key files).
for p in gcc clang libc6-dev linux-libc-dev fio e2fsprogs util-linux user-mode-linux uml-utilities qemu-utils libnbd-bin python3-libnbd nbdkit nbd-client \
  ceph-mon ceph-osd ceph-common librbd1 librados2 qemu-block-extra iproute2 bc btrfs-progs xfsprogs systemd python3-prometheus-client curl \
  libgnutls30 libgnutls28-dev gnutls-bin; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || fail "apt-get install ${need[*]}"
fi
# Kernel, modules and initramfs for the VM tests (cached after the first run).
kernels=${UBLKSHARP_VM_KERNELS:-6.12 7.3}
for k in $kernels; do
  tools/ublksharp-vm -k "$k" --prepare || fail "preparing the VM (tools/ublksharp-vm -k $k --prepare)"
done

log "test.sh self-test (how runs are counted)"
if self_test; then passed=$((passed + 1)); else fail "./test.sh --self-test"; fi

log "build"
if ! dotnet build UblkSharp.slnx -c Release -nologo -v quiet -warnaserror; then
  fail "dotnet build"; summary
fi
passed=$((passed + 1))

# The CLI is published native (AOT) and the VM test runner ReadyToRun (precompiled): under TCG a
# .NET start costs a CLI call over a second even ReadyToRun (7 s more JIT-compiled), and the test
# runner over 7 s per boot when JIT-compiled.
log "publish the CLI native (artifacts/cli) and the VM tests ReadyToRun (artifacts/vmtests)"
rm -rf artifacts/cli artifacts/vmtests artifacts/packages
if tools/publish-cli artifacts/cli && tools/publish-r2r tests/UblkSharp.VmTests artifacts/vmtests; then
  passed=$((passed + 1))
else
  fail "dotnet publish (the CLI native, the VM tests ReadyToRun)"; summary
fi

# The packages as users get them: the tool installed from a local feed into a clean HOME, and a
# program built from the library package; PackageTests (host) and PackagedToolTests (VM) check them.
log "packages (tools/install-packages artifacts/packages)"
if tools/install-packages artifacts/packages; then
  passed=$((passed + 1)); export UBLKSHARP_PACKAGES="$root/artifacts/packages"
else
  fail "tools/install-packages artifacts/packages (dotnet pack, dotnet tool install, a build against the packages)"
fi

log "format"
if dotnet format UblkSharp.slnx --verify-no-changes --no-restore -v quiet; then passed=$((passed + 1)); else fail "dotnet format (run 'dotnet format UblkSharp.slnx')"; fi

# The benchmark report generator (bench/run.sh's table, JSON and chart) on made-up figures; no benchmark runs.
log "bench report self-test"
if python3 bench/report.py --self-test; then passed=$((passed + 1)); else fail "bench/report.py --self-test"; fi

log "host tests"
run_counted "host tests" dotnet tests/UblkSharp.Tests/bin/Release/net10.0/UblkSharp.Tests.dll -noColor

# A guest boot per test class, so that a device that hangs can only take its own class down and
# each boot is bounded in time; except the classes marked [Trait("boot", "shared")] (short, and
# none leaves IO held or a daemon killed), which share boots, up to UBLKSHARP_VM_BATCH (5) classes
# a boot: a boot costs about 20 s under TCG. On 6.12 every class runs; on another kernel K, the
# classes with the trait kernel=K, and in them only the tests with that trait (on the class or on
# the method).
vmdll=artifacts/vmtests/UblkSharp.VmTests.dll
vm_classes() { # trait-filter-args...: the classes the filters select, narrowed by UBLKSHARP_VM_CLASSES
  dotnet "$vmdll" -list classes -noColor "$@" 2>/dev/null | grep -E '^UblkSharp\.VmTests\.' | grep -E "${UBLKSHARP_VM_CLASSES:-.}"
}
vm_boot() { # kernel name classes...: a class with the trait cpus=4 gets a guest with 4 CPUs (one per queue it tests)
  local k=$1 name=$2 args="" c cpus=2 cstart=$SECONDS; shift 2
  for c in "$@"; do args+=" -class $c"; if grep -qxF "$c" <<<"$cpus4"; then cpus=4; fi; done
  echo "--- $name (Linux $k)"
  run_counted "$name on $k" tools/ublksharp-vm -k "$k" -c "$cpus" -t "${UBLKSHARP_VM_TIMEOUT:-1200}" -- "dotnet $vmdll -noColor$args ${filter[*]}"
  echo "($name on Linux $k took $((SECONDS - cstart)) s)"
}
vm_suite() { # kernel
  local k=$1 classes shared class start=$SECONDS batch=() size=${UBLKSHARP_VM_BATCH:-5}
  filter=()
  [ "$k" = 6.12 ] || filter=(-trait "kernel=$k")
  log "VM tests on Linux $k (Debian's kernel with ublk_drv, under qemu)"
  classes=$(vm_classes "${filter[@]}")
  if [ -z "$classes" ]; then
    if [ -n "${UBLKSHARP_VM_CLASSES:-}" ]; then echo "no VM test class for Linux $k matches UBLKSHARP_VM_CLASSES"; else fail "no VM test classes for Linux $k found in $vmdll"; fi
    return
  fi
  shared=$(vm_classes -trait boot=shared)
  cpus4=$(vm_classes -trait cpus=4)
  for class in $classes; do
    if grep -qxF "$class" <<<"$shared"; then batch+=("$class"); else vm_boot "$k" "$class" "$class"; fi
    if [ ${#batch[@]} -ge "$size" ]; then vm_boot "$k" "$(IFS=,; echo "${batch[*]##*.}")" "${batch[@]}"; batch=(); fi
  done
  [ ${#batch[@]} = 0 ] || vm_boot "$k" "$(IFS=,; echo "${batch[*]##*.}")" "${batch[@]}"
  echo "(the VM suite on Linux $k took $((SECONDS - start)) s)"
}

if [ "${UBLKSHARP_SKIP_VM:-}" = 1 ] && [ "${CI:-}" != true ]; then
  log "VM tests"
  echo "VM tests NOT run (UBLKSHARP_SKIP_VM=1)"; skipped=$((skipped + 1))
else
  for k in $kernels; do vm_suite "$k"; done
fi

summary
