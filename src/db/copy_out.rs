//! Snapshot pages through `COPY (…) TO STDOUT (FORMAT binary)`: Postgres hands the stored bytes
//! over with the least work per row (no escaping, no row decoding), and each row is read in
//! place from the message it came in.
//!
//! COPY takes no bind parameters, so a page's values are written into its SQL as literals; they
//! are numbers, instants, uuids, and ids and type names of a constrained alphabet, quoted all the
//! same.

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::BoxStream;
use sqlx::PgConnection;

use super::snapshot::{PatientFilter, Position, Rows, Selection, snapshot_sql};

/// One row of a copied page.
#[derive(Debug)]
pub struct CopiedRow {
    pub position: Position,
    /// The stored JSON text, exactly as stored; for a deletion (`Rows::Deleted`, which has no
    /// body) the deleted resource's id.
    pub text: Bytes,
}

/// Streams up to `limit` rows of the snapshot after `after` as `(seq, version_id, text)`:
/// the body, or the id of a deletion.
///
/// The stream must be read to its end: the connection is in the middle of a COPY until then
/// (on an error, drop the connection instead of returning it to a pool).
pub async fn snapshot_page<'c>(
    conn: &'c mut PgConnection,
    selection: &Selection<'_>,
    after: Position,
    limit: i64,
) -> sqlx::Result<BoxStream<'c, sqlx::Result<Bytes>>> {
    let page = with_literals(
        snapshot_sql(selection.patients, selection.rows),
        selection,
        after,
        limit,
    );
    let text = match selection.rows {
        Rows::Deleted => "id",
        Rows::Live | Rows::History { .. } | Rows::LastState => "body",
    };
    let sql = format!(
        "COPY (SELECT seq, version_id, {text} FROM ({page}) page) TO STDOUT (FORMAT binary)"
    );
    conn.copy_out_raw(&sql).await
}

fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn instant(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match t {
        Some(t) => format!("{}::timestamptz", quoted(&t.to_rfc3339())),
        None => "NULL::timestamptz".into(),
    }
}

fn text_array(items: Option<&[String]>) -> String {
    match items {
        Some(items) => {
            let quoted: Vec<String> = items.iter().map(|i| quoted(i)).collect();
            format!("ARRAY[{}]::text[]", quoted.join(","))
        }
        None => "NULL::text[]".into(),
    }
}

/// The page SQL with its parameters (see `snapshot_sql`) written in as literals. Replaced from
/// the highest number down, so `$1` never eats the start of `$13`.
fn with_literals(sql: &str, s: &Selection<'_>, after: Position, limit: i64) -> String {
    let job = match s.patients {
        PatientFilter::JobPatients(job) => format!("{}::uuid", quoted(&job.to_string())),
        PatientFilter::None | PatientFilter::AnyPatient | PatientFilter::Unattached => {
            "NULL::uuid".into()
        }
    };
    let skip_last_state = matches!(
        s.rows,
        Rows::History {
            skip_last_state: true
        }
    );
    let values = [
        quoted(s.resource_type),
        after.seq.to_string(),
        s.range_end.to_string(),
        instant(Some(s.transaction_time)),
        instant(s.since),
        limit.to_string(),
        text_array(Some(s.excluded_ids)),
        job,
        text_array(s.ids.as_deref()),
        instant(s.updated_from),
        instant(s.updated_before),
        after.version_id.to_string(),
        skip_last_state.to_string(),
    ];
    let mut sql = sql.to_string();
    for (n, value) in values.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", n + 1), value);
    }
    sql
}

