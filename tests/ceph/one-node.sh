#!/usr/bin/env bash
# Starts a one-node Ceph cluster (1 mon, 1 mgr, 1 bluestore OSD on a sparse file) under DIR,
# bound to 127.0.0.1 on PORT, with no systemd, cephadm or loop device. Daemons run in the
# foreground (-f) in the background of this script; their PIDs go to DIR/pids, one a line, so
# the caller stops them by PID. Prints nothing on success; DIR/ceph.conf and
# DIR/ceph.client.admin.keyring are then ready, with pool `rbd` initialised.
# Usage: one-node.sh DIR PORT   (env FERRY_CEPH_OSD_BYTES: size of the sparse OSD file, 4 GiB)
set -euo pipefail
dir=$1
port=$2
mkdir -p "$dir"/mon "$dir"/mgr "$dir"/osd "$dir"/run "$dir"/log
: >"$dir/pids"
fsid=$(uuidgen)
conf=$dir/ceph.conf
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$port
public_addr = 127.0.0.1
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_autoscale_mode = off
mon_data_avail_warn = 1
osd_crush_chooseleaf_type = 0
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
ms_bind_ipv4 = true
ms_bind_ipv6 = false
[client]
rados_osd_op_timeout = 30
rados_mon_op_timeout = 30
admin_socket =
log_file = $dir/log/\$name.\$pid.log
keyring = $dir/ceph.client.admin.keyring
[mon]
keyring = \$mon_data/keyring
mon_data = $dir/mon/\$name
mon_initial_members = a
[mgr]
keyring = \$mgr_data/keyring
mgr_data = $dir/mgr/\$name
[osd]
keyring = \$osd_data/keyring
osd_data = $dir/osd/\$name
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = ${FERRY_CEPH_OSD_BYTES:-4294967296}
bluestore_fsck_on_mkfs = false
osd_memory_target = 1073741824
bluestore_cache_autotune = false
bluestore_cache_size = 134217728
CONF

at=ceph-authtool
$at --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
$at --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
$at "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
ceph-mon -c "$conf" -f -i a >>"$dir/log/mon.out" 2>&1 &
echo $! >>"$dir/pids"

c() { timeout 60 ceph -c "$conf" "$@"; }
mkdir -p "$dir/mgr/mgr.x"
c auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
  -o "$dir/mgr/mgr.x/keyring"
ceph-mgr -c "$conf" -f -i x >>"$dir/log/mgr.out" 2>&1 &
echo $! >>"$dir/pids"

osd_uuid=$(uuidgen)
id=$(c osd new "$osd_uuid")
mkdir -p "$dir/osd/osd.$id"
c auth get-or-create "osd.$id" mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' \
  -o "$dir/osd/osd.$id/keyring"
ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/osd-mkfs.out" 2>&1
ceph-osd -c "$conf" -f -i "$id" >>"$dir/log/osd.out" 2>&1 &
echo $! >>"$dir/pids"

c osd pool create rbd 8 >/dev/null 2>&1
c osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
timeout 60 rbd -c "$conf" pool init rbd
