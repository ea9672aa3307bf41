//! The `lb_xdp` packet-fixture table (tests/src/fixture/xdp_table.rs) run through the tc ingress
//! program (`lb_tc_ingress`), which runs the same north-south stages on devices where XDP cannot
//! deliver: every row's verdict, output bytes and counters must be what XDP gives, translated
//! only where the hooks differ by nature (see `fixture::NorthSouth`).

#[test]
fn kernel_tc_ingress_runs_the_xdp_fixture_table() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    lb_tests::fixture::run_table_on(
        lb_common::program_name::TC_INGRESS,
        lb_tests::fixture::xdp_table::table(),
        lb_tests::fixture::NorthSouth::TcIngress,
    );
}
