"""Operations that leave the phones running, through the official SDK:
renames, flavor change, bandwidth, keypair, shared files and apps, APK
install-multiple and uninstall, traffic diversion, the encoding server and
data volume expansion."""

import json

from huaweicloudsdkcph.v1 import model as m

from sdkutil import (
    DEV_PHONE_MODEL,
    DEV_PHONE_MODEL_M768,
    DEV_SERVER_MODEL,
    apk_bytes,
    packages,
    poll,
    push_share_tar,
    sdk_error,
    shell,
    tar_bytes,
    wait_job,
    wait_jobs_ok,
    wait_phone_status,
)


def server_detail(client, server_id):
    return client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )


def test_rename_server(client, server):
    server_id, _ = server
    old = server_detail(client, server_id).server_name
    try:
        client.update_server_name(
            m.UpdateServerNameRequest(
                server_id=server_id,
                body=m.UpdateServerNameRequestBody(server_name="e2e-renamed_server"),
            )
        )
        assert server_detail(client, server_id).server_name == "e2e-renamed_server"
        found = client.list_cloud_phone_servers(
            m.ListCloudPhoneServersRequest(server_name="renamed_serv")
        ).servers
        assert [s.server_id for s in found] == [server_id]
    finally:
        client.update_server_name(
            m.UpdateServerNameRequest(
                server_id=server_id, body=m.UpdateServerNameRequestBody(server_name=old)
            )
        )
    assert server_detail(client, server_id).server_name == old


def test_rename_phone(client, server):
    _, phones = server
    detail = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[1]))
    old = detail.phone_name
    try:
        resp = client.update_phone_name(
            m.UpdatePhoneNameRequest(
                phone_id=phones[1],
                body=m.UpdatePhoneNameRequestBody(phone_name="e2e-renamed-phone"),
            )
        )
        assert resp.request_id
        d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[1]))
        assert d.phone_name == "e2e-renamed-phone"
        found = client.list_cloud_phones(m.ListCloudPhonesRequest(phone_name="renamed-ph")).phones
        assert [p.phone_id for p in found] == [phones[1]]
    finally:
        client.update_phone_name(
            m.UpdatePhoneNameRequest(
                phone_id=phones[1], body=m.UpdatePhoneNameRequestBody(phone_name=old)
            )
        )
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[1]))
    assert d.phone_name == old


def test_change_server_model(client, server):
    """The local server moves to the development server's second flavor
    (more memory) and back: its agent restarts the phones on it, as the
    phones' own /proc/meminfo shows; refusals leave it as it was."""
    server_id, phones = server

    def change(server_model, phone_model):
        return client.change_cloud_phone_server_model(
            m.ChangeCloudPhoneServerModelRequest(
                body=m.ChangeCloudPhoneServerModelRequestBody(
                    server_id=server_id,
                    server_model_name=server_model,
                    phone_model_name=phone_model,
                    extend_param=m.ChangeCloudPhoneServerModelRequestBodyExtendParam(
                        is_auto_pay=1
                    ),
                )
            )
        )

    def mem_total_kb(phone):
        line = shell(client, phone, "head -n 1 /proc/meminfo")
        return int(line.split()[1])

    def changed_to(phone_model, mem_mb):
        resp = change(DEV_SERVER_MODEL, phone_model)
        assert resp.order_id.startswith("CS"), resp
        poll(
            lambda: server_detail(client, server_id).phone_model_name == phone_model,
            120,
            f"server on {phone_model}",
        )
        for p in phones:
            wait_phone_status(client, p, 2)
            assert mem_total_kb(p) == mem_mb * 1024, p
            d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=p))
            assert d.phone_model_name == phone_model

    e = sdk_error(change, DEV_SERVER_MODEL, DEV_PHONE_MODEL)
    assert e.error_code == "CPS.0250", e  # same flavor
    e = sdk_error(change, "physical.no.such.model", DEV_PHONE_MODEL)
    assert e.error_code == "CPS.0246", e  # server model not found
    e = sdk_error(change, DEV_SERVER_MODEL, "rx1.cp.c60.d10.e1v1")
    assert e.error_code == "CPS.0257", e  # another server model's flavor
    e = sdk_error(change, "physical.rx1.xlarge", "rx1.cp.c60.d10.e1v1")
    assert e.error_code == "CPS.0247", e  # other hardware
    d = server_detail(client, server_id)
    assert (d.server_model_name, d.phone_model_name) == (DEV_SERVER_MODEL, DEV_PHONE_MODEL)
    assert mem_total_kb(phones[0]) == 512 * 1024
    try:
        changed_to(DEV_PHONE_MODEL_M768, 768)
    finally:
        # Later files expect the server's first flavor.
        if server_detail(client, server_id).phone_model_name != DEV_PHONE_MODEL:
            changed_to(DEV_PHONE_MODEL, 512)


