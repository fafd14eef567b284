//! What the agent's readiness is made of and where the admin server's reports come from:
//! shared by the admin server (`/readyz`) and the metrics (`/metrics`), so neither imports the
//! other.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use kube2iam_common::Counter;

use crate::{events::PodEvents, imds::State, kube::WatchStats};

/// What readiness is made of, besides the watches.
#[derive(Default)]
pub struct Readiness {
    /// Programs attached and config written.
    pub interception: AtomicBool,
    /// The last upstream probe succeeded.
    pub upstream: AtomicBool,
}

/// Reads the pinned per-CPU counters (summed), or says why it could not.
pub type BpfCounters = Box<dyn Fn() -> Result<Vec<(Counter, u64)>, String> + Send + Sync>;

/// Reads where the packet guard stands on each matching interface; `None` with the guard off.
pub type GuardStatus =
    Box<dyn Fn() -> Option<Result<Vec<crate::bpf::guard::InterfaceStatus>, String>> + Send + Sync>;

/// What the admin server reports on.
pub struct Sources {
    pub state: Arc<State>,
    pub readiness: Arc<Readiness>,
    pub watch_stats: Arc<WatchStats>,
    pub events: Arc<PodEvents>,
    pub bpf_counters: BpfCounters,
    pub guard_status: GuardStatus,
}

impl Sources {
    /// `None` when ready, else the reasons.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let mut reasons = Vec::new();
        if !self.readiness.interception.load(Ordering::Acquire) {
            reasons.push("programs not attached".to_owned());
        }
        if !self.state.registry.synced() {
            reasons.push("pod watch not synced".to_owned());
        }
        if self.state.config.namespace_restrictions && !self.state.namespaces.synced() {
            reasons.push("namespace watch not synced".to_owned());
        }
        if self.state.config.service_account_roles && !self.state.service_accounts.synced() {
            reasons.push("service account watch not synced".to_owned());
        }
        if !self.readiness.upstream.load(Ordering::Acquire) {
            reasons.push(format!(
                "upstream metadata service unreachable ({})",
                self.state.upstream.addr()
            ));
        }
        (!reasons.is_empty()).then_some(reasons)
    }
}
