#!/usr/bin/env bash
# Ceph RBD target-storage benchmark (issue 8), against a one-node cluster started here
# (tests/ceph/one-node.sh, OSD on a sparse file), every figure beside its baseline in one run:
#  (a) initial replication of a random-data disk (default 2 GiB) from a source `ferry run` to a
#      target `ferry run` with `storage = "rbd"`, timed from the source's start until the disk
#      is `protected` and the target acknowledged everything journaled; beside it `rbd import`
#      of the same file (same image features), once before and once after Ferry's run.
#  (b) 4 KiB random writes (fio, nbd engine, QD 16) through the source's NBD export, timed from
#      fio's start until the target acknowledged all of them (the replicated write rate into
#      RBD); beside it `rbd bench --io-type write --io-pattern rand --io-size 4K` (16 threads)
#      of the same byte count.
#  (c) the same as (b) while recovery points are cut every 0.5 s (each one an RBD snapshot of
#      the image at the target), and the time `ferry failover --test` takes to answer with a
#      readable export of a point (opening the snapshot), against (b).
#  (d) the undo-log-in-the-pool alternative's floor: `rbd bench --io-type readwrite` 4 KiB
#      random, 33% reads (a before-image read + its write + the write itself per first touch).
# Results go to stdout; the hand-written "## Ceph RBD" section of benches/RESULTS.md quotes them.
#
# Usage: benches/rbd.sh                (as root: drop_caches)
# Env:   FERRY_BENCH_DIR       where the disk, the cluster and the appliances go (default: temp
#                              dir under /var/tmp, removed afterwards)
#        FERRY_BENCH_DISK_MIB  disk size (default 2048)
#        FERRY_BENCH_RAND_MIB  bytes of 4 KiB random writes in (b)-(d) (default 64)
#        FERRY_BIN             a release ferry binary to use instead of building one
set -euo pipefail

disk_mib=${FERRY_BENCH_DISK_MIB:-2048}
rand_mib=${FERRY_BENCH_RAND_MIB:-64}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${FERRY_BENCH_DIR:-$(mktemp -d /var/tmp/ferry-rbd-bench.XXXXXX)}
mkdir -p "$work"
deadline_s=900

[ "$(id -u)" = 0 ] || { echo "rbd: run as root (drop_caches)" >&2; exit 1; }
for tool in rbd ceph-mon fio python3 openssl cmp; do
    command -v "$tool" >/dev/null || { echo "rbd: $tool is not installed" >&2; exit 1; }
done
need_kib=$(( disk_mib * 1024 * 4 + 1048576 ))
avail_kib=$(df -Pk "$work" | awk 'NR==2 {print $4}')
[ "$avail_kib" -ge "$need_kib" ] || { echo "rbd: need $need_kib KiB free in $work, have $avail_kib" >&2; exit 1; }

if [ -z "${FERRY_BIN:-}" ]; then
    echo "building ferry (release)" >&2
    (cd "$root" && cargo build --release -q -p ferry --bin ferry)
fi
ferry=${FERRY_BIN:-$root/target/release/ferry}

