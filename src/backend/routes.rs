//! What a proxy learns from a bearer token: the route to a backend, or why there is none.

use super::{BackendDatabase, BackendIdentity};
use crate::error::{Error, Result};
use crate::metrics::{self, Operation};
use crate::replicas::{Fallback, ReadKind};
use crate::types::{
    BackendAddr, BackendStatus, BearerToken, PartialRouteInfo, RouteInfo, SecretToken,
};
use sqlx::PgPool;

/// What a proxy learns from a bearer token.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteInfoResult {
    /// Unknown or expired token, or a backend that is terminating or terminated.
    NotFound,
    /// The backend exists but is not ready yet: wait for it (e.g. on its status stream).
    Pending(PartialRouteInfo),
    /// The backend is ready at this address.
    Available(RouteInfo),
}

impl BackendDatabase<'_> {
    /// The route for a static token (`s.…`), which is stored on the backend row. Served by
    /// a streaming replica when one is usable, as [`route_info_for_token`](Self::route_info_for_token).
    #[tracing::instrument(skip_all, fields(backend = tracing::field::Empty))]
    pub async fn route_info_for_static_token(
        &self,
        token: &BearerToken,
    ) -> Result<RouteInfoResult> {
        let lookup = self.route_info_for_static_token_inner(token);
        metrics::timed(Operation::RouteInfoForStaticToken, self.ctx.pool(), lookup).await
    }

    /// [`route_info_for_static_token`](Self::route_info_for_static_token), without its
    /// metrics: on a replica if one is usable, confirming `NotFound` and `Pending` on the
    /// primary (see [`replicas`](crate::replicas)).
    async fn route_info_for_static_token_inner(
        &self,
        token: &BearerToken,
    ) -> Result<RouteInfoResult> {
        // A token is client input. One with a NUL cannot be stored (Postgres text refuses
        // it), so it matches nothing; asking would make the server refuse the parameter and
        // turn an unknown token into a database error. One longer than any token issued
        // matches nothing either (see `limits::BEARER_TOKEN_BYTES`).
        if !token.is_static()
            || token.as_str().len() > crate::limits::BEARER_TOKEN_BYTES
            || token.as_str().contains('\0')
        {
            return Ok(RouteInfoResult::NotFound);
        }
        self.ctx
            .reads()
            .run(
                ReadKind::RouteInfoForStaticToken,
                confirm_route,
                |pool| async move { static_token_route(&pool, token).await },
            )
            .await
    }

    /// The route for a bearer token: `NotFound` for an unknown or expired token or a
    /// terminating/terminated backend, `Pending` before the backend is ready, `Available`
    /// once it is. Static tokens are looked up on the backend row.
    ///
    /// With streaming replicas ([`OpenOptions::replica_url`](crate::OpenOptions::replica_url)),
    /// a usable replica answers; its `NotFound` and `Pending` are asked again on the primary,
    /// so a token just issued by `connect` never reads as not found, and a backend the
    /// primary has ready never reads as pending. An `Available` answer may be as old as the
    /// replica's lag bound (see [`replicas`](crate::replicas)).
    #[tracing::instrument(skip_all, fields(backend = tracing::field::Empty))]
    pub async fn route_info_for_token(&self, token: &BearerToken) -> Result<RouteInfoResult> {
        let lookup = self.route_info_for_token_inner(token);
        metrics::timed(Operation::RouteInfoForToken, self.ctx.pool(), lookup).await
    }

    /// [`route_info_for_token`](Self::route_info_for_token), without its metrics: on a
    /// replica if one is usable, confirming `NotFound` and `Pending` on the primary (see
    /// [`replicas`](crate::replicas)).
    async fn route_info_for_token_inner(&self, token: &BearerToken) -> Result<RouteInfoResult> {
        // Longer than any token issued: unknown, without a round trip (client input; see
        // `limits::BEARER_TOKEN_BYTES`).
        if token.as_str().len() > crate::limits::BEARER_TOKEN_BYTES {
            return Ok(RouteInfoResult::NotFound);
        }
        if token.is_static() {
            return self.route_info_for_static_token(token).await;
        }
        self.ctx
            .reads()
            .run(
                ReadKind::RouteInfoForToken,
                confirm_route,
                |pool| async move { token_route(&pool, token).await },
            )
            .await
    }
}

