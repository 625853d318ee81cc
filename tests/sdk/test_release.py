"""Deleting a server through the official SDK (DeleteCloudPhoneServer, a
DELETE with a JSON body): bad requests refused with the reference's codes,
then the server released on its real agent and the host bought again, with
an empty sharepool. A cloud phone BMS (CreateCloudPhoneSingleServer, v2.1)
bought on the free host and released. Runs last: it replaces the session's
server."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from huaweicloudsdkcph.v1 import model as m

from conftest import buy_server, wait_on_sale, wait_server_ready
from sdkutil import (
    DEV_PHONE_MODEL,
    DEV_SERVER_MODEL,
    TEST_IMAGE_ID,
    cph,
    control_dir,
    poll,
    push_share_tar,
    sdk_error,
    wait_job,
    wait_jobs_ok,
)


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


def host_keys():
    """Every line of the hosts' `authorized_keys`."""
    root = Path(os.environ["CPH_CREDENTIALS"]).parent
    return [l for f in root.rglob("authorized_keys") for l in f.read_text().splitlines()]


def buy_bms(client, **change):
    fields = dict(
        server_name="e2e-bms",
        server_model_name=DEV_SERVER_MODEL,
        count=1,
        order_param=m.CreateCloudPhoneSingleServerRequestBodyOrderParam(
            charging_mode=0, period_type=2, period_num=1, is_auto_pay=1
        ),
        nics=[m.NicForSingleServer(subnet_id="00000000-0000-0000-0000-000000000001")],
        public_ip=m.CreateCloudPhoneSingleServerRequestBodyPublicIp(
            type="5_bgp",
            count=1,
            band_width=m.CreateCloudPhoneSingleServerRequestBodyPublicIpBandWidth(
                band_width_share_type=0, band_width_charge_mode=1, band_width_size=300
            ),
        ),
        data_volume=m.CreateCloudPhoneSingleServerRequestBodyDataVolume(
            volume_type="SSD", size=100
        ),
        keypair_name="e2e-bms",
        image_id="bms-image-1",
    )
    fields.update(change)
    body = m.CreateCloudPhoneSingleServerRequestBody(**fields)
    return client.create_cloud_phone_single_server(
        m.CreateCloudPhoneSingleServerRequest(body=body)
    )


def test_a_bms_without_phones(client, creds, server):
    """A host bought as a BMS: no phones, the keypair's key in its SSH
    access; phone operations refused; released like any server."""
    session_server, _ = server
    key = f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB{os.getpid()}bms e2e@bms"
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as f:
        f.write("not a key\n")
        f.flush()
        admin = ["admin", "--data-dir", control_dir(), "keypair", "create"]
        args = [*admin, "--project", creds["project_id"], "--name", "e2e-bms"]
        try:
            cph(*args, "--public-key-file", f.name)
            raise AssertionError("a malformed public key was stored")
        except subprocess.CalledProcessError as e:
            assert "not an OpenSSH public key" in e.stderr, e.stderr
        f.seek(0)
        f.truncate()
        f.write(key + "\n")
        f.flush()
        cph(*args, "--public-key-file", f.name)
    listed = cph("admin", "--data-dir", control_dir(), "keypair", "list").splitlines()
    assert f"{creds['project_id']}\te2e-bms" in listed, listed

    # Bad requests, nothing bought.
    owned = lambda: {s.server_id for s in client.list_cloud_phone_servers(  # noqa: E731
        m.ListCloudPhoneServersRequest()).servers or []}
    before = owned()
    for change, code in [
        (dict(keypair_name=None), "CPS.0068"),
        (dict(keypair_name="no-such-keypair"), "CPS.0067"),
        (dict(nics=[]), "CPS.0001"),
        (dict(server_model_name="physical.no.such.model"), "CPS.0089"),
        (dict(count=11), "CPS.0024"),
        (dict(image_id="x" * 37), "CPS.0030"),
        (dict(data_volume=m.CreateCloudPhoneSingleServerRequestBodyDataVolume(
            volume_type="HDD", size=100)), "CPS.0001"),
    ]:
        e = sdk_error(lambda: buy_bms(client, **change))
        assert e.error_code == code, (change, e)
    assert owned() == before

    wait_on_sale(client)
    resp = buy_bms(client)
    assert resp.order_id.startswith("CS") and len(resp.server_ids) == 1, resp
    bms = resp.server_ids[0]
    detail = lambda: client.show_cloud_phone_server_detail(  # noqa: E731
        m.ShowCloudPhoneServerDetailRequest(server_id=bms))
    poll(lambda: detail().status == 5, 60, "the BMS normal")
    d = detail()
    assert (d.server_name, d.server_model_name, d.phone_model_name, d.keypair_name) == (
        "e2e-bms-0001", DEV_SERVER_MODEL, "", "e2e-bms")
    assert not client.list_cloud_phones(m.ListCloudPhonesRequest(server_id=bms)).phones
    assert key in host_keys()

    # A restart has no phones to restart; a keypair change reaches the
    # host's SSH access.
    resp = client.restart_cloud_phone_server(
        m.RestartCloudPhoneServerRequest(
            body=m.RestartCloudPhoneServerRequestBody(server_ids=[bms])
        )
    )
    wait_jobs_ok(client, resp.jobs)
    resp = client.update_keypair(
        m.UpdateKeypairRequest(
            body=m.UpdateKeypairRequestBody(
                servers=[m.ServerKeypair(server_id=bms, keypair_name="default")]
            )
        )
    )
    wait_jobs_ok(client, resp.jobs)
    assert detail().keypair_name == "default"
    assert key not in host_keys()

    # What only a cloud phone server does is refused.
    e = sdk_error(client.change_cloud_phone_server_model, m.ChangeCloudPhoneServerModelRequest(
        body=m.ChangeCloudPhoneServerModelRequestBody(
            server_id=bms, server_model_name=DEV_SERVER_MODEL, phone_model_name=DEV_PHONE_MODEL,
            extend_param=m.ChangeCloudPhoneServerModelRequestBodyExtendParam(is_auto_pay=1))))
    assert e.error_code == "CPS.0245", e
    e = sdk_error(client.change_cloud_phone_server, m.ChangeCloudPhoneServerRequest(
        server_id=bms, body=m.ChangeCloudPhoneServerRequestBody(
            phone_model_name=DEV_PHONE_MODEL, image_id=TEST_IMAGE_ID)))
    assert e.error_code == "CPS.0105", e

    resp = delete(client, [bms])
    job = wait_job(client, resp.job_id, limit=120)
    assert job.status == 2, job
    assert bms not in owned() and session_server in owned()


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
