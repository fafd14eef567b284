//! What integration tests create on the machine, and how to find what they left behind.
//!
//! The test kit names everything it creates so it can be told apart from the machine's own:
//! network namespaces `k2i-*` (with their veths), cgroups `<cgroup2>/k2i-test-*`, and mounts
//! (bpffs for pins, among others) under /run/kube2iam-test.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::cmd;

pub const NETNS_PREFIX: &str = "k2i-";
/// Veths live in the test namespaces; one in the machine's namespace is a leftover too.
pub const LINK_PREFIX: &str = "k2i-";
pub const CGROUP_PREFIX: &str = "k2i-test-";
pub const RUN_DIR: &str = "/run/kube2iam-test";

#[derive(Default)]
pub struct Leftovers {
    pub netns: Vec<String>,
    pub links: Vec<String>,
    /// Top-level test cgroups; their children go with them.
    pub cgroups: Vec<PathBuf>,
    /// In mount order: unmount from the end.
    pub mounts: Vec<PathBuf>,
}

impl Leftovers {
    pub fn find() -> Result<Self> {
        Ok(Self {
            netns: netns()?,
            links: links()?,
            cgroups: cgroups()?,
            mounts: mounts_under(Path::new(RUN_DIR))?,
        })
    }

    /// Like [`Leftovers::find`], but gives the kernel up to `grace` to finish tearing down what
    /// was just released (a veth goes away only when its namespace is destroyed, asynchronously).
    pub fn find_settled(grace: Duration) -> Result<Self> {
        let deadline = Instant::now() + grace;
        loop {
            let found = Self::find()?;
            if found.is_empty() || Instant::now() >= deadline {
                return Ok(found);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.netns.is_empty()
            && self.links.is_empty()
            && self.cgroups.is_empty()
            && self.mounts.is_empty()
    }

    /// One line per leftover, e.g. `netns k2i-node-1`.
    pub fn lines(&self) -> Vec<String> {
        let netns = self.netns.iter().map(|name| format!("netns {name}"));
        let links = self.links.iter().map(|name| format!("link {name}"));
        let cgroups = self
            .cgroups
            .iter()
            .map(|path| format!("cgroup {}", path.display()));
        let mounts = self
            .mounts
            .iter()
            .map(|path| format!("mount {}", path.display()));
        netns.chain(links).chain(cgroups).chain(mounts).collect()
    }
}

/// Named network namespaces from `ip netns list` (lines like `k2i-node-1 (id: 3)`).
fn netns() -> Result<Vec<String>> {
    let list = cmd::output(cmd::command("ip").args(["netns", "list"]))?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Links in the machine's network namespace (lines like `7: k2i-h-a@if6: <BROADCAST,…`).
pub fn links() -> Result<Vec<String>> {
    let list = cmd::output(cmd::command("ip").args(["-o", "link", "show"]))?;
    Ok(list
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| name.starts_with(LINK_PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Test cgroups in the cgroup2 hierarchy and, on hybrid hosts, in the v1 hierarchies (where
/// runc creates a container's cgroups too, for the image tests).
fn cgroups() -> Result<Vec<PathBuf>> {
    let roots: Vec<PathBuf> = proc_mounts()?
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup2" || fstype == "cgroup")
        .map(|(path, _)| path)
        .collect();
    let mut found = Vec::new();
    for root in roots {
        for entry in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
            let entry = entry.with_context(|| format!("listing {}", root.display()))?;
            let is_test_cgroup = entry
                .file_name()
                .to_string_lossy()
                .starts_with(CGROUP_PREFIX);
            if is_test_cgroup && entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Mount points at or below `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(proc_mounts()?
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path.starts_with(dir))
        .collect())
}

/// (mount point, filesystem type) for each line of /proc/mounts, in mount order.
fn proc_mounts() -> Result<Vec<(PathBuf, String)>> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _source = fields.next()?;
            let target = fields.next()?;
            let fstype = fields.next()?;
            Some((PathBuf::from(unescape(target)), fstype.to_owned()))
        })
        .collect())
}

/// Undoes the octal escapes /proc/mounts uses for space, tab, newline and backslash (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescape_decodes_octal_escapes_from_proc_mounts() {
        assert_eq!(
            unescape(r"/run/kube2iam-test/a\040b"),
            "/run/kube2iam-test/a b"
        );
        assert_eq!(unescape(r"/plain/path"), "/plain/path");
        assert_eq!(unescape(r"\134"), "\\");
        assert_eq!(unescape(r"\9999"), r"\9999");
    }
}
