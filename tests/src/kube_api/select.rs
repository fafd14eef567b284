//! `fieldSelector` and `labelSelector`, parsed and matched the way the API server does for the
//! resources the emulator serves.

use serde_json::Value;

use super::store::Resource;

/// Why a selector was rejected: the API server answers 400 BadRequest with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldOp {
    Equals,
    NotEquals,
}

/// A parsed `fieldSelector`: every term must hold.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    terms: Vec<(String, FieldOp, String)>,
}

/// The field labels the API server supports for `resource` (pkg/registry/*/strategy.go
/// `*ToSelectableFields`, plus the generic metadata.name / metadata.namespace).
fn supported_fields(resource: Resource) -> &'static [&'static str] {
    match resource {
        Resource::Pods => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        Resource::Namespaces => &["metadata.name", "status.phase"],
        Resource::Events => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        Resource::EventsV1 | Resource::ServiceAccounts => &["metadata.name", "metadata.namespace"],
    }
}

/// The value of a selectable field (`""` for an absent string field).
fn field_value(resource: Resource, object: &Value, field: &str) -> String {
    let string_at = |path: &[&str]| -> String {
        let mut v = object;
        for part in path {
            v = &v[*part];
        }
        v.as_str().unwrap_or_default().to_owned()
    };
    match field {
        "spec.hostNetwork" => object["spec"]["hostNetwork"]
            .as_bool()
            .unwrap_or(false)
            .to_string(),
        // A namespace's metadata.namespace is "".
        "metadata.namespace" if resource == Resource::Namespaces => String::new(),
        "source" => string_at(&["source", "component"]),
        _ => {
            let path: Vec<&str> = field.split('.').collect();
            string_at(&path)
        }
    }
}

/// Splits on `sep` where it is not escaped with a backslash; escapes stay in the pieces.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            pieces.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    pieces.push(&text[start..]);
    pieces
}

fn unescape(text: &str) -> Result<String, SelectorError> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e @ ('\\' | ',' | '=')) => out.push(e),
                Some(e) => {
                    return Err(SelectorError(format!(
                        "invalid field selector: invalid escape sequence: \\{e}"
                    )));
                }
                None => {
                    return Err(SelectorError(
                        "invalid field selector: unterminated escape sequence".into(),
                    ));
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

impl FieldSelector {
    pub fn parse(resource: Resource, text: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        for term in split_unescaped(text, ',') {
            if term.is_empty() {
                continue;
            }
            let (field, op, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, FieldOp::NotEquals, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, FieldOp::Equals, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, FieldOp::Equals, v)
            } else {
                return Err(SelectorError(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if !supported_fields(resource).contains(&field) {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            terms.push((field.to_owned(), op, unescape(value)?));
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, resource: Resource, object: &Value) -> bool {
        self.terms.iter().all(|(field, op, value)| {
            let actual = field_value(resource, object, field);
            match op {
                FieldOp::Equals => actual == *value,
                FieldOp::NotEquals => actual != *value,
            }
        })
    }

    /// The value a `metadata.name=` term requires, if any.
    #[cfg(test)]
    pub fn required_name(&self) -> Option<&str> {
        self.terms
            .iter()
            .find(|(field, op, _)| field == "metadata.name" && *op == FieldOp::Equals)
            .map(|(_, _, value)| value.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// Adds `field=value` (for the name or namespace a request path implies).
    pub fn require(&mut self, field: &str, value: &str) {
        self.terms
            .push((field.to_owned(), FieldOp::Equals, value.to_owned()));
    }
}

#[derive(Debug, Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                pieces.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&text[start..]);
    pieces
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        let bad = |why: &str| SelectorError(format!("unable to parse requirement: {why}"));
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let requirement = if let Some(key) = term.strip_prefix('!') {
                LabelRequirement::DoesNotExist(key.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelRequirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelRequirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                LabelRequirement::NotIn(
                    key.trim().to_owned(),
                    parse_set(rest).ok_or_else(|| bad(term))?,
                )
            } else if let Some((key, rest)) = term.split_once(" in ") {
                LabelRequirement::In(
                    key.trim().to_owned(),
                    parse_set(rest).ok_or_else(|| bad(term))?,
                )
            } else {
                LabelRequirement::Exists(term.to_owned())
            };
            let (key, values): (&str, Vec<&str>) = match &requirement {
                LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => {
                    (k, vec![v.as_str()])
                }
                LabelRequirement::In(k, vs) | LabelRequirement::NotIn(k, vs) => {
                    (k, vs.iter().map(String::as_str).collect())
                }
                LabelRequirement::Exists(k) | LabelRequirement::DoesNotExist(k) => (k, vec![]),
            };
            if !valid_label_key(key) {
                return Err(bad(&format!("invalid label key \"{key}\"")));
            }
            if let Some(value) = values.iter().find(|v| !valid_label_value(v)) {
                return Err(bad(&format!("invalid label value: \"{value}\"")));
            }
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    !label(k).is_some_and(|l| vs.iter().any(|v| v == l))
                }
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::DoesNotExist(k) => label(k).is_none(),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

fn parse_set(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"},
                         "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| {
            FieldSelector::parse(Resource::Pods, s)
                .unwrap()
                .matches(Resource::Pods, &pod)
        };
        assert!(m("spec.nodeName=n1"));
        assert!(m("spec.nodeName==n1,metadata.namespace=ns"));
        assert!(!m("spec.nodeName=n2"));
        assert!(m("spec.nodeName!=n2"));
        assert!(m("spec.hostNetwork=false"));
        assert!(m("status.podIP="));
        assert!(m(""));
        assert!(!m("metadata.name=a,metadata.namespace=other"));
        let err = FieldSelector::parse(Resource::Pods, "spec.foo=x").unwrap_err();
        assert_eq!(err.0, "field label not supported: spec.foo");
        assert!(FieldSelector::parse(Resource::Namespaces, "spec.nodeName=x").is_err());
        let escaped = FieldSelector::parse(Resource::Pods, r"metadata.name=a\,b").unwrap();
        assert_eq!(escaped.required_name(), Some("a,b"));
    }

    #[test]
    fn label_selectors() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&pod);
        assert!(m("app=web"));
        assert!(m("app==web,tier=front"));
        assert!(!m("app=db"));
        assert!(m("app!=db"));
        assert!(m("app"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("tier in (front,back)"));
        assert!(!m("tier notin (front)"));
        assert!(m("app in (web),tier"));
        assert!(LabelSelector::parse("app=we b").is_err());
    }
}
