//! Who is connecting: devices (registry in PostgreSQL), named applications
//! (configuration), or anonymous clients (development only).
//!
//! Password checks are Argon2id and cost tens of milliseconds of CPU each, so
//! a flood of bad logins must not starve good ones:
//! - a successful check is cached (keyed by the stored hash, so rotating or
//!   deleting a secret invalidates it), and a reconnecting device with a
//!   cached secret never waits for a hash slot;
//! - at most `auth_concurrency` checks run at once, at most `auth_queue`
//!   logins wait for one, and a login that finds the queue full or waits
//!   longer than `auth_timeout_ms` is told to come back later (CONNACK 3)
//!   instead of piling up.

use crate::config::{ApplicationConfig, BrokerConfig};
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use metrics::counter;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tracing::warn;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long a login or a presence update waits for the registry. A database
/// that is away makes its pool wait far longer than a client's CONNECT
/// patience; failing fast lets known devices in on their cached secret.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(2);

/// A device's stored credential.
#[derive(Debug, Clone)]
pub struct DeviceCredential {
    pub secret_hash: String,
    pub enabled: bool,
}

/// What the edge needs from the device registry (implemented over
/// PostgreSQL by the `sluice` binary).
pub trait DeviceRegistry: Send + Sync + 'static {
    fn credential<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceCredential>, String>>;
    /// The credentials of many devices at once (absent ids are missing
    /// from the answer): how the edge re-checks its open connections.
    fn credentials_of<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<HashMap<String, DeviceCredential>, String>>;
    /// Checks a secret against a stored hash. CPU-heavy: called on a
    /// blocking thread, under the hash-slot bound.
    fn verify_secret(&self, secret: &str, hash: &str) -> bool;
    /// Records a connect (`online`) or a disconnect. A disconnect must not
    /// mark the device offline if it connected again after `connected_at`.
    fn record_presence<'a>(
        &'a self,
        id: &'a str,
        online: bool,
        at: DateTime<Utc>,
        connected_at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Device { id: String },
    Application { name: String, client_id: String },
    Anonymous { client_id: String },
}

impl Principal {
    pub fn client_id(&self) -> &str {
        match self {
            Principal::Device { id } => id,
            Principal::Application { client_id, .. } | Principal::Anonymous { client_id } => {
                client_id
            }
        }
    }

    /// The name the ACL's `${username}` stands for.
    pub fn username(&self) -> &str {
        match self {
            Principal::Device { id } => id,
            Principal::Application { name, .. } => name,
            Principal::Anonymous { client_id } => client_id,
        }
    }

    /// The client id inside the router. Kinds get separate namespaces so an
    /// application or anonymous client can never take over a device's
    /// session by reusing its id.
    pub fn router_client_id(&self) -> String {
        match self {
            Principal::Device { id } => format!("d:{id}"),
            Principal::Application { name, client_id } => format!("a:{name}:{client_id}"),
            Principal::Anonymous { client_id } => format!("x:{client_id}"),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Device { .. } => "device",
            Principal::Application { .. } => "application",
            Principal::Anonymous { .. } => "anonymous",
        }
    }
}

/// The outcome of a CONNECT's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Accepted, to be governed by the named ACL policy.
    Accepted {
        principal: Principal,
        policy: String,
        /// For a device that logged in with a secret: the stored hash it
        /// was verified against, so a later rotation can be noticed.
        secret_hash: Option<String>,
    },
    Refused {
        code: ConnectReturnCode,
        reason: &'static str,
    },
}

/// What a client presented.
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// Subject CN of a client certificate that verified against the CA.
    pub certificate_cn: Option<&'a str>,
}

pub struct Authenticator {
    registry: Arc<dyn DeviceRegistry>,
    applications: BTreeMap<String, ApplicationConfig>,
    allow_anonymous: bool,
    device_policy: String,
    anonymous_policy: String,
    hash_slots: Semaphore,
    slot_wait: Duration,
    /// Logins waiting for a hash slot now, and how many may.
    waiting: AtomicUsize,
    queue_limit: usize,
    cache: DashMap<(bool, String), CachedSecret>,
    cache_capacity: usize,
}

/// A place in the queue for a hash slot, given back when dropped (also when
/// the login is abandoned).
struct QueuePlace<'a>(&'a AtomicUsize);

