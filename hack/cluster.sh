#!/usr/bin/env bash
# A one-node Kubernetes 1.20.2 cluster with real pods, for the test suite, on this machine only.
#
#   hack/cluster.sh up     start it (idempotent; restarts what died); last stdout line: KUBECONFIG path
#   hack/cluster.sh down   stop everything it started and remove what it set up (idempotent);
#                          `down --purge` also drops the image store and the logs
#   hack/cluster.sh env    print `export KUBECONFIG=...` for the running cluster
#
#   host ── kubectl / tests ──▶ kube-apiserver 198.18.0.1:6443 ──▶ etcd 127.0.0.1:12379
#                                   │ controller-manager, scheduler (127.0.0.1)
#   bridge qmesh0 198.18.0.1/24 ◀── kubelet (198.18.0.1:10250) ── containerd (unix socket) ── runc
#     ├─ pods 198.18.0.10-250 (CNI bridge + host-local, no masquerade, no default route)
#     └─ dnsmasq 198.18.0.1:53: *.svc.cluster.local from a hosts file that dns-sync.py keeps current
#   kube-proxy (iptables): Service ClusterIPs 198.19.0.0/16 → pod endpoints, on this node only.
#
# Traffic stays on this machine: pods get routes to 198.18.0.0/24 and 198.19.0.0/16 only (no
# default route, no masquerade), IPv4 forwarding is switched on for the bridge alone, a FORWARD
# guard (chain QMESH-CLUSTER) drops anything routed between the bridge and another interface, and
# every process this script starts runs in the cgroup v2 `qmesh-cluster`, whose packets an OUTPUT
# guard (chain QMESH-CLUSTER-OUT) lets reach only loopback, the bridge and the Service range.
# dnsmasq has no upstream server: names outside cluster.local get REFUSED. Images come from
# `ctr images import` (see hack/images.sh); pods must use imagePullPolicy: Never.
#
# Binaries: hack/k8s-test-env.sh --node (version-keyed cache, built from Debian's kubernetes source).
# Everything else lives in ${QMESH_CLUSTER_DIR:-${QMESH_CACHE_DIR:-~/.cache/qmesh}/cluster}:
#   run/      this cluster's state (pki, etcd, kubelet, containerd state, CNI, DNS, pids), gone at down
#   logs/     one log file per component (kept after down, truncated by the next fresh up)
#   images/   containerd's content and snapshot store (imported images survive down)
#   kubeconfig  admin kubeconfig (client certificate, system:masters)
# Outside it, only what a kubelet, containerd or CNI hard-codes: /var/log/pods, /var/log/containers,
# /var/lib/cni, /run/containerd (removed at down when this script created them), cgroups named
# kubepods and qmesh-cluster, iptables chains KUBE-* and QMESH-CLUSTER*, and a few sysctls that
# kubelet and kube-proxy set (saved at up, restored at down).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT=${QMESH_CACHE_DIR:-$HOME/.cache/qmesh}
STATE=${QMESH_CLUSTER_DIR:-$CACHE_ROOT/cluster}
RUN=$STATE/run
LOGS=$STATE/logs
PIDS=$RUN/pids
PKI=$RUN/pki
CONF=$RUN/config
KUBECONFIG_PATH=$STATE/kubeconfig

BRIDGE=qmesh0
BRIDGE_MAC=02:42:c6:12:00:01
NODE_NAME=qmesh-node
NODE_IP=198.18.0.1
POD_CIDR=198.18.0.0/24
SVC_CIDR=198.19.0.0/16
API_SVC_IP=198.19.0.1
DNS_IP=$NODE_IP
API_PORT=6443
ETCD_PORT=12379
ETCD_PEER_PORT=12380
PAUSE_IMAGE=registry.k8s.io/pause:3.6
CTR_SOCK=$RUN/containerd/containerd.sock
# iptables chains of this script: FORWARD guard (bridge <-> elsewhere) and OUTPUT guard (the
# cluster's own processes, confined by a cgroup v2, reach only loopback and the cluster's ranges).
GUARD_CHAIN=QMESH-CLUSTER
EGRESS_CHAIN=QMESH-CLUSTER-OUT
CGROUP_NAME=qmesh-cluster
# Paths a kubelet or a CNI plugin uses whatever it is told; removed at down if up created them.
HOST_PATHS=(/var/log/pods /var/log/containers /var/lib/cni /run/containerd)
# Sysctls kubelet (setupKernelTunables) and kube-proxy (route_localnet) change; restored at down.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.conf.all.route_localnet
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)

