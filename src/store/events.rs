//! Scheduled events: maintenance of a server's host that the operator
//! announces (`inquiring`), the server's project authorizes with a time
//! (`scheduled`), the platform starts at that time or at the deadline
//! (`executing`: the server's running phones are stopped) and the operator
//! completes (`completed`: those phones start again) or cancels.

use rusqlite::{params, OptionalExtension, Row};

use super::{Result, Store};

pub const EVENT_INQUIRING: &str = "inquiring";
pub const EVENT_SCHEDULED: &str = "scheduled";
pub const EVENT_EXECUTING: &str = "executing";
pub const EVENT_COMPLETED: &str = "completed";
pub const EVENT_CANCELED: &str = "canceled";

/// A scheduled event with its server as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub project_id: String,
    pub server_id: String,
    /// `system-maintenance` or `localdisk-recovery`.
    pub kind: String,
    pub state: String,
    /// `maintenance` or `redeploy` once authorized, else empty.
    pub authorization_type: String,
    pub description: String,
    pub publish_ms: i64,
    pub not_before_deadline_ms: i64,
    pub not_before_ms: Option<i64>,
    pub start_ms: Option<i64>,
    pub finish_ms: Option<i64>,
    /// Phones the event stopped.
    pub stopped_phones: Vec<String>,
    pub server_name: String,
    pub server_model_name: String,
    pub server_status: i32,
    /// The host the server was on when the event was announced (the
    /// event is about that host); empty for events announced before it
    /// was recorded.
    pub node_id: String,
}

/// An event as the operator announces it.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub project_id: &'a str,
    pub server_id: &'a str,
    pub kind: &'a str,
    pub description: &'a str,
    pub publish_ms: i64,
    pub not_before_deadline_ms: i64,
}

/// Which events a listing shows (all of them match).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub event_id: Option<String>,
    pub server_id: Option<String>,
    pub states: Vec<String>,
    pub kinds: Vec<String>,
    pub publish_since_ms: Option<i64>,
    pub publish_until_ms: Option<i64>,
}

const COLS: &str = "e.event_id, e.project_id, e.server_id, e.type, e.state, \
    e.authorization_type, e.description, e.publish_ms, e.not_before_deadline_ms, \
    e.not_before_ms, e.start_ms, e.finish_ms, e.stopped_phones, \
    COALESCE(s.server_name, ''), COALESCE(s.server_model_name, ''), COALESCE(s.status, 0), \
    e.node_id";
const FROM: &str = "scheduled_events e LEFT JOIN servers s ON s.server_id = e.server_id";

fn event_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    let stopped: String = r.get(12)?;
    Ok(Event {
        event_id: r.get(0)?,
        project_id: r.get(1)?,
        server_id: r.get(2)?,
        kind: r.get(3)?,
        state: r.get(4)?,
        authorization_type: r.get(5)?,
        description: r.get(6)?,
        publish_ms: r.get(7)?,
        not_before_deadline_ms: r.get(8)?,
        not_before_ms: r.get(9)?,
        start_ms: r.get(10)?,
        finish_ms: r.get(11)?,
        stopped_phones: serde_json::from_str(&stopped).unwrap_or_default(),
        server_name: r.get(13)?,
        server_model_name: r.get(14)?,
        server_status: r.get(15)?,
        node_id: r.get(16)?,
    })
}

