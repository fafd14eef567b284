//! kube2iam-ebpf's agent as a library, so the binary and the tests drive the same parts.
//!
//! `cli` → `bpf` (load, attach, pin, typed map access).

pub mod bpf;
pub mod cli;
pub mod policy;
pub mod telemetry;
