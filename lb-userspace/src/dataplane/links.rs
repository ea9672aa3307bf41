//! The names of the links an agent pins under `--bpffs DIR/links`, and which north-south hook
//! each device has according to them: `xdp_<device>` (the XDP program) or `tc_ingress_<device>`
//! (the tc ingress program, TCX). `tc_egress_<device>` is on every device in both cases. Read from
//! the pins, so `lbctl config` answers while the agent is down.
use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context, Result};
use serde::Serialize;

/// The program that does the north-south translation on a device's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// The XDP program (`lb_xdp`), forwarding with XDP_TX / redirect.
    Xdp,
    /// The tc ingress program (`lb_tc_ingress`, TCX), forwarding with `bpf_redirect_neigh`.
    Tc,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }

    /// The pin name of this hook's link on `device`.
    pub fn pin_name(self, device: &str) -> String {
        match self {
            Hook::Xdp => xdp_pin(device),
            Hook::Tc => tc_ingress_pin(device),
        }
    }

    pub fn other(self) -> Hook {
        match self {
            Hook::Xdp => Hook::Tc,
            Hook::Tc => Hook::Xdp,
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The node's other interfaces (see `agent::interfaces`): tc ingress and tc egress links.
const IFACE_IN_PREFIX: &str = "iface_in_";
const IFACE_OUT_PREFIX: &str = "iface_out_";
const XDP_PREFIX: &str = "xdp_";
const TC_INGRESS_PREFIX: &str = "tc_ingress_";
const TC_EGRESS_PREFIX: &str = "tc_egress_";
/// Suffix of a link pinned a moment before it replaces the one of the same name.
pub const NEW_SUFFIX: &str = "_new";

pub fn xdp_pin(device: &str) -> String {
    format!("{XDP_PREFIX}{device}")
}

pub fn tc_ingress_pin(device: &str) -> String {
    format!("{TC_INGRESS_PREFIX}{device}")
}

pub fn tc_egress_pin(device: &str) -> String {
    format!("{TC_EGRESS_PREFIX}{device}")
}

/// The pin names of an other interface's tc ingress and tc egress links.
pub fn iface_pins(iface: &str) -> [String; 2] {
    [
        format!("{IFACE_IN_PREFIX}{iface}"),
        format!("{IFACE_OUT_PREFIX}{iface}"),
    ]
}

/// The other interfaces with a pinned tc ingress link (sorted).
pub fn other_interfaces(bpffs: &Path) -> Result<Vec<String>> {
    let dir = bpffs.join("links");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(NEW_SUFFIX))
        .filter_map(|n| n.strip_prefix(IFACE_IN_PREFIX).map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    out.sort();
    Ok(out)
}

/// Pin names of the cgroup socket-hook links: AF_INET sockets, then IPv4-mapped addresses of
/// AF_INET6 sockets. An agent attaches every one at start, so one started over the pins of an
/// older agent that lacks some pins them too.
pub const CGROUP_LINKS: [&str; 8] = [
    "connect4",
    "sendmsg4",
    "recvmsg4",
    "getpeername4",
    "connect6",
    "sendmsg6",
    "recvmsg6",
    "getpeername6",
];

/// Whether a pin under `links/` is one an agent makes: a cgroup hook, a device's XDP, tc
/// ingress or tc egress link, an other interface's tc links, or one of those with [`NEW_SUFFIX`] (pinned a moment before it
/// replaced the old one). `lb-agent uninstall` removes only these.
pub fn is_ours(name: &str) -> bool {
    let base = name.strip_suffix(NEW_SUFFIX).unwrap_or(name);
    CGROUP_LINKS.contains(&base)
        || [
            XDP_PREFIX,
            TC_INGRESS_PREFIX,
            TC_EGRESS_PREFIX,
            IFACE_IN_PREFIX,
            IFACE_OUT_PREFIX,
        ]
        .iter()
        .any(|p| base.strip_prefix(p).is_some_and(|dev| !dev.is_empty()))
}

/// The device and hook a link pin name stands for (`xdp_eth0` → (eth0, xdp),
/// `tc_ingress_eth0` → (eth0, tc)); `None` for other links (cgroup hooks, tc egress).
pub fn parse_hook_pin(name: &str) -> Option<(&str, Hook)> {
    if let Some(dev) = name.strip_prefix(TC_INGRESS_PREFIX) {
        return (!dev.is_empty()).then_some((dev, Hook::Tc));
    }
    if let Some(dev) = name.strip_prefix(XDP_PREFIX) {
        return (!dev.is_empty()).then_some((dev, Hook::Xdp));
    }
    None
}

/// One device's north-south hook, as the pinned links say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceHook {
    pub device: String,
    pub hook: Hook,
}

/// The north-south hook of every device with a pinned link under `bpffs/links`, sorted by
/// device. A device shows both hooks only while an agent is replacing one with the other.
pub fn device_hooks(bpffs: &Path) -> Result<Vec<DeviceHook>> {
    let dir = bpffs.join("links");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    Ok(hooks_from_names(&names))
}

/// [`device_hooks`] on a listing of link pin names.
pub fn hooks_from_names(names: &[String]) -> Vec<DeviceHook> {
    let mut out: BTreeMap<(String, Hook), ()> = BTreeMap::new();
    for name in names {
        // A pin being replaced (`NAME_new` beside `NAME`) is not a device of its own.
        if let Some(base) = name.strip_suffix(NEW_SUFFIX) {
            if names.iter().any(|n| n == base) {
                continue;
            }
        }
        if let Some((dev, hook)) = parse_hook_pin(name) {
            out.insert((dev.to_string(), hook), ());
        }
    }
    out.into_keys()
        .map(|(device, hook)| DeviceHook { device, hook })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hooks_come_from_the_pin_names() {
        let got = hooks_from_names(&names(&[
            "connect4",
            "sendmsg4",
            "tc_egress_eth0",
            "tc_egress_eth1",
            "tc_ingress_eth0",
            "xdp_eth1",
            "xdp_eth1_new",
            "tc_egress_ens_new",
        ]));
        assert_eq!(
            got,
            vec![
                DeviceHook {
                    device: "eth0".into(),
                    hook: Hook::Tc
                },
                DeviceHook {
                    device: "eth1".into(),
                    hook: Hook::Xdp
                },
            ]
        );
    }

    #[test]
    fn pin_names_round_trip() {
        for dev in ["eth0", "veth_a", "xdp_x", "tc_ingress"] {
            for hook in [Hook::Xdp, Hook::Tc] {
                assert_eq!(parse_hook_pin(&hook.pin_name(dev)), Some((dev, hook)));
            }
            assert_eq!(parse_hook_pin(&tc_egress_pin(dev)), None);
        }
    }
}
