//! Authentication at CONNECT and the per-client ACL.
//!
//! Order of checks for one CONNECT:
//! 1. the source address is refused after repeated failed logins → v3 0x05, v5 0x8A
//!    (no password is checked);
//! 2. on a TLS listener with `use_identity_as_username`, the client certificate's subject
//!    CN is the user name, and user name and password in CONNECT are ignored; no usable CN
//!    → v3 0x05, v5 0x87;
//! 3. no user name: accepted as anonymous when `allow_anonymous`, else v3 0x05, v5 0x87;
//! 4. a user name with a password file: the password must verify → else v3 0x04, v5 0x86
//!    (unknown users and wrong passwords look the same and take the same time);
//! 5. a user name without a password file cannot be checked: with `allow_anonymous` the
//!    client is accepted *as anonymous* (the name is not used for ACLs), else refused as 4.
//!
//! Failures in 4 and 5 count towards the per-address limit ([`limiter`]); every refusal
//! is counted in `edgegw_broker_auth_failures_total{reason}`.
//!
//! Password verification (argon2id, tens of milliseconds and ~19 MiB each) runs on the
//! runtime's blocking threads, never on an ntex worker; at most one per core runs at a
//! time and further ones wait. Successful verifications are remembered for a while as a
//! keyed BLAKE2b digest of (user, password), never the password, so a client that
//! reconnects often (or a reconnect storm after a network blip) does not pay argon2 each
//! time; wrong passwords are never cached.
//!
//! A reload (`Authenticator::reload`, then `Authenticator::revoke_lost_access`) swaps
//! the policy and moves a generation number: every connection re-resolves its ACL at its
//! next PUBLISH or SUBSCRIBE; logins the new policy refuses (user removed, password
//! changed, anonymous turned off) are closed through their session
//! ([`crate::Session::revoke_if`]); subscriptions the new ACL denies are removed.

pub mod cert;
pub mod limiter;
pub mod password;

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use edgegw_telemetry::names;
use metrics::{Counter, counter};
use tokio::sync::Semaphore;

use crate::{
    Bytes,
    acl::{AclSettings, ClientAcl, Operation},
    connection::Conn,
    metrics::BrokerMetrics,
    router::{Router, Will},
    session::Credential,
};

pub use password::{PasswordFile, PasswordFileError, Update, Verdict, set_password};

/// How clients prove who they are, and what they may do.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// Accept clients that send no user name.
    pub allow_anonymous: bool,
    /// Users and their argon2id hashes; `None`: no user name can be verified.
    pub passwords: Option<Arc<PasswordFile>>,
    /// Failed logins from one address within `failure_window` before it is refused for
    /// `failure_window`; 0 turns this off.
    pub max_failures: u32,
    pub failure_window: Duration,
    pub acl: AclSettings,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            passwords: None,
            max_failures: 5,
            failure_window: Duration::from_secs(60),
            acl: AclSettings::default(),
        }
    }
}

/// Why a CONNECT is refused; each protocol maps it to its return/reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// v3 0x04, v5 0x86.
    BadCredentials,
    /// v3 0x05, v5 0x87.
    NotAuthorized,
    /// v3 0x05, v5 0x8A: too many failed logins from this address.
    Banned,
}

/// The label of `edgegw_broker_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    UnknownUser,
    WrongPassword,
    NoPassword,
    Anonymous,
    Certificate,
    Banned,
}

impl FailureReason {
    const ALL: [FailureReason; 6] = [
        FailureReason::UnknownUser,
        FailureReason::WrongPassword,
        FailureReason::NoPassword,
        FailureReason::Anonymous,
        FailureReason::Certificate,
        FailureReason::Banned,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureReason::UnknownUser => "unknown_user",
            FailureReason::WrongPassword => "wrong_password",
            FailureReason::NoPassword => "no_password",
            FailureReason::Anonymous => "anonymous",
            FailureReason::Certificate => "certificate",
            FailureReason::Banned => "banned",
        }
    }

    /// Failures that guess credentials count towards the per-address limit.
    fn counts_towards_limit(self) -> bool {
        matches!(
            self,
            FailureReason::UnknownUser | FailureReason::WrongPassword | FailureReason::NoPassword
        )
    }
}

