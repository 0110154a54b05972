//! Writes that are durable in the write-ahead log but not yet in the redb index. Every read of the store
//! looks here first, then in redb, so a write is visible from the moment it is acknowledged.
//!
//! The writer thread adds ops after their `fdatasync`; the indexer removes them after the redb commit that
//! contains them. A reader that reads the overlay before opening its redb transaction therefore never
//! misses a write: it is either still here, or already committed in redb.

use std::collections::{BTreeMap, HashMap};

use super::Op;

/// The un-indexed writes, by key. Upserts keep the lsn that wrote them, so an indexer batch only removes
/// a value it has written itself, never a newer one.
#[derive(Debug, Default)]
pub struct Overlay {
    /// conv → seq → entry JSON.
    pub entries: HashMap<String, BTreeMap<u64, Vec<u8>>>,
    /// conv → client id → seq.
    pub idem: HashMap<String, HashMap<String, u64>>,
    pub convs: HashMap<String, (u64, Vec<u8>)>,
    pub agents: HashMap<String, (u64, Vec<u8>)>,
    /// `None`: deleted.
    pub canned: HashMap<String, (u64, Option<Vec<u8>>)>,
}

impl Overlay {
    /// Record `ops`, the first of which has lsn `first`.
    pub fn add(&mut self, first: u64, ops: &[Op]) {
        for (i, op) in ops.iter().enumerate() {
            let lsn = first + i as u64;
            match op {
                Op::Entry { conv, seq, json, idem } => {
                    self.entries.entry(conv.clone()).or_default().insert(*seq, json.clone());
                    if let Some(client) = idem {
                        self.idem.entry(conv.clone()).or_default().insert(client.clone(), *seq);
                    }
                }
                Op::Conversation { id, json } => {
                    self.convs.insert(id.clone(), (lsn, json.clone()));
                }
                Op::Agent { id, json } => {
                    self.agents.insert(id.clone(), (lsn, json.clone()));
                }
                Op::Canned { id, json } => {
                    self.canned.insert(id.clone(), (lsn, Some(json.clone())));
                }
                Op::DeleteCanned { id } => {
                    self.canned.insert(id.clone(), (lsn, None));
                }
            }
        }
    }

    /// Forget `ops` now that redb holds them.
    pub fn remove_indexed(&mut self, ops: &[(u64, Op)]) {
        fn drop_if_written_by<V>(map: &mut HashMap<String, (u64, V)>, id: &str, lsn: u64) {
            if map.get(id).is_some_and(|(l, _)| *l <= lsn) {
                map.remove(id);
            }
        }
        for (lsn, op) in ops {
            match op {
                Op::Entry { conv, seq, idem, .. } => {
                    if let Some(m) = self.entries.get_mut(conv) {
                        m.remove(seq);
                        if m.is_empty() {
                            self.entries.remove(conv);
                        }
                    }
                    if let (Some(client), Some(m)) = (idem, self.idem.get_mut(conv)) {
                        m.remove(client);
                        if m.is_empty() {
                            self.idem.remove(conv);
                        }
                    }
                }
                Op::Conversation { id, .. } => drop_if_written_by(&mut self.convs, id, *lsn),
                Op::Agent { id, .. } => drop_if_written_by(&mut self.agents, id, *lsn),
                Op::Canned { id, .. } | Op::DeleteCanned { id } => drop_if_written_by(&mut self.canned, id, *lsn),
            }
        }
    }

    /// Entries of `conv` with seq in `range`, ascending.
    pub fn entries_in(&self, conv: &str, range: impl std::ops::RangeBounds<u64>) -> Vec<(u64, Vec<u8>)> {
        self.entries.get(conv).map(|m| m.range(range).map(|(s, j)| (*s, j.clone())).collect()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(BTreeMap::len).sum::<usize>()
            + self.convs.len()
            + self.agents.len()
            + self.canned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_batch_does_not_remove_a_newer_upsert_of_the_same_key() {
        let mut o = Overlay::default();
        let v1 = Op::Conversation { id: "c".into(), json: b"1".to_vec() };
        let v2 = Op::Conversation { id: "c".into(), json: b"2".to_vec() };
        o.add(10, std::slice::from_ref(&v1));
        o.add(11, std::slice::from_ref(&v2));
        o.remove_indexed(&[(10, v1)]);
        assert_eq!(o.convs.get("c").map(|(_, j)| j.as_slice()), Some(&b"2"[..]));
        o.remove_indexed(&[(11, v2)]);
        assert!(o.is_empty());
    }

    #[test]
    fn indexed_entries_and_their_client_ids_leave_the_overlay() {
        let mut o = Overlay::default();
        let e = |seq| Op::Entry { conv: "c".into(), seq, json: vec![b'0' + seq as u8], idem: Some(format!("m{seq}")) };
        o.add(1, &[e(1), e(2), e(3)]);
        assert_eq!(o.entries_in("c", 2..).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2, 3]);
        o.remove_indexed(&[(1, e(1)), (2, e(2))]);
        assert_eq!(o.entries_in("c", ..).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3]);
        assert_eq!(o.idem.get("c").map(HashMap::len), Some(1));
        o.remove_indexed(&[(3, e(3))]);
        assert!(o.is_empty() && o.idem.is_empty());
    }
}
