//! The command-line contract of `lb-agent` and `lbctl`: exit codes and one-line errors.
use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> String {
    format!("{}/../deploy/examples/lab.yaml", env!("CARGO_MANIFEST_DIR"))
}

fn cgroup2() -> Option<String> {
    lb_userspace::agent::preflight::mount_point("cgroup2").map(|p| p.display().to_string())
}

#[test]
fn wrong_flag_exits_2() {
    let (code, _, err) = agent(&["run", "--bogus"]);
    assert_eq!(code, 2);
    assert!(err.contains("--bogus"), "{err}");
}

#[test]
fn missing_manifests_is_one_line() {
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        "/nonexistent",
        "--cgroup",
        "/",
        "--bpffs",
        "/sys/fs/bpf/x",
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "lb-agent: error: --manifests /nonexistent: no such file or directory"
    );
}

#[test]
fn cgroup_that_is_not_cgroup2_is_named() {
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        "/tmp",
        "--bpffs",
        "/sys/fs/bpf/x",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--cgroup /tmp: not a cgroup v2 directory"),
        "{err}"
    );
}

#[test]
fn proc_that_is_not_procfs_is_named() {
    let Some(cg) = cgroup2() else {
        panic!("no cgroup2 mount on this machine")
    };
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        &cg,
        "--bpffs",
        "/sys/fs/bpf/lbcli-x",
        "--proc",
        "/tmp",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--proc /tmp: not a proc filesystem (mount the node's /proc there"),
        "{err}"
    );
}

#[test]
fn device_none_with_other_devices_is_one_line() {
    let Some(cg) = cgroup2() else {
        panic!("no cgroup2 mount on this machine")
    };
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        &cg,
        "--bpffs",
        "/sys/fs/bpf/lbcli-x",
        "--device",
        "none",
        "--device",
        "lo",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--device none: given with other devices"),
        "{err}"
    );
}

#[test]
fn missing_interface_is_named() {
    let Some(cg) = cgroup2() else {
        panic!("no cgroup2 mount on this machine")
    };
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        &cg,
        "--bpffs",
        "/sys/fs/bpf/lbcli-x",
        "--device",
        "nosuch0",
    ]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--device nosuch0: no such interface"), "{err}");
}

#[test]
fn bpffs_outside_bpf_filesystem_is_named() {
    let Some(cg) = cgroup2() else {
        panic!("no cgroup2 mount on this machine")
    };
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        &cg,
        "--bpffs",
        "/tmp/lbcli-x",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)"),
        "{err}"
    );
}

#[test]
fn render_prints_the_plan() {
    let (code, out, err) = agent(&["render", "--manifests", &examples(), "--node", "node1"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node"]["name"], "node1");
    assert_eq!(v["node"]["zone"], "zone-a");
    let echo_tcp = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo" && s["protocol"] == "TCP")
        .unwrap();
    assert_eq!(echo_tcp["frontends"][0]["address"], "10.96.0.10:80");
    assert_eq!(echo_tcp["cluster_endpoints"].as_array().unwrap().len(), 4);
    assert!(echo_tcp["local_endpoints"].is_null());
    let unready = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "unready")
        .unwrap();
    assert_eq!(unready["cluster_endpoints"], serde_json::json!([]));
}

/// Map sizes are flags of `render` too: what would not fit is in the plan's rejected list with
/// the map, its capacity and the numbers; what fits is planned as usual. A size out of range is
/// one line naming the flag.
#[test]
fn render_with_small_maps_rejects_what_does_not_fit() {
    let (code, out, err) = agent(&[
        "render",
        "--manifests",
        &examples(),
        "--node",
        "node1",
        "--map-frontend-slots",
        "32",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Each served Service port as its rejection would name it: namespace/name, then
    // "port NAME/PROTO", with " (IPv6)" for the IPv6 family's.
    let served: Vec<(String, String)> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!(
                    "{}/{}",
                    s["namespace"].as_str().unwrap(),
                    s["name"].as_str().unwrap()
                ),
                format!(
                    "port {}/{}{} is not served",
                    s["port_name"].as_str().unwrap(),
                    s["protocol"].as_str().unwrap(),
                    if s["family"] == "IPv6" { " (IPv6)" } else { "" }
                ),
            )
        })
        .collect();
    assert!(
        served.iter().any(|(n, _)| n == "default/echo"),
        "{served:?}"
    );
    let rejected = v["rejected"].as_array().unwrap();
    assert!(!rejected.is_empty());
    for r in rejected {
        let name = format!(
            "{}/{}",
            r["namespace"].as_str().unwrap(),
            r["name"].as_str().unwrap()
        );
        let reason = r["reason"].as_str().unwrap();
        assert!(
            !served
                .iter()
                .any(|(n, port)| *n == name && reason.starts_with(port.as_str())),
            "{r}"
        );
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains("is not served: map lb_svc_v3 is full (capacity 32 entries, "),
            "{r}"
        );
    }
    let (code, _, err) = agent(&["run", "--node", "n", "--map-backends", "5"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--map-backends") && err.contains("must be between 16 and"),
        "{err}"
    );
}