def bandwidths(client):
    return client.show_bandwidth_detail(m.ShowBandwidthDetailRequest()).band_widths or []


def test_update_shared_bandwidth(client, server):
    server_id, _ = server
    (bw,) = bandwidths(client)
    assert bw.band_width_share_type == 1
    old = bw.band_width_size

    def update(size):
        return client.update_bandwidth(
            m.UpdateBandwidthRequest(
                band_width_id=bw.band_width_id,
                body=m.UpdateBandwidthRequestBody(band_width_size=size),
            )
        )

    try:
        assert update(150).request_id
        assert [b.band_width_size for b in bandwidths(client)] == [150]
        assert [b.band_width_size for b in server_detail(client, server_id).band_widths] == [150]
        e = sdk_error(update, 0)
        assert e.error_code == "CPS.0036", e
        assert [b.band_width_size for b in bandwidths(client)] == [150]
    finally:
        update(old)
    assert [b.band_width_size for b in bandwidths(client)] == [old]


def test_update_keypair(client, server):
    server_id, phones = server
    resp = client.update_keypair(
        m.UpdateKeypairRequest(
            body=m.UpdateKeypairRequestBody(
                servers=[m.ServerKeypair(server_id=server_id, keypair_name="default")]
            )
        )
    )
    assert [j.server_id for j in resp.jobs] == [server_id], resp
    wait_jobs_ok(client, resp.jobs)
    assert server_detail(client, server_id).keypair_name == "default"
    for p in phones:  # the key `cph up` made for the keypair `default`
        keys = shell(client, p, "cat /data/misc/adb/adb_keys")
        assert "ssh-ed25519 " in keys and "cph-up" in keys, keys
    # A keypair the project does not have.
    resp = client.update_keypair(
        m.UpdateKeypairRequest(
            body=m.UpdateKeypairRequestBody(
                servers=[m.ServerKeypair(server_id=server_id, keypair_name="no-such-keypair")]
            )
        )
    )
    assert [(j.server_id, j.error_code) for j in resp.jobs] == [(server_id, "CPS.0067")], resp
    assert server_detail(client, server_id).keypair_name == "default"


def share_listing(client, server_id, path):
    resp = client.list_share_files(m.ListShareFilesRequest(server_ids=server_id, path=path))
    (job,) = wait_jobs_ok(client, resp.jobs)
    files = json.loads(job.execute_msg)["files_in_path"]["files"]
    return [f.strip().rsplit(" ", 1)[-1] for f in files]


