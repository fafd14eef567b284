//! `cargo xtask image`: builds the agent image from `deploy/Dockerfile` and writes it as an OCI
//! archive, without a registry.
//!
//! 1. `cargo build --release --locked -p kube2iam-agent`: the agent, whose build script builds and
//!    embeds the eBPF programs;
//! 2. the build context `target/image/context`: that binary, and `rootfs/` assembled from Debian's
//!    packages of the versions installed here (the ones the binary was linked against), fetched
//!    with `apt-get download`: the dynamic loader and the libraries the binary needs (resolved from
//!    its ELF dynamic section), the CA bundle (ca-certificates' Mozilla set, concatenated as
//!    update-ca-certificates does), the packages' copyright files and an nsswitch.conf;
//! 3. buildah builds the Dockerfile in a private storage under `target/image` (nothing lands in
//!    the machine's container storage) with timestamps set to 0, and pushes the result to
//!    `target/image/kube2iam-ebpf.oci.tar`.
//!
//! The same command makes the image CI runs under a container runtime and the one a release
//! publishes (`skopeo copy oci-archive:… docker://…`): one recipe.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness,
    read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _},
};
use serde_json::Value;

use crate::cmd;

const DOCKERFILE: &str = "deploy/Dockerfile";
const AGENT_PACKAGE: &str = "kube2iam-agent";
/// The image's name, as the chart's default `image.repository` names it.
pub const IMAGE_NAME: &str = "kube2iam-ebpf";
/// Debian packages the runtime files come from. A package whose /usr/share/doc entry is a
/// symlink (libgcc-s1 → gcc-12-base) has its copyright in the package the link names, which is
/// fetched too.
const PACKAGES: &[&str] = &["libc6", "libgcc-s1", "ca-certificates"];
/// Where the dynamic loader looks without an ld.so.cache (Debian's multiarch defaults).
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];
/// glibc reads this for name resolution; without it, DNS would be asked before /etc/hosts.
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Also build the upgrade test's fixture, target/image/kube2iam-ebpf-upgrade.oci.tar: the
    /// same recipe around an agent whose eBPF object differs from the shipped one (see
    /// [`UPGRADE_PATCH`]), as the next release's would.
    #[arg(long)]
    pub upgrade_fixture: bool,
    /// Package this agent binary instead of the release build (for working on the recipe and
    /// the image tests; a published image always comes from the release build).
    #[arg(long, hide = true)]
    pub binary: Option<PathBuf>,
}

/// The image archive `cargo xtask image` writes.
pub fn default_archive() -> PathBuf {
    image_dir().join(format!("{IMAGE_NAME}.oci.tar"))
}

/// The upgrade fixture's archive.
pub fn upgrade_archive() -> PathBuf {
    image_dir().join(format!("{IMAGE_NAME}-upgrade.oci.tar"))
}

/// The upgrade fixture's change to the eBPF programs: every program counts through `count`, so
/// one more (volatile, so kept) stack read there changes every program's instructions, hence
/// their tags, without changing what they do.
const UPGRADE_PATCH: (&str, &str, &str) = (
    "kube2iam-ebpf/src/main.rs",
    "fn count(counter: Counter) {\n",
    "fn count(counter: Counter) {\n    // The upgrade fixture's change (xtask/src/image.rs).\n    \
     // SAFETY: a read of a local.\n    let _ = unsafe { core::ptr::read_volatile(&(counter as u32)) };\n",
);
/// The fixture's binary name, so that building it never replaces target/release/kube2iam-agent.
const UPGRADE_BINARY: &str = "kube2iam-agent-upgrade";

fn image_dir() -> PathBuf {
    cmd::workspace_root().join("target/image")
}

pub fn run(args: &Args) -> Result<()> {
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => build_agent()?,
    };
    package(&binary, &default_archive())?;
    if args.upgrade_fixture {
        let binary = build_upgrade_fixture()?;
        package(&binary, &upgrade_archive())?;
    }
    Ok(())
}

