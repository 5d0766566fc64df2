"""Run by the *peer's* interpreter (bench/.venv-peer): write pre-authorised tokens into an
email-oauth2-proxy config file, encrypted by email-oauth2-proxy's own ``Cryptographer``.

stdin: JSON list of {"user", "password", "access_token", "refresh_token", "expiry"}.
argv[1]: the config file (already holding the server and account sections).
Not imported by the bench (it needs the peer's venv).
"""

import json
import sys

config_path = sys.argv[1]
sys.argv = [sys.argv[0], "--no-gui"]  # the peer reads --no-gui at import time
import emailproxy  # noqa: E402

emailproxy.CONFIG_FILE_PATH = emailproxy.CACHE_STORE = config_path
config = emailproxy.AppConfig.get()
for entry in json.load(sys.stdin):
    user = entry["user"]
    for option in ("token_salt", "token_iterations", "access_token", "access_token_expiry",
                   "refresh_token"):
        config.remove_option(user, option)
    crypto = emailproxy.Cryptographer(config, user, entry["password"])
    config.set(user, "token_salt", crypto.salt)
    config.set(user, "token_iterations", str(crypto.iterations))
    config.set(user, "access_token", crypto.encrypt(entry["access_token"]))
    config.set(user, "access_token_expiry", str(entry["expiry"]))
    config.set(user, "refresh_token", crypto.encrypt(entry["refresh_token"]))
emailproxy.AppConfig.save()
