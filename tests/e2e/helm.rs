//! The Helm chart `deploy/helm/localship`: `helm lint` is clean, what it
//! renders passes server-side dry-run on the real apiserver with the same
//! permissions `deploy/` grants and no more, its values do what they say, and
//! the Airflow chart's claims bind through its default class.

use std::path::PathBuf;
use std::process::Output;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::ResourceExt;
use localship_tests::{apply_yaml, authority, control_plane, wait_for, ProvisionerAgent};
use serde_json::Value;

use crate::common::*;
use crate::deploy::kustomize_dir;

fn chart() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/helm/localship")
        .display()
        .to_string()
}

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("e2e/fixtures/helm")
        .join(name)
        .display()
        .to_string()
}

/// Runs helm with its cache, config and data kept out of $HOME.
fn helm(args: &[&str]) -> Result<Output> {
    localship_tests::node::install::run_helm(None, args)
}

/// `helm template` of the chart as release `release` in `namespace`.
fn template(release: &str, namespace: &str, extra: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    args.extend_from_slice(extra);
    let out = helm(&args)?;
    if !out.status.success() {
        bail!(
            "helm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Dry-runs `yaml` on the apiserver and returns what it admitted.
async fn dry_run(client: &kube::Client, yaml: &str) -> Result<Vec<Value>> {
    apply_yaml(client, None, yaml, true)
        .await?
        .into_iter()
        .map(|o| Ok(serde_json::to_value(o)?))
        .collect()
}

fn kinds(objects: &[Value]) -> Vec<&str> {
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// The base paths the volumes policy among `objects` allows (its CEL list, parsed).
fn policy_bases(objects: &[Value]) -> Result<Value> {
    let policy = objects
        .iter()
        .find(|o| {
            o["kind"] == "ValidatingAdmissionPolicy"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("agent-volumes"))
        })
        .context("no volumes policy")?;
    let bases = policy["spec"]["variables"]
        .as_array()
        .context("no variables")?
        .iter()
        .find(|v| v["name"] == "bases")
        .context("no bases")?;
    Ok(serde_json::from_str(
        bases["expression"].as_str().context("no expression")?,
    )?)
}

/// The container `name` of any DaemonSet among `objects`.
fn container<'a>(objects: &'a [Value], name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "DaemonSet")
        .filter_map(|d| d["spec"]["template"]["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no {name} container"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

#[test]
fn helm_lint_is_clean() -> Result<()> {
    let chart = chart();
    let everything = fixture("everything.yaml");
    for args in [
        vec!["lint", "--strict", &chart],
        vec!["lint", "--strict", &chart, "-f", &everything],
    ] {
        let out = helm(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("0 chart(s) failed"),
            "helm {}:\n{stdout}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.contains("[WARNING]"), "{stdout}");
    }
    // A binding mode localship cannot serve is refused at render time.
    let out = helm(&[
        "template",
        "x",
        &chart,
        "--set",
        "storageClass.volumeBindingMode=Immediate",
    ])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("WaitForFirstConsumer only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_renders_what_kustomize_installs_and_the_apiserver_admits_it() -> Result<()> {
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("helm").await?;

    // Default values: deploy/ the helm way (the release namespace, no Namespace object).
    let objects = dry_run(&client, &template("localship", &ns, &[])?).await?;
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "Service",
            "ServiceAccount",
            "StorageClass",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    let kustomized = yaml_documents(&kustomize_dir("deploy")?)?;
    // No more permissions than deploy/ grants, and no fewer; the same policies.
    for role in ["localship", "localship-node-cleanup"] {
        assert_eq!(
            canonical_rules(object(&objects, "ClusterRole", Some(role))?),
            canonical_rules(object(&kustomized, "ClusterRole", Some(role))?),
            "{role}"
        );
    }
    for policy in [
        "localship-agent-volumes",
        "localship-agent-claims",
        "localship-node-cleanup",
    ] {
        let chart = object(&objects, "ValidatingAdmissionPolicy", Some(policy))?;
        let base = object(&kustomized, "ValidatingAdmissionPolicy", Some(policy))?;
        // The same CEL, however each tool folds its lines.
        let words = |v: &Value| {
            let text = v.to_string().replace("\\n", " ");
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        for field in ["validations", "variables"] {
            assert_eq!(
                words(&chart["spec"][field]),
                words(&base["spec"][field]),
                "{policy}: {field}"
            );
        }
        let condition = chart["spec"]["matchConditions"][0]["expression"].to_string();
        let in_ns = format!("system:serviceaccount:{ns}:localship");
        assert!(condition.contains(&in_ns), "{policy}: {condition}");
    }
    assert_eq!(
        policy_bases(&objects)?,
        serde_json::json!(["/opt/local-path-provisioner"])
    );
    let binding = object(&objects, "ClusterRoleBinding", Some("localship"))?;
    assert_eq!(binding["subjects"][0]["namespace"], ns.as_str());
    // The same config.json and the same class.
    let config = |objects: &[Value]| -> Result<Value> {
        let cm = object(objects, "ConfigMap", None)?;
        Ok(serde_json::from_str(
            cm["data"]["config.json"]
                .as_str()
                .context("no config.json")?,
        )?)
    };
    assert_eq!(config(&objects)?, config(&kustomized)?);
    let class = object(&objects, "StorageClass", Some("local-path"))?;
    let base_class = object(&kustomized, "StorageClass", Some("local-path"))?;
    for field in ["provisioner", "volumeBindingMode", "reclaimPolicy"] {
        assert_eq!(class[field], base_class[field], "{field}");
    }
    assert_eq!(
        class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    let provisioner = container(&objects, "provisioner")?;
    let args = strings(&provisioner["args"]);
    assert!(args.contains(&"--config=/etc/localship/config.json"));
    assert!(!args.contains(&"--serve-rancher"), "{args:?}");
    assert_eq!(provisioner["resources"]["requests"]["memory"], "32Mi");
    assert_eq!(provisioner["resources"]["limits"]["memory"], "64Mi");
    assert!(container(&objects, "logshipper").is_err());
    assert_eq!(
        provisioner["image"], "ghcr.io/localship/localship:0.1.0",
        "the image tag defaults to the appVersion"
    );

    // Every option on: shipping, ServiceMonitor, rancher, several base paths.
    servicemonitor_crd(&client).await?;
    let objects = dry_run(
        &client,
        &template("ls", &ns, &["-f", &fixture("everything.yaml")])?,
    )
    .await?;
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
            "StorageClass",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    let shipping = yaml_documents(&kustomize_dir("deploy/overlays/s3-shipping")?)?;
    assert_eq!(
        canonical_rules(object(
            &objects,
            "ClusterRole",
            Some("ls-localship-logshipper")
        )?),
        canonical_rules(object(
            &shipping,
            "ClusterRole",
            Some("localship-logshipper")
        )?)
    );
    let shipper_set = object(&objects, "DaemonSet", Some("ls-localship-logshipper"))?;
    assert_eq!(
        shipper_set["spec"]["template"]["spec"]["serviceAccountName"],
        "ls-localship-logshipper"
    );
    let class = object(&objects, "StorageClass", Some("local-path-shipped"))?;
    assert_eq!(
        class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "false"
    );
    assert_eq!(class["reclaimPolicy"], "Retain");
    assert_eq!(
        class["parameters"]["localship.io/ship-to"],
        "s3://airflow/logs"
    );
    let monitor = object(&objects, "ServiceMonitor", Some("ls-localship"))?;
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let monitored: Vec<&str> = monitor["spec"]["endpoints"]
        .as_array()
        .context("no endpoints")?
        .iter()
        .filter_map(|e| e["port"].as_str())
        .collect();
    let service = object(&objects, "Service", Some("ls-localship-metrics"))?;
    let exposed: Vec<&str> = service["spec"]["ports"]
        .as_array()
        .context("no ports")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(monitored, ["prov-metrics", "ship-metrics"]);
    assert_eq!(exposed, monitored);
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("no selector")?
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "{k}");
    }

    let provisioner = container(&objects, "provisioner")?;
    let args = strings(&provisioner["args"]);
    assert!(args.contains(&"--serve-rancher"), "{args:?}");
    assert!(args.contains(&"--reserve=10Gi"), "{args:?}");
    assert_eq!(provisioner["image"], "ghcr.io/localship/localship:0.1.1");
    assert_eq!(provisioner["imagePullPolicy"], "Always");
    let shipper = container(&objects, "logshipper")?;
    assert!(strings(&shipper["args"]).contains(&"--settle=10s"));
    assert_eq!(env(shipper, "LOCALSHIP_DEST"), Some("s3://airflow/logs"));
    assert_eq!(
        env(shipper, "LOCALSHIP_S3_ENDPOINT"),
        Some("http://minio.minio.svc:9000")
    );
    assert_eq!(env(shipper, "LOCALSHIP_S3_REGION"), Some("eu-west-1"));
    assert_eq!(env(shipper, "LOCALSHIP_S3_PATH_STYLE"), Some("true"));
    let secret = object(&objects, "Secret", None)?;
    assert_eq!(
        shipper["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    assert_eq!(shipper["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(shipper["resources"]["limits"]["memory"], "256Mi");
    // Each distinct base path is mounted once, at its own path, in both
    // containers; the shipper only reads.
    let mounts = |c: &Value| -> Vec<(String, bool)> {
        let mut m: Vec<(String, bool)> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| {
                m["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("base-path"))
            })
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap_or_default().to_string(),
                    m["readOnly"] == true,
                )
            })
            .collect();
        m.sort();
        m
    };
    let paths = [
        "/mnt/nvme0/localship",
        "/mnt/nvme1/localship",
        "/opt/local-path-provisioner",
    ];
    assert_eq!(
        mounts(provisioner),
        paths.map(|p| (p.to_string(), false)).to_vec()
    );
    assert_eq!(
        mounts(shipper),
        paths.map(|p| (p.to_string(), true)).to_vec()
    );
    for set in ["ls-localship", "ls-localship-logshipper"] {
        let pod = &object(&objects, "DaemonSet", Some(set))?["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux", "{set}");
        assert_eq!(pod["tolerations"][0]["key"], "dedicated", "{set}");
    }
    assert_eq!(policy_bases(&objects)?, serde_json::json!(paths));
    let config = config(&objects)?;
    assert_eq!(config["nodePathMap"][1]["node"], "node-a");

    // An existing Secret: the chart makes none and uses that one.
    let objects = dry_run(
        &client,
        &template(
            "ls",
            &ns,
            &[
                "--set",
                "shipping.enabled=true",
                "--set",
                "shipping.existingSecret=airflow-minio",
            ],
        )?,
    )
    .await?;
    assert!(!kinds(&objects).contains(&"Secret"));
    assert_eq!(
        container(&objects, "logshipper")?["envFrom"][0]["secretRef"]["name"],
        "airflow-minio"
    );
    // Neither: the AWS default chain (web identity, instance role).
    let objects = yaml_documents(&template("ls", &ns, &["--set", "shipping.enabled=true"])?)?;
    assert!(container(&objects, "logshipper")?.get("envFrom").is_none());
    Ok(())
}

/// The Airflow chart's claims, none naming a class: worker and triggerer logs
/// from StatefulSet volumeClaimTemplates (the worker's opted in to shipping
/// through the chart's `workers.persistence.annotations`), the scheduler's
/// (LocalExecutor makes it a StatefulSet too) and Redis' data. Sizes are
/// those of deploy/examples/airflow/values.yaml: the chart's default 100Gi
/// is more than many nodes have free, and localship checks.
fn airflow_statefulsets() -> String {
    let sts = |name: &str, template: &str, size: &str, annotations: &str| {
        format!(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{ name: airflow-{name} }}
spec:
  serviceName: airflow-{name}
  replicas: 1
  selector: {{ matchLabels: {{ component: {name} }} }}
  template:
    metadata: {{ labels: {{ component: {name} }} }}
    spec:
      containers: [{{ name: {name}, image: apache/airflow, volumeMounts: [{{ name: {template}, mountPath: /data }}] }}]
  volumeClaimTemplates:
  - metadata: {{ name: {template}, annotations: {{ {annotations} }} }}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {{ requests: {{ storage: {size} }} }}
---"#
        )
    };
    [
        sts(
            "worker",
            "logs",
            "10Gi",
            "localship.io/ship-to: 's3://airflow/logs/{namespace}'",
        ),
        sts("triggerer", "logs", "10Gi", ""),
        sts("scheduler", "logs", "10Gi", ""),
        sts("redis", "redis-db", "1Gi", ""),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airflow_claims_without_a_class_bind_through_the_charts_default_class() -> Result<()> {
    let _default_class = DEFAULT_CLASS.lock().await;
    let cp = control_plane()?;
    let client = cp.client().await?;
    let ns = cp.namespace("helm-airflow").await?;
    // Installed for real, with names of this test's own.
    let release = format!("{ns}-ls");
    let class_name = format!("{ns}-local-path");
    let prov = provisioner_name(&ns);
    let manifests = template(
        &release,
        &ns,
        &[
            "--set",
            &format!("storageClass.name={class_name}"),
            "--set",
            &format!("provisionerName={prov}"),
            "--set",
            &format!(
                "policy.allowedBasePaths={{{}}}",
                authority::allowed_bases()?
            ),
        ],
    )?;
    apply_yaml(&client, None, &manifests, false).await?;
    // Each agent as the chart's DaemonSet pod on its node, under the chart's policies.
    let fullname = format!("{release}-localship");
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let kubeconfig = authority::node_kubeconfig_in(cp, &ns, &fullname, node).await?;
        agents.push(ProvisionerAgent::start_as(cp, node, &prov, &[], &kubeconfig).await?);
    }

    apply_yaml(&client, Some(&ns), &airflow_statefulsets(), false).await?;
    let claims = [
        "logs-airflow-worker-0",
        "logs-airflow-triggerer-0",
        "logs-airflow-scheduler-0",
        "redis-db-airflow-redis-0",
    ];
    let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
    let mut volumes = Vec::new();
    for claim in claims {
        let pv = match wait_bound(&client, &ns, claim).await {
            Ok(pv) => pv,
            Err(e) => bail!(
                "{e:#}\nclaim: {:?}\nevents: {:?}\nagent log:\n{}",
                pvcs.get(claim).await?,
                claim_events(&client, &ns, claim).await?,
                agents[0].log_tail(20)
            ),
        };
        assert_eq!(
            pv.spec.as_ref().unwrap().storage_class_name.as_deref(),
            Some(class_name.as_str()),
            "{claim}"
        );
        let node = affinity_node(&pv)?;
        let agent = agents.iter().find(|a| a.node == node).context("no agent")?;
        let path = PathBuf::from(host_path(&pv));
        assert!(path.starts_with(agent.base_path()), "{}", path.display());
        assert!(path.is_dir(), "{}", path.display());
        volumes.push((pv.metadata.name.clone().unwrap(), path));
    }
    // The shipping opt-in reaches the claim, where the shipper looks.
    let worker_claim = pvcs.get("logs-airflow-worker-0").await?;
    assert_eq!(
        worker_claim.metadata.annotations.unwrap()["localship.io/ship-to"],
        "s3://airflow/logs/{namespace}"
    );

    // helm uninstall of Airflow leaves StatefulSet claims; deleting them
    // removes volumes and directories.
    let sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    sets.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    wait_for("the StatefulSets to be gone", BIND_TIMEOUT, || async {
        Ok(sets
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete_collection(&now, &ListParams::default()).await?;
    pvcs.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    // The worker's claim asks for shipping, so its PV was made held for the log shipper,
    // which this install lacks: it stays, directory and all, until released by hand (as
    // README "Turning shipping off" does). The others go at once.
    let pv_api = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone());
    let worker_pv = &volumes[0].0;
    for (pv, path) in &volumes[1..] {
        wait_pv_gone(&client, pv).await?;
        assert!(!path.exists(), "{} left behind", path.display());
    }
    let held = pv_api.get(worker_pv).await?;
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == "localship.io/ship-logs"),
        "{:?}",
        held.finalizers()
    );
    assert!(volumes[0].1.is_dir(), "removed while held for the shipper");
    let released: Vec<&String> = held
        .finalizers()
        .iter()
        .filter(|f| *f != "localship.io/ship-logs")
        .collect();
    let patch = serde_json::json!({ "metadata": {
        "resourceVersion": held.metadata.resource_version, "finalizers": released } });
    pv_api
        .patch(worker_pv, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    wait_pv_gone(&client, worker_pv).await?;
    assert!(
        !volumes[0].1.exists(),
        "{} left behind",
        volumes[0].1.display()
    );

    // Leave no default class or cluster-wide grant behind.
    let classes = Api::<StorageClass>::all(client.clone());
    classes.delete(&class_name, &Default::default()).await?;
    wait_for("the chart's class to be gone", BIND_TIMEOUT, || async {
        Ok(classes.get_opt(&class_name).await?.is_none().then_some(()))
    })
    .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .delete(&fullname, &Default::default())
        .await?;
    Api::<ClusterRole>::all(client)
        .delete(&fullname, &Default::default())
        .await?;
    Ok(())
}
