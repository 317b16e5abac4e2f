//! How the writer's batch reaches SQLite: as one [`Script`] per call, statements of a few
//! fixed texts.
//!
//! sqlx runs SQLite on a thread of its own, and every call (a `BEGIN`, each statement, the
//! `COMMIT`) is a round trip to it: two thread wake-ups, each waiting for a CPU when the
//! machine is busy. A batch is therefore sent as one script, `BEGIN IMMEDIATE; INSERT …;
//! UPDATE …; INSERT …; COMMIT`, in one call: one hand-off in, one out, and the writer task is
//! free meanwhile to collect the next batch.
//!
//! Multi-row statements take rows in chunks of a few fixed sizes ([`CHUNK_ROWS`]); a chunk's
//! rows beyond the data are bound as NULL rows that the statement skips (`WHERE column1 IS NOT
//! NULL`). So whatever the batch size, the script's text is one of a few, prepared once and
//! kept in sqlx's statement cache; with a text per row count SQLite parsed anew on most
//! batches.

use std::sync::OnceLock;

use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments, Encode, Sqlite, SqliteConnection, Type};

/// Rows per chunk of a multi-row statement: the smallest size that holds the rows left, at
/// most the largest (4,096 of SQLite's 32,766 bound variables at 16 columns).
pub(super) const CHUNK_ROWS: [usize; 5] = [1, 4, 16, 64, 256];

/// The chunks that hold `rows` rows: `(rows with data, chunk size)`, in order.
pub(super) fn chunks(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let largest = CHUNK_ROWS[CHUNK_ROWS.len() - 1];
    let mut left = rows;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let size = CHUNK_ROWS
            .iter()
            .copied()
            .find(|&size| size >= left)
            .unwrap_or(largest);
        let take = left.min(size);
        left -= take;
        Some((take, size))
    })
}

/// The multi-row statements a batch writes, each with its columns of bound values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rows {
    /// New jobs: id, site, contact, action, role, send_notification, payload_tags, method,
    /// target, content_type, body, client_ip, host, fingerprint, received_at, at_ms (the row's
    /// `updated_at` and `next_run_at`); `deliveries` 1 and `state` pending are literals.
    Jobs,
    /// Merges into pending jobs: id, action, role, send_notification, payload_tags, method,
    /// target, content_type, body, client_ip, host, fingerprint, added deliveries, at_ms.
    Merges,
    /// Activity lines: at_ms, site, contact, action, outcome, job, duration_ms, detail.
    Activity,
}

impl Rows {
    /// Bound values per row.
    pub(super) const fn columns(self) -> usize {
        match self {
            Rows::Jobs => 16,
            Rows::Merges => 14,
            Rows::Activity => 8,
        }
    }

    /// The statement for a chunk of `size` rows (`size` one of [`CHUNK_ROWS`]).
    fn sql(self, size: usize) -> &'static str {
        static TEXTS: OnceLock<Vec<[String; CHUNK_ROWS.len()]>> = OnceLock::new();
        let texts = TEXTS.get_or_init(|| {
            [Rows::Jobs, Rows::Merges, Rows::Activity]
                .into_iter()
                .map(|rows| CHUNK_ROWS.map(|size| rows.build_sql(size)))
                .collect()
        });
        let i = CHUNK_ROWS.iter().position(|&s| s == size).unwrap_or(0);
        &texts[self as usize][i]
    }

    fn build_sql(self, size: usize) -> String {
        let group = format!("({})", vec!["?"; self.columns()].join(", "));
        let values = vec![group.as_str(); size].join(", ");
        match self {
            Rows::Jobs => format!(
                "INSERT INTO jobs (id, site, contact, action, role, send_notification, \
                 payload_tags, method, target, content_type, body, client_ip, host, fingerprint, \
                 received_at, updated_at, next_run_at, deliveries, state) \
                 SELECT column1, column2, column3, column4, column5, column6, column7, column8, \
                 column9, column10, column11, column12, column13, column14, column15, column16, \
                 column16, 1, 'pending' FROM (VALUES {values}) WHERE column1 IS NOT NULL"
            ),
            Rows::Merges => format!(
                "UPDATE jobs SET action = m.column2, role = COALESCE(m.column3, role), \
                 send_notification = COALESCE(m.column4, send_notification), \
                 payload_tags = m.column5, method = m.column6, target = m.column7, \
                 content_type = m.column8, body = m.column9, client_ip = m.column10, \
                 host = m.column11, fingerprint = m.column12, \
                 deliveries = deliveries + m.column13, updated_at = m.column14 \
                 FROM (VALUES {values}) AS m WHERE jobs.id = m.column1"
            ),
            Rows::Activity => format!(
                "INSERT INTO activity (at_ms, site, contact, action, outcome, job, duration_ms, \
                 detail) SELECT * FROM (VALUES {values}) WHERE column1 IS NOT NULL"
            ),
        }
    }
}

