"""Queries through the official SDK: servers (filters, paging, detail),
server flavors, bandwidths, phones (filters, paging, detail with access
information), connection tickets, phone flavors, images, jobs and encoding
servers; and the servers' tags."""

import hashlib
import hmac
import json
import time

from huaweicloudsdkcph.v1 import model as m

from sdkutil import (
    DEV_PHONE_MODEL,
    DEV_SERVER_MODEL,
    TEST_IMAGE_ID,
    cph,
    control_dir,
    sdk_error,
    shell,
    wait_job,
)


def list_servers(client, **kw):
    return client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest(**kw)).servers or []


def list_phones(client, **kw):
    return client.list_cloud_phones(m.ListCloudPhonesRequest(**kw)).phones or []


def test_list_servers_with_filters_and_paging(client, server):
    server_id, _ = server
    ids = [s.server_id for s in list_servers(client)]
    assert ids == [server_id], ids
    mine = list_servers(client, server_id=server_id)
    assert len(mine) == 1
    s = mine[0]
    assert s.server_model_name == DEV_SERVER_MODEL
    assert s.phone_model_name == DEV_PHONE_MODEL
    assert s.network_version == "v2"
    assert s.status == 5
    # server_name is a fuzzy match on the bought name (`e2e-0001`)
    assert [x.server_id for x in list_servers(client, server_name="2e-00")] == [server_id]
    assert list_servers(client, server_name="no-such-server") == []
    assert [x.server_id for x in list_servers(client, network_version="v2")] == [server_id]
    assert list_servers(client, network_version="v1") == []
    assert list_servers(client, server_id="0" * 32) == []
    assert len(list_servers(client, offset=0, limit=1)) == 1
    assert list_servers(client, offset=1, limit=1) == []
    # `count` is the listing's total, whatever the page.
    page = client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest(offset=1, limit=1))
    assert (page.servers or [], page.count) == ([], 1)
    page = client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest(server_name="nothing"))
    assert page.count == 0
    assert s.metadata.charging_mode == 0


def test_server_detail(client, server):
    server_id, _ = server
    d = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert d.server_id == server_id
    assert d.server_name.startswith("e2e-")
    assert d.server_model_name == DEV_SERVER_MODEL
    assert d.phone_model_name == DEV_PHONE_MODEL
    assert d.keypair_name == "default"
    assert d.status == 5
    assert d.network_version == "v2"
    assert d.metadata and d.metadata.order_id and d.metadata.product_id, d.metadata
    assert d.addresses and d.addresses[0].server_ip, d.addresses
    assert d.create_time and d.create_time.endswith("Z"), d.create_time
    assert d.security_groups == []
    # the purchase's shared bandwidth (100 Mbit/s)
    assert [b.band_width_size for b in d.band_widths or []] == [100], d.band_widths
    assert d.band_widths[0].band_width_share_type == 1


def test_server_models(client, server):
    models = client.list_cloud_phone_server_models(
        m.ListCloudPhoneServerModelsRequest()
    ).server_models
    dev = [x for x in models if x.server_model_name == DEV_SERVER_MODEL]
    assert len(dev) == 1, [x.server_model_name for x in models]
    assert dev[0].cpu > 0 and dev[0].product_type == 0
    assert dev[0].extend_spec and dev[0].extend_spec.numa_count >= 1
    phones = client.list_cloud_phone_server_models(
        m.ListCloudPhoneServerModelsRequest(product_type=0)
    ).server_models
    assert DEV_SERVER_MODEL in [x.server_model_name for x in phones]
    games = client.list_cloud_phone_server_models(
        m.ListCloudPhoneServerModelsRequest(product_type=1)
    ).server_models or []
    assert DEV_SERVER_MODEL not in [x.server_model_name for x in games]


def test_bandwidths(client, server):
    server_id, _ = server
    d = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    bws = client.show_bandwidth_detail(m.ShowBandwidthDetailRequest()).band_widths or []
    assert [b.band_width_id for b in bws] == [b.band_width_id for b in d.band_widths]
    b = bws[0]
    assert b.band_width_size == 100 and b.band_width_share_type == 1
    assert b.band_width_charge_mode == 0 and b.band_width_name
    assert client.show_bandwidth_detail(
        m.ShowBandwidthDetailRequest(offset=1, limit=1)
    ).band_widths == []


