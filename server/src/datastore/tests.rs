//! Tests of the datastore. The conformance cases (every query, every transaction, the
//! single-use and first-use guarantees) run on both engines: against a SQLite file in a
//! temporary directory, and against a real PostgreSQL (Debian's `postgresql`, started by
//! the test itself through `hsm_sim::postgres`, one fresh database per test). The
//! SQLite-only cases (file modes, the in-memory pool, a full disk) follow them.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use carapace_core::{
    EntryId, JwtKey, RegistrationEntry, Selector, SelectorSet, SpiffeId, TrustBundle, TrustDomain,
};

use super::testing::{on_both_engines, postgres_servers, postgres_settings};
use super::*;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn sels(items: &[&str]) -> SelectorSet {
    items.iter().map(|s| sel(s)).collect()
}

fn sid(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn eid(s: &str) -> EntryId {
    EntryId::new(s).unwrap()
}

const AGENT: &str = "spiffe://example.org/spire/agent/join_token/abc";

fn entry(id: &str, path: &str, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry {
        federates_with: Vec::new(),
        id: eid(id),
        spiffe_id: sid(&format!("spiffe://example.org{path}")),
        parent_id: sid(AGENT),
        selectors: sels(selectors),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_svid_include_jti: false,
        dns_names: Vec::new(),
        hint: String::new(),
        admin: false,
        downstream: false,
        expires_at: None,
        revision: 0,
        created_at: 1_000,
    }
}

fn full_entry() -> RegistrationEntry {
    RegistrationEntry {
        // Not in sorted order: the order must be kept.
        federates_with: vec![
            TrustDomain::new("partner.org").unwrap(),
            TrustDomain::new("a-b.example").unwrap(),
        ],
        id: eid("full-1"),
        spiffe_id: sid("spiffe://example.org/web"),
        parent_id: sid(AGENT),
        selectors: sels(&["unix:uid:1000", "unix:gid:1000", "k8s:ns:default"]),
        x509_svid_ttl: Some(Duration::from_secs(3600)),
        jwt_svid_ttl: Some(Duration::from_secs(300)),
        jwt_svid_include_jti: true,
        // Not in sorted order: the order must be kept.
        dns_names: vec![
            "web.example.org".into(),
            "a.example.org".into(),
            "*.z.example.org".into(),
        ],
        hint: "the web tier".into(),
        admin: true,
        downstream: true,
        expires_at: Some(2_000_000_000),
        revision: 0,
        created_at: 1_700_000_000,
    }
}

async fn mem() -> Datastore {
    Datastore::open_in_memory().await.unwrap()
}

on_both_engines!(
    entry_crud_round_trip,
    unknown_entries,
    duplicate_id_and_similar_entries_are_rejected,
    list_filters_and_count,
    every_entry_write_logs_one_event,
    prune_expired_entries,
    list_entries_unfiltered_in_bulk,
    the_bulk_load_reads_every_entry_as_listing_does,
    a_corrupt_row_early_in_a_large_bulk_load_ends_it_with_an_error,
    corrupt_rows_are_datastore_errors,
    jwt_settings_round_trip_through_create_update_and_list,
    join_token_is_single_use,
    the_secret_is_not_stored,
    join_token_with_alias_is_one_transaction,
    concurrent_consumers_of_one_token_exactly_one_wins,
    agents_upsert_get_list,
    banned_agents,
    evicting_an_agent,
    agent_serial_renewal_and_promotion,
    bundle_round_trip,
    the_bundle_is_the_union_of_every_servers_part_without_what_expired,
    downstream_jwt_keys_are_a_bounded_part_per_downstream_server,
    ca_journal_save_load,
    the_journal_of_a_single_server_database_is_claimed_by_one_server,
    every_write_names_its_entry_or_agent_in_the_change_logs,
    pruned_change_logs_keep_a_horizon_and_a_reader_behind_it_is_told_to_reset,
    attestation_state_is_kept_per_attestor_and_node,
    eviction_deletes_the_named_state_record_and_nothing_else,
    save_new_attestation_state_inserts_once_and_keeps_the_first,
);

/// The pool of a SQLite datastore (for the SQLite-only cases).
fn sqlite(ds: &Datastore) -> &SqlitePool {
    match &ds.pool {
        Engine::Sqlite(p) => p,
        Engine::Postgres(_) => panic!("a SQLite-only case got a PostgreSQL datastore"),
    }
}

/// Runs a statement on the datastore's pool (behind its back: to corrupt a row).
async fn exec(ds: &Datastore, sql: &'static str) {
    on_pool!(&ds.pool, p => sqlx::query(sql).execute(p).await.map(|_| ())).unwrap();
}

async fn count(ds: &Datastore, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    on_pool!(&ds.pool, p => {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_one(p)
            .await
    })
    .unwrap()
}

async fn events(ds: &Datastore) -> Vec<(i64, String, String)> {
    on_pool!(&ds.pool, p => {
        sqlx::query_as("SELECT id, entry_id, kind FROM entry_events ORDER BY id")
            .fetch_all(p)
            .await
    })
    .unwrap()
}

fn agent(path: &str, selectors: &[&str]) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: sid(&format!("spiffe://example.org/spire/agent{path}")),
        attestor: "join_token".into(),
        serial: "0a1b".into(),
        new_serial: None,
        expires_at: 5_000,
        banned: false,
        reattestable: false,
        attested_at: 1_000,
        selectors: sels(selectors),
        refused: None,
    }
}

// ---------------------------------------------------------------- entries

async fn entry_crud_round_trip(ds: Datastore) {
    let e = full_entry();
    ds.create_entry(&e).await.unwrap();

    let got = ds.get_entry(&e.id).await.unwrap().unwrap();
    assert_eq!(got, e, "every field round-trips");
    assert_eq!(got.dns_names[0], "web.example.org", "dns order kept");
    assert_eq!(count(&ds, "entry_selectors").await, 3);
    assert_eq!(count(&ds, "entry_dns_names").await, 3);

    // Update: every field replaced, revision bumped, created_at kept.
    let mut u = e.clone();
    u.spiffe_id = sid("spiffe://example.org/web2");
    u.selectors = sels(&["unix:uid:2000"]);
    u.dns_names = vec!["b.example.org".into()];
    u.federates_with = vec![TrustDomain::new("c.org").unwrap()];
    u.x509_svid_ttl = None;
    u.jwt_svid_ttl = None;
    u.jwt_svid_include_jti = false;
    u.hint = String::new();
    u.admin = false;
    u.downstream = false;
    u.expires_at = None;
    u.revision = 42; // ignored
    u.created_at = 5; // ignored
    let stored = ds.update_entry(&u).await.unwrap();
    let mut expected = u.clone();
    expected.revision = 1;
    expected.created_at = e.created_at;
    assert_eq!(stored, expected);
    assert_eq!(ds.get_entry(&e.id).await.unwrap().unwrap(), expected);
    assert_eq!(
        count(&ds, "entry_selectors").await,
        1,
        "old selectors replaced"
    );
    assert_eq!(
        count(&ds, "entry_dns_names").await,
        1,
        "old dns names replaced"
    );
    let again = ds.update_entry(&u).await.unwrap();
    assert_eq!(again.revision, 2);

    // Delete returns what was deleted and cascades.
    let deleted = ds.delete_entry(&e.id).await.unwrap();
    assert_eq!(deleted, again);
    assert_eq!(ds.get_entry(&e.id).await.unwrap(), None);
    assert_eq!(count(&ds, "entries").await, 0);
    assert_eq!(count(&ds, "entry_selectors").await, 0);
    assert_eq!(count(&ds, "entry_dns_names").await, 0);
}

async fn unknown_entries(ds: Datastore) {
    assert_eq!(ds.get_entry(&eid("nope")).await.unwrap(), None);
    let e = entry("nope", "/x", &["t:a"]);
    let err = ds.update_entry(&e).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m == "entry nope not found"),
        "{err:?}"
    );
    let err = ds.delete_entry(&e.id).await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("nope")),
        "{err:?}"
    );
    assert_eq!(count(&ds, "entries").await, 0);
    assert_eq!(
        ds.change_cursor().await.unwrap().entry_event,
        0,
        "failures log nothing"
    );
}

async fn duplicate_id_and_similar_entries_are_rejected(ds: Datastore) {
    ds.create_entry(&entry("e1", "/web", &["t:a", "t:b"]))
        .await
        .unwrap();

    // Same id, otherwise different.
    let err = ds
        .create_entry(&entry("e1", "/other", &["t:z"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.contains("e1")),
        "{err:?}"
    );

    // Same SPIFFE ID, parent and selector set: similar.
    let err = ds
        .create_entry(&entry("e2", "/web", &["t:b", "t:a"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.contains("e1")),
        "names e1: {err:?}"
    );

    // Any difference makes it not similar.
    ds.create_entry(&entry("e3", "/web", &["t:a"]))
        .await
        .unwrap();
    ds.create_entry(&entry("e4", "/web", &["t:a", "t:b", "t:c"]))
        .await
        .unwrap();
    ds.create_entry(&entry("e5", "/web2", &["t:a", "t:b"]))
        .await
        .unwrap();
    let mut other_parent = entry("e6", "/web", &["t:a", "t:b"]);
    other_parent.parent_id = sid("spiffe://example.org/spire/agent/join_token/other");
    ds.create_entry(&other_parent).await.unwrap();
    assert_eq!(count(&ds, "entries").await, 5);

    // Update: may keep its own selectors (not similar to itself)...
    let mut e3 = entry("e3", "/web", &["t:a"]);
    e3.hint = "changed".into();
    ds.update_entry(&e3).await.unwrap();
    // ...but may not become similar to another entry; nothing changes then.
    let e3_to_e1 = entry("e3", "/web", &["t:a", "t:b"]);
    let err = ds.update_entry(&e3_to_e1).await.unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.contains("e1")),
        "{err:?}"
    );
    let stored = ds.get_entry(&eid("e3")).await.unwrap().unwrap();
    assert_eq!(stored.selectors, sels(&["t:a"]));
    assert_eq!(stored.revision, 1);
    assert_eq!(stored.hint, "changed");
}

