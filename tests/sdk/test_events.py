"""Scheduled events through the official SDK: the operator announces
maintenance of the local server's host (`cph admin event create`); the
project lists it, authorizes it and moves it to now; its phones stop, and
start again when the operator completes it."""

import time

from huaweicloudsdkcph.v1 import model as m

from sdkutil import cph, control_dir, poll, sdk_error, wait_phone_status


def utc(secs):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(secs))


def events(client, **query):
    return client.list_scheduled_events(m.ListScheduledEventsRequest(**query))


def test_scheduled_event_authorized_moved_and_completed(client, server):
    server_id, phones = server
    data = control_dir()
    ev = cph(
        "admin", "--data-dir", data, "event", "create", "--server", server_id,
        "--description", "new disk",
    ).strip()
    try:
        listed = events(client, server_id=server_id, state=["inquiring"], type=["system-maintenance"])
        assert listed.count == 1, listed
        e = listed.scheduled_events[0]
        assert (e.event_id, e.state, e.description) == (ev, "inquiring", "new disk")
        assert e.server_name and e.server_model_name and e.not_before is None

        e = sdk_error(
            client.authorize_scheduled_event,
            m.AuthorizeScheduledEventRequest(
                event_id=ev,
                body=m.AuthorizeScheduledEventRequestBody(authorization_type="reboot"),
            ),
        )
        assert e.error_code == "CPS.0001", e
        hour = utc(time.time() + 3600)
        client.authorize_scheduled_event(
            m.AuthorizeScheduledEventRequest(
                event_id=ev,
                body=m.AuthorizeScheduledEventRequestBody(
                    authorization_type="maintenance", not_before=hour
                ),
            )
        )
        e = events(client, event_id=ev).scheduled_events[0]
        assert (e.state, e.not_before, e.authorization_type) == ("scheduled", hour, "maintenance")

        # Moved to now: it starts and the server's phones stop.
        client.update_scheduled_event(
            m.UpdateScheduledEventRequest(
                event_id=ev, body=m.UpdateScheduledEventRequestBody(not_before="")
            )
        )
        poll(
            lambda: events(client, event_id=ev).scheduled_events[0].state == "executing",
            30,
            "event executing",
        )
        for p in phones:
            wait_phone_status(client, p, 8)
    finally:
        out = cph("admin", "--data-dir", data, "event", "list")
        state = next(line.split("\t")[4] for line in out.splitlines() if line.startswith(ev))
        if state == "executing":
            cph("admin", "--data-dir", data, "event", "complete", ev)
        elif state in ("inquiring", "scheduled"):
            cph("admin", "--data-dir", data, "event", "cancel", ev)
    # Completed: the phones it stopped run again (later files expect them).
    for p in phones:
        wait_phone_status(client, p, 2)
    e = events(client, event_id=ev).scheduled_events[0]
    assert e.state == "completed" and e.finish_time, e
