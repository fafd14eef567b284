//! k2i-sdk-client: the AWS SDK for Rust's IMDS client (aws-config), run unmodified inside a pod.
//!
//! `k2i-sdk-client credentials [--ipv6]` loads credentials with
//! `aws_config::imds::credentials::ImdsCredentialsProvider` and prints
//! `{"access_key_id":..,"secret_access_key":..,"token":..,"expiration":..}`.
//! `k2i-sdk-client get <path> [--ipv6]` GETs one path with `aws_config::imds::Client` and prints
//! `{"body":..}`.
//! Failures print `{"error_type":..,"error":..}`. Both use the client's default endpoint
//! (`http://169.254.169.254`, or `http://[fd00:ec2::254]` in the IPv6 endpoint mode) unless the
//! environment says otherwise. The exit status is 0 whenever JSON was printed.

use std::process::ExitCode;

use aws_config::imds::{self, client::EndpointMode, credentials::ImdsCredentialsProvider};
use aws_credential_types::provider::ProvideCredentials as _;
use aws_smithy_types::{DateTime, date_time::Format, error::display::DisplayErrorContext};
use serde_json::json;

fn usage() -> ExitCode {
    eprintln!("usage: k2i-sdk-client credentials [--ipv6] | get <path> [--ipv6]");
    ExitCode::from(2)
}

/// The default client, or the default client in the IPv6 endpoint mode.
fn client(ipv6: bool) -> imds::Client {
    let builder = imds::Client::builder();
    if ipv6 {
        builder.endpoint_mode(EndpointMode::IpV6).build()
    } else {
        builder.build()
    }
}

fn error(kind: &str, e: impl std::error::Error) -> serde_json::Value {
    json!({"error_type": kind, "error": DisplayErrorContext(e).to_string()})
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ipv6 = args.iter().any(|a| a == "--ipv6");
    let positional: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let output = match positional.as_slice() {
        ["credentials"] => {
            let provider = if ipv6 {
                ImdsCredentialsProvider::builder()
                    .imds_client(client(true))
                    .build()
            } else {
                ImdsCredentialsProvider::builder().build()
            };
            match provider.provide_credentials().await {
                Ok(creds) => {
                    let expiration = creds.expiry().map(|t| {
                        DateTime::from(t)
                            .fmt(Format::DateTime)
                            .unwrap_or_else(|e| format!("unformattable expiry: {e}"))
                    });
                    json!({
                        "access_key_id": creds.access_key_id(),
                        "secret_access_key": creds.secret_access_key(),
                        "token": creds.session_token(),
                        "expiration": expiration,
                    })
                }
                Err(e) => error("CredentialsError", e),
            }
        }
        ["get", path] => match client(ipv6).get(*path).await {
            Ok(body) => json!({"body": body.as_ref()}),
            Err(e) => error("ImdsError", e),
        },
        _ => return usage(),
    };
    println!("{output}");
    ExitCode::SUCCESS
}
