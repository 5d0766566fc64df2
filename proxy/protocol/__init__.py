"""Sans-I/O protocol machines: bytes in, commands out. Nothing here imports asyncio or socket."""
