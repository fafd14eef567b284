//! Real AWS clients, run unmodified inside a pod (or on the node): curl doing the IMDSv2 token
//! dance, botocore's instance-metadata credential provider, aws-config's IMDS credentials
//! provider (the `k2i-sdk-client` binary), and botocore's STS client for AssumeRole.
//!
//! Each runs with an empty environment (no `AWS_*` variable of the machine leaks in), `HOME` set
//! to an empty temporary directory and the AWS config and credentials files pointed at
//! nothing, so the only source of credentials is the one under test.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    Pod, TestNode,
    process::output_within,
    unique_id,
    venv::{ensure_venv, venv_python},
};

/// How long one client run may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

/// `http://169.254.169.254`, the IPv4 metadata endpoint the clients use by default.
pub const IMDS_ENDPOINT4: &str = "http://169.254.169.254";
/// `http://[fd00:ec2::254]`, the IPv6 metadata endpoint.
pub const IMDS_ENDPOINT6: &str = "http://[fd00:ec2::254]";

/// Where a client process runs.
#[derive(Clone, Copy)]
pub enum RunIn<'a> {
    /// A pod process: in the test cgroup and the pod's network namespace.
    Pod(&'a Pod<'a>),
    /// A node (host) process: the node's network namespace, outside the test cgroup.
    Node(&'a TestNode),
    /// A hostNetwork pod's process: the pod's cgroup, the node's network namespace.
    HostNetworkPod(&'a Pod<'a>),
    /// A process of a pod's container as the kubelet lays it out (its own cgroup under the
    /// test cgroup, the pod's network namespace).
    Container(&'a crate::cri::AppContainer),
}

impl RunIn<'_> {
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match self {
            RunIn::Pod(pod) => pod.command(program),
            RunIn::Node(node) => node.command(program),
            RunIn::HostNetworkPod(pod) => pod.command_in_netns(program, &pod.node().netns_path()),
            RunIn::Container(container) => container.command(program),
        }
    }

    fn label(&self) -> String {
        match self {
            RunIn::Pod(pod) => format!("pod {}", pod.name()),
            RunIn::Node(node) => format!("node {}", node.netns_name()),
            RunIn::HostNetworkPod(pod) => format!("hostNetwork pod {}", pod.name()),
            RunIn::Container(container) => format!("container {}", container.cgroup().display()),
        }
    }
}

/// An empty directory used as `HOME`, removed on drop.
struct TempHome {
    path: PathBuf,
}

impl TempHome {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("k2i-home-{}", unique_id()));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TempHome {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Runs `command` with a clean environment (plus `env`) and returns its output.
fn run_clean(mut command: Command, env: &[(&str, &str)], what: &str) -> Output {
    let home = TempHome::new();
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &home.path)
        .env("LANG", "C.UTF-8")
        .env("AWS_CONFIG_FILE", home.path.join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.path.join("no-credentials"),
        )
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    output_within(&mut command, CLIENT_TIMEOUT, what)
}

fn last_json_line<T: for<'de> Deserialize<'de>>(output: &Output, what: &str) -> T {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "{what} printed no JSON ({}).\nstdout:\n{stdout}\nstderr:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        });
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{what} printed unexpected JSON ({e}): {line}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The credentials document EC2 (or the agent) serves at `iam/security-credentials/<role>`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ImdsCredentialsDoc {
    pub code: String,
    pub last_updated: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: String,
}

/// Credentials as a client library loaded them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ClientCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: Option<String>,
    /// `YYYY-MM-DDTHH:MM:SSZ` as the client parsed it.
    pub expiration: Option<String>,
}

/// What a client library would load from the document.
impl From<&ImdsCredentialsDoc> for ClientCredentials {
    fn from(doc: &ImdsCredentialsDoc) -> Self {
        ClientCredentials {
            access_key_id: doc.access_key_id.clone(),
            secret_access_key: doc.secret_access_key.clone(),
            token: Some(doc.token.clone()),
            expiration: Some(doc.expiration.clone()),
        }
    }
}

