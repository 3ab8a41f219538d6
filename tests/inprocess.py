"""A Grid that hands messages straight to a ClientApp in this process (tests only).

It exercises the real ServerApp round loop, wire format and ClientApp handlers without Ray, and
lets tests make nodes crash or corrupt their replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

Tamper = Callable[[int, Message], Message | None]


class InProcessGrid:
    """`num_nodes` SuperNodes (partition ids 0..n-1) served by one ClientApp object.

    ``crash(node_index, message) -> bool`` makes a node answer with an error instead;
    ``late(node_index, message) -> bool`` makes it run the message (its state changes) but
    answer after the server stopped waiting, as a node that outlives the round timeout.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        crash: Callable[[int, Message], bool] | None = None,
        late: Callable[[int, Message], bool] | None = None,
    ) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.crash = crash
        self.late = late
        # Node ids unlike partition ids, as in Flower, so the mapping is really exercised.
        self.contexts = {
            1000 + 7 * p: Context(
                run_id=1,
                node_id=1000 + 7 * p,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for p in range(num_nodes)
        }
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            index = (node - 1000) // 7
            if self.crash is not None and self.crash(index, msg):
                replies.append(Message(error=Error(code=1, reason="node crashed"), reply_to=msg))
                continue
            reply = self.client_app(msg, self.contexts[node])
            if self.late is None or not self.late(index, msg):
                replies.append(reply)
        return replies
