//! The egress backstop: `k2i_egress` (cgroup_skb/egress) on the cgroup the connect hooks are
//! attached to. It drops packets that sockets in the cgroup address to the metadata service
//! unless the socket connected there itself (which the connect hooks allow only in the host
//! network namespace): a DNAT rule inside a pod, raw sockets and unconnected UDP reach the
//! metadata address on whatever interface they leave by, so this does not depend on interface
//! names as the tc guard does.
//!
//! Same lifecycle as the connect hooks: a bpf_link pinned at `<pin dir>/links/k2i_egress`, adopted
//! by a restarted agent, its program swapped atomically through the link when it changed, and
//! removed by `uninstall` (which detaches every pinned link).

use std::{fs, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};
use kube2iam_common::programs;

use super::{Error, ProgramReport, Result, sys};

/// Where the link is pinned.
pub fn link_path(pin_dir: &Path) -> std::path::PathBuf {
    super::link_path(pin_dir, programs::EGRESS)
}

/// Attaches the backstop to `cgroup`, or adopts the pinned link (swapping its program when it
/// differs from ours or `force_replace` is set).
pub fn install(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    cgroup: &Path,
    cgroup_id: u64,
    force_replace: bool,
) -> Result<ProgramReport> {
    let name = programs::EGRESS;
    let program: &mut CgroupSkb = super::program_mut(ebpf, name)?;
    program
        .load()
        .map_err(|source| Error::Program { name, source })?;
    let path = link_path(pin_dir);
    if path.exists() {
        let fd = program
            .fd()
            .map_err(|source| Error::Program { name, source })?;
        return super::adopt(name, fd, &path, cgroup_id, cgroup, force_replace);
    }
    let cgroup_file = fs::File::open(cgroup)
        .map_err(|e| Error::io(format!("open cgroup {}", cgroup.display()), e))?;
    // A bpf_link on a cgroup is multi-program by nature; "Single" passes no flag (see
    // `super::attach`).
    super::attach(name, &path, || {
        let link_id = program.attach(
            &cgroup_file,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )?;
        program.take_link(link_id).map(FdLink::try_from)
    })
}

/// Detaches and unpins the backstop (`--egress-guard false`); whether there was one.
pub fn release(pin_dir: &Path) -> Result<bool> {
    let path = link_path(pin_dir);
    if !path.exists() {
        return Ok(false);
    }
    if let Ok(link) = sys::obj_get(&path) {
        // Kernels before 5.9 cannot force a detach; unpinning then drops the last reference.
        let _ = sys::link_detach(link.as_fd());
    }
    fs::remove_file(&path).map_err(|e| Error::io(format!("unpin {}", path.display()), e))?;
    Ok(true)
}
