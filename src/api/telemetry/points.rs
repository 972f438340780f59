//! `QueryPoints`, `StreamPoints` and `LatestPoints`.

use super::TelemetryService;
use super::request::{
    MAX_SELECTED_SERIES, check_scan, checked_page_size, db_error, next_page, no_page_token,
    page_size, range_query, selection, selection_fingerprint, time_range, to_timestamp,
    with_single,
};
use crate::api::cancel::QueryConnection;
use crate::api::page_token::{Kind, PageToken};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sluice_ingest::query::{self, LatestQuery, PointsQuery, SelectedSeries, SeriesSelection};
use sluice_proto::v1::{
    LatestPointsRequest, LatestPointsResponse, Order, Point, PointBatch, QueryPointsRequest,
    QueryPointsResponse,
};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// `LatestPoints` pages: one page holds 1,000 devices × 10 metrics.
pub const LATEST_PAGE_SIZE: u32 = 10_000;
/// Points per streamed message: large enough that framing costs little,
/// small enough that a message is a few tens of kilobytes.
const STREAM_CHUNK: usize = 1_000;
/// Messages a stream may have ready ahead of the client; with HTTP/2 flow
/// control this bounds a stream's memory, and a client that stops reading
/// stops the query (PostgreSQL blocks on its socket).
const STREAM_AHEAD: usize = 2;

pub fn point(device_id: String, metric: String, time: DateTime<Utc>, value: f64) -> Point {
    Point {
        device_id,
        metric,
        time: Some(to_timestamp(time)),
        value,
    }
}

/// What a QueryPoints or StreamPoints request selects.
struct PointsRequest {
    selection: SeriesSelection,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    descending: bool,
}

fn points_request(r: QueryPointsRequest) -> Result<PointsRequest, Status> {
    let selection = selection(
        with_single(&r.device_id, r.device_ids),
        r.device_id_prefix,
        with_single(&r.metric, r.metrics),
        true,
    )?;
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
    Ok(PointsRequest {
        selection,
        start,
        end,
        descending,
    })
}

/// The selected series, refusing selections too broad to list.
pub(super) async fn series_of(
    conn: &mut QueryConnection,
    selection: &SeriesSelection,
) -> Result<Vec<SelectedSeries>, Status> {
    let series = conn
        .run(|c| query::selected_series(c, selection, MAX_SELECTED_SERIES + 1))
        .await
        .map_err(db_error)?;
    if series.len() > MAX_SELECTED_SERIES as usize {
        return Err(Status::resource_exhausted(format!(
            "the selection matches more than {MAX_SELECTED_SERIES} series; \
             name devices or metrics, or use a longer device_id_prefix"
        )));
    }
    Ok(series)
}

impl TelemetryService {
    pub(super) async fn points_page(
        &self,
        r: QueryPointsRequest,
    ) -> Result<QueryPointsResponse, Status> {
        let (page_token, limit) = (r.page_token.clone(), page_size(r.limit)?);
        let req = points_request(r)?;
        let query = range_query(
            &[
                &selection_fingerprint(&req.selection),
                &[u8::from(req.descending)],
            ],
            req.start,
            req.end,
        );
        let after = self
            .pages
            .decode(Kind::Points, &query, &page_token)?
            .map(|t| i32::try_from(t.key).map(|k| (t.time, k)))
            .transpose()
            .map_err(|_| Status::invalid_argument("page_token holds no series id"))?;
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        // Each series is read by its own index scan of at most one page.
        let series = series_of(&mut conn, &req.selection).await?;
        check_scan(
            series.len() as f64 * f64::from(limit + 1),
            self.limits.max_scan_rows,
            "select fewer series or ask for smaller pages",
        )?;
        let q = PointsQuery {
            selection: &req.selection,
            start: req.start,
            end: req.end,
            descending: req.descending,
            after,
            limit: limit + 1,
        };
        let mut rows = conn
            .run(|c| query::query_points(c, &q))
            .await
            .map_err(db_error)?;
        let next_page_token = next_page(&mut rows, limit, |last| {
            let position = PageToken {
                time: last.time,
                key: i64::from(last.series_id),
            };
            self.pages.encode(Kind::Points, &query, &position)
        });
        let points = rows
            .into_iter()
            .map(|p| point(p.device_id, p.metric, p.time, p.value))
            .collect();
        Ok(QueryPointsResponse {
            points,
            next_page_token,
        })
    }

