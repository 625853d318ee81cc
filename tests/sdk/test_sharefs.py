"""Share file systems through the official SDK (AttachShareFilesystem,
DetachShareFilesystem): the operator offers the project a directory every
host has (`cph admin sharefs create`); attached to the server, a
sub-directory of it is in each phone at /data/media/sfs/<id>, read-write;
detached, it is gone. Bad requests are refused with the reference's codes."""

import os
from pathlib import Path

from huaweicloudsdkcph.v1 import model as m

from conftest import current_server
from sdkutil import cph, control_dir, sdk_error, shell, wait_jobs_ok


def attach(client, fs_id, server_ids, path=None, kind="sfs_turbo"):
    return client.attach_share_filesystem(
        m.AttachShareFilesystemRequest(
            body=m.AttachShareFilesystemRequestBody(
                type=kind, id=fs_id, server_ids=server_ids, path=path
            )
        )
    )


def detach(client, fs_id, server_ids):
    return client.detach_share_filesystem(
        m.DetachShareFilesystemRequest(
            body=m.DetachShareFilesystemRequestBody(
                type="sfs_turbo", id=fs_id, server_ids=server_ids
            )
        )
    )


def test_a_share_filesystem_in_the_phones(client):
    server_id, phones = current_server(client)
    source = Path(os.environ["CPH_CREDENTIALS"]).parent / "sfs-games"
    (source / "level2").mkdir(parents=True, exist_ok=True)
    (source / "level2" / "map.dat").write_text("castle\n")
    fs_id = cph(
        "admin", "--data-dir", control_dir(), "sharefs", "create",
        "--project", "default", "--source", str(source),
    ).strip()
    assert fs_id

    e = sdk_error(attach, client, fs_id, [server_id], None, "nfs")
    assert e.error_code == "CPS.0001", e
    e = sdk_error(attach, client, "0" * 32, [server_id])
    assert e.error_code == "CPS.0001", e
    e = sdk_error(attach, client, fs_id, [server_id], "/../etc")
    assert e.error_code == "CPS.0001", e
    e = sdk_error(attach, client, fs_id, [])
    assert e.error_code == "CPS.0095", e

    resp = attach(client, fs_id, [server_id], "/level2")
    assert resp.request_id and resp.jobs[0].server_id == server_id, resp
    wait_jobs_ok(client, resp.jobs)
    for phone in phones:
        out = shell(client, phone, f"cat /data/media/sfs/{fs_id}/map.dat")
        assert out == "castle\n", out
    shell(client, phones[0], f"echo saved > /data/media/sfs/{fs_id}/save.dat")
    assert (source / "level2" / "save.dat").read_text() == "saved\n"

    resp = detach(client, fs_id, [server_id])
    wait_jobs_ok(client, resp.jobs)
    out = shell(client, phones[0], f"ls /data/media/sfs/{fs_id} 2>&1; true")
    assert "map.dat" not in out, out
