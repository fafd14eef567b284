//! Putting the agent together: interception, the pod registry and watches, STS, the metadata
//! and admin servers, and shutdown.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aws_config::BehaviorVersion;
use kube2iam_common::timeouts;

use crate::{
    admin::{self, Admin},
    attest::{self, CgroupPods, HostPodsMap},
    bpf::{
        self,
        loader::{LoadAction, Pinned},
    },
    cli::RunArgs,
    credentials::{
        Admission, CacheSettings, CredentialCache, PREFETCH_WINDOW, PREFETCHES_PER_POD,
        PrefetchLimiter, SdkSts, UNUSED_GRACE,
    },
    events::PodEvents,
    identity::Registry,
    imds::{self, State, path::PathRules, token::TokenIssuer, upstream::Upstream},
    kube::{self as k8s, Keys, Namespaces, WatchStats},
    policy::BaseArn,
    service_accounts::ServiceAccounts,
    session_tags::SessionTagging,
    status::{Readiness, Sources},
};

/// Follows interfaces coming and going: the packet guard is attached to each new pod
/// interface as the CNI creates it, and released when it goes. Every `resync` (and on any
/// interface or tc change) it also checks that the guard is still present and first on every
/// matching interface, and puts it back in front where it is not.
fn spawn_guard_watch(
    interception: Arc<std::sync::Mutex<Pinned>>,
    resync: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let events = bpf::guard::link_events().context("watch network interfaces (netlink)")?;
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open while registered.
    let events =
        unsafe { tokio::io::unix::AsyncFd::register(events) }.context("poll the netlink socket")?;
    Ok(tokio::spawn(async move {
        let mut resync = tokio::time::interval(resync);
        loop {
            tokio::select! {
                ready = events.readable() => {
                    let Ok(mut ready) = ready else { break };
                    bpf::guard::drain(std::os::fd::AsFd::as_fd(events.get_ref()));
                    ready.clear_ready();
                    // A pod's interface comes with several messages; take them in one go.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    bpf::guard::drain(std::os::fd::AsFd::as_fd(events.get_ref()));
                }
                _ = resync.tick() => {}
            }
            let result = interception
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .sync_guard();
            match result {
                Ok(Some(changes)) if !changes.is_empty() => {
                    tracing::info!(
                        attached = ?changes.attached,
                        replaced = ?changes.replaced,
                        released = ?changes.released,
                        repaired = ?changes.repaired,
                        "packet guard follows pod interfaces"
                    );
                    for (interface, error) in &changes.failed {
                        tracing::error!(interface, "packet guard: {error}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!("packet guard: {e:#}"),
            }
        }
    }))
}

/// Installs (or adopts) the programs in the loader child, logs what happened, and forwards
/// their debug events.
fn intercept(settings: &bpf::Settings) -> anyhow::Result<Pinned> {
    let interception = bpf::loader::install(settings)?;
    log_programs(&interception, settings);
    if settings.kernel_debug_log {
        spawn_kernel_log_reader(&interception)?;
    }
    Ok(interception)
}

fn log_programs(interception: &Pinned, settings: &bpf::Settings) {
    tracing::info!(
        peak_rss_kib = interception.child_peak_kib,
        elapsed_ms = interception.child_elapsed.as_millis() as u64,
        recreated_maps = ?interception.recreated_maps,
        "loader child done"
    );
    for program in &interception.programs {
        match &program.action {
            LoadAction::Skipped(why) => {
                tracing::info!(program = program.name.as_str(), "skipped: {why}")
            }
            action => tracing::info!(
                program = program.name.as_str(),
                link_id = program.link_id,
                ?action,
                "hook ready"
            ),
        }
    }
    tracing::info!(
        kernel = %interception.kernel,
        cgroup = %interception.cgroup.display(),
        pin_dir = %interception.pin_dir.display(),
        agent = %format!("{}:{}", settings.agent_ip4, settings.agent_port),
        agent_ipv6 = ?settings.agent_ip6,
        host_netns_cookie = interception.host_netns_cookie,
        "interception active"
    );
}

fn compile_rules(allow: &[String], block: &[String]) -> anyhow::Result<PathRules> {
    let compile = |flag: &str, sources: &[String]| {
        sources
            .iter()
            .map(|s| {
                regex::Regex::new(s).with_context(|| format!("{flag} {s:?} is not a valid regex"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    };
    Ok(PathRules {
        allow: compile("--allow-path", allow)?,
        block: compile("--block-path", block)?,
    })
}

/// The region for STS: flag/AWS_REGION, else the node's placement.
async fn region(args: &RunArgs, upstream: &Upstream) -> anyhow::Result<String> {
    if let Some(region) = &args.region {
        return Ok(region.clone());
    }
    upstream
        .get_text("/latest/meta-data/placement/region")
        .await
        .map_err(|e| anyhow::anyhow!("no --region or AWS_REGION, and {e}"))
}

async fn base_arn(args: &RunArgs, upstream: &Upstream) -> anyhow::Result<Option<BaseArn>> {
    if let Some(value) = &args.base_role_arn {
        return Ok(Some(BaseArn::parse(value)?));
    }
    if !args.auto_discover_base_arn {
        return Ok(None);
    }
    let info = upstream
        .get_text("/latest/meta-data/iam/info")
        .await
        .map_err(|e| anyhow::anyhow!("--auto-discover-base-arn: {e}"))?;
    let info: serde_json::Value =
        serde_json::from_str(&info).context("--auto-discover-base-arn: iam/info is not JSON")?;
    let profile = info["InstanceProfileArn"]
        .as_str()
        .context("--auto-discover-base-arn: iam/info has no InstanceProfileArn")?;
    let base = BaseArn::from_instance_profile(profile)?;
    tracing::info!(base_arn = base.as_str(), "discovered the base role ARN");
    Ok(Some(base))
}

/// The agent's own AWS configuration: the default credential chain, with IMDS read from the
/// configured upstream rather than a hard-wired address.
async fn sts_client(
    args: &RunArgs,
    region: String,
    metadata: SocketAddr,
) -> anyhow::Result<aws_sdk_sts::Client> {
    let imds = aws_config::imds::Client::builder()
        .endpoint(format!("http://{metadata}"))
        .map_err(|e| anyhow::anyhow!("IMDS endpoint http://{metadata}: {e}"))?
        .build();
    let region = aws_config::Region::new(region);
    let credentials = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(region.clone())
        .imds_client(imds)
        .build()
        .await;
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(timeouts::STS_CONNECT)
        .operation_attempt_timeout(timeouts::STS_ATTEMPT)
        .operation_timeout(timeouts::STS_OPERATION)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(credentials)
        .http_client(crate::credentials::sts_http_client())
        .timeout_config(timeouts);
    if let Some(endpoint) = &args.sts_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Ok(aws_sdk_sts::Client::new(&loader.load().await))
}

async fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(args: &RunArgs, kernel_debug_log: bool) -> anyhow::Result<()> {
    let settings = args.settings(kernel_debug_log)?;
    warn_about_host_interfaces(args);
    // Handlers first: once "interception active" is logged, SIGTERM must mean a clean exit.
    let signal = wait_for_signal().await?;
    if args.interception_only {
        let interception = Arc::new(std::sync::Mutex::new(intercept(&settings)?));
        let guard = spawn_guard_watch(interception.clone(), args.guard_resync_interval)?;
        signal.await;
        guard.abort();
        log_shutdown();
        return Ok(());
    }

    args.check_ports()?;
    let (timing, warnings) = args.sts_timing()?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let node = match &args.node {
        Some(node) if !node.is_empty() => node.clone(),
        _ => bail!("--node (or NODE_NAME) is required: the agent serves the pods of one node"),
    };
    let metadata = SocketAddr::new(IpAddr::V4(settings.metadata_ip4), settings.metadata_port);
    let upstream = Arc::new(Upstream::new(metadata, timeouts::UPSTREAM));
    let rules = compile_rules(&args.allow_paths, &args.block_paths)?;
    let sessions = SessionTagging::from_args(&args.session_tags)?;
    if sessions.needs_service_account()
        && sessions.cluster.as_ref().is_some_and(|c| c.arn.is_none())
    {
        tracing::warn!(
            "--session-tags without --cluster-arn: sessions carry no eks-cluster-arn tag, so \
             policies that read aws:PrincipalTag/eks-cluster-arn do not match"
        );
    }
    let base_arn = base_arn(args, &upstream).await?;
    if args.namespace_restrictions && base_arn.is_none() {
        tracing::warn!(
            "--namespace-restrictions without --base-role-arn or --auto-discover-base-arn: \
             allowed-roles patterns that do not start with arn: name no account and allow no \
             role; write them as full ARNs (arn:aws:iam::<account>:role/<pattern>) or set a base \
             ARN"
        );
    }
    let region = region(args, &upstream).await?;
    let sts = sts_client(args, region.clone(), metadata).await?;
    let cache = CredentialCache::new(
        Arc::new(SdkSts::new(sts)),
        CacheSettings {
            duration: timing.session,
            refresh_before: timing.refresh_before,
            backoff_max: timing.error_ttl,
            prefetch_concurrency: args.prefetch_concurrency,
            ..CacheSettings::default()
        },
    );

    // Each pod connection is a descriptor: make sure --max-connections fits (with room for the
    // agent's own), or connections beyond the limit sit unanswered in the backlog.
    let nofile = bpf::host::raise_nofile();
    if nofile != 0 && (nofile as usize) < args.max_connections + 256 {
        tracing::warn!(
            open_files = nofile,
            max_connections = args.max_connections,
            "the open-files limit is below --max-connections plus headroom; connections beyond \
             it will wait unanswered instead of getting a 503 (raise the container's nofile \
             limit or lower --max-connections)"
        );
    }

    // Listen before taking over interception: from the moment the programs point at us,
    // connects queue in the backlog instead of being refused.
    let mut addrs = vec![SocketAddr::new(
        IpAddr::V4(settings.agent_ip4),
        settings.agent_port,
    )];
    if let Some(ip6) = settings.agent_ip6 {
        addrs.push(SocketAddr::new(IpAddr::V6(ip6), settings.agent_port));
    }
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        listeners.push(
            imds::bind(*addr)
                .await
                .with_context(|| format!("listen on {addr}"))?,
        );
    }
    let admin_addr = SocketAddr::new(IpAddr::V4(settings.agent_ip4), args.metrics_port);
    let admin_listener = imds::bind(admin_addr)
        .await
        .with_context(|| format!("listen on {admin_addr} (--metrics-port)"))?;

    let mut interception = intercept(&settings)?;

    let identity_map = interception.take_identity_map()?;
    if identity_map_capacity_differs(&identity_map, args.identity_capacity) {
        tracing::warn!(
            wanted = args.identity_capacity,
            "the pinned identity map keeps its capacity across restarts; run \
             `kube2iam-agent uninstall` and restart to resize it"
        );
    }
    let registry = Arc::new(Registry::new(Box::new(identity_map)));
    let attest_map = match interception.take_attest_map() {
        Ok(map) => Some(map),
        Err(e) => {
            tracing::error!(
                "attestation unavailable: {e:#}; with --identity-attestation prefer or require \
                 every connection is refused as unattested"
            );
            None
        }
    };
    let host_pods_map = interception.take_host_pods_map()?;
    let cgroups = Arc::new(CgroupPods::new(interception.cgroup.clone()));
    match cgroups.rescan() {
        Ok(()) => report_attestation(args.identity_attestation, &cgroups),
        Err(e) => tracing::warn!(
            cgroup = %interception.cgroup.display(),
            "cannot read the cgroup tree: {e}; pods cannot be attested"
        ),
    }
    let host_netns_cookie = interception.host_netns_cookie;
    let pin_dir = interception.pin_dir.clone();
    let interception = Arc::new(std::sync::Mutex::new(interception));
    let guard_watch = spawn_guard_watch(interception.clone(), args.guard_resync_interval)?;
    let namespaces = Arc::new(Namespaces::default());
    let service_accounts = Arc::new(ServiceAccounts::default());
    let tokens = TokenIssuer::random().context("draw the IMDSv2 token key")?;
    let events = PodEvents::new(args.event_interval, &node);
    let state = Arc::new(State {
        config: args.server_config(&settings, node.clone(), base_arn, sessions, rules),
        registry: registry.clone(),
        namespaces: namespaces.clone(),
        service_accounts: service_accounts.clone(),
        cache: cache.clone(),
        upstream: upstream.clone(),
        tokens,
        stats: Default::default(),
        events: events.clone(),
        attestation: imds::Attestation {
            map: attest_map,
            cgroups: cgroups.clone(),
            host_netns_cookie,
        },
        per_caller: Default::default(),
        refusal_log: crate::telemetry::LogLimiter::new(Duration::from_secs(10)),
        node_session: Default::default(),
    });

    // Serve at once: pods known from the pinned map are answered while the watch relists.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        servers.spawn(imds::serve(listener, state.clone(), stopped.clone()));
    }
    let readiness = Arc::new(Readiness::default());
    readiness.interception.store(true, Ordering::Release);
    let watch_stats = Arc::new(WatchStats::default());
    let admin = Arc::new(Admin::new(
        Sources {
            state: state.clone(),
            readiness: readiness.clone(),
            watch_stats: watch_stats.clone(),
            events: events.clone(),
            bpf_counters: Box::new({
                let pin_dir = pin_dir.clone();
                move || {
                    bpf::pinned_counters(&pin_dir)
                        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
                }
            }),
            guard_status: guard_status(
                pin_dir,
                bpf::guard::Coverage::new(settings.packet_guard.clone(), settings.node_guard),
            ),
        },
        args.debug,
    ));
    servers.spawn(admin::serve(admin_listener, admin, stopped.clone()));
    tracing::info!(?addrs, %admin_addr, node, region, "serving");

    let client = k8s::client(args.api_server.as_deref(), args.kubeconfig.as_deref()).await?;
    let keys = Keys {
        role: args.iam_role_key.clone(),
        external_id: args.iam_external_id_key.clone(),
        namespace: args.namespace_key.clone(),
        host_network_pods: args.host_network_pods,
    };
    let mut background = tokio::task::JoinSet::new();
    if args.host_network_pods {
        background.spawn(sync_host_pods(
            registry.clone(),
            cgroups,
            host_pods_map,
            args.pod_uid.clone(),
        ));
    }
    background.spawn(events.run(client.clone()));
    let prefetch_state = state.clone();
    if args.namespace_restrictions {
        // Prefetch decides as requests do: before the namespaces are listed it assumes nothing;
        // once they are, every known pod gets its turn.
        let (state, registry) = (state.clone(), registry.clone());
        background.spawn(async move {
            state.namespaces.wait_synced().await;
            for pod in registry.live_pods() {
                state.prefetch(&pod);
            }
        });
    }
    if args.service_accounts.service_account_roles {
        // A change of an account's role reaches its pods' next request through the store; the
        // prefetch has the new role's credentials ready by then.
        let (state, registry) = (state.clone(), registry.clone());
        background.spawn(service_accounts.watch(
            client.clone(),
            args.service_accounts.service_account_role_key.clone(),
            move |namespace, name| {
                for pod in registry.live_pods() {
                    let uses = pod.namespace == namespace
                        && pod.account.as_ref().is_some_and(|a| a.name == name);
                    if uses {
                        state.prefetch(&pod);
                    }
                }
            },
        ));
    }
    // One pod changing its annotations over and over must not turn into one AssumeRole per
    // change: a few prefetches per pod and window, the rest on demand.
    let limiter = Arc::new(PrefetchLimiter::new(PREFETCHES_PER_POD, PREFETCH_WINDOW));
    let prefetch_limiter = limiter.clone();
    background.spawn(k8s::watch_pods(
        client.clone(),
        node,
        keys,
        registry,
        watch_stats.clone(),
        move |pod| {
            let wanted = (pod.role.clone(), pod.external_id.clone());
            match prefetch_limiter.admit(&pod.uid, &wanted, std::time::Instant::now()) {
                Admission::Admitted => prefetch_state.prefetch(pod),
                Admission::Limited { first } => {
                    if first {
                        tracing::warn!(
                            pod = %pod.display_name(),
                            per_pod = PREFETCHES_PER_POD,
                            window = ?PREFETCH_WINDOW,
                            "the pod's role or external-ID annotation keeps changing; no more \
                             prefetches for it in this window (it still gets credentials when \
                             it asks)"
                        );
                    }
                }
            }
        },
    ));
    if args.namespace_restrictions {
        background.spawn(namespaces.watch(
            client,
            args.namespace_key.clone(),
            args.namespace_restriction_format,
            watch_stats,
        ));
    }
    spawn_cache_eviction(&mut background, state.clone(), cache, limiter);
    spawn_upstream_probe(&mut background, upstream, readiness);

    signal.await;
    let _ = stop.send(true);
    background.abort_all();
    guard_watch.abort();
    while servers.join_next().await.is_some() {}
    log_shutdown();
    Ok(())
}

/// Every minute: drops idle credential entries and, once the pod list is in, those no pod
/// uses any more; prunes the prefetch limiter and the ServiceAccount store.
fn spawn_cache_eviction<T: PartialEq + Clone + Send + 'static>(
    background: &mut tokio::task::JoinSet<()>,
    state: Arc<State>,
    cache: Arc<CredentialCache>,
    limiter: Arc<PrefetchLimiter<T>>,
) {
    background.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let evicted = cache.evict_idle();
            if evicted > 0 {
                tracing::debug!(evicted, "dropped idle credential entries");
            }
            // Entries of roles no pod has any more (annotation changes, deleted pods). Only once
            // the pod list is in: before that, the identity map may lack live pods.
            if state.registry.synced() {
                match state.cache_keys_in_use() {
                    Ok(in_use) => {
                        let evicted = cache.evict_unused(&in_use, UNUSED_GRACE);
                        if evicted > 0 {
                            tracing::debug!(evicted, "dropped credential entries no pod uses");
                        }
                    }
                    Err(e) => tracing::warn!("credential cache eviction: {e}"),
                }
            }
            limiter.prune(std::time::Instant::now());
            state.service_accounts.prune(std::time::Instant::now());
        }
    });
}

/// Every 5 s: asks the upstream metadata service whether it answers, which is the agent's
/// readiness, and logs when that changes.
fn spawn_upstream_probe(
    background: &mut tokio::task::JoinSet<()>,
    upstream: Arc<Upstream>,
    readiness: Arc<Readiness>,
) {
    background.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut was = None;
        loop {
            tick.tick().await;
            let ok = upstream.reachable().await;
            readiness.upstream.store(ok, Ordering::Release);
            if was != Some(ok) {
                if ok {
                    tracing::info!(upstream = %upstream.addr(), "upstream metadata service reachable");
                } else {
                    tracing::warn!(upstream = %upstream.addr(), "upstream metadata service unreachable; not ready");
                }
                was = Some(ok);
            }
        }
    });
}

