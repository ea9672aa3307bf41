//! SIGKILL in the middle of a sync, on real maps: the object's maps, pinned in a directory of
//! their own under the bpf filesystem (the packet-fixture harness), a sync killed after each of
//! its writes in turn through a realistic run of cluster changes, then a restarted agent that
//! reopens the pins (`AyaDataplane::from_pins`) and adopts what it finds. Every state on the way,
//! read back from the kernel, resolves each counted slot to a backend that exists, and each
//! restarted agent ends where one clean sync ends (`dataplane::crash::replay`).
use std::time::Instant;

use lb_tests::harness::XdpHarness;
use lb_userspace::dataplane::{
    crash, fake::FakeDataplane, pinned::AyaDataplane, sync::Syncer, Dataplane, MapContents,
};

/// The harness's pinned maps as a (re)started agent opens them, holding exactly `state`.
fn reopen(h: &XdpHarness, state: &MapContents) -> anyhow::Result<AyaDataplane> {
    let mut dp = AyaDataplane::from_pins(h.pin_dir())?;
    crash::restore(&mut dp, state)?;
    Ok(dp)
}

#[test]
fn kernel_sync_killed_after_any_write_recovers() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let h = XdpHarness::new().expect("loading the object and pinning its maps");
    let started = Instant::now();
    let seq = crash::change_sequence();
    let opts = crash::ReplayOptions {
        skip_ahead: true,
        carry_on: true,
        twice: false,
    };
    let st = crash::replay(&seq, opts, |state| reopen(&h, state)).unwrap();
    let total: u64 = st.writes.iter().sum();
    assert_eq!(st.kills, total, "{st:?}");
    assert!(total > 200, "{st:?}");
    eprintln!(
        "{} kills over {} syncs ({:?} writes), {} recovery writes, {:?}",
        st.kills,
        seq.len(),
        st.writes,
        st.recovery_writes,
        started.elapsed()
    );
}

/// What the bug the review found left behind (a master counting a slot that is not there): the
/// restarted agent rewrites the slot while the frontend stays desired, and removes the frontend
/// without failing when it goes (a delete of an entry the kernel does not hold is done).
#[test]
fn kernel_adoption_repairs_a_missing_counted_slot() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let h = XdpHarness::new().expect("loading the object and pinning its maps");
    let seq = crash::change_sequence();
    let mut clean = Syncer::adopt(FakeDataplane::default()).unwrap();
    clean.sync(&seq[0]).unwrap();
    let good = clean.dataplane().state.clone();
    // Every master that counts a slot loses its last one.
    let mut damaged = good.clone();
    let masters: Vec<_> = good
        .services
        .iter()
        .filter(|(k, v)| k.slot == 0 && v.count > 0)
        .map(|(k, v)| (*k, v.count))
        .collect();
    for (k, count) in &masters {
        damaged
            .services
            .remove(&lb_common::FrontendSlotKey { slot: *count, ..*k });
    }
    assert!(!crash::live_problems(&damaged).is_empty());
    for target in [&seq[0], &seq[5]] {
        let mut again = Syncer::adopt(reopen(&h, &damaged).unwrap()).unwrap();
        again.sync(target).unwrap();
        let st = again.dataplane().contents().unwrap();
        assert_eq!(crash::leftover_problems(&st), Vec::<String>::new());
        let mut want = Syncer::adopt(FakeDataplane::default()).unwrap();
        want.sync(target).unwrap();
        assert_eq!(
            crash::canonical(&st),
            crash::canonical(&want.dataplane().state)
        );
        assert_eq!(again.sync(target).unwrap().writes, 0);
    }
}