/// Statements and their bound values, sent to SQLite's thread in one call.
#[derive(Default)]
pub(super) struct Script {
    sql: String,
    args: SqliteArguments<'static>,
    statements: usize,
}

impl Script {
    pub(super) fn is_empty(&self) -> bool {
        self.statements == 0
    }

    /// A statement without bound values (`BEGIN IMMEDIATE`, `COMMIT`).
    pub(super) fn push(&mut self, statement: &str) {
        self.sql.push_str(statement);
        self.sql.push_str(";\n");
        self.statements += 1;
    }

    /// Write `items` as rows of `rows`, in chunks; `bind` binds one item's
    /// [`columns`](Rows::columns) values, in order (taking them: bound values are owned).
    pub(super) fn rows<T>(
        &mut self,
        rows: Rows,
        items: Vec<T>,
        mut bind: impl FnMut(&mut Self, T) -> Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        let mut items = items.into_iter();
        for (filled, size) in chunks(items.len()) {
            self.push(rows.sql(size));
            for item in items.by_ref().take(filled) {
                bind(self, item)?;
            }
            for _ in 0..(size - filled) * rows.columns() {
                self.bind(None::<i64>)?;
            }
        }
        Ok(())
    }

    /// Bind the next value.
    pub(super) fn bind<T>(&mut self, value: T) -> Result<(), sqlx::Error>
    where
        T: Encode<'static, Sqlite> + Type<Sqlite> + 'static,
    {
        self.args.add(value).map_err(sqlx::Error::Encode)
    }

    /// Run every statement, in order, in one call; stops at the first error.
    pub(super) async fn run(self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        if self.is_empty() {
            return Ok(());
        }
        sqlx::query_with(&self.sql, self.args)
            .execute(conn)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rows: usize) -> Vec<(usize, usize)> {
        chunks(rows).collect()
    }

    #[test]
    fn chunks_take_the_smallest_size_that_holds_the_rest() {
        assert_eq!(plan(0), []);
        assert_eq!(plan(1), [(1, 1)]);
        assert_eq!(plan(2), [(2, 4)]);
        assert_eq!(plan(4), [(4, 4)]);
        assert_eq!(plan(5), [(5, 16)]);
        assert_eq!(plan(64), [(64, 64)]);
        assert_eq!(plan(65), [(65, 256)]);
        assert_eq!(plan(256), [(256, 256)]);
        assert_eq!(plan(257), [(256, 256), (1, 1)]);
        assert_eq!(plan(600), [(256, 256), (256, 256), (88, 256)]);
        for rows in 0..2000 {
            let p = plan(rows);
            assert_eq!(p.iter().map(|c| c.0).sum::<usize>(), rows);
            assert!(p
                .iter()
                .all(|&(filled, size)| filled >= 1 && filled <= size));
            assert!(p.iter().all(|&(_, size)| CHUNK_ROWS.contains(&size)));
        }
    }

    #[test]
    fn statement_texts_have_a_placeholder_per_value() {
        for rows in [Rows::Jobs, Rows::Merges, Rows::Activity] {
            for size in CHUNK_ROWS {
                let sql = rows.sql(size);
                assert_eq!(sql.matches('?').count(), size * rows.columns(), "{sql}");
            }
        }
    }
}
