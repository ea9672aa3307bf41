//! North-south path on the node's devices. For now: parse Ethernet/IPv4/TCP/UDP, look the
//! destination up among the external frontends and pass every frame, counting why.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{counter, proto, scope, ServiceKey};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{maps, parse::ptr_at};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

pub fn process(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    maps::count(counter::XDP_RX, len);
    let reason = classify(ctx);
    maps::count(reason, len);
    xdp_action::XDP_PASS
}

/// Parses the frame and returns the counter that says why it is passed.
#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return counter::XDP_TRUNCATED_ETH };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return counter::XDP_NON_IPV4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else { return counter::XDP_TRUNCATED_IPV4 };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return counter::XDP_BAD_IPV4;
    }
    let hdr_len = ihl * 4;
    if hdr_len > Ipv4Hdr::LEN {
        if ptr_at::<u8>(ctx, EthHdr::LEN + hdr_len - 1).is_none() {
            return counter::XDP_TRUNCATED_IPV4;
        }
        maps::count(counter::XDP_IPV4_OPTIONS, 0);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return counter::XDP_FRAGMENT;
    }
    let l4 = EthHdr::LEN + hdr_len;
    let dport_be = match ip.proto {
        proto::TCP => match ptr_at::<TcpHdr>(ctx, l4) {
            // SAFETY: bounds checked by ptr_at.
            Some(tcp) => u16::from_ne_bytes(unsafe { (*tcp).dest }),
            None => return counter::XDP_TRUNCATED_L4,
        },
        proto::UDP => match ptr_at::<UdpHdr>(ctx, l4) {
            // SAFETY: bounds checked by ptr_at.
            Some(udp) => u16::from_ne_bytes(unsafe { (*udp).dst }),
            None => return counter::XDP_TRUNCATED_L4,
        },
        _ => return counter::XDP_NOT_TCP_UDP,
    };
    let key = ServiceKey {
        addr_be: u32::from_ne_bytes(ip.dst_addr),
        port_be: dport_be,
        proto: ip.proto,
        scope: scope::EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    match maps::service(&key) {
        Some(_) => counter::XDP_FRONTEND_PASS,
        None => counter::XDP_NO_FRONTEND,
    }
}
