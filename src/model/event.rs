//! Event types: which CRM tables walhook turns into events and the names of their events.
//!
//! What must hold: the names are the documented `contact.created|updated|deleted`,
//! `company.*`, `activity.*`, `project.*`, in table order and then created, updated,
//! deleted; endpoints' event bitmasks index this order.

/// The CRM tables walhook turns into events, in event-name order.
pub const CRM_TABLES: [&str; 4] = ["contacts", "companies", "activities", "projects"];

/// The row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// INSERT
    Created,
    /// UPDATE
    Updated,
    /// DELETE
    Deleted,
}

/// The event name of `op` on CRM table `table_index` (index into [`CRM_TABLES`]).
pub fn event_type(table_index: usize, op: Op) -> &'static str {
    const NAMES: [[&str; 3]; 4] = [
        ["contact.created", "contact.updated", "contact.deleted"],
        ["company.created", "company.updated", "company.deleted"],
        ["activity.created", "activity.updated", "activity.deleted"],
        ["project.created", "project.updated", "project.deleted"],
    ];
    NAMES[table_index][op as usize]
}

/// Every event name walhook emits.
pub fn all_event_types() -> impl Iterator<Item = &'static str> {
    (0..CRM_TABLES.len())
        .flat_map(|t| [Op::Created, Op::Updated, Op::Deleted].into_iter().map(move |op| event_type(t, op)))
}
