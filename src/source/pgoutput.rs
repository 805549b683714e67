//! Parser of pgoutput (protocol version 1) messages that pgwire-replication forwards raw:
//! Relation, Type, Origin, Insert, Update, Delete and Truncate. (Begin, Commit and logical
//! Messages arrive already parsed from the replication client.)
//!
//! What must hold: a message is parsed completely or rejected with an error naming what was
//! short; column values are not copied (they are slices of the received buffer).

use bytes::{Buf, Bytes};

/// A parse failure; the stream cannot be trusted past it.
#[derive(Debug, thiserror::Error)]
pub enum PgOutputError {
    /// The message ended early.
    #[error("pgoutput {0} message is truncated")]
    Truncated(&'static str),
    /// A tag walhook does not expect with proto_version 1.
    #[error("unexpected pgoutput message tag {0:?}")]
    UnknownTag(char),
    /// A tuple column kind other than n/u/t/b.
    #[error("unexpected pgoutput tuple column kind {0:?}")]
    UnknownColumnKind(char),
    /// An update or delete without the tuple it must carry.
    #[error("pgoutput {0} message lacks its tuple")]
    MissingTuple(&'static str),
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
}

/// A Relation message: the shape of the rows that follow for `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID.
    pub id: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`d`, `n`, `f`, `i`).
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

/// One column value of a tuple. Its `Debug` shows the kind and size, never the value (rows
/// carry personal data and, for `walhook.endpoints`, signing secrets).
#[derive(Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (its value is not in this tuple).
    Unchanged,
    /// Text-format value.
    Text(Bytes),
    /// Binary-format value (not requested by walhook).
    Binary(Bytes),
}

impl std::fmt::Debug for Datum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Datum::Null => f.write_str("Null"),
            Datum::Unchanged => f.write_str("Unchanged"),
            Datum::Text(b) => write!(f, "Text(<{} bytes>)", b.len()),
            Datum::Binary(b) => write!(f, "Binary(<{} bytes>)", b.len()),
        }
    }
}

/// A replication event as it may be logged: its kind, the pgoutput message kind and size,
/// and positions; never the message's bytes.
pub struct Summary<'a>(pub &'a pgwire_replication::ReplicationEvent);

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use pgwire_replication::ReplicationEvent as E;
        match self.0 {
            E::XLogData { wal_start, data, .. } => {
                let kind = match data.first() {
                    Some(b'R') => "relation",
                    Some(b'Y') => "type",
                    Some(b'O') => "origin",
                    Some(b'I') => "insert",
                    Some(b'U') => "update",
                    Some(b'D') => "delete",
                    Some(b'T') => "truncate",
                    Some(b'M') => "message",
                    _ => "other",
                };
                write!(f, "xlogdata {kind} ({} bytes) at {wal_start}", data.len())
            }
            E::Begin { final_lsn, .. } => write!(f, "begin (commit at {final_lsn})"),
            E::Commit { end_lsn, .. } => write!(f, "commit (end {end_lsn})"),
            E::KeepAlive { wal_end, .. } => write!(f, "keepalive (wal end {wal_end})"),
            E::Message { lsn, prefix, content, .. } => {
                write!(f, "logical message ({} byte prefix, {} bytes) at {lsn}", prefix.len(), content.len())
            }
            E::StoppedAt { reached } => write!(f, "stopped at {reached}"),
            #[allow(unreachable_patterns)]
            _ => f.write_str("other replication event"),
        }
    }
}

/// A row image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Datum>);

/// A parsed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Describes a relation.
    Relation(Relation),
    /// Describes a non-builtin type.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema of the type.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// The transaction came from another origin.
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: String,
    },
    /// A row was inserted.
    Insert {
        /// Relation OID.
        rel: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated.
    Update {
        /// Relation OID.
        rel: u32,
        /// The old row (`O`, full) or old key (`K`) when the server sent one.
        old: Option<(u8, Tuple)>,
        /// The new row.
        new: Tuple,
    },
    /// A row was deleted.
    Delete {
        /// Relation OID.
        rel: u32,
        /// `O` (full old row) or `K` (key columns only).
        kind: u8,
        /// The old row or key.
        old: Tuple,
    },
    /// Tables were truncated.
    Truncate {
        /// Relation OIDs.
        rels: Vec<u32>,
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
    },
}

