//! `sluice.v1.Admin`: the device registry over gRPC, with the same naming,
//! errors and paging as `Telemetry`.

use super::page_token::{Kind, PageSigner, fingerprint};
use super::telemetry::{
    check_json_no_nul, check_no_nul, checked_page_size, db_error, next_page, to_timestamp,
};
use sluice_ingest::devices::{self, DeviceError};
use sluice_proto::v1::admin_server::Admin;
use sluice_proto::v1::{
    CreateDeviceRequest, CreateDeviceResponse, DeleteDeviceRequest, DeleteDeviceResponse,
    DeleteRuleRequest, DeleteRuleResponse, DeployRuleRequest, Device, DisableRuleRequest,
    EnableRuleRequest, GetDeviceRequest, GetRuleRequest, ListDevicesRequest, ListDevicesResponse,
    ListRulesRequest, ListRulesResponse, RotateDeviceSecretRequest, RotateDeviceSecretResponse,
    Rule, UpdateDeviceRequest,
};
use sluice_rules::RuleCatalog;
use sqlx::PgPool;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{error, info, instrument};

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1_000;

pub struct AdminService {
    pool: PgPool,
    catalog: Arc<RuleCatalog>,
    pages: PageSigner,
    /// Held by the calls that change rules: two concurrent deploys of one
    /// name must reach the database and the catalog in the same order.
    rule_changes: tokio::sync::Mutex<()>,
}

