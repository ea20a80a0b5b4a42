#!/usr/bin/env bash
# Builds the helm CLI the chart tests run, from this Go module, into a cache
# of its own beside the servers':
#   $LOCALSHIP_TEST_CACHE (default ~/.cache/localship-test)/helm-<key>/bin
# It is kept apart from ../build.sh on purpose: that cache holds a
# many-minute Kubernetes build, and its key covers its own script, so helm
# neither rebuilds it nor is pruned by it (its prune only takes bare
# 12-hex-digit directories).
# Prints the bin directory on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${LOCALSHIP_TEST_CACHE:-$HOME/.cache/localship-test}
key=$( (go version; cat "$0" "$here/go.mod" "$here/go.sum") | sha256sum | cut -c1-12)
out="$cache_root/helm-$key"
bin="$out/bin"

if [ -x "$bin/helm" ]; then
  echo "helm: cached in $bin" >&2
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
start=$(date +%s)
cd "$here"
version=$(go list -m -f '{{.Version}}' helm.sh/helm/v3)
# Stamp what helm's own Makefile stamps: its release, and the Kubernetes
# minor its client-go speaks (lint's deprecation checks and template's
# default Capabilities read it).
client_go=$(go list -m -f '{{.Version}}' k8s.io/client-go)
k8s_minor=$(echo "$client_go" | cut -d. -f2)
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

echo "helm: building $version" >&2
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$bin/helm.partial" helm.sh/helm/v3/cmd/helm
mv "$bin/helm.partial" "$bin/helm"

# Builds for other pins of this module are dead weight.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name 'helm-*' ! -name "helm-$key" -exec rm -rf {} +
echo "helm: built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
