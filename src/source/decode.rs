//! Decode: pgoutput row messages to webhook bodies (CRM tables) and endpoint rows
//! (`walhook.endpoints`).
//!
//! What must hold: every column of the row is in `data`, in table order, whatever the table's
//! shape (nothing beyond `id` and `account_id` is assumed); an unchanged-TOAST column takes
//! its value from the old row image when there is one and is left out otherwise (never sent
//! as null); deletes use the old row (all columns with REPLICA IDENTITY FULL, only the key
//! columns otherwise); an update that changes `account_id` is a row leaving its old account
//! (`<entity>.deleted` with the old row, routed to the old account) and joining the new one
//! (`<entity>.created` with the new row), so neither account ever sees the other's data, and
//! one whose old image shows a NULL `account_id` joins the new account (`<entity>.created`,
//! never filtered like an update); unknown column types are looked up in `pg_type` before any row of the relation is decoded.
//! An `<entity>.updated` whose old row is known (a whole old image, REPLICA IDENTITY FULL)
//! carries `previous` right after `data`: the old values of exactly the columns whose value
//! changed (its text form as PostgreSQL sends it: `1.0` → `1.00` in a bare numeric is a
//! change, the same jsonb or timestamptz written again is not), encoded as in `data` (`{}`
//! when none did), and the same columns as
//! [`RowChange::changed`]; an unchanged large (TOASTed) value never counts as changed. Without
//! the old row (no old image, or only its key) there is no `previous` and no `changed`, and
//! neither is there on creates, deletes or a row moving between accounts. The body is
//! written once, into one buffer.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::model::columns::UpdateColumns;
use crate::model::event::{EventType, Op, Table};
use crate::pg::catalog::ENDPOINTS_TABLE;
use crate::source::changed::ChangedColumns;
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
    /// The webhook body: `{"event":…,"timestamp":…,"data":{…}}`, with `"previous":{…}` after
    /// `data` when `changed` is known, and `"omitted":{…}` last when columns are left out.
    pub body: Bytes,
    /// Which columns the update changed; `None`: not an update, or its old row is unknown
    /// (the replica identity is not FULL).
    pub changed: Option<ChangedColumns>,
    /// Every column is in `data` (nothing `omitted`).
    pub whole: bool,
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
    /// The tag of the last call that requeued its deliveries (`webhooks-recover`, `-redeliver`,
    /// `-replay`).
    pub requeue_tag: Option<i64>,
    /// Changed-column filters (`Some(None)`: the column is NULL, no filter).
    pub update_columns: Option<Option<UpdateColumns>>,
}

/// What a row message means to walhook.
#[derive(Debug)]
pub enum Decoded {
    /// A CRM row changed.
    Row(RowChange),
    /// A CRM row's `account_id` changed: it left one account (`left`, a delete with the old
    /// row) and joined another (`joined`, a create with the new row), in that order.
    Moved {
        /// `<entity>.deleted` for the old account.
        left: RowChange,
        /// `<entity>.created` for the new account.
        joined: RowChange,
    },
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
    /// Column names in relation order, shared by every update's `ChangedColumns`.
    names: Arc<[String]>,
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
        let names = rel.columns.iter().map(|c| c.name.clone()).collect();
        self.relations.insert(rel.id, RelInfo { rel, role, kinds, names, id_col, account_col });
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
                // Deletes describe the old row; only key columns are meaningful in a 'K' image.
                let (image, fallback, keys_only) = match (new.as_ref(), op) {
                    (Some(n), _) => (n, old.as_ref().filter(|_| old_kind == b'O'), false),
                    (None, _) => (old.as_ref().expect("delete carries its old tuple"), None, old_kind == b'K'),
                };
                // An update whose old image names another account: the row moved.
                let moved_from = match (op, old.as_ref()) {
                    (Op::Updated, Some(old)) => account_of(info, old, None)
                        .filter(|&from| Some(from) != account_of(info, image, fallback))
                        .map(|_| old),
                    _ => None,
                };
                // An update whose old image shows no account (NULL) for a row that has one now:
                // the row joins that account (there was no account to leave).
                let joined_from_none = op == Op::Updated
                    && old.as_ref().is_some_and(|old| account_is_null(info, old, old_kind))
                    && account_of(info, image, fallback).is_some();
                if joined_from_none {
                    let joined_as = EventType::new(table, Op::Created);
                    return Ok(Decoded::Row(row_change(info, joined_as, (image, fallback, keys_only), timestamp)));
                }
                if let Some(old) = moved_from {
                    let left_as = EventType::new(table, Op::Deleted);
                    let left = row_change(info, left_as, (old, None, old_kind == b'K'), timestamp);
                    let joined_as = EventType::new(table, Op::Created);
                    let joined = row_change(info, joined_as, (image, fallback, keys_only), timestamp);
                    return Ok(Decoded::Moved { left, joined });
                }
                Ok(Decoded::Row(row_change(info, EventType::new(table, op), (image, fallback, keys_only), timestamp)))
            }
        }
    }
}

