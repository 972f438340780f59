//! `ListDevices` and `ListMetrics`: what has points in a range.

use super::TelemetryService;
use super::request::{
    MAX_LISTED_DEVICES, check_names, check_prefix, closed_time_range, db_error, next_page,
    page_size, range_query,
};
use crate::api::cancel::QueryConnection;
use crate::api::page_token::Kind;
use sluice_ingest::query;
use sluice_proto::v1::{
    ListDevicesWithDataRequest, ListDevicesWithDataResponse, ListMetricsWithDataRequest,
    ListMetricsWithDataResponse, Series,
};
use tonic::Status;

impl TelemetryService {
    pub(super) async fn devices_with_data(
        &self,
        r: ListDevicesWithDataRequest,
    ) -> Result<ListDevicesWithDataResponse, Status> {
        let (start, end) = closed_time_range(r.start.as_ref(), r.end.as_ref())?;
        let limit = page_size(r.limit)?;
        check_prefix(&r.device_id_prefix)?;
        let fingerprint = range_query(&[r.device_id_prefix.as_bytes()], start, end);
        let after =
            self.pages
                .decode_after_name(Kind::DevicesWithData, &fingerprint, &r.page_token)?;
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let mut ids = conn
            .run(|c| {
                query::devices_with_data(
                    c,
                    &r.device_id_prefix,
                    start,
                    end,
                    after.as_deref(),
                    limit + 1,
                )
            })
            .await
            .map_err(db_error)?;
        let next_page_token = next_page(&mut ids, limit, |last| {
            self.pages
                .encode_after_name(Kind::DevicesWithData, &fingerprint, last)
        });
        Ok(ListDevicesWithDataResponse {
            device_ids: ids,
            next_page_token,
        })
    }

    pub(super) async fn series_with_data(
        &self,
        r: ListMetricsWithDataRequest,
    ) -> Result<ListMetricsWithDataResponse, Status> {
        let (start, end) = closed_time_range(r.start.as_ref(), r.end.as_ref())?;
        let limit = page_size(r.limit)?;
        check_names(&r.device_ids, "device_ids", MAX_LISTED_DEVICES)?;
        check_prefix(&r.device_id_prefix)?;
        if !r.device_ids.is_empty() && !r.device_id_prefix.is_empty() {
            return Err(Status::invalid_argument(
                "device_id_prefix cannot be combined with device_ids",
            ));
        }
        let n_ids = (r.device_ids.len() as u64).to_be_bytes();
        let mut filters: Vec<&[u8]> = vec![&n_ids, r.device_id_prefix.as_bytes()];
        filters.extend(r.device_ids.iter().map(|d| d.as_bytes()));
        let fingerprint = range_query(&filters, start, end);
        let after = self
            .pages
            .decode_after_series(Kind::Metrics, &fingerprint, &r.page_token)?;
        let after = after.as_ref().map(|(d, m)| (d.as_str(), m.as_str()));
        let mut conn = QueryConnection::acquire(&self.pool)
            .await
            .map_err(db_error)?;
        let mut rows = conn
            .run(|c| {
                query::series_with_data(
                    c,
                    &r.device_ids,
                    &r.device_id_prefix,
                    start,
                    end,
                    after,
                    limit + 1,
                )
            })
            .await
            .map_err(db_error)?;
        let next_page_token = next_page(&mut rows, limit, |last| {
            self.pages.encode_after_series(
                Kind::Metrics,
                &fingerprint,
                &last.device_id,
                &last.metric,
            )
        });
        Ok(ListMetricsWithDataResponse {
            series: rows
                .into_iter()
                .map(|s| Series {
                    device_id: s.device_id,
                    metric: s.metric,
                })
                .collect(),
            next_page_token,
        })
    }
}
