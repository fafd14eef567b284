//! The kernels of the VM matrix: Debian's cloud kernels, fetched with apt from Debian's archive
//! through a private apt configuration (the machine's sources are not touched), and cached in
//! `.cache/vm`: the .deb, the kernel image, and the few modules the tests need (veth, the tc
//! modules of the packet guard, and their dependencies), decompressed.
//!
//! Fetching is idempotent: a kernel whose `stamp` file exists is not fetched again (when the
//! module list grew, it is unpacked again from the cached .deb).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSection as _};

use crate::cmd;

/// One kernel of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// How the matrix names it (`--kernel 5.10`).
    pub name: &'static str,
    /// The Debian suite that ships it.
    pub suite: &'static str,
    /// What EKS runs this kernel (for the report).
    pub seen_on: &'static str,
}

/// Debian's kernels closest to the ones EKS nodes run: Amazon Linux 2 and Bottlerocket (5.10),
/// AL2023 (6.1, 6.12).
pub const KERNELS: [KernelSpec; 3] = [
    KernelSpec {
        name: "5.10",
        suite: "bullseye",
        seen_on: "Amazon Linux 2, Bottlerocket",
    },
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
        seen_on: "AL2023, Bottlerocket",
    },
    KernelSpec {
        name: "6.12",
        suite: "bookworm-backports",
        seen_on: "AL2023",
    },
];

/// The flavour's metapackage: cloud-amd64 kernels are Debian's EC2 builds (fewer drivers, a
/// faster boot under emulation), with veth as a module and BTF.
const METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Modules the tests load in the VM (their dependencies are added): veth for the pod, and the
/// clsact qdisc and cls_bpf classifier for the packet guard on kernels before TCX (6.6).
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];
const ARCHIVE: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A fetched kernel, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub spec: KernelSpec,
    /// `uname -r`, e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// The package version, e.g. `6.1.176-1`.
    pub version: String,
    pub image: PathBuf,
    /// Module files in load order.
    pub modules: Vec<PathBuf>,
}

pub fn cache_dir() -> PathBuf {
    cmd::workspace_root().join(".cache/vm")
}

fn kernel_dir(spec: &KernelSpec) -> PathBuf {
    cache_dir().join("kernels").join(spec.name)
}

pub fn spec(name: &str) -> Option<KernelSpec> {
    KERNELS.iter().copied().find(|k| k.name == name)
}

/// Makes sure every kernel of the matrix is in the cache (`cargo xtask install` calls this).
pub fn ensure_all() -> Result<()> {
    for spec in KERNELS {
        let kernel = ensure(spec)?;
        println!(
            "kernel {}: {} ({}) cached in {}",
            spec.name,
            kernel.release,
            kernel.version,
            kernel_dir(&spec).display()
        );
    }
    Ok(())
}

/// The kernel from the cache, fetched first if it is not there.
pub fn ensure(spec: KernelSpec) -> Result<Kernel> {
    if let Some(kernel) = cached(spec) {
        return Ok(kernel);
    }
    if let Some(kernel) = reunpack(spec)? {
        return Ok(kernel);
    }
    fetch(spec)?;
    cached(spec).with_context(|| {
        format!(
            "fetched kernel {} but {} is incomplete",
            spec.name,
            kernel_dir(&spec).display()
        )
    })
}

/// A kernel unpacked before MODULES grew: unpacked again from the .deb it came from, without
/// asking apt (which could pick a newer kernel).
fn reunpack(spec: KernelSpec) -> Result<Option<Kernel>> {
    let dir = kernel_dir(&spec);
    let Ok(stamp) = fs::read_to_string(dir.join("stamp")) else {
        return Ok(None);
    };
    let field = |key: &str| {
        stamp
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
    };
    let (Some(release), Some(version), Some(deb)) =
        (field("release="), field("version="), field("deb="))
    else {
        return Ok(None);
    };
    let deb = PathBuf::from(deb);
    if !deb.is_file() {
        return Ok(None);
    }
    println!(
        "kernel {}: unpacking {} again for the modules {MODULES:?}",
        spec.name,
        deb.display()
    );
    unpack(spec, &deb, &release, &version)?;
    Ok(cached(spec))
}

fn cached(spec: KernelSpec) -> Option<Kernel> {
    let dir = kernel_dir(&spec);
    let stamp = fs::read_to_string(dir.join("stamp")).ok()?;
    let mut release = None;
    let mut version = None;
    for line in stamp.lines() {
        if let Some(v) = line.strip_prefix("release=") {
            release = Some(v.to_owned());
        }
        if let Some(v) = line.strip_prefix("version=") {
            version = Some(v.to_owned());
        }
    }
    let image = dir.join("vmlinuz");
    let order = fs::read_to_string(dir.join("modules.order")).ok()?;
    let modules: Vec<PathBuf> = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| dir.join("modules").join(l))
        .collect();
    if !image.is_file() || modules.iter().any(|m| !m.is_file()) {
        return None;
    }
    // Unpacked before a module was added to MODULES.
    if MODULES
        .iter()
        .any(|m| !order.lines().any(|l| l == format!("{m}.ko")))
    {
        return None;
    }
    Some(Kernel {
        spec,
        release: release?,
        version: version?,
        image,
        modules,
    })
}

