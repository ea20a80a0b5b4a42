//! The configuration files of a real node's parts, as pure functions of
//! where they live and which addresses and ports they use.

use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::json;

/// Where one node's parts listen and keep their state.
pub struct Layout<'a> {
    pub dir: &'a Path,
    pub node_name: &'a str,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: &'a str,
    pub pod_bridge: &'a str,
    pub service_cidr: &'a str,
    pub pause_image: &'a str,
}

impl Layout<'_> {
    pub fn containerd_socket(&self) -> std::path::PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    pub fn cni_conf_dir(&self) -> std::path::PathBuf {
        self.dir.join("cni/net.d")
    }

    pub fn kubelet_root(&self) -> std::path::PathBuf {
        self.dir.join("kubelet")
    }
}

/// containerd 1.6 (`version = 2`), every path under the node's directory.
/// Without CAP_SYS_RESOURCE it may not lower oom_score_adj, and the machine
/// has no hugetlb controller.
pub fn containerd_toml(l: &Layout) -> String {
    let d = l.dir.join("containerd");
    let d = d.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  netns_mounts_under_state_dir = true
  sandbox_image = "{pause}"
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
        Root = "{d}/runc"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        pause = l.pause_image,
        cni = l.cni_conf_dir().display(),
    )
}

/// One bridge for the pods. Pods get routes to the service range and the
/// node's address only: no default route, so nothing off this machine.
pub fn cni_conflist(l: &Layout) -> String {
    let gateway_routes = json!([
        { "dst": l.service_cidr },
        { "dst": format!("{}/32", l.node_ip) },
    ]);
    let conf = json!({
        "cniVersion": "0.4.0",
        "name": "localship-node",
        "plugins": [{
            "type": "bridge",
            "bridge": l.pod_bridge,
            "isGateway": true,
            "isDefaultGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": l.pod_cidr }]],
                "routes": gateway_routes,
                "dataDir": l.dir.join("cni/ipam").display().to_string(),
            },
        }],
    });
    serde_json::to_string_pretty(&conf).expect("JSON")
}

/// The kubelet: cgroupfs on the machine's cgroup v1 hierarchies, no node
/// allocatable enforcement or swap check, x509 clients only (the
/// apiserver's), eviction and image garbage collection kept off a shared
/// disk's normal use, no DNS for pods.
pub fn kubelet_yaml(l: &Layout, ca_file: &Path, port: u16, healthz_port: u16) -> String {
    let config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": l.node_ip.to_string(),
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "authentication": {
            "x509": { "clientCAFile": ca_file.display().to_string() },
            "webhook": { "enabled": false },
            "anonymous": { "enabled": false },
        },
        "authorization": { "mode": "AlwaysAllow" },
        "containerRuntimeEndpoint": format!("unix://{}", l.containerd_socket().display()),
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": true,
        "cgroupRoot": "/",
        "enforceNodeAllocatable": [],
        "failSwapOn": false,
        "failCgroupV1": false,
        "podLogsDir": l.dir.join("pod-logs").display().to_string(),
        "volumePluginDir": l.dir.join("volume-plugins").display().to_string(),
        "resolvConf": "",
        "serializeImagePulls": false,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "maxPods": 110,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "registerNode": true,
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
    });
    serde_json::to_string_pretty(&config).expect("JSON")
}

/// kube-proxy in iptables mode, leaving the host's conntrack sysctls and
/// localhost alone.
pub fn kube_proxy_yaml(
    l: &Layout,
    kubeconfig: &Path,
    healthz_port: u16,
    metrics_port: u16,
) -> String {
    let config = json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": { "kubeconfig": kubeconfig.display().to_string() },
        "hostnameOverride": l.node_name,
        "mode": "iptables",
        "clusterCIDR": l.pod_cidr,
        "healthzBindAddress": format!("127.0.0.1:{healthz_port}"),
        "metricsBindAddress": format!("127.0.0.1:{metrics_port}"),
        "nodePortAddresses": [format!("{}/32", l.node_ip)],
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": { "localhostNodePorts": false, "masqueradeAll": false },
    });
    serde_json::to_string_pretty(&config).expect("JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &Path) -> Layout<'_> {
        Layout {
            dir,
            node_name: "n",
            node_ip: Ipv4Addr::new(10, 200, 0, 1),
            pod_cidr: "10.244.0.0/24",
            pod_bridge: "br",
            service_cidr: "10.96.0.0/16",
            pause_image: "localhost/pause:1",
        }
    }

    #[test]
    fn every_containerd_path_is_under_the_node_directory() {
        let dir = Path::new("/tmp/node-x");
        let toml = containerd_toml(&layout(dir));
        for line in toml.lines().filter(|l| l.contains("= \"/")) {
            let path = line.split('"').nth(1).unwrap();
            assert!(
                path.starts_with("/tmp/node-x/") || path == "/usr/lib/cni",
                "{line}"
            );
        }
        assert!(toml.contains("sandbox_image = \"localhost/pause:1\""));
    }

    #[test]
    fn pods_get_no_default_route() {
        let conf: serde_json::Value =
            serde_json::from_str(&cni_conflist(&layout(Path::new("/d")))).unwrap();
        let plugin = &conf["plugins"][0];
        assert_eq!(plugin["isDefaultGateway"], false);
        assert_eq!(plugin["ipMasq"], false);
        let routes: Vec<&str> = plugin["ipam"]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["dst"].as_str().unwrap())
            .collect();
        assert_eq!(routes, ["10.96.0.0/16", "10.200.0.1/32"]);
    }

    #[test]
    fn kube_proxy_leaves_conntrack_sysctls_alone() {
        let yaml = kube_proxy_yaml(&layout(Path::new("/d")), Path::new("/k"), 1, 2);
        let conf: serde_json::Value = serde_json::from_str(&yaml).unwrap();
        assert_eq!(conf["conntrack"]["maxPerCore"], 0);
        assert_eq!(conf["conntrack"]["tcpEstablishedTimeout"], "0s");
        assert_eq!(conf["iptables"]["localhostNodePorts"], false);
    }
}
