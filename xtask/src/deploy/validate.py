"""Validates rendered Kubernetes manifests for `cargo xtask deploy`.

Usage: validate.py OUT_JSON VERSIONS FILE...

Every object of every FILE is validated with kubernetes-validate in strict mode (unknown fields
are errors) against each Kubernetes version in VERSIONS (comma-separated, e.g. 1.29,1.30).
Kinds without a built-in schema (custom resources such as ServiceMonitor) are listed in OUT_JSON
for the caller to check with their own schema; any other missing schema is an error. A few API
server rules that JSON schemas cannot express are checked too. OUT_JSON receives, per file, the
objects as parsed, so the caller does not need a YAML parser.
"""

import json
import sys

import kubernetes_validate
import kubernetes_validate.utils as kv
import yaml

# Kinds the caller validates itself; they have no schema in kubernetes-validate.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def api_rules(obj):
    """Rules the API server enforces that the JSON schemas do not."""
    errors = []
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec") if obj.get("kind") == "DaemonSet" else None
    if pod is None:
        return errors
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        sc = container.get("securityContext", {})
        caps = sc.get("capabilities", {}).get("add", [])
        if sc.get("allowPrivilegeEscalation") is False and (
            sc.get("privileged") or "SYS_ADMIN" in caps or "CAP_SYS_ADMIN" in caps
        ):
            errors.append(
                f"container {container['name']}: allowPrivilegeEscalation=false is rejected "
                "together with privileged or CAP_SYS_ADMIN"
            )
        for mount in container.get("volumeMounts", []):
            if mount.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
                errors.append(
                    f"container {container['name']}: Bidirectional mount propagation needs a "
                    "privileged container"
                )
        if pod.get("hostNetwork"):
            for port in container.get("ports", []):
                if "hostPort" in port and port["hostPort"] != port["containerPort"]:
                    errors.append(
                        f"container {container['name']}: with hostNetwork, hostPort must equal "
                        "containerPort"
                    )
    update = spec.get("updateStrategy", {}).get("rollingUpdate", {})
    if update.get("maxUnavailable") in (0, "0%") and update.get("maxSurge") in (0, "0%", None):
        errors.append("updateStrategy: maxUnavailable and maxSurge cannot both be 0")
    return errors


def main():
    out_json, versions, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    shipped = {kv.major_minor(v) for v in kv.all_versions()}
    missing = [v for v in versions if v not in shipped]
    if missing:
        # validate() would silently use the newest older schema instead.
        print(
            f"kubernetes-validate {kubernetes_validate.__version__} ships schemas for "
            f"{sorted(shipped)}, not for {missing}; install a release that has them"
        )
        return 1
    failures = 0
    result = {}
    for path in files:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        result[path] = objects
        before = failures
        for obj in objects:
            ident = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            for error in api_rules(obj):
                print(f"ERROR {path}: {ident}: {error}")
                failures += 1
            if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
                continue
            for version in versions:
                try:
                    kv.validate(obj, version, strict=True)
                except kv.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    print(f"ERROR {path}: {ident} against {version}: {where}: {e.message}")
                    failures += 1
                except kv.SchemaNotFoundError as e:
                    print(f"ERROR {path}: {ident}: {e.message}")
                    failures += 1
        kinds = sorted({o["kind"] for o in objects})
        print(
            f"{path}: {len(objects)} objects ({', '.join(kinds)}) valid against "
            f"{', '.join(versions)} (kubernetes-validate {kubernetes_validate.__version__}, strict)"
            if failures == before
            else f"{path}: {failures - before} errors"
        )
    with open(out_json, "w") as f:
        json.dump(result, f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
