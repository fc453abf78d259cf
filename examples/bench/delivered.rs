//! The delivered-events check: what a subscriber received against what was written, event by
//! event (by id). Counts alone would pass one lost event plus one delivered twice.

use crate::common::R;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The ids of the events a subscriber received, in the order they arrived (`None` for an
/// event without an id). Clones share the record.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Option<i64>>>>);

impl Received {
    pub fn record(&self, id: Option<i64>) {
        // A poisoned lock only means another recorder panicked; the ids are still good.
        let mut ids = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.push(id);
    }

    pub fn ids(&self) -> Vec<Option<i64>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits until every id in `written` has arrived (or `limit` has passed), then `settle`
    /// longer so that an event delivered twice has the time to arrive twice; returns the
    /// comparison.
    pub async fn wait_for(&self, written: &[i64], limit: Duration, settle: Duration) -> Delivery {
        let started = Instant::now();
        let wanted: HashSet<i64> = written.iter().copied().collect();
        loop {
            let got: HashSet<i64> = self.ids().into_iter().flatten().collect();
            if wanted.is_subset(&got) || started.elapsed() >= limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(settle).await;
        Delivery::compare(written, &self.ids())
    }
}

/// The ids of the events in the `event` table above `after`, in id order: what the writers
/// wrote since the table's highest id was `after`.
pub async fn written_since(pool: &PgPool, after: i64) -> R<Vec<i64>> {
    Ok(
        sqlx::query_scalar("select id from event where id > $1 order by id")
            .bind(after)
            .fetch_all(pool)
            .await?,
    )
}

/// The highest event id in the table (0 when empty): the point `written_since` counts from.
pub async fn highest_event_id(pool: &PgPool) -> R<i64> {
    Ok(
        sqlx::query_scalar("select coalesce(max(id), 0)::bigint from event")
            .fetch_one(pool)
            .await?,
    )
}

/// A subscriber's events compared with those written, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// How many events were written.
    pub written: usize,
    /// How many events the subscriber received (repeats included).
    pub received: usize,
    /// Written but never received, in id order.
    pub missing: Vec<i64>,
    /// Received more than once, in id order, each id once.
    pub duplicated: Vec<i64>,
    /// Received but never written (`None`: an event without an id), in arrival order.
    pub unexpected: Vec<Option<i64>>,
}

impl Delivery {
    pub fn compare(written: &[i64], received: &[Option<i64>]) -> Self {
        let written_set: HashSet<i64> = written.iter().copied().collect();
        let mut times: HashMap<i64, usize> = HashMap::new();
        let mut unexpected = Vec::new();
        for id in received {
            match id {
                Some(id) if written_set.contains(id) => *times.entry(*id).or_default() += 1,
                other => unexpected.push(*other),
            }
        }
        let mut missing: Vec<i64> = written_set
            .iter()
            .filter(|id| !times.contains_key(id))
            .copied()
            .collect();
        missing.sort_unstable();
        let mut duplicated: Vec<i64> = times
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(&id, _)| id)
            .collect();
        duplicated.sort_unstable();
        Self {
            written: written.len(),
            received: received.len(),
            missing,
            duplicated,
            unexpected,
        }
    }

    /// Every event written was received exactly once, and nothing else was.
    pub fn exact(&self) -> bool {
        self.missing.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }

    /// One line: "exact", or what went wrong with up to five ids of each kind.
    pub fn describe(&self) -> String {
        if self.exact() {
            return format!("exact: {} written, each received once", self.written);
        }
        fn some<T: std::fmt::Debug>(ids: &[T]) -> String {
            let shown: Vec<String> = ids.iter().take(5).map(|id| format!("{id:?}")).collect();
            let more = if ids.len() > 5 { ", …" } else { "" };
            format!("{}{more}", shown.join(", "))
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing ({})",
                self.missing.len(),
                some(&self.missing)
            ));
        }
        if !self.duplicated.is_empty() {
            parts.push(format!(
                "{} received more than once ({})",
                self.duplicated.len(),
                some(&self.duplicated)
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} never written ({})",
                self.unexpected.len(),
                some(&self.unexpected)
            ));
        }
        format!(
            "NOT exact: {} written, {} received; {}",
            self.written,
            self.received,
            parts.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(ids: &[i64]) -> Vec<Option<i64>> {
        ids.iter().copied().map(Some).collect()
    }

    #[test]
    fn every_id_once_in_any_order_is_exact() {
        let d = Delivery::compare(&[1, 2, 3, 4], &some(&[3, 1, 4, 2]));
        assert!(d.exact(), "{}", d.describe());
    }

    #[test]
    fn one_lost_and_one_duplicated_fails_though_the_counts_agree() {
        let d = Delivery::compare(&[1, 2, 3, 4], &some(&[1, 2, 2, 4]));
        assert_eq!(d.written, d.received, "the counts agree");
        assert!(!d.exact());
        assert_eq!(d.missing, vec![3]);
        assert_eq!(d.duplicated, vec![2]);
        assert!(d.unexpected.is_empty());
        assert!(d.describe().starts_with("NOT exact"), "{}", d.describe());
    }

    #[test]
    fn one_lost_and_one_never_written_fails_though_the_counts_agree() {
        let d = Delivery::compare(&[1, 2, 3], &[Some(1), Some(3), Some(9)]);
        assert!(!d.exact());
        assert_eq!(d.missing, vec![2]);
        assert_eq!(d.unexpected, vec![Some(9)]);
        let d = Delivery::compare(&[1, 2], &[Some(1), None]);
        assert_eq!(d.missing, vec![2]);
        assert_eq!(d.unexpected, vec![None]);
    }

    #[test]
    fn nothing_received_misses_everything() {
        let d = Delivery::compare(&[5, 6], &[]);
        assert_eq!(d.missing, vec![5, 6]);
        assert!(!d.exact());
    }

    #[tokio::test]
    async fn wait_for_sees_a_duplicate_arriving_after_the_last_new_id() {
        let received = Received::default();
        for id in [1, 2] {
            received.record(Some(id));
        }
        let late = received.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            late.record(Some(2));
        });
        let d = received
            .wait_for(&[1, 2], Duration::from_secs(1), Duration::from_millis(300))
            .await;
        assert_eq!(d.duplicated, vec![2], "{}", d.describe());
    }
}