/// What the listener contributes to authentication.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ListenerAuth {
    /// Take the user name from the client certificate's CN.
    pub identity_from_certificate: bool,
    /// The listener's address, when its connections may hibernate (plain TCP, hibernation
    /// on): with the peer's, it names a connection in `accept.rs` and `hibernate.rs`.
    pub hibernate: Option<std::net::SocketAddr>,
}

/// The user name a client certificate gives, on listeners that use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CertificateIdentity {
    NotUsed,
    Name(String),
    Unusable(String),
}

/// One CONNECT's claims.
pub(crate) struct LoginRequest<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<Bytes>,
    pub peer: Option<IpAddr>,
    pub certificate: CertificateIdentity,
}

impl<'a> LoginRequest<'a> {
    /// Reads the peer address and (on listeners that use it) the certificate CN off the
    /// connection's I/O.
    pub fn new(
        listener: ListenerAuth,
        io: &ntex::io::IoBoxed,
        client_id: &'a str,
        username: Option<&'a str>,
        password: Option<&Bytes>,
    ) -> Self {
        let peer = io
            .query::<ntex::io::types::PeerAddr>()
            .get()
            .map(|addr| addr.0.ip());
        let certificate = if listener.identity_from_certificate {
            match io.query::<ntex_tls::PeerCertDer>().as_ref() {
                None => CertificateIdentity::Unusable("no client certificate".into()),
                Some(der) => match cert::common_name(&der.0) {
                    Ok(name) => CertificateIdentity::Name(name),
                    Err(error) => CertificateIdentity::Unusable(error.to_string()),
                },
            }
        } else {
            CertificateIdentity::NotUsed
        };
        Self {
            client_id,
            username,
            password: password.cloned(),
            peer,
            certificate,
        }
    }
}

/// A CONNECT that passed: the user name (`None`: anonymous), how it was proved, and the
/// settings generation it was checked under.
#[derive(Debug, PartialEq, Eq)]
pub struct Login {
    pub user: Option<String>,
    pub credential: Credential,
    pub generation: u64,
}

/// What `Authenticator::revoke_lost_access` did (returned by `Broker::reload_auth`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// Connections closed.
    pub connections: usize,
    /// Subscriptions removed.
    pub subscriptions: usize,
}

/// Checks CONNECTs and resolves ACLs; shared by all connections.
pub(crate) struct Authenticator {
    /// Swapped whole by a reload; connections re-resolve their ACL when `generation` moves.
    policy: std::sync::RwLock<Arc<Policy>>,
    generation: std::sync::atomic::AtomicU64,
    failures: Mutex<limiter::FailureTracker>,
    verify_slots: Arc<Semaphore>,
    cache: Mutex<VerifiedCache>,
    metrics: AuthMetrics,
}

/// What a reload can change: who may connect and what they may do.
struct Policy {
    allow_anonymous: bool,
    passwords: Option<Arc<PasswordFile>>,
    acl: AclSettings,
    max_failures: u32,
    failure_window: Duration,
}

struct AuthMetrics {
    failures: [Counter; FailureReason::ALL.len()],
    acl_denied: [Counter; 2],
}

impl Authenticator {
    pub fn new(settings: AuthSettings) -> Self {
        let parallel = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        Self {
            policy: std::sync::RwLock::new(Arc::new(Policy {
                allow_anonymous: settings.allow_anonymous,
                passwords: settings.passwords,
                acl: settings.acl,
                max_failures: settings.max_failures,
                failure_window: settings.failure_window,
            })),
            generation: std::sync::atomic::AtomicU64::new(0),
            failures: Mutex::new(limiter::FailureTracker::new(
                settings.max_failures,
                settings.failure_window,
                limiter::DEFAULT_CAPACITY,
            )),
            verify_slots: Arc::new(Semaphore::new(parallel.clamp(1, 4))),
            cache: Mutex::new(VerifiedCache::new(
                CACHE_CAPACITY,
                CACHE_TTL,
                rand::random(),
            )),
            metrics: AuthMetrics {
                failures: FailureReason::ALL
                    .map(|r| counter!(names::BROKER_AUTH_FAILURES, "reason" => r.label())),
                acl_denied: [Operation::Publish, Operation::Subscribe]
                    .map(|o| counter!(names::BROKER_ACL_DENIALS, "action" => o.label())),
            },
        }
    }