async fn list_filters_and_count(ds: Datastore) {
    // Created out of id order.
    ds.create_entry(&entry("c", "/web", &["t:a", "t:b"]))
        .await
        .unwrap();
    ds.create_entry(&entry("a", "/web", &["t:a"]))
        .await
        .unwrap();
    let mut b = entry("b", "/db", &["t:a", "t:c"]);
    b.parent_id = sid("spiffe://example.org/spire/agent/join_token/other");
    ds.create_entry(&b).await.unwrap();

    let ids =
        |v: Vec<RegistrationEntry>| v.into_iter().map(|e| e.id.to_string()).collect::<Vec<_>>();
    let check = async |f: EntryFilter, want: &[&str]| {
        let got = ds.list_entries(&f).await.unwrap();
        assert_eq!(
            ds.count_entries(&f).await.unwrap(),
            got.len() as u64,
            "{f:?}"
        );
        assert_eq!(ids(got), want, "{f:?}");
    };

    check(EntryFilter::default(), &["a", "b", "c"]).await;
    check(
        EntryFilter {
            id: Some(eid("b")),
            ..Default::default()
        },
        &["b"],
    )
    .await;
    check(
        EntryFilter {
            id: Some(eid("zz")),
            ..Default::default()
        },
        &[],
    )
    .await;
    check(
        EntryFilter {
            spiffe_id: Some(sid("spiffe://example.org/web")),
            ..Default::default()
        },
        &["a", "c"],
    )
    .await;
    check(
        EntryFilter {
            parent_id: Some(sid(AGENT)),
            ..Default::default()
        },
        &["a", "c"],
    )
    .await;
    check(
        EntryFilter {
            selectors: vec![sel("t:a")],
            ..Default::default()
        },
        &["a", "b", "c"],
    )
    .await;
    check(
        EntryFilter {
            selectors: vec![sel("t:a"), sel("t:b")],
            ..Default::default()
        },
        &["c"],
    )
    .await;
    check(
        EntryFilter {
            selectors: vec![sel("t:b"), sel("t:a"), sel("t:b")],
            ..Default::default()
        },
        &["c"],
    )
    .await;
    check(
        EntryFilter {
            selectors: vec![sel("t:a"), sel("t:c")],
            ..Default::default()
        },
        &["b"],
    )
    .await;
    check(
        EntryFilter {
            selectors: vec![sel("t:z")],
            ..Default::default()
        },
        &[],
    )
    .await;
    // Filters combine with AND.
    check(
        EntryFilter {
            spiffe_id: Some(sid("spiffe://example.org/web")),
            selectors: vec![sel("t:b")],
            ..Default::default()
        },
        &["c"],
    )
    .await;
    check(
        EntryFilter {
            id: Some(eid("a")),
            parent_id: Some(sid("spiffe://example.org/spire/agent/join_token/other")),
            ..Default::default()
        },
        &[],
    )
    .await;

    // Listed entries carry all their selectors, not only the filtered ones.
    let got = ds
        .list_entries(&EntryFilter {
            selectors: vec![sel("t:b")],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got[0].selectors, sels(&["t:a", "t:b"]));
}

async fn every_entry_write_logs_one_event(ds: Datastore) {
    assert_eq!(ds.change_cursor().await.unwrap().entry_event, 0);
    let e = entry("e1", "/web", &["t:a"]);
    ds.create_entry(&e).await.unwrap();
    let after_create = ds.change_cursor().await.unwrap().entry_event;
    ds.update_entry(&e).await.unwrap();
    let after_update = ds.change_cursor().await.unwrap().entry_event;
    ds.delete_entry(&e.id).await.unwrap();
    let after_delete = ds.change_cursor().await.unwrap().entry_event;
    assert!(0 < after_create && after_create < after_update && after_update < after_delete);

    // Failed writes log nothing.
    ds.create_entry(&entry("e2", "/web", &["t:a"]))
        .await
        .unwrap();
    assert!(ds.create_entry(&entry("e2", "/x", &["t:b"])).await.is_err());
    assert!(
        ds.create_entry(&entry("e3", "/web", &["t:a"]))
            .await
            .is_err()
    );

    let log: Vec<(String, String)> = events(&ds)
        .await
        .into_iter()
        .map(|(_, id, kind)| (id, kind))
        .collect();
    let want = [
        ("e1", "create"),
        ("e1", "update"),
        ("e1", "delete"),
        ("e2", "create"),
    ];
    assert_eq!(
        log,
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        ds.change_cursor().await.unwrap().entry_event,
        events(&ds).await[3].0
    );
}

async fn prune_expired_entries(ds: Datastore) {
    for (id, exp) in [
        ("a", Some(100)),
        ("b", Some(200)),
        ("c", None),
        ("d", Some(50)),
    ] {
        let mut e = entry(id, &format!("/{id}"), &["t:a"]);
        e.expires_at = exp;
        ds.create_entry(&e).await.unwrap();
    }
    let before = ds.change_cursor().await.unwrap().entry_event;
    let pruned = ds.prune_expired_entries(100).await.unwrap();
    assert_eq!(
        pruned,
        vec![eid("a"), eid("d")],
        "expires_at <= now, sorted"
    );
    let left: Vec<String> = ds
        .list_entries(&EntryFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id.to_string())
        .collect();
    assert_eq!(left, ["b", "c"]);
    assert_eq!(count(&ds, "entry_selectors").await, 2, "selectors cascade");
    let new_events: Vec<_> = events(&ds)
        .await
        .into_iter()
        .filter(|(id, _, _)| *id > before)
        .collect();
    assert_eq!(new_events.len(), 2);
    assert!(new_events.iter().all(|(_, _, kind)| kind == "delete"));
    assert_eq!(
        ds.prune_expired_entries(100).await.unwrap(),
        Vec::<EntryId>::new()
    );
}

/// Writes `n` entries in one transaction: `e<i>` (five digits) for `/w/<i>`, selectors
/// `t:a` and `n:<i>`, DNS names `w<i>.example.org` then `x.example.org`.
async fn insert_numbered(ds: &Datastore, n: usize) {
    let mut tx = ds.begin_write().await.unwrap();
    for i in 0..n {
        let mut e = entry(
            &format!("e{i:05}"),
            &format!("/w/{i}"),
            &["t:a", &format!("n:{i}")],
        );
        e.dns_names = vec![format!("w{i}.example.org"), "x.example.org".into()];
        entries::insert_entry(&mut tx, &e, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn list_entries_unfiltered_in_bulk(ds: Datastore) {
    insert_numbered(&ds, 2_000).await;

    let all = ds.list_entries(&EntryFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2_000);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.id.as_str(), format!("e{i:05}"), "sorted by id");
        assert_eq!(e.selectors, sels(&["t:a", &format!("n:{i}")]), "{}", e.id);
        assert_eq!(
            e.dns_names,
            [format!("w{i}.example.org"), "x.example.org".into()]
        );
    }
    assert_eq!(
        ds.count_entries(&EntryFilter::default()).await.unwrap(),
        2_000
    );
    let one = EntryFilter {
        selectors: vec![sel("n:1234")],
        ..Default::default()
    };
    assert_eq!(
        ds.list_entries(&one).await.unwrap()[0].id.as_str(),
        "e01234"
    );
}

/// Every entry [`Datastore::for_each_entry`] hands over, sorted by id.
async fn bulk_loaded(ds: &Datastore) -> Vec<RegistrationEntry> {
    let mut all = Vec::new();
    let n = ds.for_each_entry(|e| all.push(e)).await.unwrap();
    assert_eq!(n, all.len());
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

async fn the_bulk_load_reads_every_entry_as_listing_does(ds: Datastore) {
    assert!(bulk_loaded(&ds).await.is_empty());
    ds.create_entry(&full_entry()).await.unwrap();
    // Values JSON must escape, and a second selector type; no DNS names.
    ds.create_entry(&entry(
        "quoted",
        "/q",
        &[r#"k8s:label:a"b\c"#, "k8s:ns:é", "unix:uid:7"],
    ))
    .await
    .unwrap();
    // More than one chunk (`BULK_CHUNK`).
    insert_numbered(&ds, 2_500).await;
    let listed = ds.list_entries(&EntryFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 2_502);
    assert_eq!(bulk_loaded(&ds).await, listed);
}

async fn a_corrupt_row_early_in_a_large_bulk_load_ends_it_with_an_error(ds: Datastore) {
    let mut tx = ds.begin_write().await.unwrap();
    for i in 0..6_500 {
        let e = entry(&format!("e{i:05}"), &format!("/w/{i}"), &["t:a"]);
        entries::insert_entry(&mut tx, &e, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    exec(
        &ds,
        "UPDATE entries SET spiffe_id = 'bad' WHERE id = 'e00001'",
    )
    .await;
    // The chunks still unread must not hold the load up once one failed.
    let mut seen = 0;
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        ds.for_each_entry(|_| seen += 1),
    )
    .await
    .expect("the bulk load hung after a corrupt row")
    .unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("entries id=\"e00001\"")),
        "{err:?}"
    );
    assert!(seen < 6_500);
}

/// In memory, the bulk load reads through the pool's one connection (a connection of
/// its own would open another, empty, database).
#[tokio::test]
async fn the_bulk_load_of_an_in_memory_database_reads_its_entries() {
    the_bulk_load_reads_every_entry_as_listing_does(mem().await).await;
}

async fn corrupt_rows_are_datastore_errors(ds: Datastore) {
    ds.create_entry(&entry("e1", "/web", &["t:a"]))
        .await
        .unwrap();
    exec(&ds, "UPDATE entries SET spiffe_id = 'not a spiffe id'").await;
    let err = ds.get_entry(&eid("e1")).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("e1")),
        "{err:?}"
    );
    assert!(ds.list_entries(&EntryFilter::default()).await.is_err());
    let err = ds.for_each_entry(|_| {}).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("entries id=\"e1\"")),
        "{err:?}"
    );

    exec(
        &ds,
        "UPDATE entries SET spiffe_id = 'spiffe://example.org/web'",
    )
    .await;
    ds.get_entry(&eid("e1")).await.unwrap().unwrap();
    exec(&ds, "UPDATE entries SET parent_id = 'spiffe://'").await;
    let err = ds.for_each_entry(|_| {}).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("entries id=\"e1\"")),
        "{err:?}"
    );
    exec(
        &ds,
        "UPDATE entries SET parent_id = 'spiffe://example.org/spire/agent/x'",
    )
    .await;
    exec(&ds, "UPDATE entry_selectors SET type = 'bad type'").await;
    let err = ds.list_entries(&EntryFilter::default()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("entry_selectors")),
        "{err:?}"
    );
    let err = ds.for_each_entry(|_| {}).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("entry_selectors entry_id=\"e1\"")),
        "{err:?}"
    );
}

async fn jwt_settings_round_trip_through_create_update_and_list(ds: Datastore) {
    let mut e = entry("j1", "/jwt", &["t:a"]);
    ds.create_entry(&e).await.unwrap();
    let got = ds.get_entry(&e.id).await.unwrap().unwrap();
    assert_eq!((got.jwt_svid_ttl, got.jwt_svid_include_jti), (None, false));

    // Set by an update, then read back by id and by a listing.
    e.jwt_svid_ttl = Some(Duration::from_secs(86_400));
    e.jwt_svid_include_jti = true;
    let stored = ds.update_entry(&e).await.unwrap();
    assert_eq!(
        (stored.jwt_svid_ttl, stored.jwt_svid_include_jti),
        (Some(Duration::from_secs(86_400)), true)
    );
    let listed = ds.list_entries(&EntryFilter::default()).await.unwrap();
    assert_eq!(
        (listed[0].jwt_svid_ttl, listed[0].jwt_svid_include_jti),
        (Some(Duration::from_secs(86_400)), true)
    );
    let row: (Option<i64>, bool, Option<i64>) = on_pool!(&ds.pool, p => sqlx::query_as(
        "SELECT jwt_svid_ttl, jwt_svid_include_jti, x509_svid_ttl FROM entries WHERE id = 'j1'",
    )
    .fetch_one(p)
    .await)
    .unwrap();
    assert_eq!(
        row,
        (Some(86_400), true, None),
        "stored in their own columns"
    );

    // A negative stored TTL is a corrupt row, named.
    exec(&ds, "UPDATE entries SET jwt_svid_ttl = -5").await;
    let err = ds.get_entry(&e.id).await.unwrap_err();
    assert!(
        matches!(&err, Error::Datastore(m) if m.contains("jwt_svid_ttl -5")),
        "{err:?}"
    );
}

/// A database written before schema version 5 (no JWT columns) is migrated when opened,
/// and its entries read back with the default JWT TTL and no `jti`.
/// A SQLite database at `path` (created) migrated up to schema `version` only: what an
/// older release left.
async fn sqlite_at_version(path: &std::path::Path, version: i64) -> SqlitePool {
    let pool = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    SQLITE_MIGRATOR.run_to(version, &pool).await.unwrap();
    pool
}

/// A single server's database of schema version 5 keeps its CA journal and bundle when
/// opened by a version that shares databases between servers: the journal is claimed by
/// the first server id that asks.
#[tokio::test]
async fn a_single_server_database_keeps_its_ca_journal_across_the_several_servers_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carapace.sqlite");
    {
        let pool = sqlite_at_version(&path, 5).await;
        sqlx::query(
            "INSERT INTO ca_journal (id, data, updated_at) VALUES (1, x'6a6f75726e616c', 7)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let ds = Datastore::open(&path).await.unwrap();
    assert_eq!(
        ds.load_ca_journal("0123456789abcdef0123456789abcdef")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"journal"[..])
    );
    assert_eq!(ds.load_ca_journal("another").await.unwrap(), None);
    assert_eq!(count(&ds, "server_ca_journals").await, 1);
}

