//! `QueryEvents` and `StreamEvents`.

use super::TelemetryService;
use super::request::{
    MAX_LISTED_DEVICES, check_names, check_scan, db_error, next_page, no_page_token, page_size,
    range_query, time_range, to_timestamp, with_single,
};
use crate::api::cancel::QueryConnection;
use crate::api::page_token::{Kind, PageToken};
use futures_util::StreamExt;
use sluice_ingest::query::{self, EventsQuery, StoredEvent};
use sluice_proto::v1::{Event, EventBatch, QueryEventsRequest, QueryEventsResponse};
use sluice_rules::TopicFilter;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Events per streamed message.
const STREAM_CHUNK: usize = 500;

pub fn event(e: StoredEvent) -> Event {
    Event {
        device_id: e.device_id.unwrap_or_default(),
        topic: e.topic,
        time: Some(to_timestamp(e.time)),
        payload: e.payload,
        rule: e.rule.unwrap_or_default(),
    }
}

/// The checked query, and its page-token fingerprint.
fn events_query(r: &QueryEventsRequest) -> Result<(EventsQuery, Vec<u8>), Status> {
    let device_ids = with_single(&r.device_id, r.device_ids.clone());
    check_names(&device_ids, "device_ids", MAX_LISTED_DEVICES)?;
    let (start, end) = time_range(r.start.as_ref(), r.end.as_ref())?;
    let topic_regex = if r.topic_filter.is_empty() {
        None
    } else {
        let filter = TopicFilter::new(&r.topic_filter)
            .map_err(|e| Status::invalid_argument(format!("topic_filter: {e}")))?;
        Some(query::topic_filter_regex(filter.as_str()))
    };
    let json_contains = if r.json_contains.is_empty() {
        None
    } else {
        Some(
            serde_json::from_str::<serde_json::Value>(&r.json_contains)
                .map_err(|e| Status::invalid_argument(format!("json_contains is not JSON: {e}")))?,
        )
    };
    let n_ids = (device_ids.len() as u64).to_be_bytes();
    let mut filters: Vec<&[u8]> = vec![
        &n_ids,
        r.topic_filter.as_bytes(),
        r.json_contains.as_bytes(),
    ];
    filters.extend(device_ids.iter().map(|d| d.as_bytes()));
    let fingerprint = range_query(&filters, start, end);
    Ok((
        EventsQuery {
            device_ids,
            topic_regex,
            json_contains,
            start,
            end,
            after: None,
            limit: None,
        },
        fingerprint,
    ))
}

impl TelemetryService {
    pub(super) async fn events_page(
        &self,
        r: QueryEventsRequest,
    ) -> Result<QueryEventsResponse, Status> {
        let limit = page_size(r.limit)?;
        let (mut q, fingerprint) = events_query(&r)?;
        q.after = self
            .pages
            .decode(Kind::Events, &fingerprint, &r.page_token)?
            .map(|t| (t.time, t.key));
        q.limit = Some(u64::from(limit) + 1);
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        // Without filters a page reads about one page of rows; a topic or
        // JSON filter may have to read the whole range to fill one.
        if q.topic_regex.is_some() || q.json_contains.is_some() {
            let estimate = conn
                .run(|c| query::estimate_event_rows(c, &q))
                .await
                .map_err(db_error)?;
            check_scan(
                estimate,
                self.limits.max_scan_rows,
                "narrow the range or name the devices",
            )?;
        }
        let mut rows = conn
            .run(|c| query::query_events(c, &q))
            .await
            .map_err(db_error)?;
        let next_page_token = next_page(&mut rows, limit, |last| {
            let position = PageToken {
                time: last.time,
                key: last.id,
            };
            self.pages.encode(Kind::Events, &fingerprint, &position)
        });
        Ok(QueryEventsResponse {
            events: rows.into_iter().map(event).collect(),
            next_page_token,
        })
    }

    pub(super) async fn events_stream(
        &self,
        r: QueryEventsRequest,
    ) -> Result<ReceiverStream<Result<EventBatch, Status>>, Status> {
        no_page_token(&r.page_token)?;
        let (mut q, _) = events_query(&r)?;
        q.limit = (r.limit > 0).then_some(u64::from(r.limit));
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let estimate = conn
            .run(|c| query::estimate_event_rows(c, &q))
            .await
            .map_err(db_error)?;
        check_scan(
            q.limit.map_or(estimate, |l| estimate.min(l as f64)),
            self.limits.max_scan_rows,
            "narrow the range, name the devices, or set a limit",
        )?;
        let (tx, rx) = mpsc::channel(2);
        let stop_tx = tx.clone();
        let producer = async move {
            {
                let mut rows = query::stream_events(conn.busy(), &q);
                let mut chunk = Vec::with_capacity(STREAM_CHUNK);
                while let Some(row) = rows.next().await {
                    match row {
                        Ok(e) => chunk.push(event(e)),
                        Err(e) => {
                            let _ = tx.send(Err(db_error(e))).await;
                            return;
                        }
                    }
                    if chunk.len() == STREAM_CHUNK {
                        let events =
                            std::mem::replace(&mut chunk, Vec::with_capacity(STREAM_CHUNK));
                        if tx.send(Ok(EventBatch { events })).await.is_err() {
                            return; // the client left: the query is cancelled
                        }
                    }
                }
                if !chunk.is_empty() {
                    let _ = tx.send(Ok(EventBatch { events: chunk })).await;
                }
            }
            conn.idle();
        };
        super::spawn_stream(&self.stopping, &stop_tx, producer);
        Ok(ReceiverStream::new(rx))
    }
}