/// The image around `binary`, written to `output`.
fn package(binary: &Path, output: &Path) -> Result<()> {
    let started = Instant::now();
    let version = workspace_version()?;
    let context = image_dir().join("context");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    fs::copy(binary, context.join(AGENT_PACKAGE))
        .with_context(|| format!("copying {} into the build context", binary.display()))?;
    let rootfs_report = assemble_rootfs(binary, &context.join("rootfs"))?;
    let reference = format!("{IMAGE_NAME}:{version}");
    buildah_build(&context, &reference, &version, output)?;
    let size = ArchiveSize::read(output)?;
    println!(
        "image: {} ({reference}), {} files from Debian ({}), layers {:.1} MB compressed, {:.1} MB \
         unpacked, built in {:.0}s",
        output.display(),
        rootfs_report.files,
        rootfs_report.packages.join(", "),
        size.compressed as f64 / 1e6,
        size.unpacked as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo build --release --locked -p kube2iam-agent`; returns the binary.
fn build_agent() -> Result<PathBuf> {
    cmd::run(cmd::cargo().args(["build", "--release", "--locked", "--package", AGENT_PACKAGE]))?;
    let binary = target_dir()?.join("release").join(AGENT_PACKAGE);
    if !binary.is_file() {
        bail!(
            "cargo built {AGENT_PACKAGE} but {} is missing",
            binary.display()
        );
    }
    Ok(binary)
}

/// The upgrade fixture's agent: the workspace's files copied to target/image/upgrade-src with
/// [`UPGRADE_PATCH`] applied and the binary renamed, built in release into a target directory of
/// its own. Not the workspace's: cargo hashes path packages relative to their workspace root, so
/// the copy's crates would share the workspace's artifacts and build-script output, and the eBPF
/// object of one build would end up embedded in the other's binary. (A target directory seeded
/// as a hard-linked copy of the workspace's has the same problem: the build script copies the
/// eBPF object into place, which writes through the link into the workspace's file.) The same
/// release profile as the workspace's, as the next release would have.
fn build_upgrade_fixture() -> Result<PathBuf> {
    let root = cmd::workspace_root();
    let source = image_dir().join("upgrade-src");
    let _ = fs::remove_dir_all(&source);
    let files = cmd::output(cmd::command("git").args([
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
    ]))?;
    for file in files.split('\0').filter(|f| !f.is_empty()) {
        let from = root.join(file);
        if !from.is_file() {
            continue; // deleted in the working tree
        }
        let to = source.join(file);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&from, &to).with_context(|| format!("copying {file}"))?;
    }
    let (file, anchor, replacement) = UPGRADE_PATCH;
    patch(&source.join(file), anchor, replacement)?;
    patch(
        &source.join("kube2iam-agent/Cargo.toml"),
        &format!("[[bin]]\nname = \"{AGENT_PACKAGE}\""),
        &format!("[[bin]]\nname = \"{UPGRADE_BINARY}\""),
    )?;
    let target = target_dir()?.join("image").join("upgrade-target");
    cmd::run(
        cmd::cargo()
            .current_dir(&source)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--release", "--locked", "--package", AGENT_PACKAGE]),
    )?;
    let binary = target.join("release").join(UPGRADE_BINARY);
    if !binary.is_file() {
        bail!(
            "the upgrade fixture built, but {} is missing",
            binary.display()
        );
    }
    Ok(binary)
}

/// Replaces the one occurrence of `anchor` in `path`.
fn patch(path: &Path, anchor: &str, replacement: &str) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.matches(anchor).count() != 1 {
        bail!(
            "{} no longer has exactly one {anchor:?}: update the upgrade fixture's patch in \
             xtask/src/image.rs",
            path.display()
        );
    }
    fs::write(path, text.replacen(anchor, replacement, 1))
        .with_context(|| format!("writing {}", path.display()))
}

fn target_dir() -> Result<PathBuf> {
    let metadata =
        cmd::output(cmd::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: Value = serde_json::from_str(&metadata).context("cargo metadata output")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

fn workspace_version() -> Result<String> {
    let metadata =
        cmd::output(cmd::cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: Value = serde_json::from_str(&metadata).context("cargo metadata output")?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == AGENT_PACKAGE)
        .and_then(|p| p["version"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("cargo metadata does not list {AGENT_PACKAGE}"))
}

struct RootfsReport {
    files: usize,
    packages: Vec<String>,
}

/// Fills `rootfs` with what the binary needs at run time, from Debian's packages.
fn assemble_rootfs(binary: &Path, rootfs: &Path) -> Result<RootfsReport> {
    let debs = image_dir().join("debs");
    let mut packages: Vec<(String, String)> = PACKAGES
        .iter()
        .map(|name| Ok(((*name).to_owned(), installed_version(name)?)))
        .collect::<Result<_>>()?;
    let unpacked = image_dir().join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    let mut trees = BTreeMap::new();
    let mut index = 0;
    while index < packages.len() {
        let (name, version) = packages[index].clone();
        let deb = download(&debs, &name, &version)?;
        let tree = unpacked.join(&name);
        fs::create_dir_all(&tree)?;
        cmd::run(cmd::command("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        // A doc directory that is a symlink names the package holding the copyright.
        let doc = tree.join("usr/share/doc").join(&name);
        if let Ok(target) = fs::read_link(&doc) {
            let other = target.to_string_lossy().into_owned();
            if !packages.iter().any(|(n, _)| *n == other) {
                let version = installed_version(&other)?;
                packages.push((other, version));
            }
        }
        trees.insert(name, tree);
        index += 1;
    }

    let _ = fs::remove_dir_all(rootfs);
    fs::create_dir_all(rootfs)?;
    let mut files = 0;
    // The loader and the libraries, resolved through the binary's dynamic section.
    let mut wanted: Vec<PathBuf> = Vec::new();
    let needs = elf_needs(binary)?;
    let interpreter = needs
        .interpreter
        .with_context(|| format!("{} has no ELF interpreter", binary.display()))?;
    wanted.push(PathBuf::from(interpreter.trim_start_matches('/')));
    let mut queue: Vec<String> = needs.libraries;
    let mut seen = BTreeSet::new();
    while let Some(library) = queue.pop() {
        if !seen.insert(library.clone()) {
            continue;
        }
        let (relative, tree) = find_library(&trees, &library).with_context(|| {
            format!(
                "{} needs {library}, which none of the packages {} ships",
                binary.display(),
                trees.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        queue.extend(elf_needs(&tree.join(&relative))?.libraries);
        wanted.push(relative);
    }
    for relative in &wanted {
        files += copy_with_links(&trees, relative, rootfs)?;
    }
    if !rootfs.join(wanted[0].as_path()).exists() {
        bail!("the loader {} is not in libc6", wanted[0].display());
    }

    // The CA bundle: every certificate ca-certificates ships (its default selection).
    let mozilla = trees["ca-certificates"].join("usr/share/ca-certificates/mozilla");
    let mut certificates: Vec<PathBuf> = fs::read_dir(&mozilla)
        .with_context(|| format!("reading {}", mozilla.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    certificates.sort();
    if certificates.is_empty() {
        bail!("{} holds no certificates", mozilla.display());
    }
    let mut bundle = String::new();
    for certificate in &certificates {
        let pem = fs::read_to_string(certificate)
            .with_context(|| format!("reading {}", certificate.display()))?;
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    write_file(rootfs, "etc/ssl/certs/ca-certificates.crt", &bundle, 0o644)?;
    write_file(rootfs, "etc/nsswitch.conf", NSSWITCH, 0o644)?;
    files += 2;

    // Copyright files of every package something was taken from.
    for (name, tree) in &trees {
        let doc = tree.join("usr/share/doc").join(name);
        if fs::read_link(&doc).is_ok() {
            continue;
        }
        let copyright = doc.join("copyright");
        let text = fs::read_to_string(&copyright)
            .with_context(|| format!("{name} has no {}", copyright.display()))?;
        write_file(
            rootfs,
            &format!("usr/share/doc/{name}/copyright"),
            &text,
            0o644,
        )?;
        files += 1;
    }
    Ok(RootfsReport {
        files,
        packages: packages
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect(),
    })
}

fn write_file(root: &Path, relative: &str, text: &str, mode: u32) -> Result<()> {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The version of `package` installed here: the glibc the binary was linked against.
fn installed_version(package: &str) -> Result<String> {
    let version = cmd::output(
        cmd::command("dpkg-query")
            .args(["--show", "--showformat=${Version}"])
            .arg(package),
    )
    .with_context(|| {
        format!(
            "{package} is not installed: the image is built from the Debian packages installed here"
        )
    })?;
    Ok(version.trim().to_owned())
}

/// `apt-get download package=version` into `dir` (kept as a cache).
fn download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let file_version = version.replace(':', "%3a");
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&format!("{package}_{file_version}_")) && n.ends_with(".deb")
                })
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    let mut command = cmd::command("apt-get");
    command
        .current_dir(dir)
        .arg("-q")
        .args(["download", &format!("{package}={version}")]);
    if cmd::is_root() {
        // Root's apt hands downloads to the `_apt` user, which cannot write here.
        command.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd::run(&mut command).with_context(|| {
        format!(
            "could not download {package} {version} (the installed version) from the Debian \
             archive; `apt-get update`, or upgrade {package} to a version the archive still has"
        )
    })?;
    find().with_context(|| format!("apt-get download left no {package}_{version} .deb"))
}

struct ElfNeeds {
    interpreter: Option<String>,
    libraries: Vec<String>,
}

/// PT_INTERP and DT_NEEDED of an ELF file.
fn elf_needs(path: &Path) -> Result<ElfNeeds> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let elf = ElfFile64::<Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    let endian = elf.endian();
    let header = elf.elf_header();
    let mut interpreter = None;
    for segment in header.program_headers(endian, &*data)? {
        if let Some(bytes) = segment.interpreter(endian, &*data)? {
            interpreter = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    let sections = header.sections(endian, &*data)?;
    let mut libraries = Vec::new();
    if let Some((entries, index)) = sections.dynamic(endian, &*data)? {
        // The index is that of the string table the dynamic section links to.
        let strings = sections.strings(endian, &*data, index)?;
        for entry in entries {
            if entry.d_tag(endian) == u64::from(object::elf::DT_NEEDED) {
                let name = entry.string(endian, strings)?;
                libraries.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(ElfNeeds {
        interpreter,
        libraries,
    })
}

/// Where a library lies in the unpacked packages: its path relative to the root, and the tree.
fn find_library<'t>(
    trees: &'t BTreeMap<String, PathBuf>,
    library: &str,
) -> Option<(PathBuf, &'t PathBuf)> {
    LIBRARY_DIRS.iter().find_map(|dir| {
        let relative = Path::new(dir).join(library);
        trees
            .values()
            .find(|tree| tree.join(&relative).symlink_metadata().is_ok())
            .map(|tree| (relative, tree))
    })
}

/// Copies `relative` from whichever tree has it into `rootfs`, following and recreating
/// symlinks (the loader's /lib64 entry is one). Returns the number of entries written.
fn copy_with_links(
    trees: &BTreeMap<String, PathBuf>,
    relative: &Path,
    rootfs: &Path,
) -> Result<usize> {
    let tree = trees
        .values()
        .find(|tree| tree.join(relative).symlink_metadata().is_ok())
        .with_context(|| format!("no package ships /{}", relative.display()))?;
    let source = tree.join(relative);
    let destination = rootfs.join(relative);
    if destination.symlink_metadata().is_ok() {
        return Ok(0);
    }
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)?;
    }
    let metadata = source.symlink_metadata()?;
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(&source)?;
        symlink(&target, &destination)
            .with_context(|| format!("linking {}", destination.display()))?;
        let resolved = if target.is_absolute() {
            target
                .strip_prefix("/")
                .map(Path::to_path_buf)
                .unwrap_or_default()
        } else {
            relative.parent().unwrap_or(Path::new("")).join(&target)
        };
        return Ok(1 + copy_with_links(trees, &resolved, rootfs)?);
    }
    fs::copy(&source, &destination).with_context(|| format!("copying {}", source.display()))?;
    fs::set_permissions(&destination, metadata.permissions())?;
    Ok(1)
}

/// buildah with its storage under target/image, so nothing lands in the machine's storage.
fn buildah(storage: &Path) -> std::process::Command {
    let mut command = cmd::command("buildah");
    command
        .arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs"]);
    command
}

fn buildah_build(context: &Path, reference: &str, version: &str, output: &Path) -> Result<()> {
    if cmd::output(cmd::command("buildah").arg("--version")).is_err() {
        bail!("buildah is missing: run `cargo xtask install` (or `apt-get install buildah`)");
    }
    let storage = image_dir().join("storage");
    let _ = fs::remove_dir_all(&storage);
    let revision = cmd::output(cmd::command("git").args(["rev-parse", "HEAD"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let result = (|| {
        cmd::run(
            buildah(&storage)
                .args(["build", "--quiet", "--format", "oci", "--timestamp", "0"])
                .args(["--pull-never", "--layers=false"])
                .arg("--file")
                .arg(cmd::workspace_root().join(DOCKERFILE))
                .args(["--build-arg", &format!("VERSION={version}")])
                .args(["--build-arg", &format!("REVISION={revision}")])
                .args(["--tag", &format!("localhost/{reference}")])
                .arg(context),
        )?;
        let _ = fs::remove_file(output);
        if let Some(parent) = output.parent() {
            fs::create_dir_all(parent)?;
        }
        cmd::run(
            buildah(&storage)
                .args(["push", "--quiet", &format!("localhost/{reference}")])
                .arg(format!("oci-archive:{}:{reference}", output.display())),
        )
    })();
    // The storage was only the way to the archive.
    let _ = fs::remove_dir_all(&storage);
    result
}

/// The layers' sizes, read from the archive's manifest and config.
struct ArchiveSize {
    compressed: u64,
    unpacked: u64,
}

impl ArchiveSize {
    fn read(archive: &Path) -> Result<ArchiveSize> {
        let dir = image_dir().join("inspect");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        cmd::run(
            cmd::command("tar")
                .arg("-xf")
                .arg(archive)
                .arg("-C")
                .arg(&dir),
        )?;
        let blob = |digest: &str| -> Result<PathBuf> {
            let hex = digest
                .strip_prefix("sha256:")
                .with_context(|| format!("unexpected digest {digest}"))?;
            Ok(dir.join("blobs/sha256").join(hex))
        };
        let json = |path: PathBuf| -> Result<Value> {
            serde_json::from_slice(&fs::read(&path)?)
                .with_context(|| format!("parsing {}", path.display()))
        };
        let index = json(dir.join("index.json"))?;
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .context("index.json lists no manifest")?;
        let manifest = json(blob(manifest_digest)?)?;
        let compressed = manifest["layers"]
            .as_array()
            .context("the manifest lists no layers")?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum();
        // The unpacked size: the uncompressed layer tars.
        let mut unpacked = 0;
        for layer in manifest["layers"].as_array().into_iter().flatten() {
            let digest = layer["digest"].as_str().context("a layer without digest")?;
            let path = blob(digest)?;
            let media = layer["mediaType"].as_str().unwrap_or("");
            let size = if media.ends_with("gzip") {
                let out = cmd::command("sh")
                    .arg("-c")
                    .arg("gzip -dc \"$0\" | wc -c")
                    .arg(&path)
                    .output()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            } else {
                fs::metadata(&path)?.len()
            };
            unpacked += size;
        }
        let _ = fs::remove_dir_all(&dir);
        Ok(ArchiveSize {
            compressed,
            unpacked,
        })
    }
}
