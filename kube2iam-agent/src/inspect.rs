//! `kube2iam-agent inspect`: what is pinned under the pin directory, read straight from bpffs,
//! so it works while the agent runs and after it has gone (the pins outlive it), without
//! bpftool: the hooks and their links, the config the programs read, the pod identity map
//! (address → namespace/pod, role) and the programs' counters.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, MapError};
use kube2iam_common::{
    Counter, FLAG_AGENT_IP6, FLAG_ENABLED, Identity, ip6_octets, maps, port_from_repr,
};
use serde::Serialize;

use crate::{
    bpf,
    identity::{self, Annotation, Key},
};

/// Why the pins could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{} does not exist: nothing is pinned there (is --bpf-pin-path the agent's, and is \
         bpffs mounted?)",
        path.display()
    )]
    NoPins { path: PathBuf },
    #[error("cannot read the pinned map {}; reading BPF maps needs root (CAP_BPF)", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot read the pinned link {}; reading BPF links needs root (CAP_BPF)", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the pinned counters {}; reading BPF maps needs root (CAP_BPF)", path.display())]
    Counters {
        path: PathBuf,
        #[source]
        source: Box<bpf::Error>,
    },
    #[error("cannot list {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One pinned link: a hook attached to a cgroup.
#[derive(Debug, Serialize)]
pub struct LinkView {
    pub hook: String,
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
}

/// The config the programs read.
#[derive(Debug, Serialize)]
pub struct ConfigView {
    /// Redirecting (else metadata connects are refused).
    pub enabled: bool,
    pub agent: String,
    pub agent_ipv6: Option<String>,
    pub metadata: String,
    pub metadata_ipv6: String,
    pub host_netns_cookie: u64,
}

/// One identity map entry.
#[derive(Debug, Serialize)]
pub struct IdentityView {
    pub ip: IpAddr,
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// The role annotation as written (not resolved against a base ARN); `None` when absent.
    pub role: Option<String>,
    pub external_id: bool,
    /// Why the entry could not be decoded, if it could not.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CounterView {
    pub name: &'static str,
    pub value: u64,
}

/// Everything `inspect` shows.
#[derive(Debug, Serialize)]
pub struct Report {
    pub pin_dir: PathBuf,
    pub links: Vec<LinkView>,
    pub config: Option<ConfigView>,
    pub identity_capacity: Option<u32>,
    pub identities: Vec<IdentityView>,
    pub counters: Vec<CounterView>,
}

fn map_data(pin_dir: &Path, name: &str) -> Result<Option<MapData>, Error> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    MapData::from_pin(&path)
        .map(Some)
        .map_err(|source| Error::Map { path, source })
}

fn links(pin_dir: &Path) -> Result<Vec<LinkView>, Error> {
    let dir = bpf::links_dir(pin_dir);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()
        })
        .map_err(|source| Error::List {
            path: dir.clone(),
            source,
        })?;
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let info = bpf::sys::obj_get(&path)
                .and_then(|fd| bpf::sys::link_info(fd.as_fd()))
                .map_err(|source| Error::Link {
                    path: path.clone(),
                    source,
                })?;
            Ok(LinkView {
                hook: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                link_id: info.id,
                program_id: info.prog_id,
                cgroup_id: info.cgroup_id,
            })
        })
        .collect()
}

fn config(pin_dir: &Path) -> Result<Option<ConfigView>, Error> {
    let Some(config) = bpf::pinned_config(pin_dir).map_err(|source| Error::Map {
        path: pin_dir.join(maps::CONFIG),
        source,
    })?
    else {
        return Ok(None);
    };
    let v4 = |ip: u32| Ipv4Addr::from(ip.to_ne_bytes());
    let v6 = |words: [u32; 4]| Ipv6Addr::from(ip6_octets(words));
    let agent_port = port_from_repr(config.agent_port);
    let metadata_port = port_from_repr(config.metadata_port);
    Ok(Some(ConfigView {
        enabled: config.flags & FLAG_ENABLED != 0,
        agent: format!("{}:{agent_port}", v4(config.agent_ip4)),
        agent_ipv6: (config.flags & FLAG_AGENT_IP6 != 0)
            .then(|| format!("[{}]:{agent_port}", v6(config.agent_ip6))),
        metadata: format!("{}:{metadata_port}", v4(config.metadata_ip4)),
        metadata_ipv6: format!("[{}]:{metadata_port}", v6(config.metadata_ip6)),
        host_netns_cookie: config.host_netns_cookie,
    }))
}

fn identities(pin_dir: &Path) -> Result<(Option<u32>, Vec<IdentityView>), Error> {
    let path = pin_dir.join(maps::IDENTITY);
    let Some(data) = map_data(pin_dir, maps::IDENTITY)? else {
        return Ok((None, Vec::new()));
    };
    let capacity = data.info().ok().map(|i| i.max_entries());
    let map_error = |source| Error::Map {
        path: path.clone(),
        source,
    };
    let map: HashMap<_, Key, Identity> =
        HashMap::try_from(Map::HashMap(data)).map_err(map_error)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        // An entry deleted between the key walk and its lookup ends the walk early at worst.
        let (key, raw) = entry.map_err(map_error)?;
        let ip = identity::ip_of(&key);
        out.push(match identity::decode(&raw) {
            Ok(pod) => IdentityView {
                ip,
                namespace: pod.namespace,
                pod: pod.name,
                uid: pod.uid,
                role: pod.role.shown(),
                external_id: pod.external_id != Annotation::Absent,
                error: None,
            },
            Err(e) => IdentityView {
                ip,
                namespace: String::new(),
                pod: String::new(),
                uid: String::new(),
                role: None,
                external_id: false,
                error: Some(e),
            },
        });
    }
    out.sort_by_key(|v| v.ip);
    Ok((capacity, out))
}

