"""Custom images through the official SDK: one is made from a phone with
`cph create-image` (the SDK has no call that makes one), then listed
(ListImages), used to reset a phone, shared with another project of the
platform (AddImageMember, ListImageMembers, UpdateImageMember,
DeleteImageMember) and deleted with its object (DeleteImage). The phone is
reset back to the catalog's test image at the end."""

import os

from huaweicloudsdkcph.v1 import model as m

from conftest import make_client
from sdkutil import (
    TEST_IMAGE_ID,
    cph,
    control_dir,
    sdk_error,
    shell,
    wait_jobs_ok,
    wait_phone_status,
)



def images(client, **query):
    return client.list_images(m.ListImagesRequest(**query))


def reset(client, phone, image_id):
    """The phone made again from the image (its data dropped)."""
    resp = client.reset_cloud_phone(
        m.ResetCloudPhoneRequest(
            body=m.ResetCloudPhoneRequestBody(
                phones=[m.ResetPhoneProperty(phone_id=phone)], image_id=image_id
            )
        )
    )
    wait_jobs_ok(client, resp.jobs, limit=300)
    wait_phone_status(client, phone, 2)


def update(client, phone, image_id):
    """The phone restarted on the image (its /data and /cache kept)."""
    resp = client.restart_cloud_phone(
        m.RestartCloudPhoneRequest(
            body=m.RestartCloudPhoneRequestBody(
                phones=[m.PhoneProperty(phone_id=phone)], image_id=image_id
            )
        )
    )
    wait_jobs_ok(client, resp.jobs, limit=300)
    wait_phone_status(client, phone, 2)


def other_project(creds):
    """A second project of the platform with an AK/SK pair: (id, client)."""
    data = control_dir()
    project = cph("admin", "--data-dir", data, "project", "create", "image-member").strip()
    out = cph("admin", "--data-dir", data, "credential", "create", "--project", project)
    made = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    pid = made["project_id"]
    return pid, make_client(made["ak"], made["sk"], pid, creds["endpoint"], creds.get("ca_cert"))


def test_custom_image_made_used_shared_and_deleted(client, creds, server, s3):
    _, phones = server
    phone = phones[1]
    try:
        made_used_shared_and_deleted(client, creds, s3, phone)
    finally:
        # The later tests expect the phone on the test image.
        reset(client, phone, TEST_IMAGE_ID)
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phone))
    assert d.image_id == TEST_IMAGE_ID


def made_used_shared_and_deleted(client, creds, s3, phone):
    shell(client, phone, "mkdir -p /data/local/golden && echo made-here > /data/local/golden/f")

    out = cph(
        "create-image", "--credentials", os.environ["CPH_CREDENTIALS"], phone, "golden image"
    )
    assert ": ok" in out, out
    found = images(client, image_type="private", image_name="golden image").image_infos
    assert len(found) == 1, found
    image = found[0]
    assert image.status == 1 and image.image_size > 0, image
    assert image.project_id == creds["project_id"]
    wait_phone_status(client, phone, 2)
    listed = client.list_cloud_phone_images(m.ListCloudPhoneImagesRequest()).phone_images
    assert any(i.image_id == image.image_id and i.is_public == 2 for i in listed)

    # A reset to the image brings back what the phone held when it was made.
    shell(client, phone, "rm -r /data/local/golden")
    reset(client, phone, image.image_id)
    assert shell(client, phone, "cat /data/local/golden/f").strip() == "made-here"
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phone))
    assert d.image_id == image.image_id

    # A restart naming another image updates the phone to it and keeps its
    # /data (a reset would not): the test image again, with the files.
    shell(client, phone, "echo mine > /data/local/mine && echo x > /etc/outside")
    update(client, phone, TEST_IMAGE_ID)
    assert shell(client, phone, "cat /data/local/mine").strip() == "mine"
    assert shell(client, phone, "cat /data/local/golden/f").strip() == "made-here"
    assert shell(client, phone, "test -e /etc/outside && echo stale || echo gone").strip() == "gone"
    d = client.show_cloud_phone_detail(m.ShowCloudPhoneDetailRequest(phone_id=phone))
    assert d.image_id == TEST_IMAGE_ID

    # Shared with another project: listed at once, used once accepted.
    other_id, other = other_project(creds)
    client.add_image_member(
        m.AddImageMemberRequest(
            image_id=image.image_id, body=m.AddImageMemberRequestBody(member=other_id)
        )
    )
    shared = images(other, image_type="share").image_infos
    assert [i.image_id for i in shared] == [image.image_id]
    assert shared[0].src_project_id == creds["project_id"]
    bad = sdk_error(
        other.update_image_member,
        m.UpdateImageMemberRequest(
            image_id=image.image_id, body=m.UpdateImageMemberRequestBody(status="maybe")
        ),
    )
    assert bad.error_code == "CPS.0010"
    other.update_image_member(
        m.UpdateImageMemberRequest(
            image_id=image.image_id, body=m.UpdateImageMemberRequestBody(status="accepted")
        )
    )
    members = client.list_image_members(
        m.ListImageMembersRequest(image_id=image.image_id)
    ).members
    assert [x.member_id for x in members] == [other_id]
    assert members[0].create_time > 0
    usable = other.list_cloud_phone_images(m.ListCloudPhoneImagesRequest()).phone_images
    assert any(i.image_id == image.image_id for i in usable)
    client.delete_image_member(
        m.DeleteImageMemberRequest(image_id=image.image_id, member_id=other_id)
    )
    assert images(other).total == 0

    # Deleted with its object; the phone made from it keeps running.
    url = image_url(s3, creds["project_id"], image.image_id)
    client.delete_image(m.DeleteImageRequest(image_id=image.image_id))
    assert images(client, image_id=image.image_id).total == 0
    gone = sdk_error(client.delete_image, m.DeleteImageRequest(image_id=image.image_id))
    assert gone.error_code == "CPS.0166"
    assert not object_exists(s3, *url)
    assert shell(client, phone, "cat /data/local/golden/f").strip() == "made-here"


def image_url(s3, project_id, image_id):
    """Bucket and key of an image's tar, which must be in the store."""
    where = ("cph-images", f"{project_id}/{image_id}.tar")
    assert object_exists(s3, *where), where
    return where


def object_exists(s3, bucket, key):
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except s3.exceptions.ClientError as e:
        assert e.response["Error"]["Code"] in ("404", "NoSuchKey"), e.response
        return False


def test_image_errors(client):
    unknown = "0" * 32
    e = sdk_error(client.delete_image, m.DeleteImageRequest(image_id=unknown))
    assert e.error_code == "CPS.0166"
    e = sdk_error(
        client.list_image_members, m.ListImageMembersRequest(image_id=unknown)
    )
    assert e.error_code == "CPS.0166"
    e = sdk_error(client.list_images, m.ListImagesRequest(image_type="public"))
    assert e.error_code == "CPS.0001"
    e = sdk_error(client.list_images, m.ListImagesRequest(limit=101))
    assert e.error_code == "CPS.0002"
    assert images(client, status=0).total == 0
