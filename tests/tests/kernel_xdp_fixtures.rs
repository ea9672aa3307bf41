//! The `lb_xdp` packet-fixture table (tests/src/fixture/xdp_table.rs), run on the real kernel
//! with BPF_PROG_TEST_RUN: for each row, map setup through the real sync code, then for each
//! frame the verdict, the exact output bytes and the exact counter deltas. Every failing row is
//! named in the failure.

#[test]
fn kernel_xdp_fixture_table() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    lb_tests::fixture::run_table(
        lb_common::program_name::XDP,
        lb_tests::fixture::xdp_table::table(),
    );
}
