//! The repository's write transactions on both engines: queued (deferred) writes commit with
//! the transaction or not at all, a transaction dropped without commit rolls back, and a
//! batch of queued writes commits on its own outcome even when written together with others.

mod common;

use common::Postgres;
use macula_registry::db::Arg;
use macula_registry::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_on_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    transactions(&format!(
        "sqlite://{}?mode=rwc",
        tmp.path().join("t.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_on_postgres() {
    let Some(pg) = Postgres::start() else { return };
    transactions(&pg.url).await;
}

async fn count(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM scratch")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

const INSERT: &str = "INSERT INTO scratch (id, n) VALUES ($1, $2)";

/// A write transaction that has inserted row `a` at once (not deferred).
async fn begin_with_a(db: &Db) -> macula_registry::db::WriteTx {
    let mut tx = db.begin().await.unwrap();
    sqlx::query(INSERT)
        .bind("a")
        .bind(1i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn transactions(url: &str) {
    let db = macula_registry::db::open(url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE scratch (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let insert = INSERT;

    // Deferred writes land together with the commit.
    let mut tx = begin_with_a(&db).await;
    tx.defer(insert, vec![Arg::from("b"), Arg::from(2i64)]);
    tx.defer(insert, vec![Arg::from("c"), Arg::from(None::<i64>)]);
    assert!(
        tx.commit().await.is_err(),
        "a NULL into a NOT NULL column must fail the commit"
    );
    assert_eq!(
        count(&db).await,
        0,
        "a failed deferred write undoes the whole transaction"
    );

    let mut tx = begin_with_a(&db).await;
    tx.defer(insert, vec![Arg::from("b"), Arg::from(2i64)]);
    tx.defer(insert, vec![Arg::from("c"), Arg::from(3i64)]);
    tx.commit().await.unwrap();
    assert_eq!(count(&db).await, 3);
    let sum: i64 = sqlx::query_scalar("SELECT CAST(SUM(n) AS BIGINT) FROM scratch")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(sum, 6, "each deferred statement kept its own arguments");

    // A duplicate key in a deferred write: nothing of the transaction stays.
    let mut tx = db.begin().await.unwrap();
    tx.defer(insert, vec![Arg::from("d"), Arg::from(4i64)]);
    tx.defer(insert, vec![Arg::from("a"), Arg::from(5i64)]);
    let e = tx.commit().await.unwrap_err();
    assert!(
        macula_registry::error::is_unique_violation(&e),
        "expected a unique violation, got {e}"
    );
    assert_eq!(count(&db).await, 3);

    // Dropped without commit (an error path, a cancelled request): rolled back, and the
    // next writer gets a clean connection.
    {
        let mut tx = db.begin().await.unwrap();
        sqlx::query(insert)
            .bind("e")
            .bind(5i64)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    assert_eq!(
        count(&db).await,
        3,
        "the dropped transaction's insert was rolled back"
    );

    // Batches (writes queued only): committed together when they queue at once, yet each
    // with its own outcome. One of them fails (a duplicate key); the others land.
    let mut waits = vec![];
    for i in 0..12i64 {
        let db = db.clone();
        waits.push(tokio::spawn(async move {
            let mut tx = db.begin_batch().await.unwrap();
            let id = if i == 5 {
                "a".to_owned()
            } else {
                format!("batch-{i}")
            };
            tx.defer(insert, vec![Arg::from(id), Arg::from(i)]);
            tx.defer(
                "UPDATE scratch SET n = n + 10 WHERE id = $1",
                vec![Arg::from("c")],
            );
            tx.commit().await
        }));
    }
    let mut failed = 0;
    for (i, w) in waits.into_iter().enumerate() {
        match w.await.unwrap() {
            Ok(()) => assert_ne!(i, 5),
            Err(e) => {
                assert_eq!(i, 5, "only the duplicate fails: {e}");
                assert!(macula_registry::error::is_unique_violation(&e));
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 1);
    assert_eq!(count(&db).await, 3 + 11);
    let n: i64 = sqlx::query_scalar("SELECT n FROM scratch WHERE id = 'c'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 3 + 11 * 10, "the failed batch's update was not applied");

    // A batch dropped unsent writes nothing, and writing goes on.
    {
        let mut tx = db.begin_batch().await.unwrap();
        tx.defer(insert, vec![Arg::from("never"), Arg::from(0i64)]);
    }
    let mut tx = db.begin().await.unwrap();
    tx.defer(insert, vec![Arg::from("after"), Arg::from(0i64)]);
    tx.commit().await.unwrap();
    assert_eq!(count(&db).await, 3 + 11 + 1);
}
