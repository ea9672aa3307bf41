//! Which program does the north-south translation on a device: XDP where XDP_TX and redirect
//! deliver, the tc ingress program (TCX, `bpf_redirect_neigh`) elsewhere (`--north-south
//! xdp|tc|auto`).
//!
//! XDP_TX out of a veth (and XDP_REDIRECT into one) queues frames for the veth's peer, which
//! drops them unless it runs a native XDP program itself: on kind, k3d or any node that is a
//! container the uplink is such a veth and its peer (on the host) runs nothing, so XDP there
//! would black-hole every translated packet it sends back out. `auto` therefore picks, per device:
//! - a veth: XDP only when its peer runs a native XDP program. The peer is found through the
//!   device's `IFLA_LINK` (the peer's ifindex) and `IFLA_LINK_NETNSID` (the peer's network
//!   namespace as this namespace numbers it), and asked about with `RTM_GETLINK` and
//!   `IFLA_TARGET_NETNSID` on a raw rtnetlink socket. A peer that cannot be inspected means tc.
//! - any other device: XDP when a native (driver-mode) XDP program is attached or can be
//!   attached (a probe attach in driver mode, detached at once), else tc.
//!
//! The rtnetlink messages are encoded by hand (no netlink crate).
use std::{
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    str::FromStr,
    time::Duration,
};

pub use crate::dataplane::links::Hook;

/// `--north-south`: how the agent picks the north-south hook of each device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NorthSouth {
    /// XDP on every device.
    Xdp,
    /// The tc ingress program on every device.
    Tc,
    /// Per device: XDP where it delivers, else tc (see the module documentation).
    #[default]
    Auto,
}

impl FromStr for NorthSouth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xdp" => Ok(NorthSouth::Xdp),
            "tc" => Ok(NorthSouth::Tc),
            "auto" => Ok(NorthSouth::Auto),
            _ => Err("expected xdp, tc or auto".into()),
        }
    }
}

impl fmt::Display for NorthSouth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NorthSouth::Xdp => "xdp",
            NorthSouth::Tc => "tc",
            NorthSouth::Auto => "auto",
        })
    }
}

/// The hook chosen for a device, and why (logged by the agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub hook: Hook,
    pub reason: String,
}

// ---- rtnetlink ----

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_TARGET_NETNSID: u16 = 46;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
/// The nested attribute flag in `rta_type`.
const NLA_F_NESTED: u16 = 1 << 15;

pub const XDP_ATTACHED_NONE: u8 = 0;
pub const XDP_ATTACHED_DRV: u8 = 1;
pub const XDP_ATTACHED_SKB: u8 = 2;
pub const XDP_ATTACHED_HW: u8 = 3;
pub const XDP_ATTACHED_MULTI: u8 = 4;

/// What `RTM_GETLINK` says about a link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: i32,
    pub name: String,
    /// `IFLA_INFO_KIND`: `veth`, `bridge`, ... (`None` for physical devices).
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, its peer's ifindex (in the peer's namespace).
    pub link: Option<i32>,
    /// `IFLA_LINK_NETNSID`: the peer's namespace as this namespace numbers it (absent when the
    /// peer lives in the same namespace).
    pub link_netnsid: Option<i32>,
    /// `IFLA_XDP_ATTACHED`: `XDP_ATTACHED_*`.
    pub xdp_attached: u8,
    /// Id of the XDP program attached in driver (native) mode, 0 if none.
    pub xdp_drv_prog: u32,
    /// Id of the XDP program attached in generic (skb) mode, 0 if none.
    pub xdp_skb_prog: u32,
    /// Id of the XDP program offloaded to the hardware, 0 if none.
    pub xdp_hw_prog: u32,
}

impl LinkInfo {
    /// The id of a native (driver or hardware) XDP program on the link, if any.
    pub fn native_xdp_prog(&self) -> Option<u32> {
        [self.xdp_drv_prog, self.xdp_hw_prog]
            .into_iter()
            .find(|&id| id != 0)
    }
}