    /// Replaces who may connect and the ACL (a config reload). New CONNECTs use the new
    /// policy at once; open connections re-resolve their ACL at their next PUBLISH or
    /// SUBSCRIBE. Remembered password verifications are forgotten.
    pub fn reload(&self, settings: AuthSettings) {
        let policy = Policy {
            allow_anonymous: settings.allow_anonymous,
            passwords: settings.passwords,
            acl: settings.acl,
            max_failures: settings.max_failures,
            failure_window: settings.failure_window,
        };
        let limits_changed = {
            let old = self.policy();
            old.max_failures != policy.max_failures || old.failure_window != policy.failure_window
        };
        if limits_changed {
            *self.failures_lock() = limiter::FailureTracker::new(
                policy.max_failures,
                policy.failure_window,
                limiter::DEFAULT_CAPACITY,
            );
        }
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        // Under the cache's lock, so a login that checked the old file cannot add to the new
        // cache after this (see `login`).
        let mut cache = self.cache_lock();
        *cache = VerifiedCache::new(CACHE_CAPACITY, CACHE_TTL, rand::random());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(cache);
    }

    /// Moves on every [`Authenticator::reload`].
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Who a CONNECT authenticates as, or why it is refused.
    pub async fn login(&self, request: LoginRequest<'_>) -> Result<Login, Refusal> {
        let generation = self.generation();
        let policy = self.policy();
        let login = |user: Option<&str>, credential| Login {
            user: user.map(str::to_string),
            credential,
            generation,
        };
        if self.is_refused(request.peer) {
            return Err(self.fail(&request, FailureReason::Banned, Refusal::Banned));
        }
        match &request.certificate {
            CertificateIdentity::NotUsed => {}
            CertificateIdentity::Name(name) => {
                return Ok(login(Some(name), Credential::Certificate));
            }
            CertificateIdentity::Unusable(why) => {
                tracing::info!(client_id = request.client_id, reason = %why, "No user name from the client certificate.");
                return Err(self.fail(
                    &request,
                    FailureReason::Certificate,
                    Refusal::NotAuthorized,
                ));
            }
        }
        let Some(username) = request.username else {
            if policy.allow_anonymous {
                return Ok(login(None, Credential::Anonymous));
            }
            return Err(self.fail(&request, FailureReason::Anonymous, Refusal::NotAuthorized));
        };
        let Some(passwords) = &policy.passwords else {
            if policy.allow_anonymous {
                tracing::debug!(
                    client_id = request.client_id,
                    user = username,
                    "No password file: the user name is not verified; connected as anonymous."
                );
                return Ok(login(None, Credential::Anonymous));
            }
            return Err(self.fail(
                &request,
                FailureReason::UnknownUser,
                Refusal::BadCredentials,
            ));
        };
        let Some(password) = request.password.clone() else {
            return Err(self.fail(&request, FailureReason::NoPassword, Refusal::BadCredentials));
        };
        // The entry the password is checked against (none: an unknown user, refused below).
        let verified = login(
            Some(username),
            Credential::Password {
                entry: passwords.fingerprint(username).unwrap_or_default(),
            },
        );
        if self
            .cache_lock()
            .contains(username, &password, Instant::now())
        {
            return Ok(verified);
        }
        let Ok(permit) = self.verify_slots.clone().acquire_owned().await else {
            return Err(Refusal::NotAuthorized);
        };
        // Another connection from this address may have used up its tries meanwhile.
        if self.is_refused(request.peer) {
            return Err(self.fail(&request, FailureReason::Banned, Refusal::Banned));
        }
        let file = passwords.clone();
        let user = username.to_string();
        let verdict = ntex::rt::spawn_blocking(move || {
            let _permit = permit;
            file.verify(&user, &password)
        })
        .await;
        match verdict {
            Ok(Verdict::Valid) => {
                // Checked against a password file a reload replaced meanwhile: valid for this
                // CONNECT, which began before the reload, but not remembered for later ones.
                if let Some(password) = &request.password {
                    let mut cache = self.cache_lock();
                    if self.generation() == generation {
                        cache.insert(username, password, Instant::now());
                    }
                }
                Ok(verified)
            }
            Ok(Verdict::WrongPassword) => Err(self.fail(
                &request,
                FailureReason::WrongPassword,
                Refusal::BadCredentials,
            )),
            Ok(Verdict::UnknownUser) => Err(self.fail(
                &request,
                FailureReason::UnknownUser,
                Refusal::BadCredentials,
            )),
            Err(error) => {
                tracing::error!(client_id = request.client_id, %error, "Password verification failed to run.");
                Err(Refusal::NotAuthorized)
            }
        }
    }

