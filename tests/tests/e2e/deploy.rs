//! `deploy/`: the Kubernetes manifests pass a strict, offline schema check and the Pod Security
//! Standard "restricted"; the ConfigMap's `outrigger.yaml` passes `outrigger validate`, and its
//! memory caps fit the container's memory limit; the Kustomize base lists every manifest; and
//! every metric the alert rules and the dashboard use is one Outrigger exports, aggregated over
//! replicas the way each one means.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests are checked against (native sidecars need 1.29+).
const KUBERNETES: &str = "1.31.0";

/// The workspace root, from the runner's `CARGO_MANIFEST_DIR` (a cached test binary built in
/// another checkout must still read this one's files).
fn root() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    Path::new(&dir).join("..")
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// `kubernetes-validate` (PyPI, with the schemas bundled: no network), installed by
/// `scripts/test` into a venv; `$KUBERNETES_VALIDATE` names another.
fn validator() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBERNETES_VALIDATE") {
        return path.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let path = Path::new(&home).join(".cache/outrigger-tools/venv/bin/kubernetes-validate");
    assert!(path.exists(), "{} is missing: run scripts/test, which installs it", path.display());
    path
}

fn validate(file: &Path) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !text.contains("ERROR"), text)
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("base"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

#[test]
fn the_kubernetes_manifests_pass_a_strict_offline_schema_check() {
    let files = manifests();
    assert_eq!(files.len(), 3, "configmap, deployment, service: {files:?}");
    for file in &files {
        let (ok, report) = validate(file);
        assert!(ok, "{}:\n{report}", file.display());
    }
    // the check can fail: a misspelt field is refused
    let broken = std::env::temp_dir().join(format!("outrigger-broken-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(deploy().join("base/deployment.yaml")).unwrap();
    std::fs::write(&broken, text.replace("restartPolicy: Always", "restartPolicyy: Always"))
        .unwrap();
    let (ok, report) = validate(&broken);
    let _ = std::fs::remove_file(&broken);
    assert!(!ok, "a misspelt field must fail the check:\n{report}");
}

/// A manifest of `deploy/base` as JSON.
fn manifest(name: &str) -> serde_json::Value {
    yaml_file(&deploy().join("base").join(name))
}

/// A YAML file as JSON, read by the PyYAML of `kubernetes-validate`'s venv (a YAML parser the
/// tests already need, so no Rust YAML crate for this alone).
fn yaml_file(path: &Path) -> serde_json::Value {
    python(&std::fs::read(path).unwrap(), "print(json.dumps(yaml.safe_load(sys.stdin)))")
}

/// The JSON that `script` prints, given `input` on stdin (`json`, `sys` and `yaml` imported).
fn python(input: &[u8], script: &str) -> serde_json::Value {
    use std::io::Write;
    let python = validator().with_file_name("python");
    let python = if python.exists() { python } else { PathBuf::from("python3") };
    let mut child = Command::new(python)
        .args(["-c", &format!("import json, sys, yaml\n{script}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What keeps `pod` (a pod spec) from the Pod Security Standard "restricted", one line per
/// problem: each container, init containers included, must run as non-root, never escalate,
/// drop every capability (adding back NET_BIND_SERVICE at most) and use the RuntimeDefault or
/// Localhost seccomp profile; `runAsNonRoot` and the profile may come from the pod.
fn restricted_problems(pod: &serde_json::Value) -> Vec<String> {
    let pod_context = &pod["securityContext"];
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod[list].as_array().cloned().unwrap_or_default());
    let mut problems = Vec::new();
    for container in containers {
        let name = container["name"].as_str().unwrap_or("?").to_owned();
        let context = &container["securityContext"];
        // a container's own field wins over the pod's
        let effective = |field: &str| {
            Some(&context[field]).filter(|v| !v.is_null()).unwrap_or(&pod_context[field]).clone()
        };
        let mut problem = |what: &str| problems.push(format!("{name}: {what}"));
        if effective("runAsNonRoot") != true {
            problem("runAsNonRoot is not true");
        }
        if effective("runAsUser") == 0 {
            problem("runAsUser is 0");
        }
        if context["allowPrivilegeEscalation"] != false {
            problem("allowPrivilegeEscalation is not false");
        }
        let drop = context["capabilities"]["drop"].as_array().cloned().unwrap_or_default();
        if !drop.iter().any(|c| c == "ALL") {
            problem("capabilities.drop does not hold ALL");
        }
        let added = context["capabilities"]["add"].as_array().cloned().unwrap_or_default();
        if added.iter().any(|c| c != "NET_BIND_SERVICE") {
            problem("capabilities.add holds more than NET_BIND_SERVICE");
        }
        let seccomp = effective("seccompProfile");
        if !["RuntimeDefault", "Localhost"].iter().any(|t| seccomp["type"] == *t) {
            problem("seccompProfile.type is not RuntimeDefault (or Localhost)");
        }
    }
    problems
}

#[test]
fn every_container_including_the_native_sidecar_meets_the_restricted_pod_security_standard() {
    let deployment = manifest("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(
        (&sidecar["name"], &sidecar["restartPolicy"]),
        (&"outrigger".into(), &"Always".into())
    );
    assert_eq!(restricted_problems(pod), Vec::<String>::new());

    // the check can fail: without the pod's profile the app has none; the sidecar keeps its own
    let mut loose = pod.clone();
    loose["securityContext"].as_object_mut().unwrap().remove("seccompProfile");
    loose["initContainers"][0]["securityContext"]["allowPrivilegeEscalation"] = true.into();
    assert_eq!(
        restricted_problems(&loose),
        [
            "outrigger: allowPrivilegeEscalation is not false",
            "app: seccompProfile.type is not RuntimeDefault (or Localhost)",
        ]
    );
}

/// A Kubernetes memory quantity (`128Mi`, `1G`, `134217728`) in bytes.
fn quantity(text: &str) -> u64 {
    let units = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("K", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((text, 1));
    number.parse::<u64>().expect("a whole quantity") * unit
}

/// What a connection that carried a request holds (docs/reliability.md, "Memory under a
/// connection flood": 22.8 KiB measured).
const PER_CONNECTION: u64 = 23 << 10;
/// The sidecar with nothing in flight, and room for its store and caches (8 MiB measured at
/// rest in a release build; the container's memory request).
const AT_REST: u64 = 32 << 20;

#[test]
fn the_sidecars_memory_limit_covers_what_its_connection_and_publish_caps_let_it_hold() {
    let config = outrigger_config::load_str("configmap.yaml", &configmap_yaml()).unwrap();
    let limits = &config.outbound.limits;
    // publish bodies: the cap, plus what the allocator keeps while they are stored (1.5 x,
    // docs/configuration.md `max_publish_buffer`)
    let worst = AT_REST
        + limits.max_connections as u64 * PER_CONNECTION
        + limits.max_publish_buffer.bytes() * 3 / 2;
    let deployment = manifest("deployment.yaml");
    let sidecar = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    let limit = quantity(sidecar["resources"]["limits"]["memory"].as_str().unwrap());
    assert!(
        worst <= limit,
        "max_connections {} and max_publish_buffer {} can take the sidecar to {} MiB, past its \
         memory limit of {} MiB: lower the caps in configmap.yaml or raise the limit",
        limits.max_connections,
        limits.max_publish_buffer,
        worst >> 20,
        limit >> 20,
    );
}

/// The `outrigger.yaml` the ConfigMap holds.
fn configmap_yaml() -> String {
    let text = std::fs::read_to_string(deploy().join("base/configmap.yaml")).unwrap();
    let (_, embedded) =
        text.split_once("outrigger.yaml: |\n").expect("the ConfigMap holds outrigger.yaml");
    embedded
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned() + "\n")
        .collect()
}

#[test]
fn the_configmaps_outrigger_yaml_passes_outrigger_validate() {
    let yaml = configmap_yaml();
    let file =
        std::env::temp_dir().join(format!("outrigger-configmap-{}.yaml", std::process::id()));
    std::fs::write(&file, &yaml).unwrap();
    let out = Command::new(outrigger_tests::binary())
        .args(["validate", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{yaml}");
}

#[test]
fn the_kustomize_base_lists_every_manifest() {
    let text = std::fs::read_to_string(deploy().join("base/kustomization.yaml")).unwrap();
    let listed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
        .map(str::to_owned)
        .collect();
    let present: BTreeSet<String> =
        manifests().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(listed, present);
}

/// Every `outrigger_…` name in `text`, without a histogram's `_bucket`/`_sum`/`_count`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("outrigger_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .map_or(name.clone(), str::to_owned);
        names.insert(name);
    }
    names
}

#[test]
fn the_alert_rules_and_the_dashboard_use_only_metrics_outrigger_exports() {
    let source = root().join("proxy/src/telemetry/metrics.rs");
    let exported = metric_names(&std::fs::read_to_string(source).unwrap());
    assert!(exported.contains("outrigger_requests_total"), "{exported:?}");
    for file in ["alerts.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(deploy().join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 5, "{file} uses {used:?}");
        let unknown: Vec<&String> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics Outrigger does not export: {unknown:?}");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8));
}

#[test]
fn the_dashboard_takes_the_max_of_queue_depth_over_replicas_not_the_sum() {
    // on Redis every replica reports its group's whole backlog: a sum counts it once per replica
    let text = std::fs::read_to_string(deploy().join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .filter(|e| e.contains("outrigger_queue_depth"))
        .collect();
    assert!(!exprs.is_empty(), "the dashboard shows outrigger_queue_depth");
    for expr in exprs {
        assert!(expr.contains("max by (queue) (outrigger_queue_depth{"), "{expr}");
        assert!(!expr.contains("sum by (queue) (outrigger_queue_depth"), "{expr}");
    }
}

#[test]
fn the_alerts_cover_a_vanished_sidecar_a_refused_reload_stale_discovery_and_shedding() {
    let text = std::fs::read_to_string(deploy().join("alerts.yaml")).unwrap();
    for (alert, expr) in [
        ("OutriggerAbsent", "absent(outrigger_build_info)"),
        ("OutriggerReloadFailed", r#"outrigger_config_reloads_total{result="invalid"}"#),
        ("OutriggerDiscoveryStale", "outrigger_discovery_age_seconds"),
        ("OutriggerShedding", "outrigger_shed_total"),
        ("OutriggerAnswersOfItsOwn", "outrigger_local_responses_total"),
    ] {
        let at = text.find(&format!("alert: {alert}\n")).unwrap_or_else(|| panic!("{alert}"));
        let rule = &text[at..];
        let rule = &rule[..rule[1..].find("- alert:").map_or(rule.len(), |end| end + 1)];
        assert!(rule.contains(expr), "{alert} watches {expr}: {rule}");
        assert!(rule.contains("summary:"), "{alert} says what happened");
    }
}

#[test]
fn the_image_builds_from_the_sources_alone_with_its_dependencies_cached() {
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for path in ["target", ".git"] {
        assert!(ignored.lines().any(|l| l == path), "{path} stays out of the build context");
    }
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("--mount=type=cache,target=/usr/local/cargo/registry"));
    assert!(dockerfile.contains("--mount=type=cache,target=/src/target"));
    assert!(dockerfile.contains("org.opencontainers.image.version"));
    assert!(dockerfile.contains(":nonroot"), "runs as nonroot");
    // each base image is an argument, so a release pins it by digest from the command line
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms, ["FROM ${BUILD_IMAGE} AS build", "FROM ${RUNTIME_IMAGE}"]);
    for arg in [
        "ARG BUILD_IMAGE=rust:1.95-bookworm",
        "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot",
    ] {
        assert!(dockerfile.lines().any(|l| l == arg), "{arg}");
    }
}

#[test]
fn the_prometheus_rule_holds_the_same_groups_as_alerts_yaml() {
    let alerts = std::fs::read_to_string(deploy().join("alerts.yaml")).unwrap();
    let groups = &alerts[alerts.find("groups:").unwrap()..];
    let rule = std::fs::read_to_string(deploy().join("monitoring/prometheusrule.yaml")).unwrap();
    assert!(rule.contains("kind: PrometheusRule\n"), "{rule}");
    let spec = &rule[rule.find("spec:\n").unwrap() + "spec:\n".len()..];
    let unindented: String =
        spec.lines().map(|l| l.strip_prefix("  ").unwrap_or(l)).map(|l| format!("{l}\n")).collect();
    assert_eq!(unindented, groups, "the PrometheusRule's spec is alerts.yaml's groups");
    let monitor = std::fs::read_to_string(deploy().join("monitoring/podmonitor.yaml")).unwrap();
    assert!(monitor.contains("kind: PodMonitor") && monitor.contains("port: admin"), "{monitor}");
    let deployment = std::fs::read_to_string(deploy().join("base/deployment.yaml")).unwrap();
    assert!(deployment.contains("{ name: admin, containerPort: 9901 }"), "the port it names");
}

#[test]
fn the_dashboard_picks_its_data_source_namespace_and_pods_and_follows_the_scrape_interval() {
    let text = std::fs::read_to_string(deploy().join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "pod"]);
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains(r#"pod=~"$pod""#), "every query follows the pods picked: {expr}");
            if expr.contains("rate(") {
                assert!(expr.contains("[$__rate_interval]"), "{expr}");
            }
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in ["Error ratio", "Answers of Outrigger's own", "Shed at the sidecar's caps"] {
        assert!(titles.iter().any(|t| t.starts_with(wanted)), "{wanted} in {titles:?}");
    }
}

/// `patch` laid over `target` as a strategic merge patch does for the fields the component
/// touches: mappings merge, lists of named items merge by `name` (containers, volumes), other
/// values are replaced; the patch's own `metadata.name` is not applied (the component's
/// `target` chose the Deployment). The renderer when no kubectl with kustomize >= 3.7 is found.
fn strategic_merge(target: &serde_json::Value, patch: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    fn merge(into: &mut Value, patch: &Value) {
        match (into, patch) {
            (Value::Object(into), Value::Object(patch)) => {
                for (key, value) in patch {
                    match into.get_mut(key) {
                        Some(existing) => merge(existing, value),
                        None => {
                            into.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
            (Value::Array(into), Value::Array(patch))
                if patch.iter().all(|item| item.get("name").is_some()) =>
            {
                for item in patch {
                    match into.iter_mut().find(|i| i.get("name") == item.get("name")) {
                        Some(existing) => merge(existing, item),
                        None => into.push(item.clone()),
                    }
                }
            }
            (into, patch) => *into = patch.clone(),
        }
    }
    let mut patch = patch.clone();
    patch["metadata"].as_object_mut().unwrap().remove("name");
    let mut out = target.clone();
    merge(&mut out, &patch);
    out
}

/// The Deployment `kubectl kustomize` renders from `dir`, with the generated ConfigMap's hash
/// suffix taken off; `None` without a kubectl whose kustomize knows components.
fn kubectl_kustomize(dir: &Path) -> Option<serde_json::Value> {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output().ok()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        // kubectl before 1.21 embeds kustomize 2, which has no components
        assert!(why.contains("components") || why.contains("unknown"), "kubectl kustomize: {why}");
        return None;
    }
    let script = "docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d['kind'] == 'Deployment']\n\
                  print(json.dumps(docs[0]))";
    let mut deployment = python(&out.stdout, script);
    for volume in deployment["spec"]["template"]["spec"]["volumes"].as_array_mut().unwrap() {
        if let Some(name) = volume["configMap"]["name"].as_str() {
            let unhashed = name.rsplit_once('-').map_or(name, |(base, _)| base).to_owned();
            volume["configMap"]["name"] = unhashed.into();
        }
    }
    Some(deployment)
}

#[test]
fn the_component_adds_the_bases_sidecar_to_an_existing_deployment_and_the_result_passes_the_checks()
{
    let example = deploy().join("examples/existing-app");
    let original = yaml_file(&example.join("deployment.yaml"));
    let patch = yaml_file(&deploy().join("components/outrigger/sidecar.yaml"));
    let rendered = strategic_merge(&original, &patch);
    if let Some(by_kustomize) = kubectl_kustomize(&example) {
        assert_eq!(by_kustomize, rendered, "kubectl kustomize renders the same Deployment");
    }

    // the app's own manifest is kept; the sidecar is deploy/base's, to the byte
    let pod = &rendered["spec"]["template"]["spec"];
    assert_eq!(rendered["metadata"]["name"], "orders");
    assert_eq!(pod["containers"], original["spec"]["template"]["spec"]["containers"]);
    let base = manifest("deployment.yaml");
    let base_pod = &base["spec"]["template"]["spec"];
    assert_eq!(
        pod["initContainers"], base_pod["initContainers"],
        "the component's sidecar is the base's"
    );
    assert_eq!(
        rendered["spec"]["template"]["metadata"]["annotations"],
        base["spec"]["template"]["metadata"]["annotations"]
    );
    assert_eq!(pod["terminationGracePeriodSeconds"], base_pod["terminationGracePeriodSeconds"]);
    let volumes: Vec<&str> =
        pod["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(volumes, ["outrigger-config", "outrigger-data"]);
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "outrigger", "the ConfigMap it documents");
    assert_eq!(restricted_problems(pod), Vec::<String>::new());

    // the strict schema check, on the rendered Deployment
    let file = std::env::temp_dir().join(format!("outrigger-rendered-{}.json", std::process::id()));
    std::fs::write(&file, rendered.to_string()).unwrap();
    let (ok, text) = validate(&file);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "{text}");

    // and the example's outrigger.yaml is one the sidecar takes
    let out = Command::new(outrigger_tests::binary())
        .args(["validate", "--config"])
        .arg(example.join("outrigger.yaml"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn every_alert_links_its_runbook_section_of_operations_md() {
    let alerts = std::fs::read_to_string(deploy().join("alerts.yaml")).unwrap();
    let operations = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let rules: Vec<&str> = alerts.split("- alert: ").skip(1).collect();
    assert!(rules.len() >= 14, "{} rules", rules.len());
    for rule in rules {
        let name = rule.lines().next().unwrap().trim();
        let link = format!("runbook_url: \"docs/operations.md#{}\"", name.to_lowercase());
        assert!(rule.contains(&link), "{name} has {link}");
        // GitHub's anchor of a heading made of one word is the word in lower case
        assert!(operations.contains(&format!("\n### {name}\n")), "operations.md has ### {name}");
    }
}
