"""asyncio side: listeners, the per-connection driver, the byte relay, TLS contexts, SMTP."""
