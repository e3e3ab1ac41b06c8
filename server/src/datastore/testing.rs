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

/// What keeps a test's datastore alive: its directory, or its PostgreSQL cluster.
pub(crate) enum Keep {
    #[allow(dead_code, reason = "held for its Drop")]
    Dir(tempfile::TempDir),
    #[allow(dead_code, reason = "held for its Drop")]
    Postgres(Arc<hsm_sim::postgres::Postgres>),
}

/// A SQLite datastore in a file of a fresh directory, with the server's pool.
pub(crate) async fn sqlite_fixture() -> (Datastore, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(&dir.path().join("ds.sqlite"))
        .await
        .unwrap();
    (ds, Keep::Dir(dir))
}

/// A PostgreSQL datastore on a fresh database of the shared cluster.
pub(crate) async fn postgres_fixture() -> (Datastore, Keep) {
    let (settings, pg) = postgres_settings();
    let ds = Datastore::open_postgres(&settings).await.unwrap();
    (ds, Keep::Postgres(pg))
}

/// Runs each named `async fn NAME(ds: Datastore)` as two tests, `NAME::sqlite` and
/// `NAME::postgres`, each on a fresh datastore of that engine.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let (ds, _keep) = $crate::datastore::testing::sqlite_fixture().await;
                super::$name(ds).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let (ds, _keep) = $crate::datastore::testing::postgres_fixture().await;
                super::$name(ds).await;
            }
        }
    )*};
}
pub(crate) use on_both_engines;
