//! Writes by PATCH: JSON merge patch (RFC 7386, also standing in for strategic merge) and JSON
//! patch (RFC 6902).

use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::{
    Body, Shared, Target, json_response, key_of, method_not_allowed, parse_body,
    unsupported_media_type,
};
use crate::kube_api::store::ApiError;

pub(super) fn patch(
    shared: &Shared,
    target: &Target,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let key = key_of(target);
    if target.name.is_none() {
        return Err(method_not_allowed());
    }
    let content_type = content_type.unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let patch = parse_body(body)?;
    let updated = match media {
        // Strategic merge differs from JSON merge only for lists with merge keys, which the
        // fields this emulator's clients patch (annotations, labels, event counts) do not have.
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let expected = patch["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            shared.write(|store| {
                store.update(target.resource, &key, expected.as_deref(), |object| {
                    merge_patch(object, &patch);
                    Ok(())
                })
            })?
        }
        "application/json-patch+json" => shared.write(|store| {
            store.update(target.resource, &key, None, |object| {
                json_patch(object, &patch)
            })
        })?,
        other => return Err(unsupported_media_type(other)),
    };
    Ok(json_response(StatusCode::OK, &updated))
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("just made an object");
            for (key, value) in patch {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6902 (add, remove, replace, test, copy, move).
pub(super) fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let bad = |why: String| ApiError::new(422, "Invalid", why);
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array"))?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or_else(|| bad("JSON patch operation without a path".into()))?;
        match op["op"].as_str() {
            Some("add") => pointer_add(target, path, op["value"].clone()).map_err(bad)?,
            Some("remove") => {
                pointer_remove(target, path).map_err(bad)?;
            }
            Some("replace") => {
                pointer_remove(target, path).map_err(bad)?;
                pointer_add(target, path, op["value"].clone()).map_err(bad)?;
            }
            Some("test") => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(bad(format!("testing value {path} failed")));
                }
            }
            Some("copy") | Some("move") => {
                let from = op["from"]
                    .as_str()
                    .ok_or_else(|| bad("copy/move without from".into()))?;
                let value = if op["op"] == "move" {
                    pointer_remove(target, from).map_err(bad)?
                } else {
                    target
                        .pointer(from)
                        .cloned()
                        .ok_or_else(|| bad(format!("missing value at {from}")))?
                };
                pointer_add(target, path, value).map_err(bad)?;
            }
            other => return Err(bad(format!("unknown JSON patch operation {other:?}"))),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match target.pointer_mut(&parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(list)) => {
            let index = if last == "-" {
                list.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("invalid array index {last:?}"))?
            };
            if index > list.len() {
                return Err(format!("array index {index} out of bounds"));
            }
            list.insert(index, value);
            Ok(())
        }
        _ => Err(format!("doc is missing path: {path:?}")),
    }
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let missing = || format!("doc is missing path: {path:?}");
    match target.pointer_mut(&parent) {
        Some(Value::Object(map)) => map.remove(&last).ok_or_else(missing),
        Some(Value::Array(list)) => {
            let index = last.parse::<usize>().map_err(|_| missing())?;
            (index < list.len())
                .then(|| list.remove(index))
                .ok_or_else(missing)
        }
        _ => Err(missing()),
    }
}