/// Parses one pgoutput message.
pub fn parse(mut data: Bytes) -> Result<Message, PgOutputError> {
    if data.is_empty() {
        return Err(PgOutputError::Truncated("empty"));
    }
    let tag = data.get_u8();
    let mut r = Reader { buf: data };
    match tag {
        b'R' => {
            let name = "Relation";
            let id = r.u32(name)?;
            let namespace = r.cstr(name)?;
            let rel = r.cstr(name)?;
            let replica_identity = r.u8(name)?;
            let n = r.u16(name)?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                columns.push(Column {
                    flags: r.u8(name)?,
                    name: r.cstr(name)?,
                    type_oid: r.u32(name)?,
                    type_mod: r.u32(name)? as i32,
                });
            }
            Ok(Message::Relation(Relation { id, namespace, name: rel, replica_identity, columns }))
        }
        b'Y' => Ok(Message::Type { oid: r.u32("Type")?, namespace: r.cstr("Type")?, name: r.cstr("Type")? }),
        b'O' => Ok(Message::Origin { commit_lsn: r.u64("Origin")?, name: r.cstr("Origin")? }),
        b'I' => {
            let rel = r.u32("Insert")?;
            match r.u8("Insert")? {
                b'N' => Ok(Message::Insert { rel, new: r.tuple("Insert")? }),
                _ => Err(PgOutputError::MissingTuple("Insert")),
            }
        }
        b'U' => {
            let rel = r.u32("Update")?;
            let mut kind = r.u8("Update")?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some((kind, r.tuple("Update")?));
                kind = r.u8("Update")?;
            }
            if kind != b'N' {
                return Err(PgOutputError::MissingTuple("Update"));
            }
            Ok(Message::Update { rel, old, new: r.tuple("Update")? })
        }
        b'D' => {
            let rel = r.u32("Delete")?;
            let kind = r.u8("Delete")?;
            if kind != b'K' && kind != b'O' {
                return Err(PgOutputError::MissingTuple("Delete"));
            }
            Ok(Message::Delete { rel, kind, old: r.tuple("Delete")? })
        }
        b'T' => {
            let n = r.u32("Truncate")?;
            let options = r.u8("Truncate")?;
            let rels = (0..n).map(|_| r.u32("Truncate")).collect::<Result<_, _>>()?;
            Ok(Message::Truncate { rels, options })
        }
        other => Err(PgOutputError::UnknownTag(other as char)),
    }
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), PgOutputError> {
        if self.buf.remaining() < n {
            Err(PgOutputError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, PgOutputError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, PgOutputError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, PgOutputError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, PgOutputError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, PgOutputError> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(PgOutputError::Truncated(what))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn tuple(&mut self, what: &'static str) -> Result<Tuple, PgOutputError> {
        let n = self.u16(what)?;
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            values.push(match self.u8(what)? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                k @ (b't' | b'b') => {
                    let len = self.u32(what)? as usize;
                    self.need(len, what)?;
                    let v = self.buf.split_to(len);
                    if k == b't' {
                        Datum::Text(v)
                    } else {
                        Datum::Binary(v)
                    }
                }
                other => return Err(PgOutputError::UnknownColumnKind(other as char)),
            });
        }
        Ok(Tuple(values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_summaries_show_sizes_not_values() {
        let row = Tuple(vec![Datum::Text(Bytes::from_static(b"Jane Personal")), Datum::Null]);
        let shown = format!("{row:?}");
        assert!(!shown.contains("Jane") && shown.contains("13 bytes"), "{shown}");
        let event = pgwire_replication::ReplicationEvent::XLogData {
            wal_start: pgwire_replication::Lsn::from_u64(1),
            wal_end: pgwire_replication::Lsn::from_u64(2),
            server_time_micros: 0,
            data: Bytes::from_static(b"I\0\0\0\x07Nwhsec_secret"),
        };
        let shown = Summary(&event).to_string();
        assert!(shown.starts_with("xlogdata insert (") && !shown.contains("whsec"), "{shown}");
    }
    use bytes::BufMut;

    fn tuple_bytes(b: &mut bytes::BytesMut, vals: &[Option<&str>]) {
        b.put_u16(vals.len() as u16);
        for v in vals {
            match v {
                None => b.put_u8(b'n'),
                Some("\u{0}toast") => b.put_u8(b'u'),
                Some(s) => {
                    b.put_u8(b't');
                    b.put_u32(s.len() as u32);
                    b.put_slice(s.as_bytes());
                }
            }
        }
    }

    #[test]
    fn relation_round_trip() {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0contacts\0");
        b.put_u8(b'f');
        b.put_u16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(2950);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"tags\0");
        b.put_u32(1009);
        b.put_i32(-1);
        let Message::Relation(rel) = parse(b.freeze()).unwrap() else { panic!() };
        assert_eq!(rel.name, "contacts");
        assert_eq!(rel.columns[1].type_oid, 1009);
        assert_eq!(rel.columns[1].type_mod, -1);
    }

    #[test]
    fn update_with_old_tuple_and_unchanged_toast() {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(7);
        b.put_u8(b'O');
        tuple_bytes(&mut b, &[Some("1"), Some("long")]);
        b.put_u8(b'N');
        tuple_bytes(&mut b, &[Some("1"), Some("\u{0}toast")]);
        let Message::Update { old: Some((b'O', old)), new, .. } = parse(b.freeze()).unwrap() else { panic!() };
        assert_eq!(old.0[1], Datum::Text(Bytes::from_static(b"long")));
        assert_eq!(new.0[1], Datum::Unchanged);
    }

    #[test]
    fn truncated_messages_are_errors() {
        let mut b = bytes::BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(7);
        b.put_u8(b'N');
        b.put_u16(1);
        b.put_u8(b't');
        b.put_u32(10);
        b.put_slice(b"abc");
        assert!(matches!(parse(b.freeze()), Err(PgOutputError::Truncated("Insert"))));
        assert!(matches!(parse(Bytes::from_static(b"Z")), Err(PgOutputError::UnknownTag('Z'))));
    }
}