#[tokio::test]
async fn entries_from_before_the_jwt_migration_read_back_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("carapace.sqlite");
    {
        let pool = sqlite_at_version(&path, 4).await;
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('entries')")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(!columns.iter().any(|c| c.starts_with("jwt")), "{columns:?}");
        // The row version 4 wrote, with the columns it knew.
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, x509_svid_ttl, hint, admin, \
             downstream, expires_at, revision, created_at) \
             VALUES ('old-1', 'spiffe://example.org/old', $1, 600, 'h', 0, 0, NULL, 2, 1000)",
        )
        .bind(AGENT)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO entry_selectors (entry_id, type, value) VALUES ('old-1', 't', 'a')",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let ds = Datastore::open(&path).await.unwrap();
    let got = ds.get_entry(&eid("old-1")).await.unwrap().unwrap();
    assert_eq!((got.jwt_svid_ttl, got.jwt_svid_include_jti), (None, false));
    assert_eq!(got.x509_svid_ttl, Some(Duration::from_secs(600)));
    assert_eq!((got.revision, got.hint.as_str()), (2, "h"));
    // And it takes JWT settings like any entry.
    let mut u = got.clone();
    u.jwt_svid_ttl = Some(Duration::from_secs(60));
    u.jwt_svid_include_jti = true;
    let stored = ds.update_entry(&u).await.unwrap();
    assert_eq!(
        (
            stored.jwt_svid_ttl,
            stored.jwt_svid_include_jti,
            stored.revision
        ),
        (Some(Duration::from_secs(60)), true, 3)
    );
    ds.close().await;
}

// ---------------------------------------------------------------- join tokens

/// A token id and secret hash, distinct per `n`.
fn tok(n: u8) -> (String, [u8; 32]) {
    (format!("{n:016x}"), [n; 32])
}

async fn join_token_is_single_use(ds: Datastore) {
    let (id, h) = tok(7);
    ds.create_join_token(&id, &h, 200, 100, None).await.unwrap();
    let err = ds
        .create_join_token(&id, &[9; 32], 300, 100, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");

    let stored = ds.get_join_token(&id).await.unwrap().unwrap();
    assert_eq!(
        stored,
        JoinToken {
            id: id.clone(),
            secret_hash: h,
            expires_at: 200,
            created_at: 100
        }
    );
    assert!(
        !format!("{stored:?}").contains("7, 7"),
        "Debug hides the hash"
    );
    assert_eq!(ds.get_join_token("0000000000000000").await.unwrap(), None);

    // A wrong secret hash neither succeeds nor burns the token.
    assert_refused(use_token(&ds, &id, &[8; 32], 150).await);
    assert_eq!(count(&ds, "join_tokens").await, 1);
    assert_eq!(count(&ds, "attested_agents").await, 0);
    use_token(&ds, &id, &h, 150).await.unwrap();
    assert!(
        ds.get_attested_agent(&token_agent(&id, 150).spiffe_id)
            .await
            .unwrap()
            .is_some()
    );
    assert_refused(use_token(&ds, &id, &h, 150).await);
    assert_eq!(ds.get_join_token(&id).await.unwrap(), None);
    assert_refused(use_token(&ds, "0000000000000000", &h, 150).await);

    // Expired (expires_at <= now): refused; pruning deletes it.
    let (id2, h2) = tok(2);
    ds.create_join_token(&id2, &h2, 200, 100, None)
        .await
        .unwrap();
    assert_refused(use_token(&ds, &id2, &h2, 200).await);
    assert_eq!(count(&ds, "join_tokens").await, 1);
    assert_eq!(count(&ds, "attested_agents").await, 1);

    // Pruning.
    for (n, exp) in [(1, 100), (3, 300), (4, 400)] {
        let (id, h) = tok(n);
        ds.create_join_token(&id, &h, exp, 0, None).await.unwrap();
    }
    assert_eq!(ds.prune_expired_join_tokens(200).await.unwrap(), 2);
    let (id3, h3) = tok(3);
    use_token(&ds, &id3, &h3, 200).await.unwrap();
}

/// The agent a join token with this id admits, attested at `now`.
fn token_agent(id: &str, now: i64) -> AttestedAgent {
    let mut a = agent(&format!("/join_token/{id}"), &[]);
    a.attested_at = now;
    a
}

/// Records the attestation of [`token_agent`] with the token, at `now`.
async fn use_token(ds: &Datastore, id: &str, secret_hash: &[u8; 32], now: i64) -> Result<()> {
    let token = PresentedToken {
        id: id.to_owned(),
        secret_hash: *secret_hash,
    };
    ds.attest_agent(&token_agent(id, now), Some(&token)).await
}

fn assert_refused(r: Result<()>) {
    assert!(
        matches!(
            &r,
            Err(Error::Core(carapace_core::Error::AttestationRejected(m)))
                if m == "join token is unknown, expired or already used"
        ),
        "{r:?}"
    );
}

async fn the_secret_is_not_stored(ds: Datastore) {
    let (id, h) = tok(1);
    ds.create_join_token(&id, &h, 200, 100, None).await.unwrap();
    let columns: Vec<String> = match &ds.pool {
        Engine::Sqlite(p) => {
            sqlx::query_scalar("SELECT name FROM pragma_table_info('join_tokens') ORDER BY cid")
                .fetch_all(p)
                .await
        }
        Engine::Postgres(p) => {
            sqlx::query_scalar(
                "SELECT column_name::TEXT FROM information_schema.columns \
                 WHERE table_name = 'join_tokens' ORDER BY ordinal_position",
            )
            .fetch_all(p)
            .await
        }
    }
    .unwrap();
    assert_eq!(columns, ["id", "secret_hash", "expires_at", "created_at"]);
}

async fn join_token_with_alias_is_one_transaction(ds: Datastore) {
    let alias = |id: &str| {
        let mut e = entry(id, "/node", &["join_token:abc"]);
        e.parent_id = sid("spiffe://example.org/spire/server");
        e
    };
    let (t1, h1) = tok(1);
    ds.create_join_token(&t1, &h1, 200, 100, Some(&alias("a1")))
        .await
        .unwrap();
    assert!(ds.get_entry(&eid("a1")).await.unwrap().is_some());
    assert_eq!(events(&ds).await.len(), 1, "alias creation is logged");

    // A similar alias: neither the entry nor the token is stored.
    let (t2, h2) = tok(2);
    let err = ds
        .create_join_token(&t2, &h2, 200, 100, Some(&alias("a2")))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.contains("a1")),
        "{err:?}"
    );
    assert_eq!(count(&ds, "join_tokens").await, 1);
    assert_eq!(ds.get_join_token(&t2).await.unwrap(), None);
    assert_refused(use_token(&ds, &t2, &h2, 150).await);
    assert!(ds.get_entry(&eid("a2")).await.unwrap().is_none());

    // A duplicate alias id: same.
    let mut dup = alias("a1");
    dup.spiffe_id = sid("spiffe://example.org/node2");
    let (t3, h3) = tok(3);
    assert!(
        ds.create_join_token(&t3, &h3, 200, 100, Some(&dup))
            .await
            .is_err()
    );
    assert_eq!(count(&ds, "join_tokens").await, 1);
    assert_eq!(count(&ds, "entries").await, 1);
    assert_eq!(count(&ds, "entry_selectors").await, 1);
    assert_eq!(events(&ds).await.len(), 1);

    // A duplicate token with a fresh alias: the alias is not stored.
    assert!(
        ds.create_join_token(&t1, &h1, 200, 100, Some(&alias("a3")))
            .await
            .is_err()
    );
    assert!(ds.get_entry(&eid("a3")).await.unwrap().is_none());
    assert_eq!(events(&ds).await.len(), 1);
}

async fn concurrent_consumers_of_one_token_exactly_one_wins(ds: Datastore) {
    for round in 0..5u8 {
        let (id, h) = tok(round);
        ds.create_join_token(&id, &h, 1_000, 0, None).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let ds = ds.clone();
                let barrier = barrier.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    match use_token(&ds, &id, &h, 10).await {
                        Ok(()) => true,
                        Err(e) => {
                            assert_refused(Err(e));
                            false
                        }
                    }
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            if t.await.unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(ds.get_join_token(&id).await.unwrap(), None);
    }
}

// ---------------------------------------------------------------- agents

async fn agents_upsert_get_list(ds: Datastore) {
    let b = agent("/join_token/b", &["join_token:b", "host:b"]);
    let mut a = agent("/join_token/a", &["join_token:a"]);
    a.new_serial = Some("ff".into());
    a.reattestable = true;
    ds.upsert_attested_agent(&b).await.unwrap();
    ds.upsert_attested_agent(&a).await.unwrap();

    assert_eq!(
        ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap(),
        a
    );
    assert_eq!(
        ds.get_attested_agent(&b.spiffe_id).await.unwrap().unwrap(),
        b
    );
    assert_eq!(
        ds.list_attested_agents().await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        ds.get_attested_agent(&sid("spiffe://example.org/spire/agent/x"))
            .await
            .unwrap(),
        None
    );

    // Re-attestation replaces every field and the node selectors.
    let mut b2 = b.clone();
    b2.serial = "0c".into();
    b2.selectors = sels(&["join_token:b", "host:b2"]);
    b2.attested_at = 2_000;
    ds.upsert_attested_agent(&b2).await.unwrap();
    assert_eq!(
        ds.get_attested_agent(&b.spiffe_id).await.unwrap().unwrap(),
        b2
    );
    assert_eq!(count(&ds, "node_selectors").await, 3);
}

async fn banned_agents(ds: Datastore) {
    let a = agent("/join_token/a", &["join_token:a"]);
    ds.upsert_attested_agent(&a).await.unwrap();
    let banned = ds.set_agent_banned(&a.spiffe_id, true).await.unwrap();
    assert!(banned.banned);
    assert_eq!(banned.selectors, a.selectors);

    let mut again = a.clone();
    again.serial = "99".into();
    again.selectors = sels(&["join_token:other"]);
    let err = ds.upsert_attested_agent(&again).await.unwrap_err();
    assert!(
        matches!(&err, Error::PermissionDenied(m) if m.contains("is banned")),
        "{err:?}"
    );
    assert_eq!(
        ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap(),
        banned,
        "unchanged"
    );
    let err = ds
        .set_agent_new_serial(&a.spiffe_id, "77", 9_000)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");

    let unbanned = ds.set_agent_banned(&a.spiffe_id, false).await.unwrap();
    assert_eq!(unbanned, a);
    ds.upsert_attested_agent(&again).await.unwrap();
    assert_eq!(
        ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap(),
        again
    );

    let missing = sid("spiffe://example.org/spire/agent/missing");
    assert!(matches!(
        ds.set_agent_banned(&missing, true).await,
        Err(Error::NotFound(_))
    ));
}

async fn evicting_an_agent(ds: Datastore) {
    let a = agent("/join_token/a", &["join_token:a", "host:a"]);
    let b = agent("/join_token/b", &["join_token:b"]);
    ds.upsert_attested_agent(&a).await.unwrap();
    ds.upsert_attested_agent(&b).await.unwrap();
    ds.delete_attested_agent(&a.spiffe_id, None).await.unwrap();
    assert_eq!(ds.get_attested_agent(&a.spiffe_id).await.unwrap(), None);
    assert_eq!(
        count(&ds, "node_selectors").await,
        1,
        "only b's selectors left"
    );
    assert_eq!(ds.list_attested_agents().await.unwrap(), vec![b]);
    let err = ds
        .delete_attested_agent(&a.spiffe_id, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(m) if m.contains("join_token/a")),
        "{err:?}"
    );
}