    /// Is a login still valid under the current settings? A user removed from the password
    /// file or whose password changed, and anonymous clients once `allow_anonymous` is off,
    /// are not. Certificate names stay valid (the CA is not reloaded); in-process clients
    /// are not subject to auth.
    pub fn still_valid(&self, user: Option<&str>, credential: Credential) -> bool {
        let policy = self.policy();
        match credential {
            Credential::Internal | Credential::Certificate => true,
            Credential::Anonymous => policy.allow_anonymous,
            Credential::Password { entry } => match (&policy.passwords, user) {
                (Some(passwords), Some(user)) => passwords.fingerprint(user) == Some(entry),
                _ => false,
            },
        }
    }

    /// After a reload: closes the connections whose login the new settings no longer
    /// accept (v5 DISCONNECT 0x87 Not authorized, no will), and removes subscriptions the
    /// new ACL denies, of connected and offline sessions alike. Each is logged.
    pub fn revoke_lost_access(&self, router: &Router) -> Revoked {
        let mut revoked = Revoked::default();
        for session in router.sessions() {
            if session.credential() == Credential::Internal {
                continue;
            }
            if session.revoke_if(|user, credential| !self.still_valid(user, credential)) {
                revoked.connections += 1;
                tracing::info!(
                    client_id = %session.client_id,
                    user = session.owner().as_deref(),
                    "Disconnected: the reloaded auth settings no longer accept this login."
                );
            }
            let owner = session.owner();
            let acl = self.acl_for(owner.as_deref(), &session.client_id);
            if acl.allows_everything() {
                continue;
            }
            for filter in session.subscriptions() {
                if !acl.may_subscribe(&filter.filter) && router.unsubscribe(&session, &filter) {
                    revoked.subscriptions += 1;
                    tracing::info!(
                        client_id = %session.client_id,
                        user = owner.as_deref(),
                        filter = %filter,
                        "Subscription removed: the reloaded ACL denies it."
                    );
                }
            }
        }
        revoked
    }

    /// The ACL of one client.
    pub fn acl_for(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        self.policy().acl.for_client(user, client_id)
    }

    /// May the client's will be published under its ACL? A will the client could not
    /// publish itself would bypass the ACL, so a denied one refuses the CONNECT (v3 0x05,
    /// v5 0x87); the denial is logged and counted.
    pub fn will_allowed(&self, acl: &ClientAcl, client_id: &str, will: Option<&Will>) -> bool {
        let Some(will) = will else { return true };
        if acl.may_publish(&will.message.topic) {
            return true;
        }
        self.acl_denied(Operation::Publish);
        BrokerMetrics::refused("will_not_authorized");
        tracing::info!(
            client_id,
            topic = %will.message.topic,
            "Connection refused: the ACL denies publishing the will."
        );
        false
    }

    /// Counts an ACL denial.
    pub fn acl_denied(&self, operation: Operation) {
        self.metrics.acl_denied[operation as usize].increment(1);
    }

    fn is_refused(&self, peer: Option<IpAddr>) -> bool {
        let Some(peer) = peer else { return false };
        self.failures_lock().is_refused(peer, Instant::now())
    }

