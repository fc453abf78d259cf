//! Leader leases: one controller of the fleet runs the periodic work (cleanup, and any other
//! sweep an application runs through a [`LeaderElection`]), the others wait.
//!
//! A lease is one row of the `leader_lease` table, by name (the cleanup loop's is
//! [`CLEANUP_LEASE`]). Whoever takes it gets a **term**, a number larger than every earlier
//! term of that lease, which identifies its holder and its start. Each statement is one
//! round trip and uses the database server's clock only:
//!
//! - **acquire** takes the row if it is free or expired (or already this holder's), with a
//!   new term ([`LeaseDatabase::acquire`]);
//! - **renew** extends it only while the row still carries the caller's term and holder
//!   ([`LeaseDatabase::renew`]);
//! - **resign** expires it only under the caller's term and sends a notification on the
//!   channel [`LEASE_CHANNEL`], so that waiting followers try at once rather than at their
//!   next poll ([`LeaseDatabase::resign`]).
//!
//! A leader treats itself as leader only until the lease duration less
//! [`LeaderConfig::safety_margin`] after it *sent* its last successful acquire or renewal,
//! by its own monotonic clock: the database's `expires_at` is at least the lease duration
//! after the server ran the statement, which is after it was sent. A renewal that fails or
//! comes late ends its leadership at that instant.
//!
//! Work done under the lease can be **fenced**: the statement (or transaction) locks the
//! lease row `FOR SHARE` only if it still carries the term and has not expired
//! ([`fence`]). A takeover updates that row, so it waits for the fenced work to commit, and
//! fenced work that finds another term does nothing ([`Error::NotLeader`]). Every cleanup
//! batch of the cleanup loop is fenced so, in one statement with its delete. RELIABILITY.md
//! ("One cleaner for the fleet") states what this guarantees and what it does not.
//!
//! ```no_run
//! # async fn example(db: plane_db::PlaneDatabase) -> plane_db::Result<()> {
//! let election = db.spawn_leader_election("nightly-report")?;
//! loop {
//!     let term = election.leading().await;
//!     // Check again right before each piece of work: leadership may end at any time.
//!     if election.term() == Some(term) {
//!         // ... the work, ideally in transactions that call plane_db::leader::fence first
//!     }
//!     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
//! }
//! # }
//! ```

use crate::config::LeaderConfig;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::metrics;
use crate::validate::{check_text, interval_secs};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::PgConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// The lease of the cleanup loop ([`PlaneDatabase::spawn_cleanup_loop`](crate::PlaneDatabase::spawn_cleanup_loop)).
pub const CLEANUP_LEASE: &str = "maintenance";

/// The notification channel of resignations; the payload is the lease's name.
pub const LEASE_CHANNEL: &str = "plane_leader_lease";

/// The longest lease name and holder accepted, in bytes.
pub const LEASE_TEXT_BYTES: usize = 256;

/// A lease as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaderInfo {
    /// The lease's name.
    pub lease: String,
    /// Who holds (or last held) it: its [`LeaderElection::holder`].
    pub holder: String,
    /// Its term: larger for every new leader of this lease.
    pub term: i64,
    /// When this term began (database clock).
    pub elected_at: DateTime<Utc>,
    /// When it was last renewed (database clock).
    pub renewed_at: DateTime<Utc>,
    /// When it expires, or expired (database clock); a resignation sets it to the moment
    /// of resigning.
    pub expires_at: DateTime<Utc>,
    /// Whether it had not expired when it was read: the holder leads.
    pub active: bool,
}

/// What [`LeaseDatabase::acquire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The caller holds the lease under this new term.
    Elected {
        /// The caller's term.
        term: i64,
    },
    /// Someone holds it (maybe the caller, under a term it lost track of: see
    /// [`LeaseDatabase::acquire`]).
    Held {
        /// The current holder, if the row was visible to the statement (a lease created by a
        /// concurrent first acquire is not).
        leader: Option<LeaderInfo>,
        /// How long until it expires, by the database clock (zero if unknown).
        expires_in: Duration,
    },
}

/// The lease statements; reached through
/// [`PlaneDatabase::leader_lease`](crate::PlaneDatabase::leader_lease).
pub struct LeaseDatabase<'a> {
    pool: &'a PgPool,
}

impl<'a> LeaseDatabase<'a> {
    pub(crate) fn new(ctx: &'a Context) -> Self {
        Self { pool: ctx.pool() }
    }