    pub(super) async fn points_stream(
        &self,
        r: QueryPointsRequest,
    ) -> Result<ReceiverStream<Result<PointBatch, Status>>, Status> {
        no_page_token(&r.page_token)?;
        let cap = (r.limit > 0).then_some(u64::from(r.limit));
        let req = points_request(r)?;
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let series = series_of(&mut conn, &req.selection).await?;
        let ids: Vec<i32> = series.iter().map(|s| s.id).collect();
        let estimate = conn
            .run(|c| query::estimate_point_rows(c, &ids, req.start, req.end))
            .await
            .map_err(db_error)?;
        check_scan(
            cap.map_or(estimate, |c| estimate.min(c as f64)),
            self.limits.max_scan_rows,
            "narrow the range, select fewer series, set a limit, or use AggregatePoints",
        )?;
        let by_id: HashMap<i32, SelectedSeries> = series.into_iter().map(|s| (s.id, s)).collect();
        let (tx, rx) = mpsc::channel(STREAM_AHEAD);
        let stop_tx = tx.clone();
        let producer = async move {
            {
                let mut rows =
                    query::stream_points(conn.busy(), ids, req.start, req.end, req.descending, cap);
                let mut chunk = Vec::with_capacity(STREAM_CHUNK);
                while let Some(row) = rows.next().await {
                    let p = match row {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(db_error(e))).await;
                            return;
                        }
                    };
                    let Some(s) = by_id.get(&p.series_id) else {
                        continue; // cannot happen: the query only reads these ids
                    };
                    chunk.push(point(
                        s.device_id.clone(),
                        s.metric.clone(),
                        p.time,
                        p.value,
                    ));
                    if chunk.len() == STREAM_CHUNK {
                        let points =
                            std::mem::replace(&mut chunk, Vec::with_capacity(STREAM_CHUNK));
                        if tx.send(Ok(PointBatch { points })).await.is_err() {
                            return; // the client left: dropping the connection cancels the query
                        }
                    }
                }
                if !chunk.is_empty() {
                    let _ = tx.send(Ok(PointBatch { points: chunk })).await;
                }
            }
            conn.idle();
        };
        super::spawn_stream(&self.stopping, &stop_tx, producer);
        Ok(ReceiverStream::new(rx))
    }

    pub(super) async fn latest(
        &self,
        r: LatestPointsRequest,
    ) -> Result<LatestPointsResponse, Status> {
        let limit = checked_page_size(r.limit, LATEST_PAGE_SIZE, LATEST_PAGE_SIZE)?;
        let selection = selection(r.device_ids, r.device_id_prefix, r.metrics, false)?;
        let query = selection_fingerprint(&selection);
        let after = self
            .pages
            .decode_after_series(Kind::Latest, &query, &r.page_token)?;
        let q = LatestQuery {
            selection: &selection,
            after: after.as_ref().map(|(d, m)| (d.as_str(), m.as_str())),
            limit: limit + 1,
        };
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let mut rows = conn
            .run(|c| query::latest_points(c, &q))
            .await
            .map_err(db_error)?;
        let next_page_token = next_page(&mut rows, limit, |last| {
            self.pages
                .encode_after_series(Kind::Latest, &query, &last.device_id, &last.metric)
        });
        let points = rows
            .into_iter()
            .map(|p| point(p.device_id, p.metric, p.time, p.value))
            .collect();
        Ok(LatestPointsResponse {
            points,
            next_page_token,
        })
    }
}
