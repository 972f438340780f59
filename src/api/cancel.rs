//! Database connections whose query stops when the call that started it
//! does.
//!
//! tonic drops a handler's future when the client cancels the call or its
//! deadline (`grpc-timeout`) passes, and a streaming response's producer
//! stops when the client goes away. Dropping a sqlx query does not stop it
//! inside PostgreSQL, though: the server would finish the scan, and the
//! connection would go back to the pool still busy with it. So every API
//! query runs on a [`QueryConnection`]: if it is dropped while a query is
//! in flight, it asks PostgreSQL to cancel the backend's query
//! (`pg_cancel_backend`, from another pooled connection) and closes its own
//! connection instead of returning it, so the cancel can never reach a
//! later, unrelated query on the same connection. Dropped while idle, it
//! goes back to the pool as usual.

use metrics::counter;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tracing::debug;

pub struct QueryConnection {
    conn: Option<PoolConnection<Postgres>>,
    /// A query was started and has not been seen to finish.
    busy: bool,
    pid: i32,
    pool: PgPool,
}

impl QueryConnection {
    pub async fn acquire(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Self {
            conn: Some(conn),
            busy: false,
            pid,
            pool: pool.clone(),
        })
    }

    /// Runs one query to its end (or to its cancellation, if this future
    /// is dropped first).
    pub async fn run<'s, T, F, Fut>(&'s mut self, query: F) -> Result<T, sqlx::Error>
    where
        F: FnOnce(&'s mut PgConnection) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>> + 's,
    {
        let Self { conn, busy, .. } = self;
        *busy = true;
        let result = query(conn.as_mut().expect("present until dropped")).await;
        *busy = false;
        result
    }

    /// For a query read as a stream: the connection counts as busy until
    /// [`Self::idle`].
    pub fn busy(&mut self) -> &mut PgConnection {
        self.busy = true;
        self.conn.as_mut().expect("present until dropped")
    }

    pub fn idle(&mut self) {
        self.busy = false;
    }
}

impl Drop for QueryConnection {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take().filter(|_| self.busy) else {
            return; // idle: back to the pool
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: the connection closes with the pool
        };
        counter!("sluice_api_queries_cancelled_total").increment(1);
        let (pid, pool) = (self.pid, self.pool.clone());
        let detached = conn.detach();
        runtime.spawn(async move {
            let cancelled: Result<bool, _> = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .fetch_one(&pool)
                .await;
            debug!(pid, ?cancelled, "query of an abandoned API call cancelled");
            // Closing (not pooling) it: the cancel may land after the query
            // ended, and must not hit the next one.
            drop(detached);
        });
    }
}
