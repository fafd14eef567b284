//! Role credentials from STS, cached per (role ARN, external ID[, pod][, session tags]).
//!
//! * Concurrent misses for one key share one AssumeRole call.
//! * Credentials are refreshed ahead of expiry (`refresh_before`), in the background while the
//!   cached ones are still served.
//! * Failures go into a short negative cache with per-key exponential backoff; while cached
//!   credentials are still valid they keep being served.
//! * A pod never receives anything but what STS issued for its role: there is no fallback.
//! * Annotation churn is bounded: entries no pod uses any more are dropped within minutes
//!   ([`CredentialCache::evict_unused`]), and one pod can start only a few prefetches per window
//!   by changing its annotations ([`PrefetchLimiter`]).

use bytes::Bytes;
use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::future::BoxFuture;
use tokio::sync::{Mutex, Semaphore};

use crate::{metrics::StsResult, session_tags::SessionTags};

/// Temporary credentials for one role session.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
}

/// Credentials as the cache hands them out: shared, not copied, by every request they serve,
/// with the answer rendered from them once.
pub struct Issued {
    creds: Credentials,
    document: OnceLock<Bytes>,
}

impl Issued {
    fn new(creds: Credentials) -> Arc<Issued> {
        Arc::new(Issued {
            creds,
            document: OnceLock::new(),
        })
    }

    /// The answer rendered from these credentials, once one was kept.
    pub fn rendered(&self) -> Option<Bytes> {
        self.document.get().cloned()
    }

    /// Keeps `document` as the answer rendered from these credentials (the first one kept
    /// stays) and returns the kept one. Each request's answer shares its bytes.
    pub fn keep_rendered(&self, document: String) -> Bytes {
        self.document.get_or_init(|| Bytes::from(document)).clone()
    }
}

/// Equal when the credentials are (whether or not their answer was rendered yet).
impl PartialEq for Issued {
    fn eq(&self, other: &Issued) -> bool {
        self.creds == other.creds
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.creds.fmt(f)
    }
}

impl std::ops::Deref for Issued {
    type Target = Credentials;

    fn deref(&self) -> &Credentials {
        &self.creds
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// Whose session: the node's (shared by all pods with the role) or one pod's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Session {
    Node,
    Pod { uid: String },
}

/// What credentials are cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub role_arn: Arc<str>,
    pub external_id: Option<String>,
    pub session: Session,
    /// Session tags and source identity (`--session-tags`, `--source-identity`): whatever
    /// varies them varies the session.
    pub tags: SessionTags,
}

/// One AssumeRole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRequest {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    pub duration: Duration,
    pub tags: SessionTags,
}

/// Why STS gave no credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("STS throttled the AssumeRole call for {role}: {message}")]
    Throttled { role: String, message: String },
    #[error("STS refused AssumeRole for {role} ({code}): {message}")]
    Denied {
        role: String,
        code: String,
        message: String,
    },
    #[error("STS is unavailable for {role}: {message}")]
    Unavailable { role: String, message: String },
}

impl StsError {
    /// The call's result, for metrics.
    pub fn result(&self) -> StsResult {
        match self {
            StsError::Throttled { .. } => StsResult::Throttled,
            StsError::Denied { .. } => StsResult::Denied,
            StsError::Unavailable { .. } => StsResult::Unavailable,
        }
    }

    /// A short label for metrics (the `result` label value).
    pub fn kind(&self) -> &'static str {
        self.result().as_str()
    }
}

/// The STS client, behind a trait so the cache is unit-tested without a network.
pub trait Sts: Send + Sync + 'static {
    fn assume_role(
        &self,
        request: AssumeRequest,
    ) -> BoxFuture<'static, Result<Credentials, StsError>>;
}

/// STS connections kept open for reuse once idle. A burst of distinct roles (a node drain, a
/// restart with every pod's role cold) opens one TLS connection per concurrent AssumeRole; the
/// SDK's default pool would keep every one of them for 90 s, each holding its TLS and HTTP
/// buffers (tens of KiB). A few cover the steady trickle of refreshes.
const STS_IDLE_CONNECTIONS: usize = 4;

/// The HTTP client for STS: the SDK's default (rustls with aws-lc, proxies from the
/// environment), with at most [`STS_IDLE_CONNECTIONS`] idle connections kept.
pub fn sts_http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::{
        Builder, ConnectorBuilder, proxy::ProxyConfig, tls, tls::rustls_provider::CryptoMode,
    };
    // As the SDK builds its default client; the pool limit goes on the connector, which builds
    // the hyper client that pools.
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector = ConnectorBuilder::default()
            .pool_max_idle_per_host(STS_IDLE_CONNECTIONS)
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

/// aws-sdk-sts.
pub struct SdkSts {
    client: aws_sdk_sts::Client,
}