/// Where a link is looked up.
#[derive(Clone, Debug)]
pub enum LinkQuery<'a> {
    /// By name, in this network namespace.
    Name(&'a str),
    /// By ifindex, in this namespace (`None`) or in the namespace with that id as this
    /// namespace numbers it.
    Index(i32, Option<i32>),
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The `RTM_GETLINK` request for `q`, sequence number `seq`.
pub fn encode_getlink(q: &LinkQuery<'_>, seq: u32) -> Vec<u8> {
    let mut b = vec![0u8; NLMSG_HDRLEN];
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let index = match q {
        LinkQuery::Index(i, _) => *i,
        LinkQuery::Name(_) => 0,
    };
    b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    match q {
        LinkQuery::Name(n) => {
            let mut name = n.as_bytes().to_vec();
            name.push(0);
            push_attr(&mut b, IFLA_IFNAME, &name);
        }
        LinkQuery::Index(_, Some(nsid)) => {
            push_attr(&mut b, IFLA_TARGET_NETNSID, &nsid.to_ne_bytes())
        }
        LinkQuery::Index(_, None) => {}
    }
    push_attr(
        &mut b,
        IFLA_EXT_MASK,
        &RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    );
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    b[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

/// The attributes in `buf` as (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

fn u32_of(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

fn i32_of(p: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// Parses the kernel's answer to [`encode_getlink`] (one `RTM_NEWLINK`, or an `NLMSG_ERROR`).
pub fn decode_link(msg: &[u8]) -> io::Result<LinkInfo> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {what}"));
    if msg.len() < NLMSG_HDRLEN {
        return Err(bad("short message"));
    }
    let len = (u32_of(msg).unwrap_or(0) as usize).min(msg.len());
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    let body = &msg[NLMSG_HDRLEN..len];
    match ty {
        NLMSG_ERROR => {
            let errno = i32_of(body).ok_or_else(|| bad("short error"))?;
            return Err(if errno == 0 {
                bad("acknowledgement instead of a link")
            } else {
                io::Error::from_raw_os_error(-errno)
            });
        }
        RTM_NEWLINK => {}
        other => return Err(bad(&format!("unexpected message type {other}"))),
    }
    if body.len() < IFINFOMSG_LEN {
        return Err(bad("short ifinfomsg"));
    }
    let mut info = LinkInfo {
        ifindex: i32_of(&body[4..8]).unwrap_or(0),
        ..LinkInfo::default()
    };
    for (ty, p) in attrs(&body[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_IFNAME => {
                info.name =
                    String::from_utf8_lossy(p.split(|&c| c == 0).next().unwrap_or(p)).into_owned()
            }
            IFLA_LINK => info.link = i32_of(p),
            IFLA_LINK_NETNSID => info.link_netnsid = i32_of(p),
            IFLA_LINKINFO => {
                for (t, k) in attrs(p) {
                    if t == IFLA_INFO_KIND {
                        info.kind = Some(
                            String::from_utf8_lossy(k.split(|&c| c == 0).next().unwrap_or(k))
                                .into_owned(),
                        );
                    }
                }
            }
            IFLA_XDP => {
                let mut prog = 0;
                for (t, x) in attrs(p) {
                    match t {
                        IFLA_XDP_ATTACHED => info.xdp_attached = x.first().copied().unwrap_or(0),
                        IFLA_XDP_PROG_ID => prog = u32_of(x).unwrap_or(0),
                        IFLA_XDP_DRV_PROG_ID => info.xdp_drv_prog = u32_of(x).unwrap_or(0),
                        IFLA_XDP_SKB_PROG_ID => info.xdp_skb_prog = u32_of(x).unwrap_or(0),
                        IFLA_XDP_HW_PROG_ID => info.xdp_hw_prog = u32_of(x).unwrap_or(0),
                        _ => {}
                    }
                }
                // With one program attached the kernel names it only in IFLA_XDP_PROG_ID; the
                // mode says which kind it is.
                match info.xdp_attached {
                    XDP_ATTACHED_DRV if info.xdp_drv_prog == 0 => info.xdp_drv_prog = prog,
                    XDP_ATTACHED_SKB if info.xdp_skb_prog == 0 => info.xdp_skb_prog = prog,
                    XDP_ATTACHED_HW if info.xdp_hw_prog == 0 => info.xdp_hw_prog = prog,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Asks the kernel about one link over a raw `NETLINK_ROUTE` socket.
pub fn get_link(q: &LinkQuery<'_>) -> io::Result<LinkInfo> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = Duration::from_secs(2);
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let seq = 1;
    let req = encode_getlink(q, seq);
    // SAFETY: zeroed sockaddr_nl is valid; nl_pid 0 is the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: buffer and address valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let msg = &buf[..n as usize];
        // Skip anything that is not the answer to our request.
        if msg.len() >= NLMSG_HDRLEN && u32_of(&msg[8..12]) != Some(seq) {
            continue;
        }
        return decode_link(msg);
    }
}

// ---- the choice ----

/// Picks the hook of `device` for `mode`. `probe_native` tries a driver-mode XDP attach on a
/// device (detaching at once) and is called only for a non-veth device without XDP in auto mode.
pub fn choose(
    device: &str,
    mode: NorthSouth,
    probe_native: impl FnOnce(&str) -> anyhow::Result<()>,
) -> Choice {
    match mode {
        NorthSouth::Xdp => Choice {
            hook: Hook::Xdp,
            reason: "--north-south xdp".into(),
        },
        NorthSouth::Tc => Choice {
            hook: Hook::Tc,
            reason: "--north-south tc".into(),
        },
        NorthSouth::Auto => match get_link(&LinkQuery::Name(device)) {
            Err(e) => Choice {
                hook: Hook::Tc,
                reason: format!("cannot inspect the device over rtnetlink ({e})"),
            },
            Ok(l) => choose_auto(&l, get_link, probe_native),
        },
    }
}

/// [`choose`]'s auto rule on an inspected device; `lookup` asks about other links (the veth
/// peer).
pub fn choose_auto(
    dev: &LinkInfo,
    lookup: impl FnOnce(&LinkQuery<'_>) -> io::Result<LinkInfo>,
    probe_native: impl FnOnce(&str) -> anyhow::Result<()>,
) -> Choice {
    let tc = |reason: String| Choice {
        hook: Hook::Tc,
        reason,
    };
    let xdp = |reason: String| Choice {
        hook: Hook::Xdp,
        reason,
    };
    if dev.kind.as_deref() == Some("veth") {
        let Some(peer) = dev.link.filter(|&i| i > 0) else {
            return tc(
                "veth without a known peer (no IFLA_LINK): XDP_TX would not be delivered".into(),
            );
        };
        let ns = match dev.link_netnsid {
            Some(id) => format!("netns id {id}"),
            None => "this netns".into(),
        };
        return match lookup(&LinkQuery::Index(peer, dev.link_netnsid)) {
            Err(e) => tc(format!(
                "veth peer (ifindex {peer}, {ns}) cannot be inspected ({e}): XDP_TX and \
                 redirect deliver only if it runs XDP"
            )),
            Ok(p) => match p.native_xdp_prog() {
                Some(id) => xdp(format!(
                    "veth peer {} (ifindex {peer}, {ns}) runs native XDP program id {id}, so \
                     XDP_TX and redirect deliver",
                    p.name
                )),
                None if p.xdp_skb_prog != 0 => tc(format!(
                    "veth peer {} (ifindex {peer}, {ns}) runs XDP only in generic mode: XDP_TX \
                     and redirect frames would be dropped",
                    p.name
                )),
                None => tc(format!(
                    "veth peer {} (ifindex {peer}, {ns}) runs no XDP program: XDP_TX and \
                     redirect frames would be dropped",
                    p.name
                )),
            },
        };
    }
    if let Some(id) = dev.native_xdp_prog() {
        return xdp(format!("native XDP program id {id} already attached"));
    }
    if dev.xdp_skb_prog != 0 {
        return tc(format!(
            "only a generic-mode XDP program (id {}) is attached: no native XDP",
            dev.xdp_skb_prog
        ));
    }
    match probe_native(&dev.name) {
        Ok(()) => xdp("native (driver-mode) XDP attach works".into()),
        Err(e) => tc(format!("native (driver-mode) XDP attach failed ({e:#})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTM_NEWLINK message as the kernel would send it.
    fn newlink(index: i32, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; NLMSG_HDRLEN];
        b.extend_from_slice(&[0, 0, 1, 0]);
        b.extend_from_slice(&index.to_ne_bytes());
        b.extend_from_slice(&[0; 8]);
        for (t, p) in attrs {
            push_attr(&mut b, *t, p);
        }
        let len = b.len() as u32;
        b[0..4].copy_from_slice(&len.to_ne_bytes());
        b[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
        b
    }

    fn nested(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, p) in attrs {
            push_attr(&mut b, *t, p);
        }
        b
    }

    #[test]
    fn request_encodes_the_target_namespace() {
        let r = encode_getlink(&LinkQuery::Index(7, Some(3)), 9);
        assert_eq!(u32_of(&r).unwrap() as usize, r.len());
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), RTM_GETLINK);
        assert_eq!(i32_of(&r[20..24]), Some(7));
        let a: Vec<_> = attrs(&r[32..]).collect();
        assert_eq!(a[0], (IFLA_TARGET_NETNSID, &3i32.to_ne_bytes()[..]));
        assert_eq!(a[1].0, IFLA_EXT_MASK);
        let r = encode_getlink(&LinkQuery::Name("eth0"), 1);
        let a: Vec<_> = attrs(&r[32..]).collect();
        assert_eq!(a[0], (IFLA_IFNAME, &b"eth0\0"[..]));
    }

    #[test]
    fn answer_decodes_veth_peer_and_xdp() {
        let m = newlink(
            4,
            &[
                (IFLA_IFNAME, b"eth0\0".to_vec()),
                (IFLA_LINK, 12i32.to_ne_bytes().to_vec()),
                (IFLA_LINK_NETNSID, 2i32.to_ne_bytes().to_vec()),
                (
                    IFLA_LINKINFO | NLA_F_NESTED,
                    nested(&[(IFLA_INFO_KIND, b"veth\0".to_vec())]),
                ),
                (
                    IFLA_XDP | NLA_F_NESTED,
                    nested(&[
                        (IFLA_XDP_ATTACHED, vec![XDP_ATTACHED_DRV]),
                        (IFLA_XDP_PROG_ID, 55u32.to_ne_bytes().to_vec()),
                    ]),
                ),
            ],
        );
        let l = decode_link(&m).unwrap();
        assert_eq!(
            l,
            LinkInfo {
                ifindex: 4,
                name: "eth0".into(),
                kind: Some("veth".into()),
                link: Some(12),
                link_netnsid: Some(2),
                xdp_attached: XDP_ATTACHED_DRV,
                xdp_drv_prog: 55,
                ..Default::default()
            }
        );
        // An error answer is the errno.
        let mut e = vec![0u8; NLMSG_HDRLEN];
        e.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        e.extend_from_slice(&[0; 16]);
        let len = e.len() as u32;
        e[0..4].copy_from_slice(&len.to_ne_bytes());
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(
            decode_link(&e).unwrap_err().raw_os_error(),
            Some(libc::ENODEV)
        );
    }

    fn veth(peer_ns: Option<i32>) -> LinkInfo {
        LinkInfo {
            ifindex: 4,
            name: "eth0".into(),
            kind: Some("veth".into()),
            link: Some(12),
            link_netnsid: peer_ns,
            ..Default::default()
        }
    }

    fn no_probe(_: &str) -> anyhow::Result<()> {
        panic!("a veth is never probed")
    }

    #[test]
    fn auto_rule() {
        let peer = |drv: u32, skb: u32| {
            move |q: &LinkQuery<'_>| {
                assert!(matches!(q, LinkQuery::Index(12, Some(2))), "{q:?}");
                Ok(LinkInfo {
                    name: "p".into(),
                    xdp_drv_prog: drv,
                    xdp_skb_prog: skb,
                    ..Default::default()
                })
            }
        };
        assert_eq!(
            choose_auto(&veth(Some(2)), peer(9, 0), no_probe).hook,
            Hook::Xdp
        );
        assert_eq!(
            choose_auto(&veth(Some(2)), peer(0, 0), no_probe).hook,
            Hook::Tc
        );
        assert_eq!(
            choose_auto(&veth(Some(2)), peer(0, 9), no_probe).hook,
            Hook::Tc
        );
        let c = choose_auto(
            &veth(Some(2)),
            |_| Err(io::Error::from_raw_os_error(libc::EPERM)),
            no_probe,
        );
        assert_eq!(c.hook, Hook::Tc);
        assert!(c.reason.contains("cannot be inspected"), "{c:?}");
        // Not a veth: the probe decides, unless XDP is attached already.
        let phys = LinkInfo {
            name: "ens3".into(),
            ..Default::default()
        };
        let no_lookup = |_: &LinkQuery<'_>| -> io::Result<LinkInfo> { panic!("no peer") };
        assert_eq!(choose_auto(&phys, no_lookup, |_| Ok(())).hook, Hook::Xdp);
        assert_eq!(
            choose_auto(&phys, no_lookup, |_| anyhow::bail!("EOPNOTSUPP")).hook,
            Hook::Tc
        );
        let attached = LinkInfo {
            xdp_drv_prog: 3,
            ..phys.clone()
        };
        assert_eq!(
            choose_auto(&attached, no_lookup, |_| panic!("not probed")).hook,
            Hook::Xdp
        );
        let generic = LinkInfo {
            xdp_skb_prog: 3,
            ..phys
        };
        assert_eq!(
            choose_auto(&generic, no_lookup, |_| panic!("not probed")).hook,
            Hook::Tc
        );
    }

    #[test]
    fn north_south_values() {
        for v in ["xdp", "tc", "auto"] {
            assert_eq!(v.parse::<NorthSouth>().unwrap().to_string(), v);
        }
        assert!("XDP".parse::<NorthSouth>().is_err());
    }
}
