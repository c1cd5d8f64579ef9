#!/usr/bin/env bash
# Replication benchmark (issue 4), two figures in one run:
#  (a) initial replication of a random-data disk (default 2 GiB) from a source `ferry run` to a
#      target `ferry run` on loopback, timed from the source's start until the disk is
#      `protected` and the target acknowledged everything journaled; beside it, in the same run,
#      `qemu-img convert -n -f raw -O raw` of the same file to a local file plus `sync`.
#  (b) the bytes that cross the link when 1% of the disk's 4 KiB blocks change, against the
#      changed bytes: (b1) with the target up (the writes travel as journal records), and (b2)
#      with the target stopped and a small journal that overflows to the dirty bitmap, so the
#      changes travel as a resync when the target comes back.
# Both appliances run in a private network namespace of their own; its loopback carries only
# their QUIC traffic, so the `lo` tx byte counter of that namespace is the link bytes (both
# directions, IP and UDP headers included: an upper bound on what the source sends).
# Results go to the "## Replication (issue 4)" section of benches/RESULTS.md (replaced per run).
#
# Usage: benches/replication.sh            (as root: network namespace, drop_caches)
# Env:   FERRY_BENCH_DIR        where disk, copy and replica go (default: temp dir under /var/tmp)
#        FERRY_BENCH_DISK_MIB   disk size (default 2048)
#        FERRY_BENCH_SEED       seed of the changed-block choice (default: from $RANDOM, printed)
#        FERRY_BIN              a release ferry binary to use instead of building one
set -euo pipefail

disk_mib=${FERRY_BENCH_DISK_MIB:-2048}
seed=${FERRY_BENCH_SEED:-$RANDOM}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${FERRY_BENCH_DIR:-$(mktemp -d /var/tmp/ferry-repl-bench.XXXXXX)}
mkdir -p "$work"
results="$root/benches/RESULTS.md"
netns="ferrybench$$"
deadline_s=900

[ "$(id -u)" = 0 ] || { echo "replication: run as root (netns, drop_caches)" >&2; exit 1; }
for tool in qemu-img qemu-io python3 openssl ip cmp; do
    command -v "$tool" >/dev/null || { echo "replication: $tool is not installed" >&2; exit 1; }
done
need_kib=$(( disk_mib * 1024 * 2 + 262144 ))
avail_kib=$(df -Pk "$work" | awk 'NR==2 {print $4}')
[ "$avail_kib" -ge "$need_kib" ] || { echo "replication: need $need_kib KiB free in $work, have $avail_kib" >&2; exit 1; }

echo "seed $seed" >&2
if [ -z "${FERRY_BIN:-}" ]; then
    echo "building ferry (release)" >&2
    (cd "$root" && cargo build --release -q -p ferry --bin ferry)
fi
ferry=${FERRY_BIN:-$root/target/release/ferry}

