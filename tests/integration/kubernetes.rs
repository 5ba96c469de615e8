//! The Kubernetes manifests of deploy/kubernetes/, without a cluster: each
//! passes the Kubernetes API's schemas (kubernetes-validate, strict), the
//! StatefulSet's rlsgate command line parses with the real command line, the
//! ConfigMap's configuration parses as every replica the autoscaler may run
//! reads it (its peer id from its ordinal, its secrets from the Secret), and
//! ports, probes, Services, the peer list, the grace period, the disruption
//! budget and the security context agree with that configuration and with
//! each other.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use rlsgate::config::{Config, MAX_PEER_ID, Peer};
use serde::Deserialize;
use serde_norway::Value;

use crate::containers::{self, Parsed};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DIR: &str = "deploy/kubernetes";
const KUSTOMIZATION: &str = "kustomization.yaml";
/// Placeholders for the Secrets, deliberately not applied with the rest.
const SECRET_TEMPLATE: &str = "secret.example.yaml";
const INSTALL_HINT: &str = "run `bash deploy/kubernetes/install-validator.sh`";
/// A StatefulSet pod's ordinal, through the downward API (Kubernetes 1.28+).
const POD_INDEX: &str = "metadata.labels['apps.kubernetes.io/pod-index']";
/// The schemas checked: the oldest Kubernetes with the pod-index label, and
/// the newest the pinned kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.28.0", "1.37.0"];

// ---- the manifests ----------------------------------------------------------

struct Document {
    file: String,
    value: Value,
}

/// The YAML files of deploy/kubernetes/ but the kustomization, sorted.
fn manifest_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(Path::new(ROOT).join(DIR))
        .unwrap_or_else(|e| panic!("cannot list {DIR}: {e}"))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != KUSTOMIZATION)
        .collect();
    files.sort();
    files
}

