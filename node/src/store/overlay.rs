//! Writes that are durable in the write-ahead log but not yet in the redb index. Every read of the store
//! looks here first, then in redb, so a write is visible from the moment it is acknowledged.
//!
//! The overlay is a queue of generations. The writer thread adds ops to the newest one after their
//! `fdatasync`. The indexer seals the newest generation (a new empty one takes its place), applies the
//! sealed ones to redb without holding the lock, and then drops them. Every step under the lock is O(1)
//! for the indexer, so the writer — on the ack path — never waits behind index work. A reader that reads
//! the overlay before opening its redb transaction never misses a write: a generation leaves the overlay
//! only after the redb commit that contains it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::Op;

/// The un-indexed writes of one interval, latest value per key.
#[derive(Debug, Default, Clone)]
pub struct Generation {
    /// conv → seq → entry JSON.
    pub entries: HashMap<String, BTreeMap<u64, Vec<u8>>>,
    /// conv → client id → seq.
    pub idem: HashMap<String, HashMap<String, u64>>,
    pub convs: HashMap<String, Vec<u8>>,
    pub agents: HashMap<String, Vec<u8>>,
    /// `None`: deleted.
    pub canned: HashMap<String, Option<Vec<u8>>>,
    /// The lsn of the last op added; 0 while empty.
    pub last_lsn: u64,
    ops: usize,
}

impl Generation {
    pub fn len(&self) -> usize {
        self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }
}

/// The generations, oldest first; the last one takes new writes.
#[derive(Debug)]
pub struct Overlay {
    gens: VecDeque<Arc<Generation>>,
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay { gens: VecDeque::from([Arc::default()]) }
    }
}

impl Overlay {
    /// Record `ops`, the first of which has lsn `first`, in the newest generation; returns its size.
    pub fn add(&mut self, first: u64, ops: &[Op]) -> usize {
        if self.gens.is_empty() {
            self.gens.push_back(Arc::default());
        }
        let Some(back) = self.gens.back_mut() else { return 0 };
        // Sealed generations are shared with the indexer; the newest never is, so this does not copy.
        let g = Arc::make_mut(back);
        for op in ops {
            match op {
                Op::Entry { conv, seq, json, idem } => {
                    g.entries.entry(conv.clone()).or_default().insert(*seq, json.clone());
                    if let Some(client) = idem {
                        g.idem.entry(conv.clone()).or_default().insert(client.clone(), *seq);
                    }
                }
                Op::Conversation { id, json } => {
                    g.convs.insert(id.clone(), json.clone());
                }
                Op::Agent { id, json } => {
                    g.agents.insert(id.clone(), json.clone());
                }
                Op::Canned { id, json } => {
                    g.canned.insert(id.clone(), Some(json.clone()));
                }
                Op::DeleteCanned { id } => {
                    g.canned.insert(id.clone(), None);
                }
            }
        }
        g.ops += ops.len();
        g.last_lsn = first + ops.len() as u64 - 1;
        g.ops
    }

    /// Seal the newest generation when it holds anything, and return every sealed one (oldest first) for
    /// the indexer to apply.
    pub fn seal(&mut self) -> Vec<Arc<Generation>> {
        if self.gens.back().is_some_and(|g| !g.is_empty()) {
            self.gens.push_back(Arc::default());
        }
        self.gens.iter().take(self.gens.len() - 1).cloned().collect()
    }

    /// Drop the `n` oldest generations: redb holds them now. The caller drops them outside the lock.
    pub fn release(&mut self, n: usize) -> Vec<Arc<Generation>> {
        let n = n.min(self.gens.len().saturating_sub(1));
        self.gens.drain(..n).collect()
    }

    /// Newest first: the order in which a key's latest value is found.
    fn newest_first(&self) -> impl Iterator<Item = &Generation> {
        self.gens.iter().rev().map(|g| &**g)
    }

    /// Entries of `conv` with seq in `range`, ascending.
    pub fn entries_in(&self, conv: &str, range: impl std::ops::RangeBounds<u64> + Clone) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self
            .gens
            .iter()
            .filter_map(|g| g.entries.get(conv))
            .flat_map(|m| m.range(range.clone()).map(|(s, j)| (*s, j.clone())))
            .collect();
        out.sort_by_key(|(s, _)| *s);
        out
    }

    pub fn last_seq(&self, conv: &str) -> Option<u64> {
        self.gens.iter().filter_map(|g| g.entries.get(conv)?.keys().next_back().copied()).max()
    }

    pub fn idem(&self, conv: &str, client: &str) -> Option<u64> {
        self.newest_first().find_map(|g| g.idem.get(conv)?.get(client).copied())
    }

    /// The latest value of `id` in the map `pick` chooses (`convs`, `agents`, `canned`), if written here.
    pub fn latest<V: Clone>(&self, id: &str, pick: impl Fn(&Generation) -> &HashMap<String, V>) -> Option<V> {
        self.newest_first().find_map(|g| pick(g).get(id).cloned())
    }

    /// Every key written here in the map `pick` chooses, latest value each.
    pub fn all_latest<V: Clone>(&self, pick: impl Fn(&Generation) -> &HashMap<String, V>) -> HashMap<String, V> {
        let mut out = HashMap::new();
        for g in self.newest_first() {
            for (id, v) in pick(g) {
                out.entry(id.clone()).or_insert_with(|| v.clone());
            }
        }
        out
    }

    /// Ops not yet indexed.
    pub fn len(&self) -> usize {
        self.gens.iter().map(|g| g.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Op {
        Op::Entry { conv: "c".into(), seq, json: vec![b'0' + seq as u8], idem: Some(format!("m{seq}")) }
    }

    #[test]
    fn the_newest_value_of_a_key_wins_across_generations() {
        let mut o = Overlay::default();
        o.add(10, &[Op::Conversation { id: "c".into(), json: b"1".to_vec() }]);
        let sealed = o.seal();
        assert_eq!(sealed.len(), 1);
        o.add(11, &[Op::Conversation { id: "c".into(), json: b"2".to_vec() }]);
        assert_eq!(o.latest("c", |g| &g.convs).as_deref(), Some(&b"2"[..]));
        assert_eq!(o.all_latest(|g| &g.convs).get("c").map(Vec::as_slice), Some(&b"2"[..]));
        // Releasing the sealed (older) generation keeps the newer value.
        drop(o.release(sealed.len()));
        assert_eq!(o.latest("c", |g| &g.convs).as_deref(), Some(&b"2"[..]));
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn entries_span_generations_and_leave_when_released() {
        let mut o = Overlay::default();
        o.add(1, &[entry(1), entry(2)]);
        let sealed = o.seal();
        assert_eq!(sealed[0].last_lsn, 2);
        o.add(3, &[entry(3)]);
        assert_eq!(o.entries_in("c", 2..).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(o.last_seq("c"), Some(3));
        assert_eq!(o.idem("c", "m1"), Some(1));
        drop(o.release(1));
        assert_eq!(o.entries_in("c", ..).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3]);
        assert_eq!(o.idem("c", "m1"), None);
        // Sealing again takes the rest; the newest (empty) generation is never released.
        let sealed = o.seal();
        assert_eq!(sealed.len(), 1);
        drop(o.release(5));
        assert!(o.is_empty());
        assert!(o.seal().is_empty(), "nothing to seal");
    }
}