async fn agent_serial_renewal_and_promotion(ds: Datastore) {
    let a = agent("/join_token/a", &["join_token:a"]);
    ds.upsert_attested_agent(&a).await.unwrap();

    ds.set_agent_new_serial(&a.spiffe_id, "0b", 9_000)
        .await
        .unwrap();
    let got = ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap();
    assert_eq!(
        (
            got.serial.as_str(),
            got.new_serial.as_deref(),
            got.expires_at
        ),
        ("0a1b", Some("0b"), 9_000)
    );

    // Only the pending serial can be promoted.
    let err = ds
        .promote_agent_serial(&a.spiffe_id, "0c")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
    let unchanged = ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap();
    assert_eq!(unchanged, got);

    ds.promote_agent_serial(&a.spiffe_id, "0b").await.unwrap();
    let got = ds.get_attested_agent(&a.spiffe_id).await.unwrap().unwrap();
    assert_eq!(
        (got.serial.as_str(), got.new_serial.as_deref()),
        ("0b", None)
    );
    // Idempotent once done; the old serial is no longer promotable.
    ds.promote_agent_serial(&a.spiffe_id, "0b").await.unwrap();
    assert!(ds.promote_agent_serial(&a.spiffe_id, "0a1b").await.is_err());

    let missing = sid("spiffe://example.org/spire/agent/missing");
    assert!(matches!(
        ds.set_agent_new_serial(&missing, "1", 1).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        ds.promote_agent_serial(&missing, "1").await,
        Err(Error::NotFound(_))
    ));
}

// ---------------------------------------------------------------- bundles, CA journal

fn ca_cert() -> (Vec<u8>, Vec<u8>) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = p.self_signed(&kp).unwrap();
    (
        cert.der().to_vec(),
        rcgen::PublicKeyData::subject_public_key_info(&kp),
    )
}

fn jwt_key(kid: &str, der: Vec<u8>, expires_at: Option<i64>) -> JwtKey {
    JwtKey {
        kid: kid.into(),
        public_key_der: der,
        expires_at,
    }
}

async fn bundle_round_trip(ds: Datastore) {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(ds.get_bundle(&td).await.unwrap(), None);

    let (ca1, jwt1) = ca_cert();
    let (ca2, jwt2) = ca_cert();
    let mut b = TrustBundle::new(td.clone());
    b.x509_authorities = vec![ca1.clone()];
    b.jwt_authorities = vec![
        jwt_key("k1", jwt1, Some(1_800_000_000)),
        jwt_key("k2", jwt2, None),
    ];
    b.sequence = 3;
    b.refresh_hint = Some(300);
    b.tainted_jwt_kids = vec!["k2".into()];
    // The union of one part is that part, under the trust domain's own sequence.
    let union = ds.publish_bundle("s1", &b, 1_000).await.unwrap();
    let mut expected = b.clone();
    expected.sequence = 1;
    assert_eq!(union, expected);
    assert_eq!(ds.get_bundle(&td).await.unwrap().unwrap(), union);

    // Publishing again replaces the part; taints read back.
    b.x509_authorities.push(ca2.clone());
    b.tainted_x509_authorities = vec![ca2.clone()];
    b.jwt_authorities.truncate(1);
    b.tainted_jwt_kids.clear();
    let union = ds.publish_bundle("s1", &b, 1_000).await.unwrap();
    let mut expected = b.clone();
    expected.sequence = 2;
    assert_eq!(union, expected);
    assert_eq!(ds.get_bundle(&td).await.unwrap().unwrap(), union);
    assert_eq!(count(&ds, "bundles").await, 1);
    assert_eq!(count(&ds, "server_bundles").await, 1);

    let other = TrustDomain::new("other.org").unwrap();
    assert_eq!(ds.get_bundle(&other).await.unwrap(), None);
}

async fn the_bundle_is_the_union_of_every_servers_part_without_what_expired(ds: Datastore) {
    let td = TrustDomain::new("example.org").unwrap();
    let (ca1, k1) = ca_cert();
    let (ca2, k2) = ca_cert();
    let (_, k3) = ca_cert();
    let now = unix_now();
    let mut one = TrustBundle::new(td.clone());
    one.x509_authorities = vec![ca1.clone()];
    one.jwt_authorities = vec![jwt_key("a", k1, Some(now + 600))];
    let mut two = TrustBundle::new(td.clone());
    two.x509_authorities = vec![ca2.clone(), ca1.clone()];
    two.jwt_authorities = vec![
        jwt_key("b", k2.clone(), Some(now + 600)),
        jwt_key("old", k3, Some(now - 1)),
    ];
    two.tainted_x509_authorities = vec![ca2.clone()];
    ds.publish_bundle("s1", &one, now).await.unwrap();
    let union = ds.publish_bundle("s2", &two, now).await.unwrap();
    // Each authority once, s1's first; s2's expired JWT key left out (s2 publishes
    // here: its own part is taken whole only for itself... as the calling server).
    assert_eq!(union.x509_authorities, vec![ca1.clone(), ca2.clone()]);
    let kids: Vec<&str> = union
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(
        kids,
        ["a", "b", "old"],
        "the calling server's own part is whole"
    );
    assert_eq!(union.tainted_x509_authorities, vec![ca2.clone()]);
    assert_eq!(union.sequence, 2);
    // Published by s1, s2's expired key is left out.
    let union = ds.publish_bundle("s1", &one, now).await.unwrap();
    let kids: Vec<&str> = union
        .jwt_authorities
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(kids, ["a", "b"]);
    assert_eq!(union.sequence, 3);

    // A server whose every key expired is dropped at the next publish of another.
    let mut gone = TrustBundle::new(td.clone());
    gone.jwt_authorities = vec![jwt_key("g", k2, Some(now - 5))];
    ds.publish_bundle("s3", &gone, now).await.unwrap();
    assert_eq!(count(&ds, "server_bundles").await, 3);
    let union = ds.publish_bundle("s1", &one, now).await.unwrap();
    assert_eq!(count(&ds, "server_bundles").await, 2);
    assert!(union.jwt_authorities.iter().all(|k| k.kid != "g"));
}

async fn downstream_jwt_keys_are_a_bounded_part_per_downstream_server(ds: Datastore) {
    let td = TrustDomain::new("example.org").unwrap();
    let site_a = sid("spiffe://example.org/downstream/site-a");
    let site_b = sid("spiffe://example.org/downstream/site-b");
    let now = unix_now();
    let (ca1, own_key) = ca_cert();
    let mut own = TrustBundle::new(td.clone());
    own.x509_authorities = vec![ca1.clone()];
    own.jwt_authorities = vec![jwt_key("own", own_key, Some(now + 3600))];
    let first = ds.publish_bundle("s1", &own, now).await.unwrap();
    // The kids of a bundle, sorted (parts merge in server_id order).
    let kids = |b: &TrustBundle| -> Vec<String> {
        let mut kids: Vec<String> = b.jwt_authorities.iter().map(|k| k.kid.clone()).collect();
        kids.sort();
        kids
    };
    let keys: Vec<JwtKey> = (1..=4)
        .map(|i| jwt_key(&format!("a{i}"), ca_cert().1, Some(now + 600 * i)))
        .collect();

    // A downstream's key joins the bundle in a part of its own; the sequence moves.
    let union = ds
        .publish_downstream_jwt_key("s1", &td, &site_a, &keys[0], 3, now)
        .await
        .unwrap();
    assert_eq!(kids(&union), ["a1", "own"]);
    assert_eq!(union.x509_authorities, vec![ca1.clone()]);
    assert_eq!(union.sequence, first.sequence + 1);
    assert_eq!(ds.get_bundle(&td).await.unwrap().unwrap(), union);
    assert_eq!(count(&ds, "server_bundles").await, 2);
    // The same key again: nothing changes.
    let again = ds
        .publish_downstream_jwt_key("s1", &td, &site_a, &keys[0], 3, now)
        .await
        .unwrap();
    assert_eq!(again, union);
    // The server's own publish keeps the downstream's part.
    let union = ds.publish_bundle("s1", &own, now).await.unwrap();
    assert_eq!(kids(&union), ["a1", "own"]);

    // At most three keys per downstream: those that expire last.
    for k in &keys[1..] {
        ds.publish_downstream_jwt_key("s1", &td, &site_a, k, 3, now)
            .await
            .unwrap();
    }
    let union = ds.get_bundle(&td).await.unwrap().unwrap();
    assert_eq!(kids(&union), ["a2", "a3", "a4", "own"]);
    // A key published again with a new expiry replaces its entry.
    let mut renewed = keys[1].clone();
    renewed.expires_at = Some(now + 9_000);
    let union = ds
        .publish_downstream_jwt_key("s1", &td, &site_a, &renewed, 3, now)
        .await
        .unwrap();
    let a2 = union
        .jwt_authorities
        .iter()
        .find(|k| k.kid == "a2")
        .unwrap();
    assert_eq!(a2.expires_at, Some(now + 9_000));
    assert_eq!(union.jwt_authorities.len(), 4);

    // Another downstream has its own part; once its keys expire, it leaves the bundle.
    let b1 = jwt_key("b1", ca_cert().1, Some(now + 60));
    let union = ds
        .publish_downstream_jwt_key("s1", &td, &site_b, &b1, 3, now)
        .await
        .unwrap();
    assert!(kids(&union).contains(&"b1".to_owned()));
    assert_eq!(count(&ds, "server_bundles").await, 3);
    let later = now + 61;
    let union = ds.publish_bundle("s1", &own, later).await.unwrap();
    assert!(
        !kids(&union).contains(&"b1".to_owned()),
        "{:?}",
        kids(&union)
    );
    assert_eq!(count(&ds, "server_bundles").await, 2);
    // site-a's expired keys leave its part when it publishes next.
    let fresh = jwt_key("a5", ca_cert().1, Some(later + 10_000));
    let union = ds
        .publish_downstream_jwt_key("s1", &td, &site_a, &fresh, 3, now + 1_900)
        .await
        .unwrap();
    assert_eq!(kids(&union), ["a2", "a4", "a5", "own"]);
}

async fn ca_journal_save_load(ds: Datastore) {
    assert_eq!(ds.load_ca_journal("s1").await.unwrap(), None);
    ds.save_ca_journal("s1", b"\x00first\xff").await.unwrap();
    assert_eq!(
        ds.load_ca_journal("s1").await.unwrap().unwrap(),
        b"\x00first\xff"
    );
    ds.save_ca_journal("s1", b"second").await.unwrap();
    assert_eq!(ds.load_ca_journal("s1").await.unwrap().unwrap(), b"second");
    // Each server its own journal.
    assert_eq!(ds.load_ca_journal("s2").await.unwrap(), None);
    ds.save_ca_journal("s2", b"two").await.unwrap();
    assert_eq!(ds.load_ca_journal("s1").await.unwrap().unwrap(), b"second");
    assert_eq!(count(&ds, "server_ca_journals").await, 2);
}

async fn the_journal_of_a_single_server_database_is_claimed_by_one_server(ds: Datastore) {
    // What the version-6 migration leaves of a version-5 database's journal.
    exec(
        &ds,
        "INSERT INTO server_ca_journals (server_id, data, updated_at) VALUES ('', 'j', 1)",
    )
    .await;
    let (a, b) = tokio::join!(ds.load_ca_journal("s1"), ds.load_ca_journal("s2"));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        matches!((&a, &b), (Some(j), None) | (None, Some(j)) if j == b"j"),
        "{a:?} {b:?}"
    );
    assert_eq!(count(&ds, "server_ca_journals").await, 1);
    assert_eq!(ds.load_ca_journal("").await.unwrap(), None);
}

// ---------------------------------------------------------------- change logs

