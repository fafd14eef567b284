//! kube2iam-ebpf's agent as a library, so the binary and the tests drive the same parts.
//!
//! `cli` → `bpf` (load, attach, pin, typed map access) → `kube` (watch → `identity` map;
//! `service_accounts`: ServiceAccounts' roles) →
//! `attest` (the kernel's word on who connected) → `decision` (who is calling and which role,
//! one pure function over `policy`'s rules) → `credentials` (STS, cache; `session_tags`: what
//! each session carries) → `imds` (the server pods reach) →
//! `admin` (health endpoints) and `metrics` over `status` (readiness), with `events` (Kubernetes Events on refused pods);
//! `inspect` reads the pins; `agent` wires them together. `kube2iam` reads kube2iam's flags.

pub mod admin;
pub mod agent;
pub mod attest;
pub mod bpf;
pub mod cli;
pub mod credentials;
pub mod decision;
pub mod doctor;
pub mod events;
pub mod identity;
pub mod imds;
pub mod inspect;
pub mod kube;
pub mod kube2iam;
pub mod metrics;
pub mod policy;
pub mod service_accounts;
pub mod session_tags;
pub mod status;
pub mod telemetry;

/// An error and its causes on one line, `outer: cause: root cause`, for answers and logs that
/// must say what really failed (an SDK's "dispatch failure" alone says nothing).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
