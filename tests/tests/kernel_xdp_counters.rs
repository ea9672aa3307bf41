//! Counter fixtures for events the other packet fixtures cannot stage: a conntrack that refuses
//! inserts (`xdp_drop_ct_full`, which the LbConntrackFull alert watches).
//!
//! The conntrack tiers are LRU maps: the kernel refuses an insert only when it finds no entry to
//! evict on any CPU or a bucket is busy, races that a single BPF_PROG_TEST_RUN cannot stage. So
//! before the object is loaded, a plain hash map that is full (one entry of one) is pinned under
//! the tier's name; the loader takes a pinned map of that name as it is, and the programs'
//! inserts into it fail as a refusing LRU's do (the helper returns an error). Everything else is
//! the real thing: the object, the other maps, their contents programmed through the real sync
//! code, frames built with etherparse and compared byte for byte.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_common::{backend_flags, ct_flags, map_name, program_name, Config, CtEntry, CtKey};
use lb_userspace::{
    control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey},
    dataplane::{pinned::AyaDataplane, sync::Syncer},
};

const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [192, 168, 100, 100];
const NODE: [u8; 4] = [192, 168, 100, 1];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 10];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 10];
const TCP: u8 = 6;
/// `BPF_MAP_TYPE_HASH`: a map that refuses new keys once full.
const BPF_MAP_TYPE_HASH: u32 = 1;

/// The entry that fills the stand-in map (a flow none of the fixtures' packets belongs to).
fn filler() -> (CtKey, CtEntry) {
    let key = ct_key(([10, 9, 9, 9], 9), ([10, 9, 9, 8], 8), TCP);
    let entry = CtEntry {
        nat_saddr_be: 0,
        nat_daddr_be: 0,
        nat_sport_be: 0,
        nat_dport_be: 0,
        svc_port_id: 0,
        backend_id: 0,
        last_seen_s: 0,
        flags: 0,
        _pad: 0,
    };
    (key, entry)
}

/// The object loaded into a private pin directory where the conntrack tier `full` is a full
/// plain hash map, with the XDP program loaded and a NodePort Service programmed.
struct RefusingConntrack {
    ebpf: aya::Ebpf,
    _syncer: Syncer<AyaDataplane>,
    dir: PathBuf,
}

impl RefusingConntrack {
    fn new(full: &'static str) -> Option<Self> {
        lb_tests::require_privileges()?;
        static N: AtomicU32 = AtomicU32::new(0);
        let bpffs = lb_userspace::agent::preflight::mount_point("bpf").expect("a bpf filesystem");
        let dir = bpffs.join(format!(
            "lbctfull{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();

        let def = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_HASH,
            size_of::<CtKey>() as u32,
            size_of::<CtEntry>() as u32,
            1,
            0,
        );
        let stand_in = MapData::create(def, full, None).expect("creating the stand-in map");
        stand_in
            .pin(dir.join(full))
            .expect("pinning the stand-in map");
        let mut stand_in: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(aya::maps::Map::HashMap(stand_in)).unwrap();
        let (k, v) = filler();
        stand_in.insert(k, v, 0).unwrap();
        assert!(
            stand_in
                .insert(ct_key((CLIENT, 1), (NODE, 1), TCP), v, 0)
                .is_err(),
            "the stand-in is full"
        );

        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(&dir);
        let mut ebpf = loader
            .load(lb_userspace::EBPF_OBJECT)
            .expect("loading the object");
        let xdp: &mut Xdp = ebpf
            .program_mut(program_name::XDP)
            .unwrap()
            .try_into()
            .unwrap();
        xdp.load().expect("loading the XDP program (verifier)");
        let mut syncer = Syncer::adopt(AyaDataplane::from_ebpf(&mut ebpf).unwrap()).unwrap();
        syncer
            .set_config(&Config {
                node_addr_be: u32::from_ne_bytes(NODE),
                snat_port_min: 61000,
                snat_port_max: 65535,
                ready: 1,
                _pad: 0,
            })
            .unwrap();
        let fe = |port| FrontendKey {
            addr: sa(NODE, port),
            proto: TCP,
            scope: lb_common::scope::EXTERNAL,
        };
        let entry = |name: &str, ip, flags| DesiredFrontend {
            service_port: format!("default/{name}:http/TCP"),
            flags: lb_common::service_flags::NODE_PORT,
            affinity_timeout_s: 0,
            backends: vec![(
                BackendKey {
                    addr: sa(ip, 8080),
                    proto: TCP,
                },
                flags,
            )],
        };
        let d: Desired = [
            // externalTrafficPolicy Local: the local endpoint.
            (fe(30080), entry("local", LOCAL_POD, backend_flags::LOCAL)),
            // externalTrafficPolicy Cluster: a remote endpoint, through SNAT.
            (fe(30081), entry("cluster", REMOTE_POD, 0)),
        ]
        .into();
        syncer.sync(&d).unwrap();
        let s = Self {
            ebpf,
            _syncer: syncer,
            dir,
        };
        assert!(
            s.tier(full).contains(&filler()),
            "the loader took the stand-in for {full}"
        );
        Some(s)
    }

    /// Runs a frame: (verdict, output, counters that moved by name -> packets).
    fn run(&self, input: &[u8]) -> (u32, Vec<u8>, BTreeMap<&'static str, u64>) {
        let before = self.counters();
        let xdp: &Xdp = self
            .ebpf
            .program(program_name::XDP)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        let after = self.counters();
        let moved = after
            .into_iter()
            .filter_map(|(k, a)| {
                let d = a - before[k];
                (d != 0).then_some((k, d))
            })
            .collect();
        (r.return_value, out, moved)
    }

    /// Every counter's packets, summed over CPUs, by name.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        let arr: PerCpuArray<&MapData, lb_common::Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_name::STATS).unwrap()).unwrap();
        lb_userspace::dataplane::read::read_counters(&arr)
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.packets))
            .collect()
    }

    /// The entries of one conntrack tier.
    fn tier(&self, name: &str) -> Vec<(CtKey, CtEntry)> {
        let ct: HashMap<&MapData, CtKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        ct.iter().collect::<Result<_, _>>().unwrap()
    }
}

