//! `edgeshard check` and `run` refuse bad configs, naming the file, the line and the field;
//! the shipped configs load.

mod common;

use common::*;
use std::process::Command;

fn check(toml: &str) -> (bool, String, std::path::PathBuf) {
    check_config(toml)
}

fn refused(toml: &str, line: usize, field: &str, words: &str) {
    let (ok, text, path) = check(toml);
    assert!(!ok, "accepted:\n{toml}");
    let want = format!("{}:{}: {}: ", path.display(), line, field);
    assert!(text.contains(&want), "expected {want:?} in {text:?}");
    assert!(text.contains(words), "expected {words:?} in {text:?}");
}

const VS: &str = "[[virtual_service]]\nlisten = \"127.0.0.1:18080\"\n";

#[test]
fn unknown_keys_are_refused_with_line_and_field() {
    refused(
        &format!("{VS}bogus = 1\n"),
        3,
        "virtual_service[0].bogus",
        "unknown field",
    );
    refused(
        "[runtime]\ncores = [0]\nthreads = 4\n",
        3,
        "runtime.threads",
        "unknown field",
    );
}

#[test]
fn bad_addresses_are_refused() {
    refused(
        "[[virtual_service]]\nlisten = \"nowhere\"\n",
        2,
        "virtual_service[0].listen",
        "invalid address",
    );
    refused(
        &format!("{VS}[[virtual_service.real_server]]\naddress = \"127.0.0.1:99999\"\n"),
        4,
        "virtual_service[0].real_server[0].address",
        "invalid address",
    );
}

#[test]
fn duplicate_listeners_are_refused() {
    refused(
        &format!("{VS}{VS}"),
        4,
        "virtual_service[1].listen",
        "duplicate listener",
    );
    refused(
        "[admin]\nlisten = \"127.0.0.1:18080\"\n[[virtual_service]]\nlisten = \"127.0.0.1:18080\"\n",
        4,
        "virtual_service[0].listen",
        "duplicate listener",
    );
}

#[test]
fn cores_that_do_not_exist_are_refused() {
    refused(
        &format!("[runtime]\ncores = [0, 4096]\n{VS}"),
        2,
        "runtime.cores",
        "does not exist",
    );
    refused(
        &format!("[runtime]\ncores = [0, 0]\n{VS}"),
        2,
        "runtime.cores",
        "oversubscribe",
    );
    refused(
        &format!("[runtime]\nshards = 999\n{VS}"),
        2,
        "runtime.shards",
        "oversubscribe",
    );
    let (ok, _, _) = check(&format!(
        "[runtime]\nshards = 4\noversubscribe = true\n{VS}"
    ));
    assert!(ok, "explicit oversubscription is allowed");
}

#[test]
fn durations_that_do_not_parse_are_refused() {
    refused(
        &format!("{VS}idle_timeout = \"30 parsecs\"\n"),
        3,
        "virtual_service[0].idle_timeout",
        "invalid duration",
    );
    refused(
        &format!("{VS}idle_timeout = \"0s\"\n"),
        3,
        "virtual_service[0].idle_timeout",
        "greater than 0",
    );
}

#[test]
fn wrong_types_and_values_are_refused() {
    refused(
        &format!("{VS}scheduling = \"fastest\"\n"),
        3,
        "virtual_service[0].scheduling",
        "unknown variant",
    );
    refused(
        &format!(
            "{VS}[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\nweight = \"heavy\"\n"
        ),
        5,
        "virtual_service[0].real_server[0].weight",
        "invalid type",
    );
    refused(
        &format!("{VS}[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\nweight = 0\n"),
        5,
        "virtual_service[0].real_server[0].weight",
        "between 1 and 65535",
    );
    refused(
        &format!("{VS}retries = 11\n"),
        3,
        "virtual_service[0].retries",
        "between 0 and 10",
    );
    refused(
        &format!("{VS}slow_start = \"soon\"\n"),
        3,
        "virtual_service[0].slow_start",
        "invalid duration",
    );
    refused(
        &format!("{VS}forwarded_for = \"prepend\"\n"),
        3,
        "virtual_service[0].forwarded_for",
        "unknown variant",
    );
    refused(
        &format!("{VS}trusted_proxies = [\"10.0.0.0/8\", \"proxy.example\"]\n"),
        3,
        "virtual_service[0].trusted_proxies",
        "expected an address or CIDR",
    );
    refused(
        &format!("{VS}[virtual_service.health_check]\ninitial_state = \"maybe\"\n"),
        4,
        "virtual_service[0].health_check.initial_state",
        "unknown variant",
    );
    let (ok, text, _) = check(&format!(
        "{VS}slow_start = \"0s\"\nretries = 0\npassive_fall = 0\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\n"
    ));
    assert!(ok, "zero turns them off: {text}");
}

