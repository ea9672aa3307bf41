//! The node's other interfaces: every interface that is up, carries an IPv4 address or an IPv6
//! address that is not link-local, and is not a `--device` nor loopback (a second NIC, the pod
//! bridge `cni0`, a VPN or VM bridge). NodePort, LoadBalancer and external-IP traffic, and
//! ClusterIP traffic from sources that are not local sockets (a VM or namespace behind the node,
//! an off-node client routed to the service range), can arrive there too: each gets the tc
//! ingress program (the north-south path) and the tc egress program (replies of local backends),
//! pinned as `links/iface_in_<if>` and `links/iface_out_<if>`.
//!
//! Interfaces without such an address (bridge ports, the per-pod veths of routed CNIs, which
//! come and go with every pod) are not hooked: pods reach Services through the socket-level
//! programs. The agent rescans every few seconds, hooking new interfaces and unhooking those
//! gone or no longer addressed.
//!
//! The reply rule of externalTrafficPolicy Cluster with a local backend (which sees the
//! client's address): its reply must meet a program of ours whatever interface it leaves by.
//! That is guaranteed when every interface with a route (IPv4, or IPv6 to a destination that is
//! neither link-local nor multicast) is a device or an other interface hooked here; when one is
//! not (an unnumbered interface with a route, a failed attach), such flows are masqueraded as
//! flows to remote backends are (`config_flags::MASQUERADE_LOCAL`, kube-proxy's own behaviour for
//! that policy), and the agent logs why.
use std::{collections::BTreeMap, ffi::CString, fs, path::Path, time::Duration};

use super::{
    attach::{attach_other_interface, detach_other_interface},
    devices,
};
use crate::dataplane::links;

/// How often the agent looks for new and vanished interfaces.
pub const RESCAN: Duration = Duration::from_secs(2);

/// What one scan found: the other interfaces to hook, and the interfaces with routes (IPv4 and
/// IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Other interfaces with their ifindex (a re-created interface has a new one).
    pub wanted: BTreeMap<String, u32>,
    pub routed: Vec<String>,
}

/// Reads this network namespace's interfaces and routes; `devices` are left out of `wanted`.
pub fn scan(devices: &[String]) -> std::io::Result<Scan> {
    let mut wanted = BTreeMap::new();
    for name in devices::up_with_address()? {
        if devices.contains(&name) {
            continue;
        }
        if let Some(index) = ifindex(&name) {
            wanted.insert(name, index);
        }
    }
    let mut routed = devices::route_devices(&fs::read_to_string("/proc/thread-self/net/route")?);
    // No such file where the kernel has no IPv6.
    let table6 = fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default();
    for dev in devices::route_devices6(&table6) {
        if !routed.contains(&dev) {
            routed.push(dev);
        }
    }
    Ok(Scan { wanted, routed })
}

/// The ifindex of interface `name` in this namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; no other precondition.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The routed interfaces whose replies no program of ours would see (neither a device nor
/// hooked): non-empty means local backends of externalTrafficPolicy Cluster get the masquerade.
pub fn unhooked_routes(
    routed: &[String],
    devices: &[String],
    hooked: &BTreeMap<String, u32>,
) -> Vec<String> {
    routed
        .iter()
        .filter(|r| !devices.contains(r) && !hooked.contains_key(*r))
        .cloned()
        .collect()
}

/// The agent's other interfaces and what it keeps about them between scans.
#[derive(Default)]
pub struct OtherInterfaces {
    /// Hooked interfaces and the ifindex they were hooked at.
    hooked: BTreeMap<String, u32>,
    /// Interfaces whose attach failed, at that ifindex (not retried until it changes).
    failed: BTreeMap<String, u32>,
    /// Whether externalTrafficPolicy Cluster flows to local backends are masqueraded.
    pub masquerade_local: bool,
    /// The routed interfaces behind `masquerade_local`, as last logged.
    unhooked: Vec<String>,
}

impl OtherInterfaces {
    /// One scan: hooks new interfaces, unhooks gone ones, recomputes `masquerade_local`.
    /// Returns whether `masquerade_local` changed (the datapath config must be written again).
    pub fn refresh(&mut self, ebpf: &mut aya::Ebpf, devices: &[String], bpffs: &Path) -> bool {
        let s = match scan(devices) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot read this namespace's interfaces ({e}); keeping the last scan");
                return false;
            }
        };
        // Gone, re-created (new ifindex) or no longer addressed: unhook.
        let gone: Vec<String> = self
            .hooked
            .iter()
            .filter(|(n, i)| s.wanted.get(*n) != Some(i))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            self.hooked.remove(&name);
            match detach_other_interface(&name, bpffs) {
                Ok(()) => log::info!("interface {name}: gone or without an address, unhooked"),
                Err(e) => log::warn!("interface {name}: {e:#}"),
            }
        }
        self.failed.retain(|n, i| s.wanted.get(n) == Some(i));
        for (name, index) in &s.wanted {
            if self.hooked.contains_key(name) || self.failed.contains_key(name) {
                continue;
            }
            match attach_other_interface(ebpf, name, bpffs) {
                Ok(()) => {
                    log::info!(
                        "interface {name}: tc ingress and egress attached (NodePort, \
                         LoadBalancer, external-IP and ClusterIP traffic arriving there)"
                    );
                    self.hooked.insert(name.clone(), *index);
                }
                Err(e) => {
                    log::warn!("interface {name}: not hooked: {e:#}");
                    let _ = detach_other_interface(name, bpffs);
                    self.failed.insert(name.clone(), *index);
                }
            }
        }
        let unhooked = unhooked_routes(&s.routed, devices, &self.hooked);
        let masquerade = !unhooked.is_empty();
        if unhooked != self.unhooked {
            if masquerade {
                log::warn!(
                    "interfaces with routes but no program of ours: {unhooked:?}; \
                     externalTrafficPolicy Cluster traffic to local backends is masqueraded \
                     (the backend sees this node's address, as with kube-proxy)"
                );
            } else if self.masquerade_local {
                log::info!(
                    "every interface with a route runs our programs: \
                     externalTrafficPolicy Cluster traffic to local backends keeps the client's \
                     address"
                );
            }
            self.unhooked = unhooked;
        }
        let changed = masquerade != self.masquerade_local;
        self.masquerade_local = masquerade;
        changed
    }

    /// Removes the links an earlier agent pinned for interfaces this scan does not hook (run
    /// once, after the first refresh).
    pub fn remove_stale_pins(&self, bpffs: &Path) {
        let Ok(pinned) = links::other_interfaces(bpffs) else {
            return;
        };
        for name in pinned {
            if !self.hooked.contains_key(&name) {
                match detach_other_interface(&name, bpffs) {
                    Ok(()) => log::info!("interface {name}: an earlier agent's links removed"),
                    Err(e) => log::warn!("interface {name}: {e:#}"),
                }
            }
        }
    }

    pub fn hooked(&self) -> impl Iterator<Item = &str> {
        self.hooked.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_outside_devices_and_hooked_interfaces_ask_for_masquerade() {
        let routed = vec!["eth0".to_string(), "cni0".into(), "wg0".into()];
        let devices = vec!["eth0".to_string()];
        let mut hooked = BTreeMap::new();
        hooked.insert("cni0".to_string(), 7);
        assert_eq!(unhooked_routes(&routed, &devices, &hooked), ["wg0"]);
        hooked.insert("wg0".to_string(), 9);
        assert!(unhooked_routes(&routed, &devices, &hooked).is_empty());
    }
}
