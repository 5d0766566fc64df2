"""The ``[store]`` config section: defaults, a PostgreSQL DSN, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.store import StoreSettings
from tests.test_config import MINIMAL


def load(tmp_path: Path, store: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(MINIMAL + store)
    return config.load(path)


def test_without_a_store_section_tokens_are_files(tmp_path: Path) -> None:
    assert load(tmp_path, "").store == StoreSettings()


def test_a_postgresql_store(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not read here")
    (tmp_path / "pw").write_text("secret\n")
    cfg = load(tmp_path, '[store]\nbackend = "postgresql"\n'
                         'dsn = "postgresql://x@db1.example:5433/tokens"\n'
                         'password_file = "pw"\nca_file = "ca.pem"\nlock_timeout = 10\n')
    settings = cfg.store
    assert settings.backend == "postgresql" and settings.lock_timeout == 10
    assert settings.display() == "postgresql://x@db1.example:5433/tokens"
    args = settings.connect_args(5)
    assert args["sslmode"] == "verify-full" and args["sslrootcert"] == str(tmp_path / "ca.pem")
    assert args["password"] == "secret"


@pytest.mark.parametrize("section, message", [
    ('backend = "postgresql"', "store.dsn: is required"),
    ('backend = "postgresql"\ndsn = "postgresql://x:pw@db/t"', "must not set password: use "
                                                                 "password_file"),
    ('backend = "postgresql"\ndsn = "postgresql://x@db/t?sslmode=disable"', "verify-full"),
    ('backend = "postgresql"\ndsn = "postgresql://x@db/t"\npassword_env = "A"\n'
     'password_file = "config.toml"', "not both"),
    ('backend = "mysql"', "must be one of file, postgresql"),
    ('dsn = "postgresql://x@db/t"', 'only used with backend = "postgresql"'),
    ('backend = "postgresql"\ndsn = "postgresql://x@db/t"\nlock_timout = 3', "did you mean"),
])
def test_store_mistakes_are_refused_with_the_fix(tmp_path: Path, section: str,
                                                 message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        load(tmp_path, "[store]\n" + section + "\n")
