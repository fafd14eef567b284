//! `/healthz` on the metadata port, as kube2iam served it (its chart's probes, and checks
//! written for it, point there): 200 with `{"hostIP": …, "instanceId": …}` while the node's
//! metadata service answers, 500 with the reason when it does not. The agent's own probes use
//! `/healthz` and `/readyz` on the admin port (`admin.rs`). Unlike kube2iam's, it answers only
//! the node itself and its pods: other hosts are refused as on every route of this port.

use std::net::IpAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

use super::{State, text};

/// The path, answered before routing and without an IMDSv2 token, as kube2iam did.
pub const PATH: &str = "/healthz";

/// Whether `peer` is the node itself: its address (what kubelet's probes come from) or loopback.
pub fn from_node(peer: IpAddr, host_ip: IpAddr) -> bool {
    peer == host_ip || peer.is_loopback()
}

/// kube2iam's `HealthResponse`.
#[derive(serde::Serialize)]
struct Health<'a> {
    #[serde(rename = "hostIP")]
    host_ip: String,
    #[serde(rename = "instanceId")]
    instance_id: &'a str,
}

impl State {
    pub(super) async fn healthz(&self) -> Response<Full<Bytes>> {
        let instance_id = match self
            .upstream
            .get_text("/latest/meta-data/instance-id")
            .await
        {
            Ok(id) => id,
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("kube2iam-ebpf: error getting the instance ID: {e}\n"),
                );
            }
        };
        let health = Health {
            host_ip: self.config.host_ip.to_string(),
            instance_id: instance_id.trim(),
        };
        let mut body = serde_json::to_string(&health).unwrap_or_default();
        // Go's json.Encoder ends the document with a newline.
        body.push('\n');
        let mut response = text(StatusCode::OK, body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}
