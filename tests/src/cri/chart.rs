//! The chart as `helm template` renders it, as JSON objects: the DaemonSet's pod template is
//! what the runtime tests run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    process::output_within,
    venv::{ensure_venv, venv_python, workspace_root},
};

/// The chart, relative to the workspace.
pub const CHART: &str = "deploy/helm/kube2iam-ebpf";
/// Release and namespace, as in the README's quickstart.
pub const RELEASE: &str = "kube2iam-ebpf";
pub const NAMESPACE: &str = "kube-system";

/// helm 3.17, unpacked by `cargo xtask install`.
pub fn helm_binary() -> PathBuf {
    let helm = workspace_root().join(".cache/helm-kubectl/helm/helm");
    assert!(
        helm.is_file(),
        "{} is missing: run `cargo xtask install`",
        helm.display()
    );
    helm
}

/// A values file of the chart's `ci/` directory, e.g. `kube2iam-values.yaml`.
pub fn ci_values(name: &str) -> PathBuf {
    let path = workspace_root().join(CHART).join("ci").join(name);
    assert!(path.is_file(), "{} does not exist", path.display());
    path
}

/// `helm template` with `values` files (in order) and `--set` pairs, as JSON objects. `work` is a
/// scratch directory for helm's state.
pub fn render(values: &[PathBuf], set: &[(&str, &str)], work: &Path) -> Vec<Value> {
    fs::create_dir_all(work).unwrap_or_else(|e| panic!("cannot create {}: {e}", work.display()));
    let mut command = Command::new(helm_binary());
    command
        .current_dir(workspace_root())
        .env("HELM_CACHE_HOME", work.join("helm/cache"))
        .env("HELM_CONFIG_HOME", work.join("helm/config"))
        .env("HELM_DATA_HOME", work.join("helm/data"))
        .args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
    for file in values {
        command.arg("--values").arg(file);
    }
    for (key, value) in set {
        command.arg("--set-string").arg(format!("{key}={value}"));
    }
    let output = output_within(&mut command, Duration::from_secs(60), "helm template");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let yaml = work.join("rendered.yaml");
    fs::write(&yaml, &output.stdout).expect("write the rendering");
    yaml_documents(&yaml)
}

/// Every non-empty YAML document of a file, through PyYAML (in the test venv).
fn yaml_documents(file: &Path) -> Vec<Value> {
    ensure_venv();
    let output = output_within(
        Command::new(venv_python())
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             print(json.dumps(docs))",
            )
            .arg(file),
        Duration::from_secs(60),
        "yaml to json",
    );
    assert!(
        output.status.success(),
        "cannot parse {}: {}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python printed JSON")
}

/// The one object of `kind` in a rendering.
pub fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut found = objects.iter().filter(|o| o["kind"] == kind);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("the rendering has no {kind}"));
    assert!(found.next().is_none(), "the rendering has several {kind}s");
    first
}
