//! Appliance packaging checks: the systemd unit and its drop-ins, sysusers/tmpfiles,
//! the default config, and the Yocto layer (crate list, oelint-adv).
//!
//! Needs: systemd (systemd-analyze, systemd-sysusers, systemd-tmpfiles), python3 >= 3.11,
//! oelint-adv (`pip install oelint-adv`). A missing tool fails the test with the install
//! command, never skips it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_cspine-triage");
const UNIT: &str = "cspine-triage.service";
const DROP_INS: [&str; 2] = ["cuda.conf", "port104.conf"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool, failing the test with `install` when it is missing.
fn run(program: &str, args: &[&str], install: &str) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} ({err}): install it with `{install}`"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A throw-away file-system root holding what `systemd-analyze --root` needs: the host's
/// stock units (targets the unit refers to), our binary at the unit's ExecStart path,
/// the unit and the given drop-ins.
fn unit_root(drop_ins: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let stock = Path::new("/usr/lib/systemd/system");
    assert!(
        stock.is_dir(),
        "{} missing: apt-get install systemd",
        stock.display()
    );
    copy_dir(stock, &r.join("usr/lib/systemd/system"));
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::copy(BIN, r.join("usr/bin/cspine-triage")).unwrap();
    let units = r.join("etc/systemd/system");
    fs::create_dir_all(units.join(format!("{UNIT}.d"))).unwrap();
    fs::copy(repo().join("systemd").join(UNIT), units.join(UNIT)).unwrap();
    for drop_in in drop_ins {
        fs::copy(
            repo().join("systemd").join(drop_in),
            units.join(format!("{UNIT}.d")).join(drop_in),
        )
        .unwrap();
    }
    root
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn unit_and_drop_ins_pass_systemd_analyze_verify() {
    let root = unit_root(&DROP_INS);
    let root_arg = format!("--root={}", root.path().display());
    let out = run(
        "systemd-analyze",
        &["verify", "--man=no", "--generators=no", &root_arg, UNIT],
        "apt-get install systemd",
    );
    // verify exits 0 on unknown keys and bad values (it only warns): any output fails.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify of {UNIT} with {DROP_INS:?}: {}\n{}",
        out.status,
        text(&out)
    );
}

/// Overall exposure from `systemd-analyze security --offline=yes` (0 = locked down, 10 = none).
fn exposure(drop_ins: &[&str]) -> f64 {
    let root = unit_root(drop_ins);
    let root_arg = format!("--root={}", root.path().display());
    let out = run(
        "systemd-analyze",
        &["security", "--offline=yes", &root_arg, UNIT],
        "apt-get install systemd",
    );
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    // "→ Overall exposure level for cspine-triage.service: 1.2 OK 🙂"
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"))
}

#[test]
fn security_exposure_is_at_most_2() {
    for drop_ins in [&[][..], &["port104.conf"], &["cuda.conf"]] {
        let level = exposure(drop_ins);
        eprintln!("exposure with drop-ins {drop_ins:?}: {level}");
        assert!(
            level <= 2.0,
            "systemd-analyze security exposure {level} > 2.0 with drop-ins {drop_ins:?}"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_service_directories() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    assert_eq!(
        fs::metadata(root.path()).unwrap().uid(),
        0,
        "this test creates files owned by the service user in a temp root: run it as root"
    );
    let root_arg = format!("--root={}", root.path().display());
    fs::create_dir_all(root.path().join("etc")).unwrap();
    // Absolute paths: relative ones are resolved inside --root.
    let sysusers = repo().join("systemd/cspine-triage.sysusers");
    let tmpfiles = repo().join("systemd/cspine-triage.tmpfiles");
    let out = run(
        "systemd-sysusers",
        &[&root_arg, sysusers.to_str().unwrap()],
        "apt-get install systemd",
    );
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("cspine-triage:"))
        .unwrap_or_else(|| panic!("no cspine-triage user in {passwd}"));
    let uid: u32 = entry.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid != 0 && uid < 1000, "not a system user: {entry}");
    assert!(
        entry.ends_with(":/var/lib/cspine-triage:/usr/sbin/nologin"),
        "{entry}"
    );

    let out = run(
        "systemd-tmpfiles",
        &["--create", &root_arg, tmpfiles.to_str().unwrap()],
        "apt-get install systemd",
    );
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-tmpfiles: {}",
        text(&out)
    );
    for dir in [
        "var/lib/cspine-triage/spool",
        "var/lib/cspine-triage/outbox",
        "var/cache/cspine-triage",
        "var/log/cspine-triage",
    ] {
        let meta = fs::metadata(root.path().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir());
        assert_eq!(meta.uid(), uid, "{dir} owner");
        assert_eq!(meta.mode() & 0o777, 0o750, "{dir} mode");
    }
}

