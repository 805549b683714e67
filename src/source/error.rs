//! Why the stream stopped, and whether reconnecting may help.
//!
//! What must hold: the dispatcher gone (its channel closed) is never transient (nothing read
//! can be delivered any more, invariant 21); a connection lost, a stream gone silent or a
//! leadership lost is; a slot busy with another consumer is retried (the session decides
//! when that is fatal).

use std::time::Duration;

use pgwire_replication::PgWireError;

use crate::pg::db::DbError;
use crate::source::decode::DecodeError;
use crate::source::route::RouteError;
use crate::source::slot::ceiling::CeilingError;
use crate::source::slot::SlotError;
use crate::source::visible::VisibleError;

/// Why replication stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A query on a normal connection failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The replication connection failed.
    #[error("replication stream: {0}")]
    Stream(PgWireError),
    /// A message could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The server ended the stream.
    #[error("the server closed the replication stream")]
    Closed,
    /// Nothing arrived on the stream, not even a message walhook wrote to bring it back.
    #[error(
        "the replication stream brought nothing for {0:?}, not even a message walhook wrote: the walsender or the \
         connection is stuck"
    )]
    Silent(Duration),
    /// Dispatch stopped taking deliveries (its task ended): nothing read can be delivered
    /// any more, so this is never retried (the supervisor names the dispatcher).
    #[error("the dispatcher's channel is closed: dispatch stopped taking deliveries")]
    DispatchClosed,
    /// The slot is streamed by another process, or cannot be used by walhook.
    #[error(transparent)]
    Slot(SlotError),
    /// Endpoints could not be loaded.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// This process lost the advisory lock that makes it the streaming replica.
    #[error("lost the replication leadership lock")]
    LeadershipLost,
    /// Endpoint changes could not be stored as routing versions (their commit stays
    /// unconfirmed and is read again).
    #[error("storing routing versions: {0}")]
    RoutingVersions(DbError),
    /// A transaction read from the stream that changed endpoints could not be seen by
    /// queries in time (its commit stays unconfirmed and is read again).
    #[error(transparent)]
    NotVisible(#[from] VisibleError),
    /// The confirm ceiling could not be raised: the query failed, or the slot is no longer
    /// the one walhook streamed from (the next session reports it lost).
    #[error("confirm ceiling: {0}")]
    Ceiling(#[from] CeilingError),
}

impl ReplicationError {
    /// Whether reconnecting may help.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Db(e) => e.is_transient(),
            ReplicationError::Stream(e) => !e.is_auth() && !e.is_message_too_large(),
            ReplicationError::Decode(DecodeError::TypeLookup(_)) => true,
            ReplicationError::Decode(_) => false,
            ReplicationError::Closed | ReplicationError::LeadershipLost | ReplicationError::Silent(_) => true,
            ReplicationError::DispatchClosed => false,
            ReplicationError::RoutingVersions(_) => true,
            ReplicationError::NotVisible(VisibleError::Db(e)) => e.is_transient(),
            ReplicationError::NotVisible(VisibleError::NotYet { .. } | VisibleError::ShuttingDown(_)) => true,
            ReplicationError::Ceiling(CeilingError::Db(e)) => e.is_transient(),
            // The next session looks at the slot and reports it lost.
            ReplicationError::Ceiling(CeilingError::NotWalhooks(_)) => true,
            ReplicationError::Slot(SlotError::Busy { .. }) => true,
            ReplicationError::Slot(SlotError::Db(e)) => e.is_transient(),
            ReplicationError::Slot(_) => false,
            ReplicationError::Route(RouteError::Db(e)) => e.is_transient(),
            ReplicationError::Route(_) => false,
        }
    }
}

impl From<PgWireError> for ReplicationError {
    fn from(e: PgWireError) -> Self {
        ReplicationError::Stream(e)
    }
}

impl From<tokio_postgres::Error> for ReplicationError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReplicationError::Db(DbError::Postgres(e))
    }
}

impl From<SlotError> for ReplicationError {
    fn from(e: SlotError) -> Self {
        match e {
            SlotError::Db(e) => ReplicationError::Db(e),
            e => ReplicationError::Slot(e),
        }
    }
}