impl Decoder {
    /// A CRM row read by a backfill (every column's text, in the relation's order) as
    /// `<entity>.backfilled` read at `timestamp`; `None` for a relation that is not a CRM
    /// table (or was never added). Written exactly as the stream writes the same row.
    pub fn backfilled(&self, rel_id: u32, row: &Tuple, timestamp: &str) -> Option<RowChange> {
        let info = self.relations.get(&rel_id)?;
        let Role::Crm(table) = info.role else { return None };
        Some(row_change(info, EventType::new(table, Op::Backfilled), (row, None, false), timestamp))
    }
}

/// The change `image` (with `fallback` for unchanged-TOAST columns; only the key columns when
/// `keys_only`) describes, as `event_type`.
fn row_change(
    info: &RelInfo,
    event_type: EventType,
    (image, fallback, keys_only): (&Tuple, Option<&Tuple>, bool),
    timestamp: &str,
) -> RowChange {
    let mut body = Vec::with_capacity(256 + image.0.iter().map(datum_len).sum::<usize>());
    write_body_start(&mut body, event_type, timestamp);
    // (A created event with an unchanged value is a row that moved in from another account:
    // its receiver never had that value.)
    let moved_in = event_type.op == Op::Created;
    // The old row is known for an update with a whole old image: what changed is known too.
    let mut changed = match (event_type.op, fallback) {
        (Op::Updated, Some(_)) => Some(ChangedColumns::new(info.names.clone())),
        _ => None,
    };
    let whole = write_row(&mut body, info, (image, fallback, keys_only), moved_in, changed.as_mut());
    body.push(b'}');
    let id =
        text_of(info.id_col, image, fallback).map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
    RowChange {
        event_type,
        account_id: account_of(info, image, fallback),
        entity_key: format!("{}:{id}", info.rel.name),
        body: Bytes::from(body),
        changed,
        whole,
    }
}

/// `{"event":"<event_type>","timestamp":"<timestamp>","data":`
fn write_body_start(body: &mut Vec<u8>, event_type: EventType, timestamp: &str) {
    body.extend_from_slice(b"{\"event\":\"");
    body.extend_from_slice(event_type.name().as_bytes());
    body.extend_from_slice(b"\",\"timestamp\":\"");
    body.extend_from_slice(timestamp.as_bytes());
    body.extend_from_slice(b"\",\"data\":");
}

/// The text of column `col` in `image`, or in `fallback` when unchanged-TOAST there.
fn text_of(col: Option<usize>, image: &Tuple, fallback: Option<&Tuple>) -> Option<Bytes> {
    col.and_then(|c| match (image.0.get(c), fallback.and_then(|f| f.0.get(c))) {
        (Some(Datum::Text(t)), _) | (Some(Datum::Unchanged), Some(Datum::Text(t))) => Some(t.clone()),
        _ => None,
    })
}

/// Whether `old` (an old image of kind `kind`) shows the row without an account: its
/// `account_id` is NULL in a whole image, or in a key image whose key includes it.
fn account_is_null(info: &RelInfo, old: &Tuple, kind: u8) -> bool {
    let Some(col) = info.account_col else { return false };
    let in_image = kind == b'O' || info.rel.columns.get(col).is_some_and(|c| c.flags & 1 != 0);
    in_image && matches!(old.0.get(col), Some(Datum::Null))
}

/// The row's account, when the image carries it.
fn account_of(info: &RelInfo, image: &Tuple, fallback: Option<&Tuple>) -> Option<Uuid> {
    text_of(info.account_col, image, fallback)
        .and_then(|t| std::str::from_utf8(&t).ok().and_then(|s| Uuid::parse_str(s).ok()))
}

