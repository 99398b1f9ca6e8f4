"""Mistakes a user makes with ``cacr train``: each ends with exit code 2 and ONE line on stderr,
``cacr: error: ...`` naming the thing, before any training (no traceback, nothing written where it
should not be). Each command also carries ``epochs=1`` so that a regression (a mistake that trains
after all) ends in about a minute instead of twelve epochs.
"""
from __future__ import annotations

import re
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TIMEOUT_S = 240  # generous for a loaded machine; these should end in seconds


def _one_error_line(r) -> str:
    assert r.returncode == 2, f"exit code {r.returncode}, expected 2:\n{r.out[-4000:]}"
    assert "Traceback" not in r.out, r.out[-4000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cacr: error: "), \
        f"expected one 'cacr: error:' line on stderr, got {len(lines)}:\n" + "\n".join(lines[-20:])
    return lines[0]


@pytest.fixture
def s3_user(user, s3_server):
    user.env_extra.update({"AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    return user


def _bucket(endpoint: str) -> tuple[object, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"acc-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def test_mistyped_data_url_is_an_error_and_prepares_nothing_there(s3_user, s3_server):
    client, bucket = _bucket(s3_server)
    r = s3_user.run(f"cacr train data.url=s3://{bucket}/digitz epochs=1", timeout=TIMEOUT_S)
    line = _one_error_line(r)
    assert f"s3://{bucket}/digitz" in line, line
    left = client.list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    assert left == 0, f"{left} objects written into the user's bucket"


def test_mistyped_key_names_the_dotted_key_readme_shows(user, acc):
    # README: (`cacr: error: unknown config key 'optim.base_lrr' (did you mean 'optim.base_lr'?)`)
    m = re.search(r"`(cacr: error: unknown config key '([\w.]+)'[^`]*)`", acc.README.read_text())
    assert m, "README no longer shows the mistyped-key example"
    example, key = m.group(1), m.group(2)
    r = user.run(f"cacr train {key}=0.1 epochs=1", timeout=TIMEOUT_S)
    line = _one_error_line(r)
    assert line.startswith(example), f"README shows {example!r}, the command printed {line!r}"
    assert not (user.workdir / "data").exists() and not (user.workdir / "runs").exists()


def test_storage_path_in_a_missing_bucket_is_an_error_before_training(s3_user):
    missing = f"acc-missing-{uuid.uuid4().hex[:8]}"
    r = s3_user.run(f"cacr train storage_path=s3://{missing}/runs epochs=1", timeout=TIMEOUT_S)
    line = _one_error_line(r)
    assert missing in line, line
    assert "[cacr] epoch" not in r.out and "resume" not in line, r.out[-3000:]


def test_use_gpu_without_a_gpu_is_an_error_before_training(user):
    # CUDA_VISIBLE_DEVICES="" makes a GPU machine a machine without GPUs for this command.
    r = user.run("cacr train use_gpu=true epochs=1", timeout=TIMEOUT_S, CUDA_VISIBLE_DEVICES="")
    line = _one_error_line(r)
    assert "gpu" in line.lower(), line
    assert "[cacr] epoch" not in r.out
