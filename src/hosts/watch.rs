//! Keeping a pool on a host that fits: the check of each new connection, the retirement of
//! connections to a host left behind, and the task that watches the chosen host.

use super::select::{connect_fitting, connect_fitting_from, server_state, within};
use super::{HostList, DEFAULT_CONNECT_TIMEOUT};
use crate::metrics as m;
use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnectionMetadata;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgConnection, PgPool};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// The hosts of one URL and the one its pools use now, shared by those pools' hooks and
/// the task that watches it.
#[derive(Debug)]
pub(crate) struct HostSet {
    list: HostList,
    /// What the URL is for (`main`, `replica 1`…), in logs and metrics.
    label: String,
    chosen: AtomicUsize,
    epoch: Instant,
    /// Connections opened before this instant (nanoseconds since `epoch`; 0: none) are
    /// closed rather than used: they reach a host that was left.
    retired_before: AtomicU64,
    /// Bumped on every move, for connections held outside a pool (the bus's listener).
    moves: watch::Sender<u64>,
    wake: Notify,
}

impl HostSet {
    /// The hosts of `list`, starting at host `chosen`.
    pub(crate) fn new(list: HostList, label: String, chosen: usize) -> Arc<Self> {
        Arc::new(Self {
            list,
            label,
            chosen: AtomicUsize::new(chosen),
            epoch: Instant::now(),
            retired_before: AtomicU64::new(0),
            moves: watch::channel(0).0,
            wake: Notify::new(),
        })
    }

    /// The index of the host in use.
    fn chosen(&self) -> usize {
        self.chosen.load(Ordering::Acquire)
    }

    /// Changes whenever the pools move to another host (or stop trusting theirs).
    pub(crate) fn moves(&self) -> watch::Receiver<u64> {
        self.moves.subscribe()
    }

    /// Host `index` is the one to use from now on: connections opened before are retired,
    /// and the task moves the pools there.
    fn move_to(&self, index: usize, why: &str) {
        let from = self.chosen.swap(index, Ordering::AcqRel);
        tracing::warn!(
            url = %self.label,
            from = %self.list.describe(from),
            to = %self.list.describe(index),
            why,
            "moving to another host"
        );
        metrics::counter!(m::HOST_MOVES_TOTAL, "url" => self.label.clone()).increment(1);
        self.retire_all();
        self.wake.notify_one();
    }

    /// Connections opened until now are not to be used again.
    fn retire_all(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.retired_before.fetch_max(now.max(1), Ordering::AcqRel);
        self.moves.send_modify(|moves| *moves += 1);
    }

    /// Whether a connection of this age was opened before the last move.
    fn is_retired(&self, age: Duration) -> bool {
        let retired_before = self.retired_before.load(Ordering::Acquire);
        if retired_before == 0 {
            return false;
        }
        let opened = self.epoch.elapsed().saturating_sub(age).as_nanos() as u64;
        opened < retired_before
    }

    fn check_timeout(&self) -> Option<Duration> {
        Some(self.list.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))
    }
}

/// A pool's view of a [`HostSet`]: the set, and the pool's own settings (its application
/// name…) to which the chosen host is applied.
#[derive(Debug, Clone)]
pub(crate) struct PoolHosts {
    pub(crate) set: Arc<HostSet>,
    pub(crate) base: PgConnectOptions,
}

impl PoolHosts {
    /// The pool's options for the host in use.
    pub(crate) fn options(&self) -> PgConnectOptions {
        self.set.list.options_for(&self.base, self.set.chosen())
    }

    /// `options` with the hooks that keep the pool on a fitting host: every new connection
    /// is checked (and replaced by a search's if it does not fit) before `settings` run on
    /// it; a connection opened before a move is closed instead of handed out or kept.
    pub(crate) fn hook(&self, options: PgPoolOptions, settings: Arc<str>) -> PgPoolOptions {
        let admit = self.clone();
        let on_acquire = self.set.clone();
        let on_release = self.set.clone();
        options
            .after_connect(move |conn, _| {
                let (admit, settings) = (admit.clone(), settings.clone());
                Box::pin(async move {
                    admit.admit(conn).await?;
                    if !settings.is_empty() {
                        conn.execute(&*settings).await?;
                    }
                    Ok(())
                })
            })
            .before_acquire(move |_, meta| keep(&on_acquire, meta))
            .after_release(move |_, meta| keep(&on_release, meta))
    }

