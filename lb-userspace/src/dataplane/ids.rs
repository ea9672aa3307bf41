//! Ids for map entries (backends, rev-NAT entries, Service ports, Maglev tables), handed out
//! from 1 upwards and reused once freed; 0 is reserved in every map.
use std::collections::BTreeSet;

/// Ids handed out from 1 upwards, reusing freed ones (0 is reserved).
#[derive(Debug, Default)]
pub(super) struct IdAllocator {
    free: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    /// An allocator that will not hand out `used` (ids found in pinned maps).
    pub(super) fn with_used(used: impl Iterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.collect();
        let next = used.iter().next_back().copied().unwrap_or(0) + 1;
        let free = (1..next).filter(|i| !used.contains(i)).collect();
        Self { free, next }
    }
    pub(super) fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        self.next += 1;
        self.next - 1
    }
    pub(super) fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}