log() { echo "cluster: [${SECONDS}s] $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Processes: started with setsid (own session, survive this script) inside the cgroup
# qmesh-cluster, one pid file each holding "pid exe". Only these pids, members of that cgroup or of
# kubepods (pods), or this cluster's programs naming its state directory, are ever signalled.

# A pid that runs (a zombie does not: nobody may reap our orphans soon).
pid_running() { # pid
  local stat
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

proc_alive() { # name
  local pid exe
  [[ -f $PIDS/$1.pid ]] || return 1
  read -r pid exe <"$PIDS/$1.pid" || return 1
  [[ -n $pid ]] && pid_running "$pid" || return 1
  [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$exe"* ]]
}

# The cgroup v2 directory every process of the cluster runs in (egress guard, and the list of
# what to stop at down).
cgroup_dir() {
  if [[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]]; then
    echo "/sys/fs/cgroup/$CGROUP_NAME"
  elif [[ $(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null) == cgroup2fs ]]; then
    echo "/sys/fs/cgroup/unified/$CGROUP_NAME"
  fi
}
CGROUP=$(cgroup_dir)

STARTED=()
start_proc() { # name binary args...
  local name=$1 bin
  shift
  proc_alive "$name" && return 0
  bin=$(readlink -f "$(command -v "$1")")
  log "starting $name (log: $LOGS/$name.log)"
  echo "=== $(date -Is) $name ===" >>"$LOGS/$name.log"
  # In the cluster's cgroup (before exec, so every socket is created there), in its own session.
  # fd 3 is this script's stdout: a daemon holding it would keep `$(hack/cluster.sh up)` waiting.
  # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
  setsid sh -c 'echo $$ >"$0" && exec "$@"' "$CGROUP/cgroup.procs" "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 3>&- &
  local pid=$! i
  echo "$pid $bin" >"$PIDS/$name.pid"
  STARTED+=("$name")
  # setsid execs the program under the same pid: wait for that, so proc_alive is meaningful.
  for ((i = 0; i < 50; i++)); do
    [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$bin"* ]] && return 0
    pid_running "$pid" || return 0
    sleep 0.05
  done
}

stop_pid() { # pid [seconds]
  local pid=$1 wait=${2:-10} i
  pid_running "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait * 20; i++)); do
    pid_running "$pid" || return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_running "$pid" || return 0
    sleep 0.05
  done
}

stop_proc() { # name [seconds]
  local pid exe
  if proc_alive "$1"; then
    read -r pid exe <"$PIDS/$1.pid"
    log "stopping $1 (pid $pid)"
    stop_pid "$pid" "${2:-10}"
  fi
  rm -f "$PIDS/$1.pid"
}

# Pids of this cluster's components whose pid file is gone: one of the programs this script runs
# (or a containerd shim) with this cluster's state directory on its command line (shims name its
# containerd socket, every component its config or data directory).
stray_pids() {
  local p exe cmd
  while read -r p exe; do
    p=${p#/proc/}
    case "${exe##*/}" in
      etcd | kube-apiserver | kube-controller-manager | kube-scheduler | kubelet | kube-proxy | \
        containerd | containerd-shim* | dnsmasq | python3*) ;;
      *) continue ;;
    esac
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
    [[ "$cmd" == *"$STATE/"* ]] && pid_running "$p" && echo "$p"
  done < <(find /proc -mindepth 2 -maxdepth 2 -name exe -printf '%h %l\n' 2>/dev/null)
  return 0
}

wait_until() { # description seconds command...
  local what=$1 secs=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.3
  done
}

log_tail() { # name
  log "last lines of $LOGS/$1.log:"
  tail -n 25 "$LOGS/$1.log" >&2 || true
}

kc() { "$ASSETS/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }
ctr_() { ctr --address "$CTR_SOCK" "$@"; }

# ---------------------------------------------------------------------------------------------
# Provisioning

APT_UPDATED=0
apt_install() {
  local missing=() p
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == *"ok installed"* ]] || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $APT_UPDATED -eq 0 ]]; then apt-get update -qq >&2; APT_UPDATED=1; fi
  log "apt-get install ${missing[*]}"
  # No service of these packages is wanted: this script runs its own containerd.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

provision() {
  apt_install containerd runc containernetworking-plugins iptables nftables conntrack dnsmasq-base \
    openssl python3 iproute2 util-linux ca-certificates
  [[ -n $CGROUP ]] || die "no cgroup v2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified) to confine the cluster in"
  ASSETS=$(hack/k8s-test-env.sh --node | tail -n 1)
  [[ -x $ASSETS/kubelet && -x $ASSETS/pause && -x $ASSETS/kubectl ]] || die "no node binaries or kubectl in $ASSETS"
}

# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs (EC P-256 keys; RSA for the service-account signing key)

cert() { # name subject ext [ca]
  local name=$1 subj=$2 ext=$3 ca=${4:-ca}
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -keyout "$PKI/$name.key" \
    -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 3650 -sha256 -extfile <(printf '%s\n' "$ext") -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr"
}

make_pki() {
  [[ -f $PKI/done ]] && return 0
  log "generating certificates in $PKI"
  rm -rf "$PKI" && mkdir -p "$PKI" && chmod 700 "$PKI"
  local client='basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth' ca
  for ca in ca front-proxy-ca; do
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 3650 -sha256 \
      -keyout "$PKI/$ca.key" -out "$PKI/$ca.crt" -subj "/CN=qmesh-cluster-$ca" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature 2>/dev/null
  done
  cert apiserver /CN=kube-apiserver "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$API_SVC_IP,IP:$NODE_IP,IP:127.0.0.1"
  cert kubelet-serving "/CN=$NODE_NAME" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$NODE_NAME,IP:$NODE_IP"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  cert admin "/O=system:masters/CN=qmesh-cluster-admin" "$client"
  cert controller-manager /CN=system:kube-controller-manager "$client"
  cert scheduler /CN=system:kube-scheduler "$client"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
  cert kube-proxy /CN=system:kube-proxy "$client"
  cert front-proxy-client /CN=front-proxy-client "$client" front-proxy-ca
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  touch "$PKI/done"
}

kubeconfig() { # out user
  local out=$1 user=$2
  cat >"$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: qmesh
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$user.crt")
    client-key-data: $(base64 -w0 "$PKI/$user.key")
contexts:
- name: qmesh
  context:
    cluster: qmesh
    user: $user
    namespace: default
current-context: qmesh
EOF
  chmod 600 "$out"
}

# ---------------------------------------------------------------------------------------------
# Configuration files

# Writes stdin to a file only when it differs (kube-proxy exits when its config file changes).
put() { # file
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

write_configs() {
  mkdir -p "$CONF" "$RUN/cni/net.d" "$RUN/cni/ipam" "$RUN/dns" "$RUN/kubelet"
  [[ -f $KUBECONFIG_PATH ]] || kubeconfig "$KUBECONFIG_PATH" admin
  local u
  for u in controller-manager scheduler kubelet kube-proxy; do
    [[ -f $CONF/$u.kubeconfig ]] || kubeconfig "$CONF/$u.kubeconfig" "$u"
  done

  put "$CONF/containerd.toml" <<EOF
version = 2
root = "$STATE/images/containerd"
state = "$RUN/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CTR_SOCK"

[ttrpc]
  address = "$CTR_SOCK.ttrpc"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    # This machine forbids lowering oom_score_adj: without this runc fails with
    # "can't get final child's PID from pipe: EOF".
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "$RUN/containerd/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$RUN/cni/net.d"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "$RUN/containerd/opt"
EOF

  # No masquerade, no default route: pods reach the pod subnet (on link) and Service ClusterIPs
  # (through kube-proxy's DNAT on the node), nothing else.
  put "$RUN/cni/net.d/10-qmesh.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "qmesh",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$RUN/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "198.18.0.10", "rangeEnd": "198.18.0.250", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$SVC_CIDR", "gw": "$NODE_IP"}]
      }
    }
  ]
}
EOF

  echo "nameserver $DNS_IP" | put "$CONF/resolv.conf"

  put "$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: $CONF/resolv.conf
