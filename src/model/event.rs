//! Event types: which CRM tables walhook turns into events and the names of their events.
//!
//! What must hold: the names are the documented `contact.created|updated|deleted`,
//! `company.*`, `activity.*`, `project.*`; [`EventType::ALL`] lists them in table order and
//! then created, updated, deleted, and [`EventType::bit`] is `1 << position in ALL`.
//! Endpoints' event bitmasks are computed from stored names with these bits and the metric
//! children are created in this order, so neither the order nor the names may change.
//! `<entity>.backfilled` ([`Op::Backfilled`]) is sent only by a backfill to the endpoint that
//! asked for it: it is in no subscription, so it is not in [`EventType::ALL`], it is never
//! parsed as a subscription ([`EventType::parse`]) and its [`EventType::bit`] is 0.

use std::fmt;

/// The CRM tables walhook turns into events, in event-name order ([`Table::ALL`] order).
pub const CRM_TABLES: [&str; 4] =
    [Table::Contacts.name(), Table::Companies.name(), Table::Activities.name(), Table::Projects.name()];

/// A CRM table walhook turns into events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `contacts`, events `contact.*`.
    Contacts,
    /// `companies`, events `company.*`.
    Companies,
    /// `activities`, events `activity.*`.
    Activities,
    /// `projects`, events `project.*`.
    Projects,
}

impl Table {
    /// Every CRM table, in event-name order.
    pub const ALL: [Table; 4] = [Table::Contacts, Table::Companies, Table::Activities, Table::Projects];

    /// The table's name in the CRM schema.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Contacts => "contacts",
            Table::Companies => "companies",
            Table::Activities => "activities",
            Table::Projects => "projects",
        }
    }

    /// The first part of its event names (`contact` in `contact.created`).
    pub const fn prefix(self) -> &'static str {
        match self {
            Table::Contacts => "contact",
            Table::Companies => "company",
            Table::Activities => "activity",
            Table::Projects => "project",
        }
    }

    /// The table named `name` in the CRM schema, if it is one walhook turns into events.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT
    Created,
    /// UPDATE
    Updated,
    /// DELETE
    Deleted,
    /// A row as it is, read by a backfill (never in a subscription or [`Op::ALL`]).
    Backfilled,
}

impl Op {
    /// Every operation, in event-name order.
    pub const ALL: [Op; 3] = [Op::Created, Op::Updated, Op::Deleted];

    /// `created`, `updated` or `deleted`: the last part of event names and the `op` label.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Created => "created",
            Op::Updated => "updated",
            Op::Deleted => "deleted",
            Op::Backfilled => "backfilled",
        }
    }
}

/// What happened to which table: `contact.created` and the other eleven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventType {
    /// The CRM table.
    pub table: Table,
    /// The row operation.
    pub op: Op,
}

impl EventType {
    /// Every event type walhook emits, in table order and then created, updated, deleted.
    pub const ALL: [EventType; 12] = {
        let mut all = [EventType { table: Table::Contacts, op: Op::Created }; 12];
        let mut i = 0;
        while i < 12 {
            all[i] = EventType { table: Table::ALL[i / 3], op: Op::ALL[i % 3] };
            i += 1;
        }
        all
    };

    /// `op` on `table`.
    pub const fn new(table: Table, op: Op) -> Self {
        EventType { table, op }
    }