def test_share_files_delete(client, server, s3):
    server_id, phones = server
    files = {"data/e2e-del/a.txt": b"a\n", "data/e2e-del/b.txt": b"b\n"}
    push_share_tar(client, s3, server_id, "share/del.tar", files)
    assert sorted(share_listing(client, server_id, "/data/e2e-del")) == ["a.txt", "b.txt"]

    def delete(paths):
        resp = client.delete_share_files(
            m.DeleteShareFilesRequest(
                body=m.DeleteShareFilesRequestBody(file_paths=paths, server_ids=[server_id])
            )
        )
        assert [j.server_id for j in resp.jobs] == [server_id], resp
        return wait_jobs_ok(client, resp.jobs)[0]

    delete(["/data/e2e-del/a.txt"])
    assert share_listing(client, server_id, "/data/e2e-del") == ["b.txt"]
    seen = shell(client, phones[0], "ls /data/media/share/files/data/e2e-del")
    assert "a.txt" not in seen and "b.txt" in seen, seen
    delete(["/data/e2e-del"])
    assert "e2e-del" not in share_listing(client, server_id, "/data")
    job = delete(["/data/e2e-del"])  # gone already: reported, not a failure
    assert "not found" in (job.execute_msg or ""), job


def share_app_versions(client, server_id, pkg):
    """The versions the server's share apps snapshot gives `pkg`, or None."""
    snap = client.list_share_apps_snapshot(
        m.ListShareAppsSnapshotRequest(server_id=server_id, package_name=pkg)
    )
    assert snap.collect_time, snap
    apps = snap.share_apps or []
    return apps[0].versions if apps else None


def test_share_apps_push_and_delete(client, server, s3):
    server_id, phones = server
    pkg = "com.e2e.sharedapp"
    s3.put_object(
        Bucket="e2e",
        Key="share/app.tar",
        Body=tar_bytes(
            {"base.apk": apk_bytes(pkg, version="7.1"), "lib/arm64/libe2e.so": b"\x7fELF"}
        ),
    )
    resp = client.push_share_apps(
        m.PushShareAppsRequest(
            body=m.PushShareAppsRequestBody(
                package_name=pkg,
                bucket_name="e2e",
                object_path="share/app.tar",
                server_ids=[server_id],
                pre_install_app=1,
            )
        )
    )
    assert [j.server_id for j in resp.jobs] == [server_id], resp
    wait_jobs_ok(client, resp.jobs)
    for p in phones:  # the sharepool is mounted in every phone of the server
        app = f"/data/media/share/apps/{pkg}"
        seen = shell(client, p, f"ls {app} {app}/lib/arm64")
        assert "base.apk" in seen and "libe2e.so" in seen, seen
        # and pre-installed from there
        assert f"package:{pkg}" in shell(client, p, "pm list packages"), p
    # The server's snapshot of its shared apps shows it after a heartbeat.
    assert poll(lambda: share_app_versions(client, server_id, pkg) == ["7.1"], 30, "snapshot")
    resp = client.delete_share_apps(
        m.DeleteShareAppsRequest(
            body=m.DeleteShareAppsRequestBody(package_name=pkg, server_ids=[server_id])
        )
    )
    assert [j.server_id for j in resp.jobs] == [server_id], resp
    wait_jobs_ok(client, resp.jobs)
    for p in phones:
        assert pkg not in shell(client, p, "ls /data/media/share/apps")
        uninstall(client, p, pkg)
    assert poll(lambda: share_app_versions(client, server_id, pkg) is None, 30, "snapshot")


def install(client, phone_id, command, content):
    resp = client.install_apk(
        m.InstallApkRequest(
            body=m.InstallApkRequestBody(command=command, content=content, phone_ids=[phone_id])
        )
    )
    return wait_jobs_ok(client, resp.jobs)[0]


def uninstall(client, phone_id, package):
    resp = client.uninstall_apk(
        m.UninstallApkRequest(
            body=m.UninstallApkRequestBody(
                command="uninstall", content=package, phone_ids=[phone_id]
            )
        )
    )
    return wait_jobs_ok(client, resp.jobs)[0]


