//! Kubernetes Events on the pod when the agent refuses it credentials: a role its namespace
//! does not allow, a malformed role or external-ID annotation, a role it asked for that is not
//! its own, and AssumeRole failures. `kubectl describe pod` then shows why the pod's AWS calls
//! fail, without reading the agent's log.
//!
//! * Events are core `v1` Events (`involvedObject` = the pod, with its UID), type `Warning`,
//!   source component `kube2iam-ebpf` on this node. The agent needs `create` and `patch` on
//!   `events` in the core API group.
//! * Rate limit: per (pod, reason), the first occurrence is written at once; later ones within
//!   `--event-interval` are only counted, and the next write (when the interval has passed,
//!   at a later occurrence or at the periodic flush) raises the Event's `count` by all of them
//!   with a PATCH. So a pod retrying in a tight loop costs the API server one write per
//!   interval, and the count still tells how often it happened.
//! * Requests never wait for the API server: [`PodEvents::record`] only updates a table and
//!   queues a write; one background task does the writes, each bounded by a timeout.
//! * Not recorded: a pod without a role annotation when there is no `--default-role` (SDKs
//!   probe IMDS as the last step of their credential chain; that is not an error of the pod),
//!   and refusals caused by the agent itself (namespaces not listed yet).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout},
};

use crate::{identity::PodIdentity, metrics::EventCounters};

/// The component name Events carry.
pub const COMPONENT: &str = "kube2iam-ebpf";
/// Longest Event message written; longer ones are cut at a character boundary.
const MAX_MESSAGE: usize = 1024;
/// Pods × reasons tracked at once; beyond this occurrences are dropped (and counted).
const MAX_TRACKED: usize = 16_384;
/// Queued writes; when full, occurrences wait in their slot for the next flush.
const QUEUE: usize = 1024;
/// One API call's limit.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A slot without occurrences for this long (at least) is forgotten.
const MIN_FORGET_AFTER: Duration = Duration::from_secs(600);

/// Why a pod got an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The role annotation is not a role name or ARN, or too long to be one.
    InvalidRoleAnnotation,
    /// The external-ID annotation is not one STS accepts.
    InvalidExternalIdAnnotation,
    /// Namespace restrictions do not allow the pod's role.
    RoleNotAllowed,
    /// The pod asked for credentials of a role that is not its own.
    UnknownRole,
    /// STS refused or failed the AssumeRole call, and nothing valid was cached.
    AssumeRoleFailed,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::InvalidRoleAnnotation,
        Reason::InvalidExternalIdAnnotation,
        Reason::RoleNotAllowed,
        Reason::UnknownRole,
        Reason::AssumeRoleFailed,
    ];

    /// The Event's `reason`, also the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidRoleAnnotation => "InvalidRoleAnnotation",
            Reason::InvalidExternalIdAnnotation => "InvalidExternalIdAnnotation",
            Reason::RoleNotAllowed => "RoleNotAllowed",
            Reason::UnknownRole => "UnknownRole",
            Reason::AssumeRoleFailed => "AssumeRoleFailed",
        }
    }
}

/// The `outcome` label values of `kube2iam_pod_events_total`.
pub mod outcome {
    /// An Event object was created.
    pub const CREATED: &str = "created";
    /// An Event's count was raised with a PATCH.
    pub const UPDATED: &str = "updated";
    /// An occurrence folded into a later update by the rate limit.
    pub const SUPPRESSED: &str = "suppressed";
    /// A write the API server refused, or that timed out.
    pub const FAILED: &str = "failed";
    /// An occurrence not recorded: too many pods and reasons tracked at once.
    pub const DROPPED: &str = "dropped";
}

type Key = (String, Reason);

#[derive(Clone)]
struct PodRef {
    namespace: String,
    name: String,
    uid: String,
}

/// The Event written for a slot.
#[derive(Clone)]
struct Written {
    name: String,
    count: i32,
}

struct Slot {
    pod: PodRef,
    first_seen: Timestamp,
    window_start: Instant,
    last_seen: Instant,
    /// Occurrences not written yet.
    pending: i32,
    message: String,
    written: Option<Written>,
}

/// A write for the background task: raise the slot's Event by `add` (creating it if needed).
struct Write {
    key: Key,
    add: i32,
}

/// Records pod Events, rate-limited, written in the background.
pub struct PodEvents {
    interval: Duration,
    node: String,
    slots: Mutex<HashMap<Key, Slot>>,
    queue: mpsc::Sender<Write>,
    receiver: Mutex<Option<mpsc::Receiver<Write>>>,
    counters: EventCounters,
}

fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

impl PodEvents {
    /// At most one write per (pod, reason) per `interval`; zero turns Events off.
    pub fn new(interval: Duration, node: &str) -> Arc<PodEvents> {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Arc::new(PodEvents {
            interval,
            node: node.to_owned(),
            slots: Mutex::default(),
            queue,
            receiver: Mutex::new(Some(receiver)),
            counters: EventCounters::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }

    pub fn counters(&self) -> &EventCounters {
        &self.counters
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `pod` was refused for `reason`; never waits.
    pub fn record(&self, pod: &PodIdentity, reason: Reason, message: &str) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let key = (pod.uid.clone(), reason);
        let add = {
            let mut slots = self.slots();
            let full = slots.len() >= MAX_TRACKED;
            match slots.get_mut(&key) {
                Some(slot) => {
                    slot.last_seen = now;
                    slot.message = truncate(message);
                    if now.duration_since(slot.window_start) < self.interval {
                        slot.pending += 1;
                        self.counters.inc(reason.as_str(), outcome::SUPPRESSED);
                        return;
                    }
                    slot.window_start = now;
                    std::mem::take(&mut slot.pending) + 1
                }
                None if full => {
                    self.counters.inc(reason.as_str(), outcome::DROPPED);
                    return;
                }
                None => {
                    slots.insert(
                        key.clone(),
                        Slot {
                            pod: PodRef {
                                namespace: pod.namespace.clone(),
                                name: pod.name.clone(),
                                uid: pod.uid.clone(),
                            },
                            first_seen: Timestamp::now(),
                            window_start: now,
                            last_seen: now,
                            pending: 0,
                            message: truncate(message),
                            written: None,
                        },
                    );
                    1
                }
            }
        };
        self.send(Write { key, add });
    }

    fn send(&self, write: Write) {
        if let Err(e) = self.queue.try_send(write) {
            // Full (or the writer is gone): the occurrences wait in the slot for the next flush.
            let write = match e {
                mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w) => w,
            };
            if let Some(slot) = self.slots().get_mut(&write.key) {
                slot.pending += write.add;
            }
        }
    }

    /// Writes for slots whose interval has passed with occurrences pending; forgets idle slots.
    fn due(&self) -> Vec<Write> {
        let now = Instant::now();
        let forget_after = MIN_FORGET_AFTER.max(self.interval * 10);
        let mut due = Vec::new();
        self.slots().retain(|key, slot| {
            if slot.pending > 0 && now.duration_since(slot.window_start) >= self.interval {
                slot.window_start = now;
                due.push(Write {
                    key: key.clone(),
                    add: std::mem::take(&mut slot.pending),
                });
            }
            slot.pending > 0 || now.duration_since(slot.last_seen) < forget_after
        });
        due
    }

    /// Writes Events until the task is dropped. Runs once; a second call returns at once.
    pub async fn run(self: Arc<Self>, client: Client) {
        let Some(mut receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        if !self.enabled() {
            return;
        }
        let mut flush = tokio::time::interval(
            (self.interval / 4).clamp(Duration::from_millis(100), Duration::from_secs(15)),
        );
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                write = receiver.recv() => match write {
                    Some(write) => self.write(&client, write).await,
                    None => return,
                },
                _ = flush.tick() => {
                    for write in self.due() {
                        self.write(&client, write).await;
                    }
                }
            }
        }
    }