syncFrequency: 10s
# Report readiness changes within 2 s (default 10 s: up would wait for the second status update).
nodeStatusUpdateFrequency: 2s
serializeImagePulls: false
# Imported images cannot be pulled again: never garbage-collect them, never evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
EOF

  put "$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: $CONF/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
mode: iptables
nodePortAddresses: ["$NODE_IP/32"]
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF

  put "$RUN/dns/dns-sync.py" <<'EOF'
"""Keeps a hosts file for dnsmasq in step with the cluster's Services and Endpoints.

<svc>.<ns>.svc.cluster.local -> ClusterIP(s); for headless Services the endpoint addresses, and
<hostname>.<svc>.<ns>.svc.cluster.local for endpoints with a hostname (StatefulSet pods).
Lists, then watches both resources; on any change rewrites the file atomically and SIGHUPs dnsmasq.
"""
import http.client, json, os, signal, ssl, sys, threading, time

server, port, ca, crt, key, hosts, dnsmasq_pidfile = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(crt, key)
lock = threading.Lock()
changed = threading.Event()
objs = {"services": {}, "endpoints": {}}
synced = set()


def get(path, timeout):
    conn = http.client.HTTPSConnection(server, int(port), context=ctx, timeout=timeout)
    conn.request("GET", path, headers={"Accept": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        body = resp.read()[:300]
        conn.close()
        raise RuntimeError(f"GET {path}: HTTP {resp.status} {body!r}")
    return conn, resp


def ident(o):
    return (o["metadata"].get("namespace", ""), o["metadata"]["name"])


def follow(kind):
    while True:
        try:
            conn, resp = get(f"/api/v1/{kind}", 30)
            listing = json.load(resp)
            conn.close()
            with lock:
                objs[kind] = {ident(o): o for o in listing.get("items") or []}
                synced.add(kind)
            changed.set()
            rv = listing["metadata"]["resourceVersion"]
            conn, resp = get(f"/api/v1/{kind}?watch=1&allowWatchBookmarks=true"
                             f"&timeoutSeconds=240&resourceVersion={rv}", 270)
            for line in resp:
                ev = json.loads(line)
                kind_, o = ev.get("type"), ev.get("object") or {}
                if kind_ == "ERROR":
                    break
                if kind_ == "BOOKMARK":
                    continue
                with lock:
                    if kind_ == "DELETED":
                        objs[kind].pop(ident(o), None)
                    else:
                        objs[kind][ident(o)] = o
                changed.set()
            conn.close()
        except Exception as e:  # relist after any error
            print(f"dns-sync: {kind}: {e}", file=sys.stderr, flush=True)
            time.sleep(1)


def render():
    lines = []
    with lock:
        services = dict(objs["services"])
        endpoints = dict(objs["endpoints"])
    for (ns, name), svc in sorted(services.items()):
        spec = svc.get("spec") or {}
        fqdn = f"{name}.{ns}.svc.cluster.local"
        ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"]
        if spec.get("type") == "ExternalName":
            continue
        if ips:
            lines += [f"{ip} {fqdn}" for ip in ips]
            continue
        ep = endpoints.get((ns, name)) or {}
        for subset in ep.get("subsets") or []:
            addrs = list(subset.get("addresses") or [])
            if spec.get("publishNotReadyAddresses"):
                addrs += subset.get("notReadyAddresses") or []
            for a in addrs:
                lines.append(f"{a['ip']} {fqdn}")
                if a.get("hostname"):
                    lines.append(f"{a['ip']} {a['hostname']}.{fqdn}")
    return "".join(line + "\n" for line in sorted(set(lines)))


def main():
    for kind in objs:
        threading.Thread(target=follow, args=(kind,), daemon=True).start()
    last = None
    while True:
        changed.wait()
        time.sleep(0.05)  # let a burst of events settle
        changed.clear()
        if len(synced) < len(objs):
            continue
        text = render()
        if text == last:
            continue
        tmp = hosts + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, hosts)
        last = text
        try:
            with open(dnsmasq_pidfile) as f:
                os.kill(int(f.read().split()[0]), signal.SIGHUP)
        except (OSError, ValueError, IndexError) as e:
            print(f"dns-sync: cannot signal dnsmasq: {e}", file=sys.stderr, flush=True)


main()
EOF
}

