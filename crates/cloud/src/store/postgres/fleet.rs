//! The fleet as the operators read it, in SQL: the page of `GET /v1/devices` (filtered, sorted
//! and paged by the device rows' ledger columns), the totals of `/metrics` and `/v1/fleet`, and
//! the summaries of the devices on a page, each read in one snapshot.

use std::collections::BTreeMap;

use postgres::types::ToSql;
use postgres::{Client, Transaction};

use super::{PgStore, clash_of, db, gap_of, held_of, ranges_of, to_i64, to_u64};
use crate::fleet;
use crate::store::{Clash, DeviceSummary, Error};
use ferry_protocol::Gap;

impl PgStore {
    /// See [`super::Store::fleet_page`]: selected, ordered and paged in SQL by the ledger
    /// columns, then the page's summaries read, all in one snapshot.
    pub fn fleet_page(
        &self,
        q: &fleet::Query,
        now_ms: u64,
        silent_after_ms: u64,
    ) -> Result<fleet::Page, Error> {
        self.pool.run(|client| {
            let mut tx = snapshot(client)?;
            let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
            let mut conditions = vec!["listed".to_owned()];
            if let Some(prefix) = &q.prefix {
                args.push(Box::new(prefix.clone()));
                conditions.push(format!("starts_with(device_id, ${})", args.len()));
            }
            if let Some(state) = q.state {
                // Only `silent` and `healthy` depend on the time (a parameter must be used).
                if matches!(state, "silent" | "healthy") {
                    args.push(Box::new(silent_before(now_ms, silent_after_ms)));
                }
                conditions.push(state_condition(state, args.len()));
            }
            let filter = conditions.join(" AND ");
            let order = match q.sort {
                fleet::Sort::Id => "device_id COLLATE \"C\"",
                fleet::Sort::Waiting => "ledger_waiting DESC, device_id COLLATE \"C\"",
                fleet::Sort::Missing => "ledger_missing DESC, device_id COLLATE \"C\"",
                fleet::Sort::LastSeen => "last_seen_ms, device_id COLLATE \"C\"",
            };
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| &**a as _).collect();
            let total: i64 = tx
                .query_one(
                    &format!("SELECT count(*) FROM ferry_devices WHERE {filter}"),
                    &params,
                )
                .map_err(db("cannot count the devices"))?
                .get(0);
            let ids: Vec<String> = tx
                .query(
                    &format!(
                        "SELECT device_id FROM ferry_devices WHERE {filter} ORDER BY {order}
                         LIMIT {} OFFSET {}",
                        q.limit,
                        // An offset past bigint is past every row too.
                        to_i64(q.offset as u64)
                    ),
                    &params,
                )
                .map_err(db("cannot list the devices"))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut by_id: BTreeMap<String, DeviceSummary> = read_summaries(&mut tx, &ids)?
                .into_iter()
                .map(|d| (d.device_id.clone(), d))
                .collect();
            tx.commit().map_err(db("cannot end the read"))?;
            let devices = ids.iter().filter_map(|id| by_id.remove(id)).collect();
            Ok(fleet::Page {
                devices,
                total: to_u64(total),
            })
        })
    }

    /// See [`super::Store::fleet_totals`]: one aggregate over the device rows.
    pub fn fleet_totals(&self, now_ms: u64, silent_after_ms: u64) -> Result<fleet::Totals, Error> {
        let silent = silent_before(now_ms, silent_after_ms);
        let now = to_i64(now_ms);
        // The backlog age buckets, as fleet::backlog_age_bucket sorts them ($2: now).
        let age = "GREATEST($2 - oldest_unsent_ts_ms, 0) / 1000";
        let mut ages = Vec::new();
        let mut above = None;
        for bound in fleet::BACKLOG_AGE_S {
            let lower = above.map_or(String::new(), |b| format!(" AND {age} > {b}"));
            ages.push(format!(
                "count(*) FILTER (WHERE ledger_waiting > 0 AND oldest_unsent_ts_ms IS NOT NULL
                     AND {age} <= {bound}{lower})"
            ));
            above = Some(bound);
        }
        ages.push(format!(
            "count(*) FILTER (WHERE ledger_waiting > 0
                 AND (oldest_unsent_ts_ms IS NULL OR {age} > {}))",
            above.unwrap_or(0)
        ));
        let row = self.pool.run(|client| {
            client
                .query_one(
                    &format!(
                        "SELECT count(*),
                             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}),
                             count(*) FILTER (WHERE {}), count(*) FILTER (WHERE {}),
                             count(*) FILTER (WHERE {}),
                             COALESCE(sum(ledger_delivered), 0)::int8,
                             COALESCE(sum(ledger_gaps), 0)::int8,
                             COALESCE(sum(ledger_waiting), 0)::int8,
                             COALESCE(sum(ledger_missing), 0)::int8,
                             count(*) FILTER (WHERE NOT ledger_balanced),
                             min(oldest_unsent_ts_ms) FILTER (WHERE ledger_waiting > 0),
                             {}
                         FROM ferry_devices WHERE listed",
                        state_condition(fleet::STATES[0], 1),
                        state_condition(fleet::STATES[1], 1),
                        state_condition(fleet::STATES[2], 1),
                        state_condition(fleet::STATES[3], 1),
                        state_condition(fleet::STATES[4], 1),
                        ages.join(", "),
                    ),
                    &[&silent, &now],
                )
                .map_err(db("cannot add up the devices"))
        })?;
        let n = |i: usize| to_u64(row.get(i));
        let mut backlog_age = [0; fleet::BACKLOG_AGE_S.len() + 1];
        for (i, bucket) in backlog_age.iter_mut().enumerate() {
            *bucket = n(12 + i);
        }
        Ok(fleet::Totals {
            devices: n(0),
            by_state: [n(1), n(2), n(3), n(4), n(5)],
            delivered: n(6),
            gaps: n(7),
            waiting: n(8),
            missing: n(9),
            unbalanced: n(10),
            oldest_unsent_ts_ms: row.get::<_, Option<i64>>(11).map(to_u64),
            backlog_age,
        })
    }

    /// See [`super::Store::device_summary`].
    pub fn device_summary(&self, device_id: &str) -> Result<Option<DeviceSummary>, Error> {
        let ids = [device_id.to_owned()];
        self.pool.run(|client| {
            let mut tx = snapshot(client)?;
            let found = read_summaries(&mut tx, &ids)?.pop();
            tx.commit().map_err(db("cannot end the read"))?;
            Ok(found)
        })
    }
}

