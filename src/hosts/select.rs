//! The search: trying a URL's hosts in turn for a connection that fits.

use super::{
    HostAttempt, HostList, HostRefusal, LoadBalanceHosts, NoSuitableHost, ServerState,
    TargetSessionAttrs,
};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use std::future::Future;
use std::time::Duration;

/// What the server of `conn` is, in one round trip.
pub(super) async fn server_state(conn: &mut PgConnection) -> sqlx::Result<ServerState> {
    let row = sqlx::query!(
        r#"select pg_catalog.pg_is_in_recovery() as "in_recovery!",
                  pg_catalog.current_setting('transaction_read_only') = 'on' as "read_only!""#
    )
    .fetch_one(conn)
    .await?;
    Ok(ServerState {
        in_recovery: row.in_recovery,
        read_only: row.read_only,
    })
}

/// `future`, bounded by `limit` when there is one.
pub(super) async fn within<T>(
    limit: Option<Duration>,
    future: impl Future<Output = T>,
) -> Option<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, future).await.ok(),
        None => Some(future.await),
    }
}

/// The order of one search: as listed, or shuffled with `load_balance_hosts=random`; host
/// `first`, if given, before the others.
fn order(list: &HostList, first: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..list.hosts.len()).collect();
    if list.load_balance == LoadBalanceHosts::Random {
        // Fisher-Yates; the order only spreads processes over hosts, so a failing random
        // source leaves it as listed.
        for i in (1..order.len()).rev() {
            let j = getrandom::u64().unwrap_or(0) as usize % (i + 1);
            order.swap(i, j);
        }
    }
    if let Some(first) = first.filter(|first| *first < order.len()) {
        order.retain(|index| *index != first);
        order.insert(0, first);
    }
    order
}

/// Tries the hosts of `list` (with `base`'s other settings) in turn and returns the first
/// connection that fits `list.target`, with its host's index. With `prefer-standby`, a first
/// pass looks for a standby; the first server that answered is kept for the second.
pub(crate) async fn connect_fitting(
    list: &HostList,
    base: &PgConnectOptions,
) -> Result<(PgConnection, usize), NoSuitableHost> {
    connect_fitting_from(list, base, None).await
}

/// [`connect_fitting`], trying host `first` (if given) before the others: a pool whose
/// monitoring connection was lost stays on its host if that still fits, rather than moving
/// to whichever fitting host is listed first.
pub(crate) async fn connect_fitting_from(
    list: &HostList,
    base: &PgConnectOptions,
    first: Option<usize>,
) -> Result<(PgConnection, usize), NoSuitableHost> {
    let wanted = match list.target {
        TargetSessionAttrs::PreferStandby => TargetSessionAttrs::Standby,
        target => target,
    };
    let mut attempts = Vec::new();
    let mut fallback: Option<(PgConnection, usize)> = None;
    for index in order(list, first) {
        let options = list.options_for(base, index);
        let host = list.describe(index);
        let attempt = within(list.connect_timeout, async {
            let mut conn = options.connect().await?;
            let state = match wanted {
                TargetSessionAttrs::Any => None,
                _ => Some(server_state(&mut conn).await?),
            };
            sqlx::Result::Ok((conn, state))
        })
        .await;
        let attempt: Option<sqlx::Result<_>> = attempt;
        let refusal = match attempt {
            None => HostRefusal::TimedOut(list.connect_timeout.unwrap_or_default()),
            Some(Err(error)) => HostRefusal::Failed(error.to_string()),
            Some(Ok((conn, state))) => match state {
                Some(state) if !wanted.accepts(state) => {
                    if list.target == TargetSessionAttrs::PreferStandby && fallback.is_none() {
                        fallback = Some((conn, index));
                    } else {
                        let _ = conn.close().await;
                    }
                    HostRefusal::Unfit(state)
                }
                _ => {
                    if let Some((other, _)) = fallback {
                        let _ = other.close().await;
                    }
                    return Ok((conn, index));
                }
            },
        };
        tracing::debug!(%host, ?refusal, "host not kept");
        attempts.push(HostAttempt { host, refusal });
    }
    if let Some(found) = fallback {
        return Ok(found);
    }
    Err(NoSuitableHost {
        target: list.target,
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::DEFAULT_CONNECT_TIMEOUT;

    fn list(n: usize, load_balance: LoadBalanceHosts) -> HostList {
        HostList {
            hosts: (0..n).map(|i| (Some(format!("h{i}")), None)).collect(),
            target: TargetSessionAttrs::ReadWrite,
            load_balance,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        }
    }

    #[test]
    fn searches_go_in_order_with_the_kept_host_first() {
        let hosts = list(4, LoadBalanceHosts::Disable);
        assert_eq!(order(&hosts, None), [0, 1, 2, 3]);
        assert_eq!(order(&hosts, Some(2)), [2, 0, 1, 3]);
        assert_eq!(
            order(&hosts, Some(9)),
            [0, 1, 2, 3],
            "an index out of range is ignored"
        );
        // Random: every host once, in orders that differ between searches.
        let hosts = list(6, LoadBalanceHosts::Random);
        let orders: std::collections::HashSet<Vec<usize>> =
            (0..50).map(|_| order(&hosts, None)).collect();
        assert!(orders.len() > 1, "50 searches in one order");
        for mut o in orders {
            o.sort();
            assert_eq!(o, [0, 1, 2, 3, 4, 5]);
        }
        assert_eq!(order(&hosts, Some(4))[0], 4);
    }
}
