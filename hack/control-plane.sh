#!/usr/bin/env bash
# A local Kubernetes control plane for aiso's end-to-end tests, built from
# source and run as plain processes (no container engine needed):
#
#   etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler -> kwok
#
# kwok plays the kubelet for fake Nodes, so Pods get scheduled and become
# Running without any container runtime. kubectl and helm are built alongside.
#
# Usage: hack/control-plane.sh <command>
#   build [--force]  build the pinned binaries into $AISO_CACHE/bin (reused when up to date)
#   start            start the control plane (building first if needed), print export lines
#   stop             stop every process started by `start`
#   status           show the state of each component (exit 1 if not fully running)
#   env              print the export lines (KUBECONFIG, PATH) for the running control plane
#
# Environment:
#   AISO_CACHE               cache root (default: $HOME/.cache/aiso)
#   AISO_CONTROL_PLANE_DIR   state dir: certs, kubeconfigs, logs, pids, etcd data
#                            (default: $AISO_CACHE/control-plane)
#   AISO_CONTROL_PLANE_TIMEOUT  seconds to wait for each start step (default: 120)
#   AISO_KWOK_NODES          number of fake nodes to create (default: 1)
set -euo pipefail

# ---------------------------------------------------------------------------
# Pinned versions. The Go modules are pinned by hack/k8s-build/go.mod and
# go.sum; `build` checks that these strings agree with go.mod and stamps them
# into the binaries so clients see real versions.
KUBE_VERSION=v1.33.13
ETCD_VERSION=v3.5.21
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.18.6

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_MODULE=$REPO_ROOT/hack/k8s-build
AISO_CACHE=${AISO_CACHE:-$HOME/.cache/aiso}
[[ $AISO_CACHE == /* ]] || AISO_CACHE=$PWD/$AISO_CACHE
BIN_DIR=$AISO_CACHE/bin
GO_BUILD_CACHE=$AISO_CACHE/go-build
STATE_DIR=${AISO_CONTROL_PLANE_DIR:-$AISO_CACHE/control-plane}
[[ $STATE_DIR == /* ]] || STATE_DIR=$PWD/$STATE_DIR
TIMEOUT=${AISO_CONTROL_PLANE_TIMEOUT:-120}
KWOK_NODES=${AISO_KWOK_NODES:-1}

BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
# Start order; `stop` goes the other way.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

PKI=$STATE_DIR/pki
LOGS=$STATE_DIR/logs
RUN=$STATE_DIR/run
KUBECONFIG_FILE=$STATE_DIR/kubeconfig

SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.1/16
KWOK_ANNOTATION=kwok.x-k8s.io/node
KWOK_ANNOTATION_VALUE=fake

CONTROLLERS=(
  # asked for by the e2e tests
  garbage-collector-controller
  deployment-controller
  replicaset-controller
  namespace-controller
  serviceaccount-controller
  serviceaccount-token-controller
  horizontal-pod-autoscaler-controller
  # removes the node.kubernetes.io/not-ready taint from fake nodes once kwok
  # reports them Ready (without it nothing gets scheduled)
  node-lifecycle-controller
  # cheap, and what workloads and charts commonly rely on
  job-controller
  cronjob-controller
  statefulset-controller
  daemonset-controller
  ttl-after-finished-controller
  pod-garbage-collector-controller
  disruption-controller
  resourcequota-controller
  endpoints-controller
  endpointslice-controller
  root-ca-certificate-publisher-controller
  clusterrole-aggregation-controller
)

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { printf '[control-plane] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

# ---------------------------------------------------------------------------
# build

ldflags() {
  local major minor p build_date
  major=${KUBE_VERSION#v}; major=${major%%.*}
  minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
  build_date=${1:-1970-01-01T00:00:00Z}
  local f="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    f+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  f+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  f+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    f+=" -X $p.k8sVersionMajor=$major -X $p.k8sVersionMinor=$minor"
  done
  f+=" -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
  f+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBE_VERSION#v}"
  printf '%s' "$f"
}

go_env() {
  env GOTOOLCHAIN=local CGO_ENABLED=0 GOCACHE="$GO_BUILD_CACHE" \
    GOFLAGS="-trimpath -buildvcs=false -mod=readonly" "$@"
}

# A key over everything that determines the binaries; a change rebuilds.
build_key() {
  {
    echo "kube=$KUBE_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION"
    echo "binaries=${BINARIES[*]}"
    go version
    ldflags
    cat "$BUILD_MODULE/go.mod" "$BUILD_MODULE/go.sum"
    find -L "$BUILD_MODULE" -name '*.go' -type f | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -d' ' -f1
}

binaries_up_to_date() {
  local key=$1 b
  [[ -f $BIN_DIR/.build-stamp && $(cat "$BIN_DIR/.build-stamp") == "$key" ]] || return 1
  for b in "${BINARIES[@]}"; do [[ -x $BIN_DIR/$b ]] || return 1; done
}

check_pins() {
  local want got mod
  while read -r mod want; do
    got=$(cd "$BUILD_MODULE" && go_env go list -m -f '{{.Version}}' "$mod") ||
      die "cannot resolve $mod in $BUILD_MODULE/go.mod"
    [[ $got == "$want" ]] ||
      die "$BUILD_MODULE/go.mod pins $mod $got but hack/control-plane.sh says $want; update both together"
  done <<EOF
k8s.io/kubernetes $KUBE_VERSION
go.etcd.io/etcd/server/v3 $ETCD_VERSION
sigs.k8s.io/kwok $KWOK_VERSION
helm.sh/helm/v3 $HELM_VERSION
k8s.io/api v0.${KUBE_VERSION#v1.}
EOF
}

cmd_build() {
  local force=false
  [[ ${1:-} == --force ]] && force=true
  command -v go >/dev/null || die "go not found in PATH; Go >= 1.24 is needed to build the control plane"
  mkdir -p "$BIN_DIR" "$GO_BUILD_CACHE"
  # One build at a time (CI and the test fixture may both ask).
  (
    flock 9
    local key
    key=$(build_key)
    if ! $force && binaries_up_to_date "$key"; then
      log "binaries up to date in $BIN_DIR (kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION)"
      exit 0
    fi
    check_pins
    log "building kubernetes $KUBE_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION into $BIN_DIR"
    log "(Go build cache: $GO_BUILD_CACHE; a cold build takes a long while on a small machine)"
    local tmp=$BIN_DIR/.build.$$ start=$SECONDS b
    rm -rf "$tmp"; mkdir -p "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$BUILD_MODULE" &&
      go_env nice -n 10 go build -ldflags "$(ldflags "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" -o "$tmp/" tool ./cmd/etcd) ||
      die "go build failed (module $BUILD_MODULE)"
    for b in "${BINARIES[@]}"; do [[ -x $tmp/$b ]] || die "go build did not produce $b"; done
    rm -f "$BIN_DIR/.build-stamp"
    for b in "${BINARIES[@]}"; do mv -f "$tmp/$b" "$BIN_DIR/$b"; done
    echo "$key" >"$BIN_DIR/.build-stamp"
    log "built in $((SECONDS - start))s:"
    (cd "$BIN_DIR" && stat -c '%n %s' "${BINARIES[@]}" | awk '{printf "[control-plane]   %-24s %6.1f MiB\n", $1, $2/1048576}' >&2)
  ) 9>"$AISO_CACHE/.build.lock"
}

ensure_built() {
  cmd_build
  local b
  for b in "${BINARIES[@]}"; do [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing after build"; done
}

# ---------------------------------------------------------------------------
# processes

pid_of() { [[ -f $RUN/$1.pid ]] && cat "$RUN/$1.pid"; }

# True if $1 is alive and really one of ours (guards against pid reuse).
ours() {
  local pid=$1 cmdline
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  cmdline=$({ tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 1
  [[ $cmdline == "$BIN_DIR/"* && $cmdline == *"$STATE_DIR"* ]]
}

component_alive() { ours "$(pid_of "$1" || true)"; }

# Processes of our binaries that point at our state dir, pid files or not
# (e.g. left behind by a start that was killed half way).
stray_pids() {
  local p cmdline
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $p == "$$" ]] && continue
    cmdline=$({ tr '\0' ' ' <"/proc/$p/cmdline"; } 2>/dev/null) || continue
    [[ $cmdline == "$BIN_DIR/"* && $cmdline == *"$STATE_DIR"* ]] && echo "$p"
  done
  return 0
}

log_tail() {
  local c=$1
  if [[ -f $LOGS/$c.log ]]; then
    printf '[control-plane] ---- last 40 lines of %s ----\n' "$LOGS/$c.log" >&2
    tail -n 40 "$LOGS/$c.log" >&2
    printf '[control-plane] ----\n' >&2
  fi
}

fail_start() {
  local c=$1; shift
  printf '[control-plane] ERROR: %s\n' "$*" >&2
  log_tail "$c"
  log "stopping what was started; logs are kept in $LOGS"
  stop_all >/dev/null 2>&1 || true
  exit 1
}

launch() {
  local name=$1; shift
  log "starting $name"
  # Own session, no inherited stdio or lock: the caller (a test fixture) must
  # not be kept waiting on our pipes, and Ctrl-C in the caller must not hit us.
  setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 8>&- &
  started "$name" $!
}

launch_env() {
  local name=$1; shift
  log "starting $name"
  setsid env "$@" </dev/null >>"$LOGS/$name.log" 2>&1 8>&- &
  started "$name" $!
}

# started NAME PID: record the pid, then wait until the process runs our binary.
# Until it has exec'ed (through setsid and env) it is a copy of this shell, which
# `ours` rightly does not recognise: a liveness check in that moment took a
# component that was still starting for one that had exited, on a busy machine.
started() {
  local name=$1 pid=$2 i
  echo "$pid" >"$RUN/$name.pid"
  for ((i = 0; i < 200; i++)); do
    ours "$pid" && return 0
    kill -0 "$pid" 2>/dev/null || return 0 # it died: wait_for reports it, with its log
    sleep 0.05
  done
  fail_start "$name" "$name did not start its binary within 10s"
}

# wait_for COMPONENT DESCRIPTION COMMAND...: retry COMMAND until it succeeds,
# failing early if any started component dies.
wait_for() {
  local c=$1 what=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT)) x
  until "$@" >/dev/null 2>&1; do
    for x in "${COMPONENTS[@]}"; do
      if [[ -f $RUN/$x.pid ]] && ! component_alive "$x"; then
        fail_start "$x" "$x exited while waiting for $what"
      fi
    done
    ((SECONDS < deadline)) || fail_start "$c" "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
}

# free_port VAR: set VAR to a loopback port nobody listens on, below the
# kernel's ephemeral range (so outgoing connections do not take it first).
USED_PORTS=" "
free_port() {
  local p i lo=32768 span
  { read -r lo _ </proc/sys/net/ipv4/ip_local_port_range; } 2>/dev/null || true
  span=$((lo - 1 - 15000))
  ((span >= 1000)) || span=10000
  for i in $(seq 1 200); do
    p=$((15000 + RANDOM % span))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED_PORTS+="$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free loopback port found"
}

# ---------------------------------------------------------------------------
# certificates and kubeconfigs

# gen_cert NAME SUBJECT EXT_KEY_USAGE [SUBJECT_ALT_NAMES [CA_NAME]]
gen_cert() {
  local name=$1 subj=$2 eku=$3 sans=${4:-} ca=${5:-ca}
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

gen_pki() {
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  mkdir -p "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=aiso-control-plane-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/ca.crt" 2>/dev/null
  gen_cert apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP"
  gen_cert admin "/O=system:masters/CN=aiso-admin" clientAuth
  gen_cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
  gen_cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
  gen_cert kwok "/O=system:masters/CN=kwok-controller" clientAuth
  # Front proxy (request-header authentication for aggregated API servers);
  # without it controller-manager and scheduler keep logging a missing CA bundle.
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/front-proxy-ca.key" 2>/dev/null
  openssl req -x509 -new -key "$PKI/front-proxy-ca.key" -subj "/CN=aiso-front-proxy-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/front-proxy-ca.crt" 2>/dev/null
  gen_cert front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca
  # Service-account token signing key pair.
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

# write_kubeconfig FILE USER CERT_NAME
write_kubeconfig() {
  local file=$1 user=$2 cert=$3
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: aiso
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$cert.crt")
    client-key-data: $(base64 -w0 <"$PKI/$cert.key")
contexts:
- name: aiso
  context:
    cluster: aiso
    user: $user
current-context: aiso
EOF
  chmod 600 "$file"
}

kubectl_admin() { "$BIN_DIR/kubectl" --kubeconfig "$KUBECONFIG_FILE" --request-timeout=10s "$@"; }

apiserver_ready() {
  curl -fsS --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" | grep -qx ok
}

fake_node_manifest() {
  local name=$1
  cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    $KWOK_ANNOTATION: $KWOK_ANNOTATION_VALUE
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    node-role.kubernetes.io/agent: ""
    type: kwok
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 100Gi}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 100Gi}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: fake
    kubeProxyVersion: fake
EOF
}

# ---------------------------------------------------------------------------
# commands

print_env() {
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
  echo "export PATH=\"$BIN_DIR:\$PATH\""
}

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do component_alive "$c" || return 1; done
  [[ -f $RUN/ports ]] || return 1
  # shellcheck disable=SC1091
  source "$RUN/ports"
  apiserver_ready
}

cmd_start() {
  if all_running; then
    log "already running (state in $STATE_DIR)"
    print_env
    return 0
  fi
  ensure_built
  command -v curl >/dev/null || die "curl not found (apt-get install curl)"
  # Leftovers of an earlier run (crashed or half started) go first.
  if compgen -G "$RUN/*.pid" >/dev/null || [[ -n $(stray_pids) ]]; then
    log "found a partly running control plane in $STATE_DIR; stopping it and starting afresh"
  fi
  stop_all >/dev/null 2>&1 || true
  local attempt rc
  for attempt in 1 2 3; do
    # A port found free can be taken by someone else before we bind it: then
    # start again on other ports.
    set +e
    (set -e; start_once)
    rc=$?
    set -e
    if ((rc == 0)); then
      print_env
      return 0
    fi
    grep -qs 'address already in use' "$LOGS"/*.log || exit "$rc"
    log "a port was taken in the meantime (attempt $attempt); starting again on other ports"
  done
  die "could not start the control plane: ports kept being taken"
}

start_once() {
  rm -rf "$PKI" "$LOGS" "$RUN" "$STATE_DIR/etcd" "$STATE_DIR/kubeconfigs" "$STATE_DIR/kwok-home" "$KUBECONFIG_FILE"
  mkdir -p "$PKI" "$LOGS" "$RUN" "$STATE_DIR/etcd" "$STATE_DIR/kubeconfigs" "$STATE_DIR/kwok-home"
  local t0=$SECONDS

  free_port ETCD_PORT; free_port ETCD_PEER_PORT; free_port APISERVER_PORT
  free_port KCM_PORT; free_port SCHEDULER_PORT
  cat >"$RUN/ports" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
EOF

  gen_pki
  write_kubeconfig "$KUBECONFIG_FILE" aiso-admin admin
  local kc=$STATE_DIR/kubeconfigs
  write_kubeconfig "$kc/kube-controller-manager.kubeconfig" system:kube-controller-manager kube-controller-manager
  write_kubeconfig "$kc/kube-scheduler.kubeconfig" system:kube-scheduler kube-scheduler
  write_kubeconfig "$kc/kwok.kubeconfig" kwok-controller kwok

  launch etcd "$BIN_DIR/etcd" \
    --name=aiso \
    --data-dir="$STATE_DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="aiso=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync=true \
    --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
  wait_for etcd "etcd /health" sh -c "curl -fsS --max-time 3 http://127.0.0.1:$ETCD_PORT/health | grep -q '\"health\":\"true\"'"

  launch kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$APISERVER_PORT" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --enable-priority-and-fairness=false \
    --profiling=false
  wait_for kube-apiserver "kube-apiserver /readyz" apiserver_ready

  launch kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$kc/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$kc/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$kc/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$KCM_PORT" \
    --cert-dir="$PKI/kube-controller-manager-serving" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-name=aiso \
    --controllers="$(IFS=,; echo "${CONTROLLERS[*]}")" \
    --profiling=false

  launch kube-scheduler "$BIN_DIR/kube-scheduler" \
    --kubeconfig="$kc/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$kc/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$kc/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$SCHEDULER_PORT" \
    --cert-dir="$PKI/kube-scheduler-serving" \
    --leader-elect=false \
    --profiling=false

  # HOME points into the state dir so a ~/.kwok/kwok.yaml of the user's is not
  # picked up; with no stage configuration kwok uses its default node and pod
  # stages (nodes Ready with leases, pods Running, deleted pods removed).
  # Node leases keep the node-lifecycle controller from marking the node
  # NotReady every minute (which would turn every Pod on it NotReady).
  launch_env kwok HOME="$STATE_DIR/kwok-home" "$BIN_DIR/kwok" \
    --kubeconfig="$kc/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector="$KWOK_ANNOTATION=$KWOK_ANNOTATION_VALUE" \
    --cidr="$POD_CIDR" \
    --node-ip=127.0.0.1 \
    --node-lease-duration-seconds=40

  wait_for kube-controller-manager "kube-controller-manager /healthz" \
    curl -fsSk --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for kube-scheduler "kube-scheduler /healthz" \
    curl -fsSk --max-time 3 "https://127.0.0.1:$SCHEDULER_PORT/healthz"

  local i name
  for ((i = 0; i < KWOK_NODES; i++)); do
    name=kwok-node-$i
    fake_node_manifest "$name" | kubectl_admin apply -f - >/dev/null ||
      fail_start kube-apiserver "could not create fake node $name"
    wait_for kwok "node $name Ready" sh -c \
      "'$BIN_DIR/kubectl' --kubeconfig '$KUBECONFIG_FILE' get node '$name' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  done
  wait_for kube-controller-manager "namespace default" kubectl_admin get namespace default
  wait_for kube-controller-manager "service account default/default" kubectl_admin -n default get serviceaccount default

  log "control plane ready in $((SECONDS - t0))s: kubernetes $KUBE_VERSION at https://127.0.0.1:$APISERVER_PORT (logs: $LOGS)"
}

# Stop every process of ours: first the ones with pid files (reverse start
# order), then anything else of our binaries still pointing at this state dir.
stop_all() {
  local i c pid pids=() waited
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    c=${COMPONENTS[i]}
    pid=$(pid_of "$c" || true)
    if ours "$pid"; then
      log "stopping $c (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$RUN/$c.pid"
  done
  for pid in $(stray_pids); do
    [[ " ${pids[*]} " == *" $pid "* ]] && continue
    log "stopping leftover process $pid"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  ((${#pids[@]})) || return 0
  for waited in $(seq 1 100); do
    local alive=()
    for pid in "${pids[@]}"; do ours "$pid" && alive+=("$pid"); done
    ((${#alive[@]})) || return 0
    if ((waited == 60)); then
      log "killing ${alive[*]} (did not stop on SIGTERM)"
      kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
    sleep 0.1
  done
  local left
  left=$(stray_pids)
  [[ -z $left ]] || { log "processes still running after stop: $left"; return 1; }
}

cmd_stop() {
  stop_all || die "could not stop every process"
  rm -f "$RUN/ports"
  log "stopped (logs kept in $LOGS)"
}

cmd_status() {
  local c pid rc=0
  for c in "${COMPONENTS[@]}"; do
    pid=$(pid_of "$c" || true)
    if ours "$pid"; then
      printf '%-24s running (pid %s)\n' "$c" "$pid"
    else
      printf '%-24s not running\n' "$c"
      rc=1
    fi
  done
  if [[ -f $RUN/ports ]]; then
    # shellcheck disable=SC1091
    source "$RUN/ports"
    if apiserver_ready 2>/dev/null; then
      printf '%-24s https://127.0.0.1:%s ready\n' apiserver "$APISERVER_PORT"
    else
      printf '%-24s https://127.0.0.1:%s not ready\n' apiserver "$APISERVER_PORT"
      rc=1
    fi
  fi
  printf '%-24s %s\n' kubeconfig "$KUBECONFIG_FILE" binaries "$BIN_DIR" logs "$LOGS"
  return $rc
}

cmd_env() {
  all_running || die "control plane is not running (hack/control-plane.sh start)"
  print_env
}

# start and stop run one at a time per state dir.
lock_state() {
  mkdir -p "$STATE_DIR"
  exec 8>"$STATE_DIR/.lock"
  flock 8
}

main() {
  local cmd=${1:-}
  [[ $# -gt 0 ]] && shift
  case $cmd in
    build) cmd_build "$@" ;;
    start) lock_state; cmd_start ;;
    stop) lock_state; cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *) usage; die "unknown command '${cmd}'" ;;
  esac
}

main "$@"
