"""Cloud paths stay URLs end to end: a run writes, resumes and exports through gs://, here a fake GCS
(an fsspec filesystem for the gs protocol over a local folder; orbax's tensorstore pointed at it too)."""

from __future__ import annotations

import json
import os

import pytest
from etils import epath
from fsspec.implementations.local import LocalFileSystem

import evaluate
import train
from comoe_jax.paths import append_text, as_path


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://<path>`` is ``<tmp_path>/bucket_root/<path>`` for epath (fsspec) and for tensorstore."""
    import fsspec
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    root = tmp_path / "bucket_root"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    return str(root / path[len(prefix):])
            return super()._strip_protocol(path)

        def glob(self, path, **kwargs):  # URLs in, URLs out (epath adds the protocol back)
            return [p.replace(str(root) + "/", "", 1) for p in super().glob(path, **kwargs)]

    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    normalize = tensorstore_utils._normalize_path
    monkeypatch.setattr(tensorstore_utils, "_use_gcs_driver", lambda directory: False)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # asks the bucket
    monkeypatch.setattr(tensorstore_utils, "_normalize_path",
                        lambda path: normalize(path.replace("gs://", str(root) + "/", 1)))
    monkeypatch.chdir(tmp_path)
    yield root
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_urls_are_never_turned_into_local_folders():
    assert str(as_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert str(as_path("s3://b/r/adapter")) == "s3://b/r/adapter"
    assert str(as_path("~/runs/x")) == os.path.expanduser("~/runs/x")
    assert str(as_path("file:///tmp/runs/x")) == "/tmp/runs/x"  # a local path written as a URL
    from comoe_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="memory://x: URL scheme not supported; use a local path or one of gs://"):
        as_path("memory://x")


def test_a_run_writes_resumes_and_exports_through_gs(fake_gcs, tmp_path, capsys):
    from tests.support import tiny_config

    cfg = tiny_config()
    args = ["--config", "configs/tiny.py", "mesh.num_devices=1", "adapter.rank=4", "train.batch_size=4",
            "data.train=builtin:add", "train.save_every=2", "eval.before_training=false",
            "eval.after_training=false", "eval.sources=builtin:add", "eval.max_per_task=2",
            "eval.max_new_tokens=2", f"model.random_arch={json.dumps(cfg.model.random_arch)}",
            "train.output_dir=gs://bucket/run"]
    os.symlink(os.path.join(os.path.dirname(train.__file__), "configs"), tmp_path / "configs")
    assert train.main([*args, "train.steps=2"]) == 0
    assert train.main([*args, "train.steps=4"]) == 0
    assert "resumed from step 2 of gs://bucket/run" in capsys.readouterr().out
    run = fake_gcs / "bucket" / "run"
    for name in ("config.json", "metrics.jsonl", "parameters.json", "losses.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "checkpoints/4/state", "checkpoints/2/data"):
        assert (run / name).exists(), name
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert evaluate.main(["--run", "gs://bucket/run", "eval.mode=generate"]) == 0
    assert (run / "eval_test_generate.json").exists()
    from comoe_jax.commands import export
    from comoe_jax.interop import adapter_format, recorded_base

    assert export.main(["--run", "gs://bucket/run", "--format", "comoe"]) == 0  # copied through the object store
    assert (run / "comoe" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (adapter_format("gs://bucket/run/comoe"), recorded_base("gs://bucket/run/comoe")) == ("comoe", "random")
    assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*")), "a URL became a local folder"


def test_appending_to_an_object_rewrites_it(fake_gcs):
    (fake_gcs / "bucket").mkdir()  # the bucket exists
    append_text("gs://bucket/log.jsonl", "a\n")
    append_text("gs://bucket/log.jsonl", "b\n")
    assert (fake_gcs / "bucket" / "log.jsonl").read_text() == "a\nb\n"