# ---------------------------------------------------------------------------------------------
# Host networking

save_host_state() {
  # What this cluster changes on the host, recorded once per cluster (restored by down).
  if [[ ! -f $RUN/sysctl.saved ]]; then
    local s
    for s in "${SYSCTLS[@]}"; do
      echo "$s=$(sysctl -n "$s" 2>/dev/null || echo)"
    done >"$RUN/sysctl.saved.tmp"
    mv "$RUN/sysctl.saved.tmp" "$RUN/sysctl.saved"
  fi
  if [[ ! -f $RUN/xtables.before ]]; then
    local ipt
    for ipt in iptables ip6tables; do
      "$ipt-save" 2>/dev/null | sed -n "s/^\*/$ipt /p"
    done >"$RUN/xtables.before"
  fi
  if [[ ! -f $RUN/host-paths.created ]]; then
    local p
    for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] || echo "$p"; done >"$RUN/host-paths.created"
  fi
}

setup_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "creating bridge $BRIDGE $NODE_IP/24"
    ip link add "$BRIDGE" type bridge
  fi
  # A fixed MAC: a bridge without one takes the lowest of its ports' MACs, so each new pod could
  # change the gateway's MAC under the other pods' ARP caches (DNS and Services then time out).
  ip link set "$BRIDGE" address "$BRIDGE_MAC"
  [[ "$(ip -o -4 addr show dev "$BRIDGE")" == *" inet $NODE_IP/24 "* ]] || ip addr add "$NODE_IP/24" dev "$BRIDGE"
  # Service replies between pods on this bridge must pass conntrack (un-DNAT).
  ip link set "$BRIDGE" type bridge nf_call_iptables 1 2>/dev/null || true
  ip link set "$BRIDGE" up
  # Routing only for packets entering from the bridge (pod -> ClusterIP -> pod); the global
  # net.ipv4.ip_forward is left alone.
  sysctl -qw "net.ipv4.conf.$BRIDGE.forwarding=1"
  # Guard: nothing is routed between the bridge and any other interface.
  iptables -w -N "$GUARD_CHAIN" 2>/dev/null || true
  iptables -w -F "$GUARD_CHAIN"
  iptables -w -A "$GUARD_CHAIN" -i "$BRIDGE" ! -o "$BRIDGE" -j DROP
  iptables -w -A "$GUARD_CHAIN" -o "$BRIDGE" ! -i "$BRIDGE" -j DROP
  iptables -w -C FORWARD -j "$GUARD_CHAIN" 2>/dev/null || iptables -w -I FORWARD 1 -j "$GUARD_CHAIN"
  # Guard: the cluster's processes (and their children: shims, CNI plugins) send nothing beyond
  # loopback, the bridge and the Service range. kubelet 1.20's ECR credential provider, for one,
  # dials the cloud metadata address at start-up (see AWS_EC2_METADATA_DISABLED below).
  mkdir -p "$CGROUP"
  local ipt
  for ipt in iptables ip6tables; do
    "$ipt" -w -N "$EGRESS_CHAIN" 2>/dev/null || true
    "$ipt" -w -F "$EGRESS_CHAIN"
    "$ipt" -w -A "$EGRESS_CHAIN" -o lo -j RETURN
    "$ipt" -w -A "$EGRESS_CHAIN" -o "$BRIDGE" -j RETURN
    if [[ $ipt == iptables ]]; then
      "$ipt" -w -A "$EGRESS_CHAIN" -d "$POD_CIDR" -j RETURN
      "$ipt" -w -A "$EGRESS_CHAIN" -d "$SVC_CIDR" -j RETURN
    fi
    "$ipt" -w -A "$EGRESS_CHAIN" -m limit --limit 6/min -j LOG --log-prefix "qmesh-cluster egress blocked: "
    "$ipt" -w -A "$EGRESS_CHAIN" -j REJECT
    # Only packets of the cluster's own (full) sockets enter the guard. A negated cgroup match
    # inside the chain would not do: packets without a full socket (a listener's SYN-ACK, a RST)
    # never match a cgroup, negated or not, and every other server of the machine would have its
    # connections from outside loopback refused while the cluster runs.
    "$ipt" -w -D OUTPUT -j "$EGRESS_CHAIN" 2>/dev/null || true
    "$ipt" -w -C OUTPUT -m cgroup --path "$CGROUP_NAME" -j "$EGRESS_CHAIN" 2>/dev/null ||
      "$ipt" -w -I OUTPUT 1 -m cgroup --path "$CGROUP_NAME" -j "$EGRESS_CHAIN"
  done
}