    /// Takes lease `lease` for `holder` for `duration` if it is free, expired, or held by
    /// `holder` itself (a holder that lost track of its term, e.g. after a renewal whose
    /// answer it never got, is re-elected with a new term at once). One statement:
    /// `insert … on conflict do update … where expired`. Every election increases the term.
    pub async fn acquire(&self, lease: &str, holder: &str, duration: Duration) -> Result<Acquired> {
        check_lease_text("lease", lease)?;
        check_lease_text("holder", holder)?;
        let row = sqlx::query!(
            r#"
            with taken as (
                insert into leader_lease as l
                    (name, holder, term, elected_at, renewed_at, expires_at)
                values ($1, $2, 1, now(), now(), now() + make_interval(secs => $3))
                on conflict (name) do update
                    set holder = excluded.holder, term = l.term + 1, elected_at = now(),
                        renewed_at = now(), expires_at = excluded.expires_at
                    where l.expires_at <= now() or l.holder = excluded.holder
                returning term
            )
            select t.term as "taken?", l.holder as "holder?", l.term as "term?",
                   l.elected_at as "elected_at?", l.renewed_at as "renewed_at?",
                   l.expires_at as "expires_at?",
                   extract(epoch from greatest(l.expires_at - now(), interval '0'))::float8
                       as "expires_in?"
            from (select 1) one
            left join taken t on true
            left join leader_lease l on t.term is null and l.name = $1
            "#,
            lease,
            holder,
            interval_secs(duration),
        )
        .fetch_one(self.pool)
        .await?;
        if let Some(term) = row.taken {
            return Ok(Acquired::Elected { term });
        }
        let leader = match (
            row.holder,
            row.term,
            row.elected_at,
            row.renewed_at,
            row.expires_at,
        ) {
            (Some(holder), Some(term), Some(elected_at), Some(renewed_at), Some(expires_at)) => {
                Some(LeaderInfo {
                    lease: lease.to_string(),
                    holder,
                    term,
                    elected_at,
                    renewed_at,
                    expires_at,
                    active: row.expires_in.is_some_and(|s| s > 0.0),
                })
            }
            _ => None,
        };
        let expires_in = row
            .expires_in
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::ZERO, |s| {
                Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
            });
        Ok(Acquired::Held { leader, expires_in })
    }

    /// Extends lease `lease` to `duration` from now, only if it still carries `term` and
    /// `holder` and has not expired. Returns whether it did: `false` means the term is over
    /// (taken over, resigned, or expired), and the caller must stop leading.
    pub async fn renew(
        &self,
        lease: &str,
        term: i64,
        holder: &str,
        duration: Duration,
    ) -> Result<bool> {
        check_lease_text("lease", lease)?;
        check_lease_text("holder", holder)?;
        let renewed = sqlx::query!(
            r#"
            update leader_lease
            set renewed_at = now(), expires_at = now() + make_interval(secs => $4)
            where name = $1 and term = $2 and holder = $3 and expires_at > now()
            "#,
            lease,
            term,
            holder,
            interval_secs(duration),
        )
        .execute(self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Gives lease `lease` up, only under `term` and `holder`: it expires now, and a
    /// notification on [`LEASE_CHANNEL`] (payload: the lease's name) wakes the followers,
    /// which take it over at once. Returns whether this term held it. Fenced work of `term`
    /// that is still running finishes first (the update waits for its lock).
    pub async fn resign(&self, lease: &str, term: i64, holder: &str) -> Result<bool> {
        check_lease_text("lease", lease)?;
        check_lease_text("holder", holder)?;
        let resigned = sqlx::query!(
            r#"
            with resigned as (
                update leader_lease set expires_at = now()
                where name = $1 and term = $2 and holder = $3 and expires_at > now()
                returning name
            )
            select pg_notify($4, name) as "notified" from resigned
            "#,
            lease,
            term,
            holder,
            LEASE_CHANNEL,
        )
        .fetch_optional(self.pool)
        .await?;
        Ok(resigned.is_some())
    }

    /// Lease `lease` as the database holds it (expired or not), `None` if it was never taken.
    pub async fn leader(&self, lease: &str) -> Result<Option<LeaderInfo>> {
        Ok(self
            .leaders()
            .await?
            .into_iter()
            .find(|info| info.lease == lease))
    }

    /// Every lease, by name (expired ones too: [`LeaderInfo::active`] says which lead).
    pub async fn leaders(&self) -> Result<Vec<LeaderInfo>> {
        leaders(self.pool).await
    }
}

/// Every lease, by name (also read by `status`).
pub(crate) async fn leaders(pool: &PgPool) -> Result<Vec<LeaderInfo>> {
    Ok(sqlx::query_as!(
        LeaderInfo,
        r#"
        select name as lease, holder, term, elected_at, renewed_at, expires_at,
               expires_at > now() as "active!"
        from leader_lease
        order by name
        "#
    )
    .fetch_all(pool)
    .await?)
}

/// Fences the caller's transaction with lease `lease`'s term `term`: locks the lease row
/// `FOR SHARE` if it still carries `term` and has not expired, so that no takeover commits
/// before this transaction ends; otherwise [`Error::NotLeader`] (roll back: nothing of the
/// transaction should commit). Call it first in every transaction of leader work.
///
/// The lock lasts as long as the transaction: a leader paused (or cut off) with the
/// transaction open holds back the next leader until the server ends the transaction
/// (`idle_in_transaction_session_timeout`, which [`OpenOptions`](crate::OpenOptions) sets,
/// or a dead connection). Single statements that fence themselves, as cleanup's, do not
/// have that limit.
pub async fn fence(conn: &mut PgConnection, lease: &str, term: i64) -> Result<()> {
    let held = sqlx::query!(
        r#"
        select term from leader_lease
        where name = $1 and term = $2 and expires_at > clock_timestamp()
        for share
        "#,
        lease,
        term,
    )
    .fetch_optional(conn)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(Error::NotLeader {
            lease: lease.to_string(),
            term,
        }),
    }
}

