//! Comparing what a subscriber received with what the `event` table holds, by id: a lost
//! event and a duplicated one do not cancel out, and one backend's events must arrive in the
//! order they were written.

use crate::protocol::Delivered;
use std::collections::{BTreeMap, HashMap};

/// What a subscriber should have received: every event above the floor of the kinds it
/// subscribed to, by id, with its key.
pub type Expected = BTreeMap<i64, Option<String>>;

/// The result of comparing one subscriber's deliveries with [`Expected`].
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Events delivered (every delivery counts, duplicates included).
    pub delivered: usize,
    /// Expected ids compared.
    pub checked: usize,
    /// Events at or below the floor (committed before the subscription), delivered once
    /// each: allowed, as the subscription was not yet live for them.
    pub early: usize,
    /// Expected ids never delivered.
    pub lost: Vec<i64>,
    /// Ids delivered more than once.
    pub duplicated: Vec<i64>,
    /// Deliveries that were not expected: ids above the floor that the table does not
    /// hold for this subscriber, events without an id, or a key that differs from the
    /// table's.
    pub unexpected: Vec<String>,
    /// One key's events out of order: a backend's events must arrive in the order it was
    /// written (its ids, and its statuses, increasing).
    pub out_of_order: Vec<String>,
}

impl Verdict {
    /// Every expected event exactly once, nothing else, each key in order.
    pub fn is_exact(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.out_of_order.is_empty()
    }
}

/// Compares `delivered` (in delivery order) with `expected`. Events of `ordered_kind` are
/// also checked for order per key: each backend is written by one writer at a time, so its
/// events' commit order is their id order, and the bus must deliver them in commit order.
pub fn check(
    expected: &Expected,
    floor: i64,
    delivered: &[Delivered],
    ordered_kind: &str,
) -> Verdict {
    let mut verdict = Verdict {
        delivered: delivered.len(),
        checked: expected.len(),
        ..Verdict::default()
    };
    let mut times: HashMap<i64, usize> = HashMap::new();
    let mut last_per_key: HashMap<&str, (i64, Option<i32>)> = HashMap::new();
    for d in delivered {
        let count = times.entry(d.id).or_default();
        *count += 1;
        if *count == 2 {
            verdict.duplicated.push(d.id);
        }
        if d.id < 0 {
            verdict
                .unexpected
                .push(format!("an event without an id: {d:?}"));
        } else if d.id <= floor {
            if *count == 1 {
                verdict.early += 1;
            }
        } else {
            match expected.get(&d.id) {
                None => verdict
                    .unexpected
                    .push(format!("{} ({} {:?})", d.id, d.kind, d.key)),
                Some(key) if *key != d.key => verdict.unexpected.push(format!(
                    "{} with key {:?}, stored with {key:?}",
                    d.id, d.key
                )),
                Some(_) => {}
            }
        }
        if d.kind == ordered_kind {
            if let Some(key) = d.key.as_deref() {
                if let Some((id, status)) = last_per_key.insert(key, (d.id, d.status)) {
                    if d.id <= id || d.status <= status {
                        verdict.out_of_order.push(format!(
                            "{key}: {} (status {:?}) after {id} (status {status:?})",
                            d.id, d.status
                        ));
                    }
                }
            }
        }
    }
    verdict.lost = expected
        .keys()
        .filter(|id| !times.contains_key(id))
        .copied()
        .collect();
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, key: &str, status: i32) -> Delivered {
        Delivered {
            id,
            kind: "backend_state".into(),
            key: Some(key.into()),
            status: Some(status),
            at_us: 0,
        }
    }

    fn expected(events: &[Delivered]) -> Expected {
        events.iter().map(|e| (e.id, e.key.clone())).collect()
    }

    #[test]
    fn exact_delivery_passes_in_any_order_across_keys() {
        let written = [event(11, "a", 10), event(12, "b", 10), event(13, "a", 20)];
        // b's event committed last (a later commit may carry a smaller id).
        let delivered = [written[0].clone(), written[2].clone(), written[1].clone()];
        let verdict = check(&expected(&written), 10, &delivered, "backend_state");
        assert!(verdict.is_exact(), "{verdict:?}");
        assert_eq!((verdict.delivered, verdict.checked), (3, 3));
    }

    #[test]
    fn a_lost_event_and_a_duplicate_fail_although_the_count_is_right() {
        let written = [event(11, "a", 10), event(12, "b", 10), event(13, "a", 20)];
        let delivered = [written[0].clone(), written[0].clone(), written[2].clone()];
        let verdict = check(&expected(&written), 10, &delivered, "backend_state");
        assert_eq!(verdict.delivered, 3);
        assert!(!verdict.is_exact());
        assert_eq!(verdict.lost, vec![12]);
        assert_eq!(verdict.duplicated, vec![11]);
    }

    #[test]
    fn one_keys_events_out_of_order_fail() {
        let written = [event(11, "a", 10), event(13, "a", 20)];
        let delivered = [written[1].clone(), written[0].clone()];
        let verdict = check(&expected(&written), 10, &delivered, "backend_state");
        assert!(!verdict.is_exact());
        assert_eq!(verdict.out_of_order.len(), 1, "{verdict:?}");
    }

    #[test]
    fn events_not_stored_or_with_another_key_fail() {
        let written = [event(11, "a", 10)];
        let delivered = [written[0].clone(), event(12, "a", 20)];
        let verdict = check(&expected(&written), 10, &delivered, "backend_state");
        assert_eq!(verdict.unexpected.len(), 1, "{verdict:?}");
        let verdict = check(
            &expected(&written),
            10,
            &[event(11, "b", 10)],
            "backend_state",
        );
        assert_eq!(verdict.unexpected.len(), 1, "{verdict:?}");
    }

    #[test]
    fn events_from_before_the_subscription_may_arrive_once() {
        let written = [event(11, "a", 10)];
        let early = event(7, "z", 10);
        let once = [early.clone(), written[0].clone()];
        let verdict = check(&expected(&written), 10, &once, "backend_state");
        assert!(verdict.is_exact(), "{verdict:?}");
        assert_eq!(verdict.early, 1);
        let twice = [early.clone(), early, written[0].clone()];
        let verdict = check(&expected(&written), 10, &twice, "backend_state");
        assert_eq!(verdict.duplicated, vec![7]);
    }
}