/// The binary COPY format: a header, then per row a field count, and per field a length and its
/// bytes; a field count of -1 ends it.
#[derive(Default)]
pub struct CopyRows {
    /// Bytes of a row (or the header) split across messages.
    pending: BytesMut,
    header_read: bool,
    ended: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyRows {
    /// Adds a message's bytes; returns the complete rows it finished, in order.
    pub fn push(&mut self, chunk: Bytes, rows: &mut Vec<CopiedRow>) -> anyhow::Result<()> {
        // Postgres sends a row per message: the common case reads it in place.
        let mut data = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        loop {
            let before = data.len();
            match self.next_row(&mut data)? {
                Some(row) => rows.push(row),
                None if data.len() == before => break,
                None => {} // the header, or the end
            }
        }
        self.pending.extend_from_slice(&data);
        Ok(())
    }

    /// Has the end-of-data marker come?
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The next complete item of `data` (consumed), or `None` with `data` untouched when it is
    /// incomplete.
    fn next_row(&mut self, data: &mut Bytes) -> anyhow::Result<Option<CopiedRow>> {
        if self.ended || data.is_empty() {
            return Ok(None);
        }
        if !self.header_read {
            if data.len() < SIGNATURE.len() + 8 {
                return Ok(None);
            }
            anyhow::ensure!(data.starts_with(SIGNATURE), "not binary COPY data");
            let extension = u32::from_be_bytes(data[15..19].try_into().expect("4 bytes")) as usize;
            if data.len() < 19 + extension {
                return Ok(None);
            }
            data.advance(19 + extension);
            self.header_read = true;
            return Ok(None);
        }
        if data.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([data[0], data[1]]);
        if fields == -1 {
            data.advance(2);
            self.ended = true;
            return Ok(None);
        }
        anyhow::ensure!(fields == 3, "a copied row has {fields} fields, not 3");
        // seq (int8), version_id (int4), text: lengths and values.
        let mut at = 2;
        let mut field = |data: &Bytes| -> anyhow::Result<Option<(usize, usize)>> {
            if data.len() < at + 4 {
                return Ok(None);
            }
            let len = i32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
            anyhow::ensure!(len >= 0, "a copied row has a NULL");
            let start = at + 4;
            at = start + len as usize;
            Ok((data.len() >= at).then_some((start, len as usize)))
        };
        let (Some(seq), Some(version), Some(text)) = (field(data)?, field(data)?, field(data)?)
        else {
            return Ok(None);
        };
        anyhow::ensure!(
            seq.1 == 8 && version.1 == 4,
            "unexpected field sizes in a copied row"
        );
        let position = Position {
            seq: i64::from_be_bytes(data[seq.0..seq.0 + 8].try_into().expect("8 bytes")),
            version_id: i32::from_be_bytes(
                data[version.0..version.0 + 4].try_into().expect("4 bytes"),
            ),
        };
        let row = CopiedRow {
            position,
            text: data.slice(text.0..text.0 + text.1),
        };
        data.advance(text.0 + text.1);
        Ok(Some(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, version: i32, body: &str) -> Vec<u8> {
        let mut out = 3i16.to_be_bytes().to_vec();
        out.extend(8i32.to_be_bytes());
        out.extend(seq.to_be_bytes());
        out.extend(4i32.to_be_bytes());
        out.extend(version.to_be_bytes());
        out.extend(
            i32::try_from(body.len())
                .expect("a test body")
                .to_be_bytes(),
        );
        out.extend(body.as_bytes());
        out
    }

    fn stream() -> Vec<u8> {
        let mut all = SIGNATURE.to_vec();
        all.extend(0u32.to_be_bytes());
        all.extend(0u32.to_be_bytes());
        all.extend(row(7, 1, r#"{"a":"\\n"}"#));
        all.extend(row(9, 3, "{}"));
        all.extend((-1i16).to_be_bytes());
        all
    }

    #[test]
    fn rows_come_out_whatever_the_message_boundaries() {
        let all = stream();
        for split in 1..all.len() {
            let mut parser = CopyRows::default();
            let mut rows = Vec::new();
            for piece in all.chunks(split) {
                parser
                    .push(Bytes::copy_from_slice(piece), &mut rows)
                    .unwrap();
            }
            assert!(parser.ended(), "split {split}");
            assert_eq!(rows.len(), 2, "split {split}");
            assert_eq!(
                rows[0].position,
                Position {
                    seq: 7,
                    version_id: 1
                }
            );
            assert_eq!(&rows[0].text[..], br#"{"a":"\\n"}"#);
            assert_eq!(
                rows[1].position,
                Position {
                    seq: 9,
                    version_id: 3
                }
            );
            assert_eq!(&rows[1].text[..], b"{}");
        }
    }

    #[test]
    fn values_become_quoted_literals() {
        let excluded = vec!["g'1".to_string()];
        let selection = Selection {
            resource_type: "Patient",
            range_end: 99,
            transaction_time: "2024-01-01T00:00:00Z".parse().unwrap(),
            since: None,
            patients: PatientFilter::None,
            excluded_ids: &excluded,
            rows: Rows::Live,
            ids: None,
            updated_from: None,
            updated_before: None,
        };
        let after = Position {
            seq: 5,
            version_id: i32::MAX,
        };
        let sql = with_literals(
            "$1 $2 $3 $4 $5 $6 $7 $8 $9 $10 $11 $12 $13",
            &selection,
            after,
            10,
        );
        assert_eq!(
            sql,
            "'Patient' 5 99 '2024-01-01T00:00:00+00:00'::timestamptz NULL::timestamptz 10 \
             ARRAY['g''1']::text[] NULL::uuid NULL::text[] NULL::timestamptz NULL::timestamptz \
             2147483647 false"
        );
    }
}