impl<'a> QueuePlace<'a> {
    fn take(waiting: &'a AtomicUsize, limit: usize) -> Option<Self> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(waiting))
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A secret that passed the hash check, remembered as a salted digest.
struct CachedSecret {
    stored_hash: String,
    digest: [u8; 32],
}

fn digest(stored_hash: &str, secret: &str) -> [u8; 32] {
    // Salting with the stored PHC string (which holds a random salt) makes
    // the digest useless for any other secret store.
    let mut h = Sha256::new();
    h.update(stored_hash.as_bytes());
    h.update([0]);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn refused(code: ConnectReturnCode, reason: &'static str) -> AuthOutcome {
    counter!("sluice_auth_refused_total", "reason" => reason).increment(1);
    AuthOutcome::Refused { code, reason }
}

impl Authenticator {
    pub fn new(config: &BrokerConfig, registry: Arc<dyn DeviceRegistry>) -> Self {
        Self {
            registry,
            applications: config.applications.clone(),
            allow_anonymous: config.allow_anonymous,
            device_policy: config.acl.device_policy.clone(),
            anonymous_policy: config.acl.anonymous_policy.clone(),
            hash_slots: Semaphore::new(config.auth_concurrency.max(1)),
            slot_wait: Duration::from_millis(config.auth_timeout_ms.max(1)),
            waiting: AtomicUsize::new(0),
            queue_limit: config.auth_queue,
            cache: DashMap::new(),
            cache_capacity: config.auth_cache_entries.max(1),
        }
    }

    pub fn registry(&self) -> &Arc<dyn DeviceRegistry> {
        &self.registry
    }

    pub async fn authenticate(&self, c: Credentials<'_>) -> AuthOutcome {
        use ConnectReturnCode::{BadUserNamePassword, NotAuthorized};

        // Mutual TLS: the CA vouched for the CN; the registry still decides
        // whether that device exists and is enabled.
        if let Some(cn) = c.certificate_cn {
            if cn != c.client_id || c.username.is_some_and(|u| u != cn) {
                return refused(NotAuthorized, "certificate_mismatch");
            }
            return match self.device_credential(cn).await {
                Ok(Some(cred)) if cred.enabled => self.accept_device(cn, None),
                Ok(Some(_)) => refused(NotAuthorized, "device_disabled"),
                Ok(None) => refused(NotAuthorized, "unknown_device"),
                Err(outcome) => outcome,
            };
        }

        let (Some(username), Some(password)) = (c.username, c.password) else {
            if c.username.is_none() && c.password.is_none() && self.allow_anonymous {
                return AuthOutcome::Accepted {
                    principal: Principal::Anonymous {
                        client_id: c.client_id.to_owned(),
                    },
                    policy: self.anonymous_policy.clone(),
                    secret_hash: None,
                };
            }
            return refused(NotAuthorized, "missing_credentials");
        };

        if let Some(app) = self.applications.get(username) {
            return match self
                .check_secret(false, username, &app.secret_hash, password)
                .await
            {
                Ok(true) => AuthOutcome::Accepted {
                    principal: Principal::Application {
                        name: username.to_owned(),
                        client_id: c.client_id.to_owned(),
                    },
                    policy: app.policy.clone(),
                    // Applications live in the configuration, which cannot
                    // change under a running server.
                    secret_hash: None,
                },
                Ok(false) => refused(BadUserNamePassword, "bad_secret"),
                Err(outcome) => outcome,
            };
        }

        if username != c.client_id {
            return refused(BadUserNamePassword, "username_not_client_id");
        }
        let cred = match self.device_credential(username).await {
            Ok(Some(cred)) => cred,
            Ok(None) => return refused(BadUserNamePassword, "unknown_device"),
            // The database is away: a device whose secret was verified
            // before may come back on that (it cannot have been disabled or
            // rotated meanwhile: that needs the database too). Its messages
            // wait in the spool.
            Err(outcome) => {
                return match self.matches_cache(username, password) {
                    Some(hash) => {
                        counter!("sluice_auth_offline_accepts_total").increment(1);
                        self.accept_device(username, Some(hash))
                    }
                    None => outcome,
                };
            }
        };
        match self
            .check_secret(true, username, &cred.secret_hash, password)
            .await
        {
            // The secret is checked first so a disabled device's answer does
            // not tell a stranger that the id exists.
            Ok(true) if cred.enabled => self.accept_device(username, Some(cred.secret_hash)),
            Ok(true) => {
                // Only enabled devices stay cached (see `matches_cache`).
                self.cache.remove(&(true, username.to_owned()));
                refused(NotAuthorized, "device_disabled")
            }
            Ok(false) => refused(BadUserNamePassword, "bad_secret"),
            Err(outcome) => outcome,
        }
    }

    /// The stored hash of the device's last verified secret, if `secret`
    /// is that secret.
    fn matches_cache(&self, device: &str, secret: &str) -> Option<String> {
        self.cache
            .get(&(true, device.to_owned()))
            .filter(|c| bool::from(c.digest.ct_eq(&digest(&c.stored_hash, secret))))
            .map(|c| c.stored_hash.clone())
    }

    fn accept_device(&self, id: &str, secret_hash: Option<String>) -> AuthOutcome {
        AuthOutcome::Accepted {
            principal: Principal::Device { id: id.to_owned() },
            policy: self.device_policy.clone(),
            secret_hash,
        }
    }

    async fn device_credential(&self, id: &str) -> Result<Option<DeviceCredential>, AuthOutcome> {
        let lookup = tokio::time::timeout(REGISTRY_TIMEOUT, self.registry.credential(id));
        let found = lookup
            .await
            .unwrap_or_else(|_| Err("no answer from the registry in time".into()));
        found.map_err(|e| {
            warn!(device = id, error = %e, "cannot read the device registry");
            refused(
                ConnectReturnCode::ServiceUnavailable,
                "registry_unavailable",
            )
        })
    }

    /// Cached or hashed check of `secret` against `stored_hash`.
    async fn check_secret(
        &self,
        is_device: bool,
        name: &str,
        stored_hash: &str,
        secret: &str,
    ) -> Result<bool, AuthOutcome> {
        let key = (is_device, name.to_owned());
        let presented = digest(stored_hash, secret);
        if let Some(cached) = self.cache.get(&key)
            && cached.stored_hash == stored_hash
            && bool::from(cached.digest.ct_eq(&presented))
        {
            counter!("sluice_auth_cache_hits_total").increment(1);
            return Ok(true);
        }

        let overloaded = || refused(ConnectReturnCode::ServiceUnavailable, "auth_overloaded");
        let slot = match self.hash_slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                // Each waiting login holds a connection: without a bound, a
                // flood of wrong secrets faster than the hashes fills
                // `max_connections` with waiters, and then even a device
                // with a cached secret is refused for want of a place.
                let Some(_place) = QueuePlace::take(&self.waiting, self.queue_limit) else {
                    return Err(overloaded());
                };
                match tokio::time::timeout(self.slot_wait, self.hash_slots.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    _ => return Err(overloaded()),
                }
            }
        };
        let registry = self.registry.clone();
        let (s, h) = (secret.to_owned(), stored_hash.to_owned());
        let ok = tokio::task::spawn_blocking(move || registry.verify_secret(&s, &h))
            .await
            .unwrap_or(false);
        drop(slot);
        counter!("sluice_auth_hash_checks_total").increment(1);

        if ok {
            if self.cache.len() >= self.cache_capacity {
                // Crude but bounded: forgetting everything only costs one
                // hash per device on its next connect.
                self.cache.clear();
            }
            self.cache.insert(
                key,
                CachedSecret {
                    stored_hash: stored_hash.to_owned(),
                    digest: presented,
                },
            );
        }
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A registry whose "hash" is the secret itself, counting checks; it
    /// can be made to fail like a database that went away.
    struct FakeRegistry {
        checks: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl DeviceRegistry for FakeRegistry {
        fn credential<'a>(
            &'a self,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Option<DeviceCredential>, String>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err("database unreachable".into());
                }
                Ok(match id {
                    "d1" => Some(DeviceCredential {
                        secret_hash: "s1".into(),
                        enabled: true,
                    }),
                    "off" => Some(DeviceCredential {
                        secret_hash: "s2".into(),
                        enabled: false,
                    }),
                    _ => None,
                })
            })
        }
        fn credentials_of<'a>(
            &'a self,
            ids: &'a [String],
        ) -> BoxFuture<'a, Result<HashMap<String, DeviceCredential>, String>> {
            Box::pin(async move {
                let mut found = HashMap::new();
                for id in ids {
                    if let Some(c) = self.credential(id).await? {
                        found.insert(id.clone(), c);
                    }
                }
                Ok(found)
            })
        }
        fn verify_secret(&self, secret: &str, hash: &str) -> bool {
            self.checks.fetch_add(1, Ordering::SeqCst);
            secret == hash
        }
        fn record_presence<'a>(
            &'a self,
            _: &'a str,
            _: bool,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn auth(allow_anonymous: bool) -> (Authenticator, Arc<FakeRegistry>) {
        let reg = Arc::new(FakeRegistry {
            checks: AtomicUsize::new(0),
            down: Default::default(),
        });
        let mut cfg = BrokerConfig {
            allow_anonymous,
            ..Default::default()
        };
        cfg.applications.insert(
            "dash".into(),
            ApplicationConfig {
                secret_hash: "appsecret".into(),
                policy: "anonymous".into(),
            },
        );
        (Authenticator::new(&cfg, reg.clone()), reg)
    }

    fn creds<'a>(
        client_id: &'a str,
        username: Option<&'a str>,
        password: Option<&'a str>,
    ) -> Credentials<'a> {
        Credentials {
            client_id,
            username,
            password,
            certificate_cn: None,
        }
    }

    fn code(o: AuthOutcome) -> Option<ConnectReturnCode> {
        match o {
            AuthOutcome::Accepted { .. } => None,
            AuthOutcome::Refused { code, .. } => Some(code),
        }
    }

    #[tokio::test]
    async fn devices_applications_and_refusals() {
        let (a, reg) = auth(false);
        use ConnectReturnCode::*;
        assert_eq!(
            a.authenticate(creds("d1", Some("d1"), Some("s1"))).await,
            AuthOutcome::Accepted {
                principal: Principal::Device { id: "d1".into() },
                policy: "device".into(),
                secret_hash: Some("s1".into()),
            }
        );
        assert_eq!(
            code(a.authenticate(creds("d1", Some("d1"), Some("no"))).await),
            Some(BadUserNamePassword)
        );
        assert_eq!(
            code(a.authenticate(creds("d2", Some("d2"), Some("s1"))).await),
            Some(BadUserNamePassword)
        );
        assert_eq!(
            code(a.authenticate(creds("x", Some("d1"), Some("s1"))).await),
            Some(BadUserNamePassword)
        );
        assert_eq!(
            code(a.authenticate(creds("off", Some("off"), Some("s2"))).await),
            Some(NotAuthorized)
        );
        assert_eq!(
            code(a.authenticate(creds("d1", None, None)).await),
            Some(NotAuthorized)
        );
        match a
            .authenticate(creds("ui-1", Some("dash"), Some("appsecret")))
            .await
        {
            AuthOutcome::Accepted {
                principal, policy, ..
            } => {
                assert_eq!(principal.router_client_id(), "a:dash:ui-1");
                assert_eq!(policy, "anonymous");
            }
            other => panic!("{other:?}"),
        }
        // The good d1 login was cached: a second one costs no hash check.
        let before = reg.checks.load(Ordering::SeqCst);
        assert_eq!(
            code(a.authenticate(creds("d1", Some("d1"), Some("s1"))).await),
            None
        );
        assert_eq!(reg.checks.load(Ordering::SeqCst), before);
    }

    #[test]
    fn the_queue_for_hash_slots_is_bounded() {
        let waiting = AtomicUsize::new(0);
        let first = QueuePlace::take(&waiting, 2).expect("a place");
        let _second = QueuePlace::take(&waiting, 2).expect("a place");
        assert!(QueuePlace::take(&waiting, 2).is_none(), "the queue is full");
        drop(first);
        assert!(
            QueuePlace::take(&waiting, 2).is_some(),
            "a place was given back"
        );
        assert!(QueuePlace::take(&AtomicUsize::new(0), 0).is_none());
    }

    #[tokio::test]
    async fn with_the_registry_down_only_a_previously_verified_secret_gets_in() {
        let (a, reg) = auth(false);
        assert_eq!(
            code(a.authenticate(creds("d1", Some("d1"), Some("s1"))).await),
            None
        );
        reg.down.store(true, Ordering::SeqCst);
        assert_eq!(
            code(a.authenticate(creds("d1", Some("d1"), Some("s1"))).await),
            None
        );
        assert_eq!(
            code(a.authenticate(creds("d1", Some("d1"), Some("s2"))).await),
            Some(ConnectReturnCode::ServiceUnavailable)
        );
        assert_eq!(
            code(a.authenticate(creds("off", Some("off"), Some("s2"))).await),
            Some(ConnectReturnCode::ServiceUnavailable)
        );
    }

    #[tokio::test]
    async fn anonymous_only_when_allowed_and_certificates_need_matching_ids() {
        let (a, _) = auth(true);
        assert!(matches!(
            a.authenticate(creds("anyone", None, None)).await,
            AuthOutcome::Accepted {
                principal: Principal::Anonymous { .. },
                ..
            }
        ));
        let cert = |client_id, cn| Credentials {
            client_id,
            username: None,
            password: None,
            certificate_cn: Some(cn),
        };
        assert_eq!(code(a.authenticate(cert("d1", "d1")).await), None);
        assert_eq!(
            code(a.authenticate(cert("d2", "d1")).await),
            Some(ConnectReturnCode::NotAuthorized)
        );
        assert_eq!(
            code(a.authenticate(cert("off", "off")).await),
            Some(ConnectReturnCode::NotAuthorized)
        );
    }
}