source_pid=""
target_pid=""
stop_pid() { # pid: SIGTERM, bounded wait, then SIGKILL
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "replication: pid $pid did not stop in 30 s, killing" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$source_pid"
    stop_pid "$target_pid"
    ip netns del "$netns" 2>/dev/null || true
    if [ -z "${FERRY_BENCH_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

ip netns add "$netns"
ip netns exec "$netns" ip link set lo up
lo_bytes() { # tx bytes of the namespace's loopback: every packet, either direction, once
    ip netns exec "$netns" cat /proc/net/dev | awk '$1 == "lo:" {print $10}'
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now_ns() { date +%s%N; }

disk="$work/disk.raw"
copy="$work/copy.raw"
echo "writing ${disk_mib} MiB of random data" >&2
# head closes the pipe early: openssl's SIGPIPE is expected, the size is checked instead.
set +o pipefail
openssl enc -aes-128-ctr -nosalt -pass "pass:ferry-$seed" -in /dev/zero 2>/dev/null \
    | head -c "$((disk_mib << 20))" > "$disk"
set -o pipefail
[ "$(stat -c %s "$disk")" = "$((disk_mib << 20))" ] || { echo "replication: short disk file" >&2; exit 1; }
sync
disk_bytes=$(stat -c %s "$disk")

# ---- (a) baseline: qemu-img convert. Pass 1 lands on a new (thin, cold) file; pass 2 rewrites
# the now-allocated file, as REFERENCE.md advises.
qemu_pass() {
    drop_caches
    local t0 t1
    t0=$(now_ns)
    qemu-img convert -n -f raw -O raw "$disk" "$copy"
    sync
    t1=$(now_ns)
    echo $(( (t1 - t0) / 1000000 ))
}
truncate -s "$disk_bytes" "$copy"
qemu_cold_ms=$(qemu_pass)
qemu_warm_ms=$(qemu_pass)
cmp -s "$disk" "$copy" || { echo "replication: qemu-img copy differs" >&2; exit 1; }
rm -f "$copy" # room for the replica
echo "qemu-img convert: cold ${qemu_cold_ms} ms, warm ${qemu_warm_ms} ms" >&2

# ---- (a) Ferry: a target and a source appliance.
mkdir -p "$work/source/state" "$work/target/state" "$work/target/storage"
source_fp=$("$ferry" identity --state-dir "$work/source/state" | tr -d '\n')
target_fp=$("$ferry" identity --state-dir "$work/target/state" | tr -d '\n')
port=$(( 40000 + $$ % 20000 )) # a private namespace: nothing else listens
cat > "$work/target/ferry.toml" <<EOF
[appliance]
name = "site-b"
state_dir = "$work/target/state"
control_socket = "$work/target/ferry.sock"

[target]
listen = "127.0.0.1:$port"
storage_dir = "$work/target/storage"
peers = [{ name = "site-a", fingerprint = "$source_fp" }]
EOF
# 16 MiB journal: holds the 1% change set of (b1) while it streams, overflows in (b2).
cat > "$work/source/ferry.toml" <<EOF
[appliance]
name = "site-a"
state_dir = "$work/source/state"
control_socket = "$work/source/ferry.sock"

[source]
journal_size = "16MiB"
target = "127.0.0.1:$port"
target_fingerprint = "$target_fp"

[[source.group]]
name = "app"

[[source.machine]]
name = "web-1"
group = "app"
disks = [{ name = "os", path = "$disk", export = "$work/source/export.sock" }]
EOF

status_json() { "$ferry" status --socket "$1" --json 2>/dev/null; }
wait_socket() { # socket
    for _ in $(seq 1 600); do
        status_json "$1" >/dev/null && return 0
        sleep 0.1
    done
    echo "replication: no control socket at $1" >&2
    exit 1
}
start_target() {
    ip netns exec "$netns" env RUST_LOG=info "$ferry" run --config "$work/target/ferry.toml" \
        </dev/null >/dev/null 2>>"$work/target/ferry.log" &
    target_pid=$!
    wait_socket "$work/target/ferry.sock"
}
start_source() {
    ip netns exec "$netns" env RUST_LOG=info "$ferry" run --config "$work/source/ferry.toml" \
        </dev/null >/dev/null 2>>"$work/source/ferry.log" &
    source_pid=$!
}
disk_field() { # field of disks[0] of the source
    status_json "$work/source/ferry.sock" | python3 -c \
        'import json,sys; print(json.load(sys.stdin)["disks"][0][sys.argv[1]])' "$1" 2>/dev/null || true
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
            echo "replication: timed out waiting for $1; source state: $(disk_field state)" >&2
            tail -20 "$work/source/ferry.log" "$work/target/ferry.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

start_target
drop_caches
load_a=$(cut -d' ' -f1-3 /proc/loadavg)
bytes0=$(lo_bytes)
t0=$(now_ns)
start_source
wait_caught_up "initial replication"
t1=$(now_ns)
ferry_ms=$(( (t1 - t0) / 1000000 ))
initial_link_bytes=$(( $(lo_bytes) - bytes0 ))
echo "ferry initial replication: ${ferry_ms} ms, ${initial_link_bytes} link bytes" >&2

# ---- (b) 1% of the 4 KiB blocks change.
blocks=$(( disk_bytes / 4096 ))
changed=$(( blocks / 100 ))
changed_bytes=$(( changed * 4096 ))
export_uri="nbd+unix:///web-1/os?socket=$work/source/export.sock"
write_changes() { # seed pattern_base -> qemu-io writes of $changed distinct random blocks
    python3 - "$1" "$blocks" "$changed" "$2" > "$work/qemu-io.cmds" <<'PY'
import random, sys
seed, blocks, changed, base = map(int, sys.argv[1:])
rng = random.Random(seed)
for i, block in enumerate(sorted(rng.sample(range(blocks), changed))):
    print(f"write -P {(base + i) % 250 + 1} {block * 4096} 4k")
PY
    local args=()
    while IFS= read -r command; do args+=(-c "$command"); done < "$work/qemu-io.cmds"
    qemu-io -f raw "$export_uri" "${args[@]}" > "$work/qemu-io.out"
    if grep -q failed "$work/qemu-io.out"; then
        echo "replication: qemu-io write failed" >&2; exit 1
    fi
}

# (b1) target up: the changes stream as journal records.
bytes0=$(lo_bytes)
write_changes "$seed" 0
b1_state=$(disk_field state)
wait_caught_up "the journal to drain"
b1_link_bytes=$(( $(lo_bytes) - bytes0 ))
echo "b1 (journal): $changed_bytes changed bytes, $b1_link_bytes link bytes, state after writes: $b1_state" >&2

# (b2) target stopped: the 16 MiB journal overflows to the bitmap; resync on return.
stop_pid "$target_pid"; target_pid=""
write_changes "$((seed + 1))" 100
b2_state=$(disk_field state)
bytes0=$(lo_bytes)
t0=$(now_ns)
start_target
wait_caught_up "the resync"
t1=$(now_ns)
b2_ms=$(( (t1 - t0) / 1000000 ))
b2_link_bytes=$(( $(lo_bytes) - bytes0 ))
echo "b2 (resync): $changed_bytes changed bytes, $b2_link_bytes link bytes in $b2_ms ms, state before: $b2_state" >&2

# Correctness: ferry verify, then cmp of disk and replica.
verify="failed"
"$ferry" verify --all --socket "$work/source/ferry.sock" > "$work/verify.out" 2>&1 && verify="identical"
replica=$(status_json "$work/target/ferry.sock" | python3 -c \
    'import json,sys; print(json.load(sys.stdin)["replicas"][0]["replica_path"])')
stop_pid "$source_pid"; source_pid=""
stop_pid "$target_pid"; target_pid=""
cmp_result="differs"
cmp -s "$disk" "$replica" && cmp_result="identical"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
echo "verify: $verify, cmp: $cmp_result" >&2

# ---- Report.
python3 - "$results" <<PY
import sys
gb = lambda b, ms: b / (ms / 1000) / 1e9
disk_bytes, ferry_ms = $disk_bytes, $ferry_ms
qc, qw = $qemu_cold_ms, $qemu_warm_ms
changed = $changed_bytes
b1, b2 = $b1_link_bytes, $b2_link_bytes
section = f"""## Replication (issue 4)

Run of \`benches/replication.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), seed $seed. Machine:
$(nproc) vCPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), Linux $(uname -r),
ext4 on one virtio-blk disk (vda), release build. Load average (1/5/15 min) at the start of (a):
$load_a; at the end: $load_end — the machine was shared with other agents building and
testing, so only same-run ratios mean something.

(a) Initial replication of a {disk_bytes / 2**30:.2f} GiB random-data disk (no zero extents):
source and target \`ferry run\` in a private network namespace, QUIC over its loopback, timed
from the source's start to \`protected\` with acked >= last sequence (the target acknowledges
only durable data). Baseline in the same run: \`qemu-img convert -n -f raw -O raw\` of the same
file to a local file + \`sync\`. Page cache dropped before each timed run. The replica is a new
file (first pass over thin-provisioned storage, 2-3x slower per REFERENCE.md); the qemu-img
copy ran twice, onto a new file (cold) and again onto the same, now allocated, file (warm).

| what | time | GB/s | Ferry / this |
|---|---|---|---|
| Ferry initial replication (new replica file) | {ferry_ms / 1000:.1f} s | {gb(disk_bytes, ferry_ms):.3f} | 1.00x |
| qemu-img convert -n + sync, new file (cold) | {qc / 1000:.1f} s | {gb(disk_bytes, qc):.3f} | **{qc / ferry_ms:.2f}x** |
| qemu-img convert -n + sync, allocated file (warm) | {qw / 1000:.1f} s | {gb(disk_bytes, qw):.3f} | **{qw / ferry_ms:.2f}x** |

Link bytes of the initial replication (both directions, IP/UDP/QUIC headers included):
{$initial_link_bytes / 1e9:.3f} GB for {disk_bytes / 1e9:.3f} GB of disk ({$initial_link_bytes / disk_bytes:.3f}x).

(b) 1% of the 4 KiB blocks ({changed // 4096} distinct random blocks, {changed / 1e6:.1f} MB)
written through the source's NBD export with one qemu-io invocation; link bytes counted on the
namespace's loopback (its tx counter: every packet of either direction once, with IP/UDP/QUIC
headers, acks and, in b2, the reconnection handshake — an upper bound on what the source sends).
Journal 16 MiB.

| case | link bytes | link / changed bytes |
|---|---|---|
| b1: target up, changes stream as journal records (source state right after the writes: $b1_state) | {b1 / 1e6:.1f} MB | **{b1 / changed:.2f}x** |
| b2: target stopped, journal overflowed (state: $b2_state), resync of the dirty bitmap on return ({$b2_ms / 1000:.1f} s) | {b2 / 1e6:.1f} MB | **{b2 / changed:.2f}x** |

Afterwards \`ferry verify --all\`: $verify; \`cmp\` of disk and replica: $cmp_result.
"""
path = sys.argv[1]
text = open(path).read()
start = text.find("## Replication (issue 4)")
if start >= 0:
    end = text.find("\n## ", start + 1)
    text = text[:start] + (text[end + 1:] if end >= 0 else "")
text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