fn datum_len(d: &Datum) -> usize {
    match d {
        Datum::Text(t) | Datum::Binary(t) => t.len() + 24,
        _ => 24,
    }
}

/// Writes `{"col":value,…}` for `image`, filling unchanged-TOAST columns from `fallback`;
/// with `changed` (an update whose old row `fallback` is), marks there the columns whose value
/// differs from the old row's and writes `,"previous":{"col":old value,…}` for them; then, when
/// columns had to be left out, `,"omitted":{"reason":…,"columns":[…]}` (`moved_in`: the row
/// joins this account, which never had the values left out). Whether nothing was left out.
fn write_row(
    out: &mut Vec<u8>,
    info: &RelInfo,
    (image, fallback, keys_only): (&Tuple, Option<&Tuple>, bool),
    moved_in: bool,
    mut changed: Option<&mut ChangedColumns>,
) -> bool {
    out.push(b'{');
    let mut first = true;
    let mut omitted: Vec<&str> = Vec::new();
    for (i, (col, kind)) in info.rel.columns.iter().zip(&info.kinds).enumerate() {
        if keys_only && col.flags & 1 == 0 {
            omitted.push(&col.name);
            continue;
        }
        let datum = match image.0.get(i) {
            Some(Datum::Unchanged) => match fallback.and_then(|f| f.0.get(i)) {
                Some(d @ (Datum::Text(_) | Datum::Null)) => d,
                // Not in the stream (unchanged, stored out of line, and the replica identity
                // carries no old value): left out, and said so.
                _ => {
                    omitted.push(&col.name);
                    continue;
                }
            },
            Some(d) => {
                if let Some(changed) = changed.as_deref_mut() {
                    if differs(d, fallback.and_then(|f| f.0.get(i))) {
                        changed.mark(i);
                    }
                }
                d
            }
            None => continue,
        };
        write_member(out, &mut first, &col.name, kind, datum);
    }
    out.push(b'}');
    if let (Some(changed), Some(old)) = (changed, fallback) {
        write_previous(out, info, old, changed);
    }
    if omitted.is_empty() {
        return true;
    }
    // Why: a delete (or a row leaving its account) under an index identity carries only the
    // key; an update carries no unchanged large (TOASTed) value unless the identity is FULL.
    let reason: &[u8] = match (keys_only, moved_in) {
        (true, _) => b"replica_identity_key_only",
        (false, false) => b"unchanged_toast",
        // The value did not change in the move, and this account was never sent it.
        (false, true) => b"moved_unchanged_toast",
    };
    out.extend_from_slice(b",\"omitted\":{\"reason\":\"");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\",\"columns\":[");
    for (n, name) in omitted.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        values::write_string(out, name.as_bytes());
    }
    out.extend_from_slice(b"]}");
    false
}

/// Whether a new value (never an unchanged TOAST one) differs from the old row's `old`: raw
/// bytes against raw bytes, NULL against a value. An old value not in the stream is unknown,
/// so not a change.
fn differs(new: &Datum, old: Option<&Datum>) -> bool {
    match old {
        Some(old @ (Datum::Text(_) | Datum::Binary(_) | Datum::Null)) => new != old,
        Some(Datum::Unchanged) | None => false,
    }
}

/// `,"previous":{"col":old value,…}`: the old values of the `changed` columns, in relation
/// order, encoded as `data` encodes values.
fn write_previous(out: &mut Vec<u8>, info: &RelInfo, old: &Tuple, changed: &ChangedColumns) {
    out.extend_from_slice(b",\"previous\":{");
    let mut first = true;
    for (i, (col, kind)) in info.rel.columns.iter().zip(&info.kinds).enumerate() {
        let Some(datum) = old.0.get(i).filter(|_| changed.is_marked(i)) else { continue };
        write_member(out, &mut first, &col.name, kind, datum);
    }
    out.push(b'}');
}

/// `"name":value` of one column inside an object (a comma before it unless it is the `first`).
fn write_member(out: &mut Vec<u8>, first: &mut bool, name: &str, kind: &Kind, datum: &Datum) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    values::write_string(out, name.as_bytes());
    out.push(b':');
    write_datum(out, kind, datum);
}

