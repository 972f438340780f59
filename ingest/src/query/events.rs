//! Events: paged and streamed, filtered by device, topic and JSON content.

use chrono::{DateTime, Utc};
use futures_core::stream::BoxStream;
use sqlx::PgConnection;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredEvent {
    /// With `time`, the page key.
    pub id: i64,
    pub device_id: Option<String>,
    pub topic: String,
    pub time: DateTime<Utc>,
    pub rule: Option<String>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct EventsQuery {
    /// Empty: every device, and events without one.
    pub device_ids: Vec<String>,
    /// A POSIX regular expression the topic must match (see
    /// [`super::topic_filter_regex`]).
    pub topic_regex: Option<String>,
    /// A JSON document the event body must contain (jsonb `@>`).
    pub json_contains: Option<serde_json::Value>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub after: Option<(DateTime<Utc>, i64)>,
    /// None: every matching event (streams only).
    pub limit: Option<u64>,
}

// `sluice_jsonb` (migrations/0010) reads a body as jsonb, or NULL when it
// is not JSON: unmatched messages are stored as received, so a body may be
// anything, and a cast that fails would fail the whole query.
const EVENTS: &str = "SELECT id, device_id, topic, time, rule, payload FROM events \
     WHERE (cardinality($1::text[]) = 0 OR device_id = ANY($1)) \
       AND ($2::text IS NULL OR topic ~ $2) \
       AND time >= $3 AND time < $4 \
       AND ($5::timestamptz IS NULL OR (time, id) > ($5, $6::bigint)) \
       AND ($7::jsonb IS NULL OR sluice_jsonb(payload) @> $7) \
     ORDER BY time, id \
     LIMIT $8";

fn bound(
    q: &EventsQuery,
) -> sqlx::query::QueryAs<'_, sqlx::Postgres, StoredEvent, sqlx::postgres::PgArguments> {
    let (after_time, after_id) = q.after.unzip();
    sqlx::query_as(EVENTS)
        .bind(&q.device_ids)
        .bind(q.topic_regex.as_deref())
        .bind(q.start)
        .bind(q.end)
        .bind(after_time)
        .bind(after_id)
        .bind(q.json_contains.as_ref().map(sqlx::types::Json))
        .bind(q.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX)))
        .persistent(false)
}

pub async fn query_events(
    conn: &mut PgConnection,
    q: &EventsQuery,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    bound(q).fetch_all(conn).await
}

/// The matching events in time order, as PostgreSQL sends them.
pub fn stream_events<'c>(
    conn: &'c mut PgConnection,
    q: &'c EventsQuery,
) -> BoxStream<'c, Result<StoredEvent, sqlx::Error>> {
    bound(q).fetch(conn)
}
