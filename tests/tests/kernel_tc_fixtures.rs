//! The `lb_tc_egress` packet-fixture table (tests/src/fixture/tc_table.rs), run on the real
//! kernel with BPF_PROG_TEST_RUN (on an skb), together with the XDP program that opens the flows,
//! on one set of maps.

#[test]
fn kernel_tc_egress_fixture_table() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    lb_tests::fixture::run_table(
        lb_common::program_name::TC_EGRESS,
        lb_tests::fixture::tc_table::table(),
    );
}
