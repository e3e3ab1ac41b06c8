//! Test fixtures other modules' tests share: a fresh database on the lab's PostgreSQL.

use std::sync::Arc;

use super::{DEFAULT_MAX_CONNECTIONS, Datastore, Password, PostgresSettings, SslMode};

/// The settings of a fresh, empty database on the shared PostgreSQL cluster. A missing
/// PostgreSQL fails the test with the command that installs it.
pub(crate) fn postgres_settings() -> (PostgresSettings, Arc<hsm_sim::postgres::Postgres>) {
    let pg = hsm_sim::postgres::shared().unwrap_or_else(|e| {
        panic!(
            "these tests run on PostgreSQL too: {e} (install it with `apt-get install -y \
             {}`, or run scripts/test.sh)",
            hsm_sim::postgres::POSTGRES_PACKAGES
        )
    });
    let db = pg.fresh_database().unwrap();
    let settings = PostgresSettings {
        url: pg.url(&db),
        max_connections: DEFAULT_MAX_CONNECTIONS,
        ssl_mode: Some(SslMode::Disable),
        ca_file: None,
        password: Password::File(pg.password_file()),
    };
    (settings, pg)
}

/// `n` datastores on one fresh PostgreSQL database, each with its own pool: what `n`
/// servers sharing a trust domain hold. Keep the cluster until they are done.
pub(crate) async fn postgres_servers(
    n: usize,
) -> (Vec<Datastore>, Arc<hsm_sim::postgres::Postgres>) {
    let (settings, pg) = postgres_settings();
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(Datastore::open_postgres(&settings).await.unwrap());
    }
    (all, pg)
}
