//! Boards: cross builds for ARM with Debian's Rust, runs under qemu-user with a board's CPU, the
//! cross-check against x86, and the deployable kiosk bundle.
//!
//! ```text
//! setup-cross  apt: rustc-web (1.96) + libstd-rust-web-dev:arm64, rust-web-src (std for armv7),
//!              gcc cross linkers, qemu-user
//! build        RUSTC=/usr/bin/rustc cargo build --target <board's triple>   (armv7: -Zbuild-std)
//! emulate      qemu-aarch64|qemu-arm -L <sysroot> -cpu <board's qemu cpu> quill …
//! cross-check  greedy tokens on x86 == under qemu (no dotprod, dotprod, armv7)
//! bundle       quill-<board>.tar.gz: binary, model, board file, systemd unit, install script
//! ```
//!
//! Why Debian's compiler: rustup's toolchain here has no ARM standard library to download, and
//! Debian ships one for arm64 (and the sources to build one for armv7) from its package registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail, ensure};
use quill::board::Board;

/// Debian's Rust (1.96, the workspace needs ≥ 1.91).
pub const RUSTC: &str = "/usr/bin/rustc";

/// What `setup-cross` installs, and why.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Debian's Rust 1.96 compiler"),
    (
        "libstd-rust-web-dev:arm64",
        "its standard library for aarch64",
    ),
    (
        "rust-web-src",
        "its standard library's sources, to build std for armv7",
    ),
    ("gcc-aarch64-linux-gnu", "the aarch64 linker"),
    ("gcc-arm-linux-gnueabihf", "the armv7 linker"),
    (
        "libc6-dev-arm64-cross",
        "glibc for aarch64 (linking, and qemu's -L sysroot)",
    ),
    ("libc6-dev-armhf-cross", "glibc for armv7"),
    (
        "qemu-user",
        "qemu-aarch64 and qemu-arm, to run the binaries here",
    ),
];

fn workspace() -> PathBuf {
    crate::workspace_root()
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// `sudo` unless we are root.
fn privileged(program: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// Installs what cross builds need; does nothing when it is all there.
pub fn setup() -> Result<()> {
    let missing: Vec<_> = APT_PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        println!(
            "setup-cross: everything is installed ({} packages)",
            APT_PACKAGES.len()
        );
        return check_toolchain();
    }
    println!("setup-cross: installing with apt-get:");
    for (p, why) in &missing {
        println!("  {p:<28} {why}");
    }
    let archs = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("running dpkg")?;
    if !String::from_utf8_lossy(&archs.stdout).contains("arm64") {
        println!("setup-cross: enabling the arm64 architecture in dpkg (for the aarch64 std)");
        run(privileged("dpkg").args(["--add-architecture", "arm64"]))?;
    }
    // A mirror caught mid-sync can fail an index (apt then drops that whole suite, and the
    // arm64 std it holds): refresh and try again a few times before giving up.
    for attempt in 1..=3 {
        let _ = privileged("apt-get").args(["update", "-qq"]).status();
        let installed = run(privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p)));
        match installed {
            Ok(()) => break,
            Err(e) if attempt == 3 => return Err(e),
            Err(e) => {
                eprintln!("setup-cross: {e:#}; retrying in 30 s (attempt {attempt} of 3)");
                std::thread::sleep(std::time::Duration::from_secs(30));
            }
        }
    }
    check_toolchain()
}