    /// Logs and counts a refused login; returns `refusal` for the caller.
    fn fail(&self, request: &LoginRequest<'_>, reason: FailureReason, refusal: Refusal) -> Refusal {
        self.metrics.failures[reason as usize].increment(1);
        BrokerMetrics::refused(match refusal {
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::Banned => "banned",
        });
        let peer = request.peer.map(|ip| ip.to_string());
        if reason == FailureReason::Banned {
            // Repeats until the address's time is up: debug, so it cannot flood the log.
            tracing::debug!(
                client_id = request.client_id,
                user = request.username,
                peer = peer.as_deref(),
                reason = reason.label(),
                "Connection refused: login failed."
            );
        } else {
            tracing::info!(
                client_id = request.client_id,
                user = request.username,
                peer = peer.as_deref(),
                reason = reason.label(),
                "Connection refused: login failed."
            );
        }
        if reason.counts_towards_limit()
            && let Some(ip) = request.peer
            && self.failures_lock().record_failure(ip, Instant::now())
                == limiter::Recorded::NowRefused
        {
            tracing::warn!(
                peer = %ip,
                "Too many failed logins: further connections from this address are refused for broker.auth.failure_window."
            );
        }
        refusal
    }

    fn failures_lock(&self) -> std::sync::MutexGuard<'_, limiter::FailureTracker> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, VerifiedCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// ACL checks on a connection; denials are logged and counted.
impl Conn {
    /// The client's ACL, resolved again when a reload changed the rules since the last look.
    fn current_acl(&self) -> std::cell::Ref<'_, ClientAcl> {
        let generation = self.shared.auth.generation();
        if self.acl_generation.get() != generation {
            let fresh = self
                .shared
                .auth
                .acl_for(self.user.as_deref(), self.client_id());
            *self.acl.borrow_mut() = fresh;
            self.acl_generation.set(generation);
        }
        self.acl.borrow()
    }

    /// May this client publish to `topic`? Never once a reload revoked its access (the
    /// connection is closing).
    pub fn may_publish(&self, topic: &str) -> bool {
        let allowed =
            !self.session.is_revoked(self.generation) && self.current_acl().may_publish(topic);
        if !allowed {
            self.shared.auth.acl_denied(Operation::Publish);
            // Per message, so debug: a client retrying in a loop must not flood the log.
            tracing::debug!(
                client_id = self.client_id(),
                topic,
                "PUBLISH denied by the ACL; message dropped."
            );
        }
        allowed
    }

    /// May this client subscribe to `filter` (as sent, possibly `$share/group/...`)? An
    /// invalid filter is allowed here; subscribing reports it.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        if self.session.is_revoked(self.generation) {
            return false;
        }
        let acl = self.current_acl();
        if acl.allows_everything() {
            return true;
        }
        let Ok(parsed) = crate::topic::Filter::parse(filter) else {
            return true;
        };
        let allowed = acl.may_subscribe(&parsed.filter);
        if !allowed {
            self.shared.auth.acl_denied(Operation::Subscribe);
            tracing::info!(
                client_id = self.client_id(),
                filter,
                "SUBSCRIBE denied by the ACL."
            );
        }
        allowed
    }
}

/// Successful verifications remembered per user.
const CACHE_CAPACITY: usize = 1024;
const CACHE_TTL: Duration = Duration::from_secs(600);

struct VerifiedCache {
    key: [u8; 32],
    capacity: usize,
    ttl: Duration,
    entries: HashMap<String, ([u8; 32], Instant)>,
}

impl VerifiedCache {
    fn new(capacity: usize, ttl: Duration, key: [u8; 32]) -> Self {
        Self {
            key,
            capacity,
            ttl,
            entries: HashMap::new(),
        }
    }