def test_list_phones_with_filters_and_paging(client, server):
    server_id, phones = server
    assert len(phones) == 2, "cph up runs two phones on its server"
    listed = list_phones(client, server_id=server_id)
    assert sorted(p.phone_id for p in listed) == phones
    for p in listed:
        assert p.server_id == server_id
        assert p.phone_model_name == DEV_PHONE_MODEL
        assert p.image_id == TEST_IMAGE_ID
        assert p.status == 2 and p.type == 0
        assert p.phone_name.startswith("e2e-0001-"), p.phone_name
        # The test image's system; the traffic route; a volume of the pool.
        assert p.image_version == "AOSP-test"
        assert (p.traffic_type, p.volume_mode, p.has_encrypt) == ("direct", 0, False)
    # `count` is the listing's total, whatever the page.
    for kw, total in [({}, 2), (dict(offset=1, limit=1), 2), (dict(status=8), 0),
                      (dict(phone_name=listed[0].phone_name), 1)]:
        assert client.list_cloud_phones(m.ListCloudPhonesRequest(**kw)).count == total, kw
    first = list_phones(client, offset=0, limit=1)
    second = list_phones(client, offset=1, limit=1)
    assert len(first) == 1 and len(second) == 1
    assert sorted([first[0].phone_id, second[0].phone_id]) == phones
    assert list_phones(client, offset=2, limit=1) == []
    named = listed[0].phone_name
    assert [p.phone_id for p in list_phones(client, phone_name=named)] == [listed[0].phone_id]
    assert len(list_phones(client, phone_name="0001-000")) == 2  # fuzzy
    assert list_phones(client, phone_name="no-such-phone") == []
    assert len(list_phones(client, status=2)) == 2
    assert list_phones(client, status=8) == []
    assert len(list_phones(client, type=0)) == 2
    assert list_phones(client, type=1) == []
    assert list_phones(client, server_id="0" * 32) == []


def test_phone_detail_with_access_infos(client, server):
    server_id, phones = server
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[0]))
    assert d.phone_id == phones[0] and d.server_id == server_id
    assert d.status == 2 and d.image_id == TEST_IMAGE_ID
    assert d.phone_model_name == DEV_PHONE_MODEL
    assert d.vnc_enable in ("true", "false")
    assert (d.type, d.image_version, d.traffic_type) == (0, "AOSP-test", "direct")
    server_detail = client.show_cloud_phone_server_detail(
        m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
    )
    assert d.metadata.order_id == server_detail.metadata.order_id
    json.loads(d._property or "{}")  # a JSON string
    infos = d.access_infos or []
    assert infos, d
    kinds = {a.type for a in infos}
    assert "adb" in kinds, kinds
    for a in infos:
        assert a.phone_ip and a.phone_ip == a.device_ip
        assert a.server_ip and a.server_ip == a.intranet_ip
        assert a.server_ip == server_detail.addresses[0].server_ip
        assert 0 < a.listen_port < 65536 and 0 < a.access_port < 65536
    ports = [a.access_port for a in infos]
    assert len(set(ports)) == len(ports), ports
    other = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[1]))
    assert not set(ports) & {a.access_port for a in other.access_infos or []}


def connect(client, phone_ids, client_type="ANDROID"):
    return client.batch_show_phone_connect_infos(
        m.BatchShowPhoneConnectInfosRequest(
            body=m.ConnectionRequestBody(phone_ids=phone_ids, client_type=client_type)
        )
    )