# ---------------------------------------------------------------------------------------------
# The pause image: the static pause binary as a one-layer docker-archive, imported into containerd.

import_pause() {
  if ctr_ -n k8s.io images ls -q 2>/dev/null | grep -x "$PAUSE_IMAGE" >/dev/null; then return 0; fi
  log "importing $PAUSE_IMAGE (static pause from the kubernetes source tree)"
  local tar=$RUN/pause-image.tar
  /usr/bin/python3 - "$ASSETS/pause" "$PAUSE_IMAGE" "$tar" <<'EOF'
import hashlib, io, json, sys, tarfile
binary, tag, out = sys.argv[1:4]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
    data = open(binary, "rb").read()
    info = tarfile.TarInfo("pause")
    info.size, info.mode = len(data), 0o755
    t.addfile(info, io.BytesIO(data))
layer = layer.getvalue()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
}).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(out, "w") as t:
    for name, blob in (("layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
        info = tarfile.TarInfo(name)
        info.size = len(blob)
        t.addfile(info, io.BytesIO(blob))
EOF
  ctr_ -n k8s.io images import "$tar" >&2
  rm -f "$tar"
}

# ---------------------------------------------------------------------------------------------
# up

api_ready() { kc get --raw /readyz --request-timeout=5s; }

node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' --request-timeout=5s 2>/dev/null)" == True ]]
}

