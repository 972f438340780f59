//! What a query would scan, as PostgreSQL's planner estimates it: cheap
//! (planning only, nothing is read), and close enough to refuse a call
//! that would read tens of millions of rows before it starts.
//!
//! The statements are not kept prepared (`persistent(false)`), so each is
//! planned for its own parameter values rather than with a generic plan
//! that ignores them.

use super::events::EventsQuery;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Rows the planner expects `EXPLAIN (FORMAT JSON)` output's top node to return.
fn plan_rows(plan: &serde_json::Value) -> f64 {
    plan.pointer("/0/Plan/Plan Rows")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0)
}

/// Points of these series in [start, end).
pub async fn estimate_point_rows(
    conn: &mut PgConnection,
    series_ids: &[i32],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<f64, sqlx::Error> {
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM points \
         WHERE series_id = ANY($1) AND time >= $2 AND time < $3",
    )
    .bind(series_ids)
    .bind(start)
    .bind(end)
    .persistent(false)
    .fetch_one(conn)
    .await?;
    Ok(plan_rows(&plan))
}

/// Events a query would look at (before its JSON filter, which the planner
/// cannot estimate and which does not make the scan any shorter).
pub async fn estimate_event_rows(
    conn: &mut PgConnection,
    q: &EventsQuery,
) -> Result<f64, sqlx::Error> {
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM events \
         WHERE (cardinality($1::text[]) = 0 OR device_id = ANY($1)) \
           AND ($2::text IS NULL OR topic ~ $2) \
           AND time >= $3 AND time < $4",
    )
    .bind(&q.device_ids)
    .bind(q.topic_regex.as_deref())
    .bind(q.start)
    .bind(q.end)
    .persistent(false)
    .fetch_one(conn)
    .await?;
    Ok(plan_rows(&plan))
}
