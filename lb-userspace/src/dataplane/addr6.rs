//! The IPv6 addresses the service maps mention, each interned as a 32-bit handle
//! (`map_name::ADDR6`, `map_name::ADDR6_IDS`): an IPv6 frontend's keys, an IPv6 backend's value
//! and an IPv6 frontend's rev-NAT entry hold the handle where an IPv4 one holds the address, so
//! the frontends, backends, rev-NAT, membership, Maglev and affinity maps, and the sync that
//! writes them, serve both families with IPv4-sized entries. A handle `h` is held as the IPv4
//! address `h` (in 0.0.0.0/8, which no packet or socket is addressed to) and lives as long as
//! an entry that names it: the sync takes a reference before it writes a backend or rev-NAT
//! entry of the address and drops it after deleting one; the last reference deletes the pair.
//! Every key of an IPv6 frontend lives while its rev-NAT entry does (written after it, deleted
//! before it), so no map entry ever names a handle the table does not hold. Handles are handed
//! out round the whole range before one is reused, so a per-socket record that outlived its
//! backend is unlikely to name a new one.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use lb_common::limits::ADDR6_HANDLE_MAX;

/// The interned addresses, with the number of map entries naming each.
#[derive(Debug, Default)]
pub struct Addr6Table {
    by_addr: HashMap<Ipv6Addr, (Ipv4Addr, u32)>,
    by_handle: HashMap<Ipv4Addr, Ipv6Addr>,
    /// The handle the next allocation starts looking at.
    next: u32,
}

/// What a reference or a release asks the maps for. A pair is written handle first
/// (`ADDR6_IDS`, then `ADDR6`) and deleted the other way round, so a lookup that finds a
/// handle always finds its address, and a killed sync leaves at most a handle's entry whose
/// address does not name it (removed at adoption: nothing names such a handle).
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing: the address was already interned, or stays.
    None,
    /// Write the pair (a new handle).
    Put(u32, Ipv6Addr),
    /// Delete the pair (its last reference went).
    Del(u32, Ipv6Addr),
}

/// Entries of the two maps that form no pair (a killed sync): delete them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Strays {
    pub ids: Vec<u32>,
    pub addrs: Vec<Ipv6Addr>,
}

/// A handle as the maps hold it (network order).
pub fn handle_be(h: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(h.octets())
}

impl Addr6Table {
    /// The table as the maps hold it (`ids`: handle, network order -> address; `addrs`: the
    /// other way), every pair without references yet. Only entries that name each other form
    /// a pair; the others are returned to be deleted.
    pub fn adopt(ids: &BTreeMap<u32, Ipv6Addr>, addrs: &BTreeMap<Ipv6Addr, u32>) -> (Self, Strays) {
        let mut t = Self::default();
        let mut strays = Strays::default();
        for (h, a) in ids {
            let h4 = Ipv4Addr::from(h.to_ne_bytes());
            let valid = (1..=ADDR6_HANDLE_MAX).contains(&u32::from(h4));
            if !valid || addrs.get(a) != Some(h) {
                strays.ids.push(*h);
                continue;
            }
            t.by_addr.insert(*a, (h4, 0));
            t.by_handle.insert(h4, *a);
            t.next = t.next.max(u32::from(h4));
        }
        for (a, h) in addrs {
            if ids.get(h) != Some(a) {
                strays.addrs.push(*a);
            }
        }
        (t, strays)
    }