def test_connection_tickets(client, server):
    """Where to connect to a running phone and a ticket for the session,
    which the phone checks with the key its agent put in it."""
    _, phones = server
    unknown = "0" * 32
    resp = connect(client, [phones[0], unknown, phones[1]], "H5_PC")
    assert [c.phone_id for c in resp.connect_infos] == [phones[0], phones[1]]
    assert [(e.phone_id, e.error_code) for e in resp.errors] == [(unknown, "CPS.0005")]
    assert unknown in resp.errors[0].error_msg
    first, second = (c.access_info for c in resp.connect_infos)
    # The server bought no ports of its own: the phone's VNC mapping, on
    # the host's private address.
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phones[0]))
    vnc = [a for a in d.access_infos or [] if a.type == "vnc"]
    assert len(vnc) == 1, d.access_infos
    assert (first.access_port, first.intranet_ip) == (vnc[0].access_port, vnc[0].intranet_ip)
    assert first.access_ip == "" and second.access_port != first.access_port
    assert abs(int(first.timestamp) - time.time()) < 600
    assert first.session_id != second.session_id
    # The ticket is the HMAC-SHA256, under the phone's key, of phone id,
    # session id, timestamp and client type.
    key = shell(client, phones[0], "cat /data/misc/cph/connect_key").strip()
    assert len(key) == 64 and key != shell(client, phones[1], "cat /data/misc/cph/connect_key").strip()
    assert shell(client, phones[0], "stat -c %a:%u /data/misc/cph/connect_key").strip() == "600:0"
    msg = "\n".join([phones[0], first.session_id, first.timestamp, "H5_PC"])
    assert first.ticket == hmac.new(key.encode(), msg.encode(), hashlib.sha256).hexdigest()
    # Another request is another session; the English reference's `iOS`
    # is IOS.
    again = connect(client, [phones[0]], "iOS").connect_infos[0].access_info
    assert again.session_id != first.session_id
    msg = "\n".join([phones[0], again.session_id, again.timestamp, "IOS"])
    assert again.ticket == hmac.new(key.encode(), msg.encode(), hashlib.sha256).hexdigest()
    # Bad input.
    assert sdk_error(connect, client, []).error_code == "CPS.0009"
    assert sdk_error(connect, client, [phones[0]] * 11).error_code == "CPS.0209"
    e = sdk_error(connect, client, [phones[0]], "BLACKBERRY")
    assert e.error_code == "CPS.0001" and "client_type" in e.error_msg
    assert connect(client, ["not-an-id!"]).errors[0].error_code == "CPS.0004"


def test_phone_models(client, server):
    models = client.list_cloud_phone_models(m.ListCloudPhoneModelsRequest()).phone_models
    dev = [x for x in models if x.phone_model_name == DEV_PHONE_MODEL]
    assert len(dev) == 1
    d = dev[0]
    assert d.server_model_name == DEV_SERVER_MODEL
    assert d.phone_capacity == 2 and d.status == 1 and d.memory == 512
    assert "max_share_disk_size_g" in json.loads(d.extend_spec)  # shared storage
    normal = client.list_cloud_phone_models(m.ListCloudPhoneModelsRequest(status=1)).phone_models
    assert DEV_PHONE_MODEL in [x.phone_model_name for x in normal]
    offline = client.list_cloud_phone_models(
        m.ListCloudPhoneModelsRequest(status=0)
    ).phone_models or []
    assert DEV_PHONE_MODEL not in [x.phone_model_name for x in offline]


def test_phone_images(client, server):
    images = client.list_cloud_phone_images(m.ListCloudPhoneImagesRequest()).phone_images
    test = [i for i in images if i.image_id == TEST_IMAGE_ID]
    assert len(test) == 1, [i.image_id for i in images]
    assert test[0].is_public == 1 and test[0].image_label == "cloud_phone"
    assert test[0].image_name and test[0].os_type


def test_jobs_by_request_id(client, server):
    _, phones = server
    resp = client.run_shell_command(
        m.RunShellCommandRequest(
            body=m.RunShellCommandRequestBody(
                command="shell", content="echo listed", phone_ids=phones
            )
        )
    )
    assert resp.request_id and len(resp.jobs) == 2
    for j in resp.jobs:
        job = wait_job(client, j.job_id)
        assert job.status == 2 and job.job_id == j.job_id, job
        assert "listed" in job.execute_msg
        assert job.begin_time.endswith("Z") and job.end_time.endswith("Z"), job
    listed = client.list_jobs(m.ListJobsRequest(request_id=resp.request_id)).jobs
    assert sorted(j.job_id for j in listed) == sorted(j.job_id for j in resp.jobs)
    assert sorted(j.phone_id for j in listed) == phones
    assert all(j.status == 2 for j in listed)
    # request_ids (comma-separated) wins over request_id
    other = client.run_shell_command(
        m.RunShellCommandRequest(
            body=m.RunShellCommandRequestBody(
                command="shell", content="true", phone_ids=phones[:1]
            )
        )
    )
    wait_job(client, other.jobs[0].job_id)
    both = client.list_jobs(
        m.ListJobsRequest(
            request_id="0" * 32, request_ids=f"{resp.request_id},{other.request_id}"
        )
    ).jobs
    assert len(both) == 3
    page = client.list_jobs(
        m.ListJobsRequest(request_ids=f"{resp.request_id},{other.request_id}", limit=2)
    ).jobs
    assert len(page) == 2


