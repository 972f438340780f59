//! Bearer-token authentication of the gRPC API: a tower layer in front of
//! every service, so no call can reach a handler unchecked.
//!
//! What a call needs follows from its path: `sluice.v1.Admin` needs an
//! `admin` token, everything else a `read` or `admin` one, except the health
//! and reflection services, which stay open so load balancers and
//! `grpcurl`-style tools work without a token (they reveal no data).
//! A missing, unknown, expired or revoked token is `UNAUTHENTICATED`; a
//! read token on Admin is `PERMISSION_DENIED`.
//!
//! Tokens are checked against the database, and the answer is cached for
//! [`CACHE_TTL`], so a revocation reaches a running server within that time
//! and a busy client costs one lookup per TTL, not one per call.

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sluice_ingest::tokens::{self, Scope};
use sqlx::PgPool;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Status;
use tracing::{error, warn};

/// How long a token's verdict is reused before the database is asked again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached verdicts at most; past it the cache starts afresh, so a flood of
/// made-up tokens cannot grow it without bound.
const CACHE_MAX: usize = 10_000;

/// What a call's path requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Required {
    Nothing,
    Read,
    Admin,
}

fn required(path: &str) -> Required {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        Required::Nothing
    } else if path.starts_with("/sluice.v1.Admin/") {
        Required::Admin
    } else {
        // Telemetry, and anything unknown: fail closed.
        Required::Read
    }
}

#[derive(Debug, Clone)]
enum Verdict {
    Allowed {
        name: Arc<str>,
        scope: Scope,
        expires_at: Option<DateTime<Utc>>,
    },
    Refused(&'static str),
}

struct Cached {
    at: Instant,
    verdict: Verdict,
}

pub struct Authenticator {
    pool: PgPool,
    /// `--allow-anonymous`: every call is let through (development only).
    anonymous: bool,
    cache: DashMap<[u8; 32], Cached>,
}

impl Authenticator {
    pub fn new(pool: PgPool, anonymous: bool) -> Self {
        Self {
            pool,
            anonymous,
            cache: DashMap::new(),
        }
    }

    /// Whether a call to `path` with these headers may go on.
    pub async fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let need = required(path);
        if need == Required::Nothing || self.anonymous {
            return Ok(());
        }
        let token = bearer(headers).inspect_err(|_| refused("missing"))?;
        match self.verdict(&tokens::digest(token)).await? {
            Verdict::Refused(why) => {
                refused(why);
                Err(Status::unauthenticated(why))
            }
            Verdict::Allowed { expires_at, .. } if expires_at.is_some_and(|t| t <= Utc::now()) => {
                refused("expired");
                Err(Status::unauthenticated("the API token has expired"))
            }
            Verdict::Allowed { name, scope, .. } => {
                if need == Required::Admin && scope != Scope::Admin {
                    refused("scope");
                    return Err(Status::permission_denied(format!(
                        "API token {name:?} has scope {}; {path} needs an admin token",
                        scope.as_str()
                    )));
                }
                Ok(())
            }
        }
    }

    async fn verdict(&self, digest: &[u8; 32]) -> Result<Verdict, Status> {
        if let Some(c) = self.cache.get(digest)
            && c.at.elapsed() < CACHE_TTL
        {
            return Ok(c.verdict.clone());
        }
        let found = tokens::find(&self.pool, digest).await.map_err(|e| {
            error!(error = %e, "cannot look up an API token");
            Status::unavailable("cannot check the API token now: the database did not answer")
        })?;
        let now = Utc::now();
        let verdict = match found {
            None => Verdict::Refused("unknown API token"),
            Some(t) => match t.refusal(now) {
                Some(why) => Verdict::Refused(why),
                None => {
                    // Once per cache refresh, off the call's path.
                    let (pool, digest) = (self.pool.clone(), *digest);
                    tokio::spawn(async move {
                        if let Err(e) = tokens::touch(&pool, &digest).await {
                            warn!(error = %e, "cannot record an API token's last use");
                        }
                    });
                    Verdict::Allowed {
                        name: t.name.into(),
                        scope: t.scope,
                        expires_at: t.expires_at,
                    }
                }
            },
        };
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(
            *digest,
            Cached {
                at: Instant::now(),
                verdict: verdict.clone(),
            },
        );
        Ok(verdict)
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("sluice_api_auth_refused_total", "reason" => reason).increment(1);
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let missing = || {
        Status::unauthenticated(
            "missing API token: send the metadata `authorization: Bearer <token>` \
             (create one with `sluice tokens create NAME --scope read`)",
        )
    };
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}

/// The tower layer that puts an [`Authenticator`] in front of a service.
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Authenticator>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Call the instance that was polled ready; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = Arc::clone(&self.auth);
        Box::pin(async move {
            match auth.check(request.uri().path(), request.headers()).await {
                Ok(()) => inner.call(request).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_what_they_require() {
        assert_eq!(required("/grpc.health.v1.Health/Check"), Required::Nothing);
        assert_eq!(
            required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Required::Nothing
        );
        assert_eq!(required("/sluice.v1.Admin/ListDevices"), Required::Admin);
        assert_eq!(required("/sluice.v1.Telemetry/QueryPoints"), Required::Read);
        assert_eq!(required("/something.Else/Call"), Required::Read);
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let with = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer(&with("Bearer slc_abc")).unwrap(), "slc_abc");
        assert_eq!(bearer(&with("bearer slc_abc")).unwrap(), "slc_abc");
        assert!(bearer(&with("Basic dXNlcg==")).is_err());
        assert!(bearer(&with("Bearer ")).is_err());
        assert_eq!(
            bearer(&http::HeaderMap::new()).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