/// A client's failure: the exception or error type and its message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ClientError {
    pub error_type: String,
    pub error: String,
}

/// What a client printed: credentials or an error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ClientOutcome {
    Credentials(ClientCredentials),
    Error(ClientError),
}

impl ClientOutcome {
    pub fn into_result(self) -> Result<ClientCredentials, ClientError> {
        match self {
            ClientOutcome::Credentials(c) => Ok(c),
            ClientOutcome::Error(e) => Err(e),
        }
    }
}

/// The outcome of the curl token dance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurlImds {
    /// The status of `PUT /latest/api/token`.
    pub token_status: u16,
    /// The status of the GET (`None` when the token request failed, so no GET was made).
    pub status: Option<u16>,
    /// The GET's body (empty without a GET).
    pub body: String,
}

/// The shell script that does the IMDSv2 token dance with curl: `PUT $1/latest/api/token` with
/// a TTL of `$3` seconds, then (if that answered 200) `GET $1$2` with the token. It prints
/// `token-status <code>`, then the GET's body, then the GET's status alone on the last line.
/// Exit 10: the PUT failed at the transport level; 11: the GET did.
pub const IMDSV2_CURL_SCRIPT: &str = r#"set -u
out=$(curl -sS -m 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $3" -w '\n%{http_code}' "$1/latest/api/token") || exit 10
token_status=$(printf '%s' "$out" | tail -n 1)
token=$(printf '%s' "$out" | head -n -1)
echo "token-status $token_status"
[ "$token_status" = 200 ] || exit 0
curl -sS -m 5 -H "X-aws-ec2-metadata-token: $token" -w '\n%{http_code}' "$1$2" || exit 11
"#;

/// The command line that runs [`IMDSV2_CURL_SCRIPT`]: `sh -c <script> imdsv2 <base> <path>
/// <ttl>`.
pub fn imdsv2_curl_args(base: &str, path: &str, ttl: u32) -> Vec<String> {
    vec![
        "-c".to_owned(),
        IMDSV2_CURL_SCRIPT.to_owned(),
        "imdsv2".to_owned(),
        base.to_owned(),
        path.to_owned(),
        ttl.to_string(),
    ]
}

/// Runs the curl IMDSv2 token dance for `path` against `base` (e.g. [`IMDS_ENDPOINT4`]).
/// Panics if curl fails at the transport level (refused, timed out), with its message.
pub fn curl_imdsv2(run_in: RunIn<'_>, base: &str, path: &str) -> CurlImds {
    try_curl_imdsv2(run_in, base, path).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`curl_imdsv2`], returning transport failures as `Err(curl's message)`.
pub fn try_curl_imdsv2(run_in: RunIn<'_>, base: &str, path: &str) -> Result<CurlImds, String> {
    let what = format!("curl IMDSv2 {path} in {}", run_in.label());
    let mut command = run_in.command("sh");
    command.args(imdsv2_curl_args(base, path, 21_600));
    let output = run_clean(command, &[], &what);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{what} failed ({}): {}\nstdout:\n{stdout}",
            output.status,
            stderr.trim()
        ));
    }
    let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let token_status = first
        .strip_prefix("token-status ")
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("{what}: unexpected output {stdout:?}"))?;
    if rest.is_empty() {
        return Ok(CurlImds {
            token_status,
            status: None,
            body: String::new(),
        });
    }
    let (body, status) = rest.rsplit_once('\n').unwrap_or(("", rest));
    let status = status
        .trim()
        .parse()
        .map_err(|_| format!("{what}: unexpected output {stdout:?}"))?;
    Ok(CurlImds {
        token_status,
        status: Some(status),
        body: body.to_owned(),
    })
}

