//! What the platform does with scheduled events: it starts those due (the
//! server's running phones are stopped by jobs, as a user's stop would),
//! and the operator ends them (`cph admin event complete`: the phones the
//! event stopped start again) or cancels them before they start. An event
//! the project authorized as `redeploy` instead switches the server to a
//! free host of its model when due (new phones of its flavor and image, as
//! `ChangeCloudPhoneServer` does) and is completed at once; with no host to
//! switch to, it runs as maintenance.

use std::collections::BTreeMap;

use cph_agent::protocol::{JobKind, JobRequest, PortSpec};

use crate::catalog::Catalog;

use crate::store::{
    new_id, now_ms, now_string, Event, Server, Store, StoreError, EVENT_CANCELED, EVENT_COMPLETED,
    EVENT_EXECUTING, EVENT_INQUIRING, EVENT_SCHEDULED, SERVER_NORMAL,
};

/// Phone status of a running phone.
pub(crate) const PHONE_RUNNING: i32 = 2;

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
pub fn start_due(store: &Store, catalog: &Catalog, now: i64) -> Result<Vec<String>, EventError> {
    let mut started = Vec::new();
    for e in store.due_events(now)? {
        // Nothing to do when the server was deleted before its maintenance,
        // or has left the host the event is about (switched away, or
        // redeployed by another event).
        let server = store
            .server(&e.project_id, &e.server_id)?
            .filter(|s| e.node_id.is_empty() || e.node_id == s.node_id);
        let Some(server) = server else {
            tracing::info!(event_id = %e.event_id, server_id = %e.server_id, "the event's server is gone from its host, event canceled");
            store.move_event(
                &e.event_id,
                &[EVENT_SCHEDULED, EVENT_INQUIRING],
                EVENT_CANCELED,
                now,
                None,
            )?;
            continue;
        };
        if e.authorization_type == "redeploy" {
            match redeploy(store, catalog, &e, &server, now) {
                Ok(true) => {
                    started.push(e.event_id);
                    continue;
                }
                Ok(false) => {
                    tracing::warn!(event_id = %e.event_id, server_id = %e.server_id, "no host to redeploy to, the event runs as maintenance")
                }
                Err(err) => {
                    tracing::warn!(event_id = %e.event_id, error = %err, "redeploy failed, the event runs as maintenance")
                }
            }
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

/// Switches the server of a `redeploy` event to a free host of its model
/// with new phones of its flavor, image, ports, keypair and properties,
/// and completes the event. `Ok(false)` (nothing done) when the server
/// cannot switch: no free host, a server being made or deleted, its flavor
/// or image gone.
fn redeploy(
    store: &Store,
    catalog: &Catalog,
    e: &Event,
    server: &Server,
    now: i64,
) -> Result<bool, EventError> {
    if server.deleting || !matches!(server.status, SERVER_NORMAL | 2) {
        return Ok(false);
    }
    let Some(model) = catalog.phone_model(&server.phone_model_name) else {
        return Ok(false);
    };
    let job_err = |err: crate::api::ApiError| EventError::Job(e.event_id.clone(), err.to_string());
    let Some(image) =
        crate::api::images::usable_in(catalog, store, &e.project_id, &server.image_id)
            .map_err(job_err)?
    else {
        return Ok(false);
    };
    let ports: Vec<PortSpec> = serde_json::from_str(&server.ports).unwrap_or_default();
    let property: BTreeMap<String, String> = store
        .server_phones(&server.server_id)?
        .first()
        .and_then(|p| serde_json::from_str(&p.property).ok())
        .unwrap_or_default();
    let plan = crate::api::servers::switch_plan(
        store,
        &e.project_id,
        server,
        crate::api::servers::SwitchSpec {
            flavor: Catalog::agent_flavor(model),
            image: image.image,
            ports,
            property,
            keypair_name: server.keypair_name.clone(),
        },
    )
    .map_err(job_err)?;
    let Some(crate::store::Switched {
        server: moved,
        job,
        failed_jobs,
    }) = store.switch_server(&plan)?
    else {
        return Ok(false);
    };
    crate::dispatch::after_failures(store, &failed_jobs);
    let from = [EVENT_SCHEDULED, EVENT_INQUIRING];
    store.move_event(&e.event_id, &from, EVENT_EXECUTING, now, Some(&[]))?;
    store.move_event(&e.event_id, &[EVENT_EXECUTING], EVENT_COMPLETED, now, None)?;
    tracing::info!(event_id = %e.event_id, server_id = %moved.server_id, from = %server.node_id, to = %moved.node_id, job_id = %job.job_id, "scheduled event: server redeployed to another host");
    Ok(true)
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
        let catalog = Catalog::default();
        assert!(start_due(&store, &catalog, 49_999)
            .expect("not due")
            .is_empty());
        assert!(start_due(&store, &catalog, 50_000).expect("due").is_empty());
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
