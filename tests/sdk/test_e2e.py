"""End to end through the official SDK against a running `cph up`.

`scripts/test.sh` starts `cph up` with a fresh data directory and points
CPH_CREDENTIALS at its credentials.json. The scenario buys the local server
with the development flavor (the `server` fixture of conftest.py), waits for
it to become normal with running phones, and drives real phones: sync shell,
async shell, push of a tar from the embedded object store, property update,
install, export to the store and restore, share files.
"""

import io
import json
import tarfile

from huaweicloudsdkcph.v1 import model as m

from sdkutil import apk_bytes, push_share_tar, sdk_error, shell, tar_bytes, wait_job, wait_phone_status


def test_sync_shell_echo(client, server):
    _, phones = server
    resp = client.run_sync_command(
        m.RunSyncCommandRequest(
            body=m.RunSyncCommandRequestBody(
                command="shell", content="echo hello-from-phone", phone_ids=phones[:1]
            )
        )
    )
    # The answer carries each phone's result, as the reference's RunSyncCommand does.
    job = resp.jobs[0]
    assert job.status == 2 and job.error_code == "", job
    assert "hello-from-phone" in job.execute_msg, job
    # A command that fails still returns its output.
    resp = client.run_sync_command(
        m.RunSyncCommandRequest(
            body=m.RunSyncCommandRequestBody(
                command="shell", content="ls /no-such-dir", phone_ids=phones[:1]
            )
        )
    )
    job = resp.jobs[0]
    assert job.status == -1 and job.error_code, job
    assert "no-such-dir" in job.execute_msg, job


def test_async_shell_job(client, server):
    _, phones = server
    resp = client.run_shell_command(
        m.RunShellCommandRequest(
            body=m.RunShellCommandRequestBody(
                command="shell", content="getprop ro.boot.serialno", phone_ids=phones
            )
        )
    )
    for j in resp.jobs:
        job = wait_job(client, j.job_id)
        assert job.status == 2, job


def test_property_update_visible(client, server):
    _, phones = server
    prop = json.dumps({"com.cph.mainkeys": 1})
    resp = client.update_cloud_phone_property(
        m.UpdateCloudPhonePropertyRequest(
            body=m.UpdateCloudPhonePropertyRequestBody(
                phones=[m.PhoneProperty(phone_id=phones[0], _property=prop)]
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    detail = client.show_cloud_phone_detail(
        m.ShowCloudPhoneDetailRequest(phone_id=phones[0])
    )
    assert "com.cph.mainkeys" in (detail._property or ""), detail


def test_push_tar_from_object_store(client, server, s3):
    s3.put_object(
        Bucket="e2e",
        Key="push/e2e.tar",
        Body=tar_bytes({"data/local/tmp/e2e.txt": b"pushed through the object store\n"}),
    )
    _, phones = server
    resp = client.push_file(
        m.PushFileRequest(
            body=m.PushFileRequestBody(
                command="push", content="obs://e2e/push/e2e.tar", phone_ids=phones[:1]
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    assert "pushed through the object store" in shell(
        client, phones[0], "cat /data/local/tmp/e2e.txt"
    )


def test_install_apk_from_object_store(client, server, s3):
    s3.put_object(Bucket="e2e", Key="apps/sdkapp.apk", Body=apk_bytes("com.e2e.sdkapp"))
    _, phones = server
    resp = client.install_apk(
        m.InstallApkRequest(
            body=m.InstallApkRequestBody(
                command="install",
                content="-r -t obs://e2e/apps/sdkapp.apk",
                phone_ids=phones[:1],
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    assert "package:com.e2e.sdkapp" in shell(client, phones[0], "pm list packages")


def test_export_then_restore(client, server, s3):
    _, phones = server
    shell(client, phones[0], "mkdir -p /data/e2e && echo original > /data/e2e/f")
    resp = client.batch_export_cloud_phone_data(
        m.BatchExportCloudPhoneDataRequest(
            body=m.BatchExportCloudPhoneDataRequestBody(
                storage_infos=[
                    m.StorageInfo(
                        phone_id=phones[0],
                        include_files=["/data/e2e"],
                        bucket_name="e2e",
                        object_path="export/e2e.tar",
                    )
                ]
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    body = s3.get_object(Bucket="e2e", Key="export/e2e.tar")["Body"].read()
    names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
    assert "data/e2e/f" in names, names

    shell(client, phones[0], "echo changed > /data/e2e/f")
    resp = client.batch_import_cloud_phone_data(
        m.BatchImportCloudPhoneDataRequest(
            body=m.BatchImportCloudPhoneDataRequestBody(
                restore_infos=[
                    m.RestoreInfo(
                        phone_id=phones[0], bucket_name="e2e", object_path="export/e2e.tar"
                    )
                ]
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    wait_phone_status(client, phones[0], 2)
    assert shell(client, phones[0], "cat /data/e2e/f").strip() == "original"


def test_share_files_push_and_list(client, server, s3):
    server_id, phones = server
    push_share_tar(client, s3, server_id, "share/e2e.tar", {"data/shared-e2e.txt": b"shared\n"})
    seen = shell(client, phones[0], "cat /data/media/share/files/data/shared-e2e.txt")
    assert "shared" in seen
    resp = client.list_share_files(
        m.ListShareFilesRequest(server_ids=server_id, path="/data")
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job
    listing = json.loads(job.execute_msg)
    assert any(f.endswith(" shared-e2e.txt") for f in listing["files_in_path"]["files"])


def test_unknown_phone_is_an_error(client):
    e = sdk_error(
        client.show_cloud_phone_detail, m.ShowCloudPhoneDetailRequest(phone_id="0" * 32)
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0005"), e
