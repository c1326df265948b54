"""Real NBD peers for the tests (the classes live in blockdrv.fuzz.servers)."""

from blockdrv.fuzz.servers import (  # noqa: F401
    EmbeddedServer,
    Nbdkit,
    NbdServer,
    Peer,
    QemuNbd,
    file_server,
    sparse_image,
)