#[test]
fn default_config_passes_check_config_and_fits_the_unit() {
    let out = Command::new(BIN)
        .args(["check-config", "systemd/config.toml"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "check-config: {}", text(&out));

    let config = cspine_triage::config::Config::load(&repo().join("systemd/config.toml")).unwrap();
    // ProtectSystem=strict: only StateDirectory (and cache/logs) is writable.
    for (key, dir) in [
        ("dicom.spool_dir", &config.dicom.spool_dir),
        ("alert.outbox_dir", &config.alert.outbox_dir),
    ] {
        assert!(
            dir.starts_with("/var/lib/cspine-triage"),
            "{key} = {} is outside the unit's StateDirectory",
            dir.display()
        );
    }
    // Where the Yocto recipe installs the model.
    assert_eq!(
        config.inference.model,
        Path::new("/usr/share/cspine-triage/model/model.json")
    );
    // Ports below 1024 need port104.conf; the default must work without it.
    assert!(config.dicom.port >= 1024);
    let unit = fs::read_to_string(repo().join("systemd").join(UNIT)).unwrap();
    assert!(unit.contains(
        "ExecStart=/usr/bin/cspine-triage serve --config /etc/cspine-triage/config.toml"
    ));
}

#[test]
fn yocto_crates_inc_matches_cargo_lock() {
    let committed = repo()
        .join("yocto/meta-cspine-triage/recipes-medical/cspine-triage/cspine-triage-crates.inc");
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("crates.inc");
    let out = run(
        "python3",
        &[
            "scripts/gen-yocto-crates.py",
            "--out",
            fresh.to_str().unwrap(),
        ],
        "apt-get install python3 (3.11 or newer, for tomllib)",
    );
    assert!(out.status.success(), "gen-yocto-crates.py: {}", text(&out));
    let fresh = fs::read_to_string(&fresh).unwrap();
    let committed = fs::read_to_string(&committed).unwrap();
    assert!(
        fresh == committed,
        "{} is stale: run `python3 scripts/gen-yocto-crates.py` and commit the result",
        "cspine-triage-crates.inc"
    );
    // Every locked crates.io package is in it, with its checksum.
    let lock = fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&lock).unwrap();
    let packages = lock["package"].as_array().unwrap();
    let mut registry = 0;
    for p in packages.iter().filter(|p| p.get("source").is_some()) {
        let (name, version) = (p["name"].as_str().unwrap(), p["version"].as_str().unwrap());
        let checksum = p["checksum"].as_str().unwrap();
        assert!(committed.contains(&format!("crate://crates.io/{name}/{version};")));
        assert!(committed.contains(&format!(
            "SRC_URI[{name}-{version}.sha256sum] = \"{checksum}\""
        )));
        registry += 1;
    }
    assert_eq!(committed.matches("crate://").count(), registry);
}

#[test]
fn oelint_adv_reports_no_errors_on_the_layer() {
    let out = run(
        "oelint-adv",
        &[
            "--quiet",
            "--release",
            "scarthgap",
            "yocto/meta-cspine-triage/recipes-medical/cspine-triage/cspine-triage_0.1.0.bb",
            "yocto/meta-cspine-triage/conf/layer.conf",
        ],
        "pip install oelint-adv",
    );
    let all = text(&out);
    let errors: Vec<&str> = all.lines().filter(|l| l.contains(":error:")).collect();
    // Exit status 1 means "findings", warnings included (an unreachable placeholder
    // HOMEPAGE, cargo_bin variables it does not know); anything else is a crash.
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && errors.is_empty(),
        "oelint-adv errors ({}):\n{}",
        out.status,
        if errors.is_empty() {
            all.clone()
        } else {
            errors.join("\n")
        }
    );
}
