"""Real NBD peers for the tests (the classes live in blockdrv.fuzz.servers)."""

from blockdrv.fuzz.servers import (  # noqa: F401
    ActivatedServer,
    EmbeddedServer,
    Endpoint,
    Nbdkit,
    NbdServer,
    Peer,
    QemuNbd,
    sparse_image,
)