fn check_toolchain() -> Result<()> {
    let out = Command::new(RUSTC)
        .arg("--version")
        .output()
        .with_context(|| format!("running {RUSTC}; run `cargo xtask setup-cross`"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let std = Path::new("/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib");
    let src = Path::new("/usr/lib/rustlib/src/rust/library");
    ensure!(
        std.is_dir(),
        "{version} has no aarch64 standard library at {}",
        std.display()
    );
    ensure!(
        src.is_dir(),
        "{version} has no standard library sources at {}",
        src.display()
    );
    println!("setup-cross: {version}, std for aarch64, sources for armv7");
    Ok(())
}

/// Whether a target needs its standard library built from source (Debian ships only arm64's).
fn builds_std(target: &str) -> bool {
    target.starts_with("armv7")
}

/// tract's crates in quill's dependency tree (`QUILL_CROSS_TRACT_OPT_LEVEL` applies to them).
const TRACT_CRATES: [&str; 9] = [
    "tract-core",
    "tract-data",
    "tract-extra",
    "tract-hir",
    "tract-linalg",
    "tract-nnef",
    "tract-onnx",
    "tract-onnx-opl",
    "tract-transformers",
];

/// The opt-level `QUILL_CROSS_TRACT_OPT_LEVEL` (`TARGET=LEVEL,…`) sets for tract's crates in
/// `target`'s build, if it names the target.
fn tract_opt_level(target: &str) -> Result<Option<u8>> {
    match std::env::var("QUILL_CROSS_TRACT_OPT_LEVEL") {
        Ok(spec) => opt_level_for(&spec, target),
        Err(_) => Ok(None),
    }
}

fn opt_level_for(spec: &str, target: &str) -> Result<Option<u8>> {
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let parsed = pair
            .split_once('=')
            .and_then(|(t, l)| Some((t, l.parse::<u8>().ok().filter(|l| *l <= 3)?)));
        let Some((t, level)) = parsed else {
            bail!(
                "QUILL_CROSS_TRACT_OPT_LEVEL={spec:?}: expected TARGET=LEVEL pairs separated by \
                 commas, LEVEL 0 to 3 (e.g. aarch64-unknown-linux-gnu=0); unset for opt-level 3"
            );
        };
        if t == target {
            return Ok(Some(level));
        }
    }
    Ok(None)
}

/// The quill binary cross-built for `target` (built now). `QUILL_CROSS_TRACT_OPT_LEVEL=TARGET=N`
/// builds tract's crates at opt-level N instead of 3 for that target (CI, to stay in its time).
pub fn build(target: &str) -> Result<PathBuf> {
    let root = workspace();
    // One target directory per target: -Zbuild-std changes how the build scripts and proc
    // macros are built, and a shared directory would rebuild everything at each switch.
    let target_dir = root.join("target").join("cross").join(target);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("RUSTC", RUSTC)
        // Debian's compiler, not rustup's: drop what the outer `cargo run` set for rustup.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WRAPPER")
        .args([
            "build",
            "--release",
            "-p",
            "quill",
            "--bin",
            "quill",
            "--target",
            target,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // A board gets a lean binary.
        .args(["--config", "profile.release.debug=false"])
        .args(["--config", "profile.release.strip=true"]);
    // CI's switch: tract's crates at a lower opt-level compile in about a third of the time. The
    // code is the same (no fast-math anywhere), so a check's tokens are too; a board gets
    // opt-level 3.
    let tract_opt = tract_opt_level(target)?;
    if let Some(level) = tract_opt {
        for krate in TRACT_CRATES {
            cmd.args([
                "--config",
                &format!("profile.release.package.{krate}.opt-level={level}"),
            ]);
        }
    }
    if builds_std(target) {
        // Debian ships no armv7 std that matches its 1.96 compiler: build it from rust-web-src.
        cmd.env("RUSTC_BOOTSTRAP", "1")
            .arg("-Zbuild-std=std,panic_abort");
    }
    match tract_opt {
        Some(level) => eprintln!(
            "build: quill for {target} with {RUSTC}, tract at opt-level {level} (for checks, not for a board)"
        ),
        None => eprintln!("build: quill for {target} with {RUSTC}"),
    }
    run(&mut cmd)?;
    Ok(target_dir.join(target).join("release").join("quill"))
}

/// How to run one of a board's builds under qemu.
#[derive(Debug, Clone)]
pub struct Emulation {
    pub target: String,
    pub qemu: &'static str,
    pub sysroot: &'static str,
    pub cpu: String,
}

impl Emulation {
    pub fn of(board: &Board, bits32: bool) -> Result<Emulation> {
        if bits32 {
            let target = board.target_32bit.clone().with_context(|| {
                format!(
                    "{} has no 32-bit build (no target_32bit in its board file)",
                    board.name
                )
            })?;
            let cpu =
                board.cpu.qemu_32bit.clone().with_context(|| {
                    format!("{}'s board file names no qemu_32bit CPU", board.name)
                })?;
            Ok(Emulation {
                target,
                qemu: "qemu-arm",
                sysroot: "/usr/arm-linux-gnueabihf",
                cpu,
            })
        } else {
            ensure!(
                board.target.starts_with("aarch64"),
                "{}: no emulation for {}",
                board.name,
                board.target
            );
            Ok(Emulation {
                target: board.target.clone(),
                qemu: "qemu-aarch64",
                sysroot: "/usr/aarch64-linux-gnu",
                cpu: board.cpu.qemu.clone(),
            })
        }
    }

    pub fn command(&self, binary: &Path) -> Command {
        let mut c = Command::new(self.qemu);
        c.args(["-L", self.sysroot, "-cpu", &self.cpu]).arg(binary);
        c
    }
}

/// Runs `quill ARGS` for the board under qemu (building it first if needed).
pub fn emulate(board: &Board, bits32: bool, args: &[String]) -> Result<ExitStatus> {
    let e = Emulation::of(board, bits32)?;
    let binary = build(&e.target)?;
    // `cargo xtask emulate --board B -- quill generate …`: the program name is optional.
    let args = match args.first() {
        Some(a) if a == "quill" => &args[1..],
        _ => args,
    };
    eprintln!(
        "emulate: {} -cpu {} quill {}",
        e.qemu,
        e.cpu,
        args.join(" ")
    );
    e.command(&binary)
        .args(args)
        .status()
        .with_context(|| format!("running {}; run `cargo xtask setup-cross`", e.qemu))
}

/// Greedy generation's token ids, from `quill generate --json`.
fn greedy_tokens(
    mut cmd: Command,
    model: &Path,
    (prompt, extra): (&str, &[&str]),
    tokens: usize,
) -> Result<Vec<u64>> {
    let out = cmd
        .args(["generate", "--json", "--temperature", "0", "--max-tokens"])
        .arg(tokens.to_string())
        .args(extra)
        .arg("--model")
        .arg(model)
        .arg(prompt)
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{cmd:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    v["tokens"]
        .as_array()
        .context("no tokens in the JSON")?
        .iter()
        .map(|t| t.as_u64().context("a token id"))
        .collect()
}

/// The cross-check's small real model: the teacher's first and last blocks, int8.
pub fn small_bundle() -> Result<PathBuf> {
    let dir = workspace()
        .join("target")
        .join("cross")
        .join("bundles")
        .join("teacher-2blocks-int8");
    if dir.join(quill::bundle::MANIFEST_FILE).exists() && quill::bundle::Bundle::open(&dir).is_ok()
    {
        return Ok(dir);
    }
    crate::export::export(&crate::export::ExportOptions {
        teacher: crate::fetch::teacher()?,
        out_dir: dir.clone(),
        name: "teacher-2blocks-int8".into(),
        quant: crate::export::QuantOptions::new(crate::export::WeightFormat::Int8),
        blocks: Some(vec![0, 29]),
    })?;
    Ok(dir)
}

/// The cross-check's int8-cache prompt: about 90 tokens.
const INT8_CACHE_PROMPT: &str = "The old lighthouse keeper climbed the stairs every evening, \
    counting the steps as his father had taught him. At the top he lit the lamp, wiped the salt \
    from the glass and watched the ships pass the rocks below. One night in late autumn a storm \
    came in from the west, and the lamp flickered twice before it";

/// Builds for aarch64 and armv7 and checks that greedy generation under qemu gives the x86
/// tokens: on a CPU without dotprod (Pi 4's Cortex-A72), with it (Pi 5's Cortex-A76), and
/// 32-bit (Cortex-A15); the last prompt also with an int8 KV cache (whose portable integer
/// `Q·Kᵀ` the boards run where x86 uses VNNI).
pub fn cross_check(tokens: usize) -> Result<()> {
    let model = small_bundle()?;
    let prompts: [(&str, &[&str]); 3] = [
        ("The capital of France is", &[]),
        ("Once upon a time", &[]),
        // Longer than a cache block (64 positions), so the boards read full, partial and next
        // blocks.
        (INT8_CACHE_PROMPT, &["--kv-cache", "int8"]),
    ];
    let root = workspace();
    // The x86-64 reference: `$QUILL_HOST_BIN` when the caller has just built it (CI passes the
    // binary `cargo test --release --workspace` made; building it again with this crate's
    // feature set would recompile tract), else a fresh build.
    let host = match std::env::var_os("QUILL_HOST_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(&cargo).current_dir(&root).args([
                "build",
                "--release",
                "-p",
                "quill",
                "--bin",
                "quill",
            ]))?;
            root.join("target").join("release").join("quill")
        }
    };
    let runs = [
        (Board::load("rpi4")?, false, "Cortex-A72, no dotprod"),
        (Board::load("rpi5")?, false, "Cortex-A76, dotprod"),
        (Board::load("rpi4")?, true, "armv7, Cortex-A15"),
    ];
    let mut builds = Vec::new();
    for (board, bits32, what) in &runs {
        let e = Emulation::of(board, *bits32)?;
        let binary = build(&e.target)?;
        builds.push((e, binary, what));
    }
    let mut failures = Vec::new();
    for prompt in prompts {
        let golden = greedy_tokens(Command::new(&host), &model, prompt, tokens)?;
        println!("cross-check: x86-64 {prompt:?} → {golden:?}");
        for (e, binary, what) in &builds {
            let got = greedy_tokens(e.command(binary), &model, prompt, tokens)?;
            let same = got == golden;
            println!(
                "cross-check: {} -cpu {} ({what}) {}",
                e.qemu,
                e.cpu,
                if same {
                    "same tokens".to_owned()
                } else {
                    format!("DIFFERENT: {got:?}")
                }
            );
            if !same {
                failures.push(format!("{what}, {prompt:?}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "greedy tokens differ from x86-64 under qemu: {}",
            failures.join("; ")
        );
    }
    Ok(())
}

/// The systemd unit for a board: its serial device and speed, its memory budget.
pub fn systemd_unit(board: &Board) -> Result<String> {
    let template = fs::read_to_string(workspace().join("boards/systemd/quill-serial.service"))?;
    let mut unit = String::new();
    for line in template.lines() {
        let line = if line.starts_with("ExecStart=") {
            format!(
                "ExecStart=/opt/quill/bin/quill serve --serial {} --baud {} --board /opt/quill/board.toml --model /opt/quill/model",
                board.serial.device, board.serial.baud
            )
        } else if line.starts_with("DeviceAllow=") {
            format!("DeviceAllow={} rw", board.serial.device)
        } else if line.starts_with("MemoryMax=") {
            format!("MemoryMax={}M", board.memory_budget_mb)
        } else if line.starts_with("After=") || line.starts_with("Wants=") {
            let key = &line[..line.find('=').unwrap()];
            format!("{key}={}", device_unit(&board.serial.device))
        } else {
            line.to_owned()
        };
        unit.push_str(&line);
        unit.push('\n');
    }
    Ok(unit)
}

/// systemd's name for a device node's unit: `/dev/serial0` → `dev-serial0.device`.
fn device_unit(dev: &str) -> String {
    format!("{}.device", dev.trim_start_matches('/').replace('/', "-"))
}

const INSTALL_SH: &str = r#"#!/bin/sh
# Installs quill's serial console kiosk on this board. Run as root from the unpacked directory:
#   sudo ./install.sh
set -eu
cd "$(dirname "$0")"
id quill >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin --groups dialout quill
install -d -m 0755 /opt/quill /opt/quill/bin
install -m 0755 bin/quill /opt/quill/bin/quill
rm -rf /opt/quill/model.new && cp -r model /opt/quill/model.new
rm -rf /opt/quill/model && mv /opt/quill/model.new /opt/quill/model
install -m 0644 board.toml /opt/quill/board.toml
install -m 0644 quill-serial.service /etc/systemd/system/quill-serial.service
systemctl daemon-reload
systemctl enable quill-serial.service
systemctl restart quill-serial.service
echo "quill-serial is running; check with: systemctl status quill-serial; journalctl -u quill-serial"
"#;

/// Writes `quill-<board>.tar.gz` (`-armv7` for the 32-bit build) into `out_dir`: the
/// cross-built binary, the model bundle, the board file, the systemd unit and the install script.
pub fn bundle(
    board: &Board,
    bits32: bool,
    board_file: &str,
    model: &Path,
    out_dir: &Path,
) -> Result<PathBuf> {
    let target = Emulation::of(board, bits32)?.target;
    let binary = build(&target)?;
    let top = format!("quill-{}{}", board.name, if bits32 { "-armv7" } else { "" });
    write_tarball(&top, &binary, board, board_file, model, out_dir)
}

/// Writes `<top>.tar.gz` into `out_dir` from a built binary (see [`bundle`]).
pub fn write_tarball(
    top: &str,
    binary: &Path,
    board: &Board,
    board_file: &str,
    model: &Path,
    out_dir: &Path,
) -> Result<PathBuf> {
    let tarball = out_dir.join(format!("{top}.tar.gz"));
    fs::create_dir_all(out_dir)?;
    let partial = tarball.with_extension("partial");
    let file = fs::File::create(&partial)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mode = |h: &mut tar::Header, m: u32, len: u64| {
        h.set_mode(m);
        h.set_size(len);
        h.set_mtime(0);
        h.set_cksum();
    };
    let add = |tar: &mut tar::Builder<_>, path: String, bytes: &[u8], m: u32| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        mode(&mut h, m, bytes.len() as u64);
        tar.append_data(&mut h, path, bytes)?;
        Ok(())
    };
    add(
        &mut tar,
        format!("{top}/bin/quill"),
        &fs::read(binary)?,
        0o755,
    )?;
    let manifest = quill::bundle::Bundle::open(model)
        .with_context(|| format!("checking the model bundle {}", model.display()))?
        .manifest;
    let estimate = quill::board::MemoryEstimate::of(&manifest, board.context);
    ensure!(
        estimate.total() <= board.budget_bytes(),
        "{} needs about {estimate}, over the {} board's budget of {} MB",
        manifest.name,
        board.name,
        board.memory_budget_mb
    );
    let mut names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    names.push(quill::bundle::MANIFEST_FILE.into());
    for name in names {
        add(
            &mut tar,
            format!("{top}/model/{name}"),
            &fs::read(model.join(&name))?,
            0o644,
        )?;
    }
    add(
        &mut tar,
        format!("{top}/board.toml"),
        board_file.as_bytes(),
        0o644,
    )?;
    add(
        &mut tar,
        format!("{top}/quill-serial.service"),
        systemd_unit(board)?.as_bytes(),
        0o644,
    )?;
    add(
        &mut tar,
        format!("{top}/install.sh"),
        INSTALL_SH.as_bytes(),
        0o755,
    )?;
    let readme = format!(
        "quill for {desc}: {model} ({weights}), serial console on {dev} at {baud} baud.\n\n\
         Install:  sudo ./install.sh\n\
         Try it:   /opt/quill/bin/quill chat --board /opt/quill/board.toml --model /opt/quill/model\n\
         Memory:   about {estimate}, budget {budget} MB\n",
        desc = board.description,
        model = manifest.name,
        weights = manifest.weights,
        dev = board.serial.device,
        baud = board.serial.baud,
        budget = board.memory_budget_mb,
    );
    add(
        &mut tar,
        format!("{top}/README.txt"),
        readme.as_bytes(),
        0o644,
    )?;
    tar.into_inner()?.finish()?;
    quill::atomic::commit_file(&partial, &tarball)?;
    Ok(tarball)
}

/// Copies a board's tarball to `host` over ssh and runs its installer there.
pub fn deploy(tarball: &Path, host: &str) -> Result<()> {
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .context("tarball name")?;
    let dir = name.trim_end_matches(".tar.gz");
    run(Command::new("scp")
        .arg(tarball)
        .arg(format!("{host}:/tmp/{name}")))?;
    run(Command::new("ssh").arg(host).arg(format!(
        "cd /tmp && tar xzf {name} && sudo ./{dir}/install.sh && rm -rf {dir} {name}"
    )))
}

#[cfg(test)]
mod tests {
    use super::opt_level_for;

    #[test]
    fn tract_opt_level_names_targets() {
        let spec = "aarch64-unknown-linux-gnu=0,armv7-unknown-linux-gnueabihf=2";
        assert_eq!(
            opt_level_for(spec, "aarch64-unknown-linux-gnu").unwrap(),
            Some(0)
        );
        assert_eq!(
            opt_level_for(spec, "armv7-unknown-linux-gnueabihf").unwrap(),
            Some(2)
        );
        assert_eq!(
            opt_level_for(
                "aarch64-unknown-linux-gnu=0",
                "armv7-unknown-linux-gnueabihf"
            )
            .unwrap(),
            None
        );
        for bad in [
            "0",
            "aarch64-unknown-linux-gnu=4",
            "aarch64-unknown-linux-gnu=fast",
        ] {
            let err = opt_level_for(bad, "aarch64-unknown-linux-gnu").unwrap_err();
            assert!(err.to_string().contains("TARGET=LEVEL"), "{err}");
        }
    }
}