/// Reads everything pinned under `pin_dir`.
pub fn read(pin_dir: &Path) -> Result<Report, Error> {
    if !pin_dir.is_dir() {
        return Err(Error::NoPins {
            path: pin_dir.to_owned(),
        });
    }
    let (identity_capacity, identities) = identities(pin_dir)?;
    let counters = if pin_dir.join(maps::COUNTERS).exists() {
        bpf::pinned_counters(pin_dir)
            .map_err(|source| Error::Counters {
                path: pin_dir.join(maps::COUNTERS),
                source: Box::new(source),
            })?
            .into_iter()
            .map(|(c, value)| CounterView {
                name: Counter::name(c),
                value,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Report {
        pin_dir: pin_dir.to_owned(),
        links: links(pin_dir)?,
        config: config(pin_dir)?,
        identity_capacity,
        identities,
        counters,
    })
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut text = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, header.to_vec());
    for row in rows {
        line(out, row.iter().map(String::as_str).collect());
    }
}

/// The report as text tables.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pins: {}", report.pin_dir.display());

    let _ = writeln!(out, "\nhooks");
    if report.links.is_empty() {
        let _ = writeln!(
            out,
            "  none pinned: metadata connects are not intercepted from this pin directory"
        );
    } else {
        let rows: Vec<_> = report
            .links
            .iter()
            .map(|l| {
                vec![
                    l.hook.clone(),
                    l.link_id.to_string(),
                    l.program_id.to_string(),
                    l.cgroup_id.to_string(),
                ]
            })
            .collect();
        table(&mut out, &["HOOK", "LINK", "PROGRAM", "CGROUP ID"], &rows);
    }

    let _ = writeln!(out, "\nconfig");
    match &report.config {
        None => {
            let _ = writeln!(
                out,
                "  none written: metadata connects from pods are refused"
            );
        }
        Some(c) => {
            let rows = vec![
                vec![
                    "state".to_owned(),
                    if c.enabled {
                        "enabled: metadata connects from pods go to the agent".to_owned()
                    } else {
                        "disabled: metadata connects from pods are refused".to_owned()
                    },
                ],
                vec!["agent".to_owned(), c.agent.clone()],
                vec![
                    "agent ipv6".to_owned(),
                    c.agent_ipv6
                        .clone()
                        .unwrap_or_else(|| "none (IPv6 metadata connects are refused)".into()),
                ],
                vec![
                    "metadata".to_owned(),
                    format!("{} {}", c.metadata, c.metadata_ipv6),
                ],
                vec![
                    "host netns cookie".to_owned(),
                    c.host_netns_cookie.to_string(),
                ],
            ];
            table(&mut out, &["", ""], &rows);
        }
    }

    let capacity = report
        .identity_capacity
        .map_or_else(|| "?".to_owned(), |c| c.to_string());
    let _ = writeln!(
        out,
        "\nidentity map ({} of {capacity} entries)",
        report.identities.len()
    );
    if !report.identities.is_empty() {
        let rows: Vec<_> = report
            .identities
            .iter()
            .map(|i| match &i.error {
                Some(e) => vec![
                    i.ip.to_string(),
                    format!("<corrupt: {e}>"),
                    String::new(),
                    String::new(),
                ],
                None => vec![
                    i.ip.to_string(),
                    format!("{}/{}", i.namespace, i.pod),
                    i.role.clone().unwrap_or_else(|| "-".into()),
                    if i.external_id { "yes" } else { "-" }.to_owned(),
                ],
            })
            .collect();
        table(&mut out, &["IP", "POD", "ROLE", "EXTERNAL ID"], &rows);
    }

    let _ = writeln!(out, "\ncounters");
    if report.counters.is_empty() {
        let _ = writeln!(out, "  none pinned");
    } else {
        let rows: Vec<_> = report
            .counters
            .iter()
            .map(|c| vec![c.name.to_owned(), c.value.to_string()])
            .collect();
        table(&mut out, &["EVENT", "COUNT"], &rows);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section_readably() {
        let report = Report {
            pin_dir: "/sys/fs/bpf/kube2iam".into(),
            links: vec![LinkView {
                hook: "k2i_connect4".into(),
                link_id: 7,
                program_id: 42,
                cgroup_id: 1,
            }],
            config: Some(ConfigView {
                enabled: true,
                agent: "192.0.2.10:8181".into(),
                agent_ipv6: None,
                metadata: "169.254.169.254:80".into(),
                metadata_ipv6: "[fd00:ec2::254]:80".into(),
                host_netns_cookie: 4096,
            }),
            identity_capacity: Some(1024),
            identities: vec![IdentityView {
                ip: "10.0.0.5".parse().unwrap(),
                namespace: "default".into(),
                pod: "web".into(),
                uid: "u".into(),
                role: Some("web-role".into()),
                external_id: false,
                error: None,
            }],
            counters: vec![CounterView {
                name: "redirected_ipv4",
                value: 3,
            }],
        };
        let text = render(&report);
        for needle in [
            "k2i_connect4  7     42       1",
            "enabled: metadata connects from pods go to the agent",
            "identity map (1 of 1024 entries)",
            "10.0.0.5  default/web  web-role  -",
            "redirected_ipv4  3",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
    }
}