impl SdkSts {
    pub fn new(client: aws_sdk_sts::Client) -> Self {
        SdkSts { client }
    }
}

impl Sts for SdkSts {
    fn assume_role(
        &self,
        request: AssumeRequest,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let client = self.client.clone();
        Box::pin(async move {
            use aws_sdk_sts::error::{ProvideErrorMetadata as _, SdkError};
            let role = request.role_arn.clone();
            let mut call = client
                .assume_role()
                .role_arn(&request.role_arn)
                .role_session_name(&request.session_name)
                .duration_seconds(request.duration.as_secs().clamp(900, 43_200) as i32)
                .set_external_id(request.external_id.clone())
                .set_source_identity(request.tags.source_identity.clone());
            for (key, value) in &request.tags.tags {
                let tag = aws_sdk_sts::types::Tag::builder()
                    .key(key)
                    .value(value)
                    .build()
                    .map_err(|e| StsError::Unavailable {
                        role: role.clone(),
                        message: format!("session tag {key}: {e}"),
                    })?;
                call = call.tags(tag);
            }
            for key in &request.tags.transitive_keys {
                call = call.transitive_tag_keys(key);
            }
            let result = call.send().await;
            let output = match result {
                Ok(output) => output,
                Err(SdkError::ServiceError(e)) => {
                    let status = e.raw().status().as_u16();
                    let err = e.into_err();
                    let code = err.code().unwrap_or("Unknown").to_owned();
                    let message = err.message().unwrap_or("").to_owned();
                    return Err(match code.as_str() {
                        "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => {
                            StsError::Throttled { role, message }
                        }
                        _ if status >= 500 => StsError::Unavailable {
                            role,
                            message: format!("{code}: {message}"),
                        },
                        _ => {
                            // What STS says names the action the node's role is not allowed;
                            // say which flag asked for it.
                            let message = match request.tags.denial_hint(&role) {
                                Some(hint) if code == "AccessDenied" => {
                                    format!("{message}; {hint}")
                                }
                                _ => message,
                            };
                            StsError::Denied {
                                role,
                                code,
                                message,
                            }
                        }
                    });
                }
                Err(e) => {
                    let message = crate::error_chain(&e);
                    return Err(StsError::Unavailable { role, message });
                }
            };
            let creds = output.credentials.ok_or_else(|| StsError::Unavailable {
                role: role.clone(),
                message: "the response carried no credentials".into(),
            })?;
            let expiration =
                SystemTime::try_from(creds.expiration).map_err(|e| StsError::Unavailable {
                    role: role.clone(),
                    message: format!("bad expiration: {e}"),
                })?;
            Ok(Credentials {
                access_key_id: creds.access_key_id,
                secret_access_key: creds.secret_access_key,
                session_token: creds.session_token,
                expiration,
                last_updated: SystemTime::now(),
            })
        })
    }
}

/// Cache behaviour.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Requested session duration.
    pub duration: Duration,
    /// Refresh when less than this is left.
    pub refresh_before: Duration,
    /// Never hand out credentials with less than this left.
    pub min_validity: Duration,
    /// First and longest backoff after an STS failure.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Concurrent prefetches; 0 turns prefetch off.
    pub prefetch_concurrency: usize,
    /// Entries unused for this long are dropped once expired.
    pub idle_eviction: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            duration: Duration::from_secs(3600),
            refresh_before: Duration::from_secs(15 * 60),
            min_validity: Duration::from_secs(60),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            prefetch_concurrency: 8,
            idle_eviction: Duration::from_secs(3600),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub refreshes: AtomicU64,
    pub prefetches: AtomicU64,
    pub sts_success: AtomicU64,
    pub sts_throttled: AtomicU64,
    pub sts_denied: AtomicU64,
    pub sts_unavailable: AtomicU64,
    pub stale_served: AtomicU64,
    /// AssumeRole latency by result.
    pub sts_duration: crate::metrics::StsDurations,
}

#[derive(Default)]
struct Slot {
    creds: Option<Arc<Issued>>,
    failure: Option<Failure>,
}

struct Failure {
    error: StsError,
    until: tokio::time::Instant,
    attempts: u32,
}

/// How stale an entry's `last_used` may be: its idle time is judged in minutes.
const LAST_USED_STEP_NS: u64 = 1_000_000;

struct Entry {
    /// Held across the STS call: the singleflight.
    slot: Mutex<Slot>,
    /// The last good credentials, readable without waiting for an in-flight call.
    snapshot: RwLock<Option<Arc<Issued>>>,
    refreshing: AtomicBool,
    /// When a request last asked, in nanoseconds since the cache's `epoch`, to within
    /// [`LAST_USED_STEP_NS`] (an atomic, not a lock the runtime's threads would queue on).
    last_used: AtomicU64,
    session_name: String,
    /// Set when the cache drops the entry, for those that hold it ([`Held`]).
    evicted: AtomicBool,
    /// Moves each time new credentials replace `snapshot` (after they do).
    version: AtomicU64,
}

