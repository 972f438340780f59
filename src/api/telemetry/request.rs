//! Checks shared by the Telemetry calls: ranges, page sizes, selections,
//! and the scan bound. Each failure names the request field it is about.

use super::super::page_token::fingerprint;
use chrono::{DateTime, TimeZone, Utc};
use sluice_ingest::query::SeriesSelection;
use tonic::Status;
use tracing::{error, warn};

/// Rows per page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
/// Larger requests are refused, so one call cannot pull the whole table.
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// Ids and metric names one call may list.
pub const MAX_LISTED_DEVICES: usize = 10_000;
pub const MAX_LISTED_METRICS: usize = 1_000;
/// Series one selection may match (a prefix can match any number).
pub const MAX_SELECTED_SERIES: u32 = 100_000;

/// A request's single field (`device_id`, `metric`) joined to its list
/// twin, without repeating it.
pub fn with_single(single: &str, mut list: Vec<String>) -> Vec<String> {
    if !single.is_empty() && !list.iter().any(|x| x == single) {
        list.insert(0, single.to_owned());
    }
    list
}

/// Device ids or a prefix (one of them required when `required`), and
/// metrics, checked.
pub fn selection(
    device_ids: Vec<String>,
    device_prefix: String,
    metrics: Vec<String>,
    required: bool,
) -> Result<SeriesSelection, Status> {
    match (device_ids.is_empty(), device_prefix.is_empty()) {
        (true, true) if required => {
            return Err(Status::invalid_argument(
                "device_ids (or device_id) or device_id_prefix is required",
            ));
        }
        (false, false) => {
            return Err(Status::invalid_argument(
                "device_id_prefix cannot be combined with device_ids or device_id",
            ));
        }
        _ => {}
    }
    check_names(&device_ids, "device_ids", MAX_LISTED_DEVICES)?;
    check_names(&metrics, "metrics", MAX_LISTED_METRICS)?;
    check_prefix(&device_prefix)?;
    Ok(SeriesSelection {
        device_ids,
        device_prefix,
        metrics,
    })
}

/// Which series a request selects, as page-token input.
pub fn selection_fingerprint(s: &SeriesSelection) -> Vec<u8> {
    let (n_ids, n_metrics) = (
        (s.device_ids.len() as u64).to_be_bytes(),
        (s.metrics.len() as u64).to_be_bytes(),
    );
    let mut parts: Vec<&[u8]> = vec![&n_ids, &n_metrics, s.device_prefix.as_bytes()];
    parts.extend(s.device_ids.iter().map(|d| d.as_bytes()));
    parts.extend(s.metrics.iter().map(|m| m.as_bytes()));
    fingerprint(&parts)
}

/// What identifies a time-ordered request's result set, for its page tokens.
pub fn range_query(filters: &[&[u8]], start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<u8> {
    let (start, end) = (
        start.timestamp_micros().to_be_bytes(),
        end.timestamp_micros().to_be_bytes(),
    );
    let mut parts = filters.to_vec();
    parts.push(&start);
    parts.push(&end);
    fingerprint(&parts)
}

/// A list of ids or names in a request: bounded, and no empty entries.
pub fn check_names(names: &[String], field: &str, max: usize) -> Result<(), Status> {
    if names.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} lists {} entries; at most {max} per call",
            names.len()
        )));
    }
    if names.iter().any(|n| n.is_empty() || n.contains('\0')) {
        return Err(Status::invalid_argument(format!(
            "{field} holds an empty name or one with a NUL character"
        )));
    }
    Ok(())
}

/// Cuts a page fetched with one row more than `limit`. When that row came,
/// there is a next page, starting after the page's last row as `position`
/// encodes it into a token; else the token is empty.
pub fn next_page<T>(rows: &mut Vec<T>, limit: u32, position: impl FnOnce(&T) -> String) -> String {
    if rows.len() <= limit as usize {
        return String::new();
    }
    rows.truncate(limit as usize);
    position(rows.last().expect("limit is at least 1"))
}

pub fn page_size(limit: u32) -> Result<u32, Status> {
    checked_page_size(limit, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
}

/// The page size a request's `limit` asks for: 0 means `default`, above
/// `max` is refused (shared by every paged call of the API).
pub fn checked_page_size(limit: u32, default: u32, max: u32) -> Result<u32, Status> {
    match limit {
        0 => Ok(default),
        n if n > max => Err(Status::invalid_argument(format!(
            "limit {n} is over the maximum page size of {max}; page with page_token instead"
        ))),
        n => Ok(n),
    }
}

/// Streams have no pages.
pub fn no_page_token(token: &str) -> Result<(), Status> {
    if token.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "page_token: streams send the whole range and take no page token; \
             to resume, start a new stream after the last time received",
        ))
    }
}

