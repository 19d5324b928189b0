//! Opening a redb database with its tables: storaged's metadata and migrated's records.

use redb::{Database, TableDefinition};
use std::path::Path;

/// Opens or creates the redb database at `path` and creates the missing `tables` in one
/// committed transaction, so that readers always find them.
pub fn create_database(
    path: &Path,
    tables: &[TableDefinition<&str, &[u8]>],
) -> Result<Database, redb::Error> {
    let db = Database::create(path)?;
    let txn = db.begin_write()?;
    for &table in tables {
        txn.open_table(table)?;
    }
    txn.commit()?;
    Ok(db)
}
