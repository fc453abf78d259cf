//! The listener: the listening connection (reconnected with backoff when lost), the
//! delivery of ephemeral messages, and the task that sends this process's coalesced
//! wake-ups to other processes. See the [module docs](super) for what wake-ups promise.

use super::backoff::Backoff;
use super::event::{EphemeralEnvelope, Event, EPHEMERAL_CHANNEL, EVENTS_CHANNEL};
use super::registry::Shared;
use crate::error::Result;
use crate::metrics as m;
use chrono::Utc;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Opens the listening connection from its own pool (the bus's `listener`).
pub(super) async fn connect_listener(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // `listen_loop` replaces a listener whose connection was lost: it must give its
    // connection back rather than open another one from the small pool by itself.
    listener.eager_reconnect(false);
    listener
        .listen_all([EVENTS_CHANNEL, EPHEMERAL_CHANNEL])
        .await?;
    Ok(listener)
}

/// Owns the listening connection. Wakes the reader on `plane_events`, delivers ephemeral
/// messages directly (ignoring the wake-ups this bus sent itself, whose payload is its own
/// wake id), and on a lost connection reconnects with backoff. After every
/// (re)connection it wakes the reader once more, because notifications sent while the
/// connection was down are gone; the reader's cursor recovers the events themselves.
pub(super) async fn listen_loop(
    shared: Arc<Shared>,
    pool: PgPool,
    mut listener: PgListener,
    max_backoff: Duration,
    mut moves: Option<watch::Receiver<u64>>,
) {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                _ = shared.closed() => return,
                _ = moved(&mut moves) => {
                    // The old host may still answer (a demoted primary, as a standby) but
                    // no longer sees the commits: listen on the new one.
                    tracing::info!(
                        "event bus: the listener's pool moved to another host; reconnecting"
                    );
                    break;
                }
            };
            match received {
                Ok(Some(notification)) => {
                    backoff.reset();
                    if notification.channel() == EPHEMERAL_CHANNEL {
                        deliver_ephemeral(&shared, notification.payload());
                    } else if notification.payload() != shared.wake_id {
                        shared.wake.notify_one();
                    }
                }
                Ok(None) => {
                    tracing::info!("event bus: listening connection lost; reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "event bus: listening connection failed; reconnecting");
                    break;
                }
            }
        }
        metrics::counter!(m::BUS_LISTENER_DISCONNECTS_TOTAL).increment(1);
        if shared.is_closed() {
            return;
        }
        listener = loop {
            backoff.wait(&shared).await;
            if shared.is_closed() {
                return;
            }
            match connect_listener(&pool).await {
                Ok(l) => break l,
                Err(error) => {
                    tracing::warn!(%error, "event bus: could not reconnect the listener");
                }
            }
        };
        tracing::info!("event bus: listening again");
        metrics::counter!(m::BUS_LISTENER_RECONNECTS_TOTAL).increment(1);
        shared.wake.notify_one();
    }
}

/// Returns when `moves` changes; never without one (or once its sender is gone).
async fn moved(moves: &mut Option<watch::Receiver<u64>>) {
    if let Some(receiver) = moves {
        if receiver.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// A random identifier for this bus's own wake-ups (not a secret; it only lets the bus
/// recognise its own NOTIFYs). Never empty, so it never matches the trigger's empty payload.
pub(super) fn new_wake_id() -> String {
    let random = getrandom::u64().unwrap_or_else(|_| {
        // Without OS randomness, the process id and the clock are unique enough here: a
        // collision would only make two processes ignore each other's wake-ups and poll.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        u64::from(std::process::id()) ^ nanos
    });
    format!("w{random:016x}")
}

/// Sends one `NOTIFY plane_events` per batch of this process's commits, so
/// that event buses in other processes wake up. Its payload is only this bus's
/// [`new_wake_id`], which other buses treat like any wake-up. At most one NOTIFY is in
/// flight, and consecutive ones are at least `interval` apart; the commits that finish
/// meanwhile are covered by the next one (`Notify` keeps one permit).
/// The NOTIFY runs in its own transaction, after the commits it reports, so a process woken
/// by it reads them. If sending fails, other processes find the events at their next poll.
pub(super) async fn wake_others_loop(shared: Arc<Shared>, pool: PgPool, interval: Duration) {
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shared.wake_others.notified() => {}
            _ = shared.closed() => return,
        }
        if let Some(last) = last_sent {
            // Commits that finish meanwhile leave a permit that this NOTIFY covers.
            tokio::select! {
                // `sleep` rather than `sleep_until(last + interval)`: an interval too long to add
                // to an instant waits as long as it can instead of panicking.
                _ = tokio::time::sleep(interval.saturating_sub(last.elapsed())) => {}
                _ = shared.closed() => return,
            }
        }
        // Consume a permit stored during the wait: the NOTIFY below covers those commits.
        let _ = futures_util::FutureExt::now_or_never(shared.wake_others.notified());
        last_sent = Some(tokio::time::Instant::now());
        // The same statement as ephemeral messages (one prepared statement, one `.sqlx` entry).
        let sent = sqlx::query!("select pg_notify($1, $2)", EVENTS_CHANNEL, &shared.wake_id)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, "event bus: could not send a wake-up; other processes will poll");
            tokio::select! {
                _ = tokio::time::sleep(Backoff::START) => {}
                _ = shared.closed() => return,
            }
        }
    }
}

fn deliver_ephemeral(shared: &Shared, payload: &str) {
    match serde_json::from_str::<EphemeralEnvelope>(payload) {
        Ok(envelope) => shared.dispatch(
            Arc::new(Event {
                id: None,
                kind: envelope.kind,
                key: envelope.key,
                created_at: Utc::now(),
                data: envelope.data,
            }),
            None,
        ),
        Err(error) => tracing::warn!(%error, "event bus: ignoring malformed ephemeral message"),
    }
}