/// Says at start whether the kernel can name the pods here, and what that means for serving.
fn report_attestation(mode: attest::Mode, cgroups: &CgroupPods) {
    let pods = cgroups.pod_count();
    let root = cgroups.root().display().to_string();
    match mode {
        attest::Mode::Off => tracing::warn!(
            "--identity-attestation off: a pod is known by its address alone, which another pod \
             can forge on a shared L2 segment or inherit from a finished pod"
        ),
        _ if pods > 0 => tracing::info!(
            pod_cgroups = pods,
            cgroup = root,
            ?mode,
            "identity attestation on: a pod is served only when the kernel attributes the \
             connection to its cgroup"
        ),
        attest::Mode::Prefer => tracing::warn!(
            cgroup = root,
            "identity attestation: no kubelet pod cgroups (kubepods) below the attach cgroup \
             yet; pods not in cgroup v2 (cgroup-v1 nodes) are served by address alone until \
             they are"
        ),
        attest::Mode::Require => tracing::warn!(
            cgroup = root,
            "identity attestation required, but no kubelet pod cgroups (kubepods) are below the \
             attach cgroup yet; pods outside cgroup v2 pod cgroups are refused"
        ),
    }
}

/// Keeps the kernel's host-pods map equal to the cgroups of the hostNetwork pods that are
/// served their own role, as pods and their cgroups come and go.
async fn sync_host_pods(
    registry: Arc<Registry>,
    cgroups: Arc<CgroupPods>,
    map: HostPodsMap,
    own_uid: Option<String>,
) {
    let mut changes = registry.subscribe();
    let mut last: Option<std::collections::HashSet<u64>> = None;
    loop {
        if !registry.synced() {
            // What a previous agent pinned stays until the pod list says otherwise.
            let _ = changes.changed().await;
            continue;
        }
        let uids: Vec<String> = registry
            .host_pod_uids()
            .into_iter()
            .filter(|uid| {
                // The agent's own pod must never be redirected: its upstream calls would loop.
                let own = own_uid.as_deref() == Some(uid.as_str());
                if own {
                    tracing::warn!(
                        "the agent's own pod has a role annotation; it is not redirected"
                    );
                }
                !own
            })
            .collect();
        let missing = uids.iter().any(|uid| cgroups.pod_cgroup(uid).is_none());
        if missing {
            let cgroups = cgroups.clone();
            let _ = tokio::task::spawn_blocking(move || cgroups.rescan()).await;
        }
        let ids: std::collections::HashSet<u64> = uids
            .iter()
            .filter_map(|uid| cgroups.pod_cgroup(uid))
            .collect();
        if last.as_ref() != Some(&ids) {
            match map.set(&ids) {
                Ok(()) => {
                    tracing::info!(pods = ids.len(), "hostNetwork pods served their own role");
                    last = Some(ids);
                }
                Err(e) => tracing::error!("cannot update the host-pods map: {e}"),
            }
        }
        // A pod's cgroup appears when kubelet starts it, after the watch saw the pod: look again
        // soon while one is missing.
        let wait = if missing {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(10)
        };
        let _ = tokio::time::timeout(wait, changes.changed()).await;
    }
}

