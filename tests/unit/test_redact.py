"""One home for what counts as a secret (sar_scale/utils/redact.py): config keys, environment variable
names in cluster profiles, URLs in storage errors, free text in logs."""

from __future__ import annotations

import os

import pytest

from cluster.spec import ClusterProfile
from sar_scale.config import ConfigError, load_config
from sar_scale.data.storage import open_storage
from sar_scale.utils.redact import MASK, is_secret_key, redact_obj, redact_text


def test_secret_names_keys_and_env_alike():
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY",
                 "aws_access_key_id", "password", "client-secret"):
        assert is_secret_key(name), name
    for name in ("tokens_per_batch", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "max_text_len", "keep_last",
                 "RAY_AUTH_MODE", "auth_type"):
        assert not is_secret_key(name), name
    assert redact_obj({"s3": {"secret_key": "abcd1234"}, "tokens_per_batch": 4}) == {
        "s3": {"secret_key": MASK}, "tokens_per_batch": 4}


def test_profile_env_and_storage_errors_use_the_same_rules(monkeypatch):
    for k in [k for k in os.environ if is_secret_key(k)]:  # the runner's own secrets would be masked too
        monkeypatch.delenv(k)
    with pytest.raises(ConfigError, match="env.MLFLOW_TRACKING_PASSWORD looks like a secret"):
        load_config(ClusterProfile, {"env": {"MLFLOW_TRACKING_PASSWORD": "x"}})
    assert load_config(ClusterProfile, {"env": {"TOKENIZERS_PARALLELISM": "false"}}).env
    monkeypatch.setenv("MY_API_TOKEN", "tok-very-secret")
    with pytest.raises(ValueError) as e:
        open_storage("ftp://user:pw@host/x?sig=abcdef&tok-very-secret")
    assert "pw" not in str(e.value) and "abcdef" not in str(e.value) and "tok-very-secret" not in str(e.value)
    assert redact_text("https://u:p@h/p?token=zz") == f"https://{MASK}@h/p?token={MASK}"