/// curl's token dance for credentials: lists `iam/security-credentials/`, then fetches the
/// first role's document and parses it. `Err` describes the first step that did not answer 200.
pub fn curl_imdsv2_credentials(
    run_in: RunIn<'_>,
    base: &str,
) -> Result<(String, ImdsCredentialsDoc), String> {
    let listing = curl_imdsv2(run_in, base, "/latest/meta-data/iam/security-credentials/");
    let role = match listing {
        CurlImds {
            token_status: 200,
            status: Some(200),
            body,
        } => body.lines().next().unwrap_or_default().to_owned(),
        other => return Err(format!("listing the role failed: {other:?}")),
    };
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    match curl_imdsv2(run_in, base, &path) {
        CurlImds {
            status: Some(200),
            body,
            ..
        } => match serde_json::from_str(&body) {
            Ok(doc) => Ok((role, doc)),
            Err(e) => Err(format!(
                "the credentials document for {role} is not valid ({e}): {body}"
            )),
        },
        other => Err(format!("fetching {path} failed: {other:?}")),
    }
}

/// botocore's `InstanceMetadataProvider` with `InstanceMetadataFetcher(timeout=2,
/// num_attempts=2)`; argv[1] is `ipv4` or `ipv6` (the endpoint mode).
const BOTOCORE_IMDS: &str = r#"
import datetime, json, sys
try:
    from botocore.credentials import InstanceMetadataProvider
    from botocore.utils import InstanceMetadataFetcher
    config = {"ec2_metadata_service_endpoint_mode": sys.argv[1]}
    fetcher = InstanceMetadataFetcher(timeout=2, num_attempts=2, config=config)
    creds = InstanceMetadataProvider(iam_role_fetcher=fetcher).load()
    if creds is None:
        print(json.dumps({"error_type": "NoCredentials",
                          "error": "botocore's instance-metadata provider found no credentials"}))
    else:
        frozen = creds.get_frozen_credentials()
        expiry = getattr(creds, "_expiry_time", None)
        print(json.dumps({
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expiration": None if expiry is None else
                expiry.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }))
except Exception as e:
    print(json.dumps({"error_type": type(e).__name__, "error": str(e)}))
"#;

/// Loads credentials with botocore's instance-metadata provider (the venv's python), from
/// `http://169.254.169.254` (or `http://[fd00:ec2::254]` with `ipv6`).
pub fn botocore_imds_credentials(run_in: RunIn<'_>, ipv6: bool) -> ClientOutcome {
    ensure_venv();
    let what = format!("botocore instance-metadata provider in {}", run_in.label());
    let mut command = run_in.command(venv_python());
    command
        .args(["-c", BOTOCORE_IMDS])
        .arg(if ipv6 { "ipv6" } else { "ipv4" });
    let output = run_clean(command, &[], &what);
    last_json_line(&output, &what)
}

/// The `k2i-sdk-client` binary (aws-config's IMDS client): `$K2I_SDK_CLIENT_BIN`, or next to
/// the running test binary's profile directory.
pub fn sdk_client_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("K2I_SDK_CLIENT_BIN") {
        return PathBuf::from(path);
    }
    let mut candidates = Vec::new();
    // Integration tests run from <target>/<profile>/deps/<test>-<hash>.
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("k2i-sdk-client"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/k2i-sdk-client"));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "k2i-sdk-client not found (looked at {candidates:?}); build it with cargo build \
                 -p kube2iam-tests --bin k2i-sdk-client or set K2I_SDK_CLIENT_BIN"
            )
        })
}

/// Loads credentials with aws-config's `ImdsCredentialsProvider` (default endpoint
/// `http://169.254.169.254`; `ipv6` selects the IPv6 endpoint mode).
pub fn sdk_imds_credentials(run_in: RunIn<'_>, ipv6: bool) -> ClientOutcome {
    let what = format!("aws-config IMDS provider in {}", run_in.label());
    let mut command = run_in.command(sdk_client_binary());
    command.arg("credentials");
    if ipv6 {
        command.arg("--ipv6");
    }
    let output = run_clean(command, &[], &what);
    last_json_line(&output, &what)
}

/// What aws-config's IMDS client got for one path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SdkGet {
    Body { body: String },
    Error(ClientError),
}

/// GETs `path` with aws-config's `imds::Client` (which always uses an IMDSv2 token).
pub fn sdk_imds_get(run_in: RunIn<'_>, path: &str, ipv6: bool) -> SdkGet {
    let what = format!("aws-config IMDS client GET {path} in {}", run_in.label());
    let mut command = run_in.command(sdk_client_binary());
    command.args(["get", path]);
    if ipv6 {
        command.arg("--ipv6");
    }
    let output = run_clean(command, &[], &what);
    last_json_line(&output, &what)
}