impl Drop for RefusingConntrack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn ct_key(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8) -> CtKey {
    CtKey {
        saddr_be: u32::from_ne_bytes(src.0),
        daddr_be: u32::from_ne_bytes(dst.0),
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn tcp(syn: bool, src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let ip =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    if syn {
        ip.tcp(src.1, dst.1, 1000, 64000)
            .syn()
            .write(&mut v, &[])
            .unwrap();
    } else {
        ip.tcp(src.1, dst.1, 1001, 64000)
            .ack(5000)
            .write(&mut v, b"hello")
            .unwrap();
    }
    v
}

fn counts(names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    names.iter().map(|n| (*n, 1)).collect()
}

#[test]
fn kernel_xdp_counters_refused_new_flow_is_counted_and_translated_statelessly() {
    let Some(f) = RefusingConntrack::new(map_name::CONNTRACK_NEW) else {
        return;
    };
    let refused = counts(&[
        "xdp_rx",
        "xdp_drop_ct_full",
        "xdp_stateless",
        "xdp_new_flow",
        "xdp_translated_pass",
        "xdp_verdict_pass",
    ]);

    // Local backend: the reply entry is refused; the packet is translated all the same.
    let (verdict, out, moved) = f.run(&tcp(true, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out,
        tcp(true, (CLIENT, 40000), (LOCAL_POD, 8080)),
        "DNAT, valid checksums"
    );
    assert_eq!(moved, refused);

    // Remote backend: the SNAT port is found, its reply entry refused; translated all the same,
    // and the flow's next packet gets the same port (the choice is a function of the packet).
    let (verdict, out, moved) = f.run(&tcp(true, (CLIENT, 40001), (NODE, 30081)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved, refused);
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!(
        (61000..=65535).contains(&port),
        "SNAT port {port} inside the range"
    );
    assert_eq!(
        out,
        tcp(true, (NODE, port), (REMOTE_POD, 8080)),
        "DNAT + SNAT, valid checksums"
    );
    let (_, again, moved) = f.run(&tcp(false, (CLIENT, 40001), (NODE, 30081)));
    assert_eq!(again, tcp(false, (NODE, port), (REMOTE_POD, 8080)));
    assert_eq!(
        moved, refused,
        "untracked: the next packet is a new flow again"
    );

    // Nothing was tracked.
    assert_eq!(f.tier(map_name::CONNTRACK_NEW), vec![filler()]);
    assert!(f.tier(map_name::CONNTRACK).is_empty());
}

#[test]
fn kernel_xdp_counters_refused_confirmation_is_counted_and_the_flow_stays_unconfirmed() {
    let Some(f) = RefusingConntrack::new(map_name::CONNTRACK) else {
        return;
    };
    let (_, _, moved) = f.run(&tcp(true, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(
        moved,
        counts(&[
            "xdp_rx",
            "xdp_new_flow",
            "xdp_translated_pass",
            "xdp_verdict_pass"
        ])
    );
    let unconfirmed = f.tier(map_name::CONNTRACK_NEW);
    assert_eq!(unconfirmed.len(), 2, "both directions in the new-flow tier");

    // The client's first packet after its SYN confirms the flow: the established tier refuses.
    // The packet is translated with the flow's entry; the flow stays in the new-flow tier.
    let (verdict, out, moved) = f.run(&tcp(false, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, tcp(false, (CLIENT, 40000), (LOCAL_POD, 8080)));
    assert_eq!(
        moved,
        counts(&[
            "xdp_rx",
            "xdp_established",
            "xdp_drop_ct_full",
            "xdp_translated_pass",
            "xdp_verdict_pass"
        ])
    );
    assert_eq!(
        f.tier(map_name::CONNTRACK),
        vec![filler()],
        "nothing moved to the established tier"
    );
    let mut still = f.tier(map_name::CONNTRACK_NEW);
    let mut before = unconfirmed;
    for v in [&mut still, &mut before] {
        v.sort_by_key(|(k, _)| (k.saddr_be, k.sport_be));
        for (_, e) in v.iter_mut() {
            e.last_seen_s = 0;
        }
    }
    assert_eq!(still, before, "the flow's entries stay as they were");
    let rev = ct_key((LOCAL_POD, 8080), (CLIENT, 40000), TCP);
    assert!(still
        .iter()
        .any(|(k, e)| *k == rev && e.flags == ct_flags::REPLY | ct_flags::LOCAL_BACKEND));

    // Its next packet tries again, and is refused again.
    let (_, _, moved) = f.run(&tcp(false, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(moved["xdp_drop_ct_full"], 1);
    assert!(!moved.contains_key("ct_confirmed"));
}
