"""An example application for ``netplex-native run examples/echo.toml``.

Each connection gets its lines echoed back, prefixed with the serving
container; a protected semaphore limits the service to 2 concurrent
"expensive" requests across all containers (``SLOW`` lines), and a mutex
serialises appends to a shared log variable.
"""

import asyncio

import netplex_native as netplex
from netplex_native import cenv, mutex, semaphore, sharedvar

SLOTS = "echo.expensive_slots"


class Hooks(netplex.ProcessorHooks):
    def post_start_hook(self, cont: netplex.Container) -> None:
        semaphore.create(SLOTS, 2, protected=True)
        sharedvar.create_var("echo.last", own=True)

    def receive_admin_message(self, cont: netplex.Container, name: str, args: list[str]) -> None:
        if name == "hello":
            sharedvar.set_value("echo.last", f"{cont.id} got hello {' '.join(args)}")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    cid = cenv.self_cont().id
    while True:
        line = await reader.readline()
        if not line:
            break
        text = line.decode("utf-8", "replace").rstrip("\n")
        if text.upper() == "SLOW":
            if await semaphore.decrement_async(SLOTS, wait=True, timeout=5) < 0:
                writer.write(f"{cid} busy\n".encode())
            else:
                try:
                    await asyncio.sleep(0.2)
                    writer.write(f"{cid} slow work done\n".encode())
                finally:
                    semaphore.increment(SLOTS)
        else:
            async with mutex.access("echo.log"):
                sharedvar.set_value("echo.last", f"{cid}: {text}")
            writer.write(f"{cid} {text}\n".encode())
        await writer.drain()