check_ports_free() {
  local port busy
  for port in $ETCD_PORT $ETCD_PEER_PORT 10248 10249 10256 10257 10259; do
    busy=$(ss -Hltn "sport = :$port" 2>/dev/null | head -n1)
    [[ -z $busy ]] || die "port $port is already in use ($busy); is another cluster running?"
  done
}

smoke_pod() {
  local name=qmesh-cluster-smoke
  kc -n kube-system delete pod "$name" --ignore-not-found --grace-period=0 --force --wait=true >/dev/null 2>&1 || true
  local manifest=$RUN/smoke-pod.yaml
  cat >"$manifest" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: kube-system
spec:
  terminationGracePeriodSeconds: 0
  automountServiceAccountToken: false
  containers:
  - name: pause
    image: $PAUSE_IMAGE
    imagePullPolicy: Never
EOF
  # The service-account admission needs the namespace's default ServiceAccount first.
  wait_until "the smoke pod to be accepted" 60 kc create -f "$manifest" || return 1
  if ! wait_until "the smoke pod to run" 90 kc -n kube-system wait --for=condition=Ready "pod/$name" --timeout=5s; then
    kc -n kube-system describe pod "$name" >&2 || true
    return 1
  fi
  log "smoke pod ran at $(kc -n kube-system get pod "$name" -o 'jsonpath={.status.podIP}')"
  kc -n kube-system delete pod "$name" --grace-period=1 --wait=false >/dev/null 2>&1 || true
}

cmd_up() {
  [[ $(id -u) -eq 0 ]] || die "must run as root"
  local t0=$SECONDS fresh=0
  provision
  mkdir -p "$RUN" "$LOGS" "$PIDS" "$STATE/images"
  if [[ ! -f $RUN/created ]]; then
    fresh=1
    if [[ -n "$(stray_pids)" ]] || ip link show "$BRIDGE" >/dev/null 2>&1; then
      log "leftovers of an earlier cluster found: cleaning up first"
      cmd_down
      mkdir -p "$RUN" "$LOGS" "$PIDS" "$STATE/images"
    fi
    check_ports_free
    : >"$RUN/created"
    local f
    for f in "$LOGS"/*.log; do [[ -e $f ]] && : >"$f"; done
  fi
  save_host_state
  make_pki
  write_configs
  setup_network

  start_proc etcd "$ASSETS/etcd" --name qmesh --data-dir "$RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "qmesh=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn

  start_proc kube-apiserver "$ASSETS/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --api-audiences=https://kubernetes.default.svc.cluster.local,qmesh \
    --service-cluster-ip-range="$SVC_CIDR" \
    --enable-aggregator-routing=true \
    --allow-privileged=true \
    --kubelet-preferred-address-types=InternalIP \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --profiling=false --v=1

  # containerd and the DNS server do not need the API server: start them while it comes up.
  mkdir -p "$RUN/containerd"
  start_proc containerd containerd --config "$CONF/containerd.toml"
  [[ -f $RUN/dns/hosts ]] || : >"$RUN/dns/hosts"
  start_proc dnsmasq dnsmasq --keep-in-foreground --conf-file=/dev/null --log-facility=- \
    --no-resolv --no-hosts --no-poll --addn-hosts="$RUN/dns/hosts" \
    --listen-address="$DNS_IP" --bind-interfaces --port=53 --domain-needed \
    --local=/cluster.local/ --local=/18.198.in-addr.arpa/ --local=/19.198.in-addr.arpa/ \
    --user=root --group=root --pid-file=

  wait_until "containerd ($CTR_SOCK)" 30 ctr_ version || {
    log_tail containerd
    exit 1
  }
  import_pause

  wait_until "kube-apiserver https://$NODE_IP:$API_PORT" 90 api_ready || {
    log_tail kube-apiserver
    exit 1
  }

  start_proc kube-controller-manager "$ASSETS/kube-controller-manager" \
    --kubeconfig="$CONF/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$CONF/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$CONF/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --port=0 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SVC_CIDR" --allocate-node-cidrs=false \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --profiling=false --v=1
  start_proc kube-scheduler "$ASSETS/kube-scheduler" \
    --kubeconfig="$CONF/scheduler.kubeconfig" \
    --authentication-kubeconfig="$CONF/scheduler.kubeconfig" \
    --authorization-kubeconfig="$CONF/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --port=0 --leader-elect=false --profiling=false --v=1
  start_proc dns-sync /usr/bin/python3 "$RUN/dns/dns-sync.py" "$NODE_IP" "$API_PORT" "$PKI/ca.crt" \
    "$PKI/admin.crt" "$PKI/admin.key" "$RUN/dns/hosts" "$PIDS/dnsmasq.pid"
  start_proc kubelet "$ASSETS/kubelet" \
    --config="$CONF/kubelet.yaml" --kubeconfig="$CONF/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CTR_SOCK" \
    --runtime-request-timeout=2m \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
    --root-dir="$RUN/kubelet" --cert-dir="$RUN/kubelet/pki" \
    --seccomp-profile-root="$RUN/kubelet/seccomp" \
    --volume-plugin-dir="$RUN/kubelet/volume-plugins" \
    --pod-infra-container-image="$PAUSE_IMAGE" --v=1
  start_proc kube-proxy "$ASSETS/kube-proxy" --config="$CONF/kube-proxy.yaml" --v=1

  local p
  for p in etcd kube-apiserver containerd dnsmasq kube-controller-manager kube-scheduler dns-sync kubelet kube-proxy; do
    proc_alive "$p" || {
      log_tail "$p"
      die "$p exited"
    }
  done
  wait_until "node $NODE_NAME to be Ready" 120 node_ready || {
    log_tail kubelet
    exit 1
  }
  wait_until "cluster DNS to list the kubernetes Service" 30 \
    grep -q " kubernetes.default.svc.cluster.local$" "$RUN/dns/hosts" || {
    log_tail dns-sync
    exit 1
  }
  if [[ $fresh -eq 1 || ${#STARTED[@]} -gt 0 ]]; then
    smoke_pod || {
      log_tail kubelet
      exit 1
    }
  fi
  for p in etcd kube-apiserver containerd dnsmasq kube-controller-manager kube-scheduler dns-sync kubelet kube-proxy; do
    proc_alive "$p" || {
      log_tail "$p"
      die "$p exited"
    }
  done
  log "cluster up in $((SECONDS - t0))s${STARTED[*]:+ (started: ${STARTED[*]})}; export KUBECONFIG=$KUBECONFIG_PATH"
  echo "$KUBECONFIG_PATH" >&3
}

# ---------------------------------------------------------------------------------------------
# down

# Removes the rules this cluster added (its guard chain, and every KUBE-* chain with the rules
# that jump to it: kubelet's and kube-proxy's), from iptables and ip6tables.
sweep_iptables() { # iptables|ip6tables
  local ipt=$1 table line chains c
  command -v "$ipt-save" >/dev/null || return 0
  for table in filter nat mangle raw; do
    "$ipt-save" -t "$table" >/dev/null 2>&1 || continue
    while IFS= read -r line; do
      eval "$ipt -w -t $table ${line/#-A /-D }" 2>/dev/null || true
    done < <("$ipt-save" -t "$table" | grep -E "^-A " | grep -vE "^-A (KUBE-|$GUARD_CHAIN |$EGRESS_CHAIN )" |
      grep -E -- "-j (KUBE-[A-Z0-9-]+|$GUARD_CHAIN|$EGRESS_CHAIN)( |$)" || true)
    chains=$("$ipt-save" -t "$table" | sed -nE "s/^:((KUBE-[^ ]+)|$GUARD_CHAIN|$EGRESS_CHAIN) .*/\1/p")
    for c in $chains; do "$ipt" -w -t "$table" -F "$c" 2>/dev/null || true; done
    for c in $chains; do "$ipt" -w -t "$table" -X "$c" 2>/dev/null || true; done
  done
}

