//! tc egress on the node's devices: replies of local backends leave towards the client with the
//! backend's address; translate the source back to the frontend (and the destination port back
//! to the client's, where its flow's port was remapped) (externalTrafficPolicy Local
//! keeps the client's address, so the backend answers the client directly through this node).
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use lb_common::{counter, ct_flags, proto, CtKey, CtKey6};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{ct, flow::Seg, hook6, maps, parse6};

const IP_CHECK_OFF: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, check);
const IP_SRC_OFF: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, src_addr);
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field (host order).
const IP_MF_OFFSET: u16 = 0x3fff;
/// Bytes the ingress program pulls into the linear part before the north-south path reads
/// them: Ethernet, IPv4 with options, and an ICMP error quoting IPv4 with options and 8 bytes.
pub const INGRESS_PULL: u32 = (EthHdr::LEN + 60 + 8 + 60 + 8) as u32;

/// The egress program: `Ok(TC_ACT_OK)` for every packet it looked at, translated or not. `Err`
/// is the error of a `bpf_skb_*` helper: a load past the end of a frame shorter than the
/// headers it claims, or a store or checksum update the kernel refused.
#[inline(always)]
pub fn try_egress(ctx: &TcContext) -> Result<i32, i64> {
    maps::count(counter::TC_SEEN, 0);
    let eth: EthHdr = ctx.load(0)?;
    if eth.ether_type == EtherType::Ipv6 as u16 {
        // SAFETY: a tail call does not return when it succeeds; with the slot empty the
        // frame leaves untouched.
        unsafe { maps::TCE6_PROG.tail_call(ctx, 0) };
        return Ok(TC_ACT_OK);
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Ok(TC_ACT_OK);
    }
    let ip: Ipv4Hdr = ctx.load(EthHdr::LEN)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Ok(TC_ACT_OK);
    }
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Ok(TC_ACT_OK);
    }
    let l4 = EthHdr::LEN + ihl;
    // The ports: the first four bytes of TCP and UDP headers alike.
    let ports: [u8; 4] = ctx.load(l4)?;
    let key = CtKey {
        saddr_be: u32::from_ne_bytes(ip.src_addr),
        daddr_be: u32::from_ne_bytes(ip.dst_addr),
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto: ip.proto,
        _pad: [0; 3],
    };
    let Some((found, _)) = ct::lookup(&key) else {
        return Ok(TC_ACT_OK);
    };
    // Only replies of flows whose backend is local, and that were not source-translated.
    // (A masqueraded flow's replies go to the node and are translated on ingress.)
    if found.flags & ct_flags::REPLY == 0
        || found.flags & ct_flags::LOCAL_BACKEND == 0
        || found.flags & ct_flags::SNAT != 0
    {
        return Ok(TC_ACT_OK);
    }
    // The reply moves the flow's state as on the XDP path (a UDP reply or a TCP SYN-ACK
    // towards confirmation, FIN and RST in window towards closing); an expired flow is a miss.
    let seg = if ip.proto == proto::TCP {
        let h: TcpHdr = ctx.load(l4)?;
        Seg::of(&h, u16::from_be_bytes(ip.tot_len), ihl as u16)
    } else {
        Seg::default()
    };
    let Some(e) = ct::follow_seg(&key, ip.proto, &seg) else {
        return Ok(TC_ACT_OK);
    };
    let check_off = l4
        + if ip.proto == proto::TCP {
            offset_of!(TcpHdr, check)
        } else {
            offset_of!(UdpHdr, check)
        };
    let udp_no_csum = ip.proto == proto::UDP && ctx.load::<u16>(check_off)? == 0;
    let pseudo = BPF_F_PSEUDO_HDR as u64 | 4;
    // The destination port too when the flow's client port was remapped (a four-tuple clash at
    // the backend, north_south.rs); otherwise it is the client's already.
    let remapped = e.nat_dport_be != key.dport_be;
    if !udp_no_csum {
        ctx.l4_csum_replace(
            check_off,
            key.saddr_be as u64,
            e.nat_saddr_be as u64,
            pseudo,
        )?;
        ctx.l4_csum_replace(check_off, key.sport_be as u64, e.nat_sport_be as u64, 2)?;
        if remapped {
            ctx.l4_csum_replace(check_off, key.dport_be as u64, e.nat_dport_be as u64, 2)?;
        }
    }
    ctx.l3_csum_replace(IP_CHECK_OFF, key.saddr_be as u64, e.nat_saddr_be as u64, 4)?;
    ctx.store(IP_SRC_OFF, &e.nat_saddr_be, 0)?;
    ctx.store(l4, &e.nat_sport_be, 0)?;
    if remapped {
        ctx.store(l4 + 2, &e.nat_dport_be, 0)?;
    }
    maps::count(counter::TC_REPLY, ctx.len() as u64);
    Ok(TC_ACT_OK)
}