/// A read-only transaction that sees one snapshot, so that a batch committed during a read of
/// several tables is seen in all of them or in none.
pub(super) fn snapshot(client: &mut Client) -> Result<Transaction<'_>, Error> {
    client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(db("cannot begin"))
}
/// The summaries of the devices `ids` that stored records or gaps or reported what they hold,
/// in no particular order.
pub(super) fn read_summaries(
    tx: &mut Transaction<'_>,
    ids: &[String],
) -> Result<Vec<DeviceSummary>, Error> {
    let filter = "device_id = ANY($1)";
    let mut gaps: BTreeMap<String, Vec<Gap>> = BTreeMap::new();
    for row in tx
        .query(
            &format!(
                "SELECT device_id, from_seq, to_seq, reason FROM ferry_gaps
                     WHERE {filter} ORDER BY id"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the gaps"))?
    {
        let device_id: String = row.get(0);
        let gap = gap_of(&device_id, &row, 1)?;
        gaps.entry(device_id).or_default().push(gap);
    }
    let mut clashes: BTreeMap<String, Vec<Clash>> = BTreeMap::new();
    for row in tx
        .query(
            &format!(
                "SELECT device_id, seq, first_seen_ms, last_seen_ms, count FROM ferry_clashes
                     WHERE {filter}"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the clashes"))?
    {
        clashes
            .entry(row.get(0))
            .or_default()
            .push(clash_of(&row, 1));
    }
    let rows = tx
        .query(
            &format!(
                "SELECT device_id, delivered, head_seq, acked_seq, oldest_unsent_ts_ms,
                         backlog_bytes, last_seen_ms, clashes_total, upstream_gaps
                     FROM ferry_devices WHERE {filter}"
            ),
            &[&ids],
        )
        .map_err(db("cannot read the devices"))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let device_id: String = row.get(0);
        let summary = DeviceSummary::from_parts(
            device_id.clone(),
            &ranges_of(&row.get::<_, Vec<i64>>(1)),
            gaps.remove(&device_id).unwrap_or_default(),
            clashes.remove(&device_id).unwrap_or_default(),
            to_u64(row.get(7)),
            held_of(&row, 2),
            to_u64(row.get(6)),
        )
        .map(|s| DeviceSummary {
            upstream_gaps: to_u64(row.get(8)),
            ..s
        });
        out.extend(summary);
    }
    Ok(out)
}
/// The SQL condition of a device being in `state` (one of [`fleet::STATES`], as
/// [`fleet::states`] decides it), with `$silent` the parameter of [`silent_before`].
fn state_condition(state: &str, silent: usize) -> String {
    let silent = format!("last_seen_ms < ${silent}");
    match state {
        "clash" => "clashes_total > 0".to_owned(),
        "missing" => "ledger_missing > 0".to_owned(),
        "behind" => "ledger_waiting > 0".to_owned(),
        "silent" => silent,
        _ => format!(
            "NOT (clashes_total > 0 OR ledger_missing > 0 OR ledger_waiting > 0 OR {silent})"
        ),
    }
}
/// A device last seen before this (ms since the epoch) is silent: `now - last_seen > after`.
fn silent_before(now_ms: u64, silent_after_ms: u64) -> i64 {
    to_i64(now_ms).saturating_sub(i64::try_from(silent_after_ms).unwrap_or(i64::MAX))
}
