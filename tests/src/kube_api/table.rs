//! Server-side printing: the `meta.k8s.io` `Table` and `PartialObjectMetadata` forms that
//! kubectl and metadata-only clients ask for with `Accept: application/json;as=Table;...`.

use serde_json::{Value, json};

use super::{
    objects::{human_duration, parse_rfc3339, unix_now},
    store::Resource,
};

/// What `rows[].object` carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// The representation a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The object itself.
    Object,
    /// A `meta.k8s.io/<version>` `Table`.
    Table {
        api_version: &'static str,
        include: IncludeObject,
    },
    /// `meta.k8s.io/<version>` `PartialObjectMetadata` (and `...List` for lists).
    Metadata { api_version: &'static str },
}

impl Format {
    /// Reads the first acceptable media type of an `Accept` header.
    pub fn from_accept(accept: Option<&str>, include: Option<&str>) -> Self {
        let include = match include {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        };
        let Some(accept) = accept else {
            return Format::Object;
        };
        for media in accept.split(',') {
            let mut parts = media.split(';').map(str::trim);
            let mime = parts.next().unwrap_or_default();
            if !matches!(mime, "application/json" | "*/*" | "application/*") {
                continue;
            }
            let (mut r#as, mut v, mut g) = (None, None, None);
            for param in parts {
                match param.split_once('=') {
                    Some(("as", value)) => r#as = Some(value),
                    Some(("v", value)) => v = Some(value),
                    Some(("g", value)) => g = Some(value),
                    _ => {}
                }
            }
            let Some(r#as) = r#as else {
                return Format::Object;
            };
            let api_version = match (g, v) {
                (Some("meta.k8s.io"), Some("v1")) => "meta.k8s.io/v1",
                (Some("meta.k8s.io"), Some("v1beta1")) => "meta.k8s.io/v1beta1",
                _ => continue,
            };
            match r#as {
                "Table" => {
                    return Format::Table {
                        api_version,
                        include,
                    };
                }
                "PartialObjectMetadata" | "PartialObjectMetadataList" => {
                    return Format::Metadata { api_version };
                }
                _ => continue,
            }
        }
        Format::Object
    }
}

fn column(name: &str, kind: &str, format: &str, description: &str, priority: u32) -> Value {
    json!({"name": name, "type": kind, "format": format, "description": description,
           "priority": priority})
}

fn columns(resource: Resource) -> Vec<Value> {
    let name = column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace. Is required when creating resources, \
         although some resources may allow a client to request the generation of an \
         appropriate name automatically.",
        0,
    );
    let age = column(
        "Age",
        "string",
        "",
        "CreationTimestamp is a timestamp representing the server time when this object was \
         created.",
        0,
    );
    match resource {
        Resource::Pods => vec![
            name,
            column(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod for accepting traffic.",
                0,
            ),
            column(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod.",
                0,
            ),
            column(
                "Restarts",
                "string",
                "",
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                0,
            ),
            age,
            column(
                "IP",
                "string",
                "",
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
                1,
            ),
            column(
                "Node",
                "string",
                "",
                "NodeName is a request to schedule this pod onto a specific node.",
                1,
            ),
            column(
                "Nominated Node",
                "string",
                "",
                "nominatedNodeName is set only when this pod preempts other pods on the node.",
                1,
            ),
            column(
                "Readiness Gates",
                "string",
                "",
                "If specified, all readiness gates will be evaluated for pod readiness.",
                1,
            ),
        ],
        Resource::Namespaces => vec![
            name,
            column("Status", "string", "", "The status of the namespace", 0),
            age,
        ],
        Resource::ServiceAccounts => vec![
            name,
            column(
                "Secrets",
                "string",
                "",
                "Secrets is a list of the secrets in the same namespace that pods running using \
                 this ServiceAccount are allowed to use.",
                0,
            ),
            age,
        ],
        Resource::Events | Resource::EventsV1 => vec![
            name,
            column(
                "Created At",
                "date",
                "",
                "CreationTimestamp is a timestamp representing the server time when this object was created.",
                0,
            ),
        ],
    }
}

fn age(object: &Value) -> String {
    match object["metadata"]["creationTimestamp"]
        .as_str()
        .and_then(parse_rfc3339)
    {
        Some(created) => human_duration(unix_now() - created),
        None => "<unknown>".into(),
    }
}

fn cells(resource: Resource, object: &Value) -> Vec<Value> {
    let name = json!(object["metadata"]["name"].as_str().unwrap_or_default());
    let none = |v: &Value| json!(v.as_str().filter(|s| !s.is_empty()).unwrap_or("<none>"));
    match resource {
        Resource::Pods => {
            let statuses = object["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = object["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses
                .iter()
                .filter(|s| s["ready"].as_bool() == Some(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .map(|s| s["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let status = if object["metadata"].get("deletionTimestamp").is_some() {
                "Terminating".to_owned()
            } else {
                object["status"]["phase"]
                    .as_str()
                    .unwrap_or("Unknown")
                    .to_owned()
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                json!(age(object)),
                none(&object["status"]["podIP"]),
                none(&object["spec"]["nodeName"]),
                none(&object["status"]["nominatedNodeName"]),
                json!("<none>"),
            ]
        }
        Resource::Namespaces => vec![
            name,
            json!(object["status"]["phase"].as_str().unwrap_or_default()),
            json!(age(object)),
        ],
        Resource::Events | Resource::EventsV1 => {
            vec![name, object["metadata"]["creationTimestamp"].clone()]
        }
        // The Secrets cell is a number, as the API server's printer writes it.
        Resource::ServiceAccounts => vec![
            name,
            json!(object["secrets"].as_array().map_or(0, Vec::len)),
            json!(age(object)),
        ],
    }
}

/// `PartialObjectMetadata` for `object`.
pub fn partial_metadata(object: &Value, api_version: &str) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": api_version,
        "metadata": object["metadata"],
    })
}

/// A `Table` of `objects`; `with_columns` is false for watch events after the first, which the
/// API server sends without column definitions.
pub fn table(
    resource: Resource,
    objects: &[&Value],
    api_version: &str,
    include: IncludeObject,
    list_metadata: Value,
    with_columns: bool,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut row = json!({"cells": cells(resource, object)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(object, api_version),
                IncludeObject::Object => row["object"] = (*object).clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": list_metadata,
        "columnDefinitions": if with_columns { json!(columns(resource)) } else { Value::Null },
        "rows": rows,
    })
}