/// Which answers of a replica are asked again on the primary: those the replica's lag could
/// explain (a token issued, or a backend made ready, after the replica's position).
fn confirm_route(result: &RouteInfoResult) -> Option<Fallback> {
    match result {
        RouteInfoResult::NotFound => Some(Fallback::NotFound),
        RouteInfoResult::Pending(_) => Some(Fallback::Pending),
        RouteInfoResult::Available(_) => None,
    }
}

/// The route for a static token, read on `pool` (a stored token, without a NUL).
async fn static_token_route(pool: &PgPool, token: &BearerToken) -> Result<RouteInfoResult> {
    let row = sqlx::query!(
        r#"
        select id, cluster, last_status_number, cluster_address, subdomain
        from backend
        where static_token = $1
        "#,
        token.as_str(),
    )
    .fetch_optional(&mut *metrics::acquire(Operation::RouteInfoForStaticToken, pool).await?)
    .await?;
    let Some(row) = row else {
        return Ok(RouteInfoResult::NotFound);
    };
    tracing::Span::current().record("backend", row.id.as_str());
    route_result(RouteParts {
        backend_id: row.id,
        cluster: row.cluster,
        status_number: row.last_status_number,
        address: row.cluster_address,
        subdomain: row.subdomain,
        secret_token: String::new(),
        user: None,
        user_data: None,
    })
}

/// The route for a (non-static) bearer token, read on `pool`.
async fn token_route(pool: &PgPool, token: &BearerToken) -> Result<RouteInfoResult> {
    let digest = token.digest();
    let row = sqlx::query!(
        r#"
        select t.backend_id, t.username, t.auth, t.secret_token,
               b.cluster, b.last_status_number, b.cluster_address, b.subdomain
        from token t
        join backend b on b.id = t.backend_id
        where t.token_digest = $1 and t.expiration_time > now()
        "#,
        digest.as_slice(),
    )
    .fetch_optional(&mut *metrics::acquire(Operation::RouteInfoForToken, pool).await?)
    .await?;
    let Some(row) = row else {
        return Ok(RouteInfoResult::NotFound);
    };
    tracing::Span::current().record("backend", row.backend_id.as_str());
    route_result(RouteParts {
        backend_id: row.backend_id,
        cluster: row.cluster,
        status_number: row.last_status_number,
        address: row.cluster_address,
        subdomain: row.subdomain,
        secret_token: row.secret_token,
        user: row.username,
        user_data: Some(row.auth),
    })
}

/// The columns a route lookup reads, before decoding.
struct RouteParts {
    backend_id: String,
    cluster: String,
    status_number: i32,
    address: Option<String>,
    subdomain: Option<String>,
    secret_token: String,
    user: Option<String>,
    user_data: Option<serde_json::Value>,
}

fn route_result(parts: RouteParts) -> Result<RouteInfoResult> {
    let BackendIdentity {
        id: backend_id,
        status,
        cluster,
        subdomain,
    } = BackendIdentity::decode(
        parts.backend_id,
        parts.status_number,
        parts.cluster,
        parts.subdomain,
    )?;
    if status >= BackendStatus::Terminating {
        return Ok(RouteInfoResult::NotFound);
    }
    let id = backend_id.to_string();
    let route = PartialRouteInfo {
        backend_id,
        secret_token: SecretToken::from(parts.secret_token),
        cluster,
        user: parts.user,
        user_data: parts.user_data,
        subdomain,
    };
    if status < BackendStatus::Ready {
        return Ok(RouteInfoResult::Pending(route));
    }
    let Some(address) = parts.address else {
        return Err(Error::decode(
            "backend",
            "cluster_address",
            &id,
            "backend is ready but has no address",
        ));
    };
    let address = address
        .parse()
        .map(BackendAddr)
        .map_err(|e| Error::decode("backend", "cluster_address", &id, e))?;
    Ok(RouteInfoResult::Available(route.with_address(address)))
}

impl metrics::HasOutcome for Result<RouteInfoResult> {
    fn outcome(&self, _: Operation) -> metrics::Outcome {
        match self {
            Ok(RouteInfoResult::NotFound) => metrics::Outcome::NotFound,
            Ok(_) => metrics::Outcome::Accepted,
            Err(error) => metrics::error_outcome(error),
        }
    }
}