/// Appends the JSON form of one column value.
fn write_datum(out: &mut Vec<u8>, kind: &Kind, datum: &Datum) {
    match datum {
        Datum::Text(t) => values::write_value(out, kind, t),
        Datum::Binary(b) => values::write_string(out, format!("\\x{}", hex(b)).as_bytes()),
        Datum::Null | Datum::Unchanged => out.extend_from_slice(b"null"),
    }
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
    // `None`: not in the image (unchanged TOAST); `Some(None)`: NULL.
    let nullable = |name: &str| -> Option<Option<String>> {
        let i = info.rel.columns.iter().position(|c| c.name == name)?;
        match image?.0.get(i)? {
            Datum::Text(t) => Some(Some(String::from_utf8_lossy(t).into_owned())),
            Datum::Null => Some(None),
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
        requeue_tag: text("requeue_tag").and_then(|s| s.parse().ok()),
        update_columns: nullable("update_columns").map(|t| t.and_then(|s| serde_json::from_str(&s).ok())),
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
    fn a_row_whose_account_goes_from_null_to_an_account_joins_it_as_created() {
        let mut d = Decoder::new("crm");
        d.add_relation(projects("crm", "projects"));
        let b = "bbbb0000-0000-4000-8000-000000000002";
        let old = Tuple(vec![text("p1"), Datum::Null, text("12")]);
        let new = Tuple(vec![text("p1"), text(b), text("12")]);
        let ts = "t";
        let joined = d.decode(Message::Update { rel: 42, old: Some((b'O', old)), new: new.clone() }, ts).unwrap();
        let Decoded::Row(c) = joined else { panic!("{joined:?}") };
        assert_eq!((c.event_type.to_string(), c.account_id), ("project.created".into(), Uuid::parse_str(b).ok()));
        assert!(c.changed.is_none() && !std::str::from_utf8(&c.body).unwrap().contains("previous"));
        // A key image that does not carry account_id says nothing about it: an ordinary update.
        let key = Tuple(vec![text("p0"), Datum::Null, Datum::Null]);
        let update = d.decode(Message::Update { rel: 42, old: Some((b'K', key)), new }, ts).unwrap();
        assert!(matches!(update, Decoded::Row(ref c) if c.event_type.to_string() == "project.updated"), "{update:?}");
    }

    #[test]
    fn a_row_moving_between_accounts_leaves_the_old_one_and_joins_the_new_one() {
        let mut d = Decoder::new("crm");
        d.add_relation(projects("crm", "projects"));
        let (a, b) = ("aaaa0000-0000-4000-8000-000000000001", "bbbb0000-0000-4000-8000-000000000002");
        let old = Tuple(vec![text("p1"), text(a), text("12")]);
        let new = Tuple(vec![text("p1"), text(b), text("13")]);
        let ts = "2026-12-01T14:00:00Z";
        let moved =
            d.decode(Message::Update { rel: 42, old: Some((b'O', old.clone())), new: new.clone() }, ts).unwrap();
        let Decoded::Moved { left, joined } = moved else { panic!("{moved:?}") };
        assert_eq!((left.event_type.to_string(), left.account_id), ("project.deleted".into(), Uuid::parse_str(a).ok()));
        assert_eq!(
            std::str::from_utf8(&left.body).unwrap(),
            format!(
                r#"{{"event":"project.deleted","timestamp":"{ts}","data":{{"id":"p1","account_id":"{a}","budget":12}}}}"#
            )
        );
        assert_eq!(
            (joined.event_type.to_string(), joined.account_id),
            ("project.created".into(), Uuid::parse_str(b).ok())
        );
        assert_eq!(
            std::str::from_utf8(&joined.body).unwrap(),
            format!(
                r#"{{"event":"project.created","timestamp":"{ts}","data":{{"id":"p1","account_id":"{b}","budget":13}}}}"#
            )
        );
        assert_eq!(left.entity_key, joined.entity_key);
        // The same account in the old image (or none): an ordinary update.
        let same = Tuple(vec![text("p1"), text(a), text("14")]);
        let update = d.decode(Message::Update { rel: 42, old: Some((b'O', old.clone())), new: same }, ts).unwrap();
        assert!(matches!(update, Decoded::Row(ref c) if c.event_type.to_string() == "project.updated"), "{update:?}");
        let update = d.decode(Message::Update { rel: 42, old: None, new }, ts).unwrap();
        assert!(matches!(update, Decoded::Row(_)));
    }

    #[test]
    fn columns_not_in_the_stream_are_named_never_silently_left_out() {
        let mut d = Decoder::new("crm");
        d.add_relation(projects("crm", "projects"));
        let a = "aaaa0000-0000-4000-8000-000000000001";
        let ts = "t";
        // An update under an index identity: an unchanged TOASTed value has no old image.
        let new = Tuple(vec![text("p1"), text(a), Datum::Unchanged]);
        let Decoded::Row(c) = d.decode(Message::Update { rel: 42, old: None, new: new.clone() }, ts).unwrap() else {
            panic!()
        };
        assert_eq!(
            std::str::from_utf8(&c.body).unwrap(),
            format!(
                r#"{{"event":"project.updated","timestamp":"t","data":{{"id":"p1","account_id":"{a}"}},"omitted":{{"reason":"unchanged_toast","columns":["budget"]}}}}"#
            )
        );
        // With the old row (FULL), the value comes from it: nothing omitted.
        let old = Tuple(vec![text("p1"), text(a), text("7")]);
        let Decoded::Row(c) = d.decode(Message::Update { rel: 42, old: Some((b'O', old)), new }, ts).unwrap() else {
            panic!()
        };
        assert!(!std::str::from_utf8(&c.body).unwrap().contains("omitted"));
        assert!(std::str::from_utf8(&c.body).unwrap().contains(r#""budget":7"#));
        // A delete under an index identity: only the key, and the rest named.
        let key = Tuple(vec![text("p1"), Datum::Null, Datum::Null]);
        let Decoded::Row(c) = d.decode(Message::Delete { rel: 42, kind: b'K', old: key }, ts).unwrap() else {
            panic!()
        };
        assert!(
            std::str::from_utf8(&c.body)
                .unwrap()
                .ends_with(r#""data":{"id":"p1"},"omitted":{"reason":"replica_identity_key_only","columns":["account_id","budget"]}}"#),
            "{}",
            std::str::from_utf8(&c.body).unwrap()
        );
    }

    /// `projects` with a text column and a text[] column too.
    fn wide_projects() -> Relation {
        let mut rel = projects("crm", "projects");
        let col = |name: &str, type_oid| Column { flags: 0, name: name.into(), type_oid, type_mod: -1 };
        rel.columns.extend([col("notes", 25), col("tags", 1009)]);
        rel
    }

    const A: &str = "aaaa0000-0000-4000-8000-000000000001";

    /// Decodes an update of `wide_projects` from `old` (an image of `kind`) to `new`.
    fn update(old: Option<(u8, Vec<Datum>)>, new: Vec<Datum>) -> RowChange {
        let mut d = Decoder::new("crm");
        d.add_relation(wide_projects());
        let msg = Message::Update { rel: 42, old: old.map(|(k, t)| (k, Tuple(t))), new: Tuple(new) };
        match d.decode(msg, "t").unwrap() {
            Decoded::Row(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn body(c: &RowChange) -> &str {
        std::str::from_utf8(&c.body).unwrap()
    }

    fn changed(c: &RowChange) -> Option<Vec<&str>> {
        c.changed.as_ref().map(|s| s.names().collect())
    }

    /// The body is what receivers verify signatures over: its bytes are pinned.
    #[test]
    fn an_update_with_the_old_row_carries_the_old_values_of_exactly_the_changed_columns() {
        let old = vec![text("p1"), text(A), text("12"), text("same"), text("{vip}")];
        let new = vec![text("p1"), text(A), text("13"), text("same"), text("{vip,\"new one\"}")];
        let c = update(Some((b'O', old)), new);
        assert_eq!(
            body(&c),
            format!(
                r#"{{"event":"project.updated","timestamp":"t","data":{{"id":"p1","account_id":"{A}","budget":13,"notes":"same","tags":["vip","new one"]}},"previous":{{"budget":12,"tags":["vip"]}}}}"#
            )
        );
        assert_eq!(changed(&c), Some(vec!["budget", "tags"]));
        let set = c.changed.as_ref().unwrap();
        assert!(set.contains("budget") && set.any_of(&["notes", "tags"]) && !set.contains("notes"));
    }

    #[test]
    fn an_update_that_changes_nothing_carries_an_empty_previous() {
        let row = vec![text("p1"), text(A), text("12"), Datum::Null, text("{}")];
        let c = update(Some((b'O', row.clone())), row);
        assert_eq!(
            body(&c),
            format!(
                r#"{{"event":"project.updated","timestamp":"t","data":{{"id":"p1","account_id":"{A}","budget":12,"notes":null,"tags":[]}},"previous":{{}}}}"#
            )
        );
        assert!(c.changed.as_ref().is_some_and(ChangedColumns::is_empty));
    }

    #[test]
    fn without_the_old_row_there_is_no_previous() {
        let new = vec![text("p1"), text(A), text("13"), text("n"), text("{}")];
        let expected = format!(
            r#"{{"event":"project.updated","timestamp":"t","data":{{"id":"p1","account_id":"{A}","budget":13,"notes":"n","tags":[]}}}}"#
        );
        // No old image (an identity whose key did not change).
        let c = update(None, new.clone());
        assert_eq!((body(&c), c.changed.is_none()), (expected.as_str(), true));
        // A key-only old image (the key changed under an index identity): not the old row.
        let key = vec![text("p0"), text(A), Datum::Null, Datum::Null, Datum::Null];
        let c = update(Some((b'K', key)), new);
        assert_eq!((body(&c), c.changed.is_none()), (expected.as_str(), true));
    }

    #[test]
    fn an_unchanged_large_value_is_not_a_change_and_comes_from_the_old_row() {
        let old = vec![text("p1"), text(A), text("12"), text("long text"), Datum::Null];
        let new = vec![text("p1"), text(A), text("14"), Datum::Unchanged, Datum::Null];
        let c = update(Some((b'O', old)), new);
        assert_eq!(
            body(&c),
            format!(
                r#"{{"event":"project.updated","timestamp":"t","data":{{"id":"p1","account_id":"{A}","budget":14,"notes":"long text","tags":null}},"previous":{{"budget":12}}}}"#
            )
        );
        assert_eq!(changed(&c), Some(vec!["budget"]));
        // An old value not in the stream (never under FULL) is unknown: not listed either.
        let old = vec![text("p1"), text(A), Datum::Unchanged, text("x"), Datum::Null];
        let new = vec![text("p1"), text(A), text("15"), text("x"), Datum::Null];
        let c = update(Some((b'O', old)), new);
        assert!(body(&c).ends_with(r#""budget":15,"notes":"x","tags":null},"previous":{}}"#), "{}", body(&c));
        assert_eq!(changed(&c), Some(vec![]));
    }

    #[test]
    fn null_against_a_value_is_a_change_both_ways() {
        let old = vec![text("p1"), text(A), Datum::Null, Datum::Null, text("{a}")];
        let new = vec![text("p1"), text(A), Datum::Null, text("now set"), Datum::Null];
        let c = update(Some((b'O', old)), new);
        assert!(
            body(&c).ends_with(
                r#""data":{"id":"p1","account_id":"aaaa0000-0000-4000-8000-000000000001","budget":null,"notes":"now set","tags":null},"previous":{"notes":null,"tags":["a"]}}"#
            ),
            "{}",
            body(&c)
        );
        assert_eq!(changed(&c), Some(vec!["notes", "tags"]));
        // Raw bytes decide: the same number written alike is unchanged, an empty string is not NULL.
        let old = vec![text("p1"), text(A), text("12"), text(""), text("{}")];
        let new = vec![text("p1"), text(A), text("12"), Datum::Null, text("{}")];
        assert_eq!(changed(&update(Some((b'O', old)), new)), Some(vec!["notes"]));
    }

    #[test]
    fn creates_deletes_and_moves_carry_no_previous() {
        let mut d = Decoder::new("crm");
        d.add_relation(wide_projects());
        let b = "bbbb0000-0000-4000-8000-000000000002";
        let old = Tuple(vec![text("p1"), text(A), text("12"), text("n"), text("{}")]);
        let new = Tuple(vec![text("p1"), text(b), text("13"), text("n"), text("{}")]);
        let moved = d.decode(Message::Update { rel: 42, old: Some((b'O', old.clone())), new: new.clone() }, "t");
        let Decoded::Moved { left, joined } = moved.unwrap() else { panic!() };
        for c in [&left, &joined] {
            assert!(c.changed.is_none() && !body(c).contains("previous"), "{}", body(c));
        }
        let created = d.decode(Message::Insert { rel: 42, new }, "t").unwrap();
        let deleted = d.decode(Message::Delete { rel: 42, kind: b'O', old }, "t").unwrap();
        for decoded in [created, deleted] {
            let Decoded::Row(c) = decoded else { panic!() };
            assert!(c.changed.is_none() && !body(&c).contains("previous"), "{}", body(&c));
        }
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
