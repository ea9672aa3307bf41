//! The north-south hook per device in the lab: `lbctl config` and `lb_device_hook` show what the
//! agent chose with its default flags (tc on the plain variant, XDP on the XDP variant), also with
//! the agent down; a restart whose choice differs attaches the new hook before removing the old
//! link, without losing a held connection (IPv4 or, in the `…6` twin, IPv6); `lb-agent uninstall`
//! removes the links of both kinds.
use std::{path::Path, process::Command, time::Duration};

use lb_tests::{
    lab::{bin_path, NODE_DEVICE},
    on_both_variants,
    scenario::{http_get, start_example_on, start_example_on_with, with_ipv6_north_south_services},
    Family, Variant,
};
use serde_json::Value;

fn lbctl(bpffs: &Path, args: &[&str]) -> String {
    let out = Command::new(bin_path("lbctl").unwrap())
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `lbctl config -o json`'s device hooks: [(device, hook)].
fn config_hooks(bpffs: &Path) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&lbctl(bpffs, &["config", "-o", "json"])).unwrap();
    v[0]["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices in {v}"))
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["hook"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn link_pins(bpffs: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(bpffs.join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn lbctl_config_shows_the_hook_per_device(v: Variant) {
    let Some(mut s) = start_example_on_with(v, &["--metrics-addr", "127.0.0.1:9464"]) else {
        return;
    };
    let hook = v.expected_hook();
    let node = s.lab.node("node1").clone();
    // The agent logged one line for its device, with the reason.
    let log = s.agents[0].log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("north-south hook"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains(&format!("device {NODE_DEVICE}: north-south hook {hook} ")),
        "{}",
        lines[0]
    );
    let want = vec![(NODE_DEVICE.to_string(), hook.to_string())];
    assert_eq!(config_hooks(&node.bpffs), want);
    let table = lbctl(&node.bpffs, &["config"]);
    assert!(table.contains("HOOKS"), "{table}");
    assert!(table.contains(&format!("{NODE_DEVICE}={hook}")), "{table}");
    // The metric says the same.
    let (code, _, body) = http_get(&node.netns, "127.0.0.1:9464", "/metrics");
    assert_eq!(code, 200);
    let series: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("lb_device_hook{"))
        .collect();
    assert_eq!(
        series,
        [format!(
            r#"lb_device_hook{{device="{NODE_DEVICE}",hook="{hook}"}} 1"#
        )],
        "{body}"
    );
    // With the agent down, the pins still say it, and the programs still translate.
    s.agents[0].stop().unwrap();
    assert_eq!(config_hooks(&node.bpffs), want);
    const NODE_PORT: &str = "192.168.100.1:30090"; // externalTrafficPolicy Cluster, on node2
    all_ok(&s.lab, NODE_PORT, 5);
    // uninstall removes the device's north-south link, whichever kind it is: nothing translates
    // the NodePort any more (the programs would still run on their own maps if attached).
    let removed = s.lab.uninstall_printing("node1");
    let pin = if hook == "tc" { "tc_ingress" } else { "xdp" };
    assert!(
        removed.contains(&format!("links/{pin}_{NODE_DEVICE}")),
        "{removed}"
    );
    // The kernel releases an unpinned link after an RCU grace period and a work item, so the
    // program may see a few more packets.
    let since = std::time::Instant::now();
    loop {
        let ex = s
            .lab
            .run_client(
                "client",
                &["tcp", NODE_PORT, "--count", "3", "--timeout-ms", "500"],
            )
            .unwrap();
        if ex.iter().all(|e| !e.ok) {
            eprintln!("untranslated {:?} after uninstall", since.elapsed());
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "still translated 5 s after uninstall: {ex:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
on_both_variants!(
    lbctl_config_shows_the_hook_per_device:
    lab_lbctl_config_shows_the_hook_per_device_plain,
    lab_lbctl_config_shows_the_hook_per_device_xdp
);

/// `n` new TCP exchanges from the client to `target` all succeed.
fn all_ok(lab: &lb_tests::Lab, target: &str, n: u32) {
    let ex = lab
        .run_client("client", &["tcp", target, "--count", &n.to_string()])
        .unwrap();
    let bad: Vec<_> = ex.iter().filter(|e| !e.ok).collect();
    assert!(bad.is_empty(), "{} of {n} failed: {bad:?}", bad.len());
}

/// A restart that changes the hook, and uninstall, with a connection of `family` held through
/// a Service of externalTrafficPolicy Cluster whose backend is on node2 (IPv6: the IPv6-only
/// `web-cluster6` of `with_ipv6_north_south_services`).
fn hook_change_across_restart_has_no_gap_and_uninstall_removes_both_kinds(family: Family) {
    // XDP variant: auto picks XDP; the restart forces tc, then auto brings XDP back.
    let Some(mut s) = start_example_on(Variant::Xdp) else {
        return;
    };
    let (target, route) = match family {
        Family::V4 => ("203.0.113.11:80", "203.0.113.11/32"),
        Family::V6 => {
            s.apply(&with_ipv6_north_south_services(), 2);
            ("[fd00:203::11]:80", "fd00:203::11/128")
        }
    };
    s.lab.client_route(route, "node1").unwrap();
    let node = s.lab.node("node1").clone();
    let agent = bin_path("lb-agent").unwrap();
    let mut held = s.lab.hold("client", target).unwrap();
    assert!(held.first.as_ref().unwrap().ok);
    assert!(link_pins(&node.bpffs).contains(&format!("xdp_{NODE_DEVICE}")));

    for (args, hook, old) in [
        (&["--north-south", "tc"][..], "tc", "xdp"),
        (&[][..], "xdp", "tc"),
    ] {
        s.agents[0].stop().unwrap();
        let before = s.stats("node1");
        let mut a = s
            .lab
            .spawn_agent("node1", &agent, &s.manifests, args)
            .unwrap();
        a.wait_for_log("sync generation 1:", Duration::from_secs(20))
            .unwrap();
        a.wait_for_log(
            &format!("device {NODE_DEVICE}: {hook} replaced the {old} link"),
            Duration::from_secs(5),
        )
        .unwrap();
        s.agents[0] = a;
        let pins = link_pins(&node.bpffs);
        let (new_pin, old_pin) = (
            format!(
                "{}_{NODE_DEVICE}",
                if hook == "tc" { "tc_ingress" } else { "xdp" }
            ),
            format!(
                "{}_{NODE_DEVICE}",
                if old == "tc" { "tc_ingress" } else { "xdp" }
            ),
        );
        assert!(
            pins.contains(&new_pin) && !pins.contains(&old_pin),
            "{pins:?}"
        );
        assert!(
            pins.contains(&format!("tc_egress_{NODE_DEVICE}")),
            "{pins:?}"
        );
        assert_eq!(
            config_hooks(&node.bpffs),
            [(NODE_DEVICE.to_string(), hook.to_string())]
        );
        // The held connection went on through the swap, and new ones work.
        for _ in 0..3 {
            let e = held.exchange().unwrap();
            assert!(e.ok, "held connection after the switch to {hook}: {e:?}");
        }
        all_ok(&s.lab, target, 20);
        // And the new hook forwards them: tc with bpf_redirect_neigh, XDP with XDP_TX.
        let after = s.stats("node1");
        let grew = |c: &str| after[c] - before[c];
        match hook {
            "tc" => assert!(
                grew("xdp_redirect") >= 20 && grew("xdp_tx") == 0,
                "{after:?}"
            ),
            _ => assert!(grew("xdp_tx") >= 20, "{after:?}"),
        }
    }

    // uninstall removes every link, whatever the kind.
    s.agents[0].stop().unwrap();
    let removed = s.lab.uninstall_printing("node1");
    assert!(
        removed.contains(&format!("links/xdp_{NODE_DEVICE}")),
        "{removed}"
    );
    assert!(!node.bpffs.join("links").exists());
    let ip = lb_tests::netns::ip(&node.netns, &["-d", "link", "show", NODE_DEVICE]).unwrap();
    assert!(!ip.contains("prog/xdp"), "XDP still attached: {ip}");
}

#[test]
fn lab_hook_change_across_restart_has_no_gap_and_uninstall_removes_both_kinds() {
    hook_change_across_restart_has_no_gap_and_uninstall_removes_both_kinds(Family::V4);
}

#[test]
fn lab_hook_change_across_restart_has_no_gap_and_uninstall_removes_both_kinds6() {
    hook_change_across_restart_has_no_gap_and_uninstall_removes_both_kinds(Family::V6);
}