# iptables-nft leaves the tables it created (empty after the sweep); drop those that did not exist
# before this cluster and hold no rule.
drop_empty_tables() {
  [[ -f $RUN/xtables.before ]] && command -v nft >/dev/null || return 0
  local ipt fam table rules
  for ipt in iptables ip6tables; do
    [[ $ipt == iptables ]] && fam=ip || fam=ip6
    for table in $("$ipt-save" 2>/dev/null | sed -n 's/^\*//p'); do
      grep -qx "$ipt $table" "$RUN/xtables.before" && continue
      rules=$("$ipt-save" -t "$table") || continue
      grep -qE '^(-A |:[^ ]+ - )' <<<"$rules" && continue
      nft delete table "$fam" "$table" 2>/dev/null || true
    done
  done
}

# Every process left in the cluster's cgroup (components, containerd shims, their children).
kill_cgroup_members() {
  [[ -n $CGROUP && -f $CGROUP/cgroup.procs ]] || return 0
  local p i
  for ((i = 0; i < 20; i++)); do
    [[ -s $CGROUP/cgroup.procs ]] || return 0
    while IFS= read -r p; do
      log "stopping leftover pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-100)"
      kill -KILL "$p" 2>/dev/null || true
    done <"$CGROUP/cgroup.procs"
    sleep 0.2
  done
}

