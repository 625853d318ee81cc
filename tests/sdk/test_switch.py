"""Switching a server to another host (ChangeCloudPhoneServer) through the
official SDK, on the two real agents of `cph up --hosts 2`: bad requests are
refused with the reference's codes and change nothing; then the server moves
to the free host with new phones of another flavor, nothing of the old
phones is kept, their host deletes them and is for sale again. Last, a
scheduled event authorized as `redeploy` moves it back. Runs last."""

import os
from pathlib import Path

from huaweicloudsdkcph.v1 import model as m

from conftest import current_server, wait_server_ready
from sdkutil import (
    DEV_PHONE_MODEL,
    DEV_PHONE_MODEL_M768,
    DEV_SERVER_MODEL,
    TEST_IMAGE_ID,
    cph,
    control_dir,
    poll,
    sdk_error,
    shell,
    wait_job,
)


def switch(client, server_id, phone_model, image_id, **more):
    return client.change_cloud_phone_server(
        m.ChangeCloudPhoneServerRequest(
            server_id=server_id,
            body=m.ChangeCloudPhoneServerRequestBody(
                phone_model_name=phone_model, image_id=image_id, **more
            ),
        )
    )


def hosts():
    """The fleet as `cph admin host list` shows it: node id -> (server,
    server still being released)."""
    out = cph("admin", "host", "list", "--data-dir", control_dir())
    rows = [line.split("\t") for line in out.splitlines() if line]
    return {r[0]: (r[5], r[6]) for r in rows}


def host_of(server_id):
    return next(n for n, (s, _) in hosts().items() if s == server_id)


def phones_of(client, server_id):
    listed = client.list_cloud_phones(m.ListCloudPhonesRequest(server_id=server_id))
    return sorted(p.phone_id for p in listed.phones or [])


def test_bad_switches_change_nothing(client):
    server_id, phones = current_server(client)
    e = sdk_error(switch, client, "0" * 32, DEV_PHONE_MODEL, TEST_IMAGE_ID)
    assert e.error_code == "CPS.0015", e
    e = sdk_error(switch, client, server_id, "rx1.cp.c60.d10.e1v1", TEST_IMAGE_ID)
    assert e.error_code == "CPS.0257", e
    e = sdk_error(switch, client, server_id, DEV_PHONE_MODEL, "0" * 32)
    assert e.error_code == "CPS.0030", e
    small = m.ChangeCloudPhoneServerRequestBodyPhoneDataVolume(volume_type="SSD", size=5)
    e = sdk_error(
        lambda: switch(
            client, server_id, DEV_PHONE_MODEL, TEST_IMAGE_ID, phone_data_volume=small
        )
    )
    assert e.error_code == "CPS.0001", e
    assert phones_of(client, server_id) == phones


def test_switch_to_the_free_host(client):
    server_id, old = current_server(client)
    before = hosts()
    assert len(before) == 2, before
    old_host = host_of(server_id)
    free = [n for n, (s, r) in before.items() if s == "-" and r == "-"]
    assert free, before
    shell(client, old[0], "echo tenant > /data/marker")

    resp = switch(
        client,
        server_id,
        DEV_PHONE_MODEL_M768,
        TEST_IMAGE_ID,
        keypair_name="default",
        ports=[m.Port(name="web", listen_port=20080, internet_accessible="false")],
        _property='{"com.cph.bandwidth_limit": "20000"}',
    )
    assert resp.server_id == server_id and resp.job_id, resp
    job = wait_job(client, resp.job_id, limit=300)
    assert job.status == 2, job
    assert "2 phones created" in (job.execute_msg or ""), job

    # The same server, on the other host, with new phones of the new
    # flavor: 768 MiB inside each, and nothing of the old phones.
    new = wait_server_ready(client, server_id)
    assert len(new) == 2 and not set(new) & set(old), (old, new)
    assert host_of(server_id) == free[0]
    detail = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert detail.phone_model_name == DEV_PHONE_MODEL_M768, detail
    for phone in new:
        mem_kb = int(shell(client, phone, "head -n 1 /proc/meminfo").split()[1])
        assert 700 * 1024 < mem_kb <= 768 * 1024, mem_kb
        out = shell(client, phone, "cat /data/marker 2>/dev/null || echo none")
        assert out.strip() == "none", out

    # The old host's agent deletes the old phones; the host is for sale
    # again once it has.
    def released():
        server, releasing = hosts()[old_host]
        return server == "-" and releasing == "-"

    poll(released, 120, f"host {old_host} released", step=1)
    names = cph("phone", "list", "--data-dir", str(Path(control_dir()).parent))
    assert not any(p in names for p in old), names
    offers = client.list_cloud_phone_server_model_offerings(
        m.ListCloudPhoneServerModelOfferingsRequest(limit=1000)
    ).models
    assert {o.model_name: o.sell_status for o in offers}[DEV_SERVER_MODEL] == "available"


def test_a_redeploy_event_moves_the_server_back(client):
    server_id, old = current_server(client)
    old_host = host_of(server_id)
    data = control_dir()
    ev = cph(
        "admin", "--data-dir", data, "event", "create", "--server", server_id,
        "--description", "host retired",
    ).strip()
    client.authorize_scheduled_event(
        m.AuthorizeScheduledEventRequest(
            event_id=ev,
            body=m.AuthorizeScheduledEventRequestBody(
                authorization_type="redeploy", not_before=""
            ),
        )
    )

    def event():
        listed = client.list_scheduled_events(m.ListScheduledEventsRequest(event_id=ev))
        return listed.scheduled_events[0]

    poll(lambda: event().state == "completed", 30, "redeploy completed")
    assert event().authorization_type == "redeploy"
    # On the other host with new phones of the same flavor, running.
    poll(lambda: host_of(server_id) != old_host, 30, "server moved")
    new = poll(
        lambda: (lambda p: p if len(p) == 2 and not set(p) & set(old) else None)(
            phones_of(client, server_id)
        ),
        30,
        "new phones",
    )
    assert wait_server_ready(client, server_id) == new
    detail = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert detail.phone_model_name == DEV_PHONE_MODEL_M768, detail


def test_the_cli_switches_the_server(client):
    """`cph switch-server` follows the switch to its end."""
    server_id, old = current_server(client)
    here = host_of(server_id)
    poll(
        lambda: all(r == "-" for _, r in hosts().values()),
        120,
        "the other host released",
        step=1,
    )
    out = cph(
        "switch-server", "--credentials", os.environ["CPH_CREDENTIALS"], server_id,
        "--phone-model", DEV_PHONE_MODEL, "--image", TEST_IMAGE_ID,
    )
    assert f"{server_id} " in out and ": ok" in out, out
    assert host_of(server_id) != here
    new = wait_server_ready(client, server_id)
    assert not set(new) & set(old), (old, new)
    detail = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert detail.phone_model_name == DEV_PHONE_MODEL, detail
