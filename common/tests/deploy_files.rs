//! Every file in deploy/ parses as what it claims to be.

use std::path::Path;

use warren_common::testing::{files_below, yaml_documents};

#[test]
fn every_deploy_file_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let (mut toml_n, mut json_n, mut yaml_n, mut unit_n, mut docker_n) = (0, 0, 0, 0, 0);
    for path in files_below(&dir) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => {
                toml::from_str::<toml::Value>(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
                toml_n += 1;
            }
            Some("json") => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
                if path.parent().is_some_and(|p| p.ends_with("grafana")) {
                    let panels = v["panels"].as_array().map_or(0, Vec::len);
                    assert!(panels > 0, "{name}: a dashboard without panels");
                }
                json_n += 1;
            }
            Some("yml" | "yaml") => {
                let docs = yaml_documents(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!docs.is_empty(), "{name}: no YAML documents");
                if path.parent().is_some_and(|p| p.ends_with("k8s")) {
                    for d in &docs {
                        assert!(
                            d["apiVersion"].is_string() && d["kind"].is_string() && d["metadata"]["name"].is_string(),
                            "{name}: {d}"
                        );
                    }
                }
                yaml_n += 1;
            }
            Some("service") => {
                check_unit(&name, &text);
                unit_n += 1;
            }
            _ if name == "Dockerfile" => {
                assert!(text.lines().any(|l| l.starts_with("FROM ")), "{name}: no FROM");
                let user = text.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER line");
                assert!(!user.trim().starts_with('0') && user.trim() != "root", "the image must not run as root");
                docker_n += 1;
            }
            _ => panic!("{}: a deploy file of a kind this test does not check", path.display()),
        }
    }
    assert!(
        toml_n >= 3 && json_n >= 1 && yaml_n >= 4 && unit_n >= 3 && docker_n == 1,
        "{toml_n} {json_n} {yaml_n} {unit_n} {docker_n}"
    );
}

/// A systemd unit: known sections, `key=value` lines (backslash continuations), an ExecStart,
/// and the hardening every Warren unit carries.
fn check_unit(name: &str, text: &str) {
    let mut section = String::new();
    let mut keys = Vec::new();
    let mut continued = false;
    for line in text.lines() {
        let l = line.trim();
        if continued {
            continued = l.ends_with('\\');
            continue;
        }
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            assert!(["Unit", "Service", "Install"].contains(&s), "{name}: unknown section {s}");
            section = s.to_owned();
            continue;
        }
        let (k, _) = l.split_once('=').unwrap_or_else(|| panic!("{name}: not key=value: {l}"));
        assert!(!section.is_empty(), "{name}: {k} outside a section");
        keys.push(format!("{section}.{}", k.trim()));
        continued = l.ends_with('\\');
    }
    for want in
        ["Service.ExecStart", "Service.DynamicUser", "Service.NoNewPrivileges", "Service.Restart", "Install.WantedBy"]
    {
        assert!(keys.iter().any(|k| k == want), "{name}: missing {want}");
    }
}

/// Debian's promtool (the `prometheus` package; `scripts/test.sh` unpacks it and sets
/// `PROMTOOL`), or `None` when absent and not required.
fn promtool() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PROMTOOL").map(std::path::PathBuf::from).or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("promtool")).find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(std::env::var_os("WARREN_REQUIRE_PROMTOOL").is_none(), "promtool is required but not found");
        eprintln!("skipping: no promtool (set PROMTOOL, or install Debian's prometheus package)");
    }
    found
}

#[test]
fn prometheus_files_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let mut checked = Vec::new();
    for path in files_below(&dir) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Rule unit tests, rule files, and Prometheus configurations, each by its own check.
        let args: &[&str] = if name.ends_with(".test.yml") {
            &["test", "rules"]
        } else if text.lines().any(|l| l.starts_with("groups:")) {
            &["check", "rules"]
        } else if text.lines().any(|l| l.starts_with("scrape_configs:")) {
            &["check", "config"]
        } else {
            panic!("{name}: neither rules, rule tests nor a Prometheus configuration");
        };
        let out = std::process::Command::new(&promtool).args(args).arg(&path).output().expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {} {name}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(format!("{} {name}", args.join(" ")));
    }
    checked.sort();
    assert_eq!(
        checked,
        ["check config scrape.yml", "check rules alerts.yml", "test rules alerts.test.yml"],
        "every Prometheus file is checked"
    );
}
