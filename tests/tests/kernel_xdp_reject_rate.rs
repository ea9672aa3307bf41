//! kube-proxy's REJECT on the north-south path is rate limited like the kernel's own ICMP
//! errors: at most `limits::REJECTS_PER_SECOND` answers per CPU and second, the rest dropped
//! unanswered and counted (`reject_suppressed`). Real kernel, BPF_PROG_TEST_RUN, on one CPU.
use lb_common::{limits, scope, service_flags};
use lb_tests::{
    fixture::{
        action,
        frames::{config, frame, sa, Kind, NODE, TCP},
    },
    harness::XdpHarness,
};
use lb_userspace::control::desired::{Desired, DesiredFrontend, FrontendKey};

#[test]
fn kernel_xdp_reject_is_rate_limited_per_cpu_and_second() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    // Every run on one CPU, so that one per-CPU budget counts them all.
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU 0"
        );
    }
    let mut h = XdpHarness::new().unwrap();
    h.set_config(&config(61000, 65535)).unwrap();
    let desired: Desired = [(
        FrontendKey {
            addr: std::net::SocketAddr::V4(sa(NODE, 30090)),
            proto: TCP,
            scope: scope::EXTERNAL,
        },
        DesiredFrontend {
            service_port: "default/gone:80/TCP".into(),
            flags: service_flags::NODE_PORT | service_flags::NO_ENDPOINTS,
            affinity_timeout_s: 0,
            backends: vec![],
            source_ranges: None,
        },
    )]
    .into();
    h.program(&desired).unwrap();
    let limit = limits::REJECTS_PER_SECOND as u64;
    // Answers until the first unanswered one: the whole budget of the second the runs started
    // in and, when they crossed into the next second, some of that one's too.
    let (mut answered, mut first_unanswered) = (0u64, None);
    for i in 0..(5 * limit) {
        let syn = frame(
            Kind::Syn,
            ([172, 16, (i >> 8) as u8, i as u8], 40000),
            (NODE, 30090),
        );
        match h.run(&syn).unwrap().verdict {
            action::XDP_PASS => answered += 1,
            action::XDP_DROP => {
                first_unanswered = Some(i);
                break;
            }
            v => panic!("verdict {v}"),
        }
    }
    assert!(
        first_unanswered.is_some(),
        "{answered} answers and none refused"
    );
    assert!(
        (limit..=2 * limit).contains(&answered),
        "{answered} answers before the first refusal; the budget is {limit} a second"
    );
    let c = h.counters().unwrap();
    assert_eq!(c["reject_sent"].packets, answered);
    assert_eq!(c["reject_suppressed"].packets, 1);
}
