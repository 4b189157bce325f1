//! Idempotency claims straight against the store, on SQLite and PostgreSQL:
//! many claimants of one key at once, leases, and release/complete touching
//! only the caller's own claim.

use std::time::Duration;

use gateway::store::{Claimed, RunRecord, Store};
use time::OffsetDateTime;
use wire::ids::{FlowId, RunId, TenantId};
use wire::run::RunStatus;

use crate::front_door::{PgDatabase, StoreKind};

const TTL: Duration = Duration::from_secs(3600);

async fn store(kind: StoreKind) -> (Store, Option<PgDatabase>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (url, db) = match kind {
        StoreKind::Sqlite => (
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("claims.db").display()
            ),
            None,
        ),
        StoreKind::Postgres => {
            let db = PgDatabase::create().await;
            (db.url.clone(), Some(db))
        }
    };
    (Store::connect(&url).await.expect("store"), db, dir)
}

fn run(tenant: &TenantId) -> RunRecord {
    let now = OffsetDateTime::now_utc();
    RunRecord {
        run_id: RunId::generate(uuid::Uuid::now_v7()),
        tenant_id: tenant.clone(),
        flow_id: FlowId::parse("f").expect("flow"),
        status: RunStatus::Accepted,
        steps: Vec::new(),
        results: Vec::new(),
        provider: None,
        error: None,
        trace_id: None,
        provider_hint: None,
        trace_context: None,
        handed_off_at: None,
        created_at: now,
        updated_at: now,
    }
}

/// 24 claimants of one key at once, each doing what a request does (claim,
/// then store + complete; when taken, read what the key stands for), over
/// many rounds: exactly one run is stored per key and everyone agrees on it.
async fn concurrent_claims(kind: StoreKind) {
    let (store, db, _dir) = store(kind).await;
    let tenant = TenantId::parse("demo").expect("tenant");
    for round in 0..15 {
        let key = format!("key-{round}");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..24 {
            let (store, tenant, key) = (store.clone(), tenant.clone(), key.clone());
            set.spawn(async move {
                let record = run(&tenant);
                loop {
                    let claimed = store
                        .claim_idempotency_key(
                            &tenant,
                            &key,
                            "h",
                            &record.run_id,
                            TTL,
                            Duration::from_secs(10),
                        )
                        .await
                        .expect("claim");
                    match claimed {
                        Claimed::Ours => {
                            assert!(store.insert(&record, Some(&key)).await.expect("insert"));
                            return record.run_id;
                        }
                        Claimed::Taken(existing) if existing.status_code.is_some() => {
                            return existing.run_id;
                        }
                        Claimed::Taken(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            });
        }
        let mut ids = std::collections::BTreeSet::new();
        while let Some(id) = set.join_next().await {
            ids.insert(id.expect("claimant").to_string());
        }
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
        let id = RunId::parse(ids.into_iter().next().expect("one id")).expect("run id");
        assert!(store.exists(&tenant, &id).await.expect("exists"));
    }
    let stored = store.pending_count().await.expect("count");
    assert_eq!(stored, 15, "one run per key, nothing else stored");
    if let Some(db) = db {
        db.drop_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_one_run_under_concurrent_claims_on_sqlite() {
    concurrent_claims(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_one_run_under_concurrent_claims_on_postgres() {
    concurrent_claims(StoreKind::Postgres).await;
}

/// A claim whose holder died is taken over after its lease; the old holder,
/// if it comes back, can neither complete nor release the new claim.
async fn leases(kind: StoreKind) {
    let (store, db, _dir) = store(kind).await;
    let tenant = TenantId::parse("demo").expect("tenant");
    let lease = Duration::from_millis(300);
    let (old, new) = (run(&tenant), run(&tenant));
    let claim = |record: &RunRecord| {
        let (store, tenant, id) = (store.clone(), tenant.clone(), record.run_id.clone());
        async move {
            store
                .claim_idempotency_key(&tenant, "k", "h", &id, TTL, lease)
                .await
                .expect("claim")
        }
    };
    assert_eq!(claim(&old).await, Claimed::Ours);
    // Within the lease the key is held.
    assert!(
        matches!(claim(&new).await, Claimed::Taken(r) if r.run_id == old.run_id && r.status_code.is_none())
    );
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(
        claim(&new).await,
        Claimed::Ours,
        "taken over after the lease"
    );
    // The old holder wakes up: its release and its store are refused.
    assert!(
        !store
            .release_idempotency_key(&tenant, "k", &old.run_id)
            .await
            .expect("release")
    );
    assert!(!store.insert(&old, Some("k")).await.expect("insert"));
    assert!(!store.exists(&tenant, &old.run_id).await.expect("exists"));
    // The new holder completes; a later claimant replays it.
    assert!(store.insert(&new, Some("k")).await.expect("insert"));
    let third = run(&tenant);
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert!(
        matches!(claim(&third).await, Claimed::Taken(r) if r.run_id == new.run_id && r.status_code == Some(202))
    );
    // Releasing someone else's completed key does nothing.
    assert!(
        !store
            .release_idempotency_key(&tenant, "k", &third.run_id)
            .await
            .expect("release")
    );
    assert!(matches!(claim(&third).await, Claimed::Taken(r) if r.run_id == new.run_id));
    if let Some(db) = db {
        db.drop_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_claim_is_taken_over_after_its_lease_on_sqlite() {
    leases(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_claim_is_taken_over_after_its_lease_on_postgres() {
    leases(StoreKind::Postgres).await;
}
