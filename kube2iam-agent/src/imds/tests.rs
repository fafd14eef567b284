//! The answer a kept connection gets at once ([`State::answer_at_once`]) is the one
//! [`State::answer`] gives, and it is given only when nothing the answer came from changed.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures::future::BoxFuture;
use http_body_util::BodyExt as _;
use hyper::{Method, StatusCode};

use super::{
    Conn, Head, State, Target, TokenCheck, TokenMode,
    header_clock::HeaderClock,
    path,
    usage::tests::{pod, state},
};
use crate::{
    attest::{Caller, Mode},
    credentials::{AssumeRequest, CacheSettings, CredentialCache, Credentials, Sts, StsError},
    identity::Annotation,
};

/// Fresh credentials for every call, numbered.
struct CountingSts(std::sync::atomic::AtomicUsize);

impl Sts for CountingSts {
    fn assume_role(
        &self,
        request: AssumeRequest,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Box::pin(async move {
            Ok(Credentials {
                access_key_id: format!("ASIA{n}-{}", request.session_name),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: SystemTime::now() + Duration::from_secs(3600),
                last_updated: SystemTime::now(),
            })
        })
    }
}

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

fn serving(tokens: TokenMode) -> Arc<State> {
    let mut state = state(false, None);
    state.config.decision.attestation = Mode::Off;
    state.config.tokens = tokens;
    state.cache = CredentialCache::new(
        Arc::new(CountingSts(Default::default())),
        CacheSettings::default(),
    );
    let web = pod("u1", Annotation::Value("web".into()), Annotation::Absent);
    assert!(state.registry.apply(&web, &[PEER]).is_empty());
    Arc::new(state)
}

fn conn(state: &Arc<State>) -> Conn {
    Conn {
        state: state.clone(),
        caller: Caller::NotChecked,
        peer: PEER,
        remembered: Mutex::new(None),
        headers: HeaderClock::new(tokio::time::Instant::now()),
    }
}

