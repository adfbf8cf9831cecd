//! The etcd-backed state store and leader election against a real etcd (Debian's
//! `etcd-server`, installed when missing): the same conformance suite as the embedded store,
//! leadership that outlives several lease TTLs, fencing of a deposed leader, and failover.

mod support;

use std::time::Duration;

use longtake_coordinator::etcd::{Etcd, EtcdStore, campaign};
use longtake_coordinator::store::{JobStore, StoreError, conformance};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn etcd_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = support::Etcd::start(dir.path());
    runtime().block_on(async {
        let client = Etcd::connect(&[etcd.endpoint()], "conformance/").unwrap();
        conformance(&EtcdStore::new(client)).await;
        // Listing goes page by page: 1000 records of 20 KiB (20 MB, five times gRPC's default
        // message limit) come back whole and in order, in one batch write per 100.
        let store = EtcdStore::new(Etcd::connect(&[etcd.endpoint()], "many/").unwrap());
        let keys: Vec<String> = (0..1000).map(|i| format!("jobs/{i:04}")).collect();
        for chunk in keys.chunks(100) {
            let ops: Vec<(String, Option<Vec<u8>>)> = chunk
                .iter()
                .map(|k| (k.clone(), Some(vec![b'x'; 20 << 10])))
                .collect();
            store.write_batch(&ops).await.unwrap();
        }
        let listed: Vec<String> = store
            .list("jobs/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(listed, keys);
    });
}

#[test]
fn leadership_lasts_fences_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = support::Etcd::start(dir.path());
    runtime().block_on(async {
        let a = Etcd::connect(&[etcd.endpoint()], "farm/").unwrap();
        let b = Etcd::connect(&[etcd.endpoint()], "farm/").unwrap();
        let leader = campaign(&a, "leader", "a:1", 2, |_| {}).await;
        let store_a = EtcdStore::new(a.clone());
        store_a.fence_with(&leader);
        // The lease is kept alive well past its TTL.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !*leader.lost.borrow(),
            "the leader lease was lost while kept alive"
        );
        assert_eq!(
            a.get_value("leader").await.unwrap().as_deref(),
            Some(&b"a:1"[..])
        );
        store_a.put("jobs/x", b"1".to_vec()).await.unwrap();
        // A standby sees the leader and waits.
        let mut seen = Vec::new();
        let standby = tokio::time::timeout(
            Duration::from_secs(1),
            campaign(&b, "leader", "b:1", 2, |l| seen.push(l.to_string())),
        )
        .await;
        assert!(
            standby.is_err(),
            "a second candidate won while the first leads"
        );
        assert_eq!(seen, ["a:1"]);
        // Leadership survives an etcd restart shorter than the TTL.
        etcd.restart();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !*leader.lost.borrow(),
            "the lease was lost across a short etcd restart"
        );
        store_a.put("jobs/x", b"2".to_vec()).await.unwrap();
        // Resigning hands over at once; the old leader's writes are then fenced off.
        let term_a = leader.term;
        leader.resign(&a).await;
        let next = tokio::time::timeout(
            Duration::from_secs(3),
            campaign(&b, "leader", "b:1", 2, |_| {}),
        )
        .await
        .expect("the standby leads after the resignation");
        assert!(
            next.term > term_a,
            "terms grow: {} then {}",
            term_a,
            next.term
        );
        match store_a.put("jobs/x", b"3".to_vec()).await {
            Err(StoreError::Fenced(_)) => {}
            other => panic!("a deposed leader's write must be fenced off, got {other:?}"),
        }
        let store_b = EtcdStore::new(b.clone());
        assert_eq!(store_b.get("jobs/x").await.unwrap().unwrap().value, b"2");
    });
}