fn check_lease_text(argument: &'static str, value: &str) -> Result<()> {
    check_text(argument, value)?;
    if value.is_empty() || value.len() > LEASE_TEXT_BYTES {
        return Err(Error::InvalidArgument {
            argument,
            reason: format!("must be 1 to {LEASE_TEXT_BYTES} bytes, got {}", value.len()),
        });
    }
    Ok(())
}

/// A holder name for this process: `host:pid:random` (the host from `HOSTNAME` or
/// `/etc/hostname`), unique per call and readable in `plane-db status`.
pub fn holder_for_this_process() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    // Only the host's first 200 bytes, so that the whole fits LEASE_TEXT_BYTES.
    let mut end = host.len().min(200);
    while !host.is_char_boundary(end) {
        end -= 1;
    }
    // Uniqueness matters (two elections of one process must not share a term), secrecy not:
    // without OS randomness, the clock is unique enough.
    let random = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    format!("{}:{}:{random:016x}", &host[..end], std::process::id())
}

/// Where an election stands, as its task last knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Another holds the lease, or nobody can be reached.
    Follower,
    /// This election holds the lease under `term`, until `until` (this process's monotonic
    /// clock) unless a renewal moves it.
    Leader {
        /// The term.
        term: i64,
        /// The end of leadership unless renewed: the sending of the last successful acquire
        /// or renewal, plus the lease, less the safety margin.
        until: Instant,
    },
}

impl Leadership {
    /// The term, if it leads at this instant (a leader whose `until` has passed, e.g. a
    /// process resumed after a pause, does not).
    pub fn term_now(&self) -> Option<i64> {
        match *self {
            Leadership::Leader { term, until } if Instant::now() < until => Some(term),
            _ => None,
        }
    }
}

/// A running election for one lease, started by
/// [`PlaneDatabase::spawn_leader_election`](crate::PlaneDatabase::spawn_leader_election): a
/// task that takes the lease when it can, renews it while it holds it, and waits (for a
/// resignation notice, the current lease's expiry, or [`LeaderConfig::retry_interval`])
/// while another holds it.
///
/// [`resign`](Self::resign) hands the lease on at once; dropping the election stops the
/// task and resigns in the background if a Tokio runtime is still there (else the lease
/// simply expires).
#[derive(Debug)]
pub struct LeaderElection {
    lease: String,
    holder: String,
    state: watch::Receiver<Leadership>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    resign_on_drop: Option<(PgPool, Arc<std::sync::Mutex<Leadership>>)>,
}

impl LeaderElection {
    /// Starts the election's task (within a Tokio runtime). `listener_options`: where the
    /// connection that listens for resignations goes (the event bus's).
    pub(crate) fn spawn(
        pool: PgPool,
        listener: sqlx::postgres::PgConnectOptions,
        lease: &str,
        holder: String,
        config: LeaderConfig,
    ) -> Result<Self> {
        config.validate()?;
        check_lease_text("lease", lease)?;
        check_lease_text("holder", &holder)?;
        let (state_tx, state) = watch::channel(Leadership::Follower);
        let (stop, stop_rx) = watch::channel(false);
        let last = Arc::new(std::sync::Mutex::new(Leadership::Follower));
        let elector = Elector {
            pool: pool.clone(),
            lease: lease.to_string(),
            holder: holder.clone(),
            config,
            state: state_tx,
            last: last.clone(),
            wake: Arc::new(Notify::new()),
        };
        let task = tokio::spawn(elector.run(listener, stop_rx));
        Ok(Self {
            lease: lease.to_string(),
            holder,
            state,
            stop,
            task: Some(task),
            resign_on_drop: Some((pool, last)),
        })
    }

