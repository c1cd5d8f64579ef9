#!/usr/bin/env bash
# NBD capture benchmark: fio's nbd engine against a Ferry capture export (every write journaled
# into the mmap cache journal, then applied to the image) and, in the same run, against
# `nbdkit file`. Like is compared with like: Ferry (O_DIRECT image writes, each answered once
# the device has it) against `nbdkit file cache=none` (page cache, then sync_file_range +
# FADV_DONTNEED: it too waits for the data to reach the device), and Ferry forced onto the page
# cache (`direct=off`, comparison only) against plain `nbdkit file` (answered from the page
# cache). Two workloads:
# 4 KiB random writes at QD32 and 1 MiB sequential writes at QD8. Every server serves the same
# warmed image file (on this thin-provisioned virtio disk two files of the same size differed
# by up to 10% in fio's own O_DIRECT rate, which per-server files folded into the ratios); its
# page cache is written back and dropped between servers, so no server inherits another's
# pages. Servers alternate round by round so drift on this shared machine hits all alike; the
# medians and the ratios go into the "## NBD capture" section of benches/RESULTS.md (replaced
# on every run). Each round also measures the device with fio alone (io_uring,
# O_DIRECT, 1 MiB sequential writes QD8): one stream on the servers' image, and two streams at
# once (that image and a second file).
# A stand-in target acknowledges every record at once: by default Ferry then releases it
# unflushed, as the daemon does (records ship before they are durable, under a persisted
# sequence floor), so journal pages reach the disk only through FLUSH/FUA (none here) or the
# kernel's background writeback. `ferry-flush` makes the journal durable before each release,
# as a source without a floor must: every byte is written twice on this one disk (journal, then
# image), so half of the two streams' total is the most that row can reach; the table states
# that bound.
#
# Usage: benches/nbd_capture.sh [ROUNDS] [SECONDS]      (defaults: 3 rounds of 10 s per job)
# Env:   FERRY_BENCH_DIR   where the image and journal go (default: a temp dir under /var/tmp)
#        FERRY_BENCH_IMAGE_MIB  image size (default 2048)
set -euo pipefail

rounds=${1:-3}
seconds=${2:-10}
image_mib=${FERRY_BENCH_IMAGE_MIB:-2048}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${FERRY_BENCH_DIR:-$(mktemp -d /var/tmp/ferry-nbd-bench.XXXXXX)}
mkdir -p "$work"
results="$root/benches/RESULTS.md"

for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "nbd_capture: $tool is not installed" >&2; exit 1; }
done

echo "building capture_serve (release)" >&2
(cd "$root" && cargo build --release -q -p ferry-appliance --example capture_serve)
serve="$root/target/release/examples/capture_serve"

server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    if [ -z "${FERRY_BENCH_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

kinds="nbdkit ferry-pagecache nbdkit-none ferry ferry-flush ferry-memjournal"

# The host disk is thin-provisioned: the first pass over a new file is 2-3x slower. Write each
# image once so every run sees allocated blocks.
image="$work/capture.raw"
for file in "$image" "$work/device-b.raw"; do
    echo "warming a ${image_mib} MiB image $file" >&2
    dd if=/dev/zero of="$file" bs=1M count="$image_mib" oflag=direct conv=fsync status=none
done

# Writes the image's dirty pages back and drops its page cache: a page-cache server's leftovers
# must not slow the next server's O_DIRECT writes (they would be written back and invalidated
# first) nor serve its reads.
evict_image() {
    python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$image"
}

wait_for_socket() {
    for _ in $(seq 1 6000); do
        [ -S "$1" ] && return 0
        sleep 0.02
    done
    echo "nbd_capture: no socket at $1" >&2
    exit 1
}

start_server() { # kind socket
    rm -f "$2"
    rm -rf "$work/state"
    case "$1" in
        nbdkit) nbdkit --foreground --exit-with-parent --unix "$2" file "$image" 2>"$work/nbdkit.log" & ;;
        nbdkit-none) nbdkit --foreground --exit-with-parent --unix "$2" file "$image" cache=none 2>"$work/nbdkit.log" & ;;
        ferry) "$serve" "$image" "$2" "$work/state" direct=auto journal_mib=1024 2>"$work/ferry.log" & ;;
        ferry-flush) "$serve" "$image" "$2" "$work/state" direct=auto journal_mib=1024 release=flush 2>"$work/ferry.log" & ;;
        ferry-pagecache) "$serve" "$image" "$2" "$work/state" direct=off journal_mib=1024 2>"$work/ferry.log" & ;;
        ferry-memjournal) "$serve" "$image" "$2" "$work/state" direct=auto journal_mib=256 journal=mem 2>"$work/ferry.log" & ;;
    esac
    server_pid=$!
    wait_for_socket "$2"
}

stop_server() {
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    evict_image
}

run_fio() { # socket rw bs iodepth -> "bytes_per_s iops"
    fio --name=job --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" \
        --iodepth="$4" --size="${image_mib}M" --time_based --runtime="$seconds" --ramp_time=1 \
        --output-format=json --output="$work/fio.json" >/dev/null 2>&1
    python3 -c 'import json,sys; w=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(int(w["bw_bytes"]), int(w["iops"]))' "$work/fio.json"
}

