//! SNAT port choice for new flows to remote backends (externalTrafficPolicy Cluster): the source
//! port on the node address that the backend answers to. Candidates start from the flow hash,
//! so a flow whose entries were evicted gets its port back, on any node.
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use lb_common::{counter, limits, mix32, Config, CtKey};

use crate::{ct, maps, parse::Packet};

/// No SNAT port is free (or the configured range is empty).
pub struct Exhausted;

/// The first free port (network order) for a new flow `p` whose reply entry is `reply` with the
/// port as its destination. Each taken candidate is counted (`XDP_SNAT_COLLISION`); after
/// `limits::SNAT_TRIES` of them the flow gets none (logged: a rare event).
#[inline(always)]
pub fn free_port(
    ctx: &XdpContext,
    cfg: &Config,
    p: &Packet,
    reply: &CtKey,
    hash: u32,
    now: u32,
) -> Result<u16, Exhausted> {
    let min = cfg.snat_port_min as u32;
    let range = (cfg.snat_port_max as u32).wrapping_sub(min).wrapping_add(1);
    if cfg.snat_port_max < cfg.snat_port_min || range == 0 {
        return Err(Exhausted);
    }
    let start = mix32(hash ^ 0x5bd1_e995);
    let mut rkey = *reply;
    for i in 0..limits::SNAT_TRIES {
        let port = (min + (start.wrapping_add(i.wrapping_mul(4099)) % range)) as u16;
        rkey.dport_be = port.to_be();
        // A candidate is free when neither conntrack tier holds it, when the entry holding it
        // is this very flow's (its other entry was evicted), or when it belongs to a TCP flow
        // the backend closed and that has been idle since (its entries are dropped first).
        let taken = match ct::lookup(&rkey) {
            Some((e, _)) if ct::same_flow(&e, p.saddr, p.sport, p.daddr, p.dport) => false,
            Some((e, _)) if ct::reusable(&e, now) => {
                ct::forget(&rkey, &e);
                false
            }
            Some(_) => true,
            None => false,
        };
        if !taken {
            return Ok(rkey.dport_be);
        }
        maps::count(counter::XDP_SNAT_COLLISION, 0);
    }
    debug!(
        ctx,
        "SNAT ports exhausted towards {:i}:{}",
        u32::from_be(reply.saddr_be),
        u16::from_be(reply.sport_be)
    );
    Err(Exhausted)
}
