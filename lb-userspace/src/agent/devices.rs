//! `--device auto`: the node's north-south devices, found as Cilium finds them: every device
//! that carries one of the node's addresses (its InternalIP), and every device an IPv4 default
//! route leaves by. Loopback never counts. Read in the agent's network namespace (the node's,
//! for the DaemonSet).
use std::{
    collections::BTreeSet,
    ffi::CStr,
    fs, io,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::config::RunConfig;

/// `--device auto`: detect the devices (also what no `--device` means).
pub const AUTO: &str = "auto";
/// `--device none`: no north-south device (socket-level translation only).
pub const NONE: &str = "none";

/// Whether `--device` values ask for detection: `auto`, or no `--device` at all.
pub fn wants_auto(devices: &[String]) -> bool {
    devices.is_empty() || devices.iter().any(|d| d == AUTO)
}

/// `cfg` with its devices resolved: `none` means none; `auto` (or no `--device`) the detected
/// devices, with the named ones also given kept; the list as given otherwise. Logs what auto
/// found and why.
pub fn resolve(cfg: &RunConfig, node_addrs: &[Ipv4Addr]) -> RunConfig {
    let mut out = cfg.clone();
    if cfg.devices.iter().any(|d| d == NONE) {
        out.devices.clear();
        log::info!("--device none: no north-south device; socket-level translation only");
        return out;
    }
    if !wants_auto(&cfg.devices) {
        return out;
    }
    let mut named: Vec<String> = cfg.devices.iter().filter(|d| *d != AUTO).cloned().collect();
    match detect(node_addrs) {
        Ok(found) if found.is_empty() && named.is_empty() => log::warn!(
            "--device auto: no device carries the node's addresses {node_addrs:?} or a default \
             route; north-south translation is off (name devices with --device)"
        ),
        Ok(found) => {
            let why: Vec<String> = found
                .iter()
                .map(|(d, r)| match r {
                    Reason::NodeAddress(a) => format!("{d} (carries the node address {a})"),
                    Reason::DefaultRoute => format!("{d} (a default route)"),
                })
                .collect();
            log::info!("--device auto: {}", why.join(", "));
            for d in names(&found) {
                if !named.contains(&d) {
                    named.push(d);
                }
            }
        }
        Err(e) => log::warn!(
            "--device auto: cannot read this namespace's devices ({e}); north-south \
             translation is off (name devices with --device)"
        ),
    }
    out.devices = named;
    out
}

/// Why a device was chosen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// It carries this address of the node.
    NodeAddress(Ipv4Addr),
    /// An IPv4 default route leaves by it.
    DefaultRoute,
}

/// The devices `--device auto` means, each with why, sorted by name (a device with both reasons
/// is listed once per reason).
pub fn detect(node_addrs: &[Ipv4Addr]) -> io::Result<Vec<(String, Reason)>> {
    let mut out = BTreeSet::new();
    for (dev, addr) in ipv4_addresses()? {
        if node_addrs.contains(&addr) && dev != "lo" {
            out.insert((dev, Reason::NodeAddress(addr)));
        }
    }
    // thread-self: the calling thread's namespace (self/net is the main thread's).
    for dev in default_route_devices(&fs::read_to_string("/proc/thread-self/net/route")?) {
        if dev != "lo" {
            out.insert((dev, Reason::DefaultRoute));
        }
    }
    Ok(out.into_iter().collect())
}

/// The distinct device names of `detect`'s answer, in order.
pub fn names(found: &[(String, Reason)]) -> Vec<String> {
    let mut v: Vec<String> = found.iter().map(|(d, _)| d.clone()).collect();
    v.dedup();
    v
}

/// The routes of `/proc/net/route` that are up: (device, destination, mask) as the file spells
/// them (hex, network order).
fn up_routes(route_table: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    const RTF_UP: u32 = 0x1;
    route_table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if f.len() < 8 {
            return None;
        }
        let flags = u32::from_str_radix(f[3], 16).unwrap_or(0);
        (flags & RTF_UP != 0).then_some((f[0], f[1], f[7]))
    })
}

/// Distinct device names, in order of appearance.
fn distinct<'a>(devs: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in devs {
        if !out.iter().any(|o| o == d) {
            out.push(d.to_string());
        }
    }
    out
}

/// Devices of IPv4 default routes (destination 0.0.0.0/0, route up) in `/proc/net/route`.
pub fn default_route_devices(route_table: &str) -> Vec<String> {
    distinct(
        up_routes(route_table)
            .filter(|(_, dest, mask)| *dest == "00000000" && *mask == "00000000")
            .map(|(dev, _, _)| dev),
    )
}

/// The devices of the IPv4 routes that are up in `/proc/net/route` (the main table), loopback
/// excluded, distinct, in order of appearance.
pub fn route_devices(route_table: &str) -> Vec<String> {
    distinct(
        up_routes(route_table)
            .map(|(dev, _, _)| dev)
            .filter(|dev| *dev != "lo"),
    )
}

