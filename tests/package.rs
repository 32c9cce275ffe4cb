//! The Debian package, as an operator installs it: `cargo deb` builds it (from the binary the
//! tests already built), dpkg installs it into a throw-away root (maintainer scripts included,
//! with DPKG_ROOT), and what lands there is checked: the binary runs, the configuration and the
//! shipped examples load, the unit verifies, the system user owns its directories; a purge
//! takes it all away again.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `cargo deb` on the binary these tests run (its directory is cargo's own target profile).
fn build_deb(out: &Path) -> PathBuf {
    let have = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "cargo-deb is missing: tests/run installs it (cargo install cargo-deb --locked)"
    );
    // the test binary's profile: target/debug (or CARGO_TARGET_DIR's) holds edgeshard
    let exe = Path::new(bin());
    let profile = exe.parent().unwrap().file_name().unwrap().to_str().unwrap();
    let profile = if profile == "debug" { "dev" } else { profile };
    let (ok, text) = run(Command::new("cargo")
        .args([
            "deb",
            "--no-build",
            "--strip",
            "--profile",
            profile,
            "--output",
        ])
        .arg(out)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    assert!(ok, "cargo deb failed:\n{text}");
    let deb = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| panic!("no .deb in {}: {text}", out.display()));
    deb
}

/// An empty system root dpkg can install into: its database and the accounts files.
fn throwaway_root(dir: &Path) -> PathBuf {
    let r = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(r.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    std::fs::write(r.join("etc/gshadow"), "root:*::\n").unwrap();
    r
}

fn dpkg(root: &Path, args: &[&str]) -> (bool, String) {
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-not-root",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args))
}

#[test]
fn the_debian_package_installs_configures_and_purges() {
    let dir = tmpdir("deb");
    let deb = build_deb(&dir.join("out"));

    // What the package holds, and which files dpkg keeps as the operator's.
    let (ok, list) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    assert!(ok, "{list}");
    for want in [
        "./usr/bin/edgeshard",
        "./etc/edgeshard/edgeshard.toml",
        "./lib/systemd/system/edgeshard.service",
        "./etc/logrotate.d/edgeshard",
        "./usr/share/man/man1/edgeshard.1.gz",
        "./usr/share/man/man1/edgeshard-run.1.gz",
        "./usr/share/doc/edgeshard/copyright",
        "./usr/share/doc/edgeshard/docs/configuration.md",
        "./usr/share/doc/edgeshard/tuning/README.md",
        "./usr/share/man/man1/edgeshard-ctl-drain.1.gz",
        "./usr/share/doc/edgeshard/config/lync2013.toml",
        "./usr/share/doc/edgeshard/examples/minimal.toml",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(want)),
            "{want} missing from the package:\n{list}"
        );
    }
    let (ok, depends) = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    assert!(ok && depends.contains("passwd"), "{depends}");
    let ctl = dir.join("control");
    let (ok, text) = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    assert!(ok, "{text}");
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/edgeshard/edgeshard.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.contains("/etc/logrotate.d/edgeshard"),
        "{conffiles}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let (ok, text) = run(Command::new("sh").arg("-n").arg(ctl.join(script)));
        assert!(ok, "{script}: {text}");
    }

    // The unit: systemd finds nothing to object to (its binary mapped into the root).
    let root = throwaway_root(&dir);
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root {
        // dpkg may run chrootless as anyone, but useradd --prefix must write the root's
        // accounts files as root: the contents were checked above, the install needs root.
        eprintln!("skipping the install into a throw-away root: not root");
        return;
    }
    let (ok, text) = dpkg(&root, &["-i", deb.to_str().unwrap()]);
    assert!(ok, "dpkg -i failed:\n{text}");
    let (ok, text) = dpkg(&root, &["-s", "edgeshard"]);
    assert!(
        ok && text.contains("Status: install ok installed"),
        "{text}"
    );

    let exe = root.join("usr/bin/edgeshard");
    assert!(std::fs::metadata(&exe).unwrap().permissions().mode() & 0o111 != 0);
    let (ok, text) = run(Command::new(&exe).arg("--version"));
    assert!(ok && text.starts_with("edgeshard "), "{text}");

    // postinst: the system user, its directories, the configuration readable by its group
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("edgeshard:"))
        .unwrap_or_else(|| panic!("no edgeshard user:\n{passwd}"));
    let f: Vec<&str> = line.split(':').collect();
    let (uid, gid): (u32, u32) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    assert!(uid < 1000, "a system user: {line}");
    assert_eq!(f[6], "/usr/sbin/nologin", "{line}");
    for d in ["var/log/edgeshard", "var/lib/edgeshard"] {
        let m = std::fs::metadata(root.join(d)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o750), "{d}");
    }
    let conf = root.join("etc/edgeshard/edgeshard.toml");
    let m = std::fs::metadata(&conf).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, gid, 0o640));

    let unit = std::fs::read_to_string(root.join("lib/systemd/system/edgeshard.service")).unwrap();
    assert!(
        unit.contains("ExecReload=/usr/bin/edgeshard reload"),
        "{unit}"
    );
    let mapped = dir.join("edgeshard.service");
    std::fs::write(
        &mapped,
        unit.replace("/usr/bin/edgeshard", exe.to_str().unwrap()),
    )
    .unwrap();
    let (ok, text) = run(Command::new("systemd-analyze").arg("verify").arg(&mapped));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The packaged configuration loads (its absolute paths mapped into the root), and so do
    // the examples and the Lync template shipped under /usr/share/doc.
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace("/var/", &format!("{}/var/", root.display()));
    let mapped_conf = dir.join("edgeshard.toml");
    std::fs::write(&mapped_conf, text).unwrap();
    let (ok, text) = run(Command::new(&exe)
        .arg("check")
        .arg("--config")
        .arg(&mapped_conf));
    assert!(ok, "the packaged configuration: {text}");
    let doc = root.join("usr/share/doc/edgeshard");
    let mut shipped: Vec<PathBuf> = std::fs::read_dir(doc.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    shipped.push(doc.join("config/lync2013.toml"));
    assert!(shipped.len() >= 8, "{shipped:?}");
    for f in &shipped {
        let (ok, text) = run(Command::new(&exe).arg("check").arg("--config").arg(f));
        assert!(ok, "{}: {text}", f.display());
    }

    // Purge: the files, the user, its logs and state go; nothing of the package is left.
    let (ok, text) = dpkg(&root, &["--purge", "edgeshard"]);
    assert!(ok, "dpkg --purge failed:\n{text}");
    assert!(!exe.exists());
    assert!(!conf.exists());
    assert!(!root.join("var/log/edgeshard").exists());
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(!passwd.contains("edgeshard:"), "{passwd}");
    let _ = std::fs::remove_dir_all(&dir);
}
