//! `sluice.v1.Admin` device calls against a running server.

mod support;

use sluice_ingest::devices::verify_secret;
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::{
    CreateDeviceRequest, DeleteDeviceRequest, GetDeviceRequest, ListDevicesRequest,
    RotateDeviceSecretRequest, UpdateDeviceRequest,
};
use support::{Sluice, stored_secret_hash};
use tonic::Code;

fn err<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let status = r.expect_err("expected an error");
    (status.code(), status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_over_grpc() {
    let sluice = Sluice::start(|_| {}).await;
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{}", sluice.grpc_port))
        .await
        .unwrap();
    let created = admin
        .create_device(CreateDeviceRequest {
            id: "pump-1".into(),
            metadata_json: r#"{"site":"north"}"#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let device = created.device.unwrap();
    assert_eq!(
        (device.id.as_str(), device.enabled, device.online),
        ("pump-1", true, false)
    );
    assert_eq!(device.metadata_json, r#"{"site":"north"}"#);
    assert!(verify_secret(
        &created.secret,
        &stored_secret_hash(&sluice.db, "pump-1").await
    ));

    for id in ["pump-2", "pump-3", "pump-4", "valve-1"] {
        admin
            .create_device(CreateDeviceRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Paging by 2 over the `pump-` prefix.
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_devices(ListDevicesRequest {
                id_prefix: "pump-".into(),
                limit: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.devices.len() <= 2);
        ids.extend(page.devices.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids, ["pump-1", "pump-2", "pump-3", "pump-4"]);

    let updated = admin
        .update_device(UpdateDeviceRequest {
            id: "pump-2".into(),
            enabled: Some(false),
            metadata_json: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!updated.enabled);
    assert_eq!(
        updated.metadata_json, "{}",
        "unset fields stay as they were"
    );
    let got = admin
        .get_device(GetDeviceRequest {
            id: "pump-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, updated);

    let old = created.secret;
    let rotated = admin
        .rotate_device_secret(RotateDeviceSecretRequest {
            id: "pump-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let hash = stored_secret_hash(&sluice.db, "pump-1").await;
    assert!(verify_secret(&rotated.secret, &hash));
    assert!(!verify_secret(&old, &hash));

    admin
        .delete_device(DeleteDeviceRequest {
            id: "valve-1".into(),
        })
        .await
        .unwrap();

    // Errors name what is wrong.
    let (c, m) = err(admin
        .create_device(CreateDeviceRequest {
            id: "pump-1".into(),
            ..Default::default()
        })
        .await);
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let (c, m) = err(admin
        .get_device(GetDeviceRequest {
            id: "valve-1".into(),
        })
        .await);
    assert_eq!(c, Code::NotFound, "{m}");
    let (c, m) = err(admin
        .create_device(CreateDeviceRequest {
            id: "a/b".into(),
            ..Default::default()
        })
        .await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.starts_with("id:"), "{m}");
    let (c, m) = err(admin
        .update_device(UpdateDeviceRequest {
            id: "pump-3".into(),
            enabled: None,
            metadata_json: Some("[1]".into()),
        })
        .await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("metadata_json"), "{m}");
    let (c, m) = err(admin
        .list_devices(ListDevicesRequest {
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("page_token"), "{m}");
    sluice.stop();
}