    /// The lease's name.
    pub fn lease(&self) -> &str {
        &self.lease
    }

    /// This election's holder name, as the `leader_lease` table and `plane-db status` show it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The term, if this election leads at this instant. Ask right before each piece of
    /// leader work; fence the work itself with the term ([`fence`]) where it matters.
    pub fn term(&self) -> Option<i64> {
        self.state.borrow().term_now()
    }

    /// The latest [`Leadership`] (check [`Leadership::term_now`], not just the variant).
    pub fn leadership(&self) -> Leadership {
        *self.state.borrow()
    }

    /// A receiver that sees every change of [`Leadership`].
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// Waits until this election leads, and returns its term.
    pub async fn leading(&self) -> i64 {
        wait_leading(&mut self.state.clone()).await
    }

    /// Stops the election; if it leads, resigns (the lease expires now and the followers
    /// are woken), after any fenced work of its term has committed.
    pub async fn resign(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // The task resigned: nothing left to do on drop.
        self.resign_on_drop = None;
    }
}

/// Waits until `state` leads at this instant; returns the term.
pub(crate) async fn wait_leading(state: &mut watch::Receiver<Leadership>) -> i64 {
    loop {
        let current = *state.borrow_and_update();
        if let Some(term) = current.term_now() {
            return term;
        }
        if state.changed().await.is_err() {
            // The task ended (stopped): wait for ever, as a follower would.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for LeaderElection {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        task.abort();
        let Some((pool, last)) = self.resign_on_drop.take() else {
            return;
        };
        let term = match *last.lock().unwrap_or_else(|p| p.into_inner()) {
            Leadership::Leader { term, .. } => term,
            Leadership::Follower => return,
        };
        metrics::set_leader(&self.lease, None);
        metrics::leader_changed(&self.lease, "resigned");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (lease, holder) = (self.lease.clone(), self.holder.clone());
            runtime.spawn(async move {
                if let Err(error) = resign(&pool, &lease, term, &holder).await {
                    tracing::warn!(%error, lease, term, "could not resign; the lease will expire");
                }
            });
        }
    }
}

async fn resign(pool: &PgPool, lease: &str, term: i64, holder: &str) -> Result<bool> {
    LeaseDatabase { pool }.resign(lease, term, holder).await
}

/// The election's task.
struct Elector {
    pool: PgPool,
    lease: String,
    holder: String,
    config: LeaderConfig,
    state: watch::Sender<Leadership>,
    /// The same, for the election's `Drop` (which cannot await the channel's receivers).
    last: Arc<std::sync::Mutex<Leadership>>,
    /// Woken by resignation notices.
    wake: Arc<Notify>,
}

