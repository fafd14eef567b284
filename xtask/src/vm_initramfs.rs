//! The VM's initramfs, written as a newc cpio archive: `/init` (k2i-vm-init), the agent, the
//! probe and k2i-raw under /bin, iproute2's `ip`, the shared libraries they link (found with
//! ldd), and the kernel's modules with their load order in /k2i/modules.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, vm_kernels::Kernel};

/// A newc ("070701") cpio archive being written in memory.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFLNK: u32 = 0o120_000;

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.next_ino += 1;
        let name_len = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
            0, // mtime
            body.len(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_len,
            0, // check
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// Adds `path`'s parent directories that are not there yet.
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let name = prefix.clone();
                self.entry(&name, S_IFDIR | 0o755, (0, 0), &[]);
            }
        }
    }

    pub fn dir(&mut self, path: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, body: &[u8]) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFREG | mode, (0, 0), body);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks, as cpio writes them.
        while !self.data.len().is_multiple_of(512) {
            self.data.push(0);
        }
        self.data
    }
}

/// The absolute paths of the shared libraries (and the loader) `binary` needs, from ldd.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = cmd::output(cmd::command("ldd").arg(binary))?;
    Ok(parse_ldd(&output))
}

/// Library paths in ldd's output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// the loader's own `/lib64/ld-linux-x86-64.so.2 (0x...)`.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The binaries the VM runs, stripped of debug info (the debug builds are large).
pub struct Payload {
    pub init: PathBuf,
    pub agent: PathBuf,
    pub probe: PathBuf,
    /// k2i-raw: packets to the metadata address without connect() (the guard rows).
    pub raw: PathBuf,
}

/// Host tools copied in with their libraries.
const HOST_TOOLS: &[(&str, &str)] = &[("ip", "/bin/ip")];

fn host_tool(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("{name} is not installed (apt-get install iproute2)")
}

/// Builds the initramfs for `kernel` at `out`.
pub fn build(payload: &Payload, kernel: &Kernel, out: &Path) -> Result<u64> {
    let mut cpio = Cpio::default();
    for dir in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "k2i"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.char_device("dev/null", 1, 3);
    cpio.file("etc/hostname", 0o644, b"k2i-vm\n");

    let mut binaries: Vec<(PathBuf, String)> = vec![
        (payload.init.clone(), "init".into()),
        (payload.agent.clone(), "bin/kube2iam-agent".into()),
        (payload.probe.clone(), "bin/k2i-probe".into()),
        (payload.raw.clone(), "bin/k2i-raw".into()),
    ];
    for (tool, at) in HOST_TOOLS {
        binaries.push((host_tool(tool)?, at.trim_start_matches('/').to_owned()));
    }
    let mut libraries = BTreeSet::new();
    for (binary, at) in &binaries {
        let body = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
        cpio.file(at, 0o755, &body);
        libraries.extend(shared_libraries(binary)?);
    }
    for library in &libraries {
        let body = fs::read(library).with_context(|| format!("reading {}", library.display()))?;
        cpio.file(&library.to_string_lossy(), 0o755, &body);
    }
    // Debian's merged /usr: libraries may be named under /usr/lib too.
    cpio.symlink("usr/lib", "../lib");
    cpio.symlink("usr/bin", "../bin");
    cpio.symlink("usr/sbin", "../bin");
    cpio.symlink("sbin", "bin");

    let mut order = String::new();
    for module in &kernel.modules {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let body = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        let at = format!("k2i/modules.d/{name}");
        cpio.file(&at, 0o644, &body);
        order.push_str(&format!("/{at}\n"));
    }
    cpio.file("k2i/modules", 0o644, order.as_bytes());

    let data = cpio.finish();
    fs::write(out, &data).with_context(|| format!("writing {}", out.display()))?;
    Ok(data.len() as u64)
}

/// Copies `binary` to `dir` without its debug info.
pub fn stripped(binary: &Path, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = binary
        .file_name()
        .with_context(|| format!("{} has no file name", binary.display()))?;
    let out = dir.join(name);
    cmd::output(
        cmd::command("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&out),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn newc_layout() {
        let mut cpio = Cpio::default();
        cpio.file("bin/x", 0o755, b"abc");
        let data = cpio.finish();
        assert_eq!(data.len() % 512, 0);
        let text = String::from_utf8_lossy(&data);
        // The parent directory comes first, then the file, then the trailer.
        let dir = text.find("bin\0").expect("directory entry");
        let file = text.find("bin/x\0").expect("file entry");
        let trailer = text.find("TRAILER!!!\0").expect("trailer");
        assert!(dir < file && file < trailer);
        assert!(text.starts_with("070701"));
        // Header fields are 8 hex digits: filesize of bin/x is 3.
        let header = &text[file - 110 + 6..file];
        assert_eq!(&header[6 * 8..7 * 8], "00000003", "{header}");
        assert_eq!(&header[8..16], format!("{:08x}", S_IFREG | 0o755));
    }
}