/// kube2iam's `docker0` default, and exact interface names this node does not have: the packet
/// guard would cover nothing there (it attaches when such an interface appears).
fn warn_about_host_interfaces(args: &RunArgs) {
    if !args.guards.packet_guard {
        return;
    }
    if let Some(warning) = args.guards.host_interface_warning() {
        tracing::warn!("{warning}");
        return;
    }
    let Ok(present) = bpf::guard::interfaces() else {
        return;
    };
    for pattern in args.guards.guard_patterns() {
        let name = pattern.trim();
        if name.is_empty() || name.ends_with('+') || name.starts_with('!') {
            continue;
        }
        if !present.contains_key(name) {
            tracing::warn!(
                interface = name,
                "--host-interface names an interface this node does not have; the packet guard \
                 attaches to it when it appears (use name+ for a prefix, e.g. eni+ on EKS)"
            );
        }
    }
}

/// Reads where the packet guards stand on the covered interfaces, for the metrics; `None`
/// with both guards off.
fn guard_status(
    pin_dir: std::path::PathBuf,
    coverage: Option<bpf::guard::Coverage>,
) -> crate::status::GuardStatus {
    Box::new(move || {
        let coverage = coverage.as_ref()?;
        Some(bpf::guard::status(&pin_dir, coverage).map_err(|e| e.to_string()))
    })
}

fn log_shutdown() {
    tracing::info!(
        "shutting down; the pinned programs stay attached and keep pods away from the real \
         metadata service (`kube2iam-agent uninstall` detaches them)"
    );
}

fn identity_map_capacity_differs(map: &crate::identity::BpfIdentityMap, wanted: u32) -> bool {
    use crate::identity::IdentityMap as _;
    map.capacity() != 0 && map.capacity() != wanted
}

/// Forwards the programs' aya-log events into our log.
fn spawn_kernel_log_reader(interception: &Pinned) -> anyhow::Result<()> {
    let id = interception
        .attached_program_id()
        .context("find the attached connect4 program for its log buffer")?;
    let logger = aya_log::EbpfLogger::init_from_id(id).context("read the programs' log buffer")?;
    // SAFETY: the logger owns its ring buffer fd and keeps it open while the AsyncFd lives.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("poll the programs' log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}