    async fn write(&self, client: &Client, write: Write) {
        let reason = write.key.1;
        let Some((pod, first_seen, message, written)) = self.slots().get(&write.key).map(|s| {
            (
                s.pod.clone(),
                s.first_seen,
                s.message.clone(),
                s.written.clone(),
            )
        }) else {
            return;
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &pod.namespace);
        let now = Timestamp::now();
        let result = match &written {
            Some(w) => {
                let count = w.count.saturating_add(write.add);
                let patch = serde_json::json!({
                    "count": count,
                    "lastTimestamp": Time(now),
                    "message": message,
                });
                match timeout(
                    WRITE_TIMEOUT,
                    api.patch(&w.name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                {
                    Ok(Ok(_)) => Ok((w.name.clone(), count, outcome::UPDATED)),
                    // Expired on the API server (Events live an hour by default): start over.
                    Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
                        self.create(&api, &pod, reason, &message, write.add, now, now)
                            .await
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {WRITE_TIMEOUT:?}")),
                }
            }
            None => {
                self.create(&api, &pod, reason, &message, write.add, first_seen, now)
                    .await
            }
        };
        match result {
            Ok((name, count, done)) => {
                self.counters.inc(reason.as_str(), done);
                if let Some(slot) = self.slots().get_mut(&write.key) {
                    slot.written = Some(Written { name, count });
                }
            }
            Err(e) => {
                self.counters.inc(reason.as_str(), outcome::FAILED);
                tracing::warn!(
                    pod = format!("{}/{}", pod.namespace, pod.name),
                    reason = reason.as_str(),
                    "could not record a Kubernetes Event (does the agent's ClusterRole allow \
                     create and patch on events?): {e}"
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        api: &Api<Event>,
        pod: &PodRef,
        reason: Reason,
        message: &str,
        count: i32,
        first: Timestamp,
        last: Timestamp,
    ) -> Result<(String, i32, &'static str), String> {
        let name = format!("{}.{:x}", pod.name, last.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
                ..ObjectReference::default()
            },
            reason: Some(reason.as_str().into()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            action: Some("GetCredentials".into()),
            count: Some(count),
            first_timestamp: Some(Time(first)),
            last_timestamp: Some(Time(last)),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.node.clone()),
            ..Event::default()
        };
        match timeout(WRITE_TIMEOUT, api.create(&PostParams::default(), &event)).await {
            Ok(Ok(_)) => Ok((name, count, outcome::CREATED)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {WRITE_TIMEOUT:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Annotation;

    fn pod(uid: &str) -> PodIdentity {
        PodIdentity {
            namespace: "team".into(),
            name: format!("pod-{uid}"),
            uid: uid.into(),
            created_ms: 0,
            role: Annotation::Absent,
            external_id: Annotation::Absent,
            account: None,
        }
    }

    fn drain(events: &PodEvents) -> Vec<(String, Reason, i32)> {
        let mut receiver = events.receiver.lock().unwrap();
        let receiver = receiver.as_mut().unwrap();
        let mut out = Vec::new();
        while let Ok(w) = receiver.try_recv() {
            out.push((w.key.0, w.key.1, w.add));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn one_write_per_pod_and_reason_per_interval_counting_repeats() {
        let events = PodEvents::new(Duration::from_secs(60), "node-a");
        for _ in 0..5 {
            events.record(&pod("u1"), Reason::RoleNotAllowed, "denied");
        }
        events.record(&pod("u1"), Reason::AssumeRoleFailed, "sts");
        events.record(&pod("u2"), Reason::RoleNotAllowed, "denied");
        assert_eq!(
            drain(&events),
            vec![
                ("u1".into(), Reason::RoleNotAllowed, 1),
                ("u1".into(), Reason::AssumeRoleFailed, 1),
                ("u2".into(), Reason::RoleNotAllowed, 1),
            ]
        );
        assert_eq!(
            events
                .counters()
                .get(Reason::RoleNotAllowed.as_str(), outcome::SUPPRESSED),
            4
        );
        assert!(
            events.due().is_empty(),
            "nothing is due within the interval"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        let due: Vec<_> = events
            .due()
            .into_iter()
            .map(|w| (w.key.0, w.key.1, w.add))
            .collect();
        assert_eq!(due, vec![("u1".into(), Reason::RoleNotAllowed, 4)]);
        // The next occurrence after a flush waits for the next interval.
        events.record(&pod("u1"), Reason::RoleNotAllowed, "denied");
        assert!(drain(&events).is_empty());
        tokio::time::advance(Duration::from_secs(61)).await;
        events.record(&pod("u1"), Reason::RoleNotAllowed, "denied");
        assert_eq!(
            drain(&events),
            vec![("u1".into(), Reason::RoleNotAllowed, 2)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_slots_are_forgotten_and_zero_interval_records_nothing() {
        let events = PodEvents::new(Duration::from_secs(1), "node-a");
        events.record(&pod("u1"), Reason::UnknownRole, "x");
        tokio::time::advance(MIN_FORGET_AFTER + Duration::from_secs(1)).await;
        assert!(events.due().is_empty());
        assert!(events.slots().is_empty());

        let off = PodEvents::new(Duration::ZERO, "node-a");
        off.record(&pod("u1"), Reason::UnknownRole, "x");
        assert!(drain(&off).is_empty());
        assert!(off.slots().is_empty());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let message = "é".repeat(MAX_MESSAGE);
        let cut = truncate(&message);
        assert!(cut.len() <= MAX_MESSAGE);
        assert!(message.starts_with(&cut));
    }
}
