//! Durable metadata: volume configurations and lease tables in a redb database.
//!
//! Every write is one transaction committed with `Durability::Immediate`: when a method
//! returns, the change survives a crash. Values are JSON so that the on-disk format is readable
//! and tolerant of added fields.

use crate::lease::LeaseTable;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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
            let key = k.value().to_string();
            let cfg: VolumeConfig =
                serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                    key: key.clone(),
                    source,
                })?;
            let table = match leases.get(key.as_str()).map_err(db_err)? {
                Some(v) => {
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })?
                }
                None => LeaseTable::default(),
            };
            out.push((cfg, table));
        }
        Ok(out)
    }

    /// Records a new volume and its empty lease table.
    pub fn put_volume(&self, cfg: &VolumeConfig, table: &LeaseTable) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut v = txn.open_table(VOLUMES).map_err(db_err)?;
            let json = serde_json::to_vec(cfg).expect("config serialises");
            v.insert(cfg.name.as_str(), json.as_slice())
                .map_err(db_err)?;
            let mut l = txn.open_table(LEASES).map_err(db_err)?;
            let json = serde_json::to_vec(table).expect("table serialises");
            l.insert(cfg.name.as_str(), json.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Replaces a volume's lease table.
    pub fn put_leases(&self, name: &str, table: &LeaseTable) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut l = txn.open_table(LEASES).map_err(db_err)?;
            let json = serde_json::to_vec(table).expect("table serialises");
            l.insert(name, json.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Forgets a volume.
    pub fn delete_volume(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            txn.open_table(VOLUMES)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
            txn.open_table(LEASES)
                .map_err(db_err)?
                .remove(name)
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
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
            flip_on_first_access: true,
            flip_timeout_ms: Some(10),
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
            s.put_leases("v", &t).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![(cfg, t)]);
        s.delete_volume("v").unwrap();
        assert!(s.load().unwrap().is_empty());
    }
}