#[test]
fn run_refuses_a_bad_config_without_serving() {
    let dir = tmpdir("cfgrun");
    let path = dir.join("bad.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!("[[virtual_service]]\nlisten = \"127.0.0.1:{port}\"\nidle_timeout = \"soon\"\n"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle_timeout"));
    assert!(std::net::TcpStream::connect(local(port)).is_err());
}

#[test]
fn shipped_configs_load() {
    let dirs = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
    ];
    let entries: Vec<_> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .collect();
    assert!(entries.len() > 8, "the examples are there");
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(bin())
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn per_core_settings_are_validated() {
    refused(
        &format!("[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 1\n{VS}"),
        4,
        "runtime.shard[0].core",
        "no shard runs on CPU 1",
    );
    refused(
        &format!(
            "[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 0\nservices = [\"nope\"]\n{VS}"
        ),
        5,
        "runtime.shard[0].services",
        "no virtual service named",
    );
    refused(
        &format!("[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 0\nring_depth = 100\n{VS}"),
        5,
        "runtime.shard[0].ring_depth",
        "power of two",
    );
    let (ok, text, _) = check(&format!("[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 0\nring_depth = 512\nspin_before_park = \"20ns\"\n{VS}"));
    assert!(
        !ok && text.contains("unknown unit"),
        "nanoseconds are not a unit: {text}"
    );
    refused(
        &format!("[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 0\npoll_before_park = \"50ms\"\n{VS}"),
        5,
        "runtime.shard[0].poll_before_park",
        "at most 10ms",
    );
    refused(
        &format!("[runtime]\npoll_before_park = \"soon\"\n{VS}"),
        2,
        "runtime.poll_before_park",
        "invalid duration",
    );
    let (ok, text, _) = check(&format!("[runtime]\ncores = [0]\npoll_before_park = \"0s\"\n[[runtime.shard]]\ncore = 0\nspin_before_park = \"20us\"\npoll_before_park = \"500us\"\n{VS}"));
    assert!(ok, "microseconds for the park knobs: {text}");
    let (ok, _, _) = check(&format!("[runtime]\ncores = [0]\n[[runtime.shard]]\ncore = 0\nring_depth = 512\nio_memory = \"2MiB\"\nbacklog = 4096\nmax_connections = 1000\n{VS}"));
    assert!(ok);
}

#[test]
fn check_warns_about_what_is_valid_but_risky() {
    let (ok, text, _) = check(&format!(
        "[admin]\nlisten = \"0.0.0.0:{}\"\n{VS}[virtual_service.persistence]\nmode = \"active-cookie\"\n[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\n",
        free_port()
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: admin.listen") && text.contains("no TLS"),
        "{text}"
    );
    assert!(text.contains("warning: runtime.persistence_key"), "{text}");
    let (ok, text, _) = check(&format!(
        "{VS}[[virtual_service.real_server]]\naddress = \"127.0.0.1:1\"\n"
    ));
    assert!(ok && !text.contains("warning"), "{text}");
    assert!(
        text.contains("ok (1 virtual service, 1 real server,"),
        "{text}"
    );
    let (ok, text, _) = check(VS);
    assert!(ok && text.contains("has no real server"), "{text}");
}
