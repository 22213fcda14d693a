#!/usr/bin/env bash
# A throwaway single-node Ceph cluster on loopback for the rbd target's tests and benchmark: one
# monitor and one BlueStore OSD on a sparse file, cephx on (as every real cluster; --auth none turns
# it off), no manager (RBD IO does not need one), and an "rbd" pool. DIR/keyring holds the keys of
# the daemons and client.admin (the conf points at it, so the tools and librbd log in as
# client.admin); client.ublk is a user limited to RBD on the pool ('profile rbd'), with its key
# only in DIR/client.ublk.keyring and, bare, in DIR/client.ublk.key (for --keyring and --keyfile). Built by hand from the Debian packages (vstart.sh is not packaged; see
# /work/shared/notes/ceph-single-node.md). Works on the host and inside the VM guest.
#
# usage: cluster.sh start DIR [--block-size SIZE] [--auth cephx|none]   prints "cluster up in N.N s" and DIR/ceph.conf
#        cluster.sh stop DIR                        stops every daemon and removes DIR
#        cluster.sh kill-osd DIR                    SIGKILLs the OSD (fault tests)
#        cluster.sh start-osd DIR                   starts the OSD again and waits until it is up
# Env: CEPH_TIMEOUT (seconds to wait for a step, default 120).
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: cluster.sh start|stop|kill-osd|start-osd DIR"
cmd=$1 dir=$2; shift 2
block_size=2G auth=cephx
while [ $# -gt 0 ]; do
  case $1 in
    --block-size) block_size=$2; shift 2;;
    --auth) auth=$2; [[ $auth == cephx || $auth == none ]] || die "--auth cephx or none"; shift 2;;
    *) die "unknown option $1";;
  esac
done
timeout=${CEPH_TIMEOUT:-120}
conf=$dir/ceph.conf

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
ceph_() { timeout "$timeout" ceph -c "$conf" "$@"; }

# Waits until the OSD has booted (its log says "booting -> active"), reading only the log lines
# after $1: cheaper than polling the `ceph` tool, whose Python start-up takes seconds in the guest.
wait_osd_up() {
  local from=$1 deadline=$((SECONDS + timeout))
  while ! tail -n +"$((from + 1))" "$dir/log/osd.0.log" 2>/dev/null | grep -q 'state: booting -> active'; do
    [ $SECONDS -lt $deadline ] || die "the OSD did not come up within $timeout s (log: $dir/log/osd.0.log)"
    sleep 0.2
  done
}

start_osd() {
  local lines
  lines=$(wc -l <"$dir/log/osd.0.log" 2>/dev/null || echo 0)
  ceph-osd -c "$conf" -i 0 2>>"$dir/log/osd.0.stderr" || die "ceph-osd did not start (log: $dir/log/osd.0.log)"
  wait_osd_up "$lines"
}

daemon_pids() { cat "$dir"/run/*.pid 2>/dev/null || true; }

case $cmd in
start)
  t0=$(now)
  command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v rbd >/dev/null \
    || die "ceph-mon, ceph-osd and rbd are needed: apt-get install ceph-mon ceph-osd ceph-common"
  # The guest's loopback interface starts down.
  if ! ip -o link show lo 2>/dev/null | grep -q 'UP'; then ip link set lo up || die "cannot bring up the loopback interface"; fi
  [ ! -e "$dir/ceph.conf" ] || die "$dir already holds a cluster"
  mkdir -p "$dir"/{log,run,mon,osd.0}
  dir=$(cd "$dir" && pwd) conf=$dir/ceph.conf
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$port
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = $auth
auth_service_required = $auth
auth_client_required = $auth
keyring = $dir/keyring
ms_mon_client_mode = crc
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 1
mon_data_avail_crit = 1
log_file = $dir/log/\$name.log
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
lockdep = false
[mon]
mon_data = $dir/mon
[osd]
osd_data = $dir/osd.0
osd_objectstore = bluestore
bluestore_block_path = $dir/block-0
bluestore_block_create = true
bluestore_block_size = $block_size
bluestore_fsck_on_mkfs = false
bluestore_cache_autotune = false
bluestore_cache_size = 128M
osd_memory_target = 1G
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
# A fixed CRUSH host: the guest's hostname is "(none)", which is no valid CRUSH name.
crush_location = root=default host=ublksharp-ceph
EOF
  # The monitor imports every key at mkfs (no `ceph auth` round trips, each of which costs seconds
  # of the ceph tool's start-up in the guest). The conf's keyring has no client.ublk, so a test as
  # that user works only with the key it was given.
  kr=$dir/keyring ukr=$dir/client.ublk.keyring
  ceph-authtool "$kr" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
  ceph-authtool "$ukr" --create-keyring --gen-key -n client.ublk --cap mon 'profile rbd' --cap osd 'profile rbd pool=rbd' >/dev/null
  ceph-authtool "$ukr" -n client.ublk -p >"$dir/client.ublk.key"
  cp "$kr" "$dir/mkfs.keyring"
  ceph-authtool "$dir/mkfs.keyring" --import-keyring "$ukr" >/dev/null
  chmod 600 "$kr" "$ukr" "$dir/client.ublk.key" "$dir/mkfs.keyring"
  monmaptool --create --clobber --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mkfs.keyring" 2>>"$dir/log/mon.a.stderr" || die "ceph-mon --mkfs failed"
  ceph-mon -c "$conf" -i a 2>>"$dir/log/mon.a.stderr" || die "ceph-mon did not start (log: $dir/log/mon.a.log)"
  t_mon=$(since "$t0")
  uuid=$(cat /proc/sys/kernel/random/uuid)
  # One run of the ceph tool for both monitor commands (its Python start-up costs seconds in the
  # guest); the pool needs no OSD up yet.
  out=$(printf 'osd new %s\nosd pool create rbd 8 8\n' "$uuid" | ceph_ 2>&1) \
    || die "the monitor did not answer (log: $dir/log/mon.a.log): $out"
  [[ $out =~ (^|$'\n')0($'\n'|$) ]] || die "'osd new' did not create osd.0: $out"
  [[ $out == *"pool 'rbd' created"* ]] || die "could not create the rbd pool: $out"
  t_new=$(since "$t0")
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 || die "ceph-osd --mkfs failed (log: $dir/log/osd.0.log)"
  t_mkfs=$(since "$t0")
  start_osd
  t_osd=$(since "$t0")
  # No `rbd pool init`: it only tags the pool for the rbd application (and costs seconds);
  # images work without it.
  printf 'cluster up in %.1f s (%s; mon up at %.1f s, mon commands %.1f, osd mkfs %.1f, osd up %.1f)\n' "$(since "$t0")" "$conf" "$t_mon" "$t_new" "$t_mkfs" "$t_osd"
  ;;
stop)
  [ -d "$dir" ] || exit 0
  pids=$(daemon_pids)
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
  for _ in $(seq 100); do
    alive=0; for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
  ;;
kill-osd)
  p=$(cat "$dir/run/osd.0.pid") || die "no OSD pid file in $dir/run"
  kill -9 "$p"
  while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
  ;;
start-osd)
  start_osd
  ;;
*) die "unknown command $cmd" ;;
esac
