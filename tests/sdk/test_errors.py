"""Error answers the SDK surfaces as `ClientRequestException` with the
reference's `error_code`, and per-target errors answered inside `jobs[]`."""

import pytest

from huaweicloudsdkcph.v1 import model as m

from conftest import make_client
from sdkutil import sdk_error


@pytest.mark.parametrize(
    "kw",
    [
        {"limit": 0},
        {"limit": 101},
        {"offset": -1},
    ],
)
def test_bad_offset_or_limit(client, server, kw):
    for call, req in [
        (client.list_cloud_phones, m.ListCloudPhonesRequest(**kw)),
        (client.list_cloud_phone_servers, m.ListCloudPhoneServersRequest(**kw)),
        (client.show_bandwidth_detail, m.ShowBandwidthDetailRequest(**kw)),
        (client.list_encode_servers, m.ListEncodeServersRequest(**kw)),
    ]:
        e = sdk_error(call, req)
        assert (e.status_code, e.error_code) == (400, "CPS.0002"), (call.__name__, e)


def test_unknown_resources(client, server):
    """The not-found codes, answered with 400 as the reference's error
    table says."""
    missing = "0" * 32
    e = sdk_error(client.show_cloud_phone_detail, m.ShowCloudPhoneDetailRequest(phone_id=missing))
    assert (e.status_code, e.error_code) == (400, "CPS.0005"), e
    e = sdk_error(
        client.show_cloud_phone_server_detail,
        m.ShowCloudPhoneServerDetailRequest(server_id=missing),
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0015"), e
    e = sdk_error(client.show_job, m.ShowJobRequest(job_id=missing))
    assert (e.status_code, e.error_code) == (400, "CPS.0011"), e
    e = sdk_error(
        client.update_phone_name,
        m.UpdatePhoneNameRequest(
            phone_id=missing, body=m.UpdatePhoneNameRequestBody(phone_name="x")
        ),
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0005"), e
    e = sdk_error(
        client.update_server_name,
        m.UpdateServerNameRequest(
            server_id=missing, body=m.UpdateServerNameRequestBody(server_name="x")
        ),
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0015"), e
    e = sdk_error(
        client.update_bandwidth,
        m.UpdateBandwidthRequest(
            band_width_id=missing, body=m.UpdateBandwidthRequestBody(band_width_size=10)
        ),
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0115"), e


def test_per_target_errors_in_jobs(client, server):
    _, phones = server
    missing = "0" * 32
    # A stop of an unknown phone and an invalid id: answered in place, no job.
    resp = client.stop_cloud_phone(
        m.StopCloudPhoneRequest(
            body=m.StopCloudPhoneRequestBody(phone_ids=[missing, "bad/id"])
        )
    )
    codes = [(j.phone_id, j.error_code, j.job_id) for j in resp.jobs]
    assert codes == [(missing, "CPS.0005", None), ("bad/id", "CPS.0004", None)], codes
    resp = client.restart_cloud_phone_server(
        m.RestartCloudPhoneServerRequest(
            body=m.RestartCloudPhoneServerRequestBody(server_ids=[missing])
        )
    )
    assert [(j.server_id, j.error_code) for j in resp.jobs] == [(missing, "CPS.0015")]
    resp = client.restart_encode_server(
        m.RestartEncodeServerRequest(
            body=m.RestartEncodeServerRequestBody(encode_server_ids=[missing])
        )
    )
    assert [(j.encode_server_id, j.error_code) for j in resp.jobs] == [(missing, "CPS.0123")]
    # A reset to the catalog's game image: the phone's model runs
    # cloud_phone images, so that phone's reset is refused in place.
    game_image = "20032420200401a60b0003a99684b8ea"
    resp = client.reset_cloud_phone(
        m.ResetCloudPhoneRequest(
            body=m.ResetCloudPhoneRequestBody(
                phones=[m.ResetPhoneProperty(phone_id=phones[0])], image_id=game_image
            )
        )
    )
    assert [(j.phone_id, j.error_code, j.job_id) for j in resp.jobs] == [
        (phones[0], "CPS.0142", None)
    ], resp.jobs


def test_invalid_parameters(client, server):
    server_id, phones = server
    cases = [
        (client.list_cloud_phones, m.ListCloudPhonesRequest(status=5), "CPS.0010"),
        (
            client.list_cloud_phone_servers,
            m.ListCloudPhoneServersRequest(network_version="v3"),
            "CPS.0240",
        ),
        (client.list_jobs, m.ListJobsRequest(), "CPS.0049"),
        (
            client.list_jobs,
            m.ListJobsRequest(request_ids=",".join(f"{i:032x}" for i in range(21))),
            "CPS.0161",
        ),
        (
            client.stop_cloud_phone,
            m.StopCloudPhoneRequest(body=m.StopCloudPhoneRequestBody(phone_ids=[])),
            "CPS.0009",
        ),
        (
            client.run_shell_command,
            m.RunShellCommandRequest(
                body=m.RunShellCommandRequestBody(command="rm", content="-rf /", phone_ids=phones)
            ),
            "CPS.0117",
        ),
        (
            client.install_apk,
            m.InstallApkRequest(
                body=m.InstallApkRequestBody(
                    command="install", content="obs://e2e/apps/x.zip", phone_ids=phones
                )
            ),
            "CPS.0119",
        ),
        (
            client.uninstall_apk,
            m.UninstallApkRequest(
                body=m.UninstallApkRequestBody(
                    command="uninstall", content="1bad.name", phone_ids=phones
                )
            ),
            "CPS.0173",
        ),
        (
            client.update_phone_name,
            m.UpdatePhoneNameRequest(
                phone_id=phones[0], body=m.UpdatePhoneNameRequestBody(phone_name="bad name")
            ),
            "CPS.0025",
        ),
        (
            client.update_server_name,
            m.UpdateServerNameRequest(
                server_id=server_id, body=m.UpdateServerNameRequestBody(server_name="x" * 61)
            ),
            "CPS.0087",
        ),
        (
            client.import_traffic,
            m.ImportTrafficRequest(
                body=m.ImportTrafficRequestBody(traffic_type="bogus", phone_ids=phones)
            ),
            "CPS.0207",
        ),
        (
            client.push_share_files,
            m.PushShareFilesRequest(
                body=m.PushShareFilesRequestBody(
                    bucket_name="Bad_Bucket", object_path="share/e2e.tar", server_ids=[server_id]
                )
            ),
            "CPS.0134",
        ),
        (
            client.delete_share_files,
            m.DeleteShareFilesRequest(
                body=m.DeleteShareFilesRequestBody(
                    file_paths=["/data/../etc"], server_ids=[server_id]
                )
            ),
            "CPS.0155",
        ),
        (
            client.reset_cloud_phone,
            m.ResetCloudPhoneRequest(
                body=m.ResetCloudPhoneRequestBody(
                    phones=[m.ResetPhoneProperty(phone_id=phones[0])], image_id="0" * 32
                )
            ),
            "CPS.0166",
        ),
    ]
    for call, req, code in cases:
        e = sdk_error(call, req)
        assert (e.status_code, e.error_code) == (400, code), (call.__name__, e)


def test_wrong_secret_key_is_refused(creds):
    bad = make_client(
        creds["ak"],
        "wrong" + creds["sk"],
        creds["project_id"],
        creds["endpoint"],
        creds.get("ca_cert"),
    )
    e = sdk_error(bad.list_cloud_phones, m.ListCloudPhonesRequest())
    assert e.status_code == 401, e
