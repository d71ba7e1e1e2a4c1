#!/usr/bin/env bash
# The main job, end to end on the embedded local-directory store.
# Part 1, one VM on its own: protect a disk image and a directory tree, replicate them, change
# them, replicate again, list the recovery points, and restore both points — verifying every
# restored byte against the source.
# Part 2, a replication group: a coordinator on port 20004 (mutual TLS), two agents enrolled
# with one-time tokens, a crash-consistent and an app-consistent point shared by both VMs,
# listed with the members each covers, and restored.
# Part 3, recovery: the coordinator processes points into a target store (the DR region); with
# the source region gone, a DR drill fails the group over to its latest multi-VM app-consistent
# point from the target store alone, verifies it, and cleans it up.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

# The test build's profile (dependencies optimised), so `.ci/run` builds the workspace once.
say "building"
cargo build --locked -q --workspace --bins
BIN="$ROOT/target/debug"
DEMO="$ROOT/target/demo"
# A run killed half-way may have left part 2's filesystems mounted.
for m in $(findmnt -rn -o TARGET | grep -F "$DEMO/" || true); do umount "$m" || umount -l "$m"; done
rm -rf "$DEMO" && mkdir -p "$DEMO"
cd "$DEMO"

say "making a 256 MiB disk image (zeros, text, random) and a directory tree"
python3 - <<'PY'
import os, random
random.seed(7)
with open("disk.img", "wb") as f:
    f.write(bytes(85 << 20))
    line = b"2026-11-25 lifeboat demo: the quick brown fox jumps over the lazy dog 0123456789\n"
    f.write((line * ((86 << 20) // len(line) + 1))[: 86 << 20])
    f.write(os.urandom(85 << 20))
os.makedirs("data/app/logs", exist_ok=True)
for i in range(50):
    with open(f"data/app/logs/{i:03}.log", "w") as f:
        f.write("".join(f"event {i}-{j}\n" for j in range(2000)))
with open("data/app/state.bin", "wb") as f:
    f.write(os.urandom(3 << 20))
os.symlink("app/state.bin", "data/current")
PY

cat > agent.toml <<TOML
vm = "demo-vm"
group = "demo"
state_dir = "$DEMO/state"

[store]
kind = "local"
path = "$DEMO/cache-store"

[[disk]]
id = "os"
kind = "image"
path = "$DEMO/disk.img"
consistency = "hooks"
[disk.hooks]
pre = ["sync"]
post = []

[[disk]]
id = "data"
kind = "directory"
path = "$DEMO/data"
# App-consistent points run these around the cut (here: flush, then log the thaw). With
# root, add mount = "..." to also freeze the filesystem.
consistency = "hooks"
[disk.hooks]
pre = ["sync", "echo quiesced >> $DEMO/hooks.log"]
post = ["echo resumed >> $DEMO/hooks.log"]
timeout = "10s"
TOML

say "initial replication"
"$BIN/lifeboat-agent" -c agent.toml sync
cp disk.img first.img && cp -a data first-data

say "changing 5% of the image's blocks and some files"
python3 - <<'PY'
import os, random
random.seed(11)
size = os.path.getsize("disk.img")
blocks = size // 65536
with open("disk.img", "r+b") as f:
    for b in random.sample(range(blocks), blocks // 20):
        f.seek(b * 65536 + random.randrange(65536 - 512))
        f.write(os.urandom(512))
with open("data/app/logs/007.log", "a") as f:
    f.write("appended after the first point\n")
os.remove("data/app/logs/013.log")
with open("data/app/new.txt", "w") as f:
    f.write("created after the first point\n")
PY

say "incremental replication"
"$BIN/lifeboat-agent" -c agent.toml sync

say "an app-consistent snapshot (pre/post hooks around the cut)"
echo "written just before the snapshot" > data/app/latest.txt
"$BIN/lifeboat-agent" -c agent.toml snapshot --app-consistent
cat hooks.log
"$BIN/lifeboat-agent" -c agent.toml status

say "recovery points"
"$BIN/lifeboat" points list --store cache-store --group demo
# awk reads the whole listing: a reader that stops early would leave the writer a broken pipe,
# which pipefail reports.
first=$("$BIN/lifeboat" points list --store cache-store --group demo | awk 'NR == 1 { print $1 }')

say "restoring the latest point and verifying it against the source"
"$BIN/lifeboat" restore --store cache-store --group demo --vm demo-vm --point latest --out restored-latest
cmp disk.img restored-latest/os.img
diff -r data restored-latest/data

say "restoring the first point ($first) and verifying it against the copy taken then"
"$BIN/lifeboat" restore --store cache-store --group demo --vm demo-vm --point "$first" --out restored-first
cmp first.img restored-first/os.img
diff -r first-data restored-first/data

say "cache store: $(du -sh cache-store | cut -f1) for $(du -sh --apparent-size disk.img | cut -f1) image + $(du -sh data | cut -f1) tree, three points"
say "part 1 passed: the first and the latest (app-consistent) points restored byte for byte"

# ---------------------------------------------------------------------------------------------
say "part 2: a replication group of two VMs and a coordinator on 127.0.0.1:20004"
pids=()
mounts=()
cleanup() {
  [ ${#pids[@]} -gt 0 ] && { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; }
  for m in "${mounts[@]}"; do fsfreeze -u "$m" 2>/dev/null || true; umount "$m" 2>/dev/null || umount -l "$m" || true; done
  true
}
trap cleanup EXIT
cat > coordinator.toml <<TOML
group = "demo-group"
state_dir = "$DEMO/coordinator"
listen = "127.0.0.1:20004"
processing_interval = "1s"
[store]
kind = "local"
path = "$DEMO/group-store"
[target]
kind = "local"
path = "$DEMO/target-store"
TOML
mkdir -p group-store target-store
"$BIN/lifeboat-coordinator" -c coordinator.toml init
"$BIN/lifeboat-coordinator" -c coordinator.toml serve 2>coordinator.log &
pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/20004) 2>/dev/null && break; sleep 0.1; done

admin=(--coordinator 127.0.0.1:20004 --credentials "$DEMO/coordinator/admin")
for vm in web db; do
  if [ "$(id -u)" -eq 0 ]; then
    # As root each VM's data is its own ext4, frozen for every cut (crash-consistent points).
    truncate -s 64M "$vm.ext4" && mkfs.ext4 -q -F "$vm.ext4" && mkdir -p "$vm" && mount -o loop "$vm.ext4" "$vm"
    mounts+=("$DEMO/$vm")
    freeze="mount = \"$DEMO/$vm\""
  else
    # Without root nothing can be frozen: crash points are labelled not-frozen, app points rely
    # on the hooks alone.
    mkdir -p "$vm"; freeze=""
  fi
  seq 1 20000 | sed "s/^/$vm record /" > "$vm/records.txt"
  cat > "$vm.toml" <<TOML
vm = "$vm"
group = "demo-group"
state_dir = "$DEMO/$vm-state"
coordinator = "127.0.0.1:20004"
[store]
kind = "local"
path = "$DEMO/group-store"
[[disk]]
id = "data"
kind = "directory"
path = "$DEMO/$vm"
consistency = "hooks"
$freeze
[disk.hooks]
pre = ["echo $vm quiesced >> $DEMO/group-hooks.log"]
post = ["echo $vm resumed >> $DEMO/group-hooks.log"]
timeout = "10s"
TOML
  token=$("$BIN/lifeboat-coordinator" -c coordinator.toml join-token --vm "$vm" --ttl 10m)
  "$BIN/lifeboat-agent" -c "$vm.toml" enroll --token "$token"
  "$BIN/lifeboat-agent" -c "$vm.toml" run 2>"$vm.log" &
  pids+=($!)
done
for _ in $(seq 100); do
  [ "$("$BIN/lifeboat" members "${admin[@]}" | grep -c ' healthy ')" -eq 2 ] && break
  sleep 0.2
done
"$BIN/lifeboat" members "${admin[@]}"

snapshot() { # [--app-consistent] — retried while a VM is still in initial replication
  for _ in $(seq 30); do
    out=$("$BIN/lifeboat" snapshot "${admin[@]}" --group demo-group "$@" 2>"$DEMO/snapshot.err") || true
    if grep -q "covering db, web" "$DEMO/snapshot.err"; then cat "$DEMO/snapshot.err" >&2; echo "$out"; return 0; fi
    sleep 1
  done
  cat "$DEMO/snapshot.err" >&2; die "no point covered both VMs"
}
say "a crash-consistent point across both VMs"
crash=$(snapshot)
echo "appended after the crash point" >> web/records.txt
say "an app-consistent point across both VMs (each VM's hooks run around the shared cut)"
app=$(snapshot --app-consistent)
cat group-hooks.log

# The coordinator processes points into the target store within a second and then removes
# them from the cache store, so list and restore across both.
for _ in $(seq 100); do [ -f "target-store/v1/demo-group/points/$app.point" ] && break; sleep 0.2; done
say "the group's points, with the members each covers"
"$BIN/lifeboat" points list --store group-store --target target-store --group demo-group

say "restoring both VMs at the app-consistent point $app and verifying them"
for vm in web db; do
  "$BIN/lifeboat" restore --store target-store --group demo-group --vm "$vm" --point "$app" --out "restored-$app/$vm"
  diff -r --exclude=lost+found "$vm" "restored-$app/$vm/data"
done
say "part 2 passed: shared multi-VM points ($crash crash, $app app) restored byte for byte"

# ---------------------------------------------------------------------------------------------
say "part 3: the target store (DR region), processed by the coordinator"
"$BIN/lifeboat" process --cache group-store --store target-store --group demo-group
say "what to watch: RPO per member and the latest processed point, as the coordinator reports them"
"$BIN/lifeboat" members "${admin[@]}" | tee members.txt
grep -q "latest processed point: c" members.txt || die "the coordinator reports no processed point"

say "losing the source region: coordinator and agents stopped, cache store deleted"
kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true; pids=()
rm -rf group-store

say "DR drill: test failover of the group to its latest multi-VM app-consistent point"
"$BIN/lifeboat" test-failover --store target-store --group demo-group \
  --point latest-multi-vm-app-consistent --to drill
for vm in web db; do diff -r --exclude=lost+found "$vm" "drill/$vm/data"; done
say "drill verified: both VMs equal their sources at the point (report: drill/failover-report.json)"
"$BIN/lifeboat" test-failover cleanup --to drill
[ ! -e drill ] || die "cleanup left the drill behind"
say "demo passed: single-VM points, shared multi-VM points, and a DR drill from the target store alone"
