"""Fixtures of the official-SDK tests, shared by every `test_*.py` here.

`scripts/test.sh` starts `cph up --hosts 2` (two hosts of the development
server model, one agent each) in a fresh data directory and points
CPH_CREDENTIALS at its credentials.json. All tests run against that one
platform, one file after another in name order (`test_e2e.py`,
`test_errors.py`, `test_events.py`, `test_images.py`, `test_inventory.py`,
`test_operations.py`, `test_phone_lifecycle.py`, `test_release.py`,
`test_sharefs.py`, `test_switch.py`): the ones that stop, reset or restart
phones come late and leave the phones running; `test_release.py` deletes
the server and buys a host again, and the last switches that server to
the other host.
"""

import json
import os

import pytest

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcph.v1 import CphClient
from huaweicloudsdkcph.v1 import model as m

from sdkutil import (
    DEV_PHONE_MODEL,
    DEV_SERVER_MODEL,
    TEST_IMAGE_ID,
    poll,
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CPH_CREDENTIALS"):
        return
    skip = pytest.mark.skip(
        reason="CPH_CREDENTIALS (credentials.json of a running `cph up`) not set"
    )
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def creds():
    with open(os.environ["CPH_CREDENTIALS"]) as f:
        return json.load(f)


def make_client(ak, sk, project_id, endpoint, ca_cert=None):
    """An SDK client; over HTTPS it trusts `ca_cert` (the certificate
    `cph up --tls` made)."""
    cred = BasicCredentials(ak, sk, project_id)
    builder = CphClient.new_builder().with_credentials(cred).with_endpoints([endpoint])
    if ca_cert:
        config = HttpConfig.get_default_config()
        config.ssl_ca_cert = ca_cert
        builder = builder.with_http_config(config)
    return builder.build()


@pytest.fixture(scope="session")
def raw_client(creds):
    """The SDK client as it is."""
    return make_client(
        creds["ak"], creds["sk"], creds["project_id"], creds["endpoint"], creds.get("ca_cert")
    )


@pytest.fixture(scope="session")
def client(raw_client):
    """The SDK client."""
    return raw_client


def wait_on_sale(client):
    """Waits for a free host of the development model (a host is on sale
    once its agent has registered, and again once a server left it)."""

    def on_sale():
        offers = client.list_cloud_phone_server_model_offerings(
            m.ListCloudPhoneServerModelOfferingsRequest(limit=1000)
        ).models or []
        return any(
            o.model_name == DEV_SERVER_MODEL and o.sell_status == "available" for o in offers
        )

    poll(on_sale, 60, f"a host of {DEV_SERVER_MODEL} on sale")


def buy_server(client):
    """Buys the local server with the development flavor; its id."""
    body = m.CreateNet2CloudPhoneServerRequestBody(
        server_name="e2e",
        server_model_name=DEV_SERVER_MODEL,
        phone_model_name=DEV_PHONE_MODEL,
        image_id=TEST_IMAGE_ID,
        count=1,
        keypair_name="default",
        extend_param=m.CreateNet2CloudPhoneServerRequestBodyExtendParam(
            charging_mode=0, period_type=2, period_num=1, is_auto_pay=1
        ),
        tenant_vpc_id="00000000-0000-0000-0000-000000000000",
        nics=[m.Nic(subnet_id="00000000-0000-0000-0000-000000000001")],
        public_ip=m.CreateNet2CloudPhoneServerRequestBodyPublicIp(eip=None, ids=None),
        band_width=m.CreateNet2CloudPhoneServerRequestBodyBandWidth(
            band_width_share_type=1, band_width_charge_mode=0, band_width_size=100
        ),
    )
    wait_on_sale(client)
    resp = client.create_net2_cloud_phone_server(m.CreateNet2CloudPhoneServerRequest(body=body))
    assert resp.server_ids, resp
    return resp.server_ids[0]


def wait_server_ready(client, server_id):
    """The sorted phone ids of the server once it is normal (5) and all its
    phones run (2)."""

    def ready():
        detail = client.show_cloud_phone_server_detail(
            m.ShowCloudPhoneServerDetailRequest(server_id=server_id)
        )
        phones = client.list_cloud_phones(
            m.ListCloudPhonesRequest(server_id=server_id)
        ).phones or []
        if detail.status == 5 and phones and all(p.status == 2 for p in phones):
            return sorted(p.phone_id for p in phones)
        return None

    return poll(ready, 300, f"server {server_id} normal with running phones", step=1)


def current_server(client):
    """The project's server now (`test_release.py` replaces the session's;
    one is bought when there is none) and its running phones."""
    owned = client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest()).servers or []
    assert len(owned) <= 1, owned
    server_id = owned[0].server_id if owned else buy_server(client)
    return server_id, wait_server_ready(client, server_id)


@pytest.fixture(scope="session")
def server(client):
    """The bought local server and its running phones: (server_id, [phone_id])."""
    owned = client.list_cloud_phone_servers(m.ListCloudPhoneServersRequest()).servers or []
    if owned:  # bought by an earlier run against the same platform
        server_id = owned[0].server_id
    else:
        server_id = buy_server(client)
    return server_id, wait_server_ready(client, server_id)


@pytest.fixture(scope="session")
def s3(creds):
    """The platform's object store, through boto3, with the bucket `e2e`."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=creds["obs_endpoint"],
        aws_access_key_id=creds["obs_ak"],
        aws_secret_access_key=creds["obs_sk"],
        region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket="e2e")
    except Exception:  # already there after a restart
        pass
    return client
