//! Device presence: connects and disconnects, published as retained JSON on
//! `$sluice/presence/{device_id}` and recorded in the device registry.
//!
//! rumqttd never matches a topic that starts with `$` against any filter
//! (not even `$sluice/presence/+`), so inside the router the `$sluice/`
//! namespace lives under [`ROUTER_PREFIX`]. The edge translates both ways and
//! refuses client publishes and subscriptions that name the router prefix
//! directly, so only Sluice can write there.
//!
//! A device that reconnects before its old connection is noticed gone has
//! two connections for a moment; only the newest reports (see
//! [`super::sessions`]), so "offline" never follows a fresh "online".

use crate::publisher::Publisher;
use chrono::{DateTime, SecondsFormat, Utc};
use tracing::warn;

/// The reserved MQTT namespace as clients see it.
pub const CLIENT_PREFIX: &str = "$sluice/";
/// The same namespace inside the router.
pub const ROUTER_PREFIX: &str = "@sluice/";

/// `$sluice/…` → `@sluice/…`; other topics and filters unchanged.
pub fn to_router(topic: &str) -> Option<String> {
    topic
        .strip_prefix(CLIENT_PREFIX)
        .map(|rest| format!("{ROUTER_PREFIX}{rest}"))
}

/// `@sluice/…` → `$sluice/…`.
pub fn from_router(topic: &str) -> Option<String> {
    topic
        .strip_prefix(ROUTER_PREFIX)
        .map(|rest| format!("{CLIENT_PREFIX}{rest}"))
}

/// Why a connection ended, as presence subscribers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost,
    KeepAliveTimeout,
    /// The client broke the protocol, the ACL or a limit.
    ProtocolViolation,
    /// Another connection took over the same client id.
    TakenOver,
    ServerShutdown,
    /// The device was disabled in the registry while connected.
    DeviceDisabled,
    /// The device was deleted from the registry while connected.
    DeviceDeleted,
    /// The device's secret was rotated after this connection logged in
    /// with the previous one.
    SecretRotated,
    /// A packet begun and not finished within `packet_timeout_ms`.
    PacketTimeout,
    /// No progress writing to the client for `write_timeout_ms`.
    WriteTimeout,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::ConnectionLost => "connection_lost",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::ProtocolViolation => "protocol_violation",
            Self::TakenOver => "taken_over",
            Self::ServerShutdown => "server_shutdown",
            Self::DeviceDisabled => "device_disabled",
            Self::DeviceDeleted => "device_deleted",
            Self::SecretRotated => "secret_rotated",
            Self::PacketTimeout => "packet_timeout",
            Self::WriteTimeout => "write_timeout",
        }
    }

    /// MQTT 3.1.1 §3.1.2.5: the will is published unless the client said
    /// DISCONNECT. A server shutdown is not the device's failure either. A
    /// device whose credentials were revoked is no longer allowed to
    /// publish anything, its will included.
    pub fn publishes_will(self) -> bool {
        !matches!(
            self,
            Self::ClientDisconnect
                | Self::ServerShutdown
                | Self::DeviceDisabled
                | Self::DeviceDeleted
                | Self::SecretRotated
        )
    }
}

pub fn message(device: &str, online: bool, at: DateTime<Utc>, reason: &str) -> Vec<u8> {
    serde_json::json!({
        "device_id": device,
        "online": online,
        "at": at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "reason": reason,
    })
    .to_string()
    .into_bytes()
}

/// Publishes a presence message, retained so a late subscriber learns the
/// current state.
pub fn publish(publisher: &Publisher, device: &str, online: bool, at: DateTime<Utc>, reason: &str) {
    let topic = format!("{ROUTER_PREFIX}presence/{device}");
    if let Err(e) = publisher.publish(&topic, message(device, online, at, reason), true) {
        warn!(device, error = %e, "cannot publish presence");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_translation_round_trips() {
        assert_eq!(
            to_router("$sluice/presence/+").as_deref(),
            Some("@sluice/presence/+")
        );
        assert_eq!(to_router("devices/d1/#"), None);
        assert_eq!(
            from_router("@sluice/presence/d1").as_deref(),
            Some("$sluice/presence/d1")
        );
    }

    #[test]
    fn wills_follow_the_spec() {
        assert!(!DisconnectReason::ClientDisconnect.publishes_will());
        assert!(DisconnectReason::KeepAliveTimeout.publishes_will());
        assert!(DisconnectReason::ConnectionLost.publishes_will());
        assert!(DisconnectReason::WriteTimeout.publishes_will());
        assert!(!DisconnectReason::DeviceDisabled.publishes_will());
        assert!(!DisconnectReason::SecretRotated.publishes_will());
    }
}
