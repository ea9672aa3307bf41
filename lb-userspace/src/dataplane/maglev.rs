//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016), for the backend choice of new north-south flows.
//!
//! Each backend gets a permutation of the table's M positions from two hashes of its identity
//! (`address:port/protocol`, never the node-local backend id), and the backends take turns
//! claiming their next free position until the table is full. So:
//! - every node builds the same table for the same backend set, whatever ids or order it has;
//! - each backend owns M/N positions, give or take one;
//! - when a backend leaves, its positions are shared out and few others move.
//!
//! M is the smallest prime of [`SIZES`] that is at least 100 times the number of backends (the
//! paper's bound for an imbalance under about 1 %), capped at 65,521.
use std::net::SocketAddr;

use lb_common::{MaglevChunk, MAGLEV_CHUNK};

/// Table sizes, all prime.
pub const SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// The table size for `n` backends.
pub fn table_size(n: usize) -> u32 {
    SIZES
        .iter()
        .copied()
        .find(|m| *m as usize >= n.saturating_mul(100))
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// A backend's identity as every node spells it.
pub fn identity(addr: SocketAddr, proto: u8) -> String {
    format!("{addr}/{proto}")
}

/// FNV-1a over the bytes, then a 64-bit finaliser, seeded: stable across builds and machines.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The table for backends named `names` (any order; they are sorted first): entry i is the
/// index into the sorted names. Empty for no backends.
pub fn populate(names: &[String], m: u32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|a, b| names[*a].cmp(&names[*b]));
    let m64 = m as u64;
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|i| {
            let offset = hash64(names[*i].as_bytes(), 0x6d61_676c_6576_3031) % m64;
            let skip = hash64(names[*i].as_bytes(), 0x736b_6970_7365_6564) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut table = vec![usize::MAX; m as usize];
    if names.is_empty() {
        return Vec::new();
    }
    let mut next = vec![0u64; names.len()];
    let mut filled = 0usize;
    loop {
        for (turn, (offset, skip)) in perm.iter().enumerate() {
            let mut c = ((offset + next[turn] * skip) % m64) as usize;
            while table[c] != usize::MAX {
                next[turn] += 1;
                c = ((offset + next[turn] * skip) % m64) as usize;
            }
            table[c] = order[turn];
            next[turn] += 1;
            filled += 1;
            if filled == m as usize {
                return table;
            }
        }
    }
}

/// The table as backend ids, for backends given as (address, protocol, id).
pub fn table(backends: &[(SocketAddr, u8, u32)]) -> (u32, Vec<u32>) {
    let m = table_size(backends.len());
    let names: Vec<String> = backends.iter().map(|(a, p, _)| identity(*a, *p)).collect();
    let t = populate(&names, m)
        .into_iter()
        .map(|i| backends[i].2)
        .collect();
    (m, t)
}

/// The table cut into map values: chunk `c` holds entries `c * MAGLEV_CHUNK ..`.
pub fn chunks(table: &[u32]) -> Vec<MaglevChunk> {
    table
        .chunks(MAGLEV_CHUNK as usize)
        .map(|c| {
            let mut v = MaglevChunk {
                backend_ids: [0; MAGLEV_CHUNK as usize],
            };
            v.backend_ids[..c.len()].copy_from_slice(c);
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, SocketAddrV4},
    };

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                identity(
                    SocketAddrV4::new(
                        Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1),
                        8080,
                    )
                    .into(),
                    6,
                )
            })
            .collect()
    }

    #[test]
    fn sizes_are_prime_and_grow_with_the_backends() {
        for m in SIZES {
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} is not prime"
            );
        }
        assert_eq!(table_size(1), 251);
        assert_eq!(table_size(10), 1021);
        assert_eq!(table_size(100), 16381);
        assert_eq!(table_size(5000), 65521);
    }

    #[test]
    fn balanced() {
        for n in [2usize, 3, 10, 37, 100] {
            let m = table_size(n);
            let t = populate(&names(n), m);
            let mut per = vec![0usize; n];
            for i in &t {
                per[*i] += 1;
            }
            let ideal = m as f64 / n as f64;
            let (lo, hi) = (*per.iter().min().unwrap(), *per.iter().max().unwrap());
            // Each backend's share is within one position of M/N, give or take 1 %.
            assert!(
                lo as f64 >= ideal * 0.99 - 1.0 && hi as f64 <= ideal * 1.01 + 1.0,
                "n={n}: {lo}..{hi} around {ideal}"
            );
        }
    }

    #[test]
    fn order_and_ids_do_not_matter() {
        let n = names(10);
        let mut shuffled = n.clone();
        shuffled.reverse();
        shuffled.swap(2, 7);
        let a: Vec<&String> = populate(&n, 1021).iter().map(|i| &n[*i]).collect();
        let b: Vec<&String> = populate(&shuffled, 1021)
            .iter()
            .map(|i| &shuffled[*i])
            .collect();
        assert_eq!(a, b);
        // Two nodes with different backend ids produce the same table of addresses.
        let addrs: Vec<SocketAddr> = (0..10)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, i), 80).into())
            .collect();
        let node_a: Vec<_> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, 6u8, i as u32 + 1))
            .collect();
        let node_b: Vec<_> = addrs
            .iter()
            .enumerate()
            .rev()
            .map(|(i, a)| (*a, 6u8, 100 + i as u32))
            .collect();
        let by_id_a: HashMap<u32, SocketAddr> = node_a.iter().map(|(a, _, id)| (*id, *a)).collect();
        let by_id_b: HashMap<u32, SocketAddr> = node_b.iter().map(|(a, _, id)| (*id, *a)).collect();
        let (ma, ta) = table(&node_a);
        let (mb, tb) = table(&node_b);
        assert_eq!(ma, mb);
        let ta: Vec<_> = ta.iter().map(|id| by_id_a[id]).collect();
        let tb: Vec<_> = tb.iter().map(|id| by_id_b[id]).collect();
        assert_eq!(ta, tb);
    }

    /// Removing one backend of N moves its own positions and few others: the paper's minimal
    /// disruption. Adding one back restores the table exactly.
    #[test]
    fn removal_moves_few_flows() {
        for n in [5usize, 10, 50] {
            let all = names(n);
            let m = table_size(n);
            let before: Vec<&String> = populate(&all, m).iter().map(|i| &all[*i]).collect();
            let gone = &all[n / 2];
            let rest: Vec<String> = all.iter().filter(|x| *x != gone).cloned().collect();
            let after: Vec<&String> = populate(&rest, m).iter().map(|i| &rest[*i]).collect();
            let owned = before.iter().filter(|x| **x == gone).count();
            let moved_others = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != gone && b != a)
                .count();
            // Only the removed backend's positions had to move; allow 4 % of the rest.
            assert!(
                (moved_others as f64) < 0.04 * (m as usize - owned) as f64,
                "n={n}: {moved_others} of {} other positions moved",
                m as usize - owned
            );
            assert_eq!(
                populate(&all, m)
                    .iter()
                    .map(|i| &all[*i])
                    .collect::<Vec<_>>(),
                before
            );
        }
    }

    #[test]
    fn chunks_cover_the_table() {
        let (m, t) = table(&[
            (SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1).into(), 6, 7),
            (SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2).into(), 6, 9),
        ]);
        let c = chunks(&t);
        assert_eq!(c.len(), (m as usize).div_ceil(MAGLEV_CHUNK as usize));
        let flat: Vec<u32> = c
            .iter()
            .flat_map(|c| c.backend_ids)
            .take(m as usize)
            .collect();
        assert_eq!(flat, t);
        assert!(c.last().unwrap().backend_ids[(m % MAGLEV_CHUNK) as usize..]
            .iter()
            .all(|x| *x == 0));
    }
}
