//! `sluice.v1.Telemetry`: the read side of Sluice. Each call lives in its
//! own module; this one holds the service's shared state and maps the
//! generated trait onto them.

mod aggregate;
mod catalog;
mod events;
mod points;
mod request;
mod subscribe;

pub use request::{
    check_json_no_nul, check_no_nul, checked_page_size, db_error, next_page, to_timestamp,
};

use super::page_token::PageSigner;
use sluice_ingest::WriterConfig;
use sluice_ingest::live::LiveFeed;
use sluice_proto::v1::telemetry_server::Telemetry;
use sluice_proto::v1::{
    AggregatePointsRequest, AggregatePointsResponse, EventBatch, LatestPointsRequest,
    LatestPointsResponse, ListDevicesWithDataRequest, ListDevicesWithDataResponse,
    ListMetricsWithDataRequest, ListMetricsWithDataResponse, PointBatch, QueryEventsRequest,
    QueryEventsResponse, QueryPointsRequest, QueryPointsResponse, SubscribeRequest,
    SubscribeResponse,
};
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, instrument};

/// Bounds on what one call may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_scan_rows: u64,
    pub max_subscribers: usize,
}

pub struct TelemetryService {
    pool: PgPool,
    pages: PageSigner,
    limits: Limits,
    /// Committed batches, for `Subscribe`.
    live: LiveFeed,
    subscribers: Arc<Semaphore>,
    /// Which rollups the writer keeps, for `AggregatePoints`.
    writer: WriterConfig,
    /// Turns true when the server shuts down: streams end then, rather
    /// than hold the graceful shutdown open (a subscription never ends on
    /// its own).
    stopping: watch::Receiver<bool>,
}

impl TelemetryService {
    pub fn new(
        pool: PgPool,
        pages: PageSigner,
        limits: Limits,
        live: LiveFeed,
        writer: WriterConfig,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            stopping,
            pool,
            pages,
            subscribers: Arc::new(Semaphore::new(limits.max_subscribers)),
            limits,
            live,
            writer,
        }
    }
}

/// Runs a stream's producer until it finishes or the server shuts down;
/// then the client is told to come back (UNAVAILABLE), when its queue has
/// room for that.
fn spawn_stream<T: Send + 'static>(
    stopping: &watch::Receiver<bool>,
    tx: &mpsc::Sender<Result<T, Status>>,
    producer: impl Future<Output = ()> + Send + 'static,
) {
    let (mut stopping, tx) = (stopping.clone(), tx.clone());
    let run = async move {
        tokio::select! {
            () = producer => {}
            _ = stopping.wait_for(|stop| *stop) => {
                let _ = tx.try_send(Err(Status::unavailable(
                    "the server is shutting down; start a new call to resume",
                )));
            }
        }
    };
    tokio::spawn(run.in_current_span());
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
        self.points_page(request.into_inner())
            .await
            .map(Response::new)
    }

    type StreamPointsStream = ReceiverStream<Result<PointBatch, Status>>;

    #[instrument(level = "debug", skip_all, fields(devices = request.get_ref().device_ids.len()))]
    async fn stream_points(
        &self,
        request: Request<QueryPointsRequest>,
    ) -> Result<Response<Self::StreamPointsStream>, Status> {
        self.points_stream(request.into_inner())
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all, fields(devices = request.get_ref().device_ids.len()))]
    async fn aggregate_points(
        &self,
        request: Request<AggregatePointsRequest>,
    ) -> Result<Response<AggregatePointsResponse>, Status> {
        self.aggregate(request.into_inner())
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all, fields(device_id = %request.get_ref().device_id))]
    async fn query_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> Result<Response<QueryEventsResponse>, Status> {
        self.events_page(request.into_inner())
            .await
            .map(Response::new)
    }

    type StreamEventsStream = ReceiverStream<Result<EventBatch, Status>>;

    #[instrument(level = "debug", skip_all, fields(device_id = %request.get_ref().device_id))]
    async fn stream_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        self.events_stream(request.into_inner())
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all, fields(devices = request.get_ref().device_ids.len()))]
    async fn latest_points(
        &self,
        request: Request<LatestPointsRequest>,
    ) -> Result<Response<LatestPointsResponse>, Status> {
        self.latest(request.into_inner()).await.map(Response::new)
    }

    type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

    #[instrument(level = "debug", skip_all, fields(devices = request.get_ref().device_ids.len()))]
    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.subscribe_stream(request.into_inner())
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_devices(
        &self,
        request: Request<ListDevicesWithDataRequest>,
    ) -> Result<Response<ListDevicesWithDataResponse>, Status> {
        self.devices_with_data(request.into_inner())
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_metrics(
        &self,
        request: Request<ListMetricsWithDataRequest>,
    ) -> Result<Response<ListMetricsWithDataResponse>, Status> {
        self.series_with_data(request.into_inner())
            .await
            .map(Response::new)
    }
}
