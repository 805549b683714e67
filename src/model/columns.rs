//! Changed-column filters (`update_columns`): per CRM table, the columns an update must change
//! for it to reach an endpoint.
//!
//! What must hold (routing applies it, `source::route`): a filter only narrows updates of the
//! tables it names (created, deleted and other tables' events pass); an update passes when one
//! of the listed columns changed, or when which columns changed is not known (the old row is
//! not in the stream), so a filter never drops an update it cannot prove irrelevant; a column
//! that no longer exists simply never matches. Names are checked against the catalog where a
//! filter is set (`admin::columns`), not here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `{"contacts": ["email", "lead_score"], …}`: table name (as in the CRM) → columns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UpdateColumns(pub BTreeMap<String, Vec<String>>);

impl UpdateColumns {
    /// The columns listed for `table`, if the filter names it.
    pub fn of(&self, table: &str) -> Option<&[String]> {
        self.0.get(table).map(Vec::as_slice)
    }

    /// Whether the filter names no table (the same as no filter).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_and_write_as_the_api_shows_them() {
        let f = UpdateColumns(BTreeMap::from([("contacts".to_owned(), vec!["email".to_owned(), "lead_score".into()])]));
        assert_eq!(f.of("contacts"), Some(&["email".to_owned(), "lead_score".to_owned()][..]));
        assert_eq!(f.of("companies"), None, "a table the filter does not name");
        assert!(!f.is_empty() && UpdateColumns::default().is_empty());
        let json: UpdateColumns = serde_json::from_str(r#"{"contacts":["email","lead_score"]}"#).unwrap();
        assert_eq!(json, f);
        assert_eq!(serde_json::to_string(&f).unwrap(), r#"{"contacts":["email","lead_score"]}"#);
    }
}
