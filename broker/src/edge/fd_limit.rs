//! The process's file-descriptor limit against `max_connections`.
//!
//! Every connection is a socket, and the default soft limit (often 1,024)
//! is far below `max_connections` (10,000); past it `accept` fails and the
//! listener backs off, so clients time out instead of being served or
//! refused. The soft limit may be raised to the hard limit without
//! privileges, so the edge does that at start, and warns when even the hard
//! limit cannot hold the configured connections.

use tracing::{info, warn};

/// Descriptors kept for everything that is not a client connection: the
/// spool's files, database connections, listeners, the gRPC API.
const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit
/// in force afterwards (None where it cannot be read).
pub(crate) fn raise_for(max_connections: usize) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let mut now = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                now = hard;
            }
            Err(e) => warn!(error = %e, soft, hard, "cannot raise the open-file limit"),
        }
    }
    let needed = max_connections as u64 + RESERVED;
    if now < needed {
        warn!(
            limit = now,
            max_connections,
            "the open-file limit cannot hold broker.max_connections; raise the hard limit \
             (ulimit -Hn, LimitNOFILE=) or lower max_connections"
        );
    }
    Some(now)
}
