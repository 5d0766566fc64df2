"""Moving to xoauth2-proxy from other mail OAuth proxies (``xoauth2-proxy import ...``).

``peer_config`` reads email-oauth2-proxy's INI config and decrypts its stored tokens;
``emailproxy`` turns them into our TOML config and token files.
"""
