//! Durable metadata: volume configurations and lease tables in a redb database.
//!
//! Every write is one transaction committed with `Durability::Immediate`: when a method
//! returns, the change survives a crash. Values are JSON so that the on-disk format is readable
//! and tolerant of added fields.

use crate::lease::LeaseTable;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use storaged_client::api::VolumeConfig;
use thiserror::Error;

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");

/// A metadata store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database failed.
    #[error("metadata database")]
    Db(#[from] redb::Error),
    /// A stored value could not be decoded.
    #[error("corrupt metadata record {key}")]
    Corrupt {
        /// The record.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// Decodes the JSON value stored under `key`.
fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// Stores `value` as JSON under `key` in `table`.
fn put<T: Serialize>(
    txn: &WriteTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    value: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(value).expect("metadata serialises");
    let mut t = txn.open_table(table).map_err(db_err)?;
    t.insert(key, json.as_slice()).map_err(db_err)?;
    Ok(())
}

/// The metadata database.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens or creates the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = vmhop_common::store::create_database(path, &[VOLUMES, LEASES])?;
        Ok(Store { db })
    }

    /// Every volume with its lease table.
    pub fn load(&self) -> Result<Vec<(VolumeConfig, LeaseTable)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let vols = txn.open_table(VOLUMES).map_err(db_err)?;
        let leases = txn.open_table(LEASES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in vols.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            let table = match leases.get(key).map_err(db_err)? {
                Some(t) => decode(key, t.value())?,
                None => LeaseTable::default(),
            };
            out.push((decode(key, v.value())?, table));
        }
        Ok(out)
    }

    /// Runs `change` in one write transaction, committed durably.
    fn write(
        &self,
        change: impl FnOnce(&WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        change(&txn)?;
        txn.commit().map_err(db_err)
    }

    /// Records a new volume and its empty lease table.
    pub fn put_volume(&self, cfg: &VolumeConfig, table: &LeaseTable) -> Result<(), StoreError> {
        self.write(|txn| {
            put(txn, VOLUMES, &cfg.name, cfg)?;
            put(txn, LEASES, &cfg.name, table)
        })
    }

    /// Replaces a volume's configuration (its access policy changed).
    pub fn put_config(&self, cfg: &VolumeConfig) -> Result<(), StoreError> {
        self.write(|txn| put(txn, VOLUMES, &cfg.name, cfg))
    }

    /// Replaces the lease tables of some volumes, all in one transaction: after a crash
    /// either every one of them is the new one or none is.
    pub fn put_leases(&self, tables: &[(&str, &LeaseTable)]) -> Result<(), StoreError> {
        self.write(|txn| {
            tables
                .iter()
                .try_for_each(|(name, table)| put(txn, LEASES, name, table))
        })
    }

    /// Forgets a volume.
    pub fn delete_volume(&self, name: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            for table in [VOLUMES, LEASES] {
                let mut t = txn.open_table(table).map_err(db_err)?;
                t.remove(name).map_err(db_err)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storaged_client::api::{AnonymousPolicy, Holder};

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let cfg = VolumeConfig {
            name: "v".into(),
            size: 4096,
            anonymous: AnonymousPolicy::ReadOnly,
            hosts: vec!["a".into(), "b".into()],
            flip_on_first_access: true,
            flip_over_nbd: true,
            flip_timeout_ms: Some(10),
            description: Some("the test volume".into()),
        };
        let mut t = LeaseTable::default();
        {
            let s = Store::open(&path).unwrap();
            s.put_volume(&cfg, &t).unwrap();
            t.epoch = 3;
            t.deactivated.push(Holder {
                host: "a".into(),
                instance: "i".into(),
            });
            s.put_leases(&[("v", &t)]).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![(cfg, t)]);
        s.delete_volume("v").unwrap();
        assert!(s.load().unwrap().is_empty());
    }
}
