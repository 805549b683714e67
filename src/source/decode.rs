//! Decode: pgoutput row messages to webhook bodies (CRM tables) and endpoint rows
//! (`walhook.endpoints`).
//!
//! What must hold: every column of the row is in `data`, in table order, whatever the table's
//! shape (nothing beyond `id` and `account_id` is assumed); an unchanged-TOAST column takes
//! its value from the old row image when there is one and is left out otherwise (never sent
//! as null); deletes use the old row (all columns with REPLICA IDENTITY FULL, only the key
//! columns otherwise); unknown column types are looked up in `pg_type` before any row of the
//! relation is decoded.

use std::collections::HashMap;

use bytes::Bytes;
use uuid::Uuid;

use crate::model::event::{EventType, Op, Table};
use crate::pg::catalog::ENDPOINTS_TABLE;
use crate::source::pgoutput::{Datum, Message, PgOutputError, Relation, Tuple};
use crate::source::values::{self, Kind};

/// Decoding failures.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The message itself could not be parsed.
    #[error(transparent)]
    Parse(#[from] PgOutputError),
    /// A row arrived for a relation the stream never described.
    #[error("row for unknown relation {0}: the stream skipped its Relation message")]
    UnknownRelation(u32),
    /// Looking up a column type failed.
    #[error("looking up column types: {}", crate::pg::db::error_chain(.0))]
    TypeLookup(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for DecodeError {
    fn from(e: tokio_postgres::Error) -> Self {
        DecodeError::TypeLookup(e)
    }
}

/// A CRM row change, ready to route.
#[derive(Debug, Clone)]
pub struct RowChange {
    /// Which table, which operation (e.g. `contact.created`).
    pub event_type: EventType,
    /// The row's account; `None` when the row image lacks it (cannot be routed).
    pub account_id: Option<Uuid>,
    /// `table:id`, the unit of ordering.
    pub entity_key: String,
    /// The webhook body: `{"event":…,"timestamp":…,"data":{…}}`.
    pub body: Bytes,
}

/// A change of `walhook.endpoints`; `None` fields were not in the row image.
#[derive(Debug, Clone, Default)]
pub struct EndpointRow {
    /// Endpoint id.
    pub id: Option<Uuid>,
    /// Owning account.
    pub account_id: Option<Uuid>,
    /// Target URL.
    pub url: Option<String>,
    /// Stored (maybe encrypted) secret.
    pub secret: Option<String>,
    /// Subscribed events.
    pub events: Option<Vec<String>>,
    /// Enabled?
    pub is_active: Option<bool>,
    /// Why walhook disabled it (NULL: enabled, or disabled by hand).
    pub disabled_reason: Option<String>,
}

/// What a row message means to walhook.
#[derive(Debug)]
pub enum Decoded {
    /// A CRM row changed.
    Row(RowChange),
    /// An endpoint was inserted or updated.
    EndpointUpsert(EndpointRow),
    /// An endpoint was deleted.
    EndpointDelete(Uuid),
    /// CRM tables were truncated (no events).
    Truncate(Vec<String>),
    /// Nothing to do (relation/type/origin bookkeeping, other tables).
    Nothing,
}

#[derive(Debug)]
enum Role {
    Crm(Table),
    Endpoints,
    Other,
}

#[derive(Debug)]
struct RelInfo {
    rel: Relation,
    role: Role,
    kinds: Vec<Kind>,
    id_col: Option<usize>,
    account_col: Option<usize>,
}

/// Keeps the relation and type descriptions of one replication session.
#[derive(Debug)]
pub struct Decoder {
    crm_schema: String,
    relations: HashMap<u32, RelInfo>,
    types: HashMap<u32, Kind>,
}

impl Decoder {
    /// A decoder for CRM tables living in `crm_schema`.
    pub fn new(crm_schema: &str) -> Self {
        Decoder { crm_schema: crm_schema.to_owned(), relations: HashMap::new(), types: HashMap::new() }
    }

    /// Type OIDs of `rel` whose JSON mapping must be looked up before `add_relation`.
    pub fn unknown_types(&self, rel: &Relation) -> Vec<u32> {
        rel.columns
            .iter()
            .map(|c| c.type_oid)
            .filter(|oid| values::builtin_kind(*oid).is_none() && !self.types.contains_key(oid))
            .collect()
    }

    /// Looks up `oids` (and what they are built on) in `pg_type`.
    pub async fn resolve_types(
        &mut self,
        client: &impl tokio_postgres::GenericClient,
        oids: Vec<u32>,
    ) -> Result<(), DecodeError> {
        // typcategory, base type (domains), element type (arrays), delimiter
        let mut info: HashMap<u32, (u8, u32, u32, u8)> = HashMap::new();
        let mut pending = oids;
        while !pending.is_empty() {
            let rows = client
                .query(
                    "SELECT oid, typcategory::text, typbasetype, typelem, typdelim::text \
                     FROM pg_type WHERE oid = ANY($1)",
                    &[&pending],
                )
                .await?;
            pending.clear();
            for r in rows {
                let oid: u32 = r.get(0);
                let first = |s: String| s.bytes().next().unwrap_or(b'U');
                let (cat, base, elem, delim) =
                    (first(r.get(1)), r.get::<_, u32>(2), r.get::<_, u32>(3), first(r.get(4)));
                for dep in [base, elem] {
                    if dep != 0 && values::builtin_kind(dep).is_none() && !info.contains_key(&dep) {
                        pending.push(dep);
                    }
                }
                info.insert(oid, (cat, base, elem, delim));
            }
            pending.retain(|o| !info.contains_key(o));
        }
        fn kind_of(oid: u32, info: &HashMap<u32, (u8, u32, u32, u8)>, depth: u8) -> Kind {
            if let Some(k) = values::builtin_kind(oid) {
                return k;
            }
            let Some(&(cat, base, elem, delim)) = info.get(&oid) else { return Kind::Text };
            if depth > 8 {
                return Kind::Text;
            }
            let base_kind = (base != 0).then(|| kind_of(base, info, depth + 1));
            let elem_kind = (cat == b'A' && elem != 0).then(|| kind_of(elem, info, depth + 1));
            values::catalog_kind(cat, base_kind, elem_kind, delim)
        }
        let kinds: Vec<(u32, Kind)> = info.keys().map(|&oid| (oid, kind_of(oid, &info, 0))).collect();
        self.types.extend(kinds);
        Ok(())
    }

    /// Records a Relation message (after `resolve_types` for its unknown types).
    pub fn add_relation(&mut self, rel: Relation) {
        let role = if rel.namespace == ENDPOINTS_TABLE.0 && rel.name == ENDPOINTS_TABLE.1 {
            Role::Endpoints
        } else if rel.namespace == self.crm_schema {
            Table::from_name(&rel.name).map(Role::Crm).unwrap_or(Role::Other)
        } else {
            Role::Other
        };
        let kinds = rel
            .columns
            .iter()
            .map(|c| {
                values::builtin_kind(c.type_oid).or_else(|| self.types.get(&c.type_oid).cloned()).unwrap_or(Kind::Text)
            })
            .collect();
        let col = |name: &str| rel.columns.iter().position(|c| c.name == name);
        let (id_col, account_col) = (col("id"), col("account_id"));
        self.relations.insert(rel.id, RelInfo { rel, role, kinds, id_col, account_col });
    }

    /// Decodes a row message. `prefix` is `{"event":"` … up to the commit timestamp's
    /// closing quote is written by this function, with `timestamp` the RFC 3339 commit time.
    pub fn decode(&mut self, msg: Message, timestamp: &str) -> Result<Decoded, DecodeError> {
        let (rel_id, op, new, old, old_kind) = match msg {
            Message::Relation(_) | Message::Type { .. } | Message::Origin { .. } => return Ok(Decoded::Nothing),
            Message::Truncate { rels, .. } => {
                let names = rels
                    .iter()
                    .filter_map(|id| self.relations.get(id))
                    .filter(|r| matches!(r.role, Role::Crm(_)))
                    .map(|r| r.rel.name.clone())
                    .collect();
                return Ok(Decoded::Truncate(names));
            }
            Message::Insert { rel, new } => (rel, Op::Created, Some(new), None, 0),
            Message::Update { rel, old, new } => {
                let (kind, old) = old.map(|(k, t)| (k, Some(t))).unwrap_or((0, None));
                (rel, Op::Updated, Some(new), old, kind)
            }
            Message::Delete { rel, kind, old } => (rel, Op::Deleted, None, Some(old), kind),
        };
        let info = self.relations.get(&rel_id).ok_or(DecodeError::UnknownRelation(rel_id))?;
        match info.role {
            Role::Other => Ok(Decoded::Nothing),
            Role::Endpoints => Ok(endpoint_change(info, op, new.as_ref(), old.as_ref())),
            Role::Crm(table) => {
                let event_type = EventType::new(table, op);
                // Deletes describe the old row; only key columns are meaningful in a 'K' image.
                let (image, fallback, keys_only) = match (new.as_ref(), op) {
                    (Some(n), _) => (n, old.as_ref().filter(|_| old_kind == b'O'), false),
                    (None, _) => (old.as_ref().expect("delete carries its old tuple"), None, old_kind == b'K'),
                };
                let mut body = Vec::with_capacity(256 + image.0.iter().map(datum_len).sum::<usize>());
                body.extend_from_slice(b"{\"event\":\"");
                body.extend_from_slice(event_type.name().as_bytes());
                body.extend_from_slice(b"\",\"timestamp\":\"");
                body.extend_from_slice(timestamp.as_bytes());
                body.extend_from_slice(b"\",\"data\":");
                write_row(&mut body, info, image, fallback, keys_only);
                body.push(b'}');
                let text_of = |col: Option<usize>| {
                    col.and_then(|c| match (image.0.get(c), fallback.and_then(|f| f.0.get(c))) {
                        (Some(Datum::Text(t)), _) | (Some(Datum::Unchanged), Some(Datum::Text(t))) => Some(t.clone()),
                        _ => None,
                    })
                };
                let account_id = text_of(info.account_col)
                    .and_then(|t| std::str::from_utf8(&t).ok().and_then(|s| Uuid::parse_str(s).ok()));
                let id = text_of(info.id_col).map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
                Ok(Decoded::Row(RowChange {
                    event_type,
                    account_id,
                    entity_key: format!("{}:{id}", info.rel.name),
                    body: Bytes::from(body),
                }))
            }
        }
    }
}

fn datum_len(d: &Datum) -> usize {
    match d {
        Datum::Text(t) | Datum::Binary(t) => t.len() + 24,
        _ => 24,
    }
}

/// Writes `{"col":value,…}` for `image`, filling unchanged-TOAST columns from `fallback`.
fn write_row(out: &mut Vec<u8>, info: &RelInfo, image: &Tuple, fallback: Option<&Tuple>, keys_only: bool) {
    out.push(b'{');
    let mut first = true;
    for (i, (col, kind)) in info.rel.columns.iter().zip(&info.kinds).enumerate() {
        if keys_only && col.flags & 1 == 0 {
            continue;
        }
        let datum = match image.0.get(i) {
            Some(Datum::Unchanged) => match fallback.and_then(|f| f.0.get(i)) {
                Some(d @ (Datum::Text(_) | Datum::Null)) => d,
                _ => continue, // value not in the stream: leave the column out
            },
            Some(d) => d,
            None => continue,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        values::write_string(out, col.name.as_bytes());
        out.push(b':');
        match datum {
            Datum::Text(t) => values::write_value(out, kind, t),
            Datum::Binary(b) => values::write_string(out, format!("\\x{}", hex(b)).as_bytes()),
            Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn endpoint_change(info: &RelInfo, op: Op, new: Option<&Tuple>, old: Option<&Tuple>) -> Decoded {
    let image = new.or(old);
    let text = |name: &str| -> Option<String> {
        let i = info.rel.columns.iter().position(|c| c.name == name)?;
        match image?.0.get(i)? {
            Datum::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            _ => None,
        }
    };
    let row = EndpointRow {
        id: text("id").and_then(|s| Uuid::parse_str(&s).ok()),
        account_id: text("account_id").and_then(|s| Uuid::parse_str(&s).ok()),
        url: text("url"),
        secret: text("secret"),
        events: text("events").and_then(|s| {
            let mut json = Vec::new();
            values::write_value(&mut json, &Kind::Array { elem: Box::new(Kind::Text), delim: b',' }, s.as_bytes());
            serde_json::from_slice(&json).ok()
        }),
        is_active: text("is_active").map(|s| s == "t"),
        disabled_reason: text("disabled_reason"),
    };
    match (op, row.id) {
        (Op::Deleted, Some(id)) => Decoded::EndpointDelete(id),
        (Op::Deleted, None) => Decoded::Nothing,
        _ => Decoded::EndpointUpsert(row),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::Column;

    fn projects(namespace: &str, name: &str) -> Relation {
        let col = |flags, name: &str, type_oid| Column { flags, name: name.into(), type_oid, type_mod: -1 };
        Relation {
            id: 42,
            namespace: namespace.into(),
            name: name.into(),
            replica_identity: b'f',
            columns: vec![col(1, "id", 25), col(0, "account_id", 2950), col(0, "budget", 23)],
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// The body is what receivers verify signatures over: its bytes must not change.
    #[test]
    fn crm_rows_become_the_documented_event_and_body() {
        let mut d = Decoder::new("crm");
        d.add_relation(projects("crm", "projects"));
        let acct = "aaaa0000-0000-4000-8000-000000000001";
        let row = Tuple(vec![text("p1"), text(acct), text("12")]);
        let ts = "2026-12-01T14:00:00.123456Z";
        let Decoded::Row(c) = d.decode(Message::Insert { rel: 42, new: row.clone() }, ts).unwrap() else { panic!() };
        assert_eq!(c.event_type.to_string(), "project.created");
        assert_eq!(c.entity_key, "projects:p1");
        assert_eq!(c.account_id, Some(Uuid::parse_str(acct).unwrap()));
        assert_eq!(
            std::str::from_utf8(&c.body).unwrap(),
            format!(
                r#"{{"event":"project.created","timestamp":"{ts}","data":{{"id":"p1","account_id":"{acct}","budget":12}}}}"#
            )
        );
        let Decoded::Row(c) = d.decode(Message::Update { rel: 42, old: None, new: row.clone() }, ts).unwrap() else {
            panic!()
        };
        assert_eq!(c.event_type.to_string(), "project.updated");
        let Decoded::Row(c) = d.decode(Message::Delete { rel: 42, kind: b'O', old: row }, ts).unwrap() else {
            panic!()
        };
        assert_eq!(c.event_type.to_string(), "project.deleted");
        assert!(std::str::from_utf8(&c.body).unwrap().starts_with(r#"{"event":"project.deleted","#));
    }

    #[test]
    fn other_tables_and_schemas_are_not_events() {
        for (schema, table) in [("crm", "project"), ("public", "projects"), ("crm", "deals")] {
            let mut d = Decoder::new("crm");
            d.add_relation(projects(schema, table));
            let row = Tuple(vec![text("p1"), text("aaaa0000-0000-4000-8000-000000000001"), text("1")]);
            assert!(matches!(d.decode(Message::Insert { rel: 42, new: row }, "t").unwrap(), Decoded::Nothing));
        }
    }
}