#[test]
fn render_unparsable_yaml_names_file_and_position() {
    let dir = std::env::temp_dir().join(format!("lbcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("broken.yaml");
    std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: x\n").unwrap();
    let (code, _, err) = agent(&["render", "--manifests", f.to_str().unwrap(), "--node", "n"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 2);
    assert!(
        err.contains("broken.yaml: document 1:") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn lbctl_missing_pin_directory_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args(["--bpffs", "/sys/fs/bpf/nope-nope", "services"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--bpffs /sys/fs/bpf/nope-nope: no such directory"),
        "{err}"
    );
}

/// lbctl lookup takes IPv6 arguments, and a frontend and a client of two families are one line
/// naming both (exit 2) before any map is read.
#[test]
fn lbctl_lookup_of_two_families_is_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args([
            "--bpffs",
            "/sys/fs/bpf/nope-nope",
            "lookup",
            "--frontend",
            "[2001:db8::10]:80/TCP",
            "--client",
            "10.0.0.1:40000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--frontend [2001:db8::10]:80 is IPv6 but --client 10.0.0.1 is IPv4"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Both IPv6: parsed, then the missing directory is what stops it.
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args([
            "--bpffs",
            "/sys/fs/bpf/nope-nope",
            "lookup",
            "--frontend",
            "[2001:db8::10]:80/TCP",
            "--client",
            "[2001:db8::1]:40000",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such directory"), "{err}");
}

#[test]
fn missing_privileges_is_one_line() {
    // Drop to `nobody`, which has no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_lb-agent"),
        ])
        .args([
            "run",
            "--node",
            "n",
            "--manifests",
            &examples(),
            "--cgroup",
            "/",
            "--bpffs",
            "/sys/fs/bpf/x",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "lb-agent: error: missing privileges: run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN");
}

#[test]
fn without_manifests_outside_a_cluster_names_the_fix() {
    let Some(cg) = cgroup2() else {
        panic!("no cgroup2 mount on this machine")
    };
    // No --manifests: the agent watches the API; with no service account here, it says so.
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args([
            "run",
            "--node",
            "n",
            "--cgroup",
            &cg,
            "--bpffs",
            "/sys/fs/bpf/lbcli-kube",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "in-cluster Kubernetes config (is this running in a pod? else pass --kubeconfig)"
        ),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/lbcli-kube").exists(),
        "nothing attached or pinned"
    );
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--kubeconfig",
        "/nonexistent",
        "--cgroup",
        &cg,
        "--bpffs",
        "/sys/fs/bpf/x",
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "lb-agent: error: --kubeconfig /nonexistent: no such file"
    );
}

#[test]
fn snat_ports_overlapping_the_ephemeral_or_nodeport_range_is_one_line() {
    let run = |snat: &str| {
        agent(&[
            "run",
            "--node",
            "n",
            "--manifests",
            &examples(),
            "--cgroup",
            "/",
            "--bpffs",
            "/sys/fs/bpf/x",
            "--snat-ports",
            snat,
        ])
    };
    // The node's ephemeral ports, as the agent reads them.
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let (lo, hi) = lb_userspace::agent::preflight::parse_port_range(&text).unwrap();
    let (code, _, err) = run(&format!("{lo}-{hi}"));
    assert_eq!(code, 2, "{err}");
    let suggestion = if lo > 29999 || hi < 1024 {
        ", e.g. --snat-ports 1024-29999"
    } else {
        ""
    };
    assert_eq!(
        err.trim(),
        format!(
            "lb-agent: error: --snat-ports {lo}-{hi} overlaps the node's ephemeral ports {lo}-{hi} \
             (net.ipv4.ip_local_port_range): pick a range outside it{suggestion}"
        )
    );
    // The NodePort range (unless the node's ephemeral ports already cover it).
    if hi < 30000 || lo > 30010 {
        let (code, _, err) = run("30000-30010");
        assert_eq!(code, 2, "{err}");
        assert!(
            err.trim().starts_with(
                "lb-agent: error: --snat-ports 30000-30010 overlaps the NodePort range 30000-32767 \
                 (--nodeport-range): pick a range outside it"
            ),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn wrong_north_south_value_is_one_error_line() {
    let (code, _, err) = agent(&[
        "run",
        "--node",
        "n",
        "--manifests",
        &examples(),
        "--cgroup",
        "/",
        "--bpffs",
        "/sys/fs/bpf/x",
        "--north-south",
        "native",
    ]);
    assert_eq!(code, 2, "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        errors,
        ["error: invalid value 'native' for '--north-south <xdp|tc|auto>': expected xdp, tc or auto"],
        "{err}"
    );
    // The three values parse (the run then stops at a later check, never at the flag).
    for v in ["xdp", "tc", "auto"] {
        let (_, _, err) = agent(&[
            "run",
            "--node",
            "n",
            "--manifests",
            "/nonexistent",
            "--cgroup",
            "/",
            "--bpffs",
            "/sys/fs/bpf/x",
            "--north-south",
            v,
        ]);
        assert!(!err.contains("--north-south"), "{v}: {err}");
    }
}

/// `lb-agent uninstall` removes what an agent pins (its links by name, this project's maps) and
/// leaves everything else in the directory: another tool's pins, and so the directory.
#[test]
fn uninstall_removes_only_what_the_agent_pins() {
    use std::os::fd::AsFd;

    use lb_userspace::dataplane::bpf_sys;
    let bpffs = lb_userspace::agent::preflight::mount_point("bpf")
        .expect("a bpf filesystem is mounted (cargo xtask setup mounts /sys/fs/bpf)");
    let dir = bpffs.join(format!("lbcli-uninstall-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("links")).unwrap();
    let map = bpf_sys::create_map(bpf_sys::MAP_TYPE_HASH, 4, 4, 1, "lbcli").unwrap();
    let ours = [
        "lb_backend_v1",
        "lb_svc_v2",
        "links/connect4",
        "links/getpeername6",
        "links/tc_ingress_eth0",
    ];
    let theirs = ["other_tool_map", "links/other_tool_link", "links/xdp_"];
    for p in ours.iter().chain(&theirs) {
        bpf_sys::pin(map.as_fd(), &dir.join(p)).unwrap();
    }
    let (code, out, err) = agent(&["uninstall", "--bpffs", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for p in ours {
        assert!(!dir.join(p).exists(), "{p} stays: {out}");
        assert!(
            out.contains(&format!("removed {}", dir.join(p).display())),
            "{out}"
        );
    }
    for p in theirs {
        assert!(dir.join(p).exists(), "{p} was removed: {out}");
    }
    for p in theirs {
        std::fs::remove_file(dir.join(p)).unwrap();
    }
    std::fs::remove_dir(dir.join("links")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
}

/// `deploy/kubectl-lb`, the kubectl plugin: finds the lb-agent pod (of `--node`, when given)
/// and runs lbctl in it with the remaining arguments; no such pod is one line, exit 1. Run
/// against a stand-in `kubectl` on PATH that records its arguments.
#[test]
fn kubectl_plugin_runs_lbctl_in_the_nodes_agent_pod() {
    let dir = std::env::temp_dir().join(format!("lbkubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let calls = dir.join("calls");
    let fake = dir.join("kubectl");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *get\\ pods*) case \"$*\" in *nodeName=gone*) ;; *) echo lb-agent-x7k2 ;; esac ;; esac\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let plugin = format!("{}/../deploy/kubectl-lb", env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&str]| {
        let _ = std::fs::remove_file(&calls);
        let out = Command::new(&plugin)
            .args(args)
            .env(
                "PATH",
                format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap();
        let calls = std::fs::read_to_string(&calls).unwrap_or_default();
        (
            out.status.code(),
            calls,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, calls, err) = run(&["--node", "worker-1", "status", "-o", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "{calls}");
    assert!(
        lines[0].starts_with("-n kube-system get pods -l app.kubernetes.io/name=lb-agent")
            && lines[0].contains("--field-selector spec.nodeName=worker-1"),
        "{calls}"
    );
    assert_eq!(
        lines[1],
        "-n kube-system exec lb-agent-x7k2 -c lb-agent -- lbctl status -o json"
    );
    let (code, calls, _) = run(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(!calls.contains("field-selector"), "{calls}");
    assert!(calls.ends_with("-- lbctl stats\n"), "{calls}");
    let (code, _, err) = run(&["--node", "gone", "stats"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "kubectl-lb: no lb-agent pod on node gone in namespace kube-system (LB_NAMESPACE)"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn agent_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--config`: the shipped example reads; a flag, then its environment variable, win over the
/// file, the file over the default; `--print-config` prints what the agent would run with, as a
/// file that reads back the same.
#[test]
fn config_file_sits_between_flags_and_defaults() {
    let example = format!(
        "{}/../deploy/examples/agent-config.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let (code, out, err) = agent_env(
        &[
            "run",
            "--config",
            &example,
            "--print-config",
            "--snat-ports",
            "2000-2999",
        ],
        &[("LB_AGENT_MAP_BACKENDS", "2048")],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(v["hostnameOverride"], "node-1", "from the file");
    assert_eq!(v["metricsBindAddress"], "0.0.0.0:9464", "from the file");
    assert_eq!(v["nodePortAddresses"][0], "10.0.0.0/8", "from the file");
    assert_eq!(v["snatPorts"], "2000-2999", "the flag wins");
    assert_eq!(
        v["mapSizes"]["backends"], 2048,
        "the environment variable wins"
    );
    assert_eq!(v["mapSizes"]["frontendSlots"], 262144, "the default");
    assert_eq!(v["logging"]["format"], "json");
    // What was printed is a configuration file that says the same.
    let dir = std::env::temp_dir().join(format!("lb-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let printed = dir.join("printed.yaml");
    std::fs::write(&printed, &out).unwrap();
    let (code, again, err) = agent(&[
        "run",
        "--config",
        printed.to_str().unwrap(),
        "--print-config",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);
    // Unknown fields and values that do not parse are one line each, exit 2, naming the field.
    std::fs::write(&printed, out.replace("snatPorts:", "snatPortz:")).unwrap();
    let (code, _, err) = agent(&["run", "--config", printed.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown field `snatPortz`"), "{err}");
    std::fs::write(&printed, out.replace("format: json", "format: xml")).unwrap();
    let (code, _, err) = agent(&["run", "--config", printed.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("logging.format: \"xml\": expected text or json"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's `lb-agent run` table names every field of the configuration file.
#[test]
fn readme_lists_every_config_field() {
    let (code, out, err) = agent(&[
        "run",
        "--node",
        "n",
        "--cgroup",
        "/c",
        "--bpffs",
        "/b",
        "--print-config",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&p, x, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut fields = vec![
        "clientConnection.kubeconfig".to_string(),
        "conntrack.maxPerCore".into(),
        "conntrack.min".into(),
        "serviceProxyName".into(),
        "manifests".into(),
    ];
    leaves("", &v, &mut fields);
    fields.retain(|f| f != "apiVersion" && f != "kind" && f != "clientConnection");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let missing: Vec<_> = fields
        .iter()
        .filter(|f| !readme.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "config fields missing from the README table: {missing:?}"
    );
    assert!(fields.len() > 30, "{fields:?}");
}
