//! Held operations parked until their predecessor is answered.
//!
//! The back office answers `held` for an operation whose `prev` it has not applied. When
//! that predecessor is still out, unanswered (the back office left it for later, or a
//! broker delivered the batches out of order), sending the held one again at once would
//! only bring `held` back at the speed of a round trip, and cost a link that may be 2G
//! the whole operation every time. So it waits, still marked in progress in the store,
//! until its predecessor's answer comes on this connection; a connection that ends puts
//! it back with everything else that was out.

use std::collections::{HashMap, HashSet};

use crate::service::HELD;
use crate::uplink::wire::{Acks, Refusal};

/// One connection's parked operations.
#[derive(Default)]
pub struct Parking {
    /// The `prev` each operation out on this connection was sent with.
    prev_of: HashMap<String, String>,
    /// Parked operations, by the operation they wait for.
    behind: HashMap<String, Vec<String>>,
    parked: HashSet<String>,
}

impl Parking {
    /// Notes an operation as published.
    pub fn sent(&mut self, op_id: &str, prev: Option<&str>) {
        if let Some(prev) = prev {
            self.prev_of.insert(op_id.to_owned(), prev.to_owned());
        }
    }

    /// Rewrites an answer before it is recorded: a `held` whose predecessor is still out
    /// (`unanswered`, and not answered by this message) is taken out and parked, and
    /// the operations parked behind what this message answers are put back as `held`,
    /// to go again.
    pub fn answer(&mut self, acks: &mut Acks, unanswered: impl Fn(&str) -> bool) {
        if self.parked.is_empty() && !acks.refused.iter().any(|r| r.code == HELD) {
            // The common case, on every answer of a drain: nothing to park or release.
            for id in acks.acks.iter().chain(acks.refused.iter().map(|r| &r.id)) {
                self.prev_of.remove(id);
            }
            return;
        }
        let settled: HashSet<String> = acks.settled().into_iter().collect();
        let mut kept = Vec::with_capacity(acks.refused.len());
        for r in std::mem::take(&mut acks.refused) {
            if r.code == HELD {
                if let Some(prev) = self.prev_of.get(&r.id) {
                    let out =
                        self.parked.contains(prev) || (unanswered(prev) && !settled.contains(prev));
                    if out {
                        self.behind
                            .entry(prev.clone())
                            .or_default()
                            .push(r.id.clone());
                        self.parked.insert(r.id);
                        continue;
                    }
                }
            }
            kept.push(r);
        }
        acks.refused = kept;
        let mut free: Vec<String> = settled
            .into_iter()
            .filter(|id| !self.parked.contains(id))
            .collect();
        while let Some(id) = free.pop() {
            self.prev_of.remove(&id);
            for waiting in self.behind.remove(&id).unwrap_or_default() {
                self.parked.remove(&waiting);
                acks.refused.push(Refusal {
                    id: waiting.clone(),
                    code: HELD.into(),
                    reason: format!("waited on this device for {id} to be answered"),
                    work_order: None,
                });
                free.push(waiting);
            }
        }
    }

    /// Whether any operation is parked.
    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    /// Every parked operation, as `held` answers to record: for when nothing they could
    /// wait for is out any more.
    pub fn release_all(&mut self) -> Acks {
        self.behind.clear();
        self.prev_of.clear();
        Acks {
            v: crate::uplink::WIRE_VERSION,
            acks: Vec::new(),
            refused: self
                .parked
                .drain()
                .map(|id| Refusal {
                    id,
                    code: HELD.into(),
                    reason: "nothing it waited for is out any more".into(),
                    work_order: None,
                })
                .collect(),
            unreadable: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(acked: &[&str], held: &[&str]) -> Acks {
        Acks {
            v: 1,
            acks: acked.iter().map(|s| s.to_string()).collect(),
            refused: held
                .iter()
                .map(|id| Refusal {
                    id: id.to_string(),
                    code: HELD.into(),
                    reason: String::new(),
                    work_order: None,
                })
                .collect(),
            unreadable: Vec::new(),
        }
    }

    fn held(a: &Acks) -> Vec<&str> {
        a.refused.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_held_operation_waits_for_its_predecessor_and_goes_once_it_is_answered() {
        let mut p = Parking::default();
        p.sent("a", None);
        p.sent("b", Some("a"));
        p.sent("c", Some("b"));
        // `a` is left for later; `b` and `c` are held behind it.
        let out = |id: &str| id == "a";
        let mut first = acks(&[], &["b", "c"]);
        p.answer(&mut first, out);
        assert!(held(&first).is_empty(), "both parked, nothing to record");
        assert!(!p.is_empty());
        // `a` acknowledged: the parked ones go again, in one go.
        let mut second = acks(&["a"], &[]);
        p.answer(&mut second, |_| false);
        let mut again = held(&second);
        again.sort();
        assert_eq!(again, ["b", "c"]);
        assert!(p.is_empty());
    }

    #[test]
    fn a_held_operation_whose_predecessor_is_answered_goes_again_at_once() {
        let mut p = Parking::default();
        p.sent("b", Some("a"));
        // `a` was acknowledged before, or in this very message.
        let mut answer = acks(&[], &["b"]);
        p.answer(&mut answer, |_| false);
        assert_eq!(held(&answer), ["b"]);
        p.sent("d", Some("c"));
        let mut answer = acks(&["c"], &["d"]);
        p.answer(&mut answer, |id| id == "c");
        assert_eq!(held(&answer), ["d"]);
        assert!(p.is_empty());
    }
}
