//! The gRPC Telemetry client that `--verify` and `--latency` read with.
//!
//! Connected and checked before the first device starts: a wrong URL or
//! token should fail in a second, not after a long load run.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use sluice_proto::BearerToken;
use sluice_proto::v1::LatestPointsRequest;
use sluice_proto::v1::telemetry_client::TelemetryClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::args::ApiConfig;

/// The metric every simulated message stores its `seq` under.
pub const SEQ_METRIC: &str = "seq";

pub type Telemetry = TelemetryClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the API and makes one cheap call, so a refused token or a
/// server without the Telemetry service shows now. `probe_device` is any
/// device id (the call reads at most one point of it).
pub async fn connect(api: &ApiConfig, timeout: Duration, probe_device: &str) -> Result<Telemetry> {
    let bearer = BearerToken::new(api.token.as_deref())
        .map_err(|_| anyhow!("--api-token holds characters a gRPC header cannot"))?;
    let mut endpoint = Channel::from_shared(api.url.clone())
        .map_err(|e| anyhow!("--grpc {}: {e}", api.url))?
        .connect_timeout(timeout);
    if let Some(pem) = &api.ca_pem {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow!("--grpc {}: TLS: {e}", api.url))?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the gRPC API at {}", api.url))?;
    let mut client = TelemetryClient::with_interceptor(channel, bearer);
    let probe = LatestPointsRequest {
        device_ids: vec![probe_device.to_owned()],
        metrics: vec![SEQ_METRIC.to_owned()],
        limit: 1,
        ..Default::default()
    };
    match tokio::time::timeout(timeout, client.latest_points(probe)).await {
        Err(_) => Err(anyhow!(
            "the gRPC API at {} did not answer within {timeout:?}",
            api.url
        )),
        Ok(Err(status)) => Err(anyhow!(
            "the gRPC API at {} refused a first call: {}{}",
            api.url,
            status.message(),
            match status.code() {
                tonic::Code::Unauthenticated if api.token.is_none() =>
                    " (pass a read token with --api-token or SIM_API_TOKEN)",
                _ => "",
            }
        )),
        Ok(Ok(_)) => Ok(client),
    }
}

/// Epoch milliseconds as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as epoch milliseconds (rounded down).
pub fn epoch_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos.div_euclid(1_000_000)))
}

/// A stored `seq` point's value as the message number, if it is one.
pub fn seq_of(value: f64) -> Option<u64> {
    // Below 2^53 every integer is exact in an f64.
    (value.fract() == 0.0 && (0.0..9_007_199_254_740_992.0).contains(&value))
        .then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_milliseconds() {
        for ms in [0, 1, 999, 1000, 1_700_000_000_123, -1, -1001] {
            assert_eq!(epoch_ms(&timestamp(ms)), ms, "{ms}");
            assert!((0..1_000_000_000).contains(&timestamp(ms).nanos));
        }
    }

    #[test]
    fn only_whole_non_negative_values_are_seqs() {
        assert_eq!(seq_of(0.0), Some(0));
        assert_eq!(seq_of(41.0), Some(41));
        assert_eq!(seq_of(1.5), None);
        assert_eq!(seq_of(-1.0), None);
        assert_eq!(seq_of(f64::NAN), None);
        assert_eq!(seq_of(f64::INFINITY), None);
        assert_eq!(seq_of(1e300), None);
    }
}
