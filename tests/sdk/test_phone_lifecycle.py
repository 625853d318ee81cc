"""Restarting, stopping, starting and resetting phones through the official
SDK. These run late (see conftest.py) and leave both phones running."""

import time

from huaweicloudsdkcph.v1 import model as m

from sdkutil import (
    HEARTBEAT_SECS,
    TEST_IMAGE_ID,
    poll,
    packages,
    phone_status,
    shell,
    wait_job,
    wait_jobs_ok,
    wait_phone_status,
)


def shell_job(client, phone_id, command):
    resp = client.run_shell_command(
        m.RunShellCommandRequest(
            body=m.RunShellCommandRequestBody(
                command="shell", content=command, phone_ids=[phone_id]
            )
        )
    )
    return resp.jobs[0].job_id


def boot_id(client, phone_id):
    """Start time of the phone's init (field 22 of /proc/1/stat): new at
    every boot of the phone."""
    out = shell(client, phone_id, "cut -d' ' -f22 /proc/1/stat").strip()
    assert out.isdigit(), out
    return int(out)


def test_restart_phones_keeps_data(client, server):
    _, phones = server
    shell(client, phones[0], "echo kept > /data/local/tmp/restart-marker")
    before = {p: boot_id(client, p) for p in phones}
    resp = client.restart_cloud_phone(
        m.RestartCloudPhoneRequest(
            body=m.RestartCloudPhoneRequestBody(
                phones=[m.PhoneProperty(phone_id=p) for p in phones]
            )
        )
    )
    assert sorted(j.phone_id for j in resp.jobs) == phones, resp
    wait_jobs_ok(client, resp.jobs)
    for p in phones:
        wait_phone_status(client, p, 2)
        assert boot_id(client, p) > before[p]
    assert shell(client, phones[0], "cat /data/local/tmp/restart-marker").strip() == "kept"


def test_restart_server_restarts_its_phones(client, server):
    server_id, phones = server
    before = {p: boot_id(client, p) for p in phones}
    resp = client.restart_cloud_phone_server(
        m.RestartCloudPhoneServerRequest(
            body=m.RestartCloudPhoneServerRequestBody(server_ids=[server_id])
        )
    )
    assert [j.server_id for j in resp.jobs] == [server_id], resp
    wait_jobs_ok(client, resp.jobs)
    for p in phones:
        wait_phone_status(client, p, 2)
        assert boot_id(client, p) > before[p]
    d = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert d.status == 5


def test_stop_then_start(client, server):
    _, phones = server
    target = phones[1]
    resp = client.stop_cloud_phone(
        m.StopCloudPhoneRequest(body=m.StopCloudPhoneRequestBody(phone_ids=[target]))
    )
    assert [j.phone_id for j in resp.jobs] == [target], resp
    try:
        wait_jobs_ok(client, resp.jobs)
        wait_phone_status(client, target, 8)
        listed = client.list_cloud_phones(m.ListCloudPhonesRequest(status=8)).phones
        assert [p.phone_id for p in listed] == [target]
        # A stopped phone runs no commands.
        resp = client.run_shell_command(
            m.RunShellCommandRequest(
                body=m.RunShellCommandRequestBody(
                    command="shell", content="echo up", phone_ids=[target]
                )
            )
        )
        job = wait_job(client, resp.jobs[0].job_id)
        assert job.status == -1 and job.error_code, job
        assert phone_status(client, phones[0]) == 2  # the other one runs on
    finally:
        # Restarting a stopped phone starts it (reference 5.3.6).
        resp = client.restart_cloud_phone(
            m.RestartCloudPhoneRequest(
                body=m.RestartCloudPhoneRequestBody(phones=[m.PhoneProperty(phone_id=target)])
            )
        )
        wait_jobs_ok(client, resp.jobs)
        wait_phone_status(client, target, 2)
    assert "up" in shell(client, target, "echo up")


def test_reset_restores_factory_state(client, server):
    _, phones = server
    target = phones[1]
    shell(client, target, "echo gone > /data/local/tmp/reset-marker")
    assert "gone" in shell(client, target, "cat /data/local/tmp/reset-marker")
    resp = client.reset_cloud_phone(
        m.ResetCloudPhoneRequest(
            body=m.ResetCloudPhoneRequestBody(
                phones=[m.ResetPhoneProperty(phone_id=target)], image_id=TEST_IMAGE_ID
            )
        )
    )
    assert [j.phone_id for j in resp.jobs] == [target], resp
    wait_jobs_ok(client, resp.jobs, limit=180)
    wait_phone_status(client, target, 2)
    out = shell(client, target, "ls /data/local/tmp")
    assert "reset-marker" not in out, out
    assert not {p for p in packages(client, target) if p.startswith("package:com.e2e.")}
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=target))
    assert d.image_id == TEST_IMAGE_ID and d.status == 2


def server_status(client, server_id):
    return client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    ).status


def test_agent_heartbeats_while_jobs_keep_ending(raw_client, server):
    """Jobs ending back to back for longer than the control plane's silence
    limit (3 heartbeats, 30 s) leave the server normal and every job done."""
    server_id, phones = server
    try:
        # Longer than the silence limit, whenever the last heartbeat was.
        deadline = time.monotonic() + 3 * HEARTBEAT_SECS + 8
        while time.monotonic() < deadline:
            job = wait_job(raw_client, shell_job(raw_client, phones[0], "true"), limit=20)
            assert job.status == 2, job
            assert server_status(raw_client, server_id) == 5
    finally:  # the next heartbeat makes the server normal again
        poll(
            lambda: server_status(raw_client, server_id) == 5
            and all(phone_status(raw_client, p) == 2 for p in phones),
            3 * HEARTBEAT_SECS,
            "server normal again",
        )
