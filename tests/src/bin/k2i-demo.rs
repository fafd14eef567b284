//! `cargo xtask demo` and `cargo xtask sandbox`: the real agent on one machine, with no cluster
//! and no AWS account. A test node (network namespace) plays an EC2 host with its metadata
//! service (the IMDS emulator), moto plays STS, and the Kubernetes API emulator holds the pods.
//! Pods are network namespaces behind veths; unmodified AWS clients run inside them.
//!
//! `demo` runs the clients and prints what each pod got. `sandbox` keeps everything up and takes
//! commands from a FIFO until told to stop. Both clean up on exit and on Ctrl-C.

use std::{
    io::{BufRead as _, Write as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use kube2iam_tests::{
    NODE_ACCESS_KEY_ID, Pod, TestNode,
    clients::{self, ClientOutcome, RunIn},
    e2e::{ALLOWED_KEY, CREDS, ROLE_KEY, World, role_arn},
    kube_api,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set [`STOP`]; the demo checks it between steps and unwinds normally, so every
/// guard (namespaces, cgroup, pins, processes) is dropped.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

struct DemoPod<'n> {
    pod: Pod<'n>,
    namespace: String,
    name: String,
    role: Option<String>,
}

/// Builds the scene: two roles, one unannotated pod, one pod in a restricted namespace.
fn scene<'n>(node: &'n TestNode, world: &World) -> Vec<DemoPod<'n>> {
    world.api.add_namespace(
        kube_api::namespace("shop").annotate(ALLOWED_KEY, r#"["web-*", "orders-*"]"#),
    );
    world
        .api
        .add_namespace(kube_api::namespace("finance").annotate(ALLOWED_KEY, r#"["reports-*"]"#));
    let specs: [(&str, &str, &str, Option<&str>); 4] = [
        ("web", "shop", "web", Some("web-frontend")),
        ("orders", "shop", "orders", Some("orders-api")),
        ("plain", "shop", "plain", None),
        ("admin", "finance", "admin", Some("admin-all")),
    ];
    specs
        .into_iter()
        .map(|(netns, namespace, name, role)| {
            let pod = node.add_pod(netns);
            let annotations: Vec<(&str, &str)> = role.iter().map(|r| (ROLE_KEY, *r)).collect();
            world.add_pod(&pod, namespace, name, &annotations);
            DemoPod {
                pod,
                namespace: namespace.into(),
                name: name.into(),
                role: role.map(Into::into),
            }
        })
        .collect()
}

fn outcome_text(outcome: &ClientOutcome) -> String {
    match outcome {
        ClientOutcome::Credentials(c) => format!(
            "{}… expires {}",
            &c.access_key_id[..c.access_key_id.len().min(12)],
            c.expiration.as_deref().unwrap_or("?")
        ),
        ClientOutcome::Error(e) => {
            let first = e.error.lines().next().unwrap_or("").trim();
            let short: String = first.chars().take(110).collect();
            format!("{}: {short}", e.error_type)
        }
    }
}

fn curl_outcome(pod: &Pod<'_>) -> ClientOutcome {
    match clients::curl_imdsv2_credentials(RunIn::Pod(pod), clients::IMDS_ENDPOINT4) {
        Ok((_, doc)) => ClientOutcome::Credentials(clients::ClientCredentials::from(&doc)),
        Err(_) => {
            // Show what the agent answered: the reason a pod gets no credentials.
            let (status, body) = kube2iam_tests::e2e::pod_get(pod, CREDS, &[]);
            ClientOutcome::Error(clients::ClientError {
                error_type: format!("HTTP {status}"),
                error: body.trim_start_matches("kube2iam-ebpf: ").to_owned(),
            })
        }
    }
}

fn demo() -> Result<(), String> {
    println!("Starting a test node (network namespace), the IMDS emulator, moto, the API emulator");
    println!("and the agent attached to the node's demo cgroup…");
    let node = TestNode::new();
    let world = World::start(&node, &["--namespace-restrictions"]);
    let pods = scene(&node, &world);
    for p in &pods {
        world.wait_known(&node, &p.pod);
    }
    println!();
    println!(
        "{:<14} {:<24} {:<12} OUTCOME",
        "POD", "ROLE ANNOTATION", "CLIENT"
    );
    let mut leaked = false;
    for p in &pods {
        if stopping() {
            return Err("interrupted".into());
        }
        let runs: [(&str, ClientOutcome); 3] = [
            ("curl", curl_outcome(&p.pod)),
            (
                "botocore",
                clients::botocore_imds_credentials(RunIn::Pod(&p.pod), false),
            ),
            (
                "aws-config",
                clients::sdk_imds_credentials(RunIn::Pod(&p.pod), false),
            ),
        ];
        for (client, outcome) in runs {
            if let ClientOutcome::Credentials(c) = &outcome {
                leaked |= c.access_key_id == NODE_ACCESS_KEY_ID;
                let expected = p
                    .role
                    .as_deref()
                    .and_then(|r| world.moto_key_for(&role_arn(r)));
                if expected.as_deref() != Some(c.access_key_id.as_str()) {
                    return Err(format!(
                        "{}/{} got credentials that STS did not issue for its role",
                        p.namespace, p.name
                    ));
                }
            }
            println!(
                "{:<14} {:<24} {:<12} {}",
                format!("{}/{}", p.namespace, p.name),
                p.role.as_deref().unwrap_or("-"),
                client,
                outcome_text(&outcome)
            );
        }
    }
    let refs: Vec<&Pod<'_>> = pods.iter().map(|p| &p.pod).collect();
    let seen: Vec<_> = refs
        .iter()
        .filter(|p| world.imds.saw(p.ip4().into()))
        .collect();
    println!();
    if leaked || !seen.is_empty() {
        return Err(format!(
            "LEAK: node credentials reached a pod ({leaked}) or the node's metadata service saw \
             pods {:?}",
            seen.iter().map(|p| p.ip4()).collect::<Vec<_>>()
        ));
    }
    println!(
        "The node's credentials ({NODE_ACCESS_KEY_ID}) reached no pod, and the node's metadata \
         service saw no pod address: every pod connect to 169.254.169.254 was redirected to the \
         agent in the kernel."
    );
    Ok(())
}

fn sandbox() -> Result<(), String> {
    let node = TestNode::new();
    let world = World::start(&node, &["--namespace-restrictions"]);
    let pods = scene(&node, &world);
    for p in &pods {
        world.wait_known(&node, &p.pod);
    }
    let dir = PathBuf::from(format!("/run/kube2iam-sandbox/{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let fifo = dir.join("control");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid C string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "mkfifo {}: {}",
            fifo.display(),
            std::io::Error::last_os_error()
        ));
    }
    let cgroup_procs = node.cgroup_path().join("cgroup.procs");
    println!("Sandbox is up. The agent's metrics and its view of the pods:");
    for path in ["metrics", "debug/store"] {
        println!(
            "  nsenter --net={} -- curl -s http://192.0.2.10:9181/{path}",
            node.netns_path().display()
        );
    }
    println!();
    println!(
        "Run a command inside a pod (join the demo cgroup, then the pod's network namespace):"
    );
    for p in &pods {
        println!(
            "  {}/{}:  sh -c 'echo $$ > {} && exec nsenter --net={} -- curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/'",
            p.namespace,
            p.name,
            cgroup_procs.display(),
            p.pod.netns_path().display()
        );
    }
    println!();
    println!(
        "Control the sandbox by writing a line to {}:",
        fifo.display()
    );
    println!(
        "  echo 'add-pod <namespace> <name> [role]' > {}",
        fifo.display()
    );
    println!(
        "  echo 'annotate <namespace> <name> <key> <value>' > {}",
        fifo.display()
    );
    println!(
        "  echo 'delete-pod <namespace> <name>' > {}",
        fifo.display()
    );
    println!("  echo 'stop' > {}   (or Ctrl-C)", fifo.display());
    let _ = std::io::stdout().flush();

    let mut extra: Vec<DemoPod<'_>> = Vec::new();
    let result = loop {
        if stopping() {
            break Ok(());
        }
        // Non-blocking open so the loop keeps checking for Ctrl-C.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nonblock()
            .open(&fifo)
        {
            Ok(f) => f,
            Err(e) => break Err(format!("open {}: {e}", fifo.display())),
        };
        let mut lines = Vec::new();
        for _ in 0..10 {
            let reader = std::io::BufReader::new(&file);
            lines.extend(reader.lines().map_while(Result::ok));
            if !lines.is_empty() || stopping() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut stop = false;
        for line in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["stop"] => stop = true,
                ["add-pod", namespace, name, rest @ ..] => {
                    let netns = format!("x{}", extra.len());
                    let pod = node.add_pod(&netns);
                    let annotations: Vec<(&str, &str)> =
                        rest.first().map(|r| (ROLE_KEY, *r)).into_iter().collect();
                    world.add_pod(&pod, namespace, name, &annotations);
                    println!(
                        "added {namespace}/{name} at {}: sh -c 'echo $$ > {} && exec nsenter --net={} -- <command>'",
                        pod.ip4(),
                        cgroup_procs.display(),
                        pod.netns_path().display()
                    );
                    extra.push(DemoPod {
                        pod,
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        role: rest.first().map(|r| r.to_string()),
                    });
                }
                ["annotate", namespace, name, key, value] => {
                    world.api.annotate_pod(namespace, name, key, Some(value));
                    println!("annotated {namespace}/{name}: {key}={value}");
                }
                ["delete-pod", namespace, name] => {
                    world.api.delete_pod(namespace, name);
                    println!("deleted {namespace}/{name}");
                }
                _ => println!("unknown command: {line:?}"),
            }
            let _ = std::io::stdout().flush();
        }
        if stop {
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(&fifo);
    let _ = std::fs::remove_dir(&dir);
    let refs: Vec<&Pod<'_>> = pods.iter().chain(extra.iter()).map(|p| &p.pod).collect();
    world.imds.assert_no_pod_seen(&refs);
    println!("Stopping; cleaning up.");
    result
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NONBLOCK)
    }
}

fn main() {
    install_signal_handlers();
    let mode = std::env::args().nth(1).unwrap_or_else(|| "demo".into());
    let result = match mode.as_str() {
        "demo" => demo(),
        "sandbox" => sandbox(),
        other => Err(format!("unknown mode {other:?}; use demo or sandbox")),
    };
    if let Err(e) = result {
        eprintln!("k2i-demo: {e}");
        std::process::exit(1);
    }
}
