//! Schema and migrations. `PRAGMA user_version` holds the schema version; each migration
//! moves it up by one inside a transaction, so a crash mid-migration leaves the old version.

use std::path::Path;

use rusqlite::Connection;

use crate::StoreError;

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Migration `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: broker state.
    "CREATE TABLE retained (
         topic  TEXT PRIMARY KEY,
         record BLOB NOT NULL
     ) WITHOUT ROWID;
     CREATE TABLE sessions (
         client_id       TEXT PRIMARY KEY,
         expiry_secs     INTEGER NOT NULL,
         disconnected_at INTEGER,
         owner           TEXT
     ) WITHOUT ROWID;
     CREATE TABLE subscriptions (
         client_id TEXT NOT NULL,
         filter    TEXT NOT NULL,
         record    BLOB NOT NULL,
         PRIMARY KEY (client_id, filter)
     ) WITHOUT ROWID;
     CREATE TABLE deliveries (
         client_id TEXT NOT NULL,
         seq       INTEGER NOT NULL,
         record    BLOB NOT NULL,
         packet_id INTEGER,
         released  INTEGER NOT NULL DEFAULT 0,
         PRIMARY KEY (client_id, seq)
     ) WITHOUT ROWID;
     CREATE TABLE inbound_qos2 (
         client_id TEXT NOT NULL,
         packet_id INTEGER NOT NULL,
         PRIMARY KEY (client_id, packet_id)
     ) WITHOUT ROWID;",
];

/// Sets the pragmas, checks the file is ours, and migrates it to [`SCHEMA_VERSION`].
pub fn prepare(connection: &mut Connection, path: &Path) -> Result<(), StoreError> {
    prepare_with(connection, path, MIGRATIONS, "FULL")
}

/// [`prepare`] for any file of ours: WAL, `synchronous` as given, then `migrations`.
pub fn prepare_with(
    connection: &mut Connection,
    path: &Path,
    migrations: &[&str],
    synchronous: &str,
) -> Result<(), StoreError> {
    let supported = migrations.len() as i64;
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // WAL with synchronous=FULL: a commit is durable across power loss once it returns.
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(corrupt)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            message: format!("cannot use write-ahead logging (journal mode is {mode})"),
        });
    }
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = OFF;"
        ))
        .map_err(corrupt)?;
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(corrupt)?;
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for (from, sql) in migrations.iter().enumerate().skip(version as usize) {
        let tx = connection.transaction().map_err(corrupt)?;
        tx.execute_batch(sql).map_err(corrupt)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)
            .map_err(corrupt)?;
        tx.commit().map_err(corrupt)?;
        tracing::info!(path = %path.display(), version = from + 1, "State file migrated.");
    }
    Ok(())
}
