//! `deploy/`: the Kubernetes manifests pass a strict, offline schema check; the ConfigMap's
//! `outrigger.yaml` passes `outrigger validate`; the Kustomize base lists every manifest; and
//! every metric the alert rules and the dashboard use is one Outrigger exports.

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

#[test]
fn the_configmaps_outrigger_yaml_passes_outrigger_validate() {
    let text = std::fs::read_to_string(deploy().join("base/configmap.yaml")).unwrap();
    let (_, embedded) =
        text.split_once("outrigger.yaml: |\n").expect("the ConfigMap holds outrigger.yaml");
    let yaml: String = embedded
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned() + "\n")
        .collect();
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