def test_install_multiple_then_uninstall(client, server, s3):
    _, phones = server
    pkg = "com.e2e.split"
    s3.put_object(Bucket="e2e", Key="apps/split/base.apk", Body=apk_bytes(pkg))
    s3.put_object(
        Bucket="e2e",
        Key="apps/split/config.apk",
        Body=apk_bytes(pkg, {"res/raw/config.txt": b"split\n"}),
    )
    install(
        client,
        phones[1],
        "install-multiple",
        "-r -t obs://e2e/apps/split/base.apk obs://e2e/apps/split/config.apk",
    )
    assert f"package:{pkg}" in packages(client, phones[1])
    paths = shell(client, phones[1], f"pm path {pkg}")
    assert "base.apk" in paths and "split_1.apk" in paths, paths
    uninstall(client, phones[1], pkg)
    assert f"package:{pkg}" not in packages(client, phones[1])


def test_uninstall_single_apk(client, server, s3):
    _, phones = server
    pkg = "com.e2e.gone"
    s3.put_object(Bucket="e2e", Key="apps/gone.apk", Body=apk_bytes(pkg))
    install(client, phones[1], "install", "-r obs://e2e/apps/gone.apk")
    assert f"package:{pkg}" in packages(client, phones[1])
    uninstall(client, phones[1], pkg)
    assert f"package:{pkg}" not in packages(client, phones[1])
    # Uninstalling what is not there fails the job.
    resp = client.uninstall_apk(
        m.UninstallApkRequest(
            body=m.UninstallApkRequestBody(command="uninstall", content=pkg, phone_ids=[phones[1]])
        )
    )
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == -1 and job.error_code, job


def test_import_traffic(client, server):
    _, phones = server
    for traffic_type in ("routing", "direct"):
        resp = client.import_traffic(
            m.ImportTrafficRequest(
                body=m.ImportTrafficRequestBody(traffic_type=traffic_type, phone_ids=phones)
            )
        )
        assert sorted(j.phone_id for j in resp.jobs) == phones, resp
        wait_jobs_ok(client, resp.jobs)
    for p in phones:  # still reachable
        assert "ok" in shell(client, p, "echo ok")


def test_restart_encode_server(client, server):
    """The development flavor names an encoding server: the agent runs it as a
    container on the phone subnet (type 1) and the restart job succeeds."""
    server_id, _ = server
    (enc,) = client.list_encode_servers(
        m.ListEncodeServersRequest(server_id=server_id)
    ).encode_servers
    assert enc.type == 1 and enc.encode_server_ip, enc
    resp = client.restart_encode_server(
        m.RestartEncodeServerRequest(
            body=m.RestartEncodeServerRequestBody(encode_server_ids=[enc.encode_server_id])
        )
    )
    assert [j.encode_server_id for j in resp.jobs] == [enc.encode_server_id], resp
    job = wait_job(client, resp.jobs[0].job_id)
    assert job.status == 2, job


def test_expand_phone_data_volume(client, server):
    """A phone's data volume grows; asking less than it has fails its job."""
    _, phones = server

    def expand(size):
        resp = client.expand_phone_data_volume_size(
            m.ExpandPhoneDataVolumeSizeRequest(
                body=m.ExpandPhoneDataVolumeSizeRequestBody(
                    phones=[m.PhoneDataVolumeSize(phone_id=phones[0], new_size=size)]
                )
            )
        )
        assert resp.jobs and not resp.jobs[0].error_code, resp
        return wait_job(client, resp.jobs[0].job_id)

    job = expand(4096)
    assert job.status == 2 and "4096 GiB" in job.execute_msg, job
    job = expand(1)
    assert (job.status, job.error_code) == (-1, "CPS.0001"), job
    resp = client.expand_phone_data_volume_size(
        m.ExpandPhoneDataVolumeSizeRequest(
            body=m.ExpandPhoneDataVolumeSizeRequestBody(
                phones=[m.PhoneDataVolumeSize(phone_id=phones[0], new_size=40000)]
            )
        )
    )
    assert resp.jobs[0].error_code == "CPS.0001", resp