fn get(state: &State, method: Method, path: &str, token: TokenCheck) -> Head {
    let normalized = path::normalize(path).unwrap();
    let route = path::route(&method, &normalized, &state.config.rules);
    Head {
        method,
        target: Target::Route { normalized, route },
        sent_path: None,
        oversized: None,
        token,
        ttl: None,
        forwarded: false,
        accept: None,
    }
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/web";

async fn body(
    response: hyper::Response<http_body_util::Full<bytes::Bytes>>,
) -> (StatusCode, Vec<u8>) {
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

async fn answer(state: &State, conn: &Conn, head: Head) -> (StatusCode, Vec<u8>) {
    body(state.answer(head, Instant::now(), conn).await).await
}

async fn at_once(state: &State, conn: &Conn, head: &Head) -> Option<(StatusCode, Vec<u8>)> {
    match state.answer_at_once(head, Instant::now(), conn) {
        Some(response) => Some(body(response).await),
        None => None,
    }
}

#[tokio::test]
async fn a_kept_connection_gets_at_once_what_answer_gives_and_nothing_else() {
    let state = serving(TokenMode::Optional);
    let conn = conn(&state);
    let creds = || get(&state, Method::GET, CREDS, TokenCheck::Missing);
    assert!(
        at_once(&state, &conn, &creds()).await.is_none(),
        "nothing served on the connection yet"
    );
    // The first answer fetches them from STS (stored after the version it read); the second
    // is the cache's.
    let first = answer(&state, &conn, creds()).await;
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(answer(&state, &conn, creds()).await, first);
    let hits = state
        .cache
        .stats
        .hits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(at_once(&state, &conn, &creds()).await, Some(first.clone()));
    let head = get(&state, Method::HEAD, CREDS, TokenCheck::Missing);
    assert_eq!(
        at_once(&state, &conn, &head).await.map(|a| a.0),
        Some(StatusCode::OK)
    );
    assert_eq!(
        state
            .cache
            .stats
            .hits
            .load(std::sync::atomic::Ordering::Relaxed),
        hits + 2,
        "each counted as a cache hit"
    );
    // Another role's name, another route, another method: left to answer.
    let other = get(
        &state,
        Method::GET,
        "/latest/meta-data/iam/security-credentials/admin",
        TokenCheck::Missing,
    );
    assert!(at_once(&state, &conn, &other).await.is_none());
    assert_eq!(answer(&state, &conn, other).await.0, StatusCode::NOT_FOUND);
    let listing = get(
        &state,
        Method::GET,
        "/latest/meta-data/iam/security-credentials/",
        TokenCheck::Missing,
    );
    assert!(at_once(&state, &conn, &listing).await.is_none());
    let post = get(&state, Method::POST, CREDS, TokenCheck::Missing);
    assert!(at_once(&state, &conn, &post).await.is_none());
    assert_eq!(
        answer(&state, &conn, post).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // Still kept after those.
    assert_eq!(at_once(&state, &conn, &creds()).await, Some(first.clone()));

    // The pod's role changes: the registry's count moves, and the next request is decided
    // afresh (and refused: the pod no longer has the role it asks for).
    let changed = pod("u1", Annotation::Value("batch".into()), Annotation::Absent);
    assert!(state.registry.apply(&changed, &[PEER]).is_empty());
    assert!(at_once(&state, &conn, &creds()).await.is_none());
    assert_eq!(
        answer(&state, &conn, creds()).await.0,
        StatusCode::NOT_FOUND
    );
    let batch = || {
        get(
            &state,
            Method::GET,
            "/latest/meta-data/iam/security-credentials/batch",
            TokenCheck::Missing,
        )
    };
    let served = answer(&state, &conn, batch()).await;
    assert_eq!(served.0, StatusCode::OK);
    assert_eq!(answer(&state, &conn, batch()).await, served);
    assert_ne!(served.1, first.1, "the new role's credentials");
    assert_eq!(at_once(&state, &conn, &batch()).await, Some(served));

    // Evicted from the cache: asked of the cache again.
    state
        .cache
        .evict_unused(&Default::default(), Duration::ZERO);
    assert!(at_once(&state, &conn, &batch()).await.is_none());
}

#[tokio::test]
async fn a_request_without_the_token_the_agent_requires_is_never_answered_at_once() {
    let state = serving(TokenMode::Required);
    let conn = conn(&state);
    let with = || get(&state, Method::GET, CREDS, TokenCheck::Valid);
    assert_eq!(answer(&state, &conn, with()).await.0, StatusCode::OK);
    assert_eq!(answer(&state, &conn, with()).await.0, StatusCode::OK);
    assert!(at_once(&state, &conn, &with()).await.is_some());
    let without = get(&state, Method::GET, CREDS, TokenCheck::Missing);
    assert!(at_once(&state, &conn, &without).await.is_none());
    assert_eq!(
        answer(&state, &conn, without).await.0,
        StatusCode::UNAUTHORIZED
    );
    let rejected = get(
        &state,
        Method::GET,
        CREDS,
        TokenCheck::Rejected(super::token::Invalid::Expired),
    );
    assert!(at_once(&state, &conn, &rejected).await.is_none());
}
/// credentials another connection's request replaced (a refresh ahead of expiry) are
/// never served again at once; an oversized request is never answered at once.
#[tokio::test]
async fn replaced_credentials_and_oversized_requests_are_not_served_at_once() {
    let mut state = state(false, None);
    state.config.decision.attestation = Mode::Off;
    state.cache = CredentialCache::new(
        Arc::new(CountingSts(Default::default())),
        CacheSettings {
            // Fresh for 300 ms after they are issued.
            refresh_before: Duration::from_secs(3600) - Duration::from_millis(300),
            ..CacheSettings::default()
        },
    );
    let web = pod("u1", Annotation::Value("web".into()), Annotation::Absent);
    assert!(state.registry.apply(&web, &[PEER]).is_empty());
    let state = Arc::new(state);
    let (one, two) = (conn(&state), conn(&state));
    let creds = || get(&state, Method::GET, CREDS, TokenCheck::Missing);
    let x = answer(&state, &one, creds()).await;
    assert_eq!(answer(&state, &one, creds()).await, x);
    assert_eq!(at_once(&state, &one, &creds()).await, Some(x.clone()));

    let mut big = creds();
    big.oversized = Some("5000 bytes".into());
    assert!(at_once(&state, &one, &big).await.is_none());
    assert_eq!(
        answer(&state, &one, big).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // X is due for refresh: the other connection is served X and starts the refresh, which
    // stores Y (fresh again, 300 ms).
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(answer(&state, &two, creds()).await, x);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let y = answer(&state, &two, creds()).await;
    assert_ne!(y, x, "refreshed");
    // The first connection, kept since X: not at once, and then Y.
    assert!(at_once(&state, &one, &creds()).await.is_none());
    assert_eq!(answer(&state, &one, creds()).await, y);
    assert_eq!(at_once(&state, &one, &creds()).await, Some(y));
}

/// a registry change racing a kept connection's requests. Each request answered at
/// once must have started before the change that made it wrong was counted: once `apply`
/// returned, no request started afterwards is answered at once with the old role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_started_after_a_role_change_is_answered_at_once() {
    let state = serving(TokenMode::Optional);
    let conn = conn(&state);
    let creds = || get(&state, Method::GET, CREDS, TokenCheck::Missing);
    for round in 0..200 {
        let role = if round % 2 == 0 { "web" } else { "other" };
        // Bring the connection to answering at once (when its role is web).
        let _ = answer(&state, &conn, creds()).await;
        let _ = answer(&state, &conn, creds()).await;
        let state2 = state.clone();
        let changer = std::thread::spawn(move || {
            let flip = if round % 2 == 0 { "other" } else { "web" };
            let q = pod("u1", Annotation::Value(flip.into()), Annotation::Absent);
            assert!(state2.registry.apply(&q, &[PEER]).is_empty());
        });
        let mut served_after = false;
        let mut done = false;
        while !done {
            done = changer.is_finished();
            let got = at_once(&state, &conn, &creds()).await;
            // A request started after apply returned (done seen before it started).
            if done && got.is_some() {
                served_after = true;
            }
        }
        changer.join().unwrap();
        assert!(
            !served_after,
            "round {round} ({role}): served at once after the change"
        );
    }
}