/// Every resource of every manifest file, the Secret template's included.
fn documents() -> Vec<Document> {
    let mut documents = Vec::new();
    for file in manifest_files() {
        let text = containers::read(&format!("{DIR}/{file}"));
        for document in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{DIR}/{file} is not YAML: {e}"));
            if !value.is_null() {
                documents.push(Document {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    documents
}

/// The value at a dotted path of mapping keys.
fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |value, key| value.get(key))
}

fn text_at(value: &Value, path: &str) -> Option<String> {
    match at(value, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list_at<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn labels_at(value: &Value, path: &str) -> BTreeMap<String, String> {
    at(value, path)
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let text = |v: &Value| v.as_str().map(str::to_owned);
            (text(k).unwrap(), text(v).unwrap_or_default())
        })
        .collect()
}

/// Whether a label selector (`matchLabels`, or a Service's map) picks `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A stand-in for every secret value: base64 of 32 bytes, which serves as
/// the claims key and as a password alike.
fn test_secret() -> String {
    base64::engine::general_purpose::STANDARD.encode(*b"rlsgate-kubernetes-test-secret!!")
}

struct Deployment {
    documents: Vec<Document>,
}

fn deployment() -> Deployment {
    Deployment {
        documents: documents(),
    }
}

impl Deployment {
    fn all(&self, kind: &str) -> Vec<&Document> {
        self.documents
            .iter()
            .filter(|d| text_at(&d.value, "kind").as_deref() == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{DIR} should hold exactly one {kind}");
        &found[0].value
    }

    fn named(&self, kind: &str, name: &str) -> &Document {
        self.all(kind)
            .into_iter()
            .find(|d| text_at(&d.value, "metadata.name").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{DIR} has no {kind} {name}"))
    }

    fn statefulset(&self) -> &Value {
        self.one("StatefulSet")
    }

    fn statefulset_name(&self) -> String {
        text_at(self.statefulset(), "metadata.name").unwrap()
    }

    fn pod_spec(&self) -> &Value {
        at(self.statefulset(), "spec.template.spec").expect("the StatefulSet has a pod template")
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        labels_at(self.statefulset(), "spec.template.metadata.labels")
    }

    /// The one container of the pod, which runs the rlsgate image.
    fn container(&self) -> &Value {
        let containers = list_at(self.pod_spec(), "containers");
        assert_eq!(containers.len(), 1, "the pod runs one container");
        &containers[0]
    }

    fn hpa(&self) -> &Value {
        self.one("HorizontalPodAutoscaler")
    }

    fn replicas_range(&self) -> (u64, u64) {
        let hpa = self.hpa();
        let min = at(hpa, "spec.minReplicas").map_or(1, |v| v.as_u64().unwrap());
        let max = at(hpa, "spec.maxReplicas").and_then(Value::as_u64).unwrap();
        (min, max)
    }

    /// The ordinals of every pod the autoscaler may run.
    fn ordinals(&self) -> std::ops::Range<u64> {
        let start =
            at(self.statefulset(), "spec.ordinals.start").map_or(0, |v| v.as_u64().unwrap());
        start..start + self.replicas_range().1
    }

    /// A value of the Secret template, as the pod would read it.
    fn template_secret(&self, name: &str, key: &str) -> Option<String> {
        let secret = self.all("Secret").into_iter().find(|d| {
            d.file == SECRET_TEMPLATE && text_at(&d.value, "metadata.name").as_deref() == Some(name)
        })?;
        // Keys such as tls.crt hold dots: look them up whole.
        let plain = at(&secret.value, "stringData").and_then(|data| data.get(key));
        if let Some(text) = plain.and_then(Value::as_str) {
            return Some(text.to_owned());
        }
        let encoded = at(&secret.value, "data")?.get(key)?.as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        Some(String::from_utf8(bytes).unwrap())
    }

    /// The environment of the pod with this ordinal: the image's, then the
    /// container's, each secret read through `secret(name, key)`.
    fn env(
        &self,
        ordinal: u64,
        mut secret: impl FnMut(&str, &str) -> String,
    ) -> BTreeMap<String, String> {
        let container = self.container();
        assert!(
            at(container, "envFrom").is_none(),
            "envFrom is not modelled here: name each variable under env"
        );
        let mut env = containers::image().env;
        for entry in list_at(container, "env") {
            let name = text_at(entry, "name").unwrap();
            let value = if let Some(value) = text_at(entry, "value") {
                assert!(
                    !value.contains("$("),
                    "env {name}: $(VAR) is not modelled here"
                );
                value
            } else if let Some(path) = text_at(entry, "valueFrom.fieldRef.fieldPath") {
                match path.as_str() {
                    POD_INDEX => ordinal.to_string(),
                    "metadata.name" => format!("{}-{ordinal}", self.statefulset_name()),
                    other => panic!("env {name}: fieldRef {other} is not modelled here"),
                }
            } else if let Some(reference) = at(entry, "valueFrom.secretKeyRef") {
                assert_ne!(
                    text_at(reference, "optional").as_deref(),
                    Some("true"),
                    "env {name}: the pod must not start without its secret"
                );
                secret(
                    &text_at(reference, "name").unwrap(),
                    &text_at(reference, "key").unwrap(),
                )
            } else {
                panic!("env {name}: {entry:?} is not modelled here");
            };
            env.insert(name, value);
        }
        env
    }

    /// The command line the container runs: `command` replaces the image's
    /// ENTRYPOINT, `args` its CMD (and a `command` alone drops the CMD).
    fn argv(&self) -> Vec<String> {
        let words = |path: &str| {
            at(self.container(), path).map(|v| {
                v.as_sequence()
                    .unwrap_or_else(|| panic!("{path} is a list"))
                    .iter()
                    .map(|w| w.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
        };
        let image = containers::image();
        let argv = match (words("command"), words("args")) {
            (Some(command), Some(args)) => [command, args].concat(),
            (Some(command), None) => command,
            (None, Some(args)) => [image.entrypoint, args].concat(),
            (None, None) => [image.entrypoint, image.cmd].concat(),
        };
        assert!(
            argv.iter().all(|word| !word.contains("$(")),
            "$(VAR) in the command line is not modelled here: {argv:?}"
        );
        argv
    }

    /// The container's command line as the binary parses it in the pod with
    /// this ordinal.
    fn serve(&self, ordinal: u64) -> Parsed {
        let argv = self.argv();
        assert!(
            containers::is_rlsgate_program(&argv[0]),
            "the container runs {argv:?}, not rlsgate"
        );
        let env = self.env(ordinal, |_, _| test_secret());
        let parsed = containers::parse_in(&argv, &env)
            .unwrap_or_else(|e| panic!("the StatefulSet's command line {argv:?} is refused:\n{e}"));
        assert_eq!(parsed.subcommand, "serve", "the container runs {argv:?}");
        parsed
    }

    /// The volume mounted over `path`, and `path` within it.
    fn volume_at(&self, path: &str) -> (&Value, String) {
        let (mount, key) = list_at(self.container(), "volumeMounts")
            .iter()
            .find_map(|mount| {
                let target = text_at(mount, "mountPath").unwrap();
                let target = target.trim_end_matches('/');
                match text_at(mount, "subPath") {
                    Some(sub) => (path == target).then_some((mount, sub)),
                    None => path
                        .strip_prefix(target)
                        .and_then(|rest| rest.strip_prefix('/'))
                        .map(|rest| (mount, rest.to_owned())),
                }
            })
            .unwrap_or_else(|| panic!("nothing is mounted at {path}"));
        let name = text_at(mount, "name").unwrap();
        let volume = list_at(self.pod_spec(), "volumes")
            .iter()
            .find(|v| text_at(v, "name").as_deref() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("the pod has no volume {name}"));
        (volume, key)
    }

    /// The configuration file `serve --config` reads, from its ConfigMap.
    fn config_text(&self) -> String {
        let path = self.serve(0).required("--config");
        let (volume, key) = self.volume_at(&path);
        let name = text_at(volume, "configMap.name")
            .unwrap_or_else(|| panic!("{path} is not mounted from a ConfigMap"));
        assert!(
            at(volume, "configMap.items").is_none(),
            "configMap items are not modelled here"
        );
        let config_map = self.named("ConfigMap", &name);
        at(&config_map.value, "data")
            .and_then(|data| data.get(key.as_str()))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"))
            .to_owned()
    }

    /// The configuration as the pod with this ordinal loads it.
    fn config(&self, ordinal: u64) -> Config {
        let env = self.env(ordinal, |_, _| test_secret());
        Config::parse_with_env(&self.config_text(), |var| env.get(var).cloned())
            .unwrap_or_else(|e| panic!("the configuration of pod {ordinal}: {e:#}"))
    }

    /// The container port a Service or probe names (by name or number).
    fn container_port(&self, target: &Value) -> u16 {
        let ports = list_at(self.container(), "ports");
        let found = match target {
            Value::Number(n) => ports
                .iter()
                .find(|p| at(p, "containerPort").and_then(Value::as_u64) == n.as_u64()),
            Value::String(name) => ports
                .iter()
                .find(|p| text_at(p, "name").as_deref() == Some(name.as_str())),
            other => panic!("port {other:?}"),
        };
        let port = found.unwrap_or_else(|| panic!("the container has no port {target:?}"));
        at(port, "containerPort").and_then(Value::as_u64).unwrap() as u16
    }

    fn container_ports(&self) -> BTreeSet<u16> {
        list_at(self.container(), "ports")
            .iter()
            .map(|p| at(p, "containerPort").and_then(Value::as_u64).unwrap() as u16)
            .collect()
    }

    /// `(port, container port)` of each port of a Service.
    fn service_ports(&self, service: &Value) -> Vec<(u16, u16)> {
        list_at(service, "spec.ports")
            .iter()
            .map(|p| {
                let port = at(p, "port").and_then(Value::as_u64).unwrap() as u16;
                let target = at(p, "targetPort").cloned().unwrap_or(Value::from(port));
                (port, self.container_port(&target))
            })
            .collect()
    }

    /// A setting of the container's security context, else the pod's.
    fn security(&self, key: &str) -> Option<&Value> {
        at(self.container(), &format!("securityContext.{key}"))
            .or_else(|| at(self.pod_spec(), &format!("securityContext.{key}")))
    }
}

// ---- schemas -----------------------------------------------------------------

/// Runs deploy/kubernetes/install-validator.sh once per test run: it
/// installs kubernetes-validate only when missing (under a second when it is
/// there), and its failure says what could not be installed.
fn validator() -> PathBuf {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let out = Command::new("bash")
            .arg(Path::new(ROOT).join(DIR).join("install-validator.sh"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash ({INSTALL_HINT}): {e}"));
        assert!(
            out.status.success(),
            "installing kubernetes-validate failed ({INSTALL_HINT} by hand to see why):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    Path::new(ROOT)
        .join(DIR)
        .join(".venv/bin/kubernetes-validate")
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas_strictly() {
    let validator = validator();
    let files = manifest_files();
    let resources = documents().len();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .current_dir(Path::new(ROOT).join(DIR))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({INSTALL_HINT}): {e}", validator.display()));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "against Kubernetes {version}:\n{report}"
        );
        // An unknown kind or apiVersion is only a warning to the validator.
        let doubtful: Vec<&str> = report.lines().filter(|l| !l.starts_with("INFO ")).collect();
        assert!(
            doubtful.is_empty(),
            "against Kubernetes {version}:\n{report}"
        );
        let passed = report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(
            passed, resources,
            "resources validated against {version}:\n{report}"
        );
    }
}

#[test]
fn the_kustomization_applies_every_manifest_but_the_secret_template() {
    let text = containers::read(&format!("{DIR}/{KUSTOMIZATION}"));
    let kustomization: Value = serde_norway::from_str(&text).unwrap();
    let listed: BTreeSet<String> = list_at(&kustomization, "resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = manifest_files()
        .into_iter()
        .filter(|f| f != SECRET_TEMPLATE)
        .collect();
    assert_eq!(listed, expected, "the resources of {KUSTOMIZATION}");
}

// ---- the command line and the configuration ------------------------------------

#[test]
fn the_statefulset_serves_the_configuration_where_the_image_looks_for_it() {
    let deployment = deployment();
    let serve = deployment.serve(0);
    let default = containers::image_default_command();
    assert_eq!(
        serve.required("--config"),
        default.required("--config"),
        "the StatefulSet's --config"
    );
    // A typo in the ConfigMap's key or the mount would leave the file missing.
    assert!(deployment.config_text().contains("[cluster]"));
}

#[test]
fn the_image_is_the_dockerfile_image_tagged_with_the_crate_version() {
    let image = text_at(deployment().container(), "image").unwrap();
    assert_eq!(image, format!("rlsgate:{}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn every_replica_the_autoscaler_may_run_loads_the_configuration_with_its_ordinal_as_peer_id() {
    let deployment = deployment();
    let (min, max) = deployment.replicas_range();
    assert!(min <= max);
    for ordinal in deployment.ordinals() {
        let peer_id = deployment.config(ordinal).cluster.peer_id;
        assert_eq!(
            peer_id.map(u64::from),
            Some(ordinal),
            "the peer_id of pod {ordinal}"
        );
    }
}

#[test]
fn the_peer_id_comes_from_the_pod_index_label() {
    let deployment = deployment();
    let from_label = list_at(deployment.container(), "env").iter().any(|entry| {
        text_at(entry, "name").as_deref() == Some("RLSGATE_PEER_ID")
            && text_at(entry, "valueFrom.fieldRef.fieldPath").as_deref() == Some(POD_INDEX)
    });
    assert!(from_label, "RLSGATE_PEER_ID should come from {POD_INDEX}");
    assert!(
        deployment
            .config_text()
            .contains("peer_id = ${RLSGATE_PEER_ID}"),
        "the configuration should read its peer_id from RLSGATE_PEER_ID"
    );
}

#[test]
fn the_peer_list_names_every_ordinal_under_the_headless_service() {
    let deployment = deployment();
    let statefulset = deployment.statefulset_name();
    let service_name = text_at(deployment.statefulset(), "spec.serviceName")
        .expect("the StatefulSet names its headless Service");
    let service = &deployment.named("Service", &service_name).value;
    assert_eq!(
        text_at(service, "spec.clusterIP").as_deref(),
        Some("None"),
        "{service_name} is headless"
    );
    assert_eq!(
        text_at(service, "spec.publishNotReadyAddresses").as_deref(),
        Some("true"),
        "a draining replica's name must resolve: its sessions may still be cancelled"
    );
    assert!(selects(
        &labels_at(service, "spec.selector"),
        &deployment.pod_labels()
    ));

    let config = deployment.config(0);
    let wire = config.listen.address.port();
    let peer_ports: Vec<u16> = deployment
        .service_ports(service)
        .iter()
        .map(|p| p.1)
        .collect();
    assert!(
        peer_ports.contains(&wire),
        "{service_name} should carry the wire port {wire}"
    );

    let peers = config.cluster.peers;
    let ids: Vec<u64> = peers.iter().map(|peer| u64::from(peer.id)).collect();
    let ordinals: Vec<u64> = deployment.ordinals().collect();
    assert_eq!(
        ids, ordinals,
        "the peer ids against the ordinals up to maxReplicas"
    );
    for Peer { id, address } in peers {
        let (host, port) = address.rsplit_once(':').unwrap();
        let pod = format!("{statefulset}-{id}.{service_name}");
        assert!(
            host == pod
                || host
                    .strip_prefix(&pod)
                    .is_some_and(|rest| rest.starts_with('.')),
            "peer {id} is {address}, not pod {pod}"
        );
        assert_eq!(port.parse::<u16>().unwrap(), wire, "peer {id}'s port");
    }
}

// ---- ports, probes, Services --------------------------------------------------

#[test]
fn the_container_ports_are_the_configured_wire_http_and_admin_addresses() {
    let deployment = deployment();
    let config = deployment.config(0);
    let addresses: [(&str, Option<SocketAddr>); 3] = [
        ("[listen] address", Some(config.listen.address)),
        ("[http] address", config.http.address),
        ("[listen] admin_address", config.listen.admin_address),
    ];
    let ports = deployment.container_ports();
    for (key, address) in addresses {
        let address = address.unwrap_or_else(|| panic!("the configuration sets no {key}"));
        assert!(
            address.ip().is_unspecified(),
            "{key} = {address}: the Services and the kubelet reach the pod's own address"
        );
        assert!(
            ports.contains(&address.port()),
            "{key} = {address}: no container port {}",
            address.port()
        );
    }
}

#[test]
fn readiness_and_liveness_probe_the_admin_endpoints() {
    let deployment = deployment();
    let admin = deployment.config(0).listen.admin_address.unwrap().port();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = at(deployment.container(), &format!("{probe}.httpGet"))
            .unwrap_or_else(|| panic!("the container has no {probe} over HTTP"));
        assert_eq!(text_at(get, "path").as_deref(), Some(path), "{probe}");
        assert_eq!(
            deployment.container_port(at(get, "port").unwrap()),
            admin,
            "{probe}'s port"
        );
        assert_ne!(
            text_at(get, "scheme").as_deref(),
            Some("HTTPS"),
            "the admin port is plain HTTP"
        );
    }
}

#[test]
fn the_client_service_carries_the_wire_and_http_ports_but_not_the_admin_port() {
    let deployment = deployment();
    let config = deployment.config(0);
    let service = &deployment.named("Service", "rlsgate").value;
    assert!(selects(
        &labels_at(service, "spec.selector"),
        &deployment.pod_labels()
    ));
    let ports = deployment.service_ports(service);
    let expected = [
        (6432, config.listen.address.port()),
        (4444, config.http.address.unwrap().port()),
    ];
    for (port, target) in expected {
        assert!(
            ports.contains(&(port, target)),
            "rlsgate should map {port} to {target}: {ports:?}"
        );
    }
    let admin = config.listen.admin_address.unwrap().port();
    assert!(
        ports.iter().all(|(_, target)| *target != admin),
        "the client Service exposes the admin port {admin}: {ports:?}"
    );
    assert_ne!(text_at(service, "spec.clusterIP").as_deref(), Some("None"));
}

#[test]
fn the_grace_period_outlasts_shutdown_delay_and_drain() {
    let deployment = deployment();
    let listen = deployment.config(0).listen;
    let (delay, drain) = (listen.shutdown_delay, listen.shutdown_drain);
    // Kubernetes' default when the pod sets none.
    let grace = at(deployment.pod_spec(), "terminationGracePeriodSeconds")
        .map_or(30, |v| v.as_u64().unwrap());
    assert!(
        Duration::from_secs(grace) > delay + drain,
        "the kubelet kills the pod after {grace}s, before shutdown_delay ({delay:?}) \
         and shutdown_drain ({drain:?}) have passed"
    );
    // Until the endpoints drop the pod, clients still arrive: without a delay
    // they would find the listener closed.
    assert!(
        !delay.is_zero(),
        "[listen] shutdown_delay: the endpoints take a few seconds to drop a terminating pod"
    );
    assert!(
        at(deployment.container(), "lifecycle.preStop").is_none(),
        "no preStop hook: it holds SIGTERM (and /readyz's 503) back, and shutdown_delay does its job"
    );
}

// ---- secrets, TLS -----------------------------------------------------------

#[test]
fn secrets_reach_the_configuration_from_the_secret_whose_template_is_refused_as_it_stands() {
    let deployment = deployment();
    let mut referenced = Vec::new();
    deployment.env(0, |name, key| {
        referenced.push(format!("{name}/{key}"));
        String::new()
    });
    assert!(
        !referenced.is_empty(),
        "the pod takes nothing from a Secret"
    );
    let template = deployment.env(0, |name, key| {
        deployment
            .template_secret(name, key)
            .unwrap_or_else(|| panic!("{SECRET_TEMPLATE} has no Secret {name} with key {key}"))
    });

    // The secrets come through the environment, not written in the ConfigMap.
    let config = deployment.config(0);
    assert_eq!(
        config.claims.signing_key.bytes(),
        b"rlsgate-kubernetes-test-secret!!"
    );
    for role in &config.roles {
        if let Some(password) = &role.upstream_password {
            assert_eq!(
                password.as_str(),
                test_secret(),
                "role {}'s upstream_password",
                role.name
            );
        }
    }

    // A template applied unchanged must not become a running proxy.
    let refused =
        Config::parse_with_env(&deployment.config_text(), |var| template.get(var).cloned());
    let error = format!(
        "{:#}",
        refused.expect_err("the template's placeholders load as a configuration")
    );
    assert!(error.contains("signing_key"), "{error}");
    for document in deployment.all("Secret") {
        assert_eq!(
            document.file, SECRET_TEMPLATE,
            "a Secret outside the template"
        );
        for (_, value) in at(&document.value, "stringData")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            assert!(
                value.as_str().unwrap().starts_with("REPLACE"),
                "{value:?} is not a placeholder"
            );
        }
    }
}

#[test]
fn clients_get_tls_from_the_tls_secret_mounted_where_the_configuration_looks() {
    let deployment = deployment();
    let config = deployment.config(0);
    assert!(
        !config.listen.allow_plaintext_tokens,
        "tokens are bearer credentials: TLS only"
    );
    let files = [
        ("tls_cert", config.listen.tls_cert),
        ("tls_key", config.listen.tls_key),
    ];
    for (key, path) in files {
        let path = path.unwrap_or_else(|| panic!("[listen] {key} is not set"));
        let path = path.to_str().unwrap();
        let (volume, file) = deployment.volume_at(path);
        let secret = text_at(volume, "secret.secretName")
            .unwrap_or_else(|| panic!("[listen] {key} = {path} is not mounted from a Secret"));
        assert!(
            at(volume, "secret.items").is_none(),
            "secret items are not modelled here"
        );
        assert!(
            deployment.template_secret(&secret, &file).is_some(),
            "{SECRET_TEMPLATE} has no Secret {secret} with key {file}"
        );
        let document = deployment.named("Secret", &secret);
        assert_eq!(
            text_at(&document.value, "type").as_deref(),
            Some("kubernetes.io/tls")
        );
    }
}

// ---- security, scaling, disruptions -----------------------------------------

#[test]
fn the_pod_runs_unprivileged_on_a_read_only_root_without_capabilities() {
    let deployment = deployment();
    let container = deployment.container();
    let flag = |key: &str| deployment.security(key).and_then(Value::as_bool);
    assert_eq!(flag("runAsNonRoot"), Some(true), "runAsNonRoot");
    assert_eq!(
        flag("readOnlyRootFilesystem"),
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        flag("allowPrivilegeEscalation"),
        Some(false),
        "allowPrivilegeEscalation"
    );
    assert_ne!(flag("privileged"), Some(true), "privileged");
    assert_eq!(
        deployment
            .security("seccompProfile")
            .and_then(|v| text_at(v, "type"))
            .as_deref(),
        Some("RuntimeDefault"),
        "seccompProfile"
    );
    let dropped: Vec<&str> = list_at(container, "securityContext.capabilities.drop")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(dropped, ["ALL"], "capabilities.drop");
    assert!(list_at(container, "securityContext.capabilities.add").is_empty());

    let user = containers::image().user.expect("the image sets USER");
    let uid = user.split(':').next().unwrap();
    let run_as = deployment
        .security("runAsUser")
        .and_then(Value::as_u64)
        .map(|u| u.to_string());
    assert_eq!(
        run_as.as_deref(),
        Some(uid),
        "runAsUser should be the image's user"
    );

    let pod = deployment.pod_spec();
    assert_eq!(
        at(pod, "automountServiceAccountToken").and_then(Value::as_bool),
        Some(false)
    );
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(at(pod, host).and_then(Value::as_bool), Some(true), "{host}");
    }
    for mount in list_at(container, "volumeMounts") {
        assert_eq!(
            at(mount, "readOnly").and_then(Value::as_bool),
            Some(true),
            "{mount:?}"
        );
    }
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                text_at(container, &format!("resources.{bound}.{resource}")).is_some(),
                "resources.{bound}.{resource}"
            );
        }
    }
}

#[test]
fn the_autoscaler_scales_the_statefulset_on_cpu_within_the_peer_list() {
    let deployment = deployment();
    let hpa = deployment.hpa();
    assert_eq!(
        text_at(hpa, "spec.scaleTargetRef.apiVersion").as_deref(),
        Some("apps/v1")
    );
    assert_eq!(
        text_at(hpa, "spec.scaleTargetRef.kind").as_deref(),
        Some("StatefulSet")
    );
    assert_eq!(
        text_at(hpa, "spec.scaleTargetRef.name"),
        Some(deployment.statefulset_name())
    );
    let on_cpu = list_at(hpa, "spec.metrics").iter().any(|metric| {
        text_at(metric, "type").as_deref() == Some("Resource")
            && text_at(metric, "resource.name").as_deref() == Some("cpu")
            && text_at(metric, "resource.target.type").as_deref() == Some("Utilization")
    });
    assert!(on_cpu, "the autoscaler should follow CPU utilisation");

    let (min, max) = deployment.replicas_range();
    assert!(
        min >= 2,
        "minReplicas {min}: one replica draining leaves none"
    );
    let peers = deployment.config(0).cluster.peers.len() as u64;
    assert_eq!(max, peers, "maxReplicas against the peers listed");
    assert!(
        max <= u64::from(MAX_PEER_ID) + 1,
        "maxReplicas {max}: peer ids go up to {MAX_PEER_ID}"
    );
    // With the count in the manifest, every `kubectl apply` would reset it.
    assert!(
        at(deployment.statefulset(), "spec.replicas").is_none(),
        "the autoscaler owns replicas"
    );
}

#[test]
fn the_disruption_budget_covers_the_replicas_and_lets_one_go_at_the_minimum() {
    let deployment = deployment();
    let pdb = deployment.one("PodDisruptionBudget");
    let labels = deployment.pod_labels();
    assert!(selects(
        &labels_at(pdb, "spec.selector.matchLabels"),
        &labels
    ));
    assert!(selects(
        &labels_at(deployment.statefulset(), "spec.selector.matchLabels"),
        &labels
    ));
    let (min, _) = deployment.replicas_range();
    let evictable = match (at(pdb, "spec.maxUnavailable"), at(pdb, "spec.minAvailable")) {
        (Some(max_unavailable), None) => max_unavailable.as_u64().unwrap() >= 1,
        (None, Some(min_available)) => min_available.as_u64().unwrap() < min,
        other => panic!("the budget sets {other:?}"),
    };
    assert!(
        evictable,
        "at {min} replicas the budget allows no eviction: node drains would block"
    );
}