impl Elector {
    fn lease_db(&self) -> LeaseDatabase<'_> {
        LeaseDatabase { pool: &self.pool }
    }

    fn publish(&self, leadership: Leadership) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = leadership;
        self.state.send_replace(leadership);
    }

    /// The end of leadership for a statement sent at `sent`.
    fn until(&self, sent: Instant) -> Instant {
        sent + (self.config.lease_duration - self.config.safety_margin)
    }

    async fn run(
        self,
        listener: sqlx::postgres::PgConnectOptions,
        mut stop: watch::Receiver<bool>,
    ) {
        let listening = tokio::spawn(listen_for_resignations(
            listener,
            self.lease.clone(),
            self.wake.clone(),
            self.config.retry_interval,
        ));
        // Aborts the listener however this task ends (stopped, or aborted by the drop).
        let _listening = AbortOnDrop(listening);
        metrics::set_leader(&self.lease, None);
        loop {
            let (term, until) = match self.follow(&mut stop).await {
                Some(elected) => elected,
                None => return,
            };
            if !self.lead(term, until, &mut stop).await {
                return;
            }
        }
    }

    /// Tries to take the lease until it does (returns its term and `until`), or until
    /// stopped (`None`).
    async fn follow(&self, stop: &mut watch::Receiver<bool>) -> Option<(i64, Instant)> {
        loop {
            if *stop.borrow() {
                return None;
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout(
                self.config.lease_duration - self.config.safety_margin,
                self.lease_db()
                    .acquire(&self.lease, &self.holder, self.config.lease_duration),
            )
            .await;
            let wait = match attempt {
                Ok(Ok(Acquired::Elected { term })) => {
                    let until = self.until(sent);
                    if Instant::now() < until {
                        self.publish(Leadership::Leader { term, until });
                        metrics::leader_changed(&self.lease, "elected");
                        metrics::set_leader(&self.lease, Some(Utc::now()));
                        tracing::info!(
                            lease = self.lease,
                            term,
                            holder = self.holder,
                            "elected leader"
                        );
                        return Some((term, until));
                    }
                    // The answer came too late to lead on; the next attempt re-elects this
                    // holder with a new term.
                    Duration::ZERO
                }
                // Try again just after the lease expires (the database's clock says when),
                // or at the retry interval, whichever is sooner.
                Ok(Ok(Acquired::Held { expires_in, .. })) => {
                    (expires_in + Duration::from_millis(5)).min(self.config.retry_interval)
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, lease = self.lease, "could not try to take the lease");
                    self.config.retry_interval
                }
                Err(_) => self.config.retry_interval,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return None,
            }
        }
    }

    /// Renews the lease while it can; returns `false` once stopped (after resigning), `true`
    /// when leadership was lost.
    async fn lead(&self, term: i64, mut until: Instant, stop: &mut watch::Receiver<bool>) -> bool {
        let mut next = Instant::now() + self.config.renew_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.min(until)) => {}
                _ = stop.changed() => {
                    self.publish(Leadership::Follower);
                    metrics::set_leader(&self.lease, None);
                    metrics::leader_changed(&self.lease, "resigned");
                    if let Err(error) = self.lease_db().resign(&self.lease, term, &self.holder).await {
                        tracing::warn!(%error, lease = self.lease, term, "could not resign; the lease will expire");
                    }
                    return false;
                }
            }
            let now = Instant::now();
            if now >= until {
                return self.lost(term, "the lease ran out before it was renewed");
            }
            let sent = now;
            let renewal = tokio::time::timeout(
                until - now,
                self.lease_db()
                    .renew(&self.lease, term, &self.holder, self.config.lease_duration),
            )
            .await;
            match renewal {
                Ok(Ok(true)) => {
                    until = self.until(sent);
                    if Instant::now() >= until {
                        return self.lost(term, "the renewal came back too late");
                    }
                    self.publish(Leadership::Leader { term, until });
                    next = sent + self.config.renew_interval;
                }
                Ok(Ok(false)) => return self.lost(term, "the term no longer holds the lease"),
                Ok(Err(error)) => {
                    tracing::warn!(%error, lease = self.lease, term, "could not renew the lease; retrying");
                    // Retry soon: the lease is still ours until `until`.
                    next = Instant::now() + self.config.renew_interval / 4;
                }
                Err(_) => return self.lost(term, "the renewal did not answer in time"),
            }
        }
    }

    fn lost(&self, term: i64, why: &str) -> bool {
        self.publish(Leadership::Follower);
        metrics::set_leader(&self.lease, None);
        metrics::leader_changed(&self.lease, "lost");
        tracing::warn!(
            lease = self.lease,
            term,
            holder = self.holder,
            "leadership lost: {why}"
        );
        true
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on [`LEASE_CHANNEL`] and wakes the election on a resignation of `lease`. When the
/// connection is lost it wakes it too (a notice may have been lost) and reconnects after
/// `retry`; polling covers the gap.
async fn listen_for_resignations(
    options: sqlx::postgres::PgConnectOptions,
    lease: String,
    wake: Arc<Notify>,
    retry: Duration,
) {
    let pool = crate::open::listener_pool(
        options,
        String::new(),
        retry.max(Duration::from_secs(1)),
        None,
    );
    loop {
        match listen(&pool).await {
            Ok(mut listener) => loop {
                match listener.try_recv().await {
                    Ok(Some(notice)) => {
                        if notice.payload() == lease {
                            wake.notify_one();
                        }
                    }
                    Ok(None) => wake.notify_one(),
                    Err(error) => {
                        tracing::debug!(%error, "leader lease: listening connection failed");
                        wake.notify_one();
                        break;
                    }
                }
            },
            Err(error) => {
                tracing::debug!(%error, "leader lease: cannot listen for resignations; polling");
            }
        }
        tokio::time::sleep(retry).await;
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(LEASE_CHANNEL).await?;
    Ok(listener)
}
