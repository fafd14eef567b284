//! The object store behind the emulator: objects per resource, one global resourceVersion
//! counter, and a bounded history of changes that watches replay and lists rewind.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::objects::{name_suffix, new_uid, object_mut, parse_rfc3339, rfc3339, unix_now};

/// The resources the emulator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// `v1` pods.
    Pods,
    /// `v1` namespaces.
    Namespaces,
    /// `v1` events (core).
    Events,
    /// `events.k8s.io/v1` events.
    EventsV1,
    /// `v1` serviceaccounts.
    ServiceAccounts,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::Events,
        Resource::EventsV1,
        Resource::ServiceAccounts,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::Events | Resource::EventsV1 => "Event",
            Resource::ServiceAccounts => "ServiceAccount",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::EventsV1 => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The plural name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::Events | Resource::EventsV1 => "events",
            Resource::ServiceAccounts => "serviceaccounts",
        }
    }

    /// The name `details.kind` and error messages use (`pods`, `events.events.k8s.io`).
    pub fn qualified(self) -> &'static str {
        match self {
            Resource::EventsV1 => "events.events.k8s.io",
            other => other.plural(),
        }
    }

    pub fn namespaced(self) -> bool {
        self != Resource::Namespaces
    }
}

/// `(namespace, name)`; the namespace is `""` for cluster-scoped objects.
pub type Key = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One write, as a watch replays it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub resource: Resource,
    pub kind: ChangeKind,
    pub key: Key,
    /// The object after the change; for a deletion, the last state with the deletion's
    /// resourceVersion.
    pub object: Value,
    /// The object before the change (absent for an addition).
    pub prev: Option<Value>,
}

/// An API error: HTTP status, `reason`, message, and optional `details`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(resource: Resource, name: &str) -> Self {
        Self {
            details: Some(
                json!({"name": name, "group": group(resource), "kind": resource.plural()}),
            ),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", resource.qualified()),
            )
        }
    }

    pub fn already_exists(resource: Resource, name: &str) -> Self {
        Self {
            details: Some(
                json!({"name": name, "group": group(resource), "kind": resource.plural()}),
            ),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.qualified()),
            )
        }
    }

    pub fn conflict(resource: Resource, name: &str) -> Self {
        Self {
            details: Some(
                json!({"name": name, "group": group(resource), "kind": resource.plural()}),
            ),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                     modified; please apply your changes to the latest version and try again",
                    resource.qualified()
                ),
            )
        }
    }

    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(resource: Resource, name: &str, message: impl Into<String>) -> Self {
        Self {
            details: Some(json!({"name": name, "group": group(resource), "kind": resource.kind()})),
            ..Self::new(422, "Invalid", message)
        }
    }

    /// The `Status` object the API server sends for this error.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn group(resource: Resource) -> &'static str {
    match resource {
        Resource::EventsV1 => "events.k8s.io",
        _ => "",
    }
}

