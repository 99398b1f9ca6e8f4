"""README's "Shard sets written by other tools" block, verbatim, as a user with AWS keys runs it.

The data is what other tools leave behind, written here with ``webdataset.ShardWriter`` itself:

* timm's naming on the moto S3 endpoint: ``s3://$BUCKET/in1k/imagenet1k-train-0000..0003.tar``
  (``.jpg`` + ``.cls``, 24 x 40 landscape images) and ``imagenet1k-validation-0000.tar``; no index.json;
* an img2dataset-style folder ``./laion`` in the working directory: ``00000.tar ...`` holding
  ``.jpg`` + ``.txt`` + ``.json`` (url, caption, status, ...), no label.

The block's first line trains on the brace pattern with ``data.val_url``: every training sample is
read (no missing label), the kNN monitor runs on the validation shard each epoch (TensorBoard read
back from the bucket). Its second line trains on the unlabelled folder: no monitor, nothing counted
as skipped. Then ``cacr evaluate`` on the first run's printed checkpoint evaluates on the val_url
set. CI appends the overrides the README marker names (tiny model, 16 px, 2 epochs).
"""
from __future__ import annotations

import json
import uuid

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]

TRAIN_CI = ("epochs=2 batch_size=16 loss.num_positives=1 model.width=8 model.head_hidden=64 "
            "model.head_out=32 data.image_size=16 augment.crop_size=16 data.knn_k=5")
TRAIN_N, VAL_N, LAION_N = 64, 20, 40
SECRET = f"cacr-acceptance-SECRET-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def runs(s3_server, module_user, acc, write_webdataset, tmp_path_factory):
    import boto3

    bucket = f"wds-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    local = tmp_path_factory.mktemp("in1k")
    shards = (write_webdataset(str(local / "imagenet1k-train-%04d.tar"), TRAIN_N, style="timm")
              + write_webdataset(str(local / "imagenet1k-validation-%04d.tar"), VAL_N, style="timm",
                                 maxcount=VAL_N, seed=1))
    assert [p.rsplit("/", 1)[1] for p in shards] == [f"imagenet1k-train-{i:04d}.tar" for i in range(4)] \
        + ["imagenet1k-validation-0000.tar"]
    for p in shards:
        client.upload_file(p, bucket, "in1k/" + p.rsplit("/", 1)[1])
    write_webdataset(str(module_user.workdir / "laion" / "%05d.tar"), LAION_N, style="img2dataset")

    module_user.env_extra.update({
        "BUCKET": bucket, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "cacr-acceptance-key", "AWS_SECRET_ACCESS_KEY": SECRET})
    block = acc.readme_block("webdataset-sets")
    script = acc.append_overrides(block.text, "cacr train", TRAIN_CI, block.note)
    r = module_user.run(script, timeout=900)
    assert r.returncode == 0, r.out[-6000:]
    summaries = acc.json_lines(r.stdout, "run_dir")
    assert len(summaries) == 2, r.out[-4000:]
    return module_user, client, bucket, r, summaries


def test_brace_pattern_on_s3_trains_with_the_val_url_monitor(runs, acc, tmp_path):
    user, client, bucket, r, (s3_run, _) = runs
    assert s3_run["epochs"] == 2 and s3_run["skipped"] == {}, s3_run
    assert s3_run["rows_read"] == TRAIN_N  # every training sample in the epoch (64: no padding row)
    assert s3_run["knn_top1"] is not None
    tb = acc.resolve(s3_run["tensorboard_logdir"], user.workdir)
    tags = acc.scalar_tags(tb)
    assert tags.get("val/knn_top1") == 2 and tags.get("train/loss", 0) >= 1, sorted(tags)


def test_img2dataset_folder_trains_unlabelled(runs):
    *_, (_, laion) = runs
    assert laion["epochs"] == 2 and laion["knn_top1"] is None, laion
    assert laion["skipped"] == {}, "an unlabelled set counts no missing labels"
    assert laion["rows_read"] == LAION_N


def test_evaluate_uses_the_val_url_set(runs, acc):
    user, _, _, _, (s3_run, _) = runs
    r = user.run(f"cacr evaluate {s3_run['checkpoint']} linear_epochs=20 actors=1 threads=1", timeout=600)
    assert r.returncode == 0, r.out[-4000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert sum(ev["per_class"]["val_counts"]) == VAL_N, ev["per_class"]
    assert sum(ev["per_class"]["train_counts"]) == TRAIN_N


def test_no_file_the_runs_wrote_holds_the_secret_key(runs, acc):
    user, *_ = runs
    hits = acc.files_containing([user.workdir, user.home, user.ray_tmp], SECRET.encode())
    assert not hits, f"AWS_SECRET_ACCESS_KEY written to {len(hits)} file(s): {hits[:10]}"