async fn every_write_names_its_entry_or_agent_in_the_change_logs(ds: Datastore) {
    let start = ds.change_cursor().await.unwrap();
    assert_eq!(start, Cursor::default());
    assert!(ds.changes_since(start, 100).await.unwrap().is_empty());

    ds.create_entry(&entry("e1", "/a", &["t:a"])).await.unwrap();
    ds.create_entry(&entry("e2", "/b", &["t:b"])).await.unwrap();
    let mut e1 = entry("e1", "/a", &["t:a", "t:z"]);
    e1.hint = "changed".into();
    ds.update_entry(&e1).await.unwrap();
    let a = agent("/join_token/a", &["join_token:a"]);
    ds.upsert_attested_agent(&a).await.unwrap();
    ds.set_agent_new_serial(&a.spiffe_id, "ff", 9_000)
        .await
        .unwrap();
    ds.set_agent_banned(&a.spiffe_id, true).await.unwrap();

    let c = ds.changes_since(start, 100).await.unwrap();
    assert_eq!(
        c.entries,
        vec![eid("e1"), eid("e2")],
        "each once, first-event order"
    );
    assert_eq!(c.agents, vec![a.spiffe_id.clone()]);
    assert_eq!(c.cursor, ds.change_cursor().await.unwrap());
    assert!(!c.more);
    // The rows as they are now: e1 updated; the agent banned.
    let rows = ds.entries_by_id(&c.entries).await.unwrap();
    assert_eq!(rows[0].hint, "changed");
    assert_eq!(rows[0].selectors, sels(&["t:a", "t:z"]));
    assert!(ds.agents_by_id(&c.agents).await.unwrap()[0].banned);

    // A limit splits the log; the cursor moves past what was returned only.
    let first = ds.changes_since(start, 1).await.unwrap();
    assert_eq!(first.entries, vec![eid("e1")]);
    assert!(first.more);
    let rest = ds.changes_since(first.cursor, 100).await.unwrap();
    assert_eq!(rest.entries, vec![eid("e2"), eid("e1")]);

    // Deletions and evictions are logged; the rows are gone.
    let after = c.cursor;
    ds.delete_entry(&eid("e2")).await.unwrap();
    ds.delete_attested_agent(&a.spiffe_id, None).await.unwrap();
    ds.prune_expired_entries(0).await.unwrap();
    let c = ds.changes_since(after, 100).await.unwrap();
    assert_eq!(c.entries, vec![eid("e2")]);
    assert_eq!(c.agents, vec![a.spiffe_id.clone()]);
    assert!(ds.entries_by_id(&c.entries).await.unwrap().is_empty());
    assert!(ds.agents_by_id(&c.agents).await.unwrap().is_empty());
}

async fn pruned_change_logs_keep_a_horizon_and_a_reader_behind_it_is_told_to_reset(ds: Datastore) {
    ds.create_entry(&entry("e1", "/a", &["t:a"])).await.unwrap();
    ds.upsert_attested_agent(&agent("/join_token/a", &[]))
        .await
        .unwrap();
    let before = ds.change_cursor().await.unwrap();
    assert_eq!(
        ds.prune_change_logs(0).await.unwrap(),
        0,
        "nothing that old"
    );
    // Everything written before the future: both logs emptied, the horizon kept.
    assert_eq!(ds.prune_change_logs(unix_now() + 10).await.unwrap(), 2);
    assert_eq!(
        (
            count(&ds, "entry_events").await,
            count(&ds, "agent_events").await
        ),
        (0, 0)
    );
    assert_eq!(
        ds.change_cursor().await.unwrap(),
        before,
        "the cursor never goes back"
    );
    // A reader behind the horizon must reload; one at it follows on.
    let behind = ds.changes_since(Cursor::default(), 100).await.unwrap();
    assert!(behind.reset && behind.is_empty(), "{behind:?}");
    assert!(!ds.changes_since(before, 100).await.unwrap().reset);
    ds.create_entry(&entry("e2", "/b", &["t:b"])).await.unwrap();
    let next = ds.changes_since(before, 100).await.unwrap();
    assert_eq!((next.reset, next.entries), (false, vec![eid("e2")]));
    assert!(
        next.cursor.entry_event > before.entry_event,
        "ids are never reused"
    );
}