impl AdminService {
    pub fn new(pool: PgPool, catalog: Arc<RuleCatalog>, pages: PageSigner) -> Self {
        Self {
            pool,
            catalog,
            pages,
            rule_changes: tokio::sync::Mutex::new(()),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[instrument(level = "debug", skip_all, fields(id = %request.get_ref().id))]
    async fn create_device(
        &self,
        request: Request<CreateDeviceRequest>,
    ) -> Result<Response<CreateDeviceResponse>, Status> {
        let r = request.into_inner();
        let metadata = parse_metadata(&r.metadata_json)?.unwrap_or_else(|| serde_json::json!({}));
        let (device, secret) = devices::create(&self.pool, &r.id, metadata)
            .await
            .map_err(status)?;
        info!(id = %device.id, "device created over gRPC");
        Ok(Response::new(CreateDeviceResponse {
            device: Some(to_proto(device)),
            secret,
        }))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let r = request.into_inner();
        let limit = checked_page_size(r.limit, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        check_no_nul(&r.id_prefix, "id_prefix")?;
        let query = fingerprint(&[r.id_prefix.as_bytes()]);
        let after = self
            .pages
            .decode_after_name(Kind::Devices, &query, &r.page_token)?;
        let mut rows = devices::list_page(&self.pool, &r.id_prefix, after.as_deref(), limit + 1)
            .await
            .map_err(status)?;
        let next_page_token = next_page(&mut rows, limit, |last| {
            self.pages
                .encode_after_name(Kind::Devices, &query, &last.id)
        });
        Ok(Response::new(ListDevicesResponse {
            devices: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn get_device(
        &self,
        request: Request<GetDeviceRequest>,
    ) -> Result<Response<Device>, Status> {
        let id = request.into_inner().id;
        check_no_nul(&id, "id")?;
        Ok(Response::new(to_proto(
            devices::get(&self.pool, &id).await.map_err(status)?,
        )))
    }

    async fn update_device(
        &self,
        request: Request<UpdateDeviceRequest>,
    ) -> Result<Response<Device>, Status> {
        let r = request.into_inner();
        check_no_nul(&r.id, "id")?;
        let metadata = match &r.metadata_json {
            Some(json) => parse_metadata(json)?,
            None => None,
        };
        let device = devices::update(&self.pool, &r.id, r.enabled, metadata)
            .await
            .map_err(status)?;
        Ok(Response::new(to_proto(device)))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        let id = request.into_inner().id;
        check_no_nul(&id, "id")?;
        devices::delete(&self.pool, &id).await.map_err(status)?;
        info!(%id, "device deleted over gRPC");
        Ok(Response::new(DeleteDeviceResponse {}))
    }

    async fn rotate_device_secret(
        &self,
        request: Request<RotateDeviceSecretRequest>,
    ) -> Result<Response<RotateDeviceSecretResponse>, Status> {
        let id = request.into_inner().id;
        check_no_nul(&id, "id")?;
        let secret = devices::rotate_secret(&self.pool, &id)
            .await
            .map_err(status)?;
        info!(%id, "device secret rotated over gRPC");
        Ok(Response::new(RotateDeviceSecretResponse { secret }))
    }

    #[instrument(level = "debug", skip_all, fields(name = %request.get_ref().name))]
    async fn deploy_rule(
        &self,
        request: Request<DeployRuleRequest>,
    ) -> Result<Response<Rule>, Status> {
        let r = request.into_inner();
        let _serialized = self.rule_changes.lock().await;
        Ok(Response::new(
            super::rules::deploy(&self.pool, &self.catalog, r).await?,
        ))
    }

    async fn list_rules(
        &self,
        request: Request<ListRulesRequest>,
    ) -> Result<Response<ListRulesResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            super::rules::list(&self.pool, &self.catalog, &self.pages, r).await?,
        ))
    }

    async fn get_rule(&self, request: Request<GetRuleRequest>) -> Result<Response<Rule>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(
            super::rules::describe(&self.pool, &self.catalog, &name).await?,
        ))
    }

    async fn enable_rule(
        &self,
        request: Request<EnableRuleRequest>,
    ) -> Result<Response<Rule>, Status> {
        let name = request.into_inner().name;
        let _serialized = self.rule_changes.lock().await;
        Ok(Response::new(
            super::rules::set_enabled(&self.pool, &self.catalog, &name, true).await?,
        ))
    }

    async fn disable_rule(
        &self,
        request: Request<DisableRuleRequest>,
    ) -> Result<Response<Rule>, Status> {
        let name = request.into_inner().name;
        let _serialized = self.rule_changes.lock().await;
        Ok(Response::new(
            super::rules::set_enabled(&self.pool, &self.catalog, &name, false).await?,
        ))
    }

    async fn delete_rule(
        &self,
        request: Request<DeleteRuleRequest>,
    ) -> Result<Response<DeleteRuleResponse>, Status> {
        let name = request.into_inner().name;
        let _serialized = self.rule_changes.lock().await;
        super::rules::delete(&self.pool, &self.catalog, &name).await?;
        Ok(Response::new(DeleteRuleResponse {}))
    }
}

fn parse_metadata(json: &str) -> Result<Option<serde_json::Value>, Status> {
    if json.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Status::invalid_argument(format!("metadata_json is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Status::invalid_argument(
            "metadata_json must be a JSON object",
        ));
    }
    check_json_no_nul(&value, "metadata_json")?;
    Ok(Some(value))
}

fn to_proto(d: devices::Device) -> Device {
    Device {
        id: d.id,
        enabled: d.enabled,
        created_at: Some(to_timestamp(d.created_at)),
        last_connect_at: d.last_connect_at.map(to_timestamp),
        last_disconnect_at: d.last_disconnect_at.map(to_timestamp),
        online: d.online,
        metadata_json: d.metadata.to_string(),
    }
}

fn status(e: DeviceError) -> Status {
    match e {
        DeviceError::Exists(_) => Status::already_exists(e.to_string()),
        DeviceError::NotFound(_) => Status::not_found(e.to_string()),
        DeviceError::InvalidId(_) => Status::invalid_argument(format!("id: {e}")),
        DeviceError::InvalidMetadata => Status::invalid_argument(format!("metadata_json: {e}")),
        DeviceError::Hash(_) => {
            error!(error = %e, "hashing a device secret failed");
            Status::internal("could not hash the secret")
        }
        // NUL is refused before the query; any other value PostgreSQL
        // refuses (SQLSTATE class 22) is the request's fault too, so
        // INVALID_ARGUMENT rather than "try again".
        DeviceError::Database(db) => db_error(db),
    }
}
