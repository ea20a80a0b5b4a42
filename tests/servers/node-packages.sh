#!/usr/bin/env bash
# Installs the Debian packages the real node runs on, where missing:
# containerd (and ctr), runc, the CNI plugins, iptables, conntrack, umoci
# (images without a daemon) and busybox-static (the pods' image).
set -euo pipefail

missing=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have containerd || missing+=(containerd)
have runc || missing+=(runc)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || missing+=(containernetworking-plugins)
have iptables || missing+=(iptables)
have conntrack || missing+=(conntrack)
have umoci || missing+=(umoci)
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
have ip || missing+=(iproute2)
have cc || missing+=(gcc libc6-dev)
have strip || missing+=(binutils)
have tar || missing+=(tar)

if ((${#missing[@]})); then
  echo "node: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
echo "node: packages ready" >&2