/// Drops `metadata.labels` and `metadata.annotations` when empty: the API server's ObjectMeta
/// serializes them `omitempty`, so a patch that removes the last annotation leaves no map.
fn omit_empty_maps(object: &mut Value) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["labels", "annotations"] {
            if metadata
                .get(field)
                .is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()) || v.is_null())
            {
                metadata.remove(field);
            }
        }
    }
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    history: VecDeque<Change>,
    /// Every change with `rv > compacted` is in `history`.
    compacted: u64,
    history_limit: usize,
    /// The last pod creationTimestamp handed out, so a later pod is always strictly later.
    last_pod_created: i64,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let mut store = Self {
            rv: 0,
            objects: Resource::ALL
                .iter()
                .map(|r| (*r, BTreeMap::new()))
                .collect(),
            history: VecDeque::new(),
            compacted: 0,
            history_limit: history_limit.max(1),
            last_pod_created: 0,
        };
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store
                .create(
                    Resource::Namespaces,
                    None,
                    super::objects::namespace(name).into_value(),
                )
                .expect("fresh store");
        }
        store
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, resource: Resource, key: &Key) -> Option<&Value> {
        self.objects[&resource].get(key)
    }

    pub fn all(&self, resource: Resource) -> &BTreeMap<Key, Value> {
        &self.objects[&resource]
    }

    /// The objects of `resource` as they were at `rv` (rewinding the history).
    pub fn snapshot(&self, resource: Resource, rv: u64) -> Result<BTreeMap<Key, Value>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::expired(rv, self.compacted));
        }
        let mut objects = self.objects[&resource].clone();
        for change in self.history.iter().rev() {
            if change.rv <= rv {
                break;
            }
            if change.resource != resource {
                continue;
            }
            match (&change.kind, &change.prev) {
                (ChangeKind::Added, _) => {
                    objects.remove(&change.key);
                }
                (_, Some(prev)) => {
                    objects.insert(change.key.clone(), prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(objects)
    }

    /// The changes after `rv`, or 410 Expired if the history no longer reaches back to it.
    pub fn changes_after(&self, rv: u64) -> Result<impl Iterator<Item = &Change>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::expired(rv, self.compacted));
        }
        let start = self.history.partition_point(|c| c.rv <= rv);
        Ok(self.history.range(start..))
    }

    /// Forgets the history: a watch or list from any earlier resourceVersion gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Stores a new object, filling in the server-owned metadata.
    pub fn create(
        &mut self,
        resource: Resource,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be an object",
            ));
        }
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!(resource.api_version());
        omit_empty_maps(&mut object);
        let metadata = object_mut(&mut object, "metadata");
        // Namespace: from the path, which must agree with the object.
        let namespace = if resource.namespaced() {
            let in_object = metadata.get("namespace").and_then(Value::as_str);
            let namespace = match (namespace, in_object) {
                (Some(path), Some(obj)) if !obj.is_empty() && obj != path => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace \
                         sent on the request",
                    ));
                }
                (Some(path), _) => path.to_owned(),
                (None, Some(obj)) if !obj.is_empty() => obj.to_owned(),
                (None, _) => "default".to_owned(),
            };
            metadata.insert("namespace".into(), json!(namespace));
            namespace
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let name = match metadata.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => match metadata.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", name_suffix());
                    metadata.insert("name".into(), json!(name));
                    name
                }
                _ => {
                    return Err(ApiError::invalid(
                        resource,
                        "",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or \
                             generateName is required",
                            resource.kind()
                        ),
                    ));
                }
            },
        };
        if resource.namespaced()
            && !self.objects[&Resource::Namespaces]
                .contains_key(&(String::new(), namespace.clone()))
        {
            return Err(ApiError::not_found(Resource::Namespaces, &namespace));
        }
        let key = (namespace, name.clone());
        if self.objects[&resource].contains_key(&key) {
            return Err(ApiError::already_exists(resource, &name));
        }
        if metadata
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            metadata.insert("uid".into(), json!(new_uid()));
        }
        let created = metadata
            .get("creationTimestamp")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339);
        let created = match (created, resource) {
            (Some(created), Resource::Pods) => {
                self.last_pod_created = self.last_pod_created.max(created);
                created
            }
            (Some(created), _) => created,
            (None, Resource::Pods) => {
                let created = unix_now().max(self.last_pod_created + 1);
                self.last_pod_created = created;
                created
            }
            (None, _) => unix_now(),
        };
        metadata.insert("creationTimestamp".into(), json!(rfc3339(created)));
        metadata.remove("deletionTimestamp");
        metadata.remove("deletionGracePeriodSeconds");
        let rv = self.next_rv();
        let metadata = object_mut(&mut object, "metadata");
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        metadata.entry("generation").or_insert(json!(1));
        // Pods and ServiceAccounts have no spec generation.
        if matches!(resource, Resource::Pods | Resource::ServiceAccounts) {
            metadata.remove("generation");
        }
        self.objects
            .get_mut(&resource)
            .expect("every resource has a map")
            .insert(key.clone(), object.clone());
        self.record(Change {
            rv,
            resource,
            kind: ChangeKind::Added,
            key,
            object: object.clone(),
            prev: None,
        });
        Ok(object)
    }

    /// Replaces an object with `change(object)`; identity and creation metadata are kept.
    /// `expected_rv` is an optimistic-concurrency precondition (409 Conflict on mismatch).
    pub fn update(
        &mut self,
        resource: Resource,
        key: &Key,
        expected_rv: Option<&str>,
        change: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let Some(prev) = self.objects[&resource].get(key).cloned() else {
            return Err(ApiError::not_found(resource, &key.1));
        };
        if let Some(expected) = expected_rv.filter(|rv| !rv.is_empty())
            && prev["metadata"]["resourceVersion"].as_str() != Some(expected)
        {
            return Err(ApiError::conflict(resource, &key.1));
        }
        let mut object = prev.clone();
        change(&mut object)?;
        object["kind"] = json!(resource.kind());
        object["apiVersion"] = json!(resource.api_version());
        {
            let metadata = object_mut(&mut object, "metadata");
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                match prev["metadata"].get(field) {
                    Some(value) => metadata.insert(field.into(), value.clone()),
                    None => metadata.remove(field),
                };
            }
        }
        omit_empty_maps(&mut object);
        if object == prev {
            // A no-op write does not bump the resourceVersion, as with a real API server.
            return Ok(prev);
        }
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects
            .get_mut(&resource)
            .expect("every resource has a map")
            .insert(key.clone(), object.clone());
        self.record(Change {
            rv,
            resource,
            kind: ChangeKind::Modified,
            key: key.clone(),
            object: object.clone(),
            prev: Some(prev),
        });
        Ok(object)
    }

    /// Removes an object; returns its last state with the deletion's resourceVersion.
    pub fn delete(&mut self, resource: Resource, key: &Key) -> Result<Value, ApiError> {
        let Some(prev) = self
            .objects
            .get_mut(&resource)
            .expect("every resource has a map")
            .remove(key)
        else {
            return Err(ApiError::not_found(resource, &key.1));
        };
        let rv = self.next_rv();
        let mut object = prev.clone();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(Change {
            rv,
            resource,
            kind: ChangeKind::Deleted,
            key: key.clone(),
            object: object.clone(),
            prev: Some(prev),
        });
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::objects::{namespace, pod};

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn snapshots_rewind_history() {
        let mut store = Store::new(100);
        let ip = "10.0.0.1".parse().unwrap();
        store
            .create(
                Resource::Pods,
                None,
                pod("default", "a", "n", ip, None).into_value(),
            )
            .unwrap();
        let rv_a = store.rv();
        store
            .update(Resource::Pods, &key("default", "a"), None, |p| {
                p["metadata"]["labels"]["x"] = json!("y");
                Ok(())
            })
            .unwrap();
        store.delete(Resource::Pods, &key("default", "a")).unwrap();
        assert!(store.all(Resource::Pods).is_empty());
        let then = store.snapshot(Resource::Pods, rv_a).unwrap();
        assert_eq!(then.len(), 1);
        assert!(
            then[&key("default", "a")]["metadata"]["labels"]
                .get("x")
                .is_none()
        );
        assert_eq!(store.changes_after(rv_a).unwrap().count(), 2);
        store.compact();
        assert_eq!(store.changes_after(rv_a).err().map(|e| e.code), Some(410));
        assert_eq!(store.changes_after(store.rv()).unwrap().count(), 0);
    }

    #[test]
    fn pods_get_strictly_increasing_creation_timestamps() {
        let mut store = Store::new(100);
        let ip = "10.0.0.1".parse().unwrap();
        let a = store
            .create(
                Resource::Pods,
                None,
                pod("default", "a", "n", ip, None).into_value(),
            )
            .unwrap();
        let b = store
            .create(
                Resource::Pods,
                None,
                pod("default", "b", "n", ip, None).into_value(),
            )
            .unwrap();
        let t = |o: &Value| parse_rfc3339(o["metadata"]["creationTimestamp"].as_str().unwrap());
        assert!(t(&b) > t(&a));
        assert_ne!(a["metadata"]["uid"], b["metadata"]["uid"]);
    }

    #[test]
    fn namespaced_objects_need_their_namespace() {
        let mut store = Store::new(100);
        let ip = "10.0.0.1".parse().unwrap();
        let err = store
            .create(
                Resource::Pods,
                None,
                pod("nope", "a", "n", ip, None).into_value(),
            )
            .unwrap_err();
        assert_eq!(err.code, 404);
        store
            .create(Resource::Namespaces, None, namespace("nope").into_value())
            .unwrap();
        store
            .create(
                Resource::Pods,
                None,
                pod("nope", "a", "n", ip, None).into_value(),
            )
            .unwrap();
        let err = store
            .create(
                Resource::Pods,
                None,
                pod("nope", "a", "n", ip, None).into_value(),
            )
            .unwrap_err();
        assert_eq!(err.reason, "AlreadyExists");
    }

    #[test]
    fn history_limit_compacts() {
        let mut store = Store::new(2);
        let first = store.rv();
        for name in ["a", "b", "c"] {
            store
                .create(Resource::Namespaces, None, namespace(name).into_value())
                .unwrap();
        }
        assert_eq!(store.changes_after(first).err().map(|e| e.code), Some(410));
        assert_eq!(store.changes_after(store.rv() - 2).unwrap().count(), 2);
    }
}