const IP6_SRC_OFF: usize = EthHdr::LEN + offset_of!(Ipv6Hdr, src_addr);
const L4_OFF6: usize = EthHdr::LEN + Ipv6Hdr::LEN;

/// The IPv6 egress program (`lb_tc_egress6`, tail-called by `lb_tc_egress` for IPv6 frames):
/// the replies of local backends to IPv6 clients, translated back as [`try_egress`] does for
/// IPv4 (no header checksum; the pseudo-header's 128-bit source in the L4 checksum). Packets
/// with extension headers leave untouched, as the ingress path passes them.
#[inline(always)]
pub fn try_egress6(ctx: &TcContext) -> Result<i32, i64> {
    let ip: Ipv6Hdr = ctx.load(EthHdr::LEN)?;
    if ip.version() != 6 || (ip.next_hdr != proto::TCP && ip.next_hdr != proto::UDP) {
        return Ok(TC_ACT_OK);
    }
    let l4 = ip.next_hdr;
    let ports: [u8; 4] = ctx.load(L4_OFF6)?;
    // The key in the IPv6 path's per-CPU scratch (the stack is too small for its copies).
    let Some(s) = maps::PACKET6.get_ptr_mut(0) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: per-CPU value, no concurrent user on this CPU.
    let key = unsafe { &mut (*s).key };
    key.saddr_be = parse6::addr(&ip.src_addr);
    key.daddr_be = parse6::addr(&ip.dst_addr);
    key.sport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    key.dport_be = u16::from_ne_bytes([ports[2], ports[3]]);
    key.proto = l4;
    key._pad = [0; 3];
    let key: &CtKey6 = key;
    let Some((found, _)) = ct::lookup(key) else {
        return Ok(TC_ACT_OK);
    };
    if found.flags & ct_flags::REPLY == 0
        || found.flags & ct_flags::LOCAL_BACKEND == 0
        || found.flags & ct_flags::SNAT != 0
    {
        return Ok(TC_ACT_OK);
    }
    let seg = if l4 == proto::TCP {
        let h: TcpHdr = ctx.load(L4_OFF6)?;
        Seg::of(
            &h,
            u16::from_be_bytes(ip.payload_len).wrapping_add(Ipv6Hdr::LEN as u16),
            Ipv6Hdr::LEN as u16,
        )
    } else {
        Seg::default()
    };
    let Some(e) = ct::follow_seg(key, l4, &seg) else {
        return Ok(TC_ACT_OK);
    };
    let check_off = L4_OFF6
        + if l4 == proto::TCP {
            offset_of!(TcpHdr, check)
        } else {
            offset_of!(UdpHdr, check)
        };
    let udp_no_csum = l4 == proto::UDP && ctx.load::<u16>(check_off)? == 0;
    let pseudo = BPF_F_PSEUDO_HDR as u64 | 4;
    let remapped = e.nat_dport_be != key.dport_be;
    if !udp_no_csum {
        let mut i = 0;
        while i < 4 {
            ctx.l4_csum_replace(
                check_off,
                key.saddr_be[i] as u64,
                e.nat_saddr_be[i] as u64,
                pseudo,
            )?;
            i += 1;
        }
        ctx.l4_csum_replace(check_off, key.sport_be as u64, e.nat_sport_be as u64, 2)?;
        if remapped {
            ctx.l4_csum_replace(check_off, key.dport_be as u64, e.nat_dport_be as u64, 2)?;
        }
    }
    ctx.store(IP6_SRC_OFF, &hook6::bytes(&e.nat_saddr_be), 0)?;
    ctx.store(L4_OFF6, &e.nat_sport_be, 0)?;
    if remapped {
        ctx.store(L4_OFF6 + 2, &e.nat_dport_be, 0)?;
    }
    maps::count(counter::TC_REPLY, ctx.len() as u64);
    Ok(TC_ACT_OK)
}