/// apt with a private configuration: sources, lists and package cache under `.cache/vm/apt`.
fn apt(tool: &str, suite: &str) -> Result<std::process::Command> {
    let root = cache_dir().join("apt").join(suite);
    for dir in [
        "etc/sources.list.d",
        "etc/preferences.d",
        "state/lists/partial",
        "cache/archives/partial",
    ] {
        fs::create_dir_all(root.join(dir))
            .with_context(|| format!("creating {}", root.join(dir).display()))?;
    }
    let sources = root.join("etc/sources.list");
    fs::write(
        &sources,
        format!("deb [signed-by={KEYRING}] {ARCHIVE} {suite} main\n"),
    )
    .with_context(|| format!("writing {}", sources.display()))?;
    let mut command = cmd::command(tool);
    let set = |key: &str, value: &Path| format!("{key}={}", value.display());
    command
        .arg("-q")
        .args(["-o", &set("Dir::Etc::sourcelist", &sources)])
        .args([
            "-o",
            &set("Dir::Etc::sourceparts", &root.join("etc/sources.list.d")),
        ])
        .args([
            "-o",
            &set(
                "Dir::Etc::preferencesparts",
                &root.join("etc/preferences.d"),
            ),
        ])
        .args(["-o", &set("Dir::State", &root.join("state"))])
        .args(["-o", &set("Dir::Cache", &root.join("cache"))])
        .args(["-o", "Dir::State::status=/var/lib/dpkg/status"]);
    if cmd::is_root() {
        // Root's apt hands downloads to the `_apt` user, which cannot write to our cache.
        command.args(["-o", "APT::Sandbox::User=root"]);
    }
    Ok(command)
}

/// `Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)` → the image package and version.
pub fn image_package(show: &str) -> Option<(String, String)> {
    let depends = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    let first = depends.split(',').next()?.trim();
    let (name, rest) = first.split_once(' ').unwrap_or((first, ""));
    let version = rest
        .trim()
        .strip_prefix("(=")
        .and_then(|v| v.strip_suffix(')'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    name.starts_with("linux-image-")
        .then(|| (name.to_owned(), version))
}

fn fetch(spec: KernelSpec) -> Result<()> {
    println!(
        "kernel {}: fetching from Debian {} with apt",
        spec.name, spec.suite
    );
    cmd::run(apt("apt-get", spec.suite)?.arg("update"))?;
    let show = cmd::output(apt("apt-cache", spec.suite)?.args(["show", METAPACKAGE]))?;
    // apt-cache lists the newest version first.
    let first = show.split("\n\n").next().unwrap_or("");
    let (package, version) = image_package(first).with_context(|| {
        format!(
            "{METAPACKAGE} in {} names no linux-image package:\n{first}",
            spec.suite
        )
    })?;
    let debs = cache_dir().join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb_name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let deb = debs.join(&deb_name);
    if !deb.is_file() {
        let mut download = apt("apt-get", spec.suite)?;
        download.current_dir(&debs);
        cmd::run(download.args(["download", &format!("{package}={version}")]))?;
    }
    if !deb.is_file() {
        bail!("apt-get download left no {}", deb.display());
    }
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    unpack(spec, &deb, &release, &version)
}

/// Takes the image and the needed modules out of the .deb.
fn unpack(spec: KernelSpec, deb: &Path, release: &str, version: &str) -> Result<()> {
    let dir = kernel_dir(&spec);
    let tree = dir.join("extract");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    cmd::run(cmd::command("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    let image = tree.join(format!("boot/vmlinuz-{release}"));
    fs::copy(&image, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", image.display()))?;

    let modules_root = tree.join(format!("lib/modules/{release}"));
    let index = module_index(&modules_root)?;
    let order = resolve(&index, MODULES)?;
    let out = dir.join("modules");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut names = Vec::new();
    for name in &order {
        let source = &index[name];
        let file = format!("{name}.ko");
        fs::write(out.join(&file), module_bytes(source)?)
            .with_context(|| format!("writing {file}"))?;
        names.push(file);
    }
    fs::write(dir.join("modules.order"), names.join("\n") + "\n")?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    fs::write(
        dir.join("stamp"),
        format!(
            "release={release}\nversion={version}\ndeb={}\n",
            deb.display()
        ),
    )?;
    Ok(())
}

/// Module name (dashes as underscores) → file, for every module in the tree.
fn module_index(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    Ok(index)
}

/// `veth.ko`, `veth.ko.xz`, `veth.ko.zst` → `veth`.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// A module file's bytes, decompressed (the VM loads plain .ko files).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let output = cmd::command(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc {}", path.display()))?;
            if !output.status.success() {
                bail!("{tool} -dc {} failed", path.display());
            }
            Ok(output.stdout)
        }
    }
}

/// The `depends=` of a module's `.modinfo`.
pub fn depends(module: &[u8]) -> Result<Vec<String>> {
    let file = object::File::parse(module).context("parsing a kernel module")?;
    let Some(section) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let data = section.data().context("reading .modinfo")?;
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.strip_prefix("depends="))
        .flat_map(|list| list.split(','))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// The modules in load order: dependencies first.
fn resolve(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<String>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        for dep in depends(&module_bytes(path)?)? {
            visit(&dep, index, seen, order)?;
        }
        order.push(name.to_owned());
        Ok(())
    }
    for name in wanted {
        visit(name, index, &mut seen, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_image_package_in_apt_cache_show() {
        let show = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.176+1)\n\
                    Version: 6.1.176-1\nDepends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\n";
        assert_eq!(
            image_package(show),
            Some((
                "linux-image-6.1.0-50-cloud-amd64".to_owned(),
                "6.1.176-1".to_owned()
            ))
        );
        assert_eq!(image_package("Depends: libc6\n"), None);
        assert_eq!(image_package("Package: x\n"), None);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name(Path::new("a/veth.ko")).as_deref(), Some("veth"));
        assert_eq!(
            module_name(Path::new("a/nf-conntrack.ko.xz")).as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(module_name(Path::new("a/modules.dep")), None);
    }

    #[test]
    fn every_kernel_has_a_suite() {
        assert_eq!(spec("6.12").map(|k| k.suite), Some("bookworm-backports"));
        assert!(spec("4.19").is_none());
    }
}
