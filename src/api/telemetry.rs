//! `sluice.v1.Telemetry`: request validation and mapping to storage queries.

use super::page_token::{Kind, PageSigner, PageToken, fingerprint};
use chrono::{DateTime, TimeZone, Utc};
use sluice_ingest::query::{self, EventsQuery, LatestQuery, PointsQuery};
use sluice_proto::v1::telemetry_server::Telemetry;
use sluice_proto::v1::{
    Event, LatestPointsRequest, LatestPointsResponse, Order, Point, QueryEventsRequest,
    QueryEventsResponse, QueryPointsRequest, QueryPointsResponse,
};
use sluice_rules::TopicFilter;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use tracing::{error, instrument};

/// Rows per page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 1_000;
/// Larger requests are refused, so one call cannot pull the whole table.
pub const MAX_PAGE_SIZE: u32 = 10_000;
/// `LatestPoints` pages: one page holds 1,000 devices × 10 metrics.
pub const LATEST_PAGE_SIZE: u32 = 10_000;
/// Ids and metric names one `LatestPoints` call may list.
pub const MAX_LISTED_DEVICES: usize = 10_000;
pub const MAX_LISTED_METRICS: usize = 1_000;

pub struct TelemetryService {
    pool: PgPool,
    pages: PageSigner,
}

impl TelemetryService {
    pub fn new(pool: PgPool, pages: PageSigner) -> Self {
        Self { pool, pages }
    }
}

