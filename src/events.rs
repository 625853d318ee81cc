//! What the platform does with scheduled events: it starts those due (the
//! server's running phones are stopped by jobs, as a user's stop would),
//! and the operator ends them (`cph admin event complete`: the phones the
//! event stopped start again) or cancels them before they start.

use cph_agent::protocol::{JobKind, JobRequest};

use crate::store::{
    new_id, now_ms, now_string, Event, Store, StoreError, EVENT_CANCELED, EVENT_COMPLETED,
    EVENT_EXECUTING, EVENT_INQUIRING, EVENT_SCHEDULED,
};

/// Phone status of a running phone.
const PHONE_RUNNING: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("scheduled event {0} not found")]
    NotFound(String),
    #[error("scheduled event {id} is {state}; {wanted}")]
    State {
        id: String,
        state: String,
        wanted: &'static str,
    },
    #[error("job of event {0}: {1}")]
    Job(String, String),
}

/// Starts every event due at `now` (authorized ones at their time,
/// unanswered ones at their deadline); the ids started. The loop calls it
/// every second.
pub fn start_due(store: &Store, now: i64) -> Result<Vec<String>, EventError> {
    let mut started = Vec::new();
    for e in store.due_events(now)? {
        if store.server(&e.project_id, &e.server_id)?.is_none() {
            // The server was deleted before its maintenance: nothing to do.
            store.move_event(
                &e.event_id,
                &[EVENT_SCHEDULED, EVENT_INQUIRING],
                EVENT_CANCELED,
                now,
                None,
            )?;
            continue;
        }
        let phones: Vec<_> = store
            .server_phones(&e.server_id)?
            .into_iter()
            .filter(|p| p.status == PHONE_RUNNING)
            .collect();
        let ids: Vec<String> = phones.iter().map(|p| p.phone_id.clone()).collect();
        if !store.move_event(
            &e.event_id,
            &[EVENT_SCHEDULED, EVENT_INQUIRING],
            EVENT_EXECUTING,
            now,
            Some(&ids),
        )? {
            continue;
        }
        phone_jobs(store, &e, &ids, JobKind::StopPhone)?;
        tracing::info!(event_id = %e.event_id, server_id = %e.server_id, phones = ids.len(), "scheduled event started, phones stopped");
        started.push(e.event_id);
    }
    Ok(started)
}

/// Ends an executing event: the phones it stopped start again.
pub fn complete(store: &Store, event_id: &str) -> Result<Event, EventError> {
    let e = end(
        store,
        event_id,
        &[EVENT_EXECUTING],
        EVENT_COMPLETED,
        "only an executing event completes",
    )?;
    phone_jobs(store, &e, &e.stopped_phones, JobKind::StartPhone)?;
    Ok(e)
}

/// Cancels an event that has not started.
pub fn cancel(store: &Store, event_id: &str) -> Result<(), EventError> {
    end(
        store,
        event_id,
        &[EVENT_INQUIRING, EVENT_SCHEDULED],
        EVENT_CANCELED,
        "only an event not started yet is canceled",
    )
    .map(|_| ())
}

/// Moves an event in one of `from` to the final state `to` now; the event
/// as it was, or why it cannot end so.
fn end(
    store: &Store,
    event_id: &str,
    from: &[&str],
    to: &str,
    wanted: &'static str,
) -> Result<Event, EventError> {
    let e = store
        .event(None, event_id)?
        .ok_or_else(|| EventError::NotFound(event_id.to_string()))?;
    if !store.move_event(event_id, from, to, now_ms(), None)? {
        return Err(EventError::State {
            id: e.event_id,
            state: e.state,
            wanted,
        });
    }
    Ok(e)
}

/// One job of `kind` per phone of the event's server, under one request
/// id; the running control plane sends them.
fn phone_jobs(
    store: &Store,
    e: &Event,
    phones: &[String],
    kind: JobKind,
) -> Result<(), EventError> {
    let Some(server) = store.server(&e.project_id, &e.server_id)? else {
        return Ok(());
    };
    let request_id = new_id();
    let now = now_string();
    let rows = phones
        .iter()
        .map(|p| {
            let req = JobRequest {
                job_id: new_id(),
                request_id: request_id.clone(),
                server_id: e.server_id.clone(),
                phone_id: Some(p.clone()),
                kind: kind.clone(),
            };
            crate::api::jobs::job_row(&req, &e.project_id, &server.node_id, &now)
                .map_err(|err| EventError::Job(e.event_id.clone(), err.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    store.insert_jobs(&rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewEvent;

    #[test]
    fn an_event_of_a_deleted_server_is_canceled_when_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("cph.db")).expect("open");
        store
            .insert_event(&NewEvent {
                event_id: "ev1",
                project_id: "p1",
                server_id: "gone",
                kind: "system-maintenance",
                description: "",
                publish_ms: 1_000,
                not_before_deadline_ms: 50_000,
            })
            .expect("insert");
        assert!(start_due(&store, 49_999).expect("not due").is_empty());
        assert!(start_due(&store, 50_000).expect("due").is_empty());
        let e = store.event(None, "ev1").expect("event").expect("there");
        assert_eq!(
            (e.state.as_str(), e.finish_ms),
            (EVENT_CANCELED, Some(50_000))
        );
        assert!(matches!(
            complete(&store, "ev1"),
            Err(EventError::State { .. })
        ));
        assert!(matches!(
            complete(&store, "nope"),
            Err(EventError::NotFound(_))
        ));
    }
}
