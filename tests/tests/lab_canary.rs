//! A canary beside kube-proxy (issue 18): with `--service-proxy-name canary` the agent serves
//! only the Services (and EndpointSlices) labelled `service.kubernetes.io/service-proxy-name:
//! canary`, which kube-proxy leaves alone; the unlabelled ones are not translated by it. Labelling
//! the Service and its slice moves it to the agent without a restart.
use lb_tests::scenario::{example_manifests, start_example_with};

#[test]
fn lab_service_proxy_name_serves_only_the_labelled_services() {
    let Some(mut s) = start_example_with(&["--service-proxy-name", "canary"]) else {
        return;
    };
    // The example's echo Service carries no label: not this agent's.
    s.lab.all_fail("a1", "tcp", "10.96.0.10:80", 3, 500);
    let lbctl = s.lbctl_json("node1", "services");
    assert!(
        !lbctl.to_string().contains("10.96.0.10"),
        "programmed without the label: {lbctl}"
    );
    // Labelled for the canary (Service and slice, as the EndpointSlice controller copies the
    // Service's labels): served.
    let text = example_manifests()
        .replace(
            "metadata: {name: echo, namespace: default}",
            "metadata: {name: echo, namespace: default, labels: {service.kubernetes.io/service-proxy-name: canary}}",
        )
        .replace(
            "  labels: {kubernetes.io/service-name: echo}",
            "  labels: {kubernetes.io/service-name: echo, service.kubernetes.io/service-proxy-name: canary}",
        );
    assert_ne!(text, example_manifests(), "the example changed shape");
    s.apply(&text, 2);
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "20"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    // Labelled for another proxy: left alone again.
    s.apply(&text.replace("proxy-name: canary", "proxy-name: other"), 3);
    s.lab.all_fail("a1", "tcp", "10.96.0.10:80", 3, 500);
}
