//! How a task attempt went wrong, decided where the error arises: the worker matches on it to
//! retry inside the attempt, stop writing, or spend the attempt.

use crate::{db, db::tasks::Fenced, deid, storage};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The lease went away (rescued elsewhere, cancelled, expired): nothing more may be written.
    #[error("the task's lease is lost")]
    LeaseLost,
    /// A fault that goes away by itself: retried from the checkpoint inside the attempt.
    #[error("{fault} fault: {message}")]
    Transient { fault: Fault, message: String },
    /// A resource the job's de-identification rules fail on (`processingErrors: raise`): every
    /// retry would fail the same way.
    #[error(transparent)]
    Unprocessable(#[from] deid::ProcessingError),
    /// Anything else: the attempt is spent.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// Where a transient fault came from (the metrics' `cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Database,
    Storage,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Database => "database",
            Fault::Storage => "storage",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TaskError {
    /// A failure described in words (a bug or a state the task cannot go on from).
    pub fn failed(message: impl std::fmt::Display + Send + Sync + 'static) -> TaskError {
        TaskError::Failed(anyhow::anyhow!("{message}"))
    }
}

impl From<sqlx::Error> for TaskError {
    fn from(e: sqlx::Error) -> TaskError {
        if db::is_transient(&e) {
            TaskError::Transient {
                fault: Fault::Database,
                message: e.to_string(),
            }
        } else {
            TaskError::Failed(e.into())
        }
    }
}

impl From<Fenced> for TaskError {
    fn from(e: Fenced) -> TaskError {
        match e {
            Fenced::LeaseLost => TaskError::LeaseLost,
            Fenced::Database(e) => e.into(),
        }
    }
}

impl From<storage::Error> for TaskError {
    fn from(e: storage::Error) -> TaskError {
        match e {
            storage::Error::Transient(message) => TaskError::Transient {
                fault: Fault::Storage,
                message,
            },
            storage::Error::Failed(e) => TaskError::Failed(e),
        }
    }
}

/// Malformed data (a row, a COPY stream, a resource): spends the attempt.
impl From<anyhow::Error> for TaskError {
    fn from(e: anyhow::Error) -> TaskError {
        TaskError::Failed(e)
    }
}

impl From<serde_json::Error> for TaskError {
    fn from(e: serde_json::Error) -> TaskError {
        TaskError::Failed(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_is_classified_where_it_arises() {
        let closed = TaskError::from(sqlx::Error::PoolTimedOut);
        assert!(
            matches!(
                closed,
                TaskError::Transient {
                    fault: Fault::Database,
                    ..
                }
            ),
            "{closed}"
        );
        let bad_row = TaskError::from(sqlx::Error::ColumnNotFound("seq".into()));
        assert!(matches!(bad_row, TaskError::Failed(_)), "{bad_row}");
        assert!(matches!(
            TaskError::from(Fenced::LeaseLost),
            TaskError::LeaseLost
        ));
        let paused = TaskError::from(storage::Error::Transient("no answer".into()));
        assert!(matches!(
            paused,
            TaskError::Transient {
                fault: Fault::Storage,
                ..
            }
        ));
        let denied = TaskError::from(storage::Error::Failed(anyhow::anyhow!("403")));
        assert!(matches!(denied, TaskError::Failed(_)));
    }
}
