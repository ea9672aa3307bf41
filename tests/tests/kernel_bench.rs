//! The benchmark machinery on the real kernel, small and without timing assertions: every
//! per-packet path takes the verdict it should (so `cargo xtask bench` times what it claims to),
//! an endpoint change costs the same map writes whatever the cluster's size, and the report is
//! written.
use lb_tests::bench::{control, ctgc, report, testrun};

#[test]
fn kernel_bench_paths_take_their_verdicts() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let t = testrun::testrun_bench(10_000, 1).unwrap();
    let verdict = |p: &str| {
        t.paths
            .iter()
            .find(|x| x.path == p)
            .unwrap_or_else(|| panic!("{p} missing"))
            .verdict
    };
    assert_eq!(verdict("floor"), "pass");
    assert_eq!(verdict("unknown_frontend"), "pass");
    // Translated and sent back out of the ingress device: the FIB lookup succeeded.
    assert_eq!(verdict("new_flow"), "tx");
    assert_eq!(verdict("established"), "tx");
    assert_eq!(verdict("reply"), "tx");
    // The IPv6 established packet, through the tail call into lb_xdp6, translated and sent
    // back out too; its ratio to the IPv4 one is computed from the same run.
    assert_eq!(verdict("established_ipv6"), "tx");
    let ns = |p: &str| t.paths.iter().find(|x| x.path == p).unwrap().ns_per_packet;
    assert_eq!(
        t.ipv6_established_ratio,
        ns("established_ipv6") / ns("established")
    );
    assert!(
        t.paths
            .iter()
            .all(|p| p.ns_per_packet > 0.0 && p.runs_ns.len() == 1),
        "{t:?}"
    );
}

#[test]
fn kernel_bench_endpoint_change_writes_do_not_grow_with_the_cluster() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let small = control::control_bench(100, 10, 3, &[]).unwrap();
    let large = control::control_bench(2_000, 10, 3, &[]).unwrap();
    let writes = |c: &control::ControlBench| {
        c.changes
            .iter()
            .map(|x| (x.what, x.writes))
            .collect::<Vec<_>>()
    };
    assert_eq!(writes(&small), writes(&large));
    // One Service is recomputed per change, whatever the cluster's size (control::memo).
    for c in small.changes.iter().chain(&large.changes) {
        assert_eq!(c.services_recomputed, 1, "{c:?}");
    }
    // The exact counts are the sync tests' business; here only that they are small.
    assert!(
        large.changes.iter().all(|c| c.writes > 0 && c.writes < 32),
        "{:?}",
        large.changes
    );
    // The maps hold what was programmed: 2,000 ClusterIP frontends x (master + 10 slots), plus
    // the NodePort Service's extra frontends.
    let m = control::by_name(&large.maps);
    assert!(m["lb_svc_v3"].entries > 2_000 * 11, "{:?}", m["lb_svc_v3"]);
    assert_eq!(m["lb_backend_v1"].entries, 2_000 * 10);
    assert!(
        large.bytes_per_service > 0.0
            && large.bytes_per_backend > 0.0
            && large.bytes_per_maglev_table > 0.0
    );

    let dir = std::env::temp_dir().join(format!("lbbenchreport{}", std::process::id()));
    let r = report::Results {
        machine: report::Machine::read(),
        quick: true,
        testrun: Err("not run here".into()),
        lab: Err("not run here".into()),
        nat: Err("not run here".into()),
        control: Ok(large),
        kube_proxy_restore: Err("not run here".into()),
        agent_memory: Err("not run here".into()),
        ct_gc: Err("not run here".into()),
    };
    let md = report::markdown(&r);
    assert!(
        md.contains("map update") && md.contains("| lb_svc_v3 |"),
        "{md}"
    );
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("chart.svg"), report::svg(&r)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_bench_ct_gc_sweeps_full_maps() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    // A tenth of the tiers' capacity: the machinery, not the figure (`cargo xtask bench`).
    let g = ctgc::ct_gc_bench(0.1).unwrap();
    println!("{g:?}");
    let cap = (lb_common::limits::CONNTRACK + lb_common::limits::CONNTRACK_NEW) as f64 * 0.1;
    assert!(g.entries as f64 >= cap * 0.99, "{g:?}");
    // Every other flow was stamped past its lifetime (half, give or take a flow per tier).
    assert!(g.removed.abs_diff(g.entries / 2) <= 4, "{g:?}");
    assert!(g.sweep_entries_per_s > 0.0 && g.aya_iter_entries_per_s > 0.0);
}

/// The quick report end to end, as CI runs it so that a change that breaks the bench or its
/// report shows: the per-packet paths and the control plane at a small size (no lab), written
/// into a temporary directory; every file is there and well-formed and the targets table has
/// every row. No figure is judged: that is the full run's business.
#[test]
fn kernel_bench_quick_report_is_written_and_well_formed() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let r = report::Results {
        machine: report::Machine::read(),
        quick: true,
        testrun: Ok(testrun::testrun_bench(10_000, 3).unwrap()),
        lab: Err("not run here".into()),
        nat: Err("not run here".into()),
        control: Ok(control::control_bench(200, 10, 3, &[]).unwrap()),
        kube_proxy_restore: Err("not run here".into()),
        agent_memory: Err("not run here".into()),
        ct_gc: Err("not run here".into()),
    };
    let dir = std::env::temp_dir().join(format!("lbbenchquick{}", std::process::id()));
    report::write(&dir, &r).unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let (json, md, chart) = (read("results.json"), read("results.md"), read("chart.svg"));
    std::fs::remove_dir_all(&dir).unwrap();

    let json: serde_json::Value = serde_json::from_str(&json).expect("results.json parses");
    let ids: Vec<&str> = json["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, report::TARGET_IDS);
    assert!(json["testrun"]["Ok"]["paths"].as_array().unwrap().len() >= 6);
    // The IPv6 figure is in the report, measured: a row of the targets table and of the
    // per-packet table.
    let v6 = report::targets(&r)
        .into_iter()
        .find(|t| t.id == "per_packet_established_ipv6")
        .unwrap();
    assert!(v6.measured.contains("× the IPv4"), "{v6:?}");
    assert!(md.contains("| established_ipv6 | "), "{md}");
    assert_eq!(json["control"]["Ok"]["services"], 200);

    // Every target is a row of the markdown table, the measured ones with a verdict.
    for t in report::targets(&r) {
        assert!(
            md.contains(&format!("| {} | {} |", t.target, t.measured)),
            "{} missing:\n{md}",
            t.id
        );
        if t.id.starts_with("per_packet_") {
            assert!(t.met.is_some(), "{t:?}");
        }
    }

    let doc = roxmltree::Document::parse(&chart).expect("chart.svg parses as XML");
    assert!(doc.root_element().has_tag_name("svg"));
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    for path in [
        "floor",
        "unknown_frontend",
        "new_flow",
        "established",
        "reply",
        "established_ipv6",
    ] {
        assert!(
            texts.iter().any(|t| t.starts_with(&format!("{path} ("))),
            "no bar for {path}: {texts:?}"
        );
    }
    assert!(
        texts.iter().any(|t| t.starts_with("program from scratch")),
        "{texts:?}"
    );
}