/// A cache entry held between requests (one connection's, see the metadata server): good while
/// the cache keeps the entry, which [`Held::is_current`] tells.
#[derive(Clone)]
pub struct Held(Arc<Entry>);

impl Held {
    pub fn is_current(&self) -> bool {
        !self.0.evicted.load(Ordering::Acquire)
    }

    /// The entry's version, read before the credentials are got from it, for
    /// [`CredentialCache::reuse`].
    pub fn version(&self) -> u64 {
        self.0.version.load(Ordering::Acquire)
    }
}

/// The credential cache.
pub struct CredentialCache {
    sts: Arc<dyn Sts>,
    settings: CacheSettings,
    entries: RwLock<HashMap<CacheKey, Arc<Entry>>>,
    /// What the entries' `last_used` count from.
    epoch: tokio::time::Instant,
    prefetch: Arc<Semaphore>,
    pub stats: CacheStats,
}

fn remaining(creds: &Credentials) -> Duration {
    creds
        .expiration
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

impl CredentialCache {
    pub fn new(sts: Arc<dyn Sts>, settings: CacheSettings) -> Arc<Self> {
        Arc::new(CredentialCache {
            prefetch: Arc::new(Semaphore::new(settings.prefetch_concurrency.max(1))),
            sts,
            settings,
            entries: RwLock::default(),
            epoch: tokio::time::Instant::now(),
            stats: CacheStats::default(),
        })
    }

    fn entry(&self, key: &CacheKey, session_name: &str) -> Arc<Entry> {
        if let Some(entry) = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return entry.clone();
        }
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    slot: Mutex::default(),
                    snapshot: RwLock::default(),
                    refreshing: AtomicBool::new(false),
                    last_used: AtomicU64::new(self.since_epoch(tokio::time::Instant::now())),
                    session_name: session_name.to_owned(),
                    evicted: AtomicBool::new(false),
                    version: AtomicU64::new(0),
                })
            })
            .clone()
    }

    fn since_epoch(&self, at: tokio::time::Instant) -> u64 {
        u64::try_from(at.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long nothing has asked for `entry`, at `now`.
    fn idle(&self, entry: &Entry, now: tokio::time::Instant) -> Duration {
        let last = Duration::from_nanos(entry.last_used.load(Ordering::Relaxed));
        now.duration_since(self.epoch).saturating_sub(last)
    }

    fn fresh(&self, creds: &Credentials) -> bool {
        remaining(creds) > self.settings.refresh_before
    }

    fn valid(&self, creds: &Credentials) -> bool {
        remaining(creds) > self.settings.min_validity
    }

    /// Credentials for `key`, from the cache or STS (the server holds its entries instead:
    /// [`CredentialCache::hold`], then [`CredentialCache::cached`] and
    /// [`CredentialCache::fetch_missing`]).
    #[cfg(test)]
    pub async fn get(
        self: &Arc<Self>,
        key: &CacheKey,
        session_name: &str,
    ) -> Result<Arc<Issued>, StsError> {
        self.get_from(key, &self.hold(key, session_name)).await
    }

    /// The entry of `key` (made if missing), to hold on to between requests.
    pub fn hold(&self, key: &CacheKey, session_name: &str) -> Held {
        Held(self.entry(key, session_name))
    }

    /// [`CredentialCache::get`] from the entry [`CredentialCache::hold`] gave for `key`.
    #[cfg(test)]
    pub async fn get_from(
        self: &Arc<Self>,
        key: &CacheKey,
        held: &Held,
    ) -> Result<Arc<Issued>, StsError> {
        match self.cached(key, held) {
            Some(creds) => Ok(creds),
            None => self.fetch_missing(key, held).await,
        }
    }

    /// The entry's credentials while they are valid, without waiting (counted as a hit; past
    /// their refresh time, refreshed in the background too), else `None`.
    pub fn cached(self: &Arc<Self>, key: &CacheKey, held: &Held) -> Option<Arc<Issued>> {
        let entry = &held.0;
        self.touch(entry);
        let creds = entry
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        if self.fresh(&creds) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Some(creds);
        }
        if self.valid(&creds) {
            // Refresh ahead in the background; this request is served now.
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            self.spawn_refresh(key.clone(), entry.clone(), false);
            return Some(creds);
        }
        None
    }

    /// After [`CredentialCache::cached`] had nothing: a miss, fetched from STS (one call for
    /// every request waiting on the entry; during a failure's backoff, none, and the error or
    /// still-valid credentials are given).
    pub async fn fetch_missing(
        &self,
        key: &CacheKey,
        held: &Held,
    ) -> Result<Arc<Issued>, StsError> {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        self.fetch(key, &held.0).await
    }

    /// Whether `creds`, got from `held` ([`CredentialCache::cached`] or
    /// [`CredentialCache::fetch_missing`]) when its version was `version`, are what `cached`
    /// would give now: the entry is still the cache's, no credentials replaced them since, and
    /// they are fresh. Counted as the cache hit `cached` would count. A connection serving its
    /// pod again asks this instead of reading the entry, whose lock and counts every
    /// connection of the pod shares.
    pub fn reuse(&self, held: &Held, version: u64, creds: &Issued) -> bool {
        if !held.is_current() || held.version() != version || !self.fresh(creds) {
            return false;
        }
        self.touch(&held.0);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Notes that a request asked for `entry` now. Written at most once a millisecond: a store
    /// per request would move the entry's cache line between the runtime's threads on every
    /// request.
    fn touch(&self, entry: &Entry) {
        let now = self.since_epoch(tokio::time::Instant::now());
        if now.saturating_sub(entry.last_used.load(Ordering::Relaxed)) >= LAST_USED_STEP_NS {
            entry.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Starts fetching credentials for a pod that just appeared, if not cached.
    pub fn prefetch(self: &Arc<Self>, key: CacheKey, session_name: &str) {
        if self.settings.prefetch_concurrency == 0 {
            return;
        }
        let entry = self.entry(&key, session_name);
        let cached = entry
            .snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if cached.is_some_and(|c| self.fresh(&c)) {
            return;
        }
        self.spawn_refresh(key, entry, true);
    }

    fn spawn_refresh(self: &Arc<Self>, key: CacheKey, entry: Arc<Entry>, prefetch: bool) {
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            let _permit = if prefetch {
                cache.prefetch.clone().acquire_owned().await.ok()
            } else {
                None
            };
            let counter = if prefetch {
                &cache.stats.prefetches
            } else {
                &cache.stats.refreshes
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = cache.fetch(&key, &entry).await {
                tracing::warn!(role = &*key.role_arn, "{error}");
            }
            entry.refreshing.store(false, Ordering::Release);
        });
    }

    async fn fetch(&self, key: &CacheKey, entry: &Entry) -> Result<Arc<Issued>, StsError> {
        let mut slot = entry.slot.lock().await;
        // Whoever held the lock before us may have fetched them.
        if let Some(creds) = slot.creds.as_ref().filter(|c| self.fresh(c)) {
            return Ok(creds.clone());
        }
        if let Some(failure) = &slot.failure
            && tokio::time::Instant::now() < failure.until
        {
            return self.fallback(&slot, failure.error.clone());
        }
        let request = AssumeRequest {
            role_arn: key.role_arn.to_string(),
            external_id: key.external_id.clone(),
            session_name: entry.session_name.clone(),
            duration: self.settings.duration,
            tags: key.tags.clone(),
        };
        let started = std::time::Instant::now();
        let result = self.sts.assume_role(request).await;
        let elapsed = started.elapsed();
        self.stats.sts_duration.observe(
            result
                .as_ref()
                .map_or_else(StsError::result, |_| StsResult::Success),
            elapsed,
        );
        match result {
            Ok(creds) => {
                let creds = Issued::new(creds);
                self.stats.sts_success.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(role = &*key.role_arn, ?elapsed, "AssumeRole succeeded");
                slot.creds = Some(creds.clone());
                slot.failure = None;
                *entry.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some(creds.clone());
                entry.version.fetch_add(1, Ordering::Release);
                Ok(creds)
            }
            Err(error) => {
                match &error {
                    StsError::Throttled { .. } => &self.stats.sts_throttled,
                    StsError::Denied { .. } => &self.stats.sts_denied,
                    StsError::Unavailable { .. } => &self.stats.sts_unavailable,
                }
                .fetch_add(1, Ordering::Relaxed);
                let attempts = slot.failure.as_ref().map_or(0, |f| f.attempts) + 1;
                let backoff = self
                    .settings
                    .backoff_min
                    .saturating_mul(1 << (attempts - 1).min(16))
                    .min(self.settings.backoff_max);
                tracing::warn!(role = &*key.role_arn, ?backoff, ?elapsed, "{error}");
                slot.failure = Some(Failure {
                    error: error.clone(),
                    until: tokio::time::Instant::now() + backoff,
                    attempts,
                });
                self.fallback(&slot, error)
            }
        }
    }

    /// After a failure: the cached credentials while they are valid, else the error.
    fn fallback(&self, slot: &Slot, error: StsError) -> Result<Arc<Issued>, StsError> {
        match slot.creds.as_ref().filter(|c| self.valid(c)) {
            Some(creds) => {
                self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                Ok(creds.clone())
            }
            None => Err(error),
        }
    }

    /// Drops entries that are expired and unused for `idle_eviction` (deleted pods' sessions).
    pub fn evict_idle(&self) -> usize {
        let now = tokio::time::Instant::now();
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let before = entries.len();
        entries.retain(|_, e| {
            let idle = self.idle(e, now) > self.settings.idle_eviction;
            let expired = !e
                .snapshot
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|c| self.valid(c));
            let keep = !(idle && expired);
            e.evicted.store(!keep, Ordering::Release);
            keep
        });
        before - entries.len()
    }

    /// Drops the entries of keys no pod uses any more — `in_use` holds the key of every pod on
    /// the node, as its annotations are now — once nothing has asked for them for `grace`.
    /// Without this, each change of a pod's role or external-ID annotation would leave an entry
    /// (and its refreshes) behind until it expired unused.
    pub fn evict_unused(&self, in_use: &HashSet<CacheKey>, grace: Duration) -> usize {
        let now = tokio::time::Instant::now();
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let before = entries.len();
        entries.retain(|key, e| {
            let keep = in_use.contains(key) || self.idle(e, now) < grace;
            e.evicted.store(!keep, Ordering::Release);
            keep
        });
        before - entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long an entry no pod uses is kept after it was last asked for: covers a pod whose
/// annotation changed between a request and the eviction pass.
pub const UNUSED_GRACE: Duration = Duration::from_secs(120);
/// Prefetches one pod can start by changing its annotations within [`PREFETCH_WINDOW`].
pub const PREFETCHES_PER_POD: u32 = 3;
pub const PREFETCH_WINDOW: Duration = Duration::from_secs(600);

/// Whether a pod's prefetch may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over the pod's budget; `first` on the first refusal in the window (log it once).
    Limited {
        first: bool,
    },
}

/// Bounds the prefetches one pod can start by changing what it asks for (its role and
/// external-ID annotations, `T`): the first value seen and each change count, at most
/// `per_pod` in `window`; updates that change nothing else (status, labels) are free once their
/// value was admitted. A pod that keeps changing its annotations still gets credentials when it
/// asks for them — on demand, for its current role only.
pub struct PrefetchLimiter<T> {
    per_pod: u32,
    window: Duration,
    pods: std::sync::Mutex<HashMap<String, PodPrefetches<T>>>,
}

struct PodPrefetches<T> {
    wanted: T,
    /// Whether `wanted` was admitted (an unchanged value is then free).
    admitted: bool,
    window_start: Instant,
    count: u32,
    warned: bool,
}

impl<T: PartialEq + Clone> PrefetchLimiter<T> {
    pub fn new(per_pod: u32, window: Duration) -> Self {
        PrefetchLimiter {
            per_pod,
            window,
            pods: std::sync::Mutex::default(),
        }
    }

    /// Whether pod `uid`, which now wants `wanted`, may start a prefetch at `now`.
    pub fn admit(&self, uid: &str, wanted: &T, now: Instant) -> Admission {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let pod = pods.entry(uid.to_owned()).or_insert_with(|| PodPrefetches {
            wanted: wanted.clone(),
            admitted: false,
            window_start: now,
            count: 0,
            warned: false,
        });
        if pod.wanted == *wanted && pod.admitted {
            return Admission::Admitted;
        }
        if now.saturating_duration_since(pod.window_start) >= self.window {
            pod.window_start = now;
            pod.count = 0;
            pod.warned = false;
        }
        pod.wanted = wanted.clone();
        if pod.count < self.per_pod {
            pod.count += 1;
            pod.admitted = true;
            Admission::Admitted
        } else {
            pod.admitted = false;
            let first = !pod.warned;
            pod.warned = true;
            Admission::Limited { first }
        }
    }

    /// Forgets pods whose window ended at least a window ago (deleted pods, and live pods whose
    /// budget would be full again anyway).
    pub fn prune(&self, now: Instant) -> usize {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let before = pods.len();
        pods.retain(|_, pod| now.saturating_duration_since(pod.window_start) < self.window * 2);
        before - pods.len()
    }

    pub fn len(&self) -> usize {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Formats a time as IMDS does: RFC 3339 UTC with seconds, `2026-11-26T19:00:00Z`.
pub fn imds_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm), for 1970 onwards.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A scripted STS: counts calls, answers from a queue or with fresh credentials.
    struct FakeSts {
        calls: AtomicUsize,
        delay: Duration,
        lifetime: Duration,
        fail: std::sync::Mutex<Vec<StsError>>,
    }

    impl FakeSts {
        fn new(delay: Duration, lifetime: Duration) -> Arc<Self> {
            Arc::new(FakeSts {
                calls: AtomicUsize::new(0),
                delay,
                lifetime,
                fail: Default::default(),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
        fn fail_next(&self, errors: Vec<StsError>) {
            *self.fail.lock().unwrap() = errors;
        }
    }

    impl Sts for FakeSts {
        fn assume_role(
            &self,
            request: AssumeRequest,
        ) -> BoxFuture<'static, Result<Credentials, StsError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = self.delay;
            let lifetime = self.lifetime;
            let failure = {
                let mut fail = self.fail.lock().unwrap();
                (!fail.is_empty()).then(|| fail.remove(0))
            };
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if let Some(error) = failure {
                    return Err(error);
                }
                Ok(Credentials {
                    access_key_id: format!("ASIA{n}-{}", request.session_name),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration: SystemTime::now() + lifetime,
                    last_updated: SystemTime::now(),
                })
            })
        }
    }

    fn key(role: &str) -> CacheKey {
        CacheKey {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}").into(),
            external_id: None,
            session: Session::Node,
            tags: SessionTags::default(),
        }
    }

    fn throttled() -> StsError {
        StsError::Throttled {
            role: "r".into(),
            message: "Rate exceeded".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_call() {
        let sts = FakeSts::new(Duration::from_millis(50), Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&key("web"), "kube2iam-node").await })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().access_key_id.clone());
        }
        assert_eq!(sts.calls(), 1);
        assert_eq!(ids.len(), 1);
        assert_eq!(cache.stats.sts_success.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn keys_are_separate_per_role_external_id_and_pod() {
        let sts = FakeSts::new(Duration::ZERO, Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        cache.get(&key("a"), "s").await.unwrap();
        cache.get(&key("b"), "s").await.unwrap();
        let mut with_ext = key("a");
        with_ext.external_id = Some("ext".into());
        cache.get(&with_ext, "s").await.unwrap();
        let mut per_pod = key("a");
        per_pod.session = Session::Pod { uid: "u1".into() };
        cache.get(&per_pod, "default.web").await.unwrap();
        cache.get(&key("a"), "s").await.unwrap();
        assert_eq!(sts.calls(), 4);
    }

    #[tokio::test]
    async fn session_tags_are_part_of_the_key_and_reach_the_request() {
        struct Recording(std::sync::Mutex<Vec<AssumeRequest>>);
        impl Sts for Recording {
            fn assume_role(
                &self,
                request: AssumeRequest,
            ) -> BoxFuture<'static, Result<Credentials, StsError>> {
                self.0.lock().unwrap().push(request.clone());
                Box::pin(async move {
                    Ok(Credentials {
                        access_key_id: format!("ASIA-{}", request.tags.tags.len()),
                        secret_access_key: "secret".into(),
                        session_token: "token".into(),
                        expiration: SystemTime::now() + Duration::from_secs(3600),
                        last_updated: SystemTime::now(),
                    })
                })
            }
        }
        let sts = Arc::new(Recording(Default::default()));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        let tagged = |account: &str| {
            let mut k = key("web");
            k.tags = SessionTags {
                tags: vec![("kubernetes-service-account".into(), account.into())],
                transitive_keys: vec!["kubernetes-service-account".into()],
                source_identity: None,
            };
            k
        };
        cache.get(&tagged("billing"), "s").await.unwrap();
        cache.get(&tagged("billing"), "s").await.unwrap();
        cache.get(&tagged("reports"), "s").await.unwrap();
        cache.get(&key("web"), "s").await.unwrap();
        let requests = sts.0.lock().unwrap();
        assert_eq!(requests.len(), 3, "one session per tag set");
        assert_eq!(requests[0].tags, tagged("billing").tags);
        assert_eq!(requests[1].tags, tagged("reports").tags);
        assert!(requests[2].tags.is_empty());
    }

    #[tokio::test]
    async fn refresh_happens_ahead_of_expiry_in_the_background() {
        // Lifetime 10 min < refresh_before 15 min: every hit triggers a background refresh while
        // the cached (still valid) credentials are served.
        let sts = FakeSts::new(Duration::from_millis(20), Duration::from_secs(600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        let first = cache.get(&key("web"), "s").await.unwrap();
        let second = cache.get(&key("web"), "s").await.unwrap();
        assert_eq!(first, second, "served from cache while refreshing");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sts.calls(), 2);
        assert_eq!(cache.stats.refreshes.load(Ordering::Relaxed), 1);
        let third = cache.get(&key("web"), "s").await.unwrap();
        assert_ne!(
            third.access_key_id, first.access_key_id,
            "the refreshed credentials"
        );
    }

    #[tokio::test]
    async fn failures_serve_valid_cached_credentials_then_the_error() {
        let settings = CacheSettings {
            refresh_before: Duration::from_secs(3600),
            min_validity: Duration::from_millis(300),
            ..CacheSettings::default()
        };
        let sts = FakeSts::new(Duration::ZERO, Duration::from_millis(1500));
        let cache = CredentialCache::new(sts.clone(), settings);
        let good = cache.get(&key("web"), "s").await.unwrap();
        sts.fail_next(vec![throttled(), throttled(), throttled(), throttled()]);
        // STS fails, but the cached credentials are valid: served.
        let served = cache
            .fetch(&key("web"), &cache.entry(&key("web"), "s"))
            .await
            .unwrap();
        assert_eq!(served, good);
        assert!(cache.stats.stale_served.load(Ordering::Relaxed) >= 1);
        // Past validity: a clear error, and the negative cache holds further calls back.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let calls = sts.calls();
        let err = cache.get(&key("web"), "s").await.unwrap_err();
        assert_eq!(err.kind(), "throttled");
        let err2 = cache.get(&key("web"), "s").await.unwrap_err();
        assert_eq!(err2, err);
        assert!(
            sts.calls() <= calls + 1,
            "backoff keeps STS from being hammered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_exponentially_per_key() {
        let settings = CacheSettings {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            ..CacheSettings::default()
        };
        let sts = FakeSts::new(Duration::ZERO, Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), settings);
        sts.fail_next(vec![throttled(); 10]);
        let mut calls_at = Vec::new();
        for _ in 0..40 {
            let _ = cache.get(&key("web"), "s").await;
            calls_at.push(sts.calls());
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        // Calls at t = 0, 1, 3, 7, 15 s (backoff 1, 2, 4, 8) within 20 s: 5 calls, not 40.
        assert_eq!(sts.calls(), 5, "{calls_at:?}");
        // Another key is not held back by this one's backoff.
        sts.fail_next(vec![]);
        assert!(cache.get(&key("other"), "s").await.is_ok());
    }

    /// A holder serves what it got again only while `get_from` would give the same from the
    /// cache: not with a version read before newer credentials were stored, not once they are
    /// due for refresh, not after the entry is evicted. Each reuse counts a hit.
    #[tokio::test(start_paused = true)]
    async fn reuse_holds_only_while_the_entry_would_give_the_same() {
        let settings = CacheSettings {
            // Fresh for 300 ms of wall time after they are issued.
            refresh_before: Duration::from_secs(3600) - Duration::from_millis(300),
            ..CacheSettings::default()
        };
        let sts = FakeSts::new(Duration::ZERO, Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), settings);
        let k = key("web");
        let held = cache.hold(&k, "s");
        let before = held.version();
        let first = cache.get_from(&k, &held).await.unwrap();
        assert!(
            !cache.reuse(&held, before, &first),
            "read before the credentials were stored"
        );
        let version = held.version();
        let got = cache.get_from(&k, &held).await.unwrap();
        assert_eq!(got, first);
        let hits = cache.stats.hits.load(Ordering::Relaxed);
        assert!(cache.reuse(&held, version, &got));
        assert!(cache.reuse(&held, version, &got));
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), hits + 2);
        // Due for refresh: asked of the entry again, which refreshes them.
        std::thread::sleep(Duration::from_millis(400));
        assert!(!cache.reuse(&held, version, &got));
        let version = held.version();
        cache.get_from(&k, &held).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sts.calls(), 2, "refreshed in the background");
        let refreshed = cache.get_from(&k, &held).await.unwrap();
        assert_ne!(refreshed, got);
        assert!(
            !cache.reuse(&held, version, &refreshed),
            "the refresh stored newer credentials after that version"
        );
        let version = held.version();
        assert!(cache.reuse(&held, version, &refreshed));
        // Evicted: held no longer.
        tokio::time::advance(UNUSED_GRACE + Duration::from_secs(1)).await;
        assert_eq!(cache.evict_unused(&HashSet::new(), UNUSED_GRACE), 1);
        assert!(!cache.reuse(&held, version, &refreshed));
    }

    #[tokio::test]
    async fn prefetch_fills_the_cache_once() {
        let sts = FakeSts::new(Duration::from_millis(10), Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        cache.prefetch(key("web"), "s");
        cache.prefetch(key("web"), "s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sts.calls(), 1);
        cache.get(&key("web"), "s").await.unwrap();
        assert_eq!(sts.calls(), 1);
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1);
        cache.prefetch(key("web"), "s");
        assert_eq!(sts.calls(), 1, "fresh entries are not prefetched again");
    }

    /// Issue 11: each annotation change left an entry (and its refreshes) for an hour.
    #[tokio::test(start_paused = true)]
    async fn entries_no_pod_uses_are_evicted() {
        let sts = FakeSts::new(Duration::ZERO, Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        for n in 0..20 {
            cache.get(&key(&format!("churn-{n}")), "s").await.unwrap();
        }
        cache.get(&key("current"), "s").await.unwrap();
        assert_eq!(cache.len(), 21);
        let in_use: HashSet<CacheKey> = [key("current")].into();
        assert_eq!(
            cache.evict_unused(&in_use, UNUSED_GRACE),
            0,
            "entries asked for within the grace period stay"
        );
        tokio::time::advance(UNUSED_GRACE + Duration::from_secs(1)).await;
        assert_eq!(cache.evict_unused(&in_use, UNUSED_GRACE), 20);
        assert_eq!(cache.len(), 1);
        // The entry in use stays even when idle, and is still served from the cache.
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(cache.evict_unused(&in_use, UNUSED_GRACE), 0);
        let calls = sts.calls();
        cache.get(&key("current"), "s").await.unwrap();
        assert_eq!(sts.calls(), calls, "a cache hit");
        // The idle-expiry eviction alone would have kept the churned entries: still valid.
        let fresh = CredentialCache::new(sts.clone(), CacheSettings::default());
        fresh.get(&key("old"), "s").await.unwrap();
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(fresh.evict_idle(), 0);
        assert_eq!(fresh.evict_unused(&in_use, UNUSED_GRACE), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn prefetched_entries_no_pod_uses_are_evicted() {
        let sts = FakeSts::new(Duration::ZERO, Duration::from_secs(3600));
        let cache = CredentialCache::new(sts.clone(), CacheSettings::default());
        cache.prefetch(key("before"), "s");
        cache.prefetch(key("after"), "s");
        tokio::time::advance(Duration::from_millis(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(cache.len(), 2);
        tokio::time::advance(UNUSED_GRACE + Duration::from_secs(1)).await;
        let in_use: HashSet<CacheKey> = [key("after")].into();
        assert_eq!(cache.evict_unused(&in_use, UNUSED_GRACE), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn annotation_churn_is_limited_per_pod() {
        let limiter = PrefetchLimiter::new(3, Duration::from_secs(600));
        let t0 = Instant::now();
        let mut admitted = 0;
        let mut first_refusals = 0;
        for n in 0..50 {
            match limiter.admit("uid-a", &format!("role-{n}"), t0 + Duration::from_secs(n)) {
                Admission::Admitted => admitted += 1,
                Admission::Limited { first } => first_refusals += u32::from(first),
            }
        }
        assert_eq!(admitted, 3, "the first value and two changes");
        assert_eq!(first_refusals, 1, "one warning per window");
        // Another pod has its own budget.
        assert_eq!(
            limiter.admit("uid-b", &"role-0".to_owned(), t0),
            Admission::Admitted
        );
    }

    #[test]
    fn updates_that_change_no_annotation_do_not_count() {
        let limiter = PrefetchLimiter::new(2, Duration::from_secs(600));
        let t0 = Instant::now();
        let role = "web".to_owned();
        for n in 0..100 {
            assert_eq!(
                limiter.admit("uid-a", &role, t0 + Duration::from_secs(n)),
                Admission::Admitted
            );
        }
        assert_eq!(
            limiter.admit("uid-a", &"api".to_owned(), t0),
            Admission::Admitted
        );
        assert!(matches!(
            limiter.admit("uid-a", &"batch".to_owned(), t0),
            Admission::Limited { .. }
        ));
        // A refused value stays refused on later updates (a label change cannot launder it)…
        assert!(matches!(
            limiter.admit("uid-a", &"batch".to_owned(), t0 + Duration::from_secs(1)),
            Admission::Limited { first: false }
        ));
        // …until the window has passed.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(
            limiter.admit("uid-a", &"batch".to_owned(), later),
            Admission::Admitted
        );
        assert_eq!(
            limiter.admit("uid-a", &"batch".to_owned(), later),
            Admission::Admitted
        );
    }

    #[test]
    fn the_limiter_forgets_pods_after_two_windows() {
        let limiter = PrefetchLimiter::new(1, Duration::from_secs(600));
        let t0 = Instant::now();
        for n in 0..10 {
            limiter.admit(&format!("uid-{n}"), &"web".to_owned(), t0);
        }
        assert_eq!(limiter.prune(t0 + Duration::from_secs(1199)), 0);
        assert_eq!(limiter.prune(t0 + Duration::from_secs(1200)), 10);
        assert!(limiter.is_empty());
    }

    #[test]
    fn imds_time_format() {
        assert_eq!(imds_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_687_200 + 3661);
        assert_eq!(imds_time(t), "2026-11-26T11:01:01Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(imds_time(leap), "2000-02-29T00:00:00Z");
    }
}