/// An STS AssumeRole request for [`botocore_assume_role`].
#[derive(Clone, Debug, Serialize)]
pub struct AssumeRoleRequest {
    pub endpoint: String,
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
    pub duration_seconds: Option<u32>,
    /// botocore's `total_max_attempts` (1: no retries).
    pub max_attempts: u32,
    pub connect_timeout: f64,
    pub read_timeout: f64,
    pub region: String,
}

impl AssumeRoleRequest {
    /// One attempt, 5 s timeouts, region us-west-2.
    pub fn new(endpoint: &str, role_arn: &str, session_name: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            role_arn: role_arn.to_owned(),
            session_name: session_name.to_owned(),
            external_id: None,
            duration_seconds: None,
            max_attempts: 1,
            connect_timeout: 5.0,
            read_timeout: 5.0,
            region: crate::imds::REGION.to_owned(),
        }
    }
}

/// What botocore's AssumeRole returned.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StsOutcome {
    Credentials {
        access_key_id: String,
        expiration: String,
        assumed_role_arn: String,
    },
    /// A service error (`botocore.exceptions.ClientError`).
    ServiceError {
        code: String,
        message: Option<String>,
        http_status: Option<u16>,
        attempts: Option<u32>,
    },
    /// Any other failure (`EndpointConnectionError`, `ReadTimeoutError`, …).
    Error(ClientError),
}

const BOTOCORE_ASSUME_ROLE: &str = r#"
import datetime, json, sys
try:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError
    a = json.loads(sys.argv[1])
    session = botocore.session.get_session()
    config = Config(retries={"total_max_attempts": a["max_attempts"], "mode": "standard"},
                    connect_timeout=a["connect_timeout"], read_timeout=a["read_timeout"])
    sts = session.create_client("sts", region_name=a["region"], endpoint_url=a["endpoint"],
                                aws_access_key_id="AKIDK2ITESTCALLER",
                                aws_secret_access_key="k2i-test-caller-secret", config=config)
    kwargs = {"RoleArn": a["role_arn"], "RoleSessionName": a["session_name"]}
    if a.get("external_id") is not None:
        kwargs["ExternalId"] = a["external_id"]
    if a.get("duration_seconds") is not None:
        kwargs["DurationSeconds"] = a["duration_seconds"]
    try:
        r = sts.assume_role(**kwargs)
        c = r["Credentials"]
        print(json.dumps({
            "access_key_id": c["AccessKeyId"],
            "expiration": c["Expiration"].astimezone(datetime.timezone.utc)
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
            "assumed_role_arn": r["AssumedRoleUser"]["Arn"],
        }))
    except ClientError as e:
        meta = e.response.get("ResponseMetadata", {})
        print(json.dumps({
            "code": e.response.get("Error", {}).get("Code"),
            "message": e.response.get("Error", {}).get("Message"),
            "http_status": meta.get("HTTPStatusCode"),
            "attempts": meta.get("RetryAttempts", 0) + 1,
        }))
except Exception as e:
    print(json.dumps({"error_type": type(e).__name__, "error": str(e)}))
"#;

/// Calls STS AssumeRole with botocore (the venv's python), signed with made-up credentials, with
/// `AWS_EC2_METADATA_DISABLED=true`.
pub fn botocore_assume_role(run_in: RunIn<'_>, request: &AssumeRoleRequest) -> StsOutcome {
    ensure_venv();
    let what = format!("botocore AssumeRole in {}", run_in.label());
    let mut command = run_in.command(venv_python());
    let args = serde_json::to_string(request).expect("an AssumeRoleRequest serializes");
    command.args(["-c", BOTOCORE_ASSUME_ROLE]).arg(args);
    let output = run_clean(command, &[("AWS_EC2_METADATA_DISABLED", "true")], &what);
    last_json_line(&output, &what)
}