// ---------------------------------------------------------------- several servers (PostgreSQL)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_servers_starting_together_on_an_empty_database_migrate_it_once() {
    for round in 0..3 {
        let (settings, _pg) = postgres_settings();
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let settings = settings.clone();
                tokio::spawn(async move { Datastore::open_postgres(&settings).await })
            })
            .collect();
        let mut stores = Vec::new();
        for o in opens {
            stores.push(
                o.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("round {round}: {e}")),
            );
        }
        let versions: Vec<i64> = on_pool!(&stores[0].pool, p => {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(p)
                .await
        })
        .unwrap();
        let expected: Vec<i64> = POSTGRES_MIGRATOR.iter().map(|m| m.version).collect();
        assert_eq!(
            versions, expected,
            "round {round}: each migration applied once"
        );
        // Every server works on the schema.
        for (i, ds) in stores.iter().enumerate() {
            ds.create_entry(&entry(&format!("e{i}"), &format!("/s{i}"), &["t:a"]))
                .await
                .unwrap();
        }
        assert_eq!(
            stores[2]
                .list_entries(&EntryFilter::default())
                .await
                .unwrap()
                .len(),
            3
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_servers_writes_wake_a_listener_naming_what_changed() {
    use super::Woken;
    let (stores, _pg) = postgres_servers(2).await;
    let mut listener = stores[1].change_listener().await.unwrap().unwrap();
    async fn recv_within(l: &mut super::ChangeListener) -> Woken {
        tokio::time::timeout(std::time::Duration::from_secs(10), l.recv())
            .await
            .expect("no notification within 10 s")
            .unwrap()
    }

    // An entry: the change logs, not the bundle.
    stores[0]
        .create_entry(&entry("e1", "/w", &["t:a"]))
        .await
        .unwrap();
    assert_eq!(
        recv_within(&mut listener).await,
        Woken {
            logs: true,
            bundle: false,
            federation: false,
        }
    );

    // A bundle that changes: the bundle, not the logs.
    let td = TrustDomain::new("example.org").unwrap();
    let (ca1, _) = ca_cert();
    let mut b = TrustBundle::new(td.clone());
    b.x509_authorities = vec![ca1];
    stores[0]
        .publish_bundle("s1", &b, unix_now())
        .await
        .unwrap();
    assert_eq!(
        recv_within(&mut listener).await,
        Woken {
            logs: false,
            bundle: true,
            federation: false,
        }
    );

    // Several writes before the listener reads: one wake-up names them all.
    stores[0]
        .create_entry(&entry("e2", "/w2", &["t:a"]))
        .await
        .unwrap();
    let (ca2, _) = ca_cert();
    b.x509_authorities.push(ca2);
    stores[0]
        .publish_bundle("s1", &b, unix_now())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut woken = recv_within(&mut listener).await;
    // The second notification may arrive just after the first was taken.
    if woken
        != (Woken {
            logs: true,
            bundle: true,
            federation: false,
        })
    {
        let more = recv_within(&mut listener).await;
        woken.logs |= more.logs;
        woken.bundle |= more.bundle;
    }
    assert_eq!(
        woken,
        Woken {
            logs: true,
            bundle: true,
            federation: false,
        }
    );

    // A read-only "write" (a prune that finds nothing) wakes nobody.
    stores[0].prune_expired_entries(0).await.unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv())
            .await
            .is_err(),
        "a transaction that wrote nothing sent a notification"
    );

    // SQLite, shared by no other server, has nothing to listen to.
    let (sqlite, _dir) = super::testing::sqlite_fixture().await;
    assert!(sqlite.change_listener().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_token_raced_on_two_servers_admits_exactly_one_agent() {
    let (stores, _pg) = postgres_servers(2).await;
    for round in 0..5u8 {
        let (id, h) = tok(round);
        stores[0]
            .create_join_token(&id, &h, 1_000, 0, None)
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(10));
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let ds = stores[i % 2].clone();
                let barrier = barrier.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    use_token(&ds, &id, &h, 10).await.is_ok()
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            wins += usize::from(t.await.unwrap());
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(stores[1].get_join_token(&id).await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_use_record_raced_on_two_servers_is_written_once() {
    let (stores, _pg) = postgres_servers(2).await;
    for round in 0..5 {
        let node = format!("i-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(10));
        let tasks: Vec<_> = (0..10u8)
            .map(|i| {
                let ds = stores[usize::from(i) % 2].clone();
                let barrier = barrier.clone();
                let node = node.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let won = ds
                        .save_new_attestation_state("aws_iid", &node, &[i])
                        .await
                        .unwrap();
                    (won, i)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (won, i) = t.await.unwrap();
            if won {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        assert_eq!(
            stores[0]
                .load_attestation_state("aws_iid", &node)
                .await
                .unwrap(),
            Some(vec![winners[0]]),
            "the winner's record is the one kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn similar_entries_raced_on_two_servers_store_exactly_one() {
    let (stores, _pg) = postgres_servers(2).await;
    for round in 0..5 {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = (0..2)
            .map(|i| {
                let ds = stores[i].clone();
                let barrier = barrier.clone();
                // Same SPIFFE ID, parent and selectors; different ids.
                let e = entry(&format!("r{round}-{i}"), &format!("/race{round}"), &["t:a"]);
                tokio::spawn(async move {
                    barrier.wait().await;
                    ds.create_entry(&e).await
                })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => created += 1,
                Err(e) => assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}"),
            }
        }
        assert_eq!(created, 1, "round {round}");
    }
    assert_eq!(
        stores[0]
            .list_entries(&EntryFilter::default())
            .await
            .unwrap()
            .len(),
        5
    );
}

/// SPIRE's "skipped events": a reader that follows the change log by id loses a change
/// when a transaction that drew a lower id commits after one that drew a higher id. Here
/// a write on server A holds its transaction open (its event drawn); a write on server B
/// waits for it instead of committing a later id first, and a reader on a third pool
/// never sees B's event before A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_on_two_servers_commit_in_event_id_order() {
    let (stores, _pg) = postgres_servers(3).await;
    let (a, b, reader) = (&stores[0], &stores[1], &stores[2]);

    let mut held = a.begin_write().await.unwrap();
    entries::insert_entry(&mut held, &entry("first", "/first", &["t:a"]), 1)
        .await
        .unwrap();

    let b2 = b.clone();
    let second =
        tokio::spawn(async move { b2.create_entry(&entry("second", "/second", &["t:b"])).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!second.is_finished(), "B's write waits for A's transaction");
    assert_eq!(reader.change_cursor().await.unwrap().entry_event, 0);
    assert!(events(reader).await.is_empty(), "nothing is visible yet");

    held.commit().await.unwrap();
    second.await.unwrap().unwrap();
    let seen = events(reader).await;
    let ids: Vec<&str> = seen.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_eq!(ids, ["first", "second"], "{seen:?}");
    assert!(seen[0].0 < seen[1].0, "ids in commit order: {seen:?}");
}

/// TLS to PostgreSQL: with `ca_file` the database's certificate must chain to it, and
/// (`verify-full`, the default with a CA file) name the host; the session is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_is_checked_against_the_ca_file_and_the_host_name() {
    let pg = hsm_sim::postgres::Postgres::start_tls(&["db.example.org"]).unwrap_or_else(|e| {
        panic!(
            "{e} (install it with `apt-get install -y {} openssl`, or run scripts/test.sh)",
            hsm_sim::postgres::POSTGRES_PACKAGES
        )
    });
    let db = pg.fresh_database().unwrap();
    let settings = |ssl_mode, ca_file: Option<std::path::PathBuf>| PostgresSettings {
        url: pg.url(&db),
        max_connections: 2,
        ssl_mode,
        ca_file,
        password: Password::File(pg.password_file()),
    };
    let open = |s: PostgresSettings| async move { Datastore::open_postgres(&s).await };

    // The right CA, the name not checked: connected, over TLS.
    let ds = open(settings(Some(SslMode::VerifyCa), Some(pg.ca_file())))
        .await
        .unwrap();
    let encrypted: bool = on_pool!(&ds.pool, p => {
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(p)
            .await
    })
    .unwrap();
    assert!(encrypted, "the session is TLS");
    ds.close().await;

    // verify-full: the certificate names db.example.org, not 127.0.0.1.
    let err = open(settings(Some(SslMode::VerifyFull), Some(pg.ca_file())))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("connecting to postgres://"), "{err}");
    assert!(err.contains(r#"not valid for name "127.0.0.1""#), "{err}");

    // Another CA: refused, whatever the name check.
    let other = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = p.self_signed(&other).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, other_ca.pem()).unwrap();
    let err = open(settings(Some(SslMode::VerifyCa), Some(other_file)))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("connecting to postgres://"), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(!err.contains(pg.password()), "{err}");
}

// ---------------------------------------------------------------- files

#[tokio::test]
async fn db_file_is_private_and_reopening_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("state/db");
    let path = sub.join("carapace.sqlite");
    let ds = Datastore::open(&path).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "db file");
    assert_eq!(mode(&sub), 0o700, "created directory");

    let e = full_entry();
    ds.create_entry(&e).await.unwrap();
    ds.upsert_attested_agent(&agent("/join_token/a", &["join_token:a"]))
        .await
        .unwrap();
    ds.save_ca_journal("s1", b"j").await.unwrap();
    assert_eq!(mode(&sub.join("carapace.sqlite-wal")), 0o600, "wal file");
    let journal_mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(sqlite(&ds))
        .await
        .unwrap();
    assert_eq!(journal_mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(sqlite(&ds))
        .await
        .unwrap();
    assert_eq!(fk, 1);
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(sqlite(&ds))
        .await
        .unwrap();
    assert_eq!(sync, 1, "NORMAL");
    ds.close().await;

    for _ in 0..2 {
        let ds = Datastore::open(&path).await.unwrap();
        assert_eq!(ds.get_entry(&e.id).await.unwrap().unwrap(), e);
        assert_eq!(ds.list_attested_agents().await.unwrap().len(), 1);
        assert_eq!(ds.load_ca_journal("s1").await.unwrap().unwrap(), b"j");
        assert_eq!(ds.change_cursor().await.unwrap().entry_event, 1);
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(sqlite(&ds))
            .await
            .unwrap();
        assert_eq!(
            applied,
            SQLITE_MIGRATOR.iter().count() as i64,
            "each migration applied once"
        );
        ds.close().await;
    }
    assert_eq!(mode(&path), 0o600, "still private");
}

#[tokio::test]
async fn in_memory_clones_share_one_database() {
    let ds = mem().await;
    let other = ds.clone();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let ds = ds.clone();
            tokio::spawn(async move {
                ds.create_entry(&entry(&format!("e{i}"), &format!("/w{i}"), &["t:a"]))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        other.count_entries(&EntryFilter::default()).await.unwrap(),
        10
    );
    // Each in-memory datastore is its own database.
    assert_eq!(
        mem()
            .await
            .count_entries(&EntryFilter::default())
            .await
            .unwrap(),
        0
    );
}

async fn attestation_state_is_kept_per_attestor_and_node(ds: Datastore) {
    assert_eq!(ds.load_attestation_state("tpm", "ek1").await.unwrap(), None);
    ds.save_attestation_state("tpm", "ek1", b"one")
        .await
        .unwrap();
    ds.save_attestation_state("other", "ek1", b"other")
        .await
        .unwrap();
    ds.save_attestation_state("tpm", "ek1", b"two")
        .await
        .unwrap();
    assert_eq!(
        ds.load_attestation_state("tpm", "ek1")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"two"[..])
    );
    assert_eq!(
        ds.load_attestation_state("other", "ek1")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"other"[..])
    );
}

async fn eviction_deletes_the_named_state_record_and_nothing_else(ds: Datastore) {
    let cloud = agent(
        "/aws_iid/123456789012/us-east-1/i-1",
        &["aws_iid:account:1"],
    );
    let tpm = agent("/tpm/abc", &["tpm:pcr:sha256:0:00"]);
    for (a, attestor, key) in [
        (&cloud, "aws_iid", "123456789012/us-east-1/i-1"),
        (&tpm, "tpm", "abc"),
    ] {
        ds.upsert_attested_agent(a).await.unwrap();
        assert!(
            ds.save_new_attestation_state(attestor, key, b"x")
                .await
                .unwrap()
        );
    }
    let forget = StateKey {
        attestor: "aws_iid".into(),
        node_key: "123456789012/us-east-1/i-1".into(),
    };
    ds.delete_attested_agent(&cloud.spiffe_id, Some(&forget))
        .await
        .unwrap();
    ds.delete_attested_agent(&tpm.spiffe_id, None)
        .await
        .unwrap();
    // The instance may attest once more; the TPM's clock record is kept.
    assert_eq!(
        ds.load_attestation_state("aws_iid", "123456789012/us-east-1/i-1")
            .await
            .unwrap(),
        None
    );
    assert!(
        ds.load_attestation_state("tpm", "abc")
            .await
            .unwrap()
            .is_some()
    );
}

async fn save_new_attestation_state_inserts_once_and_keeps_the_first(ds: Datastore) {
    assert!(
        ds.save_new_attestation_state("aws_iid", "i-1", b"first")
            .await
            .unwrap()
    );
    assert!(
        !ds.save_new_attestation_state("aws_iid", "i-1", b"second")
            .await
            .unwrap()
    );
    assert!(
        ds.save_new_attestation_state("gcp_iit", "i-1", b"other")
            .await
            .unwrap()
    );
    assert_eq!(
        ds.load_attestation_state("aws_iid", "i-1")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"first"[..])
    );
    // Concurrent first attestations of one instance: exactly one wins.
    let tries = (0..8).map(|i| {
        let ds = ds.clone();
        tokio::spawn(async move {
            ds.save_new_attestation_state("azure_msi", "p", format!("{i}").as_bytes())
                .await
                .unwrap()
        })
    });
    let won = futures::future::join_all(tries)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(won, 1);
}

// ---------------------------------------------------------------- faults: a full disk

/// Rows in every table an entry write touches.
async fn entry_rows(ds: &Datastore) -> [i64; 4] {
    [
        count(ds, "entries").await,
        count(ds, "entry_selectors").await,
        count(ds, "entry_dns_names").await,
        count(ds, "entry_events").await,
    ]
}

/// An entry with enough selectors and DNS names that writing it needs new pages.
fn big_entry(id: &str) -> RegistrationEntry {
    let selectors: Vec<String> = (0..100).map(|i| format!("host:label:{i:0>40}")).collect();
    let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
    let mut e = entry(id, &format!("/big/{id}"), &selectors);
    e.dns_names = (0..20)
        .map(|i| format!("n{i}.{}.example.org", "x".repeat(40)))
        .collect();
    e
}

fn assert_disk_full(r: Result<()>) {
    assert!(
        matches!(&r, Err(Error::Datastore(m)) if m.contains("database or disk is full")),
        "expected a disk-full error, got {r:?}"
    );
}

/// A datastore in a 2 MiB tmpfs of its own.
async fn on_small_disk() -> (hsm_sim::tmpfs::Tmpfs, Datastore) {
    let disk = hsm_sim::tmpfs::Tmpfs::mount(2 << 20).unwrap();
    let ds = Datastore::open(&disk.path().join("ds.sqlite"))
        .await
        .unwrap();
    (disk, ds)
}

#[tokio::test]
async fn after_a_full_disk_writes_recover_without_a_restart() {
    let (disk, ds) = on_small_disk().await;
    ds.create_entry(&big_entry("before")).await.unwrap();
    let rows = entry_rows(&ds).await;
    assert_eq!(ds.write_health(), Ok(()));

    disk.fill().unwrap();
    // More failed writes than the pool has connections: each one a connection could be
    // left poisoned by.
    for i in 0..(2 * DEFAULT_MAX_CONNECTIONS) {
        assert_disk_full(ds.create_entry(&big_entry(&format!("full-{i}"))).await);
    }
    assert_eq!(entry_rows(&ds).await, rows, "nothing half-written");
    let health = ds.write_health().unwrap_err();
    assert!(health.contains("database or disk is full"), "{health}");

    disk.free().unwrap();
    for i in 0..(DEFAULT_MAX_CONNECTIONS + 2) {
        let e = entry(
            &format!("after-{i}"),
            &format!("/after/{i}"),
            &["unix:uid:1"],
        );
        ds.create_entry(&e).await.unwrap();
        assert_eq!(ds.get_entry(&e.id).await.unwrap(), Some(e));
    }
    assert_eq!(ds.write_health(), Ok(()));
    assert_eq!(
        count(&ds, "entries").await,
        rows[0] + i64::from(DEFAULT_MAX_CONNECTIONS) + 2
    );
    ds.close().await;
}

#[tokio::test]
async fn a_write_refused_for_space_mid_transaction_leaves_nothing_behind() {
    // `max_page_count` makes SQLite report SQLITE_FULL from inside a statement (the
    // selectors' insert), where a full disk reports it at COMMIT.
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(&dir.path().join("ds.sqlite"))
        .await
        .unwrap();
    ds.create_entry(&big_entry("before")).await.unwrap();
    let rows = entry_rows(&ds).await;
    set_max_page_count(&ds, 1).await;
    for i in 0..(2 * DEFAULT_MAX_CONNECTIONS) {
        assert_disk_full(ds.create_entry(&big_entry(&format!("full-{i}"))).await);
        assert_eq!(entry_rows(&ds).await, rows, "write {i}");
    }
    set_max_page_count(&ds, 1_000_000).await;
    ds.create_entry(&big_entry("after")).await.unwrap();
    assert_eq!(entry_rows(&ds).await[0], rows[0] + 1);
}

/// Sets `PRAGMA max_page_count` on every connection of the pool (holding all of them at
/// once, so each is reached): `1` makes the database full at its current size (SQLite
/// never lowers the limit below the size), a large value frees the space again.
async fn set_max_page_count(ds: &Datastore, pages: u32) {
    let mut held = Vec::new();
    for _ in 0..DEFAULT_MAX_CONNECTIONS {
        let mut conn = sqlite(ds).acquire().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        held.push(conn);
    }
}

#[tokio::test]
async fn a_join_token_whose_agent_write_failed_is_still_usable() {
    let (disk, ds) = on_small_disk().await;
    let (id, h) = tok(9);
    let now = unix_now();
    ds.create_join_token(&id, &h, now + 600, now, None)
        .await
        .unwrap();
    let token = PresentedToken {
        id: id.clone(),
        secret_hash: h,
    };
    let mut agent = token_agent(&id, now);
    // Enough node selectors that the agent record needs new pages.
    agent.selectors = (0..200)
        .map(|i| sel(&format!("host:label:{i:0>60}")))
        .collect();

    disk.fill().unwrap();
    for _ in 0..3 {
        assert_disk_full(ds.attest_agent(&agent, Some(&token)).await);
        // The delete was not committed: the token is there, the agent is not.
        assert!(ds.get_join_token(&id).await.unwrap().is_some());
        assert_eq!(count(&ds, "attested_agents").await, 0);
        assert_eq!(count(&ds, "node_selectors").await, 0);
    }

    disk.free().unwrap();
    ds.attest_agent(&agent, Some(&token)).await.unwrap();
    let stored = ds.get_attested_agent(&agent.spiffe_id).await.unwrap();
    assert_eq!(stored, Some(agent.clone()));
    assert_eq!(ds.get_join_token(&id).await.unwrap(), None);
    assert_refused(ds.attest_agent(&agent, Some(&token)).await);
    ds.close().await;
}

// ---------------------------------------------------------------- federation

mod federation {
    use super::*;
    use crate::federation::{ForeignBundle, Origin, Profile, Relationship, Source, Status, Stored};

    on_both_engines!(
        federation_relationships_round_trip_in_both_profiles,
        config_federations_replace_only_config_ones_and_refuse_an_api_trust_domain,
        deleting_a_federation_deletes_its_status_and_its_bundle,
        federation_status_round_trip,
        a_static_bundle_always_replaces_the_stored_one,
        fetched_bundles_follow_the_sequence_rule,
        corrupt_federation_rows_are_datastore_errors,
    );

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn web(name: &str, roots_pem: Option<&str>, source: Source) -> Relationship {
        Relationship {
            trust_domain: td(name),
            url: format!("https://bundle.{name}:8443/"),
            profile: Profile::HttpsWeb {
                roots_pem: roots_pem.map(str::to_owned),
            },
            source,
        }
    }

    fn spiffe(name: &str, source: Source) -> Relationship {
        Relationship {
            trust_domain: td(name),
            url: format!("https://{name}:8443"),
            profile: Profile::HttpsSpiffe {
                endpoint_id: sid(&format!("spiffe://{name}/spire/server")),
            },
            source,
        }
    }

    /// A bundle of `name` with `x509` CA certificates and one JWT key per kid.
    fn foreign(
        name: &str,
        sequence: u64,
        x509: Vec<Vec<u8>>,
        kids: &[(&str, Vec<u8>)],
    ) -> TrustBundle {
        let mut b = TrustBundle::new(td(name));
        b.x509_authorities = x509;
        b.jwt_authorities = kids
            .iter()
            .map(|(kid, der)| jwt_key(kid, der.clone(), None))
            .collect();
        b.sequence = sequence;
        b
    }

    async fn rels(ds: &Datastore) -> Vec<Relationship> {
        ds.list_federations()
            .await
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    async fn federation_relationships_round_trip_in_both_profiles(ds: Datastore) {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        // Names that PostgreSQL's language collations and a byte order sort differently.
        let all = [
            web("ab.org", Some(pem), Source::Api),
            spiffe("a.org", Source::Api),
            web("a-z.org", None, Source::Config),
        ];
        for r in &all {
            ds.create_federation(r).await.unwrap();
        }
        for r in &all {
            assert_eq!(
                ds.get_federation(&r.trust_domain).await.unwrap(),
                Some((r.clone(), Status::default())),
            );
        }
        let names: Vec<String> = rels(&ds)
            .await
            .iter()
            .map(|r| r.trust_domain.name().to_owned())
            .collect();
        assert_eq!(
            names,
            ["a-z.org", "a.org", "ab.org"],
            "by trust domain name"
        );
        assert_eq!(ds.get_federation(&td("none.org")).await.unwrap(), None);

        // Twice: refused naming the trust domain, the first kept.
        let mut again = spiffe("ab.org", Source::Api);
        again.url = "https://elsewhere".into();
        let err = ds.create_federation(&again).await.unwrap_err();
        assert!(
            matches!(&err, Error::AlreadyExists(m) if m.contains("ab.org")),
            "{err:?}"
        );
        assert_eq!(rels(&ds).await[2], all[0]);

        // Update: another URL and the other profile, both ways.
        let mut changed = spiffe("ab.org", Source::Api);
        changed.url = "https://ab.org:9443/bundle".into();
        ds.update_federation(&changed).await.unwrap();
        let mut changed2 = web("a.org", Some(pem), Source::Api);
        changed2.url = "https://web.a.org/".into();
        ds.update_federation(&changed2).await.unwrap();
        assert_eq!(rels(&ds).await, [all[2].clone(), changed2, changed]);

        // Of a missing one: NotFound, nothing created.
        let err = ds
            .update_federation(&web("none.org", None, Source::Api))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::NotFound(m) if m.contains("none.org")),
            "{err:?}"
        );
        // The API cannot take over a config relationship.
        let err = ds
            .update_federation(&web("a-z.org", Some(pem), Source::Api))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("a-z.org") && m.contains("config file")),
            "{err:?}"
        );
        assert_eq!(rels(&ds).await[0], all[2]);
        assert_eq!(count(&ds, "federation_relationships").await, 3);

        assert!(ds.delete_federation(&td("a.org")).await.unwrap());
        assert!(!ds.delete_federation(&td("a.org")).await.unwrap());
        assert_eq!(ds.get_federation(&td("a.org")).await.unwrap(), None);
        assert_eq!(count(&ds, "federation_relationships").await, 2);
    }

    async fn config_federations_replace_only_config_ones_and_refuse_an_api_trust_domain(
        ds: Datastore,
    ) {
        let api = spiffe("api.org", Source::Api);
        ds.create_federation(&api).await.unwrap();
        let c1 = web("c1.org", None, Source::Config);
        let c2 = spiffe("c2.org", Source::Config);
        ds.replace_config_federations(&[c1.clone(), c2.clone()])
            .await
            .unwrap();
        assert_eq!(rels(&ds).await, [api.clone(), c1.clone(), c2.clone()]);
        let seen = Status {
            last_success_at: Some(10),
            next_refresh_at: Some(20),
            ..Status::default()
        };
        ds.set_federation_status(&c1.trust_domain, &seen)
            .await
            .unwrap();
        let (ca, _) = ca_cert();
        ds.set_static_bundle(&foreign("c2.org", 1, vec![ca], &[]), 5)
            .await
            .unwrap();

        // c1 changed, c2 gone, c3 new; the API's stays.
        let mut c1b = c1.clone();
        c1b.url = "https://c1.org/other".into();
        let c3 = web("c3.org", Some("roots"), Source::Config);
        ds.replace_config_federations(&[c3.clone(), c1b.clone()])
            .await
            .unwrap();
        assert_eq!(rels(&ds).await, [api.clone(), c1b.clone(), c3.clone()]);
        assert_eq!(
            ds.get_federation(&c1.trust_domain)
                .await
                .unwrap()
                .unwrap()
                .1,
            seen,
            "a replaced relationship keeps its status"
        );
        assert!(
            ds.foreign_bundle(&c2.trust_domain).await.unwrap().is_some(),
            "a config relationship's bundle stays when it is dropped"
        );

        // Naming the API's trust domain: refused, naming it, and nothing changes.
        let before = ds.list_federations().await.unwrap();
        let c4 = web("c4.org", None, Source::Config);
        let err = ds
            .replace_config_federations(&[
                c4.clone(),
                web("api.org", None, Source::Config),
                c1.clone(),
            ])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("api.org") && m.contains("admin API")),
            "{err:?}"
        );
        assert_eq!(ds.list_federations().await.unwrap(), before);

        // Malformed sets: refused, nothing changes.
        let err = ds
            .replace_config_federations(&[c4.clone(), web("c5.org", None, Source::Api)])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("c5.org")),
            "{err:?}"
        );
        let err = ds
            .replace_config_federations(&[c4.clone(), spiffe("c4.org", Source::Config)])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("c4.org")),
            "{err:?}"
        );
        assert_eq!(ds.list_federations().await.unwrap(), before);

        // None left in the config file: only the API's stays.
        ds.replace_config_federations(&[]).await.unwrap();
        assert_eq!(rels(&ds).await, [api]);
    }

    async fn deleting_a_federation_deletes_its_status_and_its_bundle(ds: Datastore) {
        let gone = spiffe("gone.org", Source::Api);
        let kept = web("kept.org", None, Source::Api);
        let (ca1, k1) = ca_cert();
        for r in [&gone, &kept] {
            ds.create_federation(r).await.unwrap();
            ds.set_federation_status(
                &r.trust_domain,
                &Status {
                    last_error: Some("down".into()),
                    last_error_at: Some(7),
                    ..Status::default()
                },
            )
            .await
            .unwrap();
            let b = foreign(
                r.trust_domain.name(),
                3,
                vec![ca1.clone()],
                &[("k", k1.clone())],
            );
            assert_eq!(
                ds.store_fetched_bundle(&b, 100).await.unwrap(),
                Stored::Replaced
            );
        }
        assert!(ds.delete_federation(&gone.trust_domain).await.unwrap());
        assert_eq!(ds.get_federation(&gone.trust_domain).await.unwrap(), None);
        assert_eq!(ds.foreign_bundle(&gone.trust_domain).await.unwrap(), None);
        assert_eq!(count(&ds, "federated_bundles").await, 1);
        // Created again, it starts with no status.
        ds.create_federation(&gone).await.unwrap();
        assert_eq!(
            ds.get_federation(&gone.trust_domain).await.unwrap(),
            Some((gone.clone(), Status::default()))
        );
        // The other is untouched.
        let (_, status) = ds
            .get_federation(&kept.trust_domain)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.last_error.as_deref(), Some("down"));
        assert!(
            ds.foreign_bundle(&kept.trust_domain)
                .await
                .unwrap()
                .is_some()
        );
    }

    async fn federation_status_round_trip(ds: Datastore) {
        let r = web("peer.org", None, Source::Api);
        ds.create_federation(&r).await.unwrap();
        let full = Status {
            last_success_at: Some(1_700_000_000),
            last_error: Some("connecting to https://bundle.peer.org:8443/: refused".into()),
            last_error_at: Some(1_700_000_100),
            next_refresh_at: Some(1_700_000_400),
        };
        ds.set_federation_status(&r.trust_domain, &full)
            .await
            .unwrap();
        assert_eq!(
            ds.get_federation(&r.trust_domain).await.unwrap(),
            Some((r.clone(), full.clone()))
        );
        let partial = Status {
            last_success_at: Some(1_700_000_500),
            next_refresh_at: Some(1_700_000_800),
            ..Status::default()
        };
        ds.set_federation_status(&r.trust_domain, &partial)
            .await
            .unwrap();
        assert_eq!(ds.list_federations().await.unwrap(), [(r.clone(), partial)]);
        // Of a relationship that is gone: nothing, and nothing created.
        ds.set_federation_status(&td("gone.org"), &full)
            .await
            .unwrap();
        assert_eq!(count(&ds, "federation_relationships").await, 1);
    }

    async fn a_static_bundle_always_replaces_the_stored_one(ds: Datastore) {
        let (ca1, k1) = ca_cert();
        let (ca2, k2) = ca_cert();
        let mut b = foreign(
            "peer.org",
            10,
            vec![ca1.clone(), ca2.clone()],
            &[("a", k1.clone()), ("b", k2.clone())],
        );
        b.refresh_hint = Some(300);
        ds.set_static_bundle(&b, 1_000).await.unwrap();
        assert_eq!(
            ds.foreign_bundle(&td("peer.org")).await.unwrap(),
            Some(ForeignBundle {
                bundle: b.clone(),
                origin: Origin::Static,
                updated_at: 1_000,
            })
        );
        // A lower sequence, other keys: it replaces all the same.
        let low = foreign("peer.org", 2, vec![ca2.clone()], &[]);
        ds.set_static_bundle(&low, 1_001).await.unwrap();
        let stored = ds.foreign_bundle(&td("peer.org")).await.unwrap().unwrap();
        assert_eq!(
            (stored.bundle, stored.origin),
            (low.clone(), Origin::Static)
        );

        // Over a fetched bundle too.
        ds.create_federation(&web("peer.org", None, Source::Api))
            .await
            .unwrap();
        let fetched = foreign("peer.org", 50, vec![ca1.clone()], &[("a", k1.clone())]);
        assert_eq!(
            ds.store_fetched_bundle(&fetched, 1_002).await.unwrap(),
            Stored::Replaced
        );
        let stored = ds.foreign_bundle(&td("peer.org")).await.unwrap().unwrap();
        assert_eq!(stored.origin, Origin::Fetched);
        let mut mine = foreign("peer.org", 0, vec![ca2.clone()], &[("b", k2.clone())]);
        // What the SPIFFE format cannot carry is not kept.
        mine.jwt_authorities[0].expires_at = Some(2_000_000_000);
        mine.tainted_x509_authorities = vec![ca2.clone()];
        ds.set_static_bundle(&mine, 1_003).await.unwrap();
        let stored = ds.foreign_bundle(&td("peer.org")).await.unwrap().unwrap();
        assert_eq!(
            stored,
            ForeignBundle {
                bundle: foreign("peer.org", 0, vec![ca2.clone()], &[("b", k2.clone())]),
                origin: Origin::Static,
                updated_at: 1_003,
            }
        );

        // Bundles without a relationship are listed too, by trust domain name; deleting.
        let other = foreign("a-peer.org", 1, vec![ca1.clone()], &[]);
        ds.set_static_bundle(&other, 1_004).await.unwrap();
        let names: Vec<String> = ds
            .list_foreign_bundles()
            .await
            .unwrap()
            .iter()
            .map(|f| f.bundle.trust_domain().name().to_owned())
            .collect();
        assert_eq!(names, ["a-peer.org", "peer.org"]);
        assert!(ds.delete_foreign_bundle(&td("a-peer.org")).await.unwrap());
        assert!(!ds.delete_foreign_bundle(&td("a-peer.org")).await.unwrap());
        assert_eq!(ds.foreign_bundle(&td("a-peer.org")).await.unwrap(), None);
        assert_eq!(ds.list_foreign_bundles().await.unwrap().len(), 1);
        assert!(
            ds.get_federation(&td("peer.org")).await.unwrap().is_some(),
            "deleting a bundle leaves the relationship"
        );
    }

    async fn fetched_bundles_follow_the_sequence_rule(ds: Datastore) {
        let peer = td("peer.org");
        let (ca1, k1) = ca_cert();
        let (ca2, k2) = ca_cert();
        let (ca3, _) = ca_cert();
        let one = |seq| foreign("peer.org", seq, vec![ca1.clone()], &[("a", k1.clone())]);
        let two = |seq| {
            foreign(
                "peer.org",
                seq,
                vec![ca1.clone(), ca2.clone()],
                &[("a", k1.clone()), ("b", k2.clone())],
            )
        };
        let three = |seq| foreign("peer.org", seq, vec![ca3.clone()], &[]);
        let stored = || async { ds.foreign_bundle(&peer).await.unwrap().unwrap() };

        // No relationship: refused, nothing stored.
        let out = ds.store_fetched_bundle(&one(5), 100).await.unwrap();
        assert!(
            matches!(&out, Stored::Refused(m) if m.contains("no federation relationship") && m.contains("peer.org")),
            "{out:?}"
        );
        assert_eq!(ds.foreign_bundle(&peer).await.unwrap(), None);
        ds.create_federation(&spiffe("peer.org", Source::Api))
            .await
            .unwrap();

        // None stored: stored.
        assert_eq!(
            ds.store_fetched_bundle(&one(5), 100).await.unwrap(),
            Stored::Replaced
        );
        let s = stored().await;
        assert_eq!(
            (s.bundle, s.origin, s.updated_at),
            (one(5), Origin::Fetched, 100)
        );

        // Higher: replaced.
        assert_eq!(
            ds.store_fetched_bundle(&two(6), 101).await.unwrap(),
            Stored::Replaced
        );
        assert_eq!(stored().await.bundle, two(6));

        // Lower, other keys: refused, saying both sequences; kept.
        let out = ds.store_fetched_bundle(&one(4), 102).await.unwrap();
        assert!(
            matches!(&out, Stored::Refused(m) if m.contains("sequence 4 is lower than the stored bundle's 6")),
            "{out:?}"
        );
        assert_eq!(
            (stored().await.bundle, stored().await.updated_at),
            (two(6), 101)
        );

        // Equal, same keys in another order: unchanged, nothing written.
        let mut reordered = two(6);
        reordered.x509_authorities.reverse();
        reordered.jwt_authorities.reverse();
        assert_eq!(
            ds.store_fetched_bundle(&reordered, 103).await.unwrap(),
            Stored::Unchanged
        );
        assert_eq!(
            (stored().await.bundle, stored().await.updated_at),
            (two(6), 101)
        );

        // Equal, other keys: refused; kept.
        let out = ds.store_fetched_bundle(&three(6), 104).await.unwrap();
        assert!(
            matches!(&out, Stored::Refused(m) if m.contains("sequence 6") && m.contains("other keys")),
            "{out:?}"
        );
        assert_eq!(stored().await.bundle, two(6));

        // Same keys, a new refresh hint: unchanged, the hint written.
        let mut hinted = two(6);
        hinted.refresh_hint = Some(60);
        assert_eq!(
            ds.store_fetched_bundle(&hinted, 105).await.unwrap(),
            Stored::Unchanged
        );
        assert_eq!(stored().await.bundle, hinted);
        // Same keys, a higher sequence: unchanged, the sequence written.
        let mut later = hinted.clone();
        later.sequence = 9;
        assert_eq!(
            ds.store_fetched_bundle(&later, 106).await.unwrap(),
            Stored::Unchanged
        );
        assert_eq!(stored().await.bundle, later);
        // Same keys, a lower sequence: unchanged, the sequence kept.
        let mut earlier = hinted.clone();
        earlier.sequence = 3;
        assert_eq!(
            ds.store_fetched_bundle(&earlier, 107).await.unwrap(),
            Stored::Unchanged
        );
        assert_eq!(
            (stored().await.bundle, stored().await.updated_at),
            (later.clone(), 106)
        );

        // No sequence (0): the newest wins, whatever was stored.
        assert_eq!(
            ds.store_fetched_bundle(&three(0), 108).await.unwrap(),
            Stored::Replaced
        );
        assert_eq!(stored().await.bundle, three(0));
        assert_eq!(
            ds.store_fetched_bundle(&one(0), 109).await.unwrap(),
            Stored::Replaced
        );
        assert_eq!(stored().await.bundle, one(0));

        // A static bundle yields by the same rule.
        ds.set_static_bundle(&two(20), 110).await.unwrap();
        let out = ds.store_fetched_bundle(&three(19), 111).await.unwrap();
        assert!(matches!(out, Stored::Refused(_)), "{out:?}");
        let out = ds.store_fetched_bundle(&three(20), 111).await.unwrap();
        assert!(matches!(out, Stored::Refused(_)), "{out:?}");
        let s = stored().await;
        assert_eq!((s.bundle, s.origin), (two(20), Origin::Static));
        assert_eq!(
            ds.store_fetched_bundle(&two(20), 112).await.unwrap(),
            Stored::Unchanged
        );
        assert_eq!(stored().await.origin, Origin::Static);
        assert_eq!(
            ds.store_fetched_bundle(&three(21), 113).await.unwrap(),
            Stored::Replaced
        );
        let s = stored().await;
        assert_eq!((s.bundle, s.origin), (three(21), Origin::Fetched));
        ds.set_static_bundle(&two(30), 114).await.unwrap();
        assert_eq!(
            ds.store_fetched_bundle(&one(0), 115).await.unwrap(),
            Stored::Replaced
        );
        let s = stored().await;
        assert_eq!((s.bundle, s.origin), (one(0), Origin::Fetched));

        // A sequence past the largest BIGINT is kept whole in the bundle.
        assert_eq!(
            ds.store_fetched_bundle(&three(u64::MAX), 116)
                .await
                .unwrap(),
            Stored::Replaced
        );
        assert_eq!(stored().await.bundle, three(u64::MAX));
        assert_eq!(count(&ds, "federated_bundles").await, 1);
    }

    async fn corrupt_federation_rows_are_datastore_errors(ds: Datastore) {
        ds.create_federation(&spiffe("peer.org", Source::Api))
            .await
            .unwrap();
        exec(
            &ds,
            "UPDATE federation_relationships SET endpoint_spiffe_id = 'not an id'",
        )
        .await;
        for err in [
            ds.get_federation(&td("peer.org")).await.unwrap_err(),
            ds.list_federations().await.unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::Datastore(m) if m.contains("federation_relationships trust_domain=\"peer.org\"")),
                "{err:?}"
            );
        }
        exec(
            &ds,
            "UPDATE federation_relationships SET endpoint_spiffe_id = 'spiffe://peer.org/x', \
             trust_domain = 'Not A Trust Domain'",
        )
        .await;
        let err = ds.list_federations().await.unwrap_err();
        assert!(
            matches!(&err, Error::Datastore(m) if m.contains("trust_domain=\"Not A Trust Domain\"")),
            "{err:?}"
        );

        let (ca, _) = ca_cert();
        ds.set_static_bundle(&foreign("peer.org", 1, vec![ca], &[]), 1)
            .await
            .unwrap();
        exec(&ds, "UPDATE federated_bundles SET data = '{\"keys\": 3}'").await;
        for err in [
            ds.foreign_bundle(&td("peer.org")).await.unwrap_err(),
            ds.list_foreign_bundles().await.unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::Datastore(m) if m.contains("federated_bundles trust_domain=\"peer.org\"")),
                "{err:?}"
            );
        }
    }

    /// The `federation` notification: sent by each write that changes a relationship or a
    /// foreign bundle, not by status writes nor by a refused bundle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn federation_writes_wake_another_servers_listener() {
        let (stores, _pg) = postgres_servers(2).await;
        let ds = &stores[0];
        let mut listener = stores[1].change_listener().await.unwrap().unwrap();
        let federation = Woken {
            logs: false,
            bundle: false,
            federation: true,
        };
        async fn next(l: &mut ChangeListener) -> Woken {
            tokio::time::timeout(Duration::from_secs(10), l.recv())
                .await
                .expect("no notification within 10 s")
                .unwrap()
        }
        async fn none(l: &mut ChangeListener, what: &str) {
            assert!(
                tokio::time::timeout(Duration::from_millis(500), l.recv())
                    .await
                    .is_err(),
                "{what} sent a notification"
            );
        }
        let r = web("peer.org", None, Source::Api);
        ds.create_federation(&r).await.unwrap();
        assert_eq!(next(&mut listener).await, federation);
        ds.set_federation_status(&r.trust_domain, &Status::default())
            .await
            .unwrap();
        none(&mut listener, "a status write").await;
        let mut changed = r.clone();
        changed.url = "https://peer.org/b".into();
        ds.update_federation(&changed).await.unwrap();
        assert_eq!(next(&mut listener).await, federation);
        ds.update_federation(&changed).await.unwrap();
        none(&mut listener, "an update that changes nothing").await;
        ds.replace_config_federations(&[web("c.org", None, Source::Config)])
            .await
            .unwrap();
        assert_eq!(next(&mut listener).await, federation);

        let (ca, _) = ca_cert();
        let b = foreign("peer.org", 2, vec![ca.clone()], &[]);
        assert_eq!(
            ds.store_fetched_bundle(&b, 1).await.unwrap(),
            Stored::Replaced
        );
        assert_eq!(next(&mut listener).await, federation);
        assert_eq!(
            ds.store_fetched_bundle(&b, 2).await.unwrap(),
            Stored::Unchanged
        );
        none(&mut listener, "an unchanged bundle").await;
        let (ca2, _) = ca_cert();
        let lower = foreign("peer.org", 1, vec![ca2], &[]);
        assert!(matches!(
            ds.store_fetched_bundle(&lower, 3).await.unwrap(),
            Stored::Refused(_)
        ));
        none(&mut listener, "a refused bundle").await;
        ds.set_static_bundle(&lower, 4).await.unwrap();
        assert_eq!(next(&mut listener).await, federation);
        ds.delete_foreign_bundle(&td("peer.org")).await.unwrap();
        assert_eq!(next(&mut listener).await, federation);
        ds.delete_federation(&td("peer.org")).await.unwrap();
        assert_eq!(next(&mut listener).await, federation);
    }

    /// Two servers storing fetched bundles at once: the sequence never goes back,
    /// whichever commits first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fetched_bundles_raced_on_two_servers_keep_the_highest_sequence() {
        let (stores, _pg) = postgres_servers(2).await;
        stores[0]
            .create_federation(&spiffe("peer.org", Source::Api))
            .await
            .unwrap();
        let mut cas = Vec::new();
        for _ in 0..4 {
            cas.push(ca_cert().0);
        }
        for round in 0..10u64 {
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let base = 10 + round * 2;
            let tasks: Vec<_> = (0..2u64)
                .map(|i| {
                    let ds = stores[usize::try_from(i).unwrap()].clone();
                    let barrier = barrier.clone();
                    // Server 0 the lower sequence on even rounds, the higher on odd ones.
                    let seq = base + ((i + round) % 2);
                    let ca = cas[usize::try_from((round * 2 + i) % 4).unwrap()].clone();
                    let b = foreign("peer.org", seq, vec![ca], &[]);
                    tokio::spawn(async move {
                        barrier.wait().await;
                        ds.store_fetched_bundle(&b, 1).await
                    })
                })
                .collect();
            for t in tasks {
                let out = t.await.unwrap().unwrap();
                assert!(!matches!(out, Stored::Unchanged), "round {round}: {out:?}");
            }
            let kept = stores[1]
                .foreign_bundle(&td("peer.org"))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(kept.bundle.sequence, base + 1, "round {round}");
        }
    }
}