/// The devices of the IPv6 routes in `/proc/net/ipv6_route` that lead somewhere: up, not a
/// local, anycast, cached or reject route, to neither a link-local (`fe80::/10`, on every
/// interface with IPv6) nor a multicast destination; loopback excluded, distinct, in order of
/// appearance.
pub fn route_devices6(route_table: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    const RTF_ANYCAST: u32 = 0x0010_0000;
    const RTF_CACHE: u32 = 0x0100_0000;
    const RTF_LOCAL: u32 = 0x8000_0000;
    distinct(route_table.lines().filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // dest dest_len src src_len next_hop metric refcnt use flags device
        if f.len() < 10 || f[9] == "lo" {
            return None;
        }
        let flags = u32::from_str_radix(f[8], 16).ok()?;
        let dest = u128::from_str_radix(f[0], 16).ok().map(Ipv6Addr::from)?;
        let routed = flags & RTF_UP != 0
            && flags & (RTF_REJECT | RTF_ANYCAST | RTF_CACHE | RTF_LOCAL) == 0
            && !dest.is_multicast()
            && !dest.is_unicast_link_local();
        routed.then_some(f[9])
    }))
}

/// Every IPv4 address of every device (getifaddrs).
fn ipv4_addresses() -> io::Result<Vec<(String, Ipv4Addr)>> {
    Ok(ipv4_interfaces()?
        .into_iter()
        .map(|(name, addr, _)| (name, addr))
        .collect())
}

/// The interfaces that are up, are not loopback and carry an IPv4 address or an IPv6 address
/// that is not link-local (sorted, distinct).
pub fn up_with_address() -> io::Result<Vec<String>> {
    let flags = (libc::IFF_UP | libc::IFF_LOOPBACK) as u32;
    let mut v: Vec<String> = ipv4_interfaces()?
        .into_iter()
        .map(|(name, _, f)| (name, f))
        .chain(
            ipv6_interfaces()?
                .into_iter()
                .filter(|(_, a, _)| !a.is_unicast_link_local())
                .map(|(name, _, f)| (name, f)),
        )
        .filter(|(_, f)| f & flags == libc::IFF_UP as u32)
        .map(|(name, _)| name)
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Every IPv6 address of every device, with the device's flags (getifaddrs).
fn ipv6_interfaces() -> io::Result<Vec<(String, Ipv6Addr, u32)>> {
    interface_addresses(libc::AF_INET6, |sa| {
        // SAFETY: an AF_INET6 address is a sockaddr_in6.
        let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
        Ipv6Addr::from(sin6.sin6_addr.s6_addr)
    })
}

/// Every IPv4 address of every device, with the device's flags (getifaddrs).
fn ipv4_interfaces() -> io::Result<Vec<(String, Ipv4Addr, u32)>> {
    interface_addresses(libc::AF_INET, |sa| {
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
    })
}

/// Every address of family `family` of every device, read from its sockaddr by `read`, with
/// the device's flags (getifaddrs).
fn interface_addresses<A>(
    family: i32,
    read: impl Fn(*const libc::sockaddr) -> A,
) -> io::Result<Vec<(String, A, u32)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddr of the list.
        if unsafe { (*ifa.ifa_addr).sa_family } as i32 != family {
            continue;
        }
        let addr = read(ifa.ifa_addr);
        // SAFETY: a NUL-terminated name of the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        out.push((name, addr, ifa.ifa_flags));
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_read_from_the_route_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
                     eth1\t00000000\t0102A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                     eth2\t00000000\t0103A8C0\t0002\t0\t0\t300\t00000000\t0\t0\t0\n\
                     eth3\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        // eth2's route is down, eth3's is a /8 to 0.0.0.0, not a default route.
        assert_eq!(default_route_devices(table), ["eth0", "eth1"]);
        // Every route that is up, whatever its destination.
        assert_eq!(route_devices(table), ["eth0", "eth1", "eth3"]);
    }

    #[test]
    fn ipv6_routes_that_lead_somewhere_are_read_from_the_route_table() {
        let z = "00000000000000000000000000000000";
        let row = |dest: &str, len: &str, flags: &str, dev: &str| {
            format!("{dest} {len} {z} 00 {z} 00000100 00000001 00000000 {flags} {dev}\n")
        };
        let table = [
            row("fd000100000000000000000000000000", "40", "00000001", "eth0"),
            // Link-local, on every interface with IPv6.
            row(
                "fe800000000000000000000000000000",
                "40",
                "00000001",
                "veth1",
            ),
            // Multicast (the local table).
            row(
                "ff000000000000000000000000000000",
                "08",
                "00000001",
                "veth1",
            ),
            // The node's own address (RTF_LOCAL) and the subnet-router anycast.
            row("fd000100000000000000000000000001", "80", "80200001", "eth1"),
            row("fd000100000000000000000000000000", "80", "00300001", "eth1"),
            // The unreachable default route on lo, a route that is down, a cached one.
            row(z, "00", "00200200", "lo"),
            row("fd00c612000000000000000000000000", "40", "00000000", "eth2"),
            row("fd00c612000000000000000000000001", "80", "01000001", "eth2"),
            row("fd00c612000000000000000000000000", "40", "00000001", "wg0"),
            row(z, "00", "00000003", "eth0"),
        ]
        .concat();
        assert_eq!(route_devices6(&table), ["eth0", "wg0"]);
    }
}