def test_encode_servers_list(client, server):
    server_id, _ = server
    # The status is what the agent's heartbeats report of the container.
    deadline = time.time() + 30
    while True:
        encs = client.list_encode_servers(m.ListEncodeServersRequest()).encode_servers or []
        assert [e.server_id for e in encs] == [server_id]
        e = encs[0]
        if e.status == 1 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert e.encode_server_id and e.encode_server_name
    assert e.type == 1 and e.status == 1, e
    assert e.keypair_name == "default"
    # The development flavor's encoding server serves two ports (port_num),
    # each mapped to its own host port on the server's address.
    infos = e.access_infos or []
    assert [(a.type, a.listen_port) for a in infos] == [("port1", 6900), ("port2", 6901)], e
    assert len({a.access_port for a in infos}) == 2 and all(a.access_port for a in infos), e
    assert all(a.server_ip and a.server_ip == a.intranet_ip for a in infos), e
    mine = client.list_encode_servers(
        m.ListEncodeServersRequest(server_id=server_id)
    ).encode_servers
    assert [x.encode_server_id for x in mine] == [e.encode_server_id]
    for kw, n in [({"status": 1}, 1), ({"status": 2}, 0), ({"type": e.type}, 1),
                  ({"type": 1 - e.type}, 0)]:
        got = client.list_encode_servers(m.ListEncodeServersRequest(**kw)).encode_servers or []
        assert len(got) == n, (kw, got)
    assert (
        client.list_encode_servers(m.ListEncodeServersRequest(server_id="0" * 32)).encode_servers
        or []
    ) == []


def test_server_tags(client, server):
    """Tags on the server (the SDK's tag operations, resource type
    cph-server): set, listed per server and per project, found by, deleted;
    a reserved key is CPS.0306."""
    server_id, _ = server
    kw = {"resource_type": "cph-server", "resource_id": server_id}
    client.batch_create_tags(
        m.BatchCreateTagsRequest(
            **kw,
            body=m.BatchCreateTagsRequestBody(
                action="create",
                tags=[m.Tag(key="env", value="e2e"), m.Tag(key="owner", value="sdk")],
            ),
        )
    )
    tags = client.list_resource_tags(m.ListResourceTagsRequest(**kw)).tags
    assert {(t.key, t.value) for t in tags} == {("env", "e2e"), ("owner", "sdk")}
    project = client.list_project_tags(m.ListProjectTagsRequest(resource_type="cph-server"))
    assert any(t.key == "env" and "e2e" in t.values for t in project.tags), project
    found = client.list_resource_instances(
        m.ListResourceInstancesRequest(
            resource_type="cph-server",
            body=m.ListResourceInstancesRequestBody(
                action="filter", tags=[m.Tags(key="env", values=["e2e"])]
            ),
        )
    )
    assert [r.resource_id for r in found.resources] == [server_id], found
    assert found.total_count == 1
    e = sdk_error(
        client.batch_create_tags,
        m.BatchCreateTagsRequest(
            **kw,
            body=m.BatchCreateTagsRequestBody(
                action="create", tags=[m.Tag(key="_sys_x", value="v")]
            ),
        ),
    )
    assert (e.status_code, e.error_code) == (400, "CPS.0306"), e
    client.batch_delete_tags(
        m.BatchDeleteTagsRequest(
            **kw,
            body=m.BatchDeleteTagsRequestBody(
                action="delete", tags=[m.Tag(key="env"), m.Tag(key="owner")]
            ),
        )
    )
    assert client.list_resource_tags(m.ListResourceTagsRequest(**kw)).tags == []


def test_server_model_offerings(client, server):
    """The dev model is on sale while one of its hosts holds no server
    (`cph up --hosts 2`: the session's server takes one of two)."""
    resp = client.list_cloud_phone_server_model_offerings(
        m.ListCloudPhoneServerModelOfferingsRequest(limit=1000)
    )
    assert resp.count == len(resp.models), resp
    status = {o.model_name: o.sell_status for o in resp.models}
    rows = [r.split("\t") for r in cph("admin", "host", "list", "--data-dir", control_dir()).splitlines()]
    free = [r for r in rows if r[5] == "-" and r[6] == "-"]
    assert len(rows) == 2 and len(free) == 1, rows
    assert status[DEV_SERVER_MODEL] == "available", status