    /// The address as the maps hold it: an IPv4 address itself, an IPv6 one's handle (`None`
    /// when it is not interned).
    pub fn map_ip(&self, ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => self.by_addr.get(&a).map(|(h, _)| *h),
        }
    }

    /// A socket address as the maps hold it (network order address and port).
    pub fn map_sock(&self, a: SocketAddr) -> Option<(u32, u16)> {
        let ip = self.map_ip(a.ip())?;
        Some((handle_be(ip), a.port().to_be()))
    }

    /// The address a map entry holds: `addr_be` itself, or the IPv6 address of the handle
    /// `addr_be` when `v6` (`None`: not interned).
    pub fn ip_of(&self, addr_be: u32, v6: bool) -> Option<IpAddr> {
        let a = Ipv4Addr::from(addr_be.to_ne_bytes());
        if v6 {
            self.by_handle.get(&a).map(|a| IpAddr::V6(*a))
        } else {
            Some(IpAddr::V4(a))
        }
    }

    /// One more map entry names `ip` (nothing for IPv4 addresses).
    pub fn refer(&mut self, ip: IpAddr) -> Change {
        let IpAddr::V6(a) = ip else {
            return Change::None;
        };
        if let Some((_, refs)) = self.by_addr.get_mut(&a) {
            *refs += 1;
            return Change::None;
        }
        let h = self.alloc();
        self.by_addr.insert(a, (h, 1));
        self.by_handle.insert(h, a);
        Change::Put(handle_be(h), a)
    }

    /// One map entry naming `ip` less.
    pub fn release(&mut self, ip: IpAddr) -> Change {
        let IpAddr::V6(a) = ip else {
            return Change::None;
        };
        let Some((h, refs)) = self.by_addr.get_mut(&a) else {
            return Change::None;
        };
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return Change::None;
        }
        let h = *h;
        self.by_addr.remove(&a);
        self.by_handle.remove(&h);
        Change::Del(handle_be(h), a)
    }

    /// Takes the interned addresses no map entry names out of the table (after adoption: what
    /// a killed sync left), returning the pairs to delete from the maps.
    pub fn take_unreferenced(&mut self) -> Vec<Change> {
        let gone: Vec<(Ipv6Addr, Ipv4Addr)> = self
            .by_addr
            .iter()
            .filter(|(_, (_, r))| *r == 0)
            .map(|(a, (h, _))| (*a, *h))
            .collect();
        gone.into_iter()
            .map(|(a, h)| {
                self.by_addr.remove(&a);
                self.by_handle.remove(&h);
                Change::Del(handle_be(h), a)
            })
            .collect()
    }

    fn alloc(&mut self) -> Ipv4Addr {
        loop {
            self.next = if self.next >= ADDR6_HANDLE_MAX {
                1
            } else {
                self.next + 1
            };
            let h = Ipv4Addr::from(self.next);
            if !self.by_handle.contains_key(&h) {
                return h;
            }
        }
    }
}

impl crate::control::desired::MapAddrs for Addr6Table {
    fn map_sock(&self, a: SocketAddr) -> Option<(u32, u16)> {
        Addr6Table::map_sock(self, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(i: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))
    }

    #[test]
    fn handles_live_while_referenced_and_are_not_reused_at_once() {
        let mut t = Addr6Table::default();
        let Change::Put(h1, _) = t.refer(v6(1)) else {
            panic!("first reference interns")
        };
        assert_eq!(t.refer(v6(1)), Change::None);
        assert_eq!(Ipv4Addr::from(h1.to_ne_bytes()), Ipv4Addr::new(0, 0, 0, 1));
        assert_eq!(t.ip_of(h1, true), Some(v6(1)));
        assert_eq!(t.release(v6(1)), Change::None);
        assert_eq!(
            t.release(v6(1)),
            Change::Del(h1, Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1))
        );
        let Change::Put(h2, _) = t.refer(v6(2)) else {
            panic!()
        };
        assert_ne!(h1, h2, "a freed handle is not handed out again at once");
        // IPv4 addresses are their own map address and take no entry.
        assert_eq!(t.refer("10.0.0.1".parse().unwrap()), Change::None);
        assert_eq!(t.by_addr.len(), 1);
    }

    #[test]
    fn adoption_keeps_pairs_and_allocates_past_them() {
        let a7: Ipv6Addr = "fd00::7".parse().unwrap();
        let a8: Ipv6Addr = "fd00::8".parse().unwrap();
        let a6: Ipv6Addr = "fd00::6".parse().unwrap();
        let h = |i: u32| handle_be(Ipv4Addr::from(i));
        let ids: BTreeMap<u32, Ipv6Addr> = [
            (h(7), a7),
            // A killed sync: the handle's entry written, the address's not yet.
            (h(9), a7),
            (handle_be(Ipv4Addr::new(10, 0, 0, 1)), a8),
        ]
        .into();
        let addrs: BTreeMap<Ipv6Addr, u32> = [(a7, h(7)), (a8, h(2)), (a6, h(3))].into();
        let (mut t, mut strays) = Addr6Table::adopt(&ids, &addrs);
        strays.ids.sort();
        let mut want = vec![h(9), handle_be(Ipv4Addr::new(10, 0, 0, 1))];
        want.sort();
        assert_eq!(strays.ids, want);
        assert_eq!(strays.addrs, vec![a6, a8]);
        assert_eq!(
            t.map_ip("fd00::7".parse().unwrap()),
            Some(Ipv4Addr::from(7))
        );
        assert_eq!(
            t.take_unreferenced(),
            vec![Change::Del(h(7), a7)],
            "adopted, named by nothing"
        );
        assert_eq!(t.map_ip(a7.into()), None);
        let Change::Put(h, _) = t.refer("fd00::9".parse().unwrap()) else {
            panic!()
        };
        assert_eq!(Ipv4Addr::from(h.to_ne_bytes()), Ipv4Addr::from(8));
    }
}
