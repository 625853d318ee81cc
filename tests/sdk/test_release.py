"""Deleting a server through the official SDK (DeleteCloudPhoneServer, a
DELETE with a JSON body): bad requests refused with the reference's codes,
then the server released on its real agent and the host bought again, with
an empty sharepool. Runs last: it replaces the session's server."""

import json

from huaweicloudsdkcph.v1 import model as m

from conftest import buy_server, wait_server_ready
from sdkutil import push_share_tar, sdk_error, wait_job


def delete(client, server_ids):
    return client.delete_cloud_phone_server(
        m.DeleteCloudPhoneServerRequest(
            body=m.DeleteCloudPhoneServerRequestBody(server_ids=server_ids)
        )
    )


def share_listing(client, server_id):
    resp = client.list_share_files(m.ListShareFilesRequest(server_ids=server_id, path="/"))
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    return json.loads(job.execute_msg)["files_in_path"]


def test_bad_deletions_change_nothing(client, server):
    server_id, _ = server
    e = sdk_error(delete, client, [])
    assert (e.status_code, e.error_code) == (400, "CPS.0095"), e
    e = sdk_error(delete, client, [server_id, "0" * 32])
    assert (e.status_code, e.error_code) == (400, "CPS.0015"), e
    detail = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert detail.status == 5, detail


def test_delete_server_then_buy_the_host_again(client, server, s3):
    server_id, phones = server
    push_share_tar(client, s3, server_id, "share/release.tar", {"data/left.txt": b"tenant\n"})
    assert share_listing(client, server_id)["total"] > 0

    resp = delete(client, [server_id])
    assert resp.request_id and resp.job_id, resp
    job = wait_job(client, resp.job_id, limit=180)
    assert job.status == 2, job
    owned = client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest()).servers or []
    assert server_id not in [s.server_id for s in owned]
    left = client.list_cloud_phones(m.ListCloudPhonesRequest()).phones or []
    assert not set(phones) & {p.phone_id for p in left}
    e = sdk_error(
        client.show_cloud_phone_server_detail,
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id),
    )
    assert e.error_code == "CPS.0015", e
    # The job stays queryable under its request.
    jobs = client.list_jobs(m.ListJobsRequest(request_id=resp.request_id)).jobs
    assert [j.job_id for j in jobs] == [resp.job_id], jobs

    # The host is free: bought again, its phones run, its sharepool is empty.
    new_id = buy_server(client)
    assert new_id != server_id
    assert wait_server_ready(client, new_id)
    listing = share_listing(client, new_id)
    assert listing["total"] == 0, listing
