"""The admin web page (aiohttp): accounts, re-authorisation, device passwords, events."""