run_device() { # streams -> total bytes_per_s of that many 1 MiB O_DIRECT write streams at once
    local jobs=(--name=a --filename="$image")
    if [ "$1" = 2 ]; then jobs+=(--name=b --filename="$work/device-b.raw"); fi
    fio --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 --size="${image_mib}M" \
        --time_based --runtime="$seconds" --ramp_time=1 --output-format=json \
        --output="$work/fio.json" "${jobs[@]}" >/dev/null 2>&1
    python3 -c 'import json,sys; print(int(sum(j["write"]["bw_bytes"] for j in json.load(open(sys.argv[1]))["jobs"])), 0)' "$work/fio.json"
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A figures
for round in $(seq 1 "$rounds"); do
    for kind in $kinds; do
        socket="$work/$kind.sock"
        start_server "$kind" "$socket"
        figures[$kind,rand,$round]=$(run_fio "$socket" randwrite 4k 32)
        figures[$kind,seq,$round]=$(run_fio "$socket" write 1M 8)
        stop_server
        echo "round $round $kind: rand ${figures[$kind,rand,$round]} seq ${figures[$kind,seq,$round]}" >&2
    done
    figures[device1,seq,$round]=$(run_device 1)
    figures[device2,seq,$round]=$(run_device 2)
    echo "round $round device: one stream ${figures[device1,seq,$round]} two streams ${figures[device2,seq,$round]}" >&2
done

# Medians per server and workload.
summary=$( (for kind in $kinds; do for job in rand seq; do
    for round in $(seq 1 "$rounds"); do echo "$kind $job ${figures[$kind,$job,$round]}"; done
done; done; for kind in device1 device2; do
    for round in $(seq 1 "$rounds"); do echo "$kind seq ${figures[$kind,seq,$round]}"; done
done) | python3 -c '
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in sys.stdin:
    kind, job, bw, iops = line.split()
    rows[(kind, job)].append((int(bw), int(iops)))
med = {k: (statistics.median(b for b, _ in v), statistics.median(i for _, i in v)) for k, v in rows.items()}
def ratio(kind, base, job): return med[(kind, job)][0] / med[(base, job)][0]
print("| server | guarantee before FLUSH/FUA | 4 KiB random write QD32 | ratio | 1 MiB sequential write QD8 | ratio |")
print("|---|---|---|---|---|---|")
rows = [
    ("nbdkit-none", "nbdkit-none", "nbdkit file cache=none (baseline of the next two rows)", "writeback started (sync_file_range) before the reply, not flushed"),
    ("ferry", "nbdkit-none", "Ferry capture, mmap journal + O_DIRECT (default)", "journaled; under 64 KiB also sent to the device (O_DIRECT), 64 KiB and more answered once journaled while their disk write goes on (write-behind, 32 MiB window); not flushed; journal records released unflushed once acknowledged"),
    ("ferry-flush", "nbdkit-none", "Ferry capture, as above, journal flushed before each release (no sequence floor, comparison only)", "as above; journal msync every 20 ms"),
    ("ferry-memjournal", "nbdkit-none", "Ferry capture, O_DIRECT, journal in memory (comparison only)", "disk as above; journal lost in a crash"),
    ("nbdkit", "nbdkit", "nbdkit file (baseline of the next row)", "in the page cache only"),
    ("ferry-pagecache", "nbdkit", "Ferry capture, mmap journal + page cache (direct=off, comparison only)", "in the page cache only"),
]
for kind, base, label, guarantee in rows:
    r, s = med[(kind, "rand")], med[(kind, "seq")]
    rr, rs = ratio(kind, base, "rand"), ratio(kind, base, "seq")
    print(f"| {label} | {guarantee} | {r[1]/1000:.1f}K IOPS ({r[0]/1e6:.0f} MB/s) | {rr:.2f}x | {s[0]/1e9:.2f} GB/s | {rs:.2f}x |")
one, two = med[("device1", "seq")][0], med[("device2", "seq")][0]
base = med[("nbdkit-none", "seq")][0]
bound = two / 2
print()
print(f"Device alone (fio io_uring O_DIRECT, 1 MiB sequential QD8): one stream {one/1e9:.2f} GB/s, "
      f"two streams at once {two/1e9:.2f} GB/s in total. With the journal flushed before each release "
      f"Ferry writes each byte to this disk twice (journal and image), so the 1 MiB bound of that row here is "
      f"about {bound/1e9:.2f} GB/s, {bound/base:.2f}x the same-run nbdkit file cache=none figure (which "
      f"writes each byte once, at {base/one:.2f}x the one-stream device figure).")
')
echo "$summary"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

section=$(cat <<EOF
## NBD capture

\`benches/nbd_capture.sh $rounds $seconds\` on $(date -u +"%Y-%m-%d %H:%M") UTC, commit $(git -C "$root" rev-parse --short HEAD) ($(nproc) cores, $(uname -r),
load average 1/5/15 min $load_start at the start, $load_end at the end): fio
\`ioengine=nbd\` over a unix socket against a Ferry capture export (release build of
\`appliance/examples/capture_serve\`: every write journaled into a 1 GiB mmap journal, which a
stand-in target acknowledges every 20 ms — released unflushed by default, as the daemon does,
or flushed (msync) first in the \`release=flush\` row — then written to the image) and against
\`nbdkit file\`, all on the same warmed ${image_mib} MiB image (written back and dropped from the
page cache between servers), alternating server by server, $rounds rounds of ${seconds} s per
job; medians, GB = 10^9 B. Ratio = Ferry / the nbdkit row with the same disk guarantee
(page cache, or waiting for the device). fio sends no FLUSH and
no FUA here; with them every server makes the data durable before the reply (Ferry: journal
msync + image fdatasync).

$summary
EOF
)

python3 - "$results" "$section" <<'PY'
import re, sys, pathlib
path, section = pathlib.Path(sys.argv[1]), sys.argv[2].rstrip() + "\n"
text = path.read_text() if path.exists() else "# Benchmark results\n\nEach section is written by the benchmark named in it.\n"
pattern = re.compile(r"^## NBD capture\n.*?(?=^## |\Z)", re.S | re.M)
text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
path.write_text(text)
PY
echo "wrote the NBD capture section of $results" >&2
