# No imports besides ServiceMaker: a broken import in dfly must show up as an
# error when the service is built, not as a silent "Unknown command" in twistd.
from twisted.application.service import ServiceMaker

supernode = ServiceMaker(
    "dfly supernode",
    "dfly.supernode.tap",
    "dfly scheduler and CDN cache (register API on 8002, pieces on 8001)",
    "supernode",
)

dfget = ServiceMaker(
    "dfly peer daemon",
    "dfly.peer.tap",
    "dfly peer daemon: downloads for local dfget runs and serves pieces",
    "dfget",
)

dfdaemon = ServiceMaker(
    "dfly dfdaemon",
    "dfly.dfdaemon.tap",
    "dfly registry mirror / HTTP(S) proxy: image layers peer-to-peer (port 65001)",
    "dfdaemon",
)
