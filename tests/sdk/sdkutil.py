"""Helpers of the official-SDK tests: polling with deadlines, jobs, shell
output, tars and APK-shaped zips for the object store."""

import io
import os
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from huaweicloudsdkcore.exceptions import exceptions
from huaweicloudsdkcph.v1 import model as m

DEV_SERVER_MODEL = "physical.dev.local"
DEV_PHONE_MODEL = "dev.cp.c1.m512"
DEV_PHONE_MODEL_M768 = "dev.cp.c1.m768"
TEST_IMAGE_ID = "cph0test0image00000000000000001"


# The agent's heartbeat period (the control plane's default).
HEARTBEAT_SECS = 10


def poll(check, limit, what, step=0.3):
    """Calls `check` until it returns something truthy; fails after `limit` s."""
    deadline = time.monotonic() + limit
    while True:
        out = check()
        if out:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {limit} s")
        time.sleep(step)


def wait_job(client, job_id, limit=120):
    """The job once it has ended (status 2 or -1)."""

    def ended():
        job = client.show_job(m.ShowJobRequest(job_id=job_id))
        return job if job.status in (2, -1) else None

    job = poll(ended, limit, f"job {job_id} ended")
    return job


def wait_jobs_ok(client, jobs, limit=120):
    """Waits for every job of a batch answer; each must succeed."""
    assert jobs, "no jobs in the answer"
    done = []
    for j in jobs:
        assert j.job_id and not getattr(j, "error_code", None), j
        job = wait_job(client, j.job_id, limit)
        assert job.status == 2, job
        done.append(job)
    return done


def phone_status(client, phone_id):
    return client.show_cloud_phone_detail(
        m.ShowCloudPhoneDetailRequest(phone_id=phone_id)
    ).status


def wait_phone_status(client, phone_id, status, limit=60):
    poll(
        lambda: phone_status(client, phone_id) == status,
        limit,
        f"phone {phone_id} status {status}",
    )


def shell(client, phone_id, command):
    """Output of `command` on the phone through an async shell job (the sync
    shell is limited to 6 calls a minute, so helpers do not spend it)."""
    resp = client.run_shell_command(
        m.RunShellCommandRequest(
            body=m.RunShellCommandRequestBody(
                command="shell", content=command, phone_ids=[phone_id]
            )
        )
    )
    job = wait_job(client, resp.jobs[0].job_id, limit=30)
    return job.execute_msg or ""


def sync_shell(client, phone_id, command):
    """Output of `command` through the synchronous shell."""
    out = client.run_sync_command(
        m.RunSyncCommandRequest(
            body=m.RunSyncCommandRequestBody(
                command="shell", content=command, phone_ids=[phone_id]
            )
        )
    )
    return out.jobs[0].execute_msg or ""


def packages(client, phone_id):
    return set(
        line.strip()
        for line in shell(client, phone_id, "pm list packages").splitlines()
        if line.strip()
    )


def sdk_error(call, *args):
    """The ClientRequestException a call raises."""
    with pytest.raises(exceptions.ClientRequestException) as e:
        call(*args)
    return e.value


def tar_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def apk_bytes(package, extra=None, version=None):
    """An APK-shaped zip: an AndroidManifest.xml naming `package` (and
    `version` as its versionName)."""
    named = f' android:versionName="{version}"' if version else ""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(
            "AndroidManifest.xml",
            f'<?xml version="1.0"?><manifest package="{package}"{named}></manifest>',
        )
        z.writestr("classes.dex", b"dex\n035\0")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def push_share_tar(client, s3, server_id, key, files):
    """Puts a tar of `files` at `e2e/key` and pushes it to the server's
    shared files; waits for the push to succeed."""
    s3.put_object(Bucket="e2e", Key=key, Body=tar_bytes(files))
    resp = client.push_share_files(
        m.PushShareFilesRequest(
            body=m.PushShareFilesRequestBody(
                bucket_name="e2e", object_path=key, server_ids=[server_id]
            )
        )
    )
    return wait_jobs_ok(client, resp.jobs)


CPH = Path(__file__).resolve().parents[2] / "target" / "debug" / "cph"


def cph(*args):
    """Output of the platform's `cph` command (the debug build)."""
    out = subprocess.run(
        [str(CPH), *args], check=True, capture_output=True, text=True, timeout=600
    )
    return out.stdout


def control_dir():
    """The data directory of the control plane `cph up` runs."""
    return str(Path(os.environ["CPH_CREDENTIALS"]).parent / "control")