impl Store {
    /// Announces an event on a server (of the server's project).
    pub fn insert_event(&self, e: &NewEvent<'_>) -> Result<()> {
        self.db()?.execute(
            "INSERT INTO scheduled_events (event_id, project_id, server_id, type, state,
                 description, publish_ms, not_before_deadline_ms, node_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,
                 COALESCE((SELECT node_id FROM servers WHERE server_id = ?3), ''))",
            params![
                e.event_id,
                e.project_id,
                e.server_id,
                e.kind,
                EVENT_INQUIRING,
                e.description,
                e.publish_ms,
                e.not_before_deadline_ms
            ],
        )?;
        Ok(())
    }

    /// An event by id; with `project_id`, only that project's.
    pub fn event(&self, project_id: Option<&str>, event_id: &str) -> Result<Option<Event>> {
        Ok(self
            .db()?
            .query_row(
                &format!(
                    "SELECT {COLS} FROM {FROM} WHERE e.event_id = ?1
                     AND (?2 IS NULL OR e.project_id = ?2)"
                ),
                params![event_id, project_id],
                event_row,
            )
            .optional()?)
    }

    /// A project's events (every project's with `None`) by publish time
    /// then id, `limit` after the event `marker`, how many match, and
    /// whether more follow the page.
    pub fn list_events(
        &self,
        project_id: Option<&str>,
        f: &EventFilter,
        marker: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Event>, usize, bool)> {
        let c = self.db()?;
        let mut all: Vec<Event> = {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLS} FROM {FROM} WHERE (?1 IS NULL OR e.project_id = ?1)
                   AND (?2 IS NULL OR e.event_id = ?2) AND (?3 IS NULL OR e.server_id = ?3)
                   AND (?4 IS NULL OR e.publish_ms >= ?4) AND (?5 IS NULL OR e.publish_ms <= ?5)
                 ORDER BY e.publish_ms, e.event_id"
            ))?;
            let rows = stmt.query_map(
                params![
                    project_id,
                    f.event_id,
                    f.server_id,
                    f.publish_since_ms,
                    f.publish_until_ms
                ],
                event_row,
            )?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        all.retain(|e| {
            (f.states.is_empty() || f.states.contains(&e.state))
                && (f.kinds.is_empty() || f.kinds.contains(&e.kind))
        });
        let total = all.len();
        let start = match marker {
            Some(m) => all
                .iter()
                .position(|e| e.event_id == m)
                .map_or(total, |i| i + 1),
            None => 0,
        };
        let page: Vec<Event> = all.into_iter().skip(start).take(limit).collect();
        let more = start + page.len() < total;
        Ok((page, total, more))
    }

    /// Authorizes an event still inquiring: scheduled for `not_before_ms`.
    /// False when it is not inquiring any more.
    pub fn authorize_event(&self, event_id: &str, kind: &str, not_before_ms: i64) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE scheduled_events SET state = ?2, authorization_type = ?3, not_before_ms = ?4
             WHERE event_id = ?1 AND state = ?5",
            params![
                event_id,
                EVENT_SCHEDULED,
                kind,
                not_before_ms,
                EVENT_INQUIRING
            ],
        )?;
        Ok(n == 1)
    }

    /// Moves a scheduled event's start; false when it is not scheduled.
    pub fn reschedule_event(&self, event_id: &str, not_before_ms: i64) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE scheduled_events SET not_before_ms = ?2 WHERE event_id = ?1 AND state = ?3",
            params![event_id, not_before_ms, EVENT_SCHEDULED],
        )?;
        Ok(n == 1)
    }

    /// Events that should start by `now_ms`: scheduled ones whose time has
    /// come, and inquiring ones past their deadline.
    pub fn due_events(&self, now_ms: i64) -> Result<Vec<Event>> {
        let c = self.db()?;
        let mut stmt = c.prepare(&format!(
            "SELECT {COLS} FROM {FROM}
             WHERE (e.state = ?1 AND e.not_before_ms <= ?3)
                OR (e.state = ?2 AND e.not_before_deadline_ms <= ?3)
             ORDER BY e.publish_ms"
        ))?;
        let rows = stmt.query_map(params![EVENT_SCHEDULED, EVENT_INQUIRING, now_ms], event_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves an event from `from` to `to` at `at_ms` (the start time when
    /// it starts executing, the finish time when it ends), recording the
    /// phones it stopped; false when it was not in `from`. One statement:
    /// of two moves at once (the loop starting an event, an operator
    /// canceling it) one wins and the other is told so.
    pub fn move_event(
        &self,
        event_id: &str,
        from: &[&str],
        to: &str,
        at_ms: i64,
        stopped_phones: Option<&[String]>,
    ) -> Result<bool> {
        use rusqlite::types::Value;
        let stopped =
            stopped_phones.map(|p| serde_json::to_string(p).unwrap_or_else(|_| "[]".into()));
        let column = if to == EVENT_EXECUTING {
            "start_ms"
        } else {
            "finish_ms"
        };
        let states: Vec<String> = (0..from.len()).map(|i| format!("?{}", i + 5)).collect();
        let mut values = vec![
            Value::from(event_id.to_string()),
            Value::from(to.to_string()),
            Value::from(at_ms),
            stopped.map_or(Value::Null, Value::from),
        ];
        values.extend(from.iter().map(|s| Value::from(s.to_string())));
        let changed = self.db()?.execute(
            &format!(
                "UPDATE scheduled_events SET state = ?2, {column} = ?3,
                     stopped_phones = COALESCE(?4, stopped_phones)
                 WHERE event_id = ?1 AND state IN ({})",
                states.join(", ")
            ),
            rusqlite::params_from_iter(values),
        )?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(
        id: &'a str,
        server: &'a str,
        kind: &'a str,
        publish_ms: i64,
        deadline_ms: i64,
    ) -> NewEvent<'a> {
        NewEvent {
            event_id: id,
            project_id: "p1",
            server_id: server,
            kind,
            description: "disk",
            publish_ms,
            not_before_deadline_ms: deadline_ms,
        }
    }

    fn store_with_event(deadline_ms: i64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("cph.db")).expect("open");
        s.insert_event(&event(
            "ev1",
            "srv1",
            "system-maintenance",
            1_000,
            deadline_ms,
        ))
        .expect("insert");
        (dir, s)
    }

    #[test]
    fn an_event_is_authorized_started_and_completed_once() {
        let (_d, s) = store_with_event(100_000);
        assert!(s.event(Some("p2"), "ev1").expect("event").is_none());
        assert!(s.due_events(50_000).expect("due").is_empty());
        assert!(!s.reschedule_event("ev1", 60_000).expect("reschedule"));
        assert!(s
            .authorize_event("ev1", "maintenance", 60_000)
            .expect("authorize"));
        assert!(!s
            .authorize_event("ev1", "maintenance", 70_000)
            .expect("twice"));
        assert!(s.reschedule_event("ev1", 80_000).expect("reschedule"));
        assert!(s.due_events(79_999).expect("due").is_empty());
        let due = s.due_events(80_000).expect("due");
        assert_eq!(due.len(), 1);
        let phones = vec!["ph1".to_string()];
        assert!(s
            .move_event(
                "ev1",
                &[EVENT_SCHEDULED, EVENT_INQUIRING],
                EVENT_EXECUTING,
                80_001,
                Some(&phones)
            )
            .expect("start"));
        assert!(!s
            .move_event(
                "ev1",
                &[EVENT_SCHEDULED, EVENT_INQUIRING],
                EVENT_EXECUTING,
                80_002,
                None
            )
            .expect("started once"));
        assert!(s
            .move_event("ev1", &[EVENT_EXECUTING], EVENT_COMPLETED, 90_000, None)
            .expect("complete"));
        let e = s.event(Some("p1"), "ev1").expect("event").expect("there");
        assert_eq!(
            (e.state.as_str(), e.start_ms, e.finish_ms, e.stopped_phones),
            (EVENT_COMPLETED, Some(80_001), Some(90_000), phones)
        );
        assert_eq!(e.authorization_type, "maintenance");
    }

    #[test]
    fn an_unanswered_event_is_due_at_its_deadline_and_listed_by_filter() {
        let (_d, s) = store_with_event(100_000);
        s.insert_event(&event("ev2", "srv2", "localdisk-recovery", 2_000, 200_000))
            .expect("insert");
        assert_eq!(s.due_events(100_000).expect("due").len(), 1);
        let f = EventFilter {
            kinds: vec!["localdisk-recovery".into()],
            ..Default::default()
        };
        let (page, total, more) = s.list_events(Some("p1"), &f, None, 10).expect("list");
        assert_eq!((page.len(), total, more), (1, 1, false));
        assert_eq!(page[0].event_id, "ev2");
        let (page, total, more) = s
            .list_events(Some("p1"), &EventFilter::default(), Some("ev1"), 10)
            .expect("list");
        assert_eq!((page.len(), total, more), (1, 2, false));
        assert_eq!(page[0].event_id, "ev2");
        let (page, _, more) = s
            .list_events(Some("p1"), &EventFilter::default(), None, 1)
            .expect("list");
        assert_eq!((page[0].event_id.as_str(), more), ("ev1", true));
        let f = EventFilter {
            states: vec![EVENT_SCHEDULED.into()],
            ..Default::default()
        };
        assert_eq!(s.list_events(Some("p1"), &f, None, 10).expect("list").1, 0);
        assert_eq!(
            s.list_events(Some("p2"), &EventFilter::default(), None, 10)
                .expect("list")
                .1,
            0
        );
    }
}
