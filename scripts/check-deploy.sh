#!/usr/bin/env bash
# Validates deploy/ as far as this machine allows without a container daemon or a cluster:
#   - compose.yaml against the Compose specification (check-jsonschema's vendored schema);
#   - the Kubernetes manifests against Kubernetes 1.37's schemas (kubernetes-validate,
#     strict), the ServiceMonitor against the schema in deploy/k8s/schemas/;
#   - the systemd unit with `systemd-analyze verify` (pointed at the built binary);
#   - Prometheus config and alert rules with promtool, alert unit tests included;
#   - every `tagstream` command line in the Dockerfile, compose file, StatefulSet and unit
#     is accepted by the binary's own argument parser; every file the Dockerfile copies exists.
# The Grafana dashboard's queries are checked against a real Prometheus by
# tests/e2e/observability.rs. Usage: scripts/check-deploy.sh PATH_TO_TAGSTREAM_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:?usage: scripts/check-deploy.sh PATH_TO_TAGSTREAM_BINARY}"
tools="${TAGSTREAM_TOOLS:-$HOME/.cache/tagstream-tools}"
venv="$tools/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ] \
  || ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
  echo "==> installing the deploy validators (check-jsonschema, kubernetes-validate) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'check-jsonschema==0.39.0' 'kubernetes-validate==1.37.0' 'PyYAML==6.0.3'
fi
V="$venv/bin"

echo "--- compose.yaml (Compose specification)"
"$V/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
echo "--- Kubernetes manifests (Kubernetes 1.37, strict)"
"$V/kubernetes-validate" --strict --quiet deploy/k8s/configmap.yaml deploy/k8s/service.yaml \
  deploy/k8s/statefulset.yaml deploy/k8s/pdb.yaml
"$V/check-jsonschema" --schemafile deploy/k8s/schemas/servicemonitor.schema.json deploy/k8s/servicemonitor.yaml
echo "--- systemd unit"
unit_dir="$(mktemp -d)"
trap 'rm -rf "$unit_dir"' EXIT
sed "s#/usr/local/bin/tagstream#$(realpath "$bin")#" deploy/systemd/tagstream.service >"$unit_dir/tagstream.service"
verify="$(systemd-analyze verify "$unit_dir/tagstream.service" 2>&1 || true)"
if [ -n "$verify" ]; then
  echo "$verify" >&2
  exit 1
fi
echo "ok -- systemd-analyze verify"
echo "--- Prometheus"
(cd deploy/prometheus && promtool check config --syntax-only prometheus.yml && promtool check rules alerts.yml \
  && promtool test rules alerts_test.yml)
echo "--- tagstream command lines"
"$V/python" - "$bin" <<'PY'
import re, shlex, subprocess, sys, yaml, pathlib
binary = sys.argv[1]
lines = {}
docker = pathlib.Path("deploy/Dockerfile").read_text().replace("\\\n", " ")
for m in re.finditer(r'^(CMD|HEALTHCHECK.*CMD)\s+(\[.*\])', docker, re.M):
    args = yaml.safe_load(m.group(2))
    lines["Dockerfile " + m.group(1).split()[0]] = args[1:] if args[0] == "tagstream" else args
for src in re.finditer(r'^COPY (?!--from)(\S+) ', docker, re.M):
    assert pathlib.Path(src.group(1)).exists(), f"Dockerfile copies {src.group(1)}, which does not exist"
compose = yaml.safe_load(open("deploy/compose.yaml"))
lines["compose tagstream"] = compose["services"]["tagstream"]["command"]
sts = yaml.safe_load(open("deploy/k8s/statefulset.yaml"))
lines["StatefulSet"] = sts["spec"]["template"]["spec"]["containers"][0]["args"]
unit = pathlib.Path("deploy/systemd/tagstream.service").read_text().replace("\\\n", " ")
exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
lines["systemd ExecStart"] = shlex.split(exec_start)[1:]
for where, args in lines.items():
    # clap parses every flag before acting on --help: an unknown or malformed one fails.
    done = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{where}: `tagstream {' '.join(args)}` is refused:\n{done.stderr}")
    print(f"ok -- {where}: tagstream {' '.join(args[:2])} ...")
PY
echo "deploy/: all checks passed"
