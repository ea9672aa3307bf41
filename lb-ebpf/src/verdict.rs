//! How the north-south path ends for a packet it does not translate: the reason, which is a counter of
//! `lb_common::counter`, and the verdict that goes with it. Stages return `Err(Stop)`; the
//! program's entry point counts it and acts (`Stop::act`), so no reason goes uncounted.
use crate::{
    bounds::Bounds,
    maps::{self, ServiceEvent},
};

/// Why the north-south path stops before translating a packet.
#[derive(Clone, Copy)]
pub enum Stop {
    /// The packet goes to the stack untouched: it is not ours (not IPv4 TCP/UDP, no frontend,
    /// an ICMP message about no translated flow) or cannot be translated yet (no config).
    Pass(u32),
    /// The packet is dropped: a new flow that cannot be served. Counted under `reason` and on
    /// the Service port's counters as `event`.
    Drop {
        reason: u32,
        svc_port_id: u32,
        event: ServiceEvent,
    },
}

impl Stop {
    /// A drop for a reason other than "no usable endpoint" (Service port counter `drops_other`).
    #[inline(always)]
    pub fn drop_other(reason: u32, svc_port_id: u32) -> Self {
        Stop::Drop {
            reason,
            svc_port_id,
            event: ServiceEvent::DropOther,
        }
    }

    /// Counts the reason (with the frame's length) and returns the verdict.
    #[inline(always)]
    pub fn act<H: Bounds>(self, ctx: &H) -> u32 {
        let len = ctx.frame_len();
        match self {
            Stop::Pass(reason) => {
                maps::count(reason, len);
                H::PASS
            }
            Stop::Drop {
                reason,
                svc_port_id,
                event,
            } => {
                maps::count(reason, len);
                maps::count_service(svc_port_id, event);
                H::DROP
            }
        }
    }
}
