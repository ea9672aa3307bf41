//! The route generation (`lb_route_gen_v1`): the XDP path caches the FIB's answer for each
//! confirmed flow's direction (`CtValue::nh`) and uses it only while the generation it was
//! looked up in is current. This module watches the kernel's routing events (rtnetlink
//! multicast groups: links, IPv4 and IPv6 addresses and routes, neighbours) and moves the
//! generation on whenever one could change a FIB answer:
//! - any link, address or route message;
//! - a neighbour whose link-layer address or usability (resolved or not) changed, or that was
//!   deleted. A neighbour going from reachable to stale and back, the bulk of neighbour
//!   traffic, changes nothing and moves nothing;
//! - events lost to a full socket buffer (`ENOBUFS`): anything may have changed.
//!
//! Several events read in one go move the generation once. Whatever this monitor misses (it is
//! not running: the agent is down or restarting), the datapath looks every cached answer up
//! again after `limits::NEXT_HOP_REVALIDATE_S`.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::map_name;

use crate::dataplane::pinned::open_pinned;

/// The pinned route generation, shared by the monitor's thread and the agent's loop (which
/// moves it too when the set of devices running the XDP program changes: a cached redirect to
/// a device that no longer runs it would be dropped). Each move happens under one lock, so
/// the map never goes back to a value it held before.
#[derive(Clone)]
pub struct RouteGen(Arc<Mutex<(u32, Array<MapData, u32>)>>);

impl RouteGen {
    /// Opens the pinned map under `bpffs` and moves the generation on at once: an agent that
    /// starts knows nothing of what changed while none ran.
    pub fn open(bpffs: &Path) -> Result<Self> {
        let map = open_pinned(bpffs, map_name::ROUTE_GEN)?;
        let gens: Array<MapData, u32> =
            Array::try_from(Map::Array(map)).context("the route generation map")?;
        let now = gens.get(&0, 0).unwrap_or(0);
        let g = Self(Arc::new(Mutex::new((now, gens))));
        g.bump()?;
        Ok(g)
    }

    /// Moves the generation on: every cached next hop is looked up again.
    pub fn bump(&self) -> Result<()> {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let next = next_generation(inner.0);
        inner
            .1
            .set(0, next, 0)
            .context("writing the route generation")?;
        inner.0 = next;
        Ok(())
    }
}