remove_containers() {
  [[ -S $CTR_SOCK ]] && ctr_ version >/dev/null 2>&1 || return 0
  local ns id n=0
  for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
    for id in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
      ctr_ -n "$ns" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
      ctr_ -n "$ns" tasks rm -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
      ctr_ -n "$ns" containers rm "$id" >/dev/null 2>&1 || true
      n=$((n + 1))
    done
  done
  [[ $n -eq 0 ]] || log "removed $n containers"
}

kill_cgroup_procs() {
  local d p
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d $d ]] || continue
    while IFS= read -r p; do
      if [[ -n $p ]]; then kill -KILL "$p" 2>/dev/null || true; fi
    done < <(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null)
  done
}

remove_cgroups() {
  local d i
  for ((i = 0; i < 20; i++)); do
    local left=0
    for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
      [[ -d $d ]] || continue
      find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
      [[ -d $d ]] && left=1
    done
    [[ $left -eq 0 ]] && return 0
    kill_cgroup_procs
    sleep 0.25
  done
  log "warning: could not remove some kubepods cgroups"
}

unmount_state() {
  local m i
  for ((i = 0; i < 5; i++)); do
    mapfile -t m < <(awk -v s="$STATE/" 'index($5, s) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    [[ ${#m[@]} -eq 0 ]] && return 0
    for p in "${m[@]}"; do
      p=$(printf '%b' "$p") # mountinfo escapes spaces etc. as \040
      umount "$p" 2>/dev/null || umount -l "$p" 2>/dev/null || true
    done
  done
  log "warning: mounts left under $STATE"
}

cmd_down() {
  [[ $(id -u) -eq 0 ]] || die "must run as root"
  local purge=${1:-}
  mkdir -p "$PIDS"
  # Node agents first, so nothing restarts containers while they are removed.
  local p
  for p in kubelet kube-proxy kube-scheduler kube-controller-manager dns-sync dnsmasq; do stop_proc "$p"; done
  # Containers are removed through containerd: start it again if it died.
  if ! proc_alive containerd && [[ -f $CONF/containerd.toml && -n $CGROUP ]] &&
    [[ -n "$(find "$STATE/images/containerd" -name meta.db 2>/dev/null)" ]]; then
    mkdir -p "$CGROUP" "$LOGS"
    start_proc containerd containerd --config "$CONF/containerd.toml"
    wait_until "containerd" 20 ctr_ version || true
  fi
  remove_containers
  stop_proc containerd 15
  for p in kube-apiserver etcd; do stop_proc "$p"; done
  # Anything still running that belongs to this cluster (containerd shims, container processes,
  # components whose pid file was lost).
  for p in $(stray_pids); do
    log "stopping leftover pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-120)"
    stop_pid "$p" 5
  done
  kill_cgroup_members
  kill_cgroup_procs
  unmount_state
  remove_cgroups

  sweep_iptables iptables
  sweep_iptables ip6tables
  drop_empty_tables
  [[ -n $CGROUP && -d $CGROUP ]] && { rmdir "$CGROUP" 2>/dev/null || log "warning: could not remove $CGROUP"; }
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "deleting bridge $BRIDGE"
    local v
    for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
      ip link del "$v" 2>/dev/null || true
    done
    ip link del "$BRIDGE"
  fi

  if [[ -f $RUN/sysctl.saved ]]; then
    local kv
    while IFS= read -r kv; do
      if [[ -n ${kv#*=} ]]; then sysctl -qw "$kv" 2>/dev/null || true; fi
    done <"$RUN/sysctl.saved"
  fi
  if [[ -f $RUN/host-paths.created ]]; then
    while IFS= read -r p; do [[ -n $p ]] && rm -rf "$p"; done <"$RUN/host-paths.created"
  fi
  rm -f /var/lib/cni/results/qmesh-* 2>/dev/null || true

  rm -rf "$RUN" "$KUBECONFIG_PATH"
  if [[ $purge == --purge ]]; then
    rm -rf "$STATE"
  fi
  log "cluster down"
}

cmd_env() {
  if ! proc_alive kube-apiserver || [[ ! -f $KUBECONFIG_PATH ]]; then die "no cluster running (hack/cluster.sh up)"; fi
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
}

# kubelet 1.20's ECR credential provider asks the AWS SDK for credentials at start-up, whose chain
# ends at the EC2 metadata endpoint (169.254.169.254): never let it dial out.
export AWS_EC2_METADATA_DISABLED=true

# Everything but the final line (and `env`'s output) goes to stderr.
exec 3>&1 1>&2
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  env) cmd_env >&3 ;;
  *)
    echo "usage: $0 up|down [--purge]|env" >&2
    exit 2
    ;;
esac
