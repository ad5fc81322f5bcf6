//! The history tables (see [`crate::history`]): reading a device's points (`ferry_history`,
//! written by [`super::update_device`]), and each replica's records per ten seconds
//! (`ferry_rates`).

use super::{PgStore, db, instance_name, to_i64, to_u64};
use crate::history::Point;
use crate::store::Error;

impl PgStore {
    /// The device's points from `from_minute` on, oldest first; `None` if it is not listed.
    pub fn device_history(
        &self,
        device_id: &str,
        from_minute: u64,
    ) -> Result<Option<Vec<Point>>, Error> {
        self.pool.run(|client| {
            let rows = client
                .query(
                    "SELECT minute, accepted, delivered, gaps, waiting, waiting_max, missing, backlog_bytes
                     FROM ferry_history WHERE device_id = $1 AND minute >= $2 ORDER BY minute",
                    &[&device_id, &to_i64(from_minute)],
                )
                .map_err(db("cannot read the history"))?;
            if rows.is_empty() {
                let listed = client
                    .query_opt(
                        "SELECT 1 FROM ferry_devices WHERE device_id = $1 AND listed",
                        &[&device_id],
                    )
                    .map_err(db("cannot read the device"))?;
                return Ok(listed.map(|_| Vec::new()));
            }
            Ok(Some(
                rows.iter()
                    .map(|r| Point {
                        minute: to_u64(r.get(0)),
                        accepted: to_u64(r.get(1)),
                        delivered: to_u64(r.get(2)),
                        gaps: to_u64(r.get(3)),
                        waiting: to_u64(r.get(4)),
                        waiting_max: to_u64(r.get(5)),
                        missing: to_u64(r.get(6)),
                        backlog_bytes: r.get::<_, Option<i64>>(7).map(to_u64),
                    })
                    .collect(),
            ))
        })
    }

    /// Publishes this replica's `(slot, records)` counts (absolute: a count published again
    /// replaces the one before) and drops every replica's slots before `kept_from`.
    pub fn publish_rates(
        &self,
        instance: u64,
        counts: &[(u64, u64)],
        kept_from: u64,
    ) -> Result<(), Error> {
        let instance = instance_name(instance);
        let slots: Vec<i64> = counts.iter().map(|(s, _)| to_i64(*s)).collect();
        let records: Vec<i64> = counts.iter().map(|(_, n)| to_i64(*n)).collect();
        self.pool.run(|client| {
            client
                .execute(
                    "WITH gone AS (DELETE FROM ferry_rates WHERE slot < $4)
                     INSERT INTO ferry_rates (instance, slot, records)
                     SELECT $1, s, n FROM unnest($2::int8[], $3::int8[]) AS t(s, n)
                     ON CONFLICT (instance, slot) DO UPDATE SET records = EXCLUDED.records",
                    &[&instance, &slots, &records, &to_i64(kept_from)],
                )
                .map_err(db("cannot publish the records per second"))?;
            Ok(())
        })
    }

    /// Every other replica's published counts from slot `from` on: `(slot, records)`, summed
    /// over the replicas, in no particular order.
    pub fn other_rates(&self, instance: u64, from: u64) -> Result<Vec<(u64, u64)>, Error> {
        let instance = instance_name(instance);
        self.pool.run(|client| {
            let rows = client
                .query(
                    "SELECT slot, sum(records)::int8 FROM ferry_rates
                     WHERE instance <> $1 AND slot >= $2 GROUP BY slot",
                    &[&instance, &to_i64(from)],
                )
                .map_err(db("cannot read the records per second"))?;
            Ok(rows
                .iter()
                .map(|r| (to_u64(r.get(0)), to_u64(r.get(1))))
                .collect())
        })
    }
}
