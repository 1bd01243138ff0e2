//! Photo upload progress: which photo's bytes go next and how far the back office has
//! confirmed them. The bytes travel in chunks beside the operations; the photo's
//! operation (its metadata) follows once the back office has verified the whole file.

use rusqlite::{params, Connection, OptionalExtension};

use super::DomainError;

/// A photo whose bytes still have to reach the back office.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub sha256: String,
    pub size: u64,
    /// Bytes confirmed so far; the upload resumes here.
    pub acked: u64,
}

/// The oldest photo waiting for its bytes to be uploaded, skipping `except` (one that
/// could not be read).
pub fn next_upload(conn: &Connection, except: &[String]) -> Result<Option<Upload>, DomainError> {
    let mut stmt = conn.prepare_cached(
        "SELECT i.photo_sha256, json_extract(i.body, '$.size'), coalesce(p.acked, 0)
         FROM outbox o JOIN items i ON i.id = o.item_id
         LEFT JOIN photo_uploads p ON p.sha256 = i.photo_sha256
         WHERE o.item_kind = 'photo' AND o.action = 'create' AND o.state = 'waiting'
           AND coalesce(p.complete, 0) = 0
         ORDER BY o.seq LIMIT 16",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Upload {
            sha256: r.get(0)?,
            size: r.get::<_, i64>(1)?.max(0) as u64,
            acked: r.get::<_, i64>(2)?.max(0) as u64,
        })
    })?;
    for row in rows {
        let u = row?;
        if !except.contains(&u.sha256) {
            return Ok(Some(u));
        }
    }
    Ok(None)
}

/// The operations that carry photo `sha256` and have not been refused: those a damaged
/// file holds up.
pub fn unrefused_ops(conn: &Connection, sha256: &str) -> Result<Vec<String>, DomainError> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.op_id FROM outbox o JOIN items i ON i.id = o.item_id
         WHERE i.photo_sha256 = ?1 AND o.item_kind = 'photo' AND o.action = 'create'
           AND o.state != 'refused'
         ORDER BY o.seq",
    )?;
    let ops = stmt
        .query_map([sha256], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ops)
}

/// Records the back office's progress on a photo. Returns false for a photo the device
/// is not uploading (an acknowledgement for something else).
pub fn record_progress(
    conn: &Connection,
    sha256: &str,
    acked: u64,
    complete: bool,
) -> Result<bool, DomainError> {
    let size: Option<i64> = conn
        .query_row(
            "SELECT json_extract(body, '$.size') FROM items WHERE photo_sha256 = ?1 LIMIT 1",
            [sha256],
            |r| r.get(0),
        )
        .optional()?;
    let Some(size) = size else {
        return Ok(false);
    };
    if acked > size as u64 {
        return Ok(false);
    }
    // "complete" holds only with every byte: said early (a back office's slip), the
    // photo's operation would go before its bytes were all there.
    let complete = complete && acked == size as u64;
    conn.execute(
        "INSERT INTO photo_uploads (sha256, size, acked, complete) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(sha256) DO UPDATE SET acked = max(acked, excluded.acked),
                                           complete = max(complete, excluded.complete)",
        params![sha256, size, acked as i64, complete as i64],
    )?;
    Ok(true)
}

/// Starts a photo over (the back office found its bytes wrong).
/// Returns false for a photo the device does not have, or whose bytes the back office
/// already confirmed complete: an error for those is a late copy of an earlier answer
/// (the broker delivers again what a cut left unacknowledged), and starting over would
/// send the whole photo once more for nothing.
pub fn restart(conn: &Connection, sha256: &str) -> Result<bool, DomainError> {
    let known: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM items WHERE photo_sha256 = ?1)
            AND NOT EXISTS(SELECT 1 FROM photo_uploads WHERE sha256 = ?1 AND complete = 1)",
        [sha256],
        |r| r.get(0),
    )?;
    if known {
        conn.execute(
            "UPDATE photo_uploads SET acked = 0, complete = 0 WHERE sha256 = ?1",
            [sha256],
        )?;
    }
    Ok(known)
}

/// How many photos wait for their files to be removed (`photos_gone`, schema
/// migration 6).
pub fn gone_count(conn: &Connection) -> Result<usize, DomainError> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM photos_gone")?
        .query_row([], |r| r.get(0))?;
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_photo_is_complete_only_with_every_byte() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema_for_tests(&mut conn);
        let doc: crate::domain::work_orders::WorkOrderDoc = serde_json::from_value(
            serde_json::json!({"id": "WO-1", "version": 1, "title": "t", "stage": "new", "workflow": ["new"]}),
        )
        .unwrap();
        crate::domain::work_orders::upsert(&conn, &doc).unwrap();
        let record = crate::domain::items::add_record(
            &conn,
            "WO-1",
            &ui_bridge::RecordBody::Note { text: "a".into() },
        )
        .unwrap();
        crate::domain::journal::fold(&conn).unwrap();
        let sha = "ab".repeat(32);
        let photo = crate::store::photos::StoredPhoto {
            sha256: sha.clone(),
            size: 10,
        };
        crate::domain::items::attach_photo(&conn, &record.id, &photo, None, None).unwrap();
        let complete = |conn: &Connection| -> i64 {
            conn.query_row("SELECT complete FROM photo_uploads", [], |r| r.get(0))
                .unwrap()
        };
        assert!(record_progress(&conn, &sha, 4, true).unwrap());
        assert_eq!(complete(&conn), 0, "4 of 10 bytes is not complete");
        assert!(record_progress(&conn, &sha, 10, true).unwrap());
        assert_eq!(complete(&conn), 1);
        // A late copy of an earlier error does not start a confirmed photo over.
        assert!(!restart(&conn, &sha).unwrap());
        assert_eq!(complete(&conn), 1);
    }
}
