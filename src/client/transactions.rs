//! `strom transactions list` and `strom transactions describe`: the `kafka-transactions.sh` view
//! of a cluster. List asks every broker for the transactions it coordinates; describe finds the
//! id's coordinator and shows its state, producer, timeout, age and partitions.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Result};
use kafka_protocol::messages::{
    ApiKey, DescribeTransactionsRequest, DescribeTransactionsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, ListTransactionsRequest, ListTransactionsResponse, MetadataRequest,
    MetadataResponse, TransactionalId,
};
use kafka_protocol::protocol::StrBytes;

use super::Connection;
use crate::model::ErrorCode;

fn brokers(conn: &mut Connection) -> Result<HashMap<i32, String>> {
    let mut req = MetadataRequest::default();
    req.topics = Some(Vec::new());
    let md: MetadataResponse = conn.call(ApiKey::Metadata, 9, &req)?;
    Ok(md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
        .collect())
}

/// One row per transactional id: `TRANSACTIONAL-ID COORDINATOR PRODUCER-ID STATE`.
pub fn list(bootstrap: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let mut rows = BTreeSet::new();
    for (id, address) in brokers(&mut conn)? {
        let mut c = Connection::connect(&address)?;
        let resp: ListTransactionsResponse = c.call(
            ApiKey::ListTransactions,
            1,
            &ListTransactionsRequest::default().with_duration_filter(-1),
        )?;
        if resp.error_code != 0 {
            bail!(
                "ListTransactions on {address} failed: {}",
                ErrorCode(resp.error_code).name()
            );
        }
        for t in resp.transaction_states {
            rows.insert((
                t.transactional_id.0.to_string(),
                id,
                t.producer_id.0,
                t.transaction_state.to_string(),
            ));
        }
    }
    let mut out = format!(
        "{:<40} {:<12} {:<12} {}\n",
        "TRANSACTIONAL-ID", "COORDINATOR", "PRODUCER-ID", "STATE"
    );
    for (txn, coordinator, producer, state) in rows {
        out.push_str(&format!(
            "{txn:<40} {coordinator:<12} {producer:<12} {state}\n"
        ));
    }
    Ok(out)
}

/// The coordinator's view of one transactional id.
pub fn describe(bootstrap: &str, transactional_id: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let mut find = FindCoordinatorRequest::default();
    find.key = StrBytes::from_string(transactional_id.to_string());
    find.key_type = 1;
    let found: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, 3, &find)?;
    if found.error_code != 0 {
        bail!(
            "FindCoordinator for transactional id '{transactional_id}' failed: {}",
            ErrorCode(found.error_code).name()
        );
    }
    let mut coordinator = Connection::connect(&format!("{}:{}", found.host, found.port))?;
    let mut req = DescribeTransactionsRequest::default();
    req.transactional_ids = vec![TransactionalId(StrBytes::from_string(
        transactional_id.to_string(),
    ))];
    let resp: DescribeTransactionsResponse =
        coordinator.call(ApiKey::DescribeTransactions, 0, &req)?;
    let Some(t) = resp.transaction_states.into_iter().next() else {
        bail!("the coordinator described nothing");
    };
    if t.error_code != 0 {
        bail!(
            "DescribeTransactions for '{transactional_id}' failed: {}",
            ErrorCode(t.error_code).name()
        );
    }
    let now = crate::storage::partition::now_ms() as i64;
    let age = if t.transaction_start_time_ms >= 0 {
        format!("{} ms", now.saturating_sub(t.transaction_start_time_ms))
    } else {
        "-".to_string()
    };
    let partitions: Vec<String> = t
        .topics
        .iter()
        .flat_map(|topic| {
            topic
                .partitions
                .iter()
                .map(move |p| format!("{}-{p}", topic.topic.0))
        })
        .collect();
    let partitions = if partitions.is_empty() {
        "-".to_string()
    } else {
        partitions.join(",")
    };
    Ok(format!(
        "{:<40} {:<12} {:<12} {:<8} {:<16} {:<12} {:<12} {}\n{:<40} {:<12} {:<12} {:<8} {:<16} {:<12} {:<12} {}\n",
        "TRANSACTIONAL-ID", "COORDINATOR", "PRODUCER-ID", "EPOCH", "STATE", "TIMEOUT-MS", "AGE",
        "PARTITIONS",
        transactional_id, found.node_id.0, t.producer_id.0, t.producer_epoch,
        t.transaction_state.as_str(), t.transaction_timeout_ms, age, partitions,
    ))
}