/// Starts the monitor on a thread of its own: it moves `gen` on whenever it sees a change
/// (see the module doc), until `stop`.
pub fn spawn(gen: RouteGen, stop: Arc<AtomicBool>) -> Result<()> {
    let mut monitor = RouteMonitor::new(Duration::from_secs(1))
        .context("subscribing to routing events (rtnetlink)")?;
    std::thread::Builder::new()
        .name("route-monitor".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match monitor.wait() {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(e) = gen.bump() {
                            log::warn!("{e:#}");
                        }
                    }
                    Err(e) => {
                        // Cached next hops still expire on their own (see the module doc).
                        log::warn!("reading routing events: {e}");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .context("starting the route monitor")?;
    Ok(())
}

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

const NLMSG_HDR: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
/// `struct ndmsg`: family, two pads, ifindex, state, flags, type.
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states with a usable link-layer address.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// A neighbour as the FIB's answers depend on it: its link-layer address and whether it is
/// resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Neighbour {
    lladdr: Vec<u8>,
    usable: bool,
}

/// A subscription to the routing events of the calling thread's network namespace.
pub struct RouteMonitor {
    fd: OwnedFd,
    neighbours: HashMap<(i32, Vec<u8>), Neighbour>,
    buf: Vec<u8>,
}

impl RouteMonitor {
    /// Subscribes; `wait` then returns at the latest after `poll`.
    pub fn new(poll: Duration) -> io::Result<Self> {
        // SAFETY: plain socket call; the descriptor is owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed plain-data struct.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK
            | RTMGRP_NEIGH
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV6_ROUTE;
        // SAFETY: valid descriptor and address of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: poll.as_secs() as libc::time_t,
            tv_usec: poll.subsec_micros() as libc::suseconds_t,
        };
        // A bigger buffer than the default loses fewer events in a burst (a lost event only
        // costs a generation move).
        let rcvbuf: libc::c_int = 1 << 20;
        for (opt, val, len) in [
            (
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>(),
            ),
            (
                libc::SO_RCVBUF,
                &rcvbuf as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>(),
            ),
        ] {
            // SAFETY: valid descriptor, option value of the size given.
            if unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, val, len as u32) }
                != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            fd,
            neighbours: HashMap::new(),
            buf: vec![0; 64 * 1024],
        })
    }

    /// Waits for events (at most the poll interval); true when one of them may change a FIB
    /// answer.
    pub fn wait(&mut self) -> io::Result<bool> {
        // SAFETY: valid descriptor and buffer of the size given.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(false),
                Some(libc::ENOBUFS) => Ok(true),
                _ => Err(e),
            };
        }
        let buf = std::mem::take(&mut self.buf);
        let changed = self.messages(&buf[..n as usize]);
        self.buf = buf;
        Ok(changed)
    }

    /// Reads one datagram of netlink messages.
    fn messages(&mut self, mut b: &[u8]) -> bool {
        let mut changed = false;
        while b.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            if len < NLMSG_HDR || len > b.len() {
                // Cut short: treat as a change rather than guess.
                return true;
            }
            let body = &b[NLMSG_HDR..len];
            changed |= match kind {
                NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE => false,
                RTM_NEWNEIGH => self.neighbour(body, false),
                RTM_DELNEIGH => self.neighbour(body, true),
                _ => true,
            };
            b = &b[align4(len).min(b.len())..];
        }
        changed
    }

    /// A neighbour message: whether it changes what the FIB answers.
    fn neighbour(&mut self, body: &[u8], deleted: bool) -> bool {
        if body.len() < NDMSG_LEN {
            return true;
        }
        let ifindex = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        let state = u16::from_ne_bytes([body[8], body[9]]);
        let (mut dst, mut lladdr) = (Vec::new(), Vec::new());
        let mut a = &body[NDMSG_LEN..];
        while a.len() >= 4 {
            let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
            let kind = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
            if len < 4 || len > a.len() {
                break;
            }
            match kind {
                NDA_DST => dst = a[4..len].to_vec(),
                NDA_LLADDR => lladdr = a[4..len].to_vec(),
                _ => {}
            }
            a = &a[align4(len).min(a.len())..];
        }
        let key = (ifindex, dst);
        if deleted {
            self.neighbours.remove(&key);
            return true;
        }
        let now = Neighbour {
            lladdr,
            usable: state & NUD_USABLE != 0,
        };
        // A neighbour seen for the first time counts as a change: the agent may have started
        // after it was resolved, with answers cached by an earlier agent.
        self.neighbours.insert(key, now.clone()) != Some(now)
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The generation after `g` (never 0, which the datapath reads as "no agent set one").
pub fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neigh_msg(
        kind: u16,
        ifindex: i32,
        state: u16,
        dst: [u8; 4],
        mac: Option<[u8; 6]>,
    ) -> Vec<u8> {
        let mut body = vec![2u8, 0, 0, 0];
        body.extend(ifindex.to_ne_bytes());
        body.extend(state.to_ne_bytes());
        body.extend([0u8, 1]);
        body.extend(8u16.to_ne_bytes());
        body.extend(NDA_DST.to_ne_bytes());
        body.extend(dst);
        if let Some(m) = mac {
            body.extend(10u16.to_ne_bytes());
            body.extend(NDA_LLADDR.to_ne_bytes());
            body.extend(m);
            body.extend([0u8, 0]);
        }
        let mut m = ((NLMSG_HDR + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn neighbour_events_move_the_generation_only_when_the_answer_can_change() {
        let mut m = RouteMonitor::new(Duration::from_millis(10)).expect("netlink socket");
        let (a, b) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        const REACHABLE: u16 = 0x02;
        const STALE: u16 = 0x04;
        const INCOMPLETE: u16 = 0x01;
        let dst = [192, 168, 1, 2];
        for (what, msg, want) in [
            (
                "first sighting",
                neigh_msg(RTM_NEWNEIGH, 3, REACHABLE, dst, Some(a)),
                true,
            ),
            (
                "reachable again",
                neigh_msg(RTM_NEWNEIGH, 3, REACHABLE, dst, Some(a)),
                false,
            ),
            (
                "stale, same address",
                neigh_msg(RTM_NEWNEIGH, 3, STALE, dst, Some(a)),
                false,
            ),
            (
                "new MAC address",
                neigh_msg(RTM_NEWNEIGH, 3, STALE, dst, Some(b)),
                true,
            ),
            (
                "unresolved",
                neigh_msg(RTM_NEWNEIGH, 3, INCOMPLETE, dst, None),
                true,
            ),
            (
                "another device",
                neigh_msg(RTM_NEWNEIGH, 4, REACHABLE, dst, Some(b)),
                true,
            ),
            (
                "deleted",
                neigh_msg(RTM_DELNEIGH, 4, REACHABLE, dst, Some(b)),
                true,
            ),
        ] {
            assert_eq!(m.messages(&msg), want, "{what}");
        }
        // Any other message (a route, here with an empty body), and a truncated one.
        let mut route = (NLMSG_HDR as u32).to_ne_bytes().to_vec();
        route.extend(24u16.to_ne_bytes());
        route.extend([0u8; 10]);
        assert!(m.messages(&route));
        assert!(m.messages(&[40, 0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        // Several messages in one datagram: one change among them is a change.
        let mut two = neigh_msg(RTM_NEWNEIGH, 3, STALE, dst, Some(b));
        two.extend(neigh_msg(RTM_NEWNEIGH, 3, STALE, dst, Some(a)));
        assert!(m.messages(&two));
        assert!(!m.messages(&neigh_msg(RTM_NEWNEIGH, 3, REACHABLE, dst, Some(a))));
    }

    #[test]
    fn the_generation_never_returns_to_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(7), 8);
        assert_eq!(next_generation(u32::MAX), 1);
    }
}
