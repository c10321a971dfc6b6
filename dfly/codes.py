"""Dragonfly's result codes, kept so operators and old scripts recognise them.

The supernode API puts one of these in the ``code`` field of every answer and
also uses a real HTTP status; `dfget` uses the reason codes in its result line.
"""

# API result codes (supernode <-> peer).
SUCCESS = 200
SYSTEM_ERROR = 500
PARAM_ERROR = 501
TARGET_NOT_FOUND = 502
PEER_FINISH = 600
PEER_CONTINUE = 601
PEER_WAIT = 602
SOURCE_FAILED = 604  # "super node sync source fail": the origin failed us
TASK_CONFLICT = 606
URL_NOT_REACHABLE = 607
NEED_AUTH = 608
SOURCE_ERROR = 610  # the CDN fetch broke after registration
PIECE_REPORTED = 611
PEER_DOWN = 612
SOURCE_REFUSED = 613  # dfly: the supernode's source policy refuses the URL (SSRF defence)

# The header that carries a peer's secret (from its registration's answer) on
# every pull, report and service-down about its cid.
PEER_SECRET_HEADER = "X-Dfly-Peer-Secret"
#: The header that carries a task's key on every piece request (CDN port, uploaders).
TASK_KEY_HEADER = "X-Dfly-Task-Key"
PEER_UNAUTHORIZED = 614  # dfly: a pull, report or down without its cid's peer secret
#: The header that carries ``clusterToken`` on every request to the supernode
#: API, the CDN port and the uploaders (when the cluster has one).
CLUSTER_TOKEN_HEADER = "X-Dfly-Cluster-Token"
CLUSTER_UNAUTHORIZED = 615  # dfly: a request without the cluster's token (missing, wrong, malformed)

# Piece results a peer reports.
PIECE_FAILED = 500
PIECE_SUCCESS = 501
PIECE_INVALID = 502  # nothing to report (first pull)
PIECE_SEMISUC = 503

# Task statuses a peer reports.
TASK_STARTED = 700
TASK_RUNNING = 701
TASK_FINISHED = 702

# dfget reasons (the `reason:` of the result line).
REASON_NONE = 0
REASON_REGISTER_FAILED = 1
REASON_DIGEST_MISMATCH = 2
REASON_DOWNLOAD_ERROR = 3
REASON_WRITE_ERROR = 6
REASON_NO_NODE = 8
REASON_SOURCE_ERROR = 10
REASON_NO_BACK_SOURCE = 1000  # added when --notbs forbids going back to source

# dfget error classes (the number in `download FAIL(<code>)`), as in Dragonfly.
ERR_REGISTER = 1103
ERR_DOWNLOAD = 1104