    /// Checks a new connection; one that does not fit is swapped for one from a search.
    async fn admit(&self, conn: &mut PgConnection) -> sqlx::Result<()> {
        let target = self.set.list.target;
        if !target.needs_check() {
            return Ok(());
        }
        let state = within(self.set.check_timeout(), server_state(conn)).await;
        if let Some(Ok(state)) = state {
            if target.accepts(state) {
                return Ok(());
            }
        }
        let (found, index) = connect_fitting(&self.set.list, &self.base).await.map_err(
            |error| {
                metrics::counter!(m::HOST_SEARCH_FAILURES_TOTAL, "url" => self.set.label.clone())
                    .increment(1);
                sqlx::Error::Configuration(Box::new(error))
            },
        )?;
        // The pool keeps what it holds; the unfit connection just goes.
        drop(std::mem::replace(conn, found));
        if index != self.set.chosen() {
            self.set
                .move_to(index, "a new connection found its host unfit");
        }
        Ok(())
    }
}

fn keep(set: &HostSet, meta: PoolConnectionMetadata) -> BoxFuture<'static, sqlx::Result<bool>> {
    let keep = !set.is_retired(meta.age);
    Box::pin(async move { Ok(keep) })
}

impl super::TargetSessionAttrs {
    /// Whether a connection must be checked (`prefer-standby` keeps whatever it found).
    fn needs_check(self) -> bool {
        !matches!(
            self,
            super::TargetSessionAttrs::Any | super::TargetSessionAttrs::PreferStandby
        )
    }
}

/// The tasks that watch host sets; dropping it (with the last `PlaneDatabase` clone) stops
/// them.
#[derive(Debug, Default)]
pub(crate) struct HostWatch(Vec<tokio::task::AbortHandle>);

impl Drop for HostWatch {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

impl HostWatch {
    /// Starts watching `set` for `pools` (each with its own settings), checking the chosen
    /// host every `interval` on a connection of its own (`monitor`'s settings; `found`, if
    /// given, is a connection to the chosen host to start with). Needs a Tokio runtime.
    pub(crate) fn watch(
        &mut self,
        set: Arc<HostSet>,
        pools: Vec<(PgPool, PgConnectOptions)>,
        monitor: PgConnectOptions,
        found: Option<PgConnection>,
        interval: Duration,
    ) {
        let chosen = set.chosen();
        let task = tokio::spawn(watch_loop(
            set,
            pools,
            monitor,
            found.map(|conn| (conn, chosen)),
            interval,
        ));
        self.0.push(task.abort_handle());
    }
}

async fn watch_loop(
    set: Arc<HostSet>,
    pools: Vec<(PgPool, PgConnectOptions)>,
    monitor_options: PgConnectOptions,
    mut monitor: Option<(PgConnection, usize)>,
    interval: Duration,
) {
    let mut applied = None;
    loop {
        let chosen = set.chosen();
        if applied != Some(chosen) {
            for (pool, base) in &pools {
                pool.set_connect_options(set.list.options_for(base, chosen));
            }
            applied = Some(chosen);
        }
        let mut unfit = false;
        // Whether the chosen host may be tried first by the search: not when it did not
        // answer in time (a hung host would cost the search its whole timeout) or did not fit.
        let mut retry_chosen = true;
        let healthy = match monitor.as_mut() {
            Some((conn, index)) if *index == chosen => {
                match within(set.check_timeout(), server_state(conn)).await {
                    Some(Ok(state)) if set.list.target.accepts(state) => true,
                    Some(Ok(_)) => {
                        unfit = true;
                        retry_chosen = false;
                        false
                    }
                    Some(Err(_)) => false,
                    None => {
                        retry_chosen = false;
                        false
                    }
                }
            }
            _ => false,
        };
        if !healthy {
            if let Some((conn, _)) = monitor.take() {
                // Closing politely could hang on a host that stopped answering.
                drop(conn);
            }
            let first = retry_chosen.then_some(chosen);
            match connect_fitting_from(&set.list, &monitor_options, first).await {
                Ok((conn, index)) => {
                    monitor = Some((conn, index));
                    if index != set.chosen() {
                        set.move_to(index, "the host in use stopped answering or fitting");
                        continue;
                    }
                    if unfit {
                        // Found it fitting again (e.g. `transaction_read_only` flipped
                        // back), but connections opened meanwhile may not be.
                        set.retire_all();
                    }
                }
                Err(error) => {
                    metrics::counter!(m::HOST_SEARCH_FAILURES_TOTAL, "url" => set.label.clone())
                        .increment(1);
                    tracing::warn!(url = %set.label, %error, "no host fits");
                    if unfit {
                        set.retire_all();
                    }
                }
            }
        }
        tokio::select! {
            _ = set.wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