/// Refuses a query whose estimated scan is over the server's bound.
pub fn check_scan(estimate: f64, max: u64, advice: &str) -> Result<(), Status> {
    if estimate > max as f64 {
        return Err(Status::resource_exhausted(format!(
            "this query would read about {} rows, over the server's limit of {max} \
             (api.max_scan_rows); {advice}",
            estimate.round() as u64
        )));
    }
    Ok(())
}

/// The far ends used when the caller leaves `start` or `end` out; both are
/// within PostgreSQL's timestamptz range.
fn open_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap()
}
fn open_end() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap()
}

pub fn time_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), Status> {
    let start = start
        .map(|t| from_timestamp(t, "start"))
        .transpose()?
        .unwrap_or_else(open_start);
    let end = end
        .map(|t| from_timestamp(t, "end"))
        .transpose()?
        .unwrap_or_else(open_end);
    if end <= start {
        return Err(Status::invalid_argument(format!(
            "end ({end}) must be after start ({start}); the range is [start, end)"
        )));
    }
    Ok((start.max(open_start()), end.min(open_end())))
}

/// A range whose two ends are required.
pub fn closed_time_range(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), Status> {
    if start.is_none() {
        return Err(Status::invalid_argument("start is required"));
    }
    if end.is_none() {
        return Err(Status::invalid_argument("end is required"));
    }
    time_range(start, end)
}

fn from_timestamp(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, Status> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| Utc.timestamp_opt(t.seconds, nanos).single())
        .ok_or_else(|| Status::invalid_argument(format!("{field} is not a valid timestamp")))
}

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn db_error(e: sqlx::Error) -> Status {
    // SQLSTATE class 22 (data exception: a value PostgreSQL cannot take,
    // such as text with a NUL byte) is the request's fault, and trying
    // again would fail the same way.
    if let Some(db) = e.as_database_error()
        && db.code().is_some_and(|c| c.starts_with("22"))
    {
        warn!(error = %e, "query refused a value of the request");
        return Status::invalid_argument(format!(
            "the request holds a value the database refuses: {}",
            db.message()
        ));
    }
    error!(error = %e, "query failed");
    Status::unavailable("the database could not answer; try again")
}

/// A `device_id_prefix`: PostgreSQL text cannot hold NUL.
pub fn check_prefix(prefix: &str) -> Result<(), Status> {
    if prefix.contains('\0') {
        return Err(Status::invalid_argument(
            "device_id_prefix holds a NUL character",
        ));
    }
    Ok(())
}

/// Text PostgreSQL cannot store: it refuses a NUL character in `text`.
pub fn check_no_nul(value: &str, field: &str) -> Result<(), Status> {
    if value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} holds a NUL character"
        )));
    }
    Ok(())
}

/// A JSON document PostgreSQL cannot store: `jsonb` refuses `\u0000` in
/// any string or key.
pub fn check_json_no_nul(value: &serde_json::Value, field: &str) -> Result<(), Status> {
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(members) => {
                members.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
            }
            _ => false,
        }
    }
    if has_nul(value) {
        return Err(Status::invalid_argument(format!(
            "{field} holds \\u0000, which the database cannot store"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_ranges_are_checked() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(
            page_size(MAX_PAGE_SIZE + 1).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let t = |s| prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        };
        assert!(time_range(Some(&t(10)), Some(&t(5))).is_err());
        assert!(time_range(Some(&t(10)), Some(&t(10))).is_err());
        assert!(time_range(Some(&t(5)), Some(&t(10))).is_ok());
        assert!(closed_time_range(None, Some(&t(10))).is_err());
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(time_range(Some(&bad), None).is_err());
    }

    #[test]
    fn selections_need_ids_or_a_prefix_but_not_both() {
        let ids = vec!["a".to_owned()];
        assert!(selection(vec![], String::new(), vec![], true).is_err());
        assert!(selection(vec![], String::new(), vec![], false).is_ok());
        assert!(selection(ids.clone(), "p".into(), vec![], true).is_err());
        assert!(selection(ids, String::new(), vec![String::new()], true).is_err());
    }

    #[test]
    fn scans_over_the_bound_are_refused_with_advice() {
        let e = check_scan(2e6, 1_000_000, "narrow the range").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("narrow the range"), "{}", e.message());
        assert!(check_scan(1e6, 1_000_000, "").is_ok());
    }
}
