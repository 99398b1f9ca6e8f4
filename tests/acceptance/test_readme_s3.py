"""README's S3 flow on a real S3 HTTP endpoint (moto on 127.0.0.1), as a user with AWS keys runs it.

The user: ``AWS_ENDPOINT_URL`` (a MinIO-style store), ``AWS_ACCESS_KEY_ID`` and a DISTINCTIVE
``AWS_SECRET_ACCESS_KEY`` in the environment (moto accepts any key), ``BUCKET`` set, an empty
working directory and HOME, a private Ray temp dir. README's ``s3-flow`` block (prepare digits to
the bucket, train with data and storage_path there) runs verbatim with the CI overrides its marker
names appended to ``cacr train`` (1 epoch, batch 64, V = 2, a ResNet-18 on 8-px crops: the stock
torchvision loader of README is then tested on this export). Then README's evaluate/export block
with the ``s3://`` checkpoint the run printed. Last, the credentials grep: the secret must be in
no file the run wrote - working directory, HOME, every object in the bucket, everything under
Ray's temp dir.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TRAIN_CI = ("epochs=1 batch_size=64 loss.num_positives=1 model.arch=resnet18 data.image_size=8 "
            "augment.crop_size=8")
CHECKPOINT_PLACEHOLDER = "./runs/<name>/checkpoint_<time>"
SECRET = f"cacr-acceptance-SECRET-{uuid.uuid4().hex}"


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _split(url: str) -> tuple[str, str]:
    assert url.startswith("s3://"), f"expected an s3:// URL, got {url!r}"
    bucket, _, key = url[5:].partition("/")
    return bucket, key


@pytest.fixture(scope="module")
def s3_run(s3_server, module_user, acc):
    bucket = f"acc-{uuid.uuid4().hex[:12]}"
    client = _client(s3_server)
    client.create_bucket(Bucket=bucket)
    module_user.env_extra.update({
        "BUCKET": bucket, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "cacr-acceptance-key", "AWS_SECRET_ACCESS_KEY": SECRET})
    block = acc.readme_block("s3-flow")
    script = acc.append_overrides(block.text, "cacr train", TRAIN_CI, block.note)
    r = module_user.run(script, timeout=900)
    assert r.returncode == 0, r.out[-6000:]
    return module_user, client, bucket, acc.last_json(r.stdout, "run_dir")


def test_s3_train_writes_everything_where_it_prints(s3_run, acc, tmp_path):
    user, client, bucket, s = s3_run
    runs = f"s3://{bucket}/runs/"
    assert s["run_dir"].startswith(runs), s
    assert s["tensorboard_logdir"] == s["run_dir"] + "/tensorboard"
    assert s["checkpoint"].startswith(s["run_dir"] + "/"), f"printed checkpoint is not a usable URL: {s['checkpoint']!r}"
    assert s["backbone"].startswith(s["run_dir"] + "/"), s["backbone"]
    keys = set(_keys(client, bucket))
    assert _split(s["backbone"])[1] in keys
    assert any(k.startswith(_split(s["checkpoint"])[1] + "/") for k in keys), "checkpoint not in the bucket"

    # Event files downloaded from the printed tensorboard_logdir and read back.
    _, tb_key = _split(s["tensorboard_logdir"])
    events = [k for k in keys if k.startswith(tb_key + "/") and "events.out.tfevents" in k]
    assert events, f"no event files under {s['tensorboard_logdir']}"
    for k in events:
        dst = tmp_path / "tb" / k[len(tb_key) + 1:]
        dst.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, k, str(dst))
    tags = acc.scalar_tags(tmp_path / "tb")
    for tag in ("train/loss", "val/knn_top1", "epoch/loss"):
        assert tags.get(tag, 0) >= 1, f"no {tag} scalars in {s['tensorboard_logdir']}: {sorted(tags)}"

    # storage_path on S3: nothing of the run lands locally, nor in Ray's folders.
    assert not (user.workdir / "runs").exists()
    stray = [str(p) for p in user.ray_tmp.rglob("events.out.tfevents.*")]
    assert not stray, f"event files under Ray's temp dir: {stray}"


def test_evaluate_and_export_the_printed_s3_checkpoint(s3_run, acc):
    user, _, _, s = s3_run
    block = acc.readme_block("evaluate-export")
    r = user.run(block.text.replace(CHECKPOINT_PLACEHOLDER, shlex.quote(s["checkpoint"])), timeout=600)
    assert r.returncode == 0, r.out[-6000:]
    ev = acc.last_json(r.stdout, "knn_top1")
    assert ev["arch"] == "resnet18" and ev["epoch"] == 1 and ev["classes"] == 10
    assert 0.1 <= ev["knn_top1"] <= 1.0
    ex = acc.last_json(r.stdout, "backbone")
    assert acc.resolve(ex["meta"], user.workdir) == user.workdir / "backbone/backbone.json"

    # README's stock-torchvision loader, verbatim: no cacr package involved.
    snippet = acc.readme_block("load-resnet18")
    check = """
import sys
assert not [m for m in sys.modules if m.split(".")[0] in ("cacr", "pipeline")], "cacr was imported"
net.eval()
with torch.no_grad():
    y = net(torch.rand(2, 3, 8, 8))
assert y.shape == (2, 512), y.shape
print("LOADED", tuple(y.shape))
"""
    p = subprocess.run([sys.executable, "-c", snippet.text + "\n" + check], cwd=user.workdir,
                       env=user.env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "LOADED" in p.stdout, p.stdout + p.stderr


def test_no_file_the_s3_flow_wrote_holds_the_secret_key(s3_run, acc):
    """Runs after the flow's commands (file order): prepare, train, evaluate, export."""
    user, client, bucket, _ = s3_run
    hits = acc.files_containing([user.workdir, user.home, user.ray_tmp], SECRET.encode())
    for k in _keys(client, bucket):
        if SECRET.encode() in client.get_object(Bucket=bucket, Key=k)["Body"].read():
            hits.append(f"s3://{bucket}/{k}")
    assert not hits, f"AWS_SECRET_ACCESS_KEY written to {len(hits)} file(s): {hits[:10]}"
    # The grep can fail: Ray's temp dir exists and holds the logs of the run.
    assert list(Path(user.ray_tmp).rglob("*.log")), "nothing under RAY_TMPDIR: the grep saw nothing"