/// What identifies a time-ordered request's result set, for its page tokens.
fn range_query(filters: &[&[u8]], start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<u8> {
    let (start, end) = (
        start.timestamp_micros().to_be_bytes(),
        end.timestamp_micros().to_be_bytes(),
    );
    let mut parts = filters.to_vec();
    parts.push(&start);
    parts.push(&end);
    fingerprint(&parts)
}

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    #[instrument(level = "debug", skip_all, fields(
        device_id = %request.get_ref().device_id,
        devices = request.get_ref().device_ids.len(),
    ))]
    async fn query_points(
        &self,
        request: Request<QueryPointsRequest>,
    ) -> Result<Response<QueryPointsResponse>, Status> {
        let r = request.into_inner();
        let device_ids = with_single(&r.device_id, r.device_ids);
        let metrics = with_single(&r.metric, r.metrics);
        match (device_ids.is_empty(), r.device_id_prefix.is_empty()) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "device_id, device_ids or device_id_prefix is required",
                ));
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "device_id_prefix cannot be combined with device_id or device_ids",
                ));
            }
            _ => {}
        }
        check_names(&device_ids, "device_ids", MAX_LISTED_DEVICES)?;
        check_names(&metrics, "metrics", MAX_LISTED_METRICS)?;
        let descending = match Order::try_from(r.order) {
            Ok(Order::Ascending) => false,
            Ok(Order::Descending) => true,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "order {} is neither ORDER_ASCENDING nor ORDER_DESCENDING",
                    r.order
                )));
            }
        };
        let (start, end) = time_range(r.start.as_ref(), r.end.as_ref())?;
        let limit = page_size(r.limit)?;
        let selection = selection_fingerprint(&device_ids, &r.device_id_prefix, &metrics);
        let query = range_query(&[&selection, &[u8::from(descending)]], start, end);
        let after = self
            .pages
            .decode(Kind::Points, &query, &r.page_token)?
            .map(|t| i32::try_from(t.key).map(|k| (t.time, k)))
            .transpose()
            .map_err(|_| Status::invalid_argument("page_token holds no series id"))?;
        let q = PointsQuery {
            device_ids: &device_ids,
            device_prefix: &r.device_id_prefix,
            metrics: &metrics,
            start,
            end,
            descending,
            after,
            limit: limit + 1,
        };
        let mut rows = query::query_points(&self.pool, &q)
            .await
            .map_err(db_error)?;
        let next_page_token =
            next_token(&self.pages, &query, &mut rows, limit, Kind::Points, |p| {
                (p.time, i64::from(p.series_id))
            });
        let points = rows
            .into_iter()
            .map(|p| point(p.device_id, p.metric, p.time, p.value))
            .collect();
        Ok(Response::new(QueryPointsResponse {
            points,
            next_page_token,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(device_id = %request.get_ref().device_id))]
    async fn query_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> Result<Response<QueryEventsResponse>, Status> {
        let r = request.into_inner();
        let (start, end) = time_range(r.start.as_ref(), r.end.as_ref())?;
        let limit = page_size(r.limit)?;
        let topic_regex = if r.topic_filter.is_empty() {
            None
        } else {
            let filter = TopicFilter::new(&r.topic_filter)
                .map_err(|e| Status::invalid_argument(format!("topic_filter: {e}")))?;
            Some(query::topic_filter_regex(filter.as_str()))
        };
        let query = range_query(
            &[r.device_id.as_bytes(), r.topic_filter.as_bytes()],
            start,
            end,
        );
        let after = self
            .pages
            .decode(Kind::Events, &query, &r.page_token)?
            .map(|t| (t.time, t.key));
        let q = EventsQuery {
            device_id: (!r.device_id.is_empty()).then_some(r.device_id.as_str()),
            topic_regex: topic_regex.as_deref(),
            start,
            end,
            after,
            limit: limit + 1,
        };
        let mut rows = query::query_events(&self.pool, &q)
            .await
            .map_err(db_error)?;
        let next_page_token =
            next_token(&self.pages, &query, &mut rows, limit, Kind::Events, |e| {
                (e.time, e.id)
            });
        let events = rows
            .into_iter()
            .map(|e| Event {
                device_id: e.device_id.unwrap_or_default(),
                topic: e.topic,
                time: Some(to_timestamp(e.time)),
                payload: e.payload,
                rule: e.rule.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(QueryEventsResponse {
            events,
            next_page_token,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(devices = request.get_ref().device_ids.len()))]
    async fn latest_points(
        &self,
        request: Request<LatestPointsRequest>,
    ) -> Result<Response<LatestPointsResponse>, Status> {
        let r = request.into_inner();
        if !r.device_ids.is_empty() && !r.device_id_prefix.is_empty() {
            return Err(Status::invalid_argument(
                "device_ids and device_id_prefix: set one of them, not both",
            ));
        }
        check_names(&r.device_ids, "device_ids", MAX_LISTED_DEVICES)?;
        check_names(&r.metrics, "metrics", MAX_LISTED_METRICS)?;
        let limit = checked_page_size(r.limit, LATEST_PAGE_SIZE, LATEST_PAGE_SIZE)?;
        let query = selection_fingerprint(&r.device_ids, &r.device_id_prefix, &r.metrics);
        let after = self
            .pages
            .decode_after_name(Kind::Latest, &query, &r.page_token)?;
        let after = after
            .as_deref()
            .map(|a| {
                a.split_once('\0')
                    .ok_or_else(|| Status::invalid_argument("page_token"))
            })
            .transpose()?;
        let q = LatestQuery {
            device_ids: &r.device_ids,
            device_prefix: &r.device_id_prefix,
            metrics: &r.metrics,
            after,
            limit: limit + 1,
        };
        let mut rows = query::latest_points(&self.pool, &q)
            .await
            .map_err(db_error)?;
        let next_page_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            let last = rows.last().expect("limit is at least 1");
            let position = format!("{}\0{}", last.device_id, last.metric);
            self.pages
                .encode_after_name(Kind::Latest, &query, &position)
        } else {
            String::new()
        };
        let points = rows
            .into_iter()
            .map(|p| point(p.device_id, p.metric, p.time, p.value))
            .collect();
        Ok(Response::new(LatestPointsResponse {
            points,
            next_page_token,
        }))
    }
}

fn point(device_id: String, metric: String, time: DateTime<Utc>, value: f64) -> Point {
    Point {
        device_id,
        metric,
        time: Some(to_timestamp(time)),
        value,
    }
}

/// A request's single field (`device_id`, `metric`) joined to its list
/// twin, without repeating it.
fn with_single(single: &str, mut list: Vec<String>) -> Vec<String> {
    if !single.is_empty() && !list.iter().any(|x| x == single) {
        list.insert(0, single.to_owned());
    }
    list
}

/// Which series a request selects, as page-token input.
fn selection_fingerprint(device_ids: &[String], prefix: &str, metrics: &[String]) -> Vec<u8> {
    let (n_ids, n_metrics) = (
        (device_ids.len() as u64).to_be_bytes(),
        (metrics.len() as u64).to_be_bytes(),
    );
    let mut parts: Vec<&[u8]> = vec![&n_ids, &n_metrics, prefix.as_bytes()];
    parts.extend(device_ids.iter().map(|d| d.as_bytes()));
    parts.extend(metrics.iter().map(|m| m.as_bytes()));
    fingerprint(&parts)
}

/// A list of ids or names in a request: bounded, and no empty entries.
fn check_names(names: &[String], field: &str, max: usize) -> Result<(), Status> {
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

/// Queries ask for one row more than the page; if it came, there is a next
/// page and it starts after the page's last row.
fn next_token<T>(
    pages: &PageSigner,
    query: &[u8],
    rows: &mut Vec<T>,
    limit: u32,
    kind: Kind,
    key: impl Fn(&T) -> (DateTime<Utc>, i64),
) -> String {
    if rows.len() <= limit as usize {
        return String::new();
    }
    rows.truncate(limit as usize);
    let (time, key) = key(rows.last().expect("limit is at least 1"));
    pages.encode(kind, query, &PageToken { time, key })
}

fn page_size(limit: u32) -> Result<u32, Status> {
    checked_page_size(limit, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
}

/// The page size a request's `limit` asks for: 0 means `default`, above
/// `max` is refused (shared by every paged call of the API).
pub(super) fn checked_page_size(limit: u32, default: u32, max: u32) -> Result<u32, Status> {
    match limit {
        0 => Ok(default),
        n if n > max => Err(Status::invalid_argument(format!(
            "limit {n} is over the maximum page size of {max}; page with page_token instead"
        ))),
        n => Ok(n),
    }
}

/// The far ends used when the caller leaves `start` or `end` out; both are
/// within PostgreSQL's timestamptz range.
fn open_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap()
}
fn open_end() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 1, 1, 0, 0, 0).unwrap()
}

fn time_range(
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

fn from_timestamp(t: &prost_types::Timestamp, field: &str) -> Result<DateTime<Utc>, Status> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|nanos| Utc.timestamp_opt(t.seconds, nanos).single())
        .ok_or_else(|| Status::invalid_argument(format!("{field} is not a valid timestamp")))
}

pub(super) fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn db_error(e: sqlx::Error) -> Status {
    error!(error = %e, "query failed");
    Status::unavailable("the database could not answer; try again")
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
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(time_range(Some(&bad), None).is_err());
    }
}
