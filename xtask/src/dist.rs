//! `cargo xtask dist`: release artifacts of the client and the relay for people without
//! Rust, in `target/dist/`:
//!
//! - `secure-chat-VERSION-linux-x86_64.tar.gz`: `bin/`, `share/applications`,
//!   `share/icons`, `share/doc` under one top directory, to unpack into `~/.local` (or
//!   `/usr/local`) with `--strip-components=1`;
//! - `secure-chat_VERSION_amd64.deb`: the same files under `/usr` (built with `dpkg-deb`);
//! - `secure-chat-VERSION-windows-x86_64.zip`: `chat-client.exe`, `chat-server.exe` and the
//!   README (skipped with `--linux-only`);
//! - `SHA256SUMS` for all of them.
//!
//! Linux binaries are built with `cargo zigbuild` against glibc 2.28 and checked with
//! readelf. `--check` then unpacks the `.deb` with `dpkg -x` into a scratch directory and
//! runs a relay and two headless clients from it: a message must be delivered.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use sha2::{Digest, Sha256};

use xtask::cross::{self, BUILD_GLIBC, LINUX_TARGET, WINDOWS_TARGET};
use xtask::headless::{events, say, wait_event};
use xtask::procs::Processes;
use xtask::{project_root, target_dir};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build only the Linux artifacts (.tar.gz and .deb)
    #[arg(long)]
    linux_only: bool,
    /// After building, install the .deb into a scratch directory (`dpkg -x`) and run a
    /// relay and two headless clients from it
    #[arg(long)]
    check: bool,
    /// Where to put the artifacts [default: target/dist]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The fallback font shipped for machines with no fonts for a script [default:
    /// Debian's fonts-unifont, /usr/share/fonts/opentype/unifont/unifont.otf]
    #[arg(long, value_name = "FILE")]
    fallback_font: Option<PathBuf>,
}

const UNIFONT: &str = "/usr/share/fonts/opentype/unifont/unifont.otf";
const UNIFONT_LICENSE: &str = "/usr/share/doc/fonts-unifont/copyright";

/// The fallback font and its licence text.
struct Fallback {
    font: PathBuf,
    license: Option<PathBuf>,
}

/// The package (and desktop entry, icon and window app id) name.
const NAME: &str = "secure-chat";
const BINARIES: [&str; 2] = ["chat-client", "chat-server"];

const DESKTOP_ENTRY: &str = "[Desktop Entry]
Type=Application
Name=Secure Chat
GenericName=Encrypted chat
Comment=End-to-end encrypted chat through a relay you trust
Exec=chat-client
Icon=secure-chat
Terminal=false
Categories=Network;InstantMessaging;Chat;
Keywords=chat;messenger;encrypted;e2e;
StartupWMClass=secure-chat
";

pub fn run(args: Args) -> anyhow::Result<()> {
    let version = client_version()?;
    let fallback = match args.fallback_font {
        Some(font) => Fallback {
            font,
            license: None,
        },
        None => Fallback {
            font: PathBuf::from(UNIFONT),
            license: Some(PathBuf::from(UNIFONT_LICENSE)),
        },
    };
    ensure!(
        fallback.font.is_file(),
        "the fallback font {} is missing: install Debian's fonts-unifont, or pass \
         --fallback-font FILE (a TrueType/OpenType font covering what system fonts may lack)",
        fallback.font.display()
    );
    let out = args.out.unwrap_or_else(|| target_dir().join("dist"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut artifacts = Vec::new();

    let linux = build_all(LINUX_TARGET)?;
    for bin in BINARIES {
        let needed = cross::glibc_needed(&linux.join(bin))?;
        ensure!(
            needed <= BUILD_GLIBC,
            "{bin} needs glibc {}.{}, more than the {}.{} it was built for",
            needed.0,
            needed.1,
            BUILD_GLIBC.0,
            BUILD_GLIBC.1
        );
    }
    let tree = out.join("stage");
    let _ = std::fs::remove_dir_all(&tree);
    let top = format!("{NAME}-{version}-linux-x86_64");
    stage_unix_tree(&linux, &tree.join(&top), &fallback)?;
    let tarball = out.join(format!("{top}.tar.gz"));
    write_tar_gz(&tree, &top, &tarball)?;
    artifacts.push(tarball);

    let deb_root = tree.join("deb");
    stage_unix_tree(&linux, &deb_root.join("usr"), &fallback)?;
    let deb = out.join(format!("{NAME}_{version}_amd64.deb"));
    build_deb(&deb_root, &version, &deb)?;
    artifacts.push(deb.clone());

    if !args.linux_only {
        let windows = build_all(WINDOWS_TARGET).context(
            "the Windows cross build failed (see above). Windows users can build from source \
             with Rust (`cargo build --release -p chat-client`), or use --linux-only here",
        )?;
        let zip = out.join(format!("{NAME}-{version}-windows-x86_64.zip"));
        write_windows_zip(
            &windows,
            &format!("{NAME}-{version}-windows-x86_64"),
            &zip,
            &fallback,
        )?;
        artifacts.push(zip);
    }
    let _ = std::fs::remove_dir_all(&tree);

    let mut sums = String::new();
    for path in &artifacts {
        let bytes = std::fs::read(path)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        sums.push_str(&format!("{hex}  {name}\n"));
        println!("{}  ({} KiB)", path.display(), bytes.len() / 1024);
    }
    std::fs::write(out.join("SHA256SUMS"), sums)?;

    if args.check {
        check_deb(&deb, &out.join("check"))?;
    }
    Ok(())
}

/// The client's version, from its manifest.
fn client_version() -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(project_root().join("chat-client/Cargo.toml"))?;
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_owned)
        .context("chat-client/Cargo.toml has no version")
}

