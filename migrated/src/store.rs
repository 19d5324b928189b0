//! Durable state: instance and migration records in a redb database (`STATE_DIR/state.redb`).
//!
//! Every write is one transaction committed with immediate durability (fsync) before the
//! method returns, so a record written before an action survives a crash during it. The commit
//! runs on a blocking thread, never on the async runtime's: an fsync takes milliseconds, and
//! seconds on a busy disk, which the API and the migrations must not wait for. Values are
//! JSON: readable, and tolerant of added fields.

use crate::instance::InstanceRecord;
use crate::migration::record::MigrationRecord;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const MIGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("migrations");

/// A state store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database failed.
    #[error("state database")]
    Db(#[from] redb::Error),
    /// A record could not be encoded or decoded.
    #[error("corrupt state record {0}")]
    Corrupt(String, #[source] serde_json::Error),
    /// The thread committing a write was lost (the runtime is shutting down).
    #[error("state database writer lost")]
    WriterLost,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// The state database.
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens or creates the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = vmhop_common::store::create_database(path, &[INSTANCES, MIGRATIONS])?;
        Ok(Store { db: Arc::new(db) })
    }

    fn load<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(k.value().to_string(), e))?,
            );
        }
        Ok(out)
    }

    async fn put<T: Serialize>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(key.into(), e))?;
        let (db, key) = (self.db.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(table).map_err(db_err)?;
                t.insert(key.as_str(), json.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(|_| StoreError::WriterLost)?
    }

    /// Every instance record.
    pub fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.load(INSTANCES)
    }

    /// Every migration record.
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, StoreError> {
        self.load(MIGRATIONS)
    }

    /// Writes an instance record durably.
    pub async fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        self.put(INSTANCES, &rec.name, rec).await
    }

    /// Removes an instance record durably.
    pub async fn delete_instance(&self, name: &str) -> Result<(), StoreError> {
        let (db, key) = (self.db.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(INSTANCES).map_err(db_err)?;
                t.remove(key.as_str()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(|_| StoreError::WriterLost)?
    }

    /// Writes a migration record durably.
    pub async fn put_migration(&self, rec: &MigrationRecord) -> Result<(), StoreError> {
        self.put(MIGRATIONS, &rec.id, rec).await
    }

    /// The database, for tests that hold a write transaction open.
    #[cfg(test)]
    pub(crate) fn db(&self) -> Arc<Database> {
        self.db.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InstanceConfig;
    use crate::instance::InstanceState;

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut rec = InstanceRecord::new(
            InstanceConfig::for_tests("vm1"),
            dir.path(),
            InstanceState::Starting,
        );
        {
            let s = Store::open(&path).unwrap();
            s.put_instance(&rec).await.unwrap();
            rec.state = InstanceState::Running;
            rec.pid = Some(7);
            s.put_instance(&rec).await.unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.instances().unwrap(), vec![rec]);
        assert!(s.migrations().unwrap().is_empty());
    }
}