    /// Keyed digest of (user, password): useless without the process's random key.
    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        use blake2::{Blake2b256, Digest as _};
        let mut hasher = Blake2b256::new();
        hasher.update(self.key);
        hasher.update((user.len() as u64).to_be_bytes());
        hasher.update(user.as_bytes());
        hasher.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(hasher.finalize().as_slice());
        out
    }

    fn contains(&mut self, user: &str, password: &[u8], now: Instant) -> bool {
        let Some((stored, at)) = self.entries.get(user) else {
            return false;
        };
        if now.duration_since(*at) >= self.ttl {
            self.entries.remove(user);
            return false;
        }
        let digest = self.digest(user, password);
        // Constant time: the comparison does not tell how much matched.
        stored
            .iter()
            .zip(digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    fn insert(&mut self, user: &str, password: &[u8], now: Instant) {
        if !self.entries.contains_key(user) && self.entries.len() >= self.capacity {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, at)| now.duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(user, _)| user.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        let digest = self.digest(user, password);
        self.entries.insert(user.to_string(), (digest, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_remembers_only_the_right_password_for_a_while() {
        let mut cache = VerifiedCache::new(2, Duration::from_secs(10), [7; 32]);
        let t0 = Instant::now();
        assert!(!cache.contains("alice", b"pw", t0));
        cache.insert("alice", b"pw", t0);
        assert!(cache.contains("alice", b"pw", t0));
        assert!(!cache.contains("alice", b"pW", t0));
        assert!(!cache.contains("bob", b"pw", t0));
        assert!(!cache.contains("alice", b"pw", t0 + Duration::from_secs(10)));
        cache.insert("a", b"1", t0);
        cache.insert("b", b"2", t0 + Duration::from_secs(1));
        cache.insert("c", b"3", t0 + Duration::from_secs(2));
        assert_eq!(cache.entries.len(), 2, "bounded");
        assert!(!cache.contains("a", b"1", t0 + Duration::from_secs(2)));
        assert!(cache.contains("c", b"3", t0 + Duration::from_secs(2)));
        // No plaintext is kept.
        let (digest, _) = cache.entries["c"];
        assert_ne!(&digest[..1], b"3");
        assert_ne!(
            VerifiedCache::new(1, Duration::from_secs(1), [1; 32]).digest("c", b"3"),
            digest,
            "keyed per process"
        );
    }

    fn request(username: Option<&str>, password: Option<&str>) -> LoginRequest<'static> {
        LoginRequest {
            client_id: "c",
            username: username.map(|u| Box::leak(u.to_string().into_boxed_str()) as &str),
            password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
            peer: Some("192.0.2.9".parse().unwrap()),
            certificate: CertificateIdentity::NotUsed,
        }
    }

    fn cheap_file() -> Arc<PasswordFile> {
        Arc::new(PasswordFile::parse(&cheap_file_text()).unwrap())
    }

    /// `alice:` with a fresh (salted) hash of "secret" at a tiny cost.
    fn cheap_file_text() -> String {
        use argon2::PasswordHasher as _;
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let hash = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"secret")
            .unwrap();
        format!("alice:{hash}\n")
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn login_decisions() {
        let auth = Authenticator::new(AuthSettings {
            allow_anonymous: false,
            passwords: Some(cheap_file()),
            max_failures: 3,
            ..AuthSettings::default()
        });
        block_on(async {
            assert_eq!(
                auth.login(request(Some("alice"), Some("secret")))
                    .await
                    .map(|l| l.user),
                Ok(Some("alice".to_string()))
            );
            assert_eq!(
                auth.login(request(Some("alice"), Some("secret")))
                    .await
                    .map(|l| l.user),
                Ok(Some("alice".to_string())),
                "from the cache"
            );
            assert_eq!(
                auth.login(request(None, None)).await.map(|l| l.user),
                Err(Refusal::NotAuthorized)
            );
            assert_eq!(
                auth.login(request(Some("alice"), Some("wrong")))
                    .await
                    .map(|l| l.user),
                Err(Refusal::BadCredentials)
            );
            assert_eq!(
                auth.login(request(Some("mallory"), Some("secret")))
                    .await
                    .map(|l| l.user),
                Err(Refusal::BadCredentials)
            );
            assert_eq!(
                auth.login(request(Some("alice"), None)).await,
                Err(Refusal::BadCredentials)
            );
            // Three credential failures: the address is refused, even with the right
            // password; anonymous refusals did not count.
            assert_eq!(
                auth.login(request(Some("alice"), Some("secret")))
                    .await
                    .map(|l| l.user),
                Err(Refusal::Banned)
            );
            let mut elsewhere = request(Some("alice"), Some("secret"));
            elsewhere.peer = Some("192.0.2.10".parse().unwrap());
            assert_eq!(
                auth.login(elsewhere).await.map(|l| l.user),
                Ok(Some("alice".into()))
            );
        });
    }

    #[test]
    fn a_reload_revalidates_logins() {
        let file = cheap_file();
        let auth = Authenticator::new(AuthSettings {
            allow_anonymous: true,
            passwords: Some(file.clone()),
            ..AuthSettings::default()
        });
        let (alice, anonymous) = block_on(async {
            (
                auth.login(request(Some("alice"), Some("secret")))
                    .await
                    .unwrap(),
                auth.login(request(None, None)).await.unwrap(),
            )
        });
        assert_eq!(alice.user.as_deref(), Some("alice"));
        assert!(matches!(alice.credential, Credential::Password { .. }));
        assert_eq!(anonymous.credential, Credential::Anonymous);
        let valid = |user: Option<&str>, credential| auth.still_valid(user, credential);
        assert!(valid(Some("alice"), alice.credential));
        assert!(valid(None, Credential::Anonymous));
        assert!(
            !valid(Some("bob"), alice.credential),
            "another user's entry"
        );

        // Same users, anonymous access off: only anonymous logins are lost.
        auth.reload(AuthSettings {
            allow_anonymous: false,
            passwords: Some(file.clone()),
            ..AuthSettings::default()
        });
        assert_ne!(auth.generation(), alice.generation);
        assert!(valid(Some("alice"), alice.credential));
        assert!(!valid(None, Credential::Anonymous));
        assert!(valid(Some("sensor-1"), Credential::Certificate));
        assert!(valid(None, Credential::Internal));

        // alice's password changed (a new hash, even for the same password): lost.
        let without_alice = format!("bob:{}", cheap_file_text().trim_start_matches("alice:"));
        let changed = Arc::new(PasswordFile::parse(&without_alice).unwrap());
        let renewed = Arc::new(PasswordFile::parse(&cheap_file_text()).unwrap());
        auth.reload(AuthSettings {
            allow_anonymous: false,
            passwords: Some(renewed),
            ..AuthSettings::default()
        });
        assert!(!valid(Some("alice"), alice.credential), "password changed");
        // alice removed from the file: lost; no password file at all: lost.
        auth.reload(AuthSettings {
            allow_anonymous: false,
            passwords: Some(changed),
            ..AuthSettings::default()
        });
        assert!(!valid(Some("alice"), alice.credential), "user removed");
        auth.reload(AuthSettings {
            allow_anonymous: true,
            passwords: None,
            ..AuthSettings::default()
        });
        assert!(!valid(Some("alice"), alice.credential), "no password file");
        // The same file again: valid again.
        auth.reload(AuthSettings {
            allow_anonymous: true,
            passwords: Some(file),
            ..AuthSettings::default()
        });
        assert!(valid(Some("alice"), alice.credential));
    }

    #[test]
    fn anonymous_and_unverifiable_names() {
        let open = Authenticator::new(AuthSettings::default());
        let closed = Authenticator::new(AuthSettings {
            allow_anonymous: false,
            ..AuthSettings::default()
        });
        block_on(async {
            assert_eq!(
                open.login(request(None, None)).await.map(|l| l.user),
                Ok(None)
            );
            assert_eq!(
                open.login(request(Some("alice"), Some("x")))
                    .await
                    .map(|l| l.user),
                Ok(None),
                "an unverifiable user name is not trusted"
            );
            assert_eq!(
                closed
                    .login(request(Some("alice"), Some("x")))
                    .await
                    .map(|l| l.user),
                Err(Refusal::BadCredentials)
            );
            let mut with_cert = request(Some("ignored"), None);
            with_cert.certificate = CertificateIdentity::Name("sensor-1".into());
            assert_eq!(
                closed.login(with_cert).await.map(|l| l.user),
                Ok(Some("sensor-1".into()))
            );
            let mut no_cn = request(None, None);
            no_cn.certificate = CertificateIdentity::Unusable("no CN".into());
            assert_eq!(
                open.login(no_cn).await.map(|l| l.user),
                Err(Refusal::NotAuthorized)
            );
        });
    }
}