/// Builds both binaries for `target` (one package per build, as `deploy` builds the relay).
fn build_all(target: &str) -> anyhow::Result<PathBuf> {
    let mut dir = PathBuf::new();
    for bin in BINARIES {
        dir = cross::zigbuild(bin, target)?;
    }
    Ok(dir)
}

/// `bin/`, `share/applications`, `share/icons/hicolor/{256x256,scalable}/apps`,
/// `share/secure-chat-client/fonts` (where the client looks for its fallback font; not
/// `share/secure-chat`, which under `~/.local` is the client's home) and
/// `share/doc/secure-chat` under `root` (the tarball's top directory, or the .deb's `/usr`).
fn stage_unix_tree(bin_dir: &Path, root: &Path, fallback: &Fallback) -> anyhow::Result<()> {
    let assets = project_root().join("assets");
    let font_name = fallback
        .font
        .file_name()
        .context("the font path names no file")?;
    let mut copies: Vec<(PathBuf, PathBuf, u32)> = BINARIES
        .iter()
        .map(|b| (bin_dir.join(b), root.join("bin").join(b), 0o755))
        .chain([
            (
                assets.join("secure-chat.png"),
                root.join("share/icons/hicolor/256x256/apps/secure-chat.png"),
                0o644,
            ),
            (
                assets.join("secure-chat.svg"),
                root.join("share/icons/hicolor/scalable/apps/secure-chat.svg"),
                0o644,
            ),
            (
                project_root().join("README.md"),
                root.join("share/doc/secure-chat/README.md"),
                0o644,
            ),
            (
                project_root().join("docs/SECURITY.md"),
                root.join("share/doc/secure-chat/SECURITY.md"),
                0o644,
            ),
            (
                fallback.font.clone(),
                root.join("share/secure-chat-client/fonts").join(font_name),
                0o644,
            ),
        ])
        .collect();
    if let Some(license) = &fallback.license {
        copies.push((
            license.clone(),
            root.join("share/doc/secure-chat/fallback-font-copyright"),
            0o644,
        ));
    }
    for (from, to, mode) in copies {
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        set_mode(&to, mode)?;
    }
    let desktop = root.join("share/applications/secure-chat.desktop");
    std::fs::create_dir_all(desktop.parent().expect("has a parent"))?;
    std::fs::write(&desktop, DESKTOP_ENTRY)?;
    set_mode(&desktop, 0o644)?;
    std::fs::write(
        root.join("share/doc/secure-chat/copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: secure-chat\n\n\
         Files: *\n\
         Copyright: Secure Chat developers\n\
         License: MIT or Apache-2.0\n \
         At your option. The fallback font (GNU Unifont) has its own terms: see\n \
         fallback-font-copyright in this directory.\n",
    )?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `tree/top` as a gzip'd tar owned by root, with the modes as staged.
fn write_tar_gz(tree: &Path, top: &str, out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    // The staged files' own times (now): a fixed old date would backdate the folders the
    // archive is unpacked into (~/.local/share and the like).
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    tar.append_dir_all(top, tree.join(top))?;
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}

/// A Debian package of `root` (which holds `usr/`) with `dpkg-deb`.
fn build_deb(root: &Path, version: &str, out: &Path) -> anyhow::Result<()> {
    let installed_kib = dir_size(root)?.div_ceil(1024);
    let control = format!(
        "Package: {NAME}
Version: {version}
Architecture: amd64
Maintainer: Secure Chat developers <noreply@secure-chat.invalid>
Installed-Size: {installed_kib}
Depends: libc6 (>= {}.{})
Recommends: libgl1, libegl1, libxkbcommon-x11-0
Section: net
Priority: optional
Description: end-to-end encrypted chat: desktop client and relay
 chat-client is the desktop client (and a headless JSON-lines mode for scripts);
 chat-server is the relay, which forwards ciphertext it cannot read.
",
        BUILD_GLIBC.0, BUILD_GLIBC.1
    );
    std::fs::create_dir_all(root.join("DEBIAN"))?;
    std::fs::write(root.join("DEBIAN/control"), control)?;
    let output = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(root)
        .arg(out)
        .output()
        .context("cannot run dpkg-deb (Debian's dpkg package) to build the .deb")?;
    ensure!(
        output.status.success(),
        "dpkg-deb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The Windows executables, the fallback font (in `fonts/`, where the client looks) and
/// the README in a zip under one top directory.
fn write_windows_zip(
    bin_dir: &Path,
    top: &str,
    out: &Path,
    fallback: &Fallback,
) -> anyhow::Result<()> {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(out)?);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut files: Vec<(String, PathBuf)> = BINARIES
        .iter()
        .map(|b| (format!("{b}.exe"), bin_dir.join(format!("{b}.exe"))))
        .collect();
    files.push(("README.md".into(), project_root().join("README.md")));
    files.push((
        "SECURITY.md".into(),
        project_root().join("docs/SECURITY.md"),
    ));
    let font_name = fallback
        .font
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    files.push((format!("fonts/{font_name}"), fallback.font.clone()));
    if let Some(license) = &fallback.license {
        files.push(("fallback-font-copyright.txt".into(), license.clone()));
    }
    for (name, path) in files {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        zip.start_file(format!("{top}/{name}"), options)?;
        zip.write_all(&bytes)?;
    }
    zip.finish()?;
    Ok(())
}

/// Unpacks `deb` into `dir` (`dpkg -x`, no root needed) and runs the relay and two
/// headless clients from it: alice's message must reach bob and come back delivered.
fn check_deb(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let root = dir.join("root");
    let status = Command::new("dpkg")
        .arg("-x")
        .arg(deb)
        .arg(&root)
        .status()
        .context("cannot run dpkg -x")?;
    ensure!(status.success(), "dpkg -x {} failed", deb.display());
    let bin = root.join("usr/bin");
    for file in [
        "usr/share/applications/secure-chat.desktop",
        "usr/share/icons/hicolor/256x256/apps/secure-chat.png",
    ] {
        ensure!(root.join(file).is_file(), "the .deb has no {file}");
    }
    let fonts = root.join("usr/share/secure-chat-client/fonts");
    ensure!(
        fonts.read_dir().is_ok_and(|mut d| d.next().is_some()),
        "the .deb has no fallback font in /usr/share/secure-chat-client/fonts"
    );
    let mut procs = Processes::default();
    let addr = procs.start_relay(&bin, &dir.join("relay"))?;
    let mut client = |user: &str| -> anyhow::Result<_> {
        let child = procs.spawn(
            Command::new(bin.join("chat-client"))
                .args(["--headless", "--server", &addr, "--user", user, "--home"])
                .arg(dir.join(user))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        )?;
        let stdin = child.stdin.take().expect("piped");
        let rx = events(child.stdout.take().expect("piped"));
        wait_event(&rx, &format!("{user} ready"), |e| e["event"] == "ready")?;
        Ok((stdin, rx))
    };
    let (_bob_in, bob) = client("bob")?;
    let (mut alice_in, alice) = client("alice")?;
    say(&mut alice_in, "/msg bob installed from the .deb")?;
    let got = wait_event(&bob, "bob to receive alice's message", |e| {
        e["event"] == "message"
    })?;
    ensure!(
        got["from"] == "alice" && got["text"] == "installed from the .deb",
        "bob received {got}"
    );
    wait_event(&alice, "alice's delivery receipt", |e| {
        e["event"] == "delivered"
    })?;
    println!(
        "checked: the .deb unpacked with dpkg -x runs (relay + two headless clients, message \
         delivered)"
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