    /// The documented name, e.g. `contact.created`.
    pub const fn name(self) -> &'static str {
        use Op::*;
        use Table::*;
        match (self.table, self.op) {
            (Contacts, Created) => "contact.created",
            (Contacts, Updated) => "contact.updated",
            (Contacts, Deleted) => "contact.deleted",
            (Companies, Created) => "company.created",
            (Companies, Updated) => "company.updated",
            (Companies, Deleted) => "company.deleted",
            (Activities, Created) => "activity.created",
            (Activities, Updated) => "activity.updated",
            (Activities, Deleted) => "activity.deleted",
            (Projects, Created) => "project.created",
            (Projects, Updated) => "project.updated",
            (Projects, Deleted) => "project.deleted",
            (Contacts, Backfilled) => "contact.backfilled",
            (Companies, Backfilled) => "company.backfilled",
            (Activities, Backfilled) => "activity.backfilled",
            (Projects, Backfilled) => "project.backfilled",
        }
    }

    /// `<entity>.backfilled` of every table, in table order.
    pub const BACKFILLED: [EventType; 4] = [
        EventType { table: Table::Contacts, op: Op::Backfilled },
        EventType { table: Table::Companies, op: Op::Backfilled },
        EventType { table: Table::Activities, op: Op::Backfilled },
        EventType { table: Table::Projects, op: Op::Backfilled },
    ];

    /// Any event type walhook sends, `<entity>.backfilled` included (a delivery's history
    /// filter); [`EventType::parse`] is the subscribable twelve.
    pub fn parse_sent(name: &str) -> Option<EventType> {
        EventType::parse(name).or_else(|| EventType::BACKFILLED.into_iter().find(|e| e.name() == name))
    }

    /// The event type named `name`; `None` for anything but the twelve documented names.
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Its place in [`EventType::ALL`]; a backfilled type comes after the twelve, at
    /// `12 + table` (in no array indexed by this).
    pub const fn index(self) -> usize {
        match self.op {
            Op::Backfilled => EventType::ALL.len() + self.table as usize,
            op => self.table as usize * Op::ALL.len() + op as usize,
        }
    }

    /// Its bit in an endpoint's event mask (0 for a backfilled type: no endpoint subscribes).
    pub const fn bit(self) -> u16 {
        match self.op {
            Op::Backfilled => 0,
            _ => 1 << self.index(),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_and_is_table_prefix_dot_op() {
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.name()), Some(e));
            assert_eq!(e.name(), format!("{}.{}", e.table.prefix(), e.op.name()));
            assert_eq!(e.to_string(), e.name());
            assert_eq!(EventType::ALL[e.index()], e);
        }
    }

    #[test]
    fn all_keeps_todays_order_and_bits() {
        let names: Vec<&str> = EventType::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "contact.created",
                "contact.updated",
                "contact.deleted",
                "company.created",
                "company.updated",
                "company.deleted",
                "activity.created",
                "activity.updated",
                "activity.deleted",
                "project.created",
                "project.updated",
                "project.deleted",
            ]
        );
        let bits: Vec<u16> = EventType::ALL.iter().map(|e| e.bit()).collect();
        assert_eq!(bits, (0..12).map(|i| 1u16 << i).collect::<Vec<_>>());
        assert_eq!(EventType::new(Table::Activities, Op::Updated).bit(), 0x0080);
        assert_eq!(CRM_TABLES, ["contacts", "companies", "activities", "projects"]);
        assert_eq!(Table::from_name("companies"), Some(Table::Companies));
        assert_eq!(Table::from_name("company"), None);
    }

    #[test]
    fn parse_rejects_what_is_not_one_of_the_twelve() {
        for bad in [
            "",
            "contact",
            "contact.",
            "Contact.created",
            "contact.created ",
            "contacts.created",
            "deal.created",
            "contact.truncated",
            "contact.created.x",
            "contact.backfilled",
        ] {
            assert_eq!(EventType::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn backfilled_types_are_sent_but_never_subscribed() {
        for e in EventType::BACKFILLED {
            assert_eq!(e.name(), format!("{}.backfilled", e.table.prefix()));
            assert_eq!(EventType::parse_sent(e.name()), Some(e));
            assert_eq!(EventType::parse(e.name()), None);
            assert_eq!(e.bit(), 0);
            assert!(e.index() >= EventType::ALL.len());
        }
        assert_eq!(EventType::parse_sent("contact.created"), EventType::parse("contact.created"));
    }
}