pids=()
stop_pid() { # pid: SIGTERM, bounded wait, then SIGKILL
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
source_pid=""
target_pid=""
cleanup() {
    stop_pid "$source_pid"
    stop_pid "$target_pid"
    if [ -f "$work/ceph/pids" ]; then
        while read -r pid; do stop_pid "$pid"; done < "$work/ceph/pids"
    fi
    if [ -z "${FERRY_BENCH_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now_ns() { date +%s%N; }
ms_since() { echo $(( ($(now_ns) - $1) / 1000000 )); }
load() { cut -d' ' -f1-3 /proc/loadavg; }

# ---- the cluster: room for three copies of the disk on the sparse OSD file.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "starting a one-node Ceph cluster" >&2
FERRY_CEPH_OSD_BYTES=$(( (disk_mib * 4 + 4096) << 20 )) bash "$root/tests/ceph/one-node.sh" "$work/ceph" "$port"
conf="$work/ceph/ceph.conf"
keyring="$work/ceph/ceph.client.admin.keyring"
r() { rbd -c "$conf" "$@"; }
features="layering,exclusive-lock,object-map,fast-diff"

disk="$work/disk.raw"
echo "writing ${disk_mib} MiB of random data" >&2
set +o pipefail
openssl enc -aes-128-ctr -nosalt -pass "pass:ferry-rbd" -in /dev/zero 2>/dev/null \
    | head -c "$((disk_mib << 20))" > "$disk"
set -o pipefail
sync

import_pass() { # image name -> ms
    drop_caches
    local t0
    t0=$(now_ns)
    r import --no-progress --image-feature "$features" "$disk" "rbd/$1" >/dev/null
    ms_since "$t0"
}
load_a=$(load)
import1_ms=$(import_pass import-1)
echo "rbd import (1): ${import1_ms} ms" >&2

# ---- Ferry: a target on RBD and a source.
mkdir -p "$work/source/state" "$work/target/state" "$work/target/storage"
source_fp=$("$ferry" identity --state-dir "$work/source/state" | tr -d '\n')
target_fp=$("$ferry" identity --state-dir "$work/target/state" | tr -d '\n')
qport=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/target/ferry.toml" <<EOF
[appliance]
name = "site-b"
state_dir = "$work/target/state"
control_socket = "$work/target/ferry.sock"

[target]
listen = "127.0.0.1:$qport"
storage_dir = "$work/target/storage"
peers = [{ name = "site-a", fingerprint = "$source_fp" }]
storage = "rbd"

[target.rbd]
pool = "rbd"
conf = "$conf"
keyring = "$keyring"
client = "admin"
EOF
cat > "$work/source/ferry.toml" <<EOF
[appliance]
name = "site-a"
state_dir = "$work/source/state"
control_socket = "$work/source/ferry.sock"

[source]
journal_size = "256MiB"
target = "127.0.0.1:$qport"
target_fingerprint = "$target_fp"

[[source.group]]
name = "app"
recovery_point_interval = "1h"

[[source.machine]]
name = "web-1"
group = "app"
disks = [{ name = "os", path = "$disk", export = "$work/source/export.sock" }]
EOF

status_json() { "$ferry" status --socket "$1" --json 2>/dev/null; }
wait_socket() {
    for _ in $(seq 1 600); do
        status_json "$1" >/dev/null && return 0
        sleep 0.1
    done
    echo "rbd: no control socket at $1" >&2
    exit 1
}
caught_up() {
    status_json "$work/source/ferry.sock" | python3 -c '
import json, sys
d = json.load(sys.stdin)["disks"][0]
sys.exit(0 if d["state"] == "protected" and d["acked_sequence"] >= d["last_sequence"] else 1)' 2>/dev/null
}
wait_caught_up() { # what
    local start=$SECONDS
    until caught_up; do
        if [ $(( SECONDS - start )) -ge "$deadline_s" ]; then
            echo "rbd: timed out waiting for $1" >&2
            tail -20 "$work/source/ferry.log" "$work/target/ferry.log" >&2
            exit 1
        fi
        sleep 0.05
    done
}

RUST_LOG=info "$ferry" run --config "$work/target/ferry.toml" </dev/null >/dev/null 2>>"$work/target/ferry.log" &
target_pid=$!
wait_socket "$work/target/ferry.sock"
drop_caches
t0=$(now_ns)
RUST_LOG=info "$ferry" run --config "$work/source/ferry.toml" </dev/null >/dev/null 2>>"$work/source/ferry.log" &
source_pid=$!
wait_socket "$work/source/ferry.sock"
wait_caught_up "initial replication"
ferry_ms=$(ms_since "$t0")
echo "ferry initial replication into RBD: ${ferry_ms} ms" >&2
import2_ms=$(import_pass import-2)
echo "rbd import (2): ${import2_ms} ms" >&2
load_a_end=$(load)
image="rbd/ferry.site-a+web-1+os"
r export --no-progress "$image" "$work/replica.raw" >/dev/null
cmp -s "$disk" "$work/replica.raw" || { echo "rbd: the replica differs from the disk" >&2; exit 1; }
rm -f "$work/replica.raw"
r rm --no-progress rbd/import-1 >/dev/null
r rm --no-progress rbd/import-2 >/dev/null

# ---- (b)/(c): 4 KiB random writes through the export until acknowledged by the target.
rand_bytes=$(( rand_mib << 20 ))
fio_writes() { # seed -> ms until the target acknowledged every write
    local t0
    t0=$(now_ns)
    fio --name=rand --ioengine=nbd \
        --uri="nbd+unix:///web-1/os?socket=$work/source/export.sock" \
        --rw=randwrite --bs=4k --iodepth=16 --size="$((disk_mib))m" --io_size="$rand_bytes" \
        --randseed="$1" --norandommap --output-format=terse >/dev/null
    wait_caught_up "random writes"
    ms_since "$t0"
}
iops() { echo $(( rand_bytes / 4096 * 1000 / $1 )); }
rbd_bench() { # type extra-args... -> ops/s
    r create --size "${disk_mib}M" --image-feature "$features" rbd/bench >/dev/null
    r bench --io-type "$@" --io-size 4K --io-threads 16 --io-total "$rand_bytes" \
        --io-pattern rand rbd/bench 2>/dev/null | awk '/elapsed:/ {print int($4)}'
    r rm --no-progress rbd/bench >/dev/null
}
load_b=$(load)
plain_ms=$(fio_writes 1)
bench_write_iops=$(rbd_bench write)
echo "4 KiB random: ferry $(iops "$plain_ms") IOPS replicated, rbd bench ${bench_write_iops} IOPS" >&2

cutter() { # cuts a point every 0.5 s until killed
    while true; do
        "$ferry" recovery-point create --group app --socket "$work/source/ferry.sock" >/dev/null 2>&1 || true
        sleep 0.5
    done
}
cutter &
cutter_pid=$!
points_ms=$(fio_writes 2)
kill "$cutter_pid"; wait "$cutter_pid" 2>/dev/null || true
plain2_ms=$(fio_writes 3)
snapshots=$(r snap ls "$image" | grep -c ferry-point- || true)
echo "4 KiB random with points every 0.5 s: $(iops "$points_ms") IOPS ($snapshots point snapshots), without: $(iops "$plain2_ms")" >&2

# Point view: a test failover to the newest point answers with a readable export.
point=$("$ferry" recovery-point create --group app --socket "$work/source/ferry.sock" | tr -d '\n')
until "$ferry" recovery-point list --group app --json --socket "$work/target/ferry.sock" \
    | python3 -c 'import json,sys; p=[x for x in json.load(sys.stdin)["points"] if x["id"]==int(sys.argv[1]) and x["usable"]]; sys.exit(0 if p else 1)' "$point"; do
    sleep 0.05
done
t0=$(now_ns)
"$ferry" failover --group app --point "$point" --test --json --socket "$work/target/ferry.sock" >/dev/null
failover_ms=$(ms_since "$t0")
"$ferry" failover cleanup --group app --socket "$work/target/ferry.sock" >/dev/null
echo "test failover to a point (snapshot view): ${failover_ms} ms" >&2

bench_rw_iops=$(rbd_bench readwrite --rw-mix-read 33)
load_b_end=$(load)
echo "rbd bench 4 KiB random 33% reads: ${bench_rw_iops} IOPS" >&2

python3 - "$disk_mib" "$import1_ms" "$ferry_ms" "$import2_ms" "$load_a" "$load_a_end" \
    "$(iops "$plain_ms")" "$bench_write_iops" "$(iops "$points_ms")" "$(iops "$plain2_ms")" \
    "$snapshots" "$failover_ms" "$bench_rw_iops" "$load_b" "$load_b_end" "$rand_mib" <<'EOF'
import sys
(mib, i1, f, i2, la, la2, fi, bw, pi, fi2, snaps, fo, brw, lb, lb2, rmib) = sys.argv[1:]
mib, i1, f, i2 = int(mib), int(i1), int(f), int(i2)
best = min(i1, i2)
print(f"(a) initial replication of {mib} MiB into RBD: ferry {f} ms ({mib/1.048576/f*1000/1000:.0f} MB/s); "
      f"rbd import {i1} ms before, {i2} ms after; ratio (best import time / ferry time) {best/f:.2f}x; load {la} -> {la2}")
fi, bw, pi, fi2, brw = int(fi), int(bw), int(pi), int(fi2), int(brw)
print(f"(b) {rmib} MiB of 4 KiB random writes, replicated into RBD: ferry {fi} IOPS, rbd bench write {bw} IOPS, ratio {fi/bw:.2f}x; load {lb} -> {lb2}")
print(f"(c) same while cutting points every 0.5 s: {pi} IOPS ({snaps} point snapshots kept), without {fi2} IOPS: {pi/fi2:.2f}x; test failover to a point answered in {fo} ms")
print(f"(d) rbd bench 4 KiB random, 33% reads (undo-in-pool floor): {brw} IOPS = {brw/bw:.2f}x of pure writes; per replicated write 3 ops -> at most {brw/3:.0f} replicated IOPS")
EOF
