//! The series dictionary cache: (device, metric) → series id.

use crate::pgcopy::sanitize_text;
use crate::record::PointRecord;
use foldhash::HashMap;
use sqlx::PgConnection;
use std::sync::Arc;
use tracing::warn;

/// Maps (device, metric) to the series id, creating series on first sight.
///
/// Owned by the single writer task, so a plain map suffices. Bounded: past
/// `MAX_ENTRIES` it is emptied and refills from the database on demand.
#[derive(Default)]
pub(super) struct SeriesCache {
    ids: HashMap<Arc<str>, HashMap<String, i32>>,
    entries: usize,
}

impl SeriesCache {
    const MAX_ENTRIES: usize = 1_000_000;

    pub(super) fn get(&self, device: &str, metric: &str) -> Option<i32> {
        self.ids.get(device)?.get(metric).copied()
    }

    pub(super) async fn resolve(
        &mut self,
        conn: &mut PgConnection,
        points: &[PointRecord],
    ) -> Result<(), sqlx::Error> {
        let mut devices: Vec<String> = Vec::new();
        let mut metrics: Vec<String> = Vec::new();
        let mut seen: foldhash::HashSet<(&str, &str)> = Default::default();
        for p in points {
            if self.get(&p.device_id, &p.metric).is_none() && seen.insert((&p.device_id, &p.metric))
            {
                devices.push(sanitize_text(&p.device_id).into_owned());
                metrics.push(sanitize_text(&p.metric).into_owned());
            }
        }
        if devices.is_empty() {
            return Ok(());
        }
        if self.entries + devices.len() > Self::MAX_ENTRIES {
            warn!(entries = self.entries, "series cache full; starting afresh");
            self.ids.clear();
            self.entries = 0;
        }
        let rows = create_series(conn, &devices, &metrics).await?;
        for (id, device, metric) in rows {
            self.ids
                .entry(Arc::from(device))
                .or_default()
                .insert(metric, id);
            self.entries += 1;
        }
        // Names that contained NUL were stored sanitized; map the originals too.
        for p in points {
            if self.get(&p.device_id, &p.metric).is_none()
                && let Some(id) = self.get(&sanitize_text(&p.device_id), &sanitize_text(&p.metric))
            {
                self.ids
                    .entry(p.device_id.clone())
                    .or_default()
                    .insert(p.metric.clone(), id);
                self.entries += 1;
            }
        }
        Ok(())
    }
}

/// Makes sure the series `(devices[i], metrics[i])` exist and returns their
/// `(id, device, metric)` rows (in no particular order). Names must be free
/// of NUL (see `sanitize_text`).
pub async fn create_series(
    conn: &mut PgConnection,
    devices: &[String],
    metrics: &[String],
) -> Result<Vec<(i32, String, String)>, sqlx::Error> {
    sqlx::query(
        "INSERT INTO series (device_id, metric) \
         SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(devices)
    .bind(metrics)
    .execute(&mut *conn)
    .await?;
    sqlx::query_as(
        "SELECT s.id, s.device_id, s.metric FROM series s \
         JOIN UNNEST($1::text[], $2::text[]) AS want(device_id, metric) \
         ON s.device_id = want.device_id AND s.metric = want.metric",
    )
    .bind(devices)
    .bind(metrics)
    .fetch_all(conn)
    .await
}
