#!/usr/bin/env bash
# Builds the real servers the e2e tests and benchmarks run, from their Go
# modules, into a cache outside the repository:
#   $LOCALSHIP_TEST_CACHE (default ~/.cache/localship-test)/<key>/bin
# The key changes whenever a pinned version or the Go toolchain changes, so a
# warm run finds everything built and returns at once.
# Prints the bin directory on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${LOCALSHIP_TEST_CACHE:-$HOME/.cache/localship-test}
key=$( (go version; cat "$0" "$here/versions.env" "$here/kube/go.mod" "$here/kube/go.sum") | sha256sum | cut -c1-12)
out="$cache_root/$key"
bin="$out/bin"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy minio mc)

have_all() {
  local b
  for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done
}

if have_all; then
  echo "servers: cached in $bin" >&2
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
start=$(date +%s)
export CGO_ENABLED=0
ldflags="-s -w"
# Stamp the release into the binaries as Kubernetes' own build does, so
# /version, kubectl and version-skew checks see v1.32.x, not v0.0.0-master.
kube_pkg=k8s.io/component-base/version
client_pkg=k8s.io/client-go/pkg/version
minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
kube_ldflags="$ldflags"
for pkg in $kube_pkg $client_pkg; do
  kube_ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

echo "servers: building Kubernetes $KUBE_VERSION control plane, kubelet, kube-proxy and etcd (cold build, several minutes)" >&2
(cd "$here/kube" && go build -trimpath -ldflags "$kube_ldflags" -o "$bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy)
(cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$bin/etcd" ./etcd)

echo "servers: building MinIO $MINIO_VERSION and mc $MC_VERSION" >&2
GOBIN="$bin" go install -trimpath -ldflags "$ldflags" "github.com/minio/minio@$MINIO_VERSION"
GOBIN="$bin" go install -trimpath -ldflags "$ldflags" "github.com/minio/mc@$MC_VERSION"

have_all
# Server builds for other pins are dead weight (~450 MB each); other
# caches beside them (the Airflow venv) are not ours to remove.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{12}' ! -name "$key" -exec rm -rf {} +
echo "servers: built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
